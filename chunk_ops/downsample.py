"""A downsampled pyramid of an output layer: mip 1, 2, ... by averaging, with tinybrain.

Each new mip halves x and y (the z sections are already thick: factor 2x2x1, as
usual for serial-section EM).  Work goes box by box over the new mip, reading the
matching region of the mip below, so memory stays at one box whatever the volume
size; writes are block-aligned, so a level built twice gives the same bytes.
Where the region under a new voxel leaves the layer (odd sizes or offsets), it is
padded by repeating the edge voxel, so that new voxel is the mean of the real voxels
under it (tinybrain alone would average in zeros).

Every new voxel depends on the 2x2x1 voxels under it and nothing else, so the boxes
of a level are independent tasks (as igneous cuts a pyramid), done in any order, by
any number of workers, with the same bytes as one process doing them all::

    ensure_mips(url, levels)           add the missing levels' metadata (once, before planning)
    pyramid_plan(url, mip)             the boxes of level mip: 4x4x1 of its blocks, last ones clipped
    build_block(url, mip, box, fence)  one box of level mip from level mip - 1
                                       (level mip - 1 under the box must be built first)

    level mip, one task per box        level mip - 1 under it (2x2x1 voxels per voxel)
    +-------+-------+---+              +---------------+---------------+-------+
    | box 0 | box 1 | 2 |   <------    | 2x box 0      | 2x box 1      | 2x 2  |
    +-------+-------+---+              +---------------+---------------+-------+

``build_mip`` does one level's boxes in this process and ``build_pyramid`` every
level (``chunk-ops run``, small volumes).

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
from .volumes import Volume, VolumeError, add_mip, mip_count, open_volume, split_format, supports_mips

log = logging.getLogger(__name__)

FACTOR = Vec3(2, 2, 1)
CHUNK_BLOCKS = 4  # a task's box: 4 x 4 x 1 blocks of its level


def _read_padded(source: Volume, region: Box) -> np.ndarray:
    """``region`` of ``source`` as (x, y, z, c); outside the layer, the nearest edge voxel."""
    inside = region.intersection(source.bounds)
    xyzc = source.read(inside).transpose(3, 2, 1, 0)
    before, after = inside.start - region.start, region.stop - inside.stop
    pad = [(b, a) for b, a in zip(before, after)] + [(0, 0)]
    return np.pad(xyzc, pad, mode="edge") if any(b or a for b, a in pad) else xyzc


def ensure_mips(url: str, levels: int) -> int:
    """Add the levels 1 to ``levels`` the layer lacks (each ``FACTOR`` coarser than the one
    below) and nothing else; returns the number of levels the layer has then.

    Idempotent, also when two runs do it at once: a level is added by its index, so one
    that another run added meanwhile is left alone (adding "one above the top" would stack
    a level on the other run's).  A format without a pyramid gets nothing and one log
    line (when ``levels`` asks for some); it returns 0.
    """
    if levels < 0:
        raise ValueError(f"pyramid levels {levels!r} must be 0 or more")
    if not supports_mips(url):
        if levels:
            log.info("no pyramid for %s: the %s format holds one resolution level", url, split_format(url)[0])
        return 0
    count = mip_count(url)
    for mip in range(count, levels + 1):
        add_mip(url, FACTOR, mip)
    count = mip_count(url)
    if count <= levels:  # cloud-volume keeps one scale per resolution: an odd pyramid can swallow a level
        raise VolumeError(f"{url}: adding pyramid levels up to {levels} left {count} levels; "
                          f"does a level already have the resolution of mip {count}?")
    return count


def _levels(url: str, mip: int) -> tuple[Volume, Volume, Vec3]:
    """Level ``mip - 1``, level ``mip`` and the factor between them."""
    if not isinstance(mip, (int, np.integer)) or mip < 1:
        raise ValueError(f"pyramid level {mip!r}: levels to build are 1 or more (mip 0 is the layer)")
    target = open_volume(url, mip)  # a level not added yet (ensure_mips) is a VolumeError naming it
    source = open_volume(url, mip - 1)
    factor = Vec3.of([round(t / s) for t, s in zip(target.resolution, source.resolution)])
    return source, target, factor


def _plan(target: Volume, chunk_blocks: int) -> ChunkPlan:
    chunk = target.block_size * Vec3(chunk_blocks, chunk_blocks, 1)
    return ChunkPlan(target.bounds, chunk, target.bounds.start)


def pyramid_plan(url: str, mip: int, chunk_blocks: int = CHUNK_BLOCKS) -> ChunkPlan:
    """The boxes of level ``mip``'s tasks, in mip-``mip`` voxels: ``chunk_blocks`` x
    ``chunk_blocks`` x 1 of its storage blocks each, the last ones clipped to its bounds.
    The level must exist (:func:`ensure_mips`)."""
    return _plan(_levels(url, mip)[1], chunk_blocks)


def _build(source: Volume, target: Volume, factor: Vec3, box: Box, fence: Callable[[], None] | None) -> None:
    if box.is_empty() or not target.bounds.contains(box):
        raise VolumeError(f"{box} is not inside the bounds {target.bounds} of {target.url} at mip {target.mip}")
    xyzc = _read_padded(source, Box(box.start * factor, box.stop * factor))
    small = tinybrain.downsample_with_averaging(xyzc, factor.to_list(), num_mips=1)[0]
    czyx = np.ascontiguousarray(small.transpose(3, 2, 1, 0))
    if fence is not None:
        fence()
    target.write(box, czyx)


def build_block(url: str, mip: int, box: Box, fence: Callable[[], None] | None = None) -> None:
    """Level ``mip`` at ``box`` (mip-``mip`` voxels, block-aligned: a box of
    :func:`pyramid_plan`) from the region of level ``mip - 1`` under it.  ``fence`` is
    called right before the write: if it raises, nothing is written."""
    source, target, factor = _levels(url, mip)
    _build(source, target, factor, box, fence)


def build_mip(url: str, mip: int, chunk_blocks: int = CHUNK_BLOCKS) -> int:
    """Fill mip ``mip`` from mip ``mip - 1`` in this process, box by box of its plan (what
    :func:`build_block` does per box, with the levels opened once); returns the number of
    boxes written."""
    source, target, factor = _levels(url, mip)
    plan = _plan(target, chunk_blocks)
    for box in plan:
        _build(source, target, factor, box, None)
    return len(plan)


def build_pyramid(url: str, levels: int, on_level: Callable[[int], None] | None = None) -> list[int]:
    """Fill mips 1 to ``levels`` (adding those the layer lacks); chunks written per level.

    Idempotent: a rerun rewrites the same levels with the same bytes, never adds more.
    ``on_level`` is called with each level's index once it is built.
    """
    if not ensure_mips(url, levels):
        return []
    written = []
    for mip in range(1, levels + 1):
        written.append(build_mip(url, mip))
        if on_level is not None:
            on_level(mip)
    return written
