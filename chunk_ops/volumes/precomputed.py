"""Neuroglancer precomputed layers (file://, gs://, s3://, http(s)://) through cloud-volume.

cloud-volume's arrays are x, y, z, c; they become (c, z, y, x) here.  Each block
is replaced whole on local disk too (:mod:`chunk_ops.storage`).  cloud-volume is
opened with ``fill_missing=False`` even when the volume's ``fill_missing`` is set:
its own option fills with its background colour, the base class fills with the
volume's ``fill_value``, as for every other format.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
from cloudfiles import CloudFiles
from cloudvolume import Bbox, CloudVolume, chunks
from cloudvolume.datasource.precomputed.common import cdn_cache_control, content_type
from cloudvolume.exceptions import EmptyVolumeException, InfoUnavailableError, ScaleUnavailableError

from .. import storage  # file:// blocks are written whole (temporary name, rename)
from ..geometry import Box, ChunkPlan, Vec3
from .base import MissingBlock, Volume, VolumeError, plain_resolution


class PrecomputedVolume(Volume):
    """One mip level of a precomputed layer."""

    multiscale = True

    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        try:
            # gzip at level 1: network output compresses little, higher levels only burn CPU
            self._cv = CloudVolume(
                location, mip=mip, bounded=True, fill_missing=False, cache=False,
                progress=False, parallel=1, non_aligned_writes=False, compress_level=1,
            )
        except InfoUnavailableError:
            raise VolumeError(f"no precomputed layer at {location} (its 'info' file is missing)") from None
        except ScaleUnavailableError:
            raise VolumeError(f"layer {location} has no mip {mip}") from None
        self.bounds = Box(
            Vec3.of(self._cv.voxel_offset.tolist()),
            Vec3.of((self._cv.voxel_offset + self._cv.volume_size).tolist()),
        )
        self.block_size = Vec3.of(self._cv.chunk_size.tolist())
        self.dtype = np.dtype(self._cv.dtype)
        self.num_channels = int(self._cv.num_channels)
        self.resolution = plain_resolution(self._cv.resolution)

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        """Write a new layer's info file (one mip)."""
        info = CloudVolume.create_new_info(
            num_channels=num_channels, layer_type=layer_type, data_type=dtype,
            encoding="raw", resolution=list(resolution),
            voxel_offset=bounds.start.to_list(), volume_size=bounds.shape.to_list(),
            chunk_size=block_size.to_list(),
        )
        CloudVolume(location, info=info, progress=False).commit_info()

    @staticmethod
    def exists(location: str) -> bool:
        return CloudFiles(location).exists("info")

    @classmethod
    def mip_count(cls, location: str) -> int:
        return len(CloudVolume(location, progress=False).scales)

    @classmethod
    def add_mip(cls, location: str, factor: Vec3, mip: int) -> int:
        """The scale ``factor`` coarser than scale ``mip - 1``, with its block size.  Two runs
        that add the same level write the same info: cloud-volume keeps one scale per resolution."""
        cv = CloudVolume(location, progress=False)
        count = len(cv.scales)
        new = cls._level_to_add(location, count, mip)
        if new is None:
            return mip
        below = new - 1
        resolution = [r * f for r, f in zip(cv.meta.resolution(below).tolist(), factor)]
        cv.meta.add_resolution(resolution, chunk_size=cv.meta.chunk_size(below).tolist())
        cv.commit_info()
        return new

    def _read_inside(self, box: Box) -> np.ndarray:
        try:
            xyzc = self._cv.download(box.to_slices(), mip=self.mip)
        except EmptyVolumeException as e:  # cloud-volume gives the missing block's box
            raise MissingBlock(f"{self.location}/{self._cv.key}/{Bbox.create(e.args[0]).to_filename()}") from None
        return np.asarray(xyzc).transpose(3, 2, 1, 0)

    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        xyzc = data.transpose(3, 2, 1, 0)
        meta = self._cv.meta
        # mem:// raw layers hold numpy arrays, not files; sharded scales are written as shards
        if meta.encoding(self.mip) != "raw" or meta.path.protocol == "mem" or meta.sharding(self.mip):
            self._cv[box.to_slices()] = xyzc
            return
        # Raw blocks are encoded and uploaded here because cloud-volume 12.15.2 drops
        # compress_level: its upload gzips with cloudfiles' default, level 9 (64x64x12x3
        # float32 network output: 13.6 ms a block with libdeflate, 217 ms with zlib, against
        # 3.3 ms at level 1, for a ratio of 0.625 against 0.661).  Same bytes, names and
        # headers as cloud-volume's upload; only the gzip level differs.
        files = [  # the box is aligned, so its blocks are whole or end at the layer bounds
            {"path": self._block_path(block),
             "content": chunks.encode(xyzc[Box(block.start - box.start, block.stop - box.start).to_slices()], "raw")}
            for block in ChunkPlan(box, self.block_size, self.bounds.start)
        ]
        self._files.puts(
            files, content_type=content_type("raw"), compress="gzip", compression_level=1,
            cache_control=cdn_cache_control(self._cv.cdn_cache),
        )

    def block_names(self, box: Box) -> list[str] | None:
        meta = self._cv.meta
        if meta.sharding(self.mip):  # blocks live inside shard files
            return None
        return [self._block_path(b)
                for b in ChunkPlan(box, self.block_size, self.bounds.start)]

    @cached_property
    def _files(self):
        """The layer's files (blocks written and checked here), opened once."""
        return storage.files_at(self._cv.cloudpath, progress=False, secrets=self._cv.config.secrets)

    def _block_path(self, block: Box) -> str:
        """A block's file, as cloud-volume names it (its box's filename, under the scale's key)."""
        return self._cv.meta.join(self._cv.meta.key(self.mip), block.to_filename())

    def stored_block_names(self, prefix: str = "") -> set[str]:
        folder = self._cv.meta.key(self.mip) + "/"
        return set(storage.list_folder(self._files, folder + prefix))

    def missing_blocks(self, box: Box) -> list[str] | None:
        names = self.block_names(box)
        if names is None:
            return None
        found = storage.exists_all(self._files, names)
        return [name for name in names if not found[name]]
