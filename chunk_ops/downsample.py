"""A downsampled pyramid of an output layer: mip 1, 2, ... by averaging, with tinybrain.

Each new mip halves x and y (the z sections are already thick: factor 2x2x1, as
usual for serial-section EM).  Work goes block by block over the new mip, reading
the matching region of the mip below, so memory stays at one chunk whatever the
volume size; writes are block-aligned, so a level built twice gives the same bytes.
Where the region under a new voxel leaves the layer (odd sizes or offsets), it is
padded by repeating the edge voxel, so that new voxel is the mean of the real voxels
under it (tinybrain alone would average in zeros).

Formats that hold a pyramid (precomputed scales, OME-Zarr multiscales) get the
levels; a single-level format (Zarr, N5, HDF5, TIFF, npy) gets none, and one log
line says so: its run does not fail for it.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import tinybrain

from .geometry import Box, ChunkPlan, Vec3
from .volumes import Volume, add_mip, mip_count, open_volume, split_format, supports_mips

log = logging.getLogger(__name__)

FACTOR = Vec3(2, 2, 1)


def _read_padded(source: Volume, region: Box) -> np.ndarray:
    """``region`` of ``source`` as (x, y, z, c); outside the layer, the nearest edge voxel."""
    inside = region.intersection(source.bounds)
    xyzc = source.read(inside).transpose(3, 2, 1, 0)
    before, after = inside.start - region.start, region.stop - inside.stop
    pad = [(b, a) for b, a in zip(before, after)] + [(0, 0)]
    return np.pad(xyzc, pad, mode="edge") if any(b or a for b, a in pad) else xyzc


def build_mip(url: str, mip: int, chunk_blocks: int = 4) -> int:
    """Fill mip ``mip`` from mip ``mip - 1``; returns the number of chunks written."""
    source, target = open_volume(url, mip - 1), open_volume(url, mip)
    factor = Vec3.of([round(t / s) for t, s in zip(target.resolution, source.resolution)])
    chunk = target.block_size * Vec3(chunk_blocks, chunk_blocks, 1)
    plan = ChunkPlan(target.bounds, chunk, target.bounds.start)
    for box in plan:
        xyzc = _read_padded(source, Box(box.start * factor, box.stop * factor))
        small = tinybrain.downsample_with_averaging(xyzc, factor.to_list(), num_mips=1)[0]
        target.write(box, np.ascontiguousarray(small.transpose(3, 2, 1, 0)))
    return len(plan)


def build_pyramid(url: str, levels: int, on_level: Callable[[int], None] | None = None) -> list[int]:
    """Fill mips 1 to ``levels`` (adding those the layer lacks); chunks written per level.

    Idempotent: a rerun rewrites the same levels with the same bytes, never adds more.
    ``on_level`` is called with each level's index once it is built.
    """
    if levels and not supports_mips(url):
        log.info("no pyramid for %s: the %s format holds one resolution level", url, split_format(url)[0])
        return []
    written = []
    for mip in range(1, levels + 1):
        if mip_count(url) <= mip:
            add_mip(url, FACTOR)
        written.append(build_mip(url, mip))
        if on_level is not None:
            on_level(mip)
    return written
