"""Blend windows and the global patch grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunk_ops.blend import WINDOW_FLOOR, BlendMode, PatchGrid, window_1d, window_3d
from chunk_ops.geometry import Box, Vec3


def test_bump_is_chunkflows_formula():
    n = 9
    expected = [math.exp(-1 / (1 - ((i + 1) / (n + 1) * 2 - 1) ** 2)) for i in range(n)]
    expected = np.maximum(np.array(expected) / max(expected), WINDOW_FLOOR)
    np.testing.assert_allclose(window_1d("bump", n), expected, rtol=1e-12)


def test_gaussian_is_monais_formula():
    n = 16
    sigma = 0.125 * n
    expected = np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * sigma**2))
    np.testing.assert_allclose(window_1d("gaussian", n), np.maximum(expected / expected.max(), WINDOW_FLOOR))


@pytest.mark.parametrize("mode", list(BlendMode))
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_windows_are_positive_symmetric_and_peak_at_one(mode, n):
    w = window_1d(mode, n)
    assert w.shape == (n,)
    assert w.min() >= WINDOW_FLOOR and w.max() == 1.0
    np.testing.assert_allclose(w, w[::-1])


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
def test_separable_weight_sum_equals_naive_accumulation(grid, mode, data):
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


def test_patch_larger_than_region_is_refused_with_both_sizes():
    with pytest.raises(ValueError, match=r"output patch \[16, 16, 4\] is larger than the region of interest \[10, 20, 8\]"):
        PatchGrid(Box((0, 0, 0), (10, 20, 8)), Vec3(16, 16, 4), Vec3(8, 8, 2))
