"""Compute operators of ``chunk-ops chain``: each equals its closed form.

The pure array functions are checked against numpy/scipy oracles; the commands
through click (their Operator applied to a task), and whole chains through the
real command line.
"""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from chunk_ops.geometry import Box, Vec3
from chunk_ops.operators.base import ChainTask, Chunk, load_all
from chunk_ops.operators.chunks import multiply
from chunk_ops.operators.intensity import normalize_contrast, normalize_intensity, quantize
from chunk_ops.operators.labels import agglomerate, channel_voting, connected_components, threshold
from chunk_ops.operators.resample import crop, downsample, mask, upsample
from chunk_ops.segment import label_affinities
from chunk_ops.volumes import create_volume, open_volume

RNG = np.random.default_rng(7)


def run_operator(args: list[str], task: ChainTask) -> ChainTask:
    """Set up the chain command ``args`` once and pass one task through its Operator."""
    command = load_all().commands[args[0]]
    op = command.main(args[1:], prog_name=args[0], standalone_mode=False)
    out = list(op(iter([task])))
    assert len(out) == 1
    return out[0]


def make_task(array: np.ndarray, start=(0, 0, 0), resolution=(4.0, 4.0, 40.0), layer_type="image") -> ChainTask:
    box = Box.from_shape(start, array.shape[:0:-1])
    return ChainTask(box, {"chunk": Chunk(array, box, resolution, layer_type)})


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    """The sets of voxels (flat indices) of each nonzero label: labels equal up to renumbering."""
    flat = labels.ravel()
    return {frozenset(np.flatnonzero(flat == label).tolist()) for label in np.unique(flat) if label != 0}


# --- intensity ---------------------------------------------------------------------------------

def test_normalize_intensity_maps_the_dtype_range_to_unit_floats():
    image = RNG.integers(0, 256, (1, 3, 5, 6), dtype=np.uint8)
    out = normalize_intensity(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, image / 255.0, rtol=0, atol=1e-6)


def test_normalize_intensity_clips_a_given_range_and_rounds_to_integers():
    image = RNG.uniform(-50, 300, (2, 3, 4, 5)).astype(np.float32)
    expected = np.clip((image.astype(np.float64) - 20) / 180, 0, 1)
    np.testing.assert_allclose(normalize_intensity(image, (20, 200)), expected, atol=1e-6)
    as_bytes = normalize_intensity(image, (20, 200), dtype="uint8")
    assert as_bytes.dtype == np.uint8
    assert np.abs(as_bytes.astype(int) - np.round(expected * 255)).max() <= 1  # float32 vs float64 at .5
    signed = normalize_intensity(image, (20, 200), (-1, 1))  # chunkflow's normalize-intensity range
    np.testing.assert_allclose(signed, expected * 2 - 1, atol=1e-6)


def test_normalize_intensity_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="float32 chunk has no intrinsic range"):
        normalize_intensity(np.zeros((1, 1, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"input range minimum 5.0 must be below its maximum 5.0"):
        normalize_intensity(np.zeros((1, 1, 1, 1), np.uint8), (5.0, 5.0))
    with pytest.raises(ValueError, match=r"output range \[0.0, 300.0\] does not fit uint8"):
        normalize_intensity(np.zeros((1, 1, 1, 1), np.uint8), out_range=(0.0, 300.0), dtype="uint8")


def test_normalize_contrast_stretches_each_section_between_its_percentiles():
    image = RNG.integers(0, 256, (1, 4, 16, 16), dtype=np.uint8)
    image[0, 1] = 0  # an all-zero section
    image[0, 2, :3] = 0  # missing data inside a section
    out = normalize_contrast(image, 5, 95)
    assert out.dtype == np.uint8
    assert not out[0, 1].any()
    for z in (0, 2, 3):
        section = image[0, z].astype(np.float64)
        real = section != 0
        low, high = np.percentile(section[real], [5, 95])
        expected = np.round(1 + np.clip((section - low) / (high - low), 0, 1) * 254)
        np.testing.assert_array_equal(out[0, z], np.where(real, expected, 0))


def test_normalize_contrast_of_floats_spans_zero_to_one():
    image = RNG.uniform(0.2, 0.6, (2, 3, 8, 8)).astype(np.float32)
    out = normalize_contrast(image, 0, 100)
    for c in range(2):
        for z in range(3):
            assert out[c, z].min() == 0 and out[c, z].max() == 1


def test_normalize_contrast_refuses_percentiles_out_of_order():
    with pytest.raises(ValueError, match="0 <= lower < upper <= 100, got 90 and 10"):
        normalize_contrast(np.ones((1, 1, 2, 2), np.uint8), 90, 10)
    with pytest.raises(click.ClickException, match="^normalize-contrast: percentiles"):  # at set-up, before any task
        run_operator(["normalize-contrast", "--lower-percentile", "90", "--upper-percentile", "10"],
                     make_task(np.ones((1, 1, 2, 2), np.uint8)))


def test_quantize_rounds_clipped_values_to_bytes():
    values = RNG.uniform(-0.2, 1.2, (3, 2, 5, 7)).astype(np.float32)
    expected = np.round(np.clip(values, 0, 1) * 255)
    np.testing.assert_array_equal(quantize(values), expected)
    np.testing.assert_array_equal(quantize(values, "xy"), np.round(np.clip(values[:2].mean(0), 0, 1) * 255)[None])
    np.testing.assert_array_equal(quantize(values, "z"), expected[2:])
    with pytest.raises(ValueError, match="float chunk with values in \\[0, 1\\], got dtype uint8"):
        quantize(np.zeros((1, 1, 1, 1), np.uint8))
    with pytest.raises(ValueError, match="takes 3 affinity channels .* got 2 channels"):
        quantize(values[:2], "xy")


# --- labels ------------------------------------------------------------------------------------

def test_threshold_is_a_comparison_per_channel():
    values = RNG.random((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(threshold(values, 0.3), (values > 0.3).astype(np.uint8))
    assert threshold(values, 0.3, "uint32").dtype == np.uint32


@pytest.mark.parametrize("connectivity, rank, cut", [(6, 1, 0.7), (18, 2, 0.8), (26, 3, 0.88)])
def test_connected_components_partition_the_foreground_as_scipy_does(connectivity, rank, cut):
    values = RNG.random((1, 6, 9, 10)).astype(np.float32)
    labels = connected_components(values, connectivity, cut)
    assert labels.shape == values.shape and labels.dtype == np.uint32
    expected, count = ndimage.label(values[0] > cut, structure=ndimage.generate_binary_structure(3, rank))
    assert count > 3
    assert partition(labels[0]) == partition(expected)


def test_connected_components_split_labels_that_touch():
    labels = np.zeros((1, 1, 4, 6), np.uint32)
    labels[0, 0, :, :3], labels[0, 0, :, 3:] = 5, 9  # two labels side by side
    labels[0, 0, 1, 1] = 0  # no cut: label 5 stays one piece
    out = connected_components(labels)
    assert partition(out[0]) == partition(labels[0])
    with pytest.raises(ValueError, match="a float32 chunk needs a --threshold"):
        connected_components(np.zeros((1, 2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="one-channel chunk, got 2 channels"):
        connected_components(np.zeros((2, 2, 2, 2), np.uint8))


def two_objects() -> np.ndarray:
    labels = np.zeros((8, 12, 14), np.uint32)
    labels[1:7, 1:5, 1:6] = 1
    labels[1:7, 7:11, 8:13] = 2
    return labels


def test_agglomerate_finds_two_well_separated_objects():
    labels = two_objects()
    affs = label_affinities(labels)
    affs = np.clip(affs + RNG.uniform(-0.05, 0.05, affs.shape), 0, 1).astype(np.float32)  # not quite clean
    seg = agglomerate(affs, 0.5)
    assert seg.shape == (1, *labels.shape)
    inside = labels != 0
    assert partition(np.where(inside, seg[0], 0)) == partition(labels)


def test_agglomerate_merges_given_fragments_by_mean_affinity():
    labels = two_objects()
    fragments = labels.astype(np.uint64)
    fragments[:4][labels[:4] == 1] = 3  # object 1 cut in two fragments along z
    seg = agglomerate(label_affinities(labels), 0.5, fragments=fragments[None])
    assert partition(seg[0]) == partition(labels)
    assert np.array_equal(fragments[:4][labels[:4] == 1], np.full((labels[:4] == 1).sum(), 3))  # input untouched


def test_channel_voting_is_argmax_numbered_from_one():
    values = RNG.random((4, 3, 5, 6)).astype(np.float32)
    voted = channel_voting(values)
    assert voted.dtype == np.uint8 and voted.shape == (1, 3, 5, 6)
    np.testing.assert_array_equal(voted[0], np.argmax(values, axis=0) + 1)


# --- resampling --------------------------------------------------------------------------------

def block_mean(array: np.ndarray, factor: Vec3) -> np.ndarray:
    c, z, y, x = array.shape
    fz, fy, fx = factor.zyx()
    return array.reshape(c, z // fz, fz, y // fy, fy, x // fx, fx).mean(axis=(2, 4, 6))


@pytest.mark.parametrize("factor", [Vec3(2, 2, 1), Vec3(2, 2, 2), Vec3(1, 3, 2)])
def test_downsample_images_are_block_means(factor):
    image = RNG.integers(0, 100, (2, 4, 6, 6)).astype(np.float32)  # small integers: exact means
    np.testing.assert_array_equal(downsample(image, factor), block_mean(image, factor))
    as_bytes = image.astype(np.uint8)
    np.testing.assert_array_equal(downsample(as_bytes, factor), np.floor(block_mean(image, factor)))


def test_downsample_pads_a_ragged_edge_with_its_edge_voxels():
    image = RNG.integers(0, 100, (1, 2, 5, 7)).astype(np.float32)
    padded = np.pad(image, [(0, 0), (0, 0), (0, 1), (0, 1)], mode="edge")
    np.testing.assert_array_equal(downsample(image, Vec3(2, 2, 1)), block_mean(padded, Vec3(2, 2, 1)))


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 7)] * 3), factor=st.tuples(*[st.integers(1, 3)] * 3))
def test_downsample_is_the_block_mean_of_the_edge_padded_chunk(shape, factor):
    factor = Vec3.of(factor)
    image = np.random.default_rng(sum(shape)).integers(0, 64, (1, *shape)).astype(np.float32)
    padding = [(0, 0)] + [(0, -n % f) for n, f in zip(shape, factor.zyx())]
    expected = block_mean(np.pad(image, padding, mode="edge"), factor)
    np.testing.assert_allclose(downsample(image, factor), expected, rtol=0, atol=1e-5)


def test_downsample_segmentations_take_the_block_mode():
    labels = np.repeat(np.repeat(RNG.integers(1, 50, (1, 2, 3, 4), dtype=np.uint32), 2, axis=2), 2, axis=3)
    labels[:, :, ::2, ::2] = 99  # one voxel of each 2x2 block disagrees: the mode is the other three
    out = downsample(labels, Vec3(2, 2, 1), segmentation=True)
    np.testing.assert_array_equal(out, labels[:, :, 1::2, 1::2])


def test_downsample_operator_scales_box_and_resolution_and_wants_an_aligned_start():
    image = RNG.random((1, 4, 8, 8)).astype(np.float32)
    task = run_operator(["downsample", "--factor", "2", "2", "2"], make_task(image, start=(8, 4, 2)))
    out = task.chunk("chunk")
    assert out.box == Box((4, 2, 1), (8, 6, 3)) and out.resolution == (8.0, 8.0, 80.0)
    np.testing.assert_allclose(out.array, block_mean(image, Vec3(2, 2, 2)), atol=1e-6)
    with pytest.raises(click.ClickException, match=r"starts at \[3, 4, 2\], no multiple of the factor \[2, 2, 1\]"):
        run_operator(["downsample"], make_task(image, start=(3, 4, 2)))


def test_mask_zeroes_where_the_upsampled_mask_is_zero():
    image = RNG.integers(1, 256, (2, 2, 6, 8), dtype=np.uint8)
    coarse = RNG.random((2, 3, 4)) > 0.5
    keep = upsample(coarse, Vec3(2, 2, 1))
    np.testing.assert_array_equal(keep, np.repeat(np.repeat(coarse, 2, axis=1), 2, axis=2))
    np.testing.assert_array_equal(mask(image, keep), image * keep)
    np.testing.assert_array_equal(mask(image, keep, inverse=True), image * ~keep)


def test_mask_operator_reads_a_coarser_layer_off_its_grid(tmp_path):
    """A chunk whose box does not start on the mask's grid gets the right part of the upsampled mask."""
    url = f"file://{tmp_path}/mask"
    bounds = Box((0, 0, 0), (8, 8, 4))
    layer = create_volume(url, bounds=bounds, block_size=Vec3(4, 4, 2), dtype="uint8", num_channels=1,
                          resolution=(16, 16, 40), layer_type="segmentation")
    coarse = (RNG.random((1, 4, 8, 8)) > 0.4).astype(np.uint8)
    layer.write(bounds, coarse)
    image = RNG.integers(1, 256, (1, 3, 10, 9), dtype=np.uint8)
    start = (5, 3, 1)  # at the chunk's 4 4 40 resolution: the mask is 4 x 4 x 1 coarser
    task = run_operator(["mask", "--mask-url", url, "-o", "masked"], make_task(image, start))
    fine = np.repeat(np.repeat(coarse[0], 4, axis=1), 4, axis=2)  # mask at the chunk's grid from 0 0 0
    keep = fine[1:4, 3:13, 5:14]
    np.testing.assert_array_equal(task.chunk("masked").array, image * keep)
    assert task.chunk("chunk").array is image  # the input chunk is kept as it was


def test_crop_margin_crops_to_the_task_box_or_by_a_margin():
    image = RNG.random((1, 6, 8, 10)).astype(np.float32)
    task = make_task(image, start=(10, 20, 30))
    task.box = Box((12, 21, 31), (18, 27, 35))
    cropped = run_operator(["crop-margin", "-o", "core"], task).chunk("core")
    assert cropped.box == task.box
    np.testing.assert_array_equal(cropped.array, image[:, 1:5, 1:7, 2:8])
    by_margin = run_operator(["crop-margin", "--margin", "1", "2", "1"], task).chunk("chunk")
    assert by_margin.box == Box((11, 22, 31), (19, 26, 35))
    np.testing.assert_array_equal(by_margin.array, image[:, 1:5, 2:6, 1:9])
    with pytest.raises(ValueError, match="does not contain"):
        crop(image, Box((0, 0, 0), (10, 8, 6)), Box((5, 5, 5), (11, 8, 6)))


def test_multiply_copy_and_delete_chunks():
    image = RNG.integers(0, 256, (2, 2, 3, 4), dtype=np.uint8)
    binary = (RNG.random((1, 2, 3, 4)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(multiply(image, binary), image * binary)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 3, 4\) by one of shape \(1, 2, 3, 3\)"):
        multiply(image, binary[..., :3])
    task = make_task(image)
    task = run_operator(["copy-chunk", "-o", "mask"], task)
    task.chunks["mask"] = task.chunks["mask"].replace(binary)
    task = run_operator(["multiply", "-m", "mask", "-o", "product"], task)
    np.testing.assert_array_equal(task.chunk("product").array, image * binary)
    task = run_operator(["delete-chunk", "-i", "mask", "-i", "chunk"], task)
    assert list(task.chunks) == ["product"]


# --- whole chains through the command line -------------------------------------------------------

def chain(*args: str) -> None:
    from chunk_ops.cli import main

    result = CliRunner().invoke(main, ["chain", *args])
    assert result.exit_code == 0, result.output


def read_layer(url: str) -> np.ndarray:
    layer = open_volume(url, 0)
    return layer.read(layer.bounds)


def test_chain_thresholds_then_labels_components(tmp_path):
    image_url, labels_url = f"file://{tmp_path}/image", f"file://{tmp_path}/labels"
    layer = ["--volume-bounds", "4", "0", "0", "20", "12", "6", "--block-size", "8", "4", "2"]
    chain("create-chunk", "--size", "16", "12", "6", "--voxel-offset", "4", "0", "0", "--dtype", "float32",
          "--pattern", "random", "--seed", "3",
          "save-precomputed", "--url", image_url, *layer,
          "threshold", "--threshold", "0.6",
          "connected-components", "--connectivity", "6",
          "save-precomputed", "--url", labels_url, *layer)
    image, labels = read_layer(image_url), read_layer(labels_url)
    assert labels.dtype == np.uint32
    expected, count = ndimage.label(image[0] > 0.6)  # scipy's default structure: the 6 face neighbours
    assert count > 5
    assert partition(labels[0]) == partition(expected)


def test_chain_loads_a_layer_normalizes_thresholds_and_saves_it(tmp_path):
    """Several tasks, each thresholding its own box: together the whole layer's closed form."""
    image_url, out_url = f"file://{tmp_path}/image", f"file://{tmp_path}/mask"
    bounds = Box((0, 0, 0), (24, 16, 4))
    image = RNG.integers(0, 256, (1, 4, 16, 24), dtype=np.uint8)
    create_volume(image_url, bounds=bounds, block_size=Vec3(8, 8, 2), dtype="uint8", num_channels=1,
                  resolution=(4, 4, 40)).write(bounds, image)
    chain("generate-tasks", "--roi", "0", "0", "0", "24", "16", "4", "--chunk-size", "8", "8", "2",
          "load-precomputed", "--url", image_url,
          "normalize-intensity",
          "threshold", "--threshold", "0.5",
          "save-precomputed", "--url", out_url, "--volume-bounds", "0", "0", "0", "24", "16", "4",
          "--block-size", "8", "8", "2")
    np.testing.assert_array_equal(read_layer(out_url), (image > 127.5).astype(np.uint8))
    assert open_volume(out_url, 0).resolution == [4, 4, 40]


def test_chain_stops_on_a_chunk_it_cannot_take_with_one_line():
    from chunk_ops.cli import main

    result = CliRunner().invoke(main, ["chain", "create-chunk", "--dtype", "uint8", "quantize"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: quantize Box([0, 0, 0], [64, 64, 8]): quantize takes a float chunk with values in [0, 1], "
        "got dtype uint8")
