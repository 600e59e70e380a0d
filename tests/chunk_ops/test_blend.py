"""Blend windows and the global patch grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers import sliding_window_inference

from chunk_ops.blend import WINDOW_FLOOR, BlendMode, PatchGrid, window_1d, window_3d
from chunk_ops.geometry import Box, Vec3


def test_bump_is_chunkflows_formula():
    n = 9
    expected = [math.exp(-1 / (1 - ((i + 1) / (n + 1) * 2 - 1) ** 2)) for i in range(n)]
    expected = np.maximum(np.array(expected) / max(expected), WINDOW_FLOOR)
    np.testing.assert_allclose(window_1d("bump", n), expected, rtol=1e-12)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("patch", [(12, 12, 4), (256, 256, 20), (16, 8, 3), (7, 9, 11), (1, 2, 5)])
def test_window_is_monais_importance_map(mode, patch):
    """MONAI's map has the array's shape, so it takes the patch in z, y, x order."""
    patch = Vec3(*patch)
    expected = compute_importance_map(patch.zyx(), mode=mode, sigma_scale=0.125).numpy()
    got = window_3d(mode, patch)
    assert got.shape == expected.shape == patch.zyx()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_gaussian_is_clamped_in_3d_not_per_axis():
    w = window_3d("gaussian", Vec3(12, 12, 4))
    fx, fz = window_1d("gaussian", 12), window_1d("gaussian", 4)
    # a corner: the product is ~1e-8, raised to the floor
    assert fx[0] * fx[0] * fz[0] < 1e-7
    assert w[0, 0, 0] == np.float32(WINDOW_FLOOR)
    # near the middle of an x face: one small factor, the product is above the floor and kept
    assert WINDOW_FLOOR < fz[1] * fx[5] * fx[1] < 0.01
    np.testing.assert_allclose(w[1, 5, 1], fz[1] * fx[5] * fx[1], rtol=1e-6)


@pytest.mark.parametrize("mode", ["bump", "constant"])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_separable_factors_are_floored_symmetric_and_peak_at_one(mode, n):
    w = window_1d(mode, n)
    assert w.shape == (n,)
    assert w.min() >= WINDOW_FLOOR and w.max() == 1.0
    np.testing.assert_allclose(w, w[::-1])


@pytest.mark.parametrize("mode", list(BlendMode))
@pytest.mark.parametrize("patch", [(1, 1, 1), (2, 7, 3), (16, 16, 4)])
def test_windows_are_positive_symmetric_and_at_most_one(mode, patch):
    w = window_3d(mode, Vec3(*patch))
    assert w.min() > 0 and w.max() <= 1.0
    for axis in range(3):
        np.testing.assert_array_equal(w, np.flip(w, axis))


def test_window_3d_is_the_outer_product_in_zyx_order():
    w = window_3d("bump", Vec3(5, 4, 3))
    assert w.shape == (3, 4, 5)
    np.testing.assert_allclose(w[1, 2, :], window_1d("bump", 5) * window_1d("bump", 3)[1] * window_1d("bump", 4)[2], rtol=1e-6)


def test_a_typo_in_the_blend_mode_suggests_the_name():
    with pytest.raises(ValueError, match=r"unknown blend window 'gausian'.*did you mean 'gaussian'"):
        BlendMode.parse("gausian")


@st.composite
def grids(draw):
    patch = Vec3(*(draw(st.integers(1, 8)) for _ in range(3)))
    stride = Vec3(*(draw(st.integers(1, p)) for p in patch))
    shape = Vec3(*(p + draw(st.integers(0, 20)) for p in patch))
    start = Vec3(*(draw(st.integers(-10, 10)) for _ in range(3)))
    return PatchGrid(Box.from_shape(start, shape), patch, stride)


@given(grids())
def test_patches_cover_the_roi_and_stay_inside_it(grid):
    roi = grid.roi
    for ax in range(3):
        o = grid.axis_origins(ax)
        assert o[0] == roi.start[ax]
        assert o[-1] + grid.patch[ax] == roi.stop[ax]
        assert (np.diff(o) > 0).all() and (np.diff(o) <= grid.stride[ax]).all()
        # all but the last step are exactly the stride
        assert (np.diff(o)[:-1] == grid.stride[ax]).all()


@given(grids(), st.data())
def test_origins_in_a_range_are_the_filtered_origins(grid, data):
    ax = data.draw(st.integers(0, 2))
    lo = data.draw(st.integers(grid.roi.start[ax] - 5, grid.roi.stop[ax] + 5))
    hi = data.draw(st.integers(lo, grid.roi.stop[ax] + 10))
    every = grid.axis_origins(ax)
    np.testing.assert_array_equal(grid.axis_origins(ax, lo, hi), every[(every >= lo) & (every < hi)])


@given(grids(), st.sampled_from(list(BlendMode)), st.data())
def test_weight_sum_equals_naive_accumulation(grid, mode, data):
    roi = grid.roi
    naive = np.zeros(roi.shape.zyx())
    w = window_3d(mode, grid.patch).astype(np.float64)
    ox, oy, oz = grid.origins_in(roi)
    for z in oz:
        for y in oy:
            for x in ox:
                patch = Box.from_shape(Vec3(int(x), int(y), int(z)), grid.patch)
                naive[patch.to_zyx_slices(relative_to=roi)] += w
    # any sub-box, including ones that start or end mid-patch
    a = Vec3(*(data.draw(st.integers(s, e - 1)) for s, e in zip(roi.start, roi.stop)))
    b = Vec3(*(data.draw(st.integers(s + 1, e)) for s, e in zip(a, roi.stop)))
    sub = Box(a, b)
    np.testing.assert_allclose(grid.weight_sum(sub, mode), naive[sub.to_zyx_slices(relative_to=roi)], rtol=1e-6)


# 61 x 47 x 14 voxels: no multiple of the stride (8, 8, 3) after the first patch (12, 12, 4)
ROI = Box.from_shape(Vec3(3, -2, 5), Vec3(61, 47, 14))
GAUSSIAN_GRID = PatchGrid(ROI, Vec3(12, 12, 4), Vec3(8, 8, 3))
CHUNKS = {  # offsets from the ROI's start, and shapes
    "middle": ((16, 16, 4), (16, 16, 4)),
    "low-faces": ((0, 0, 0), (16, 16, 4)),
    "high-faces": ((45, 31, 10), (16, 16, 4)),
    "x-slab-through-the-roi": ((21, 0, 0), (5, 47, 14)),
    "one-voxel-at-a-high-corner": ((60, 46, 13), (1, 1, 1)),
}


def monai_weight_sum(grid: PatchGrid) -> np.ndarray:
    """MONAI's count map: its importance map added at each patch of its own scan."""
    shape, patch, stride = grid.roi.shape.zyx(), grid.patch.zyx(), grid.stride.zyx()
    window = compute_importance_map(patch, mode="gaussian", sigma_scale=0.125).numpy().astype(np.float64)
    total = np.zeros(shape)
    for where in dense_patch_slices(shape, patch, stride):
        total[where] += window
    return total


@pytest.mark.parametrize("chunk", sorted(CHUNKS))
def test_gaussian_weight_sum_of_a_chunk_is_monais_over_the_whole_roi(chunk):
    offset, shape = CHUNKS[chunk]
    box = Box.from_shape(ROI.start + Vec3(*offset), Vec3(*shape))
    assert ROI.contains(box)
    expected = monai_weight_sum(GAUSSIAN_GRID)[box.to_zyx_slices(relative_to=ROI)]
    np.testing.assert_allclose(GAUSSIAN_GRID.weight_sum(box, "gaussian"), expected, rtol=1e-6)


def test_gaussian_blend_of_chunks_equals_monais_sliding_window():
    """A patch-dependent network (each patch minus its mean), blended chunk by chunk."""
    grid = GAUSSIAN_GRID
    image = np.random.default_rng(3).random(grid.roi.shape.zyx(), dtype=np.float32)

    def net(x):
        return x - x.mean(dim=(-3, -2, -1), keepdim=True)

    expected = sliding_window_inference(
        torch.from_numpy(image)[None, None], grid.patch.zyx(), 4, net,
        overlap=[1 - s / p for s, p in zip(grid.stride.zyx(), grid.patch.zyx())], mode="gaussian", sigma_scale=0.125,
    )[0, 0].numpy()
    window = window_3d("gaussian", grid.patch)
    got = np.zeros_like(expected)
    chunk_shape = Vec3(16, 16, 4)
    for index in np.ndindex(*grid.roi.shape.ceildiv(chunk_shape)):
        chunk = Box.from_shape(grid.roi.start + Vec3(*index) * chunk_shape, chunk_shape).intersection(grid.roi)
        acc = np.zeros(chunk.shape.zyx())
        ox, oy, oz = (grid.axis_origins(a, chunk.start[a] - grid.patch[a] + 1, chunk.stop[a]) for a in range(3))
        for z in oz:
            for y in oy:
                for x in ox:
                    patch = Box.from_shape(Vec3(int(x), int(y), int(z)), grid.patch)
                    pred = net(torch.from_numpy(image[patch.to_zyx_slices(grid.roi)])).numpy()
                    common = patch.intersection(chunk)
                    acc[common.to_zyx_slices(chunk)] += (pred * window)[common.to_zyx_slices(patch)]
        got[chunk.to_zyx_slices(grid.roi)] = acc / grid.weight_sum(chunk, "gaussian")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_patch_larger_than_region_is_refused_with_both_sizes():
    with pytest.raises(ValueError, match=r"output patch \[16, 16, 4\] is larger than the region of interest \[10, 20, 8\]"):
        PatchGrid(Box((0, 0, 0), (10, 20, 8)), Vec3(16, 16, 4), Vec3(8, 8, 2))
