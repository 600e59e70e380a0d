"""The one volume interface: what every storage format gives the rest of chunk_ops.

Arrays are (c, z, y, x) here and everywhere above this package; coordinates are
voxels at the volume's mip, x, y, z, half-open (:class:`~chunk_ops.geometry.Box`).
Each format (one module per format) only reads and writes a box that lies inside
the bounds; this base class fills reads that reach outside (context margins at the
faces) and checks writes: the right shape, inside the bounds, aligned to the
storage blocks, so a chunk written twice, or by two workers, gives the same bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..geometry import Box, Vec3


class VolumeError(ValueError):
    """A layer is missing, unreadable, or a request does not fit it."""


class Volume(ABC):
    """One resolution level of a layer, in any format.

    Set by each format's constructor: ``url``, ``mip``, ``fill_value``, ``bounds``
    (Box), ``block_size`` (Vec3), ``dtype`` (numpy), ``num_channels`` and
    ``resolution`` (nm per voxel, x y z; ints where integral).
    """

    url: str
    mip: int
    fill_value: float
    bounds: Box
    block_size: Vec3
    dtype: np.dtype
    num_channels: int
    resolution: list

    @abstractmethod
    def _read_inside(self, box: Box) -> np.ndarray:
        """(c, z, y, x) voxels of ``box``, which lies inside the bounds."""

    @abstractmethod
    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        """Store (c, z, y, x) ``data`` of this volume's dtype at a checked, block-aligned ``box``."""

    def read(self, box: Box) -> np.ndarray:
        """Voxels of ``box`` as (c, z, y, x); outside the bounds: ``fill_value``."""
        out = np.full((self.num_channels, *box.shape.zyx()), self.fill_value, dtype=self.dtype)
        inside = box.intersection(self.bounds)
        if not inside.is_empty():
            out[(slice(None), *inside.to_zyx_slices(relative_to=box))] = self._read_inside(inside)
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
