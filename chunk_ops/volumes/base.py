"""The one volume interface: what every storage format gives the rest of chunk_ops.

Arrays are (c, z, y, x) here and everywhere above this package; coordinates are
voxels at the volume's mip, x, y, z, half-open (:class:`~chunk_ops.geometry.Box`).
Each format (one module per format) only reads and writes a box that lies inside
the bounds; this base class does the rest, the same way for every format:

* reads that reach outside the bounds (context margins at the faces) give ``fill_value``;
* a block missing from storage is an error naming it, or, with ``fill_missing``,
  reads as ``fill_value`` (formats report a missing block by raising :class:`MissingBlock`);
* ``blackout_sections`` (z indices) read as ``fill_value`` whatever is stored;
* writes must have the right shape, lie inside the bounds and be aligned to the
  storage blocks, so a chunk written twice, or by two workers, gives the same bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

import numpy as np

from ..geometry import Box, ChunkPlan, Vec3


class VolumeError(ValueError):
    """A layer is missing, unreadable, or a request does not fit it."""


class MissingBlock(VolumeError):
    """A storage block of the layer is not stored; ``key`` names it (a file or object key)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"block {key} is missing")
        self.key = key


class Volume(ABC):
    """One resolution level of a layer, in any format.

    Set by each format's constructor: ``bounds`` (Box), ``block_size`` (Vec3), ``dtype``
    (numpy), ``num_channels`` and ``resolution`` (nm per voxel, x y z; ints where integral).
    """

    url: str
    mip: int
    fill_value: float
    fill_missing: bool
    blackout_sections: tuple[int, ...]
    bounds: Box
    block_size: Vec3
    dtype: np.dtype
    num_channels: int
    resolution: list
    multiscale: ClassVar[bool] = False  # does the format hold several resolution levels (mips)?

    def __init__(self, location: str, mip: int = 0, *, url: str | None = None, fill_value: float = 0.0,
                 fill_missing: bool = False) -> None:
        self.url = url or location  # what the user wrote: the format prefix and the location
        self.location, self.mip = location, mip
        self.fill_value, self.fill_missing = fill_value, fill_missing
        self.blackout_sections = ()

    # --- what a format implements ----------------------------------------------------
    @abstractmethod
    def _read_inside(self, box: Box) -> np.ndarray:
        """(c, z, y, x) voxels of ``box``, which lies inside the bounds; raises
        :class:`MissingBlock` if a block under it is not stored."""

    @abstractmethod
    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        """Store (c, z, y, x) ``data`` of this volume's dtype at a checked, block-aligned ``box``."""

    @classmethod
    @abstractmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        """Create a new single-mip layer at ``location``; ``VolumeError`` if it cannot."""

    @staticmethod
    @abstractmethod
    def exists(location: str) -> bool:
        """Is there a layer at ``location``?"""

    @staticmethod
    def folder(location: str) -> str:
        """A storage folder that belongs to the layer, for the files that go with it (a job's
        spec, markers and scratch).  The layer's own folder; single-file formats override it."""
        return location

    # pyramids: formats that hold several resolution levels set multiscale and override these
    @classmethod
    def mip_count(cls, location: str) -> int:
        return 1

    @classmethod
    def add_mip(cls, location: str, factor: Vec3, mip: int) -> int:
        """Make sure level ``mip`` exists, ``factor`` coarser than level ``mip - 1``; returns
        ``mip``.  A level there already is left alone (never one stacked above the top)."""
        raise VolumeError(f"{location}: this format holds one resolution level, no pyramid")

    @staticmethod
    def _level_to_add(location: str, count: int, mip: int) -> int | None:
        """``mip`` if a layer of ``count`` levels lacks it, None if it has it already."""
        if mip < 1 or mip > count:
            raise VolumeError(f"{location}: cannot add mip {mip}; its levels are 0 to {count - 1}, "
                              f"so the next one is {count}")
        return mip if mip == count else None

    # --- what the rest of chunk_ops calls ---------------------------------------------
    def block_names(self, box: Box) -> list[str] | None:
        """The stored names of the blocks covering ``box`` (aligned), for verification; None
        where the format keeps blocks where they cannot be listed by name."""
        return None

    def stored_block_names(self, prefix: str = "") -> set[str]:
        """The names of the blocks this level holds whose names start with ``prefix`` (a listing)."""
        raise NotImplementedError

    def missing_blocks(self, box: Box) -> list[str] | None:
        """The blocks covering ``box`` that are not stored (one existence check each); None
        where the format cannot name its blocks."""
        return None

    def black_out(self, sections: Iterable[int]) -> None:
        """Read the z sections ``sections`` as ``fill_value`` from now on."""
        sections = tuple(sorted(set(sections)))
        z0, z1 = self.bounds.start.z, self.bounds.stop.z
        for z in sections:
            if not z0 <= z < z1:
                raise VolumeError(f"blackout section {z} is outside the z range [{z0}, {z1}) of {self.url} "
                                  f"at mip {self.mip}")
        self.blackout_sections = sections

    def read(self, box: Box) -> np.ndarray:
        """Voxels of ``box`` as (c, z, y, x); outside the bounds, in missing blocks (with
        ``fill_missing``) and in blacked-out sections: ``fill_value``."""
        out = np.full((self.num_channels, *box.shape.zyx()), self.fill_value, dtype=self.dtype)
        inside = box.intersection(self.bounds)
        if not inside.is_empty():
            out[(slice(None), *inside.to_zyx_slices(relative_to=box))] = self._read_with_holes(inside)
        for z in self.blackout_sections:
            if box.start.z <= z < box.stop.z:
                out[:, z - box.start.z] = self.fill_value
        return out

    def _local_index(self, box: Box, rank: int) -> tuple:
        """Index of ``box`` into a stored array covering the bounds: (c, z, y, x), or (z, y, x) at rank 3."""
        zyx = box.to_zyx_slices(relative_to=self.bounds)
        return (slice(None), *zyx) if rank == 4 else zyx

    def _read_with_holes(self, box: Box) -> np.ndarray:
        try:
            return self._read_inside(box)
        except MissingBlock as missing:
            if not self.fill_missing:
                raise VolumeError(
                    f"{self.url}: {missing} (input.fill_missing: true reads missing blocks as the "
                    f"fill value {self.fill_value:g})"
                ) from None
        # some block is missing: read block by block, leaving the missing ones filled
        out = np.full((self.num_channels, *box.shape.zyx()), self.fill_value, dtype=self.dtype)
        for block in ChunkPlan(box, self.block_size, self.bounds.start):
            try:
                out[(slice(None), *block.to_zyx_slices(relative_to=box))] = self._read_inside(block)
            except MissingBlock:
                pass
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
        self._write_aligned(box, np.asarray(data, dtype=self.dtype))


def plain_resolution(values) -> list:
    """ints where integral, so scale keys read "4_4_40" as other tools write them"""
    return [int(r) if float(r).is_integer() else float(r) for r in values]


def stored_shape(shape: tuple[int, ...], url: str) -> tuple[int, Vec3]:
    """(channels, size x y z) of a stored (c, z, y, x) array, or of a (z, y, x) one: one channel."""
    if len(shape) not in (3, 4):
        raise VolumeError(f"{url} has {len(shape)} dimensions; a volume is (z, y, x) or (c, z, y, x)")
    c = shape[0] if len(shape) == 4 else 1
    z, y, x = shape[-3:]
    return c, Vec3(x, y, z)
