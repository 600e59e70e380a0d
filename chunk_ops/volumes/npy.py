"""NumPy ``.npy`` files: ``npy://file:///data/em.npy``, local disk only.

The array is (c, z, y, x), or (z, y, x) for one channel, read and written through a
memory map, so a read loads only its box and workers may write separate blocks of
one file at once.  A ``.npy`` file has no place for anything else, so a JSON sidecar
beside it, ``em.npy.json``, holds ``voxel_offset``, ``resolution`` (x, y, z; nm) and
``block_size`` (the write grid, x y z); without it the array starts at 0 with
resolution 1 and is one block.  Every block of a ``.npy`` file is stored: none can
be missing.  Files that go with the layer (a job's) live in ``em.npy.d/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from cloudfiles import CloudFiles

from .. import storage  # noqa: F401  the sidecar is written whole (temporary name, rename)
from ..geometry import Box, Vec3
from .base import Volume, VolumeError, plain_resolution, stored_shape


def _path(location: str) -> Path:
    path = storage.local_path(location)
    if path is None:
        raise VolumeError(f"npy://{location}: .npy volumes are local files (file://)")
    return path


def _sidecar(path: Path) -> tuple[CloudFiles, str]:
    return CloudFiles(f"file://{path.parent}"), f"{path.name}.json"


class NpyVolume(Volume):
    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        self._path = _path(location)
        if not self._path.is_file():
            raise VolumeError(f"no .npy file at {self.url}")
        array = self._array = self._map("r")  # reads share one map; writes open theirs
        self.num_channels, size = stored_shape(array.shape, self.url)
        self._rank, self.dtype = array.ndim, array.dtype
        files, name = _sidecar(self._path)
        try:
            meta = files.get_json(name) or {}
        except json.JSONDecodeError:
            raise VolumeError(f"{self._path}.json is not JSON") from None
        self.bounds = Box.from_shape(Vec3.of(meta.get("voxel_offset", [0, 0, 0])), size)
        self.block_size = Vec3.of(meta.get("block_size", size.to_list()))
        self.resolution = plain_resolution(meta.get("resolution", [1, 1, 1]))

    def _map(self, mode: str) -> np.memmap:
        try:
            return np.load(self._path, mmap_mode=mode, allow_pickle=False)
        except ValueError as e:
            raise VolumeError(f"{self.url} is not a numeric .npy array: {e}") from None

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        """The sidecar first: the file, whose presence means the layer exists, comes last."""
        path = _path(location)
        if path.exists():
            raise VolumeError(f"npy://{location} exists already")
        files, name = _sidecar(path)
        files.put_json(name, {"voxel_offset": bounds.start.to_list(), "resolution": plain_resolution(resolution),
                              "block_size": block_size.to_list()})
        array = np.lib.format.open_memmap(f"{path}.tmp", mode="w+", dtype=dtype,
                                          shape=(num_channels, *bounds.shape.zyx()))
        del array  # flushes the header; the data stays sparse zeros until written
        Path(f"{path}.tmp").replace(path)

    @staticmethod
    def exists(location: str) -> bool:
        return _path(location).is_file()

    @staticmethod
    def folder(location: str) -> str:
        return f"{location}.d"

    def _read_inside(self, box: Box) -> np.ndarray:
        data = np.array(self._array[self._local_index(box, self._rank)])
        return data if self._rank == 4 else data[None]

    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        array = self._map("r+")
        array[self._local_index(box, self._rank)] = data if self._rank == 4 else data[0]
        array.flush()
