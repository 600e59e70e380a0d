"""Affinities <-> labels, the two segmentation methods, and the adapted Rand error."""

from __future__ import annotations

import numpy as np
import pytest

from chunk_ops.sample import synthetic_em
from chunk_ops.segment import (
    adapted_rand_error, components, intensity_baseline, label_affinities, segment, watershed,
)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_cut_along_each_axis_gives_two_components(axis):
    labels = np.ones((6, 8, 10), np.uint32)
    cut = [slice(None)] * 3
    cut[axis] = slice(3, None)
    labels[tuple(cut)] = 2
    affs = label_affinities(labels)
    channel = 2 - axis  # channels are x, y, z
    assert affs[channel].sum() < affs[(channel + 1) % 3].sum()  # the cut removed edges on its axis only
    for method in ("components", "watershed"):
        seg = segment(affs, method, 0.5)
        assert len(np.unique(seg)) == 2
        assert adapted_rand_error(labels, seg) == pytest.approx(0.0, abs=1e-9)


def test_perfect_affinities_segment_the_synthetic_truth():
    _, truth = synthetic_em((96, 96, 16), seed=5)
    affs = label_affinities(truth)
    for method in ("components", "watershed"):
        assert adapted_rand_error(truth, segment(affs, method, 0.5)) < 1e-3


def test_one_false_edge_merges_components_but_not_the_watershed():
    labels = np.ones((4, 16, 16), np.uint32)
    labels[:, :, 8:] = 2
    affs = label_affinities(labels)
    affs[0, 2, 8, 8] = 0.95  # a single x edge bridging the two cells
    assert components(affs, 0.5).max() == 1          # merged
    assert adapted_rand_error(labels, watershed(affs, 0.5)) < 1e-9  # the mean across the border stays low


def test_uint8_affinities_are_read_as_probabilities():
    _, truth = synthetic_em((64, 64, 8), seed=6)
    affs = label_affinities(truth)
    as_uint8 = np.round(affs * 255).astype(np.uint8)
    assert np.array_equal(components(affs, 0.5), components(as_uint8, 0.5))


def test_adapted_rand_error_ignores_unlabelled_truth_and_punishes_merges():
    truth = np.array([[[1, 1, 0, 2, 2]]], np.uint32)
    assert adapted_rand_error(truth, np.array([[[5, 5, 9, 7, 7]]])) == pytest.approx(0.0)
    merged = adapted_rand_error(truth, np.array([[[5, 5, 5, 5, 5]]]))
    split = adapted_rand_error(truth, np.array([[[1, 2, 3, 4, 5]]]))
    assert merged > 0.3 and split > 0.3


def test_the_baseline_is_thresholded_intensity():
    image = np.array([[[200, 200, 40, 200, 200]]], np.uint8)
    assert intensity_baseline(image, 100).tolist() == [[[1, 1, 0, 2, 2]]]


def test_bad_affinity_shapes_are_refused():
    with pytest.raises(ValueError, match=r"affinities must be \(3, z, y, x\), got shape \(2, 4, 4, 4\)"):
        components(np.zeros((2, 4, 4, 4), np.float32))
