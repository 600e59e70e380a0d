"""A deterministic EM-like sample volume for the demo, tests and benchmarks.

Cells are the sign regions of smoothed noise; their borders (the zero level set)
are drawn as dark membranes, over a textured background with per-section
brightness drift, on an anisotropic grid (thin x/y, thick z sections).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import Box, Vec3
from .volume import Volume


def em_like(shape_xyz: Vec3, seed: int = 0, cell_size: float = 12.0) -> np.ndarray:
    """A uint8 (z, y, x) image of the given x, y, z shape."""
    rng = np.random.default_rng(seed)
    zyx = shape_xyz.zyx()
    noise = rng.standard_normal(zyx, dtype=np.float32)
    # z sections are ~10x thicker than pixels are wide, so smooth less along z
    field = ndimage.gaussian_filter(noise, sigma=(cell_size / 10, cell_size, cell_size))
    field /= field.std() + 1e-12
    membrane = np.exp(-(field / 0.15) ** 2)
    texture = ndimage.gaussian_filter(rng.standard_normal(zyx, dtype=np.float32), sigma=(0.5, 1.5, 1.5))
    drift = rng.normal(0, 8, size=(zyx[0], 1, 1)).astype(np.float32)
    image = 170 + 20 * texture - 120 * membrane + drift + rng.normal(0, 6, size=zyx).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_sample(url: str, shape_xyz, *, seed: int = 0, resolution=(4, 4, 40),
                 block_size=(64, 64, 8), offset=(0, 0, 0)) -> Volume:
    """Create a uint8 precomputed image layer at ``url`` holding :func:`em_like` data."""
    shape = Vec3.of(shape_xyz)
    bounds = Box.from_shape(Vec3.of(offset), shape)
    vol = Volume.create(url, bounds=bounds, block_size=Vec3.of(block_size), dtype="uint8",
                        num_channels=1, resolution=resolution)
    vol.write(bounds, em_like(shape, seed)[None])
    return vol
