"""HDF5 datasets through h5py: ``h5://file:///data/em.h5#/raw`` (file, then the dataset path).

Local files only (h5py reads no object stores).  A created dataset is (c, z, y, x),
chunked by one storage block holding every channel (a block larger than the
volume is cut to it), gzip level 1; a (z, y, x) dataset opens as one channel and a
contiguous one as a single block.  The dataset's attributes hold ``voxel_offset``
and ``resolution`` (x, y, z; nm); without them it starts at 0 with resolution 1.
A chunk that was never written is a missing block.

An HDF5 file takes one writer at a time: readers and writers of the file take
turns on a lock file beside it (``em.h5.lock``), so a local pool of workers can
share it.  Files that go with the layer (a job's) live in ``em.h5.d/raw/``.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .. import storage
from ..geometry import Box, ChunkPlan, Vec3
from .base import MissingBlock, Volume, VolumeError, plain_resolution, stored_shape


def _split(location: str) -> tuple[str, Path, str]:
    """``file:///x.h5#/raw`` -> (file URL, local path, dataset path)."""
    file_url, _, dataset = location.partition("#")
    if not dataset.strip("/"):
        raise VolumeError(f"h5://{location} names no dataset: write h5://file:///path/file.h5#/dataset")
    path = storage.local_path(file_url)
    if path is None:
        raise VolumeError(f"h5://{location}: HDF5 volumes are local files (file://), not {file_url}")
    return file_url, path, "/" + dataset.strip("/")


@contextmanager
def _turn(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold the file's lock: shared to read, exclusive to write.  Where no lock file can be
    made (a read-only folder) nobody writes, so reading goes ahead without one."""
    try:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        if exclusive:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


class Hdf5Volume(Volume):
    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        _, self._path, self._dataset = _split(location)
        if not self.exists(location):
            raise VolumeError(f"no HDF5 dataset at {self.url}")
        with _turn(self._path, False), h5py.File(self._path, "r") as f:
            d = f[self._dataset]
            self.num_channels, size = stored_shape(d.shape, self.url)
            self._rank = len(d.shape)
            chunks = d.chunks[-3:] if d.chunks else d.shape[-3:]
            self.block_size = Vec3(chunks[2], chunks[1], chunks[0])
            self.bounds = Box.from_shape(Vec3.of([int(v) for v in d.attrs.get("voxel_offset", [0, 0, 0])]), size)
            self.dtype = np.dtype(d.dtype)
            self.resolution = plain_resolution(d.attrs.get("resolution", [1, 1, 1]))
            self._chunked = d.chunks is not None

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        _, path, dataset = _split(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _turn(path, True), h5py.File(path, "a") as f:
            if dataset in f:
                raise VolumeError(f"h5://{location} exists already")
            block = block_size.minimum(bounds.shape)
            d = f.create_dataset(dataset, shape=(num_channels, *bounds.shape.zyx()), dtype=dtype,
                                 chunks=(num_channels, *block.zyx()), compression="gzip", compression_opts=1,
                                 fillvalue=0)
            d.attrs["voxel_offset"] = bounds.start.to_list()
            d.attrs["resolution"] = plain_resolution(resolution)

    @staticmethod
    def exists(location: str) -> bool:
        _, path, dataset = _split(location)
        if not path.is_file() or not h5py.is_hdf5(path):
            return False
        with _turn(path, False), h5py.File(path, "r") as f:
            return isinstance(f.get(dataset), h5py.Dataset)

    @staticmethod
    def folder(location: str) -> str:
        file_url, _, dataset = _split(location)
        return f"{file_url}.d{dataset}"

    def _read_inside(self, box: Box) -> np.ndarray:
        with _turn(self._path, False), h5py.File(self._path, "r") as f:
            d = f[self._dataset]
            if self._chunked:
                for block in ChunkPlan(box, self.block_size, self.bounds.start):
                    corner = (block.start - self.bounds.start) // self.block_size * self.block_size
                    if d.id.get_chunk_info_by_coord((0,) * (self._rank - 3) + corner.zyx()).byte_offset is None:
                        start = (self.bounds.start + corner).to_list()
                        raise MissingBlock(f"{self._path}#{self._dataset} chunk at voxel (x y z) {start}")
            data = d[self._local_index(box, self._rank)]
        return data if self._rank == 4 else data[None]

    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        with _turn(self._path, True), h5py.File(self._path, "r+") as f:
            f[self._dataset][self._local_index(box, self._rank)] = data if self._rank == 4 else data[0]
