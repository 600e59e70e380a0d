"""The downsampled pyramid against a numpy oracle."""

from __future__ import annotations

import numpy as np
import pytest

from chunk_ops.downsample import build_pyramid
from chunk_ops.geometry import Box, Vec3
from chunk_ops.volumes import create_volume, open_volume


def _mean_2x2(czyx: np.ndarray) -> np.ndarray:
    """Oracle: 2x2x1 means, edge voxels repeated where the size is odd."""
    c, z, y, x = czyx.shape
    padded = np.pad(czyx.astype(np.float64), [(0, 0), (0, 0), (0, y % 2), (0, x % 2)], mode="edge")
    return padded.reshape(c, z, (y + 1) // 2, 2, (x + 1) // 2, 2).mean(axis=(3, 5))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_two_levels_match_the_oracle(tmp_path, dtype):
    bounds = Box((0, 0, 0), (70, 45, 6))  # odd sizes on purpose
    vol = create_volume(f"file://{tmp_path}/layer", bounds=bounds, block_size=Vec3(16, 16, 2),
                        dtype=dtype, num_channels=2, resolution=(4, 4, 40))
    rng = np.random.default_rng(0)
    data = (rng.random((2, 6, 45, 70)) * (255 if dtype == "uint8" else 1)).astype(dtype)
    vol.write(bounds, data)

    assert build_pyramid(vol.url, 2) == [3, 3]  # chunks of 4x4x1 blocks: 3 z-slabs per level
    mip1, mip2 = open_volume(vol.url, 1), open_volume(vol.url, 2)
    assert mip1.resolution == [8, 8, 40] and mip2.resolution == [16, 16, 40]
    expected1 = _mean_2x2(data)
    got1 = mip1.read(mip1.bounds)
    tolerance = 1e-6 if dtype == "float32" else 1.0  # uint8 results are rounded
    assert got1.shape == expected1.shape and np.abs(got1 - expected1).max() <= tolerance
    expected2 = _mean_2x2(got1)
    assert np.abs(mip2.read(mip2.bounds) - expected2).max() <= tolerance
