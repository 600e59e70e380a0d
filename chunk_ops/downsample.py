"""A downsampled pyramid of an output layer: mip 1, 2, ... by averaging, with tinybrain.

Each new mip halves x and y (the z sections are already thick: factor 2x2x1, as
usual for serial-section EM).  Work goes block by block over the new mip, reading
the matching region of the mip below, so memory stays at one chunk whatever the
volume size; writes are block-aligned, so a level built twice gives the same bytes.
Where the region under a new voxel leaves the layer (odd sizes or offsets), it is
padded by repeating the edge voxel, so that new voxel is the mean of the real voxels
under it (tinybrain alone would average in zeros).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tinybrain
from cloudvolume import CloudVolume

from .geometry import Box, ChunkPlan, Vec3
from .volumes import Volume, open_volume

FACTOR = Vec3(2, 2, 1)


def _read_padded(source: Volume, region: Box) -> np.ndarray:
    """``region`` of ``source`` as (x, y, z, c); outside the layer, the nearest edge voxel."""
    inside = region.intersection(source.bounds)
    xyzc = source.read(inside).transpose(3, 2, 1, 0)
    before, after = inside.start - region.start, region.stop - inside.stop
    pad = [(b, a) for b, a in zip(before, after)] + [(0, 0)]
    return np.pad(xyzc, pad, mode="edge") if any(b or a for b, a in pad) else xyzc


def add_mip(url: str, factor: Vec3 = FACTOR) -> int:
    """Add one mip level to the layer's info (if the next one is missing); return its index."""
    cv = CloudVolume(url, progress=False)
    top = len(cv.scales) - 1
    resolution = [r * f for r, f in zip(cv.meta.resolution(top).tolist(), factor)]
    cv.meta.add_resolution(resolution, chunk_size=cv.meta.chunk_size(top).tolist())
    cv.commit_info()
    return len(CloudVolume(url, progress=False).scales) - 1


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
    written = []
    for mip in range(1, levels + 1):
        if len(CloudVolume(url, progress=False).scales) <= mip:
            add_mip(url)
        written.append(build_mip(url, mip))
        if on_level is not None:
            on_level(mip)
    return written
