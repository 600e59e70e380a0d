"""The synthetic serial-section EM generator: deterministic, anisotropic, with ground truth."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from chunk_ops.sample import RESOLUTION_NM, synthetic_em, write_sample
from chunk_ops.volumes import open_volume


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not():
    a_image, a_truth = synthetic_em((64, 48, 12), seed=3)
    b_image, b_truth = synthetic_em((64, 48, 12), seed=3)
    c_image, _ = synthetic_em((64, 48, 12), seed=4)
    assert a_image.shape == a_truth.shape == (12, 48, 64)
    assert a_image.dtype == np.uint8 and a_truth.dtype == np.uint32
    assert np.array_equal(a_image, b_image) and np.array_equal(a_truth, b_truth)
    assert not np.array_equal(a_image, c_image)


def test_membranes_are_dark_unlabelled_borders_between_cells():
    image, truth = synthetic_em((160, 160, 16), seed=2)
    membrane = truth == 0
    assert 0.03 < membrane.mean() < 0.25
    assert image[membrane].mean() < image[~membrane].mean() - 50
    # every border between two cells within a section is covered by membrane
    for axis in (1, 2):
        a, b = np.swapaxes(truth, 0, axis)[1:], np.swapaxes(truth, 0, axis)[:-1]
        assert not np.any((a != b) & (a != 0) & (b != 0))


def test_cells_are_columns_through_many_sections():
    _, truth = synthetic_em((128, 128, 32), seed=1)
    ids, counts = np.unique(truth[truth > 0], return_counts=True)
    assert len(ids) > 10
    # the z extent of the largest cells spans many 40 nm sections (neurite-like)
    slices = ndimage.find_objects(truth)
    extents = sorted((s[0].stop - s[0].start for s in slices if s is not None), reverse=True)
    assert extents[len(extents) // 4] >= 8


def test_sections_drift_in_brightness():
    image, truth = synthetic_em((128, 128, 24), seed=8)
    per_section = [image[z][truth[z] > 0].mean() for z in range(image.shape[0])]
    assert np.std(per_section) > 2


def test_write_sample_writes_the_image_and_segmentation_layers(tmp_path):
    write_sample(f"file://{tmp_path}/img", (64, 64, 8), seed=9, labels_url=f"file://{tmp_path}/gt")
    image, truth = synthetic_em((64, 64, 8), seed=9)
    img, gt = open_volume(f"file://{tmp_path}/img", 0), open_volume(f"file://{tmp_path}/gt", 0)
    assert img.resolution == gt.resolution == list(RESOLUTION_NM)
    assert np.array_equal(img.read(img.bounds)[0], image)
    assert np.array_equal(gt.read(gt.bounds)[0], truth)
    assert gt._cv.layer_type == "segmentation"
