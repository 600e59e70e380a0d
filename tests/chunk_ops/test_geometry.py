"""Geometry: round trips, exact tiling, alignment, laziness (hypothesis, numpy as oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_ops.geometry import Box, ChunkPlan, Vec3

coord = st.integers(-10_000, 10_000)
vecs = st.builds(Vec3, coord, coord, coord)
sizes = st.builds(Vec3, st.integers(1, 9), st.integers(1, 9), st.integers(1, 9))


@st.composite
def boxes(draw, max_size=50):
    start = draw(vecs)
    shape = draw(st.builds(Vec3, *(st.integers(0, max_size) for _ in range(3))))
    return Box.from_shape(start, shape)


@given(boxes())
def test_box_serializations_round_trip(box):
    assert Box.from_dict(box.to_dict()) == box
    assert Box.from_filename(box.to_filename()) == box
    slices = box.to_slices()
    assert Box(Vec3(*(s.start for s in slices)), Vec3(*(s.stop for s in slices))) == box
    assert hash(Box.from_dict(box.to_dict())) == hash(box)


@given(boxes(), boxes())
def test_intersection_matches_numpy(a, b):
    lo = np.minimum(a.start.to_list(), b.start.to_list())
    hi = np.maximum(a.stop.to_list(), b.stop.to_list())
    if np.any(hi - lo > 300):
        return
    grid_a, grid_b = np.zeros(hi - lo, bool), np.zeros(hi - lo, bool)
    grid_a[tuple(slice(s - o, e - o) for s, e, o in zip(a.start, a.stop, lo))] = True
    grid_b[tuple(slice(s - o, e - o) for s, e, o in zip(b.start, b.stop, lo))] = True
    assert a.intersection(b).size == np.count_nonzero(grid_a & grid_b)


@st.composite
def plans(draw):
    chunk = draw(sizes)
    origin = draw(st.builds(Vec3, *(st.integers(-20, 20) for _ in range(3))))
    start = origin + draw(st.builds(Vec3, *(st.integers(0, 15) for _ in range(3))))
    shape = draw(st.builds(Vec3, *(st.integers(1, 30) for _ in range(3))))
    return ChunkPlan(Box.from_shape(start, shape), chunk, origin)


@settings(max_examples=200)
@given(plans())
def test_every_voxel_is_in_exactly_one_chunk(plan):
    roi = plan.roi
    count = np.zeros(roi.shape.zyx(), np.int32)
    for box in plan:
        assert roi.contains(box) and not box.is_empty()
        count[box.to_zyx_slices(relative_to=roi)] += 1
    assert (count == 1).all()


@settings(max_examples=200)
@given(plans())
def test_chunks_are_aligned_to_the_grid_or_clipped_by_the_roi(plan):
    for box in plan:
        for ax in range(3):
            assert (box.start[ax] - plan.origin[ax]) % plan.chunk_size[ax] == 0 or box.start[ax] == plan.roi.start[ax]
            assert (box.stop[ax] - plan.origin[ax]) % plan.chunk_size[ax] == 0 or box.stop[ax] == plan.roi.stop[ax]
            assert box.shape[ax] <= plan.chunk_size[ax]


@given(plans(), st.data())
def test_lazy_indexing_agrees_with_iteration(plan, data):
    listed = list(plan)
    assert len(listed) == len(plan)
    i = data.draw(st.integers(0, len(plan) - 1))
    assert plan[i] == listed[i]
    assert plan[-1] == listed[-1]
    assert plan.index_of(listed[i]) == i
    assert list(plan[i:]) == listed[i:]
    assert list(plan[::3][1:]) == listed[::3][1:]
    # ids are deterministic and unique
    assert len({ChunkPlan.chunk_id(b) for b in listed}) == len(listed)


def test_huge_plans_stay_lazy():
    """Ten million chunks: length and random access without building a list."""
    plan = ChunkPlan(Box((0, 0, 0), (256 * 400, 256 * 500, 64 * 50)), Vec3(256, 256, 64), Vec3(0, 0, 0))
    assert len(plan) == 10_000_000
    assert plan[9_999_999] == Box((256 * 399, 256 * 499, 64 * 49), (256 * 400, 256 * 500, 64 * 50))
    assert len(plan[5_000_000:]) == 5_000_000


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda: Vec3(1.5, 2, 3), "Vec3.x must be an integer, got 1.5"),
        (lambda: Vec3.of([1, 2]), "expected an (x, y, z) triple, got [1, 2]"),
        (lambda: Box((5, 0, 0), (4, 1, 1)), "box start [5, 0, 0] exceeds stop [4, 1, 1]"),
        (lambda: Box.from_dict({"start": [0, 0, 0]}), "a box is"),
        (lambda: Box.from_filename("0-1_2-3"), "not a box file name"),
        (lambda: ChunkPlan(Box((0, 0, 0), (4, 4, 4)), Vec3(0, 4, 4), Vec3(0, 0, 0)), "chunk size must be positive, got [0, 4, 4]"),
    ],
)
def test_bad_values_are_named(bad, message):
    with pytest.raises(ValueError) as e:
        bad()
    assert message in str(e.value)


def test_boxes_are_immutable_and_hashable_by_value():
    """Equal boxes are one dictionary key; a box cannot be changed in place."""
    a, b = Box((0, 1, 2), (3, 4, 5)), Box((0, 1, 2), (3, 4, 5))
    assert {a: 1}[b] == 1
    assert Box((1, 23, 4), (5, 26, 7)) != Box((12, 3, 4), (15, 6, 7))  # cloud-volume's digit-concatenating hash mixes these up
    with pytest.raises(AttributeError):
        a.start = Vec3(1, 1, 1)  # type: ignore[misc]
