"""From affinities to a segmentation, and how good a segmentation is.

Affinity convention (the bundled network's, and what training targets use):
three channels x, y, z; channel ``a`` at voxel ``v`` is the probability that
``v`` and its lower neighbour ``v - e_a`` belong to the same cell.  The first
slice along each axis has no lower neighbour and is 0.

Two ways to segment, both from well-kept libraries:
- ``components``: keep the edges whose affinity exceeds a threshold and label
  the connected components of that voxel graph (cc3d);
- ``watershed``: seeded watershed on the affinity graph, then agglomeration of
  its fragments by mean affinity up to a threshold (waterz).  Better: one weak
  edge no longer merges two cells.

Quality is the adapted Rand error (SNEMI3D's metric, 1 - F-score of the Rand
split and merge scores) over the voxels the ground truth labels (label 0 is
unlabelled and ignored).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import numpy as np

METHODS = ("components", "watershed")


CHANNEL_AXES = (2, 1, 0)  # affinity channels x, y, z are numpy axes 2, 1, 0 of (z, y, x)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for a while: output of C/C++ code bypasses sys.stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _voxels_and_lower_neighbours(axis: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index of every voxel that has a lower neighbour along ``axis``, and of those neighbours."""
    here, below = [slice(None)] * 3, [slice(None)] * 3
    here[axis], below[axis] = slice(1, None), slice(None, -1)
    return tuple(here), tuple(below)


def label_affinities(labels: np.ndarray) -> np.ndarray:
    """float32 (3, z, y, x) affinities (x, y, z) of a (z, y, x) label image; 0 is never connected."""
    affs = np.zeros((3, *labels.shape), np.float32)
    for channel, axis in enumerate(CHANNEL_AXES):
        here, below = _voxels_and_lower_neighbours(axis)
        affs[(channel, *here)] = (labels[here] == labels[below]) & (labels[here] != 0)
    return affs


def _as_probabilities(affs: np.ndarray) -> np.ndarray:
    if affs.ndim != 4 or affs.shape[0] != 3:
        raise ValueError(f"affinities must be (3, z, y, x), got shape {affs.shape}")
    if affs.dtype == np.uint8:
        return affs.astype(np.float32) / np.float32(255)
    return np.ascontiguousarray(affs, dtype=np.float32)


def components(affs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint32 labels: connected components of the edges with affinity > threshold."""
    import cc3d

    affs = _as_probabilities(affs)
    # cc3d's 6-way voxel connectivity graph names numpy axis 0 "x": axis k has
    # bit 1 << 2k towards +k and bit 2 << 2k towards -k
    graph = np.zeros(affs.shape[1:], np.uint8)
    for channel, axis in enumerate(CHANNEL_AXES):
        here, below = _voxels_and_lower_neighbours(axis)  # the first slice has no lower neighbour
        edge = (affs[channel][here] > threshold).astype(np.uint8)
        graph[here] |= edge * np.uint8(2 << (2 * axis))   # towards -axis
        graph[below] |= edge * np.uint8(1 << (2 * axis))  # towards +axis
    return cc3d.color_connectivity_graph(graph, connectivity=6).astype(np.uint32)


def watershed(affs: np.ndarray, threshold: float = 0.5, *, aff_threshold_low: float = 0.0001,
              aff_threshold_high: float = 0.9999, fragments: np.ndarray | None = None) -> np.ndarray:
    """uint32 labels: waterz watershed fragments agglomerated while mean affinity > threshold.

    The watershed seeds where affinities exceed ``aff_threshold_high`` and never crosses
    edges below ``aff_threshold_low``; given (z, y, x) ``fragments``, waterz
    agglomerates those instead of its own watershed.
    """
    import fastremap
    import waterz

    affs = _as_probabilities(affs)
    zyx = np.ascontiguousarray(affs[::-1])  # waterz wants channels z, y, x
    if fragments is not None:
        fragments = np.array(fragments, dtype=np.uint64, order="C")  # a copy: waterz relabels it in place
    # waterz merges while the score (1 - mean affinity) is below its threshold
    with stdout_to_stderr():  # waterz's C++ prints its progress on stdout, which is for results
        seg = next(iter(waterz.agglomerate(zyx, [1.0 - threshold], fragments=fragments,
                                           aff_threshold_low=aff_threshold_low,
                                           aff_threshold_high=aff_threshold_high)))
    seg, _ = fastremap.renumber(seg, in_place=True)
    return seg.astype(np.uint32)


def segment(affs: np.ndarray, method: str, threshold: float) -> np.ndarray:
    if method == "components":
        return components(affs, threshold)
    if method == "watershed":
        return watershed(affs, threshold)
    raise ValueError(f"segmentation method {method!r} is not one of {METHODS}")


def intensity_baseline(image: np.ndarray, threshold: float) -> np.ndarray:
    """The trivial baseline: connected components of voxels brighter than ``threshold``."""
    import cc3d

    return cc3d.connected_components(image > threshold, connectivity=6).astype(np.uint32)


def adapted_rand_error(truth: np.ndarray, seg: np.ndarray) -> float:
    """SNEMI3D's adapted Rand error of ``seg`` against ``truth``, ignoring truth label 0."""
    from skimage.metrics import adapted_rand_error as are

    if truth.shape != seg.shape:
        raise ValueError(f"truth {truth.shape} and segmentation {seg.shape} differ in shape")
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 recall when every voxel is its own segment
        error, _, _ = are(truth.astype(np.uint64), seg.astype(np.uint64), ignore_labels=(0,))
    return float(error)


def create_segmentation_layer(job) -> None:
    """The uint32 segmentation layer over the job's region, if it is not there yet."""
    from .volumes import create_volume, volume_exists

    url = job.spec.segmentation["url"]
    if not volume_exists(url):
        create_volume(url, bounds=job.roi, block_size=job.spec.block_size, dtype="uint32",
                      num_channels=1, resolution=job.input.resolution, layer_type="segmentation")


def segment_job(job) -> dict:
    """``postprocess.segmentation`` of a finished job: read its affinities, segment, write the layer.

    One task over the whole region (bounded by ``max_voxels``, checked when the job
    is opened).  Deterministic, so a rerun writes the same bytes.  With a
    ``truth_url``, the adapted Rand error against it is measured too.
    """
    import time

    from cloudfiles import CloudFiles

    from .volumes import open_volume

    options = job.spec.segmentation
    if options["method"] == "none":
        return {}
    started = time.perf_counter()
    affs = open_volume(job.spec.output_url, 0).read(job.roi)
    labels = segment(affs, options["method"], options["threshold"])
    create_segmentation_layer(job)
    open_volume(options["url"], 0).write(job.roi, labels[None])
    result = {"url": options["url"], "method": options["method"], "threshold": options["threshold"],
              "segments": int(labels.max()), "seconds": round(time.perf_counter() - started, 2)}
    if options["truth_url"]:
        truth = open_volume(options["truth_url"], 0).read(job.roi)[0]
        result["adapted_rand_error"] = round(adapted_rand_error(truth, labels), 4)
    CloudFiles(job.job_url).put_json("segmentation.json", result)
    return result
