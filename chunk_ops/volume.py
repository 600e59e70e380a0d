"""Volume I/O: Neuroglancer precomputed layers through cloud-volume.

This is the one place where cloud-volume's x, y, z(, c) arrays become the
(c, z, y, x) arrays that networks and the rest of chunk_ops use.  Reads may reach
outside the volume (context margins at its faces) and are filled with a value;
writes must be aligned to the storage blocks, so a chunk written twice, or by two
workers, gives the same bytes; each block is replaced whole (:mod:`.storage`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.exceptions import InfoUnavailableError, ScaleUnavailableError

from . import storage  # noqa: F401  file:// blocks are written whole (temporary name, rename)
from .geometry import Box, Vec3


class VolumeError(ValueError):
    """A layer is missing, unreadable, or a request does not fit it."""


def _open(url: str, mip: int) -> CloudVolume:
    try:
        # gzip at level 1: network output compresses little, higher levels only burn CPU
        return CloudVolume(
            url, mip=mip, bounded=True, fill_missing=False, cache=False,
            progress=False, parallel=1, non_aligned_writes=False, compress_level=1,
        )
    except InfoUnavailableError:
        raise VolumeError(f"no precomputed layer at {url} (its 'info' file is missing)") from None
    except ScaleUnavailableError:
        raise VolumeError(f"layer {url} has no mip {mip}") from None


@dataclass
class Volume:
    """One mip level of a precomputed layer."""

    url: str
    mip: int
    fill_value: float = 0.0

    def __post_init__(self) -> None:
        self._cv = _open(self.url, self.mip)
        self.bounds = Box(
            Vec3.of(self._cv.voxel_offset.tolist()),
            Vec3.of((self._cv.voxel_offset + self._cv.volume_size).tolist()),
        )
        self.block_size = Vec3.of(self._cv.chunk_size.tolist())
        self.dtype = np.dtype(self._cv.dtype)
        self.num_channels = int(self._cv.num_channels)
        # ints where integral, so scale keys read "4_4_40" as other tools write them
        self.resolution = [int(r) if float(r).is_integer() else float(r) for r in self._cv.resolution]

    @classmethod
    def create(
        cls, url: str, *, bounds: Box, block_size: Vec3, dtype: str,
        num_channels: int, resolution, layer_type: str = "image",
    ) -> "Volume":
        """Write a new layer's info file (one mip) and open it."""
        info = CloudVolume.create_new_info(
            num_channels=num_channels, layer_type=layer_type, data_type=dtype,
            encoding="raw", resolution=list(resolution),
            voxel_offset=bounds.start.to_list(), volume_size=bounds.shape.to_list(),
            chunk_size=block_size.to_list(),
        )
        CloudVolume(url, info=info, progress=False).commit_info()
        return cls(url, 0)

    @staticmethod
    def exists(url: str) -> bool:
        return CloudFiles(url).exists("info")

    def read(self, box: Box) -> np.ndarray:
        """Voxels of ``box`` as (c, z, y, x); outside the bounds: ``fill_value``."""
        out = np.full((self.num_channels, *box.shape.zyx()), self.fill_value, dtype=self.dtype)
        inside = box.intersection(self.bounds)
        if not inside.is_empty():
            cutout = np.asarray(self._cv.download(inside.to_slices(), mip=self.mip))
            out[(slice(None), *inside.to_zyx_slices(relative_to=box))] = cutout.transpose(3, 2, 1, 0)
        return out

    def write(self, box: Box, data: np.ndarray) -> None:
        """Write (c, z, y, x) ``data`` to ``box``; the box must be block-aligned."""
        expected = (self.num_channels, *box.shape.zyx())
        if data.shape != expected:
            raise VolumeError(f"data of shape {data.shape} does not fit {box} (expected {expected})")
        if not self.bounds.contains(box):
            raise VolumeError(f"{box} is outside the layer bounds {self.bounds} of {self.url}")
        if not box.is_aligned(self.bounds.start, self.block_size, self.bounds):
            raise VolumeError(
                f"{box} is not aligned to the storage blocks {self.block_size.to_list()} "
                f"of {self.url} (grid origin {self.bounds.start.to_list()})"
            )
        xyzc = np.asarray(data, dtype=self.dtype).transpose(3, 2, 1, 0)
        self._cv[box.to_slices()] = xyzc
