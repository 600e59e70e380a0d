"""Neuroglancer precomputed layers (file://, gs://, s3://, http(s)://) through cloud-volume.

cloud-volume's arrays are x, y, z, c; they become (c, z, y, x) here.  Each block
is replaced whole on local disk too (:mod:`chunk_ops.storage`).
"""

from __future__ import annotations

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import CloudVolume
from cloudvolume.exceptions import InfoUnavailableError, ScaleUnavailableError

from .. import storage  # noqa: F401  file:// blocks are written whole (temporary name, rename)
from ..geometry import Box, Vec3
from .base import Volume, VolumeError, plain_resolution


class PrecomputedVolume(Volume):
    """One mip level of a precomputed layer."""

    def __init__(self, url: str, mip: int = 0, fill_value: float = 0.0) -> None:
        self.url, self.mip, self.fill_value = url, mip, fill_value
        try:
            # gzip at level 1: network output compresses little, higher levels only burn CPU
            self._cv = CloudVolume(
                url, mip=mip, bounded=True, fill_missing=False, cache=False,
                progress=False, parallel=1, non_aligned_writes=False, compress_level=1,
            )
        except InfoUnavailableError:
            raise VolumeError(f"no precomputed layer at {url} (its 'info' file is missing)") from None
        except ScaleUnavailableError:
            raise VolumeError(f"layer {url} has no mip {mip}") from None
        self.bounds = Box(
            Vec3.of(self._cv.voxel_offset.tolist()),
            Vec3.of((self._cv.voxel_offset + self._cv.volume_size).tolist()),
        )
        self.block_size = Vec3.of(self._cv.chunk_size.tolist())
        self.dtype = np.dtype(self._cv.dtype)
        self.num_channels = int(self._cv.num_channels)
        self.resolution = plain_resolution(self._cv.resolution)

    @classmethod
    def create(cls, url: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> "PrecomputedVolume":
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

    def _read_inside(self, box: Box) -> np.ndarray:
        return np.asarray(self._cv.download(box.to_slices(), mip=self.mip)).transpose(3, 2, 1, 0)

    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        self._cv[box.to_slices()] = data.transpose(3, 2, 1, 0)
