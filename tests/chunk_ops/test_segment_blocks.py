"""Blockwise segmentation (chunk_ops.segment_blocks) against the single-task one.

Each test writes an affinity layer itself (no network runs), opens a job on it and
drives the stages as the framework would: every chunk's label, then every chunk's
stitch, the relabel, every chunk's write, chunks in a random order in each stage.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from chunk_ops.geometry import Box, ChunkPlan, Vec3
from chunk_ops.job import Job
from chunk_ops.sample import RESOLUTION_NM, synthetic_em
from chunk_ops.segment import adapted_rand_error, components, label_affinities, watershed
from chunk_ops.segment_blocks import (
    BadSegmentScratch, blockwise_adapted_rand_error, label_chunk, prepare_layer, relabel, remove_scratch,
    segmentation_result, stitch_chunk, write_chunk,
)
from chunk_ops.volumes import create_volume, open_volume
from tests.chunk_ops.conftest import NETS_FILE, save_net

# test_quality.py's held-out volume (not imported: that module pulls in the whole pipeline)
HELD_OUT_SEED = 7
SHAPE = (256, 256, 32)


def no_fence() -> None:
    pass


def network_like_affinities(truth: np.ndarray, seed: int, *, noise: float = 0.1, leaks: int = 12) -> np.ndarray:
    """uint8 (3, z, y, x) affinities as a network gets them wrong: the true ones blurred
    across membranes, smooth noise, and a few leaks (membrane gaps of high affinity)."""
    rng = np.random.default_rng(seed)
    affs = ndimage.gaussian_filter(label_affinities(truth), sigma=(0, 0.5, 1.0, 1.0))
    wobble = ndimage.gaussian_filter(rng.standard_normal(affs.shape, dtype=np.float32), sigma=(0, 0.5, 1.5, 1.5))
    affs = 0.02 + 0.96 * affs + wobble * np.float32(noise / wobble.std())
    membrane = np.argwhere(truth == 0)
    for z, y, x in membrane[rng.choice(len(membrane), size=leaks, replace=False)]:
        affs[:, max(z - 1, 0):z + 2, max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = 0.9
    return np.round(np.clip(affs, 0, 1) * 255).astype(np.uint8)


def open_job(tmp_path: Path, affs: np.ndarray, *, chunk, block, method: str, threshold: float,
             truth: np.ndarray | None = None) -> Job:
    """A job whose output layer holds ``affs`` (uint8, x/y/z channels), to segment."""
    bounds = Box.from_shape(Vec3(0, 0, 0), Vec3(*affs.shape[:0:-1]))
    create_volume(f"file://{tmp_path}/image", bounds=bounds, block_size=Vec3.of(block), dtype="uint8",
                  num_channels=1, resolution=RESOLUTION_NM)  # never read: no network runs
    out = create_volume(f"file://{tmp_path}/affinities", bounds=bounds, block_size=Vec3.of(block),
                        dtype="uint8", num_channels=3, resolution=RESOLUTION_NM)
    out.write(bounds, affs)
    segmentation = {"method": method, "threshold": threshold, "max_voxels": 10 ** 12}
    if truth is not None:
        truth_url = f"file://{tmp_path}/truth"
        create_volume(truth_url, bounds=bounds, block_size=Vec3.of(block), dtype="uint32", num_channels=1,
                      resolution=RESOLUTION_NM, layer_type="segmentation").write(bounds, truth[None])
        segmentation["truth_url"] = truth_url
    kwargs = {"in_channels": 1, "out_channels": 3}
    return Job.open({
        "input": {"url": f"file://{tmp_path}/image"},
        "output": {"url": f"file://{tmp_path}/affinities", "dtype": "uint8", "block_size": list(block)},
        "chunk_size": list(chunk),
        "model": {"path": str(save_net(tmp_path, "TinyConvNet", kwargs)), "format": "pytorch",
                  "definition": f"{NETS_FILE}:TinyConvNet", "kwargs": kwargs, "input_patch": [12, 12, 4],
                  "in_channels": 1, "out_channels": 3},
        "inference": {"overlap": [4, 4, 2], "engine": "pytorch"},
        "postprocess": {"segmentation": segmentation},
    })


def run_blockwise(job: Job, seed: int = 0) -> dict:
    """Every stage over every chunk, each stage in its own random order; the relabel result."""
    rng = np.random.default_rng(seed)
    chunks = list(job.plan)
    prepare_layer(job)
    for step in (label_chunk, stitch_chunk):
        for i in rng.permutation(len(chunks)):
            step(job, chunks[i], no_fence)
    result = relabel(job)
    for i in rng.permutation(len(chunks)):
        write_chunk(job, chunks[i], no_fence)
    return result


def stored_segmentation(job: Job) -> np.ndarray:
    return open_volume(job.spec.segmentation["url"], 0).read(job.roi)[0]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Do two label images cut the voxels the same way (ids aside)?"""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def settings_folder(job: Job) -> Path:
    """The scratch of this job's segmentation settings."""
    return Path(job.scratch_url[len("file://"):]) / "segmentation" / job.stage_folder(3).rsplit("-", 1)[1]


def scratch_files(job: Job) -> dict[str, bytes]:
    folder = settings_folder(job)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def components_volume():
    _, truth = synthetic_em((88, 76, 20), seed=11)
    return truth, network_like_affinities(truth, seed=3, noise=0.12, leaks=4)


def test_blockwise_components_are_the_single_task_components(tmp_path, components_volume):
    """3 x 3 x 3 chunks, the last ones short on every axis: the same partition, exactly."""
    truth, affs = components_volume
    job = open_job(tmp_path, affs, chunk=(32, 32, 8), block=(16, 16, 4), method="components",
                   threshold=0.7, truth=truth)
    assert job.plan.grid_shape.to_list() == [3, 3, 3]
    result = run_blockwise(job, seed=1)
    single = components(affs, 0.7)
    blockwise = stored_segmentation(job)
    assert same_partition(single, blockwise)
    assert adapted_rand_error(single, blockwise) == adapted_rand_error(blockwise, single) == 0.0
    assert result["segments"] == int(single.max()) == int(blockwise.max())
    assert np.array_equal(np.unique(blockwise), np.arange(1, result["segments"] + 1))  # ids 1..N
    # the chunked score is skimage's, to the last bit
    summary = segmentation_result(job, result)
    assert blockwise_adapted_rand_error(job, job.spec.segmentation["truth_url"], job.spec.segmentation["url"]) \
        == adapted_rand_error(truth, blockwise)
    assert summary["adapted_rand_error"] == round(adapted_rand_error(truth, single), 4)
    assert set(summary) == {"url", "method", "threshold", "segments", "seconds", "adapted_rand_error"}


def test_any_processing_order_gives_the_same_ids(tmp_path, components_volume):
    truth, affs = components_volume
    runs = []
    for seed in (2, 3):
        job = open_job(tmp_path / str(seed), affs, chunk=(32, 32, 8), block=(16, 16, 4),
                       method="components", threshold=0.7)
        run_blockwise(job, seed=seed)
        runs.append(stored_segmentation(job))
    assert np.array_equal(*runs)


def test_blockwise_watershed_is_within_0_01_of_the_single_task_one(tmp_path):
    """The held-out synthetic volume, network-like affinities, 3 x 3 x 3 chunks."""
    _, truth = synthetic_em(SHAPE, seed=HELD_OUT_SEED)
    affs = network_like_affinities(truth, seed=HELD_OUT_SEED)
    job = open_job(tmp_path, affs, chunk=(96, 96, 12), block=(32, 32, 4), method="watershed", threshold=0.3,
                   truth=truth)
    assert len(job.plan) == 27
    started = time.perf_counter()
    result = run_blockwise(job, seed=4)
    blockwise_s = time.perf_counter() - started
    single = watershed(affs, 0.3)
    blockwise = stored_segmentation(job)
    errors = {"blockwise_vs_single": adapted_rand_error(single, blockwise),
              "single_vs_blockwise": adapted_rand_error(blockwise, single),
              "single_vs_truth": adapted_rand_error(truth, single),
              "blockwise_vs_truth": adapted_rand_error(truth, blockwise),
              "segments": (int(single.max()), result["segments"]), "blockwise_s": round(blockwise_s, 2)}
    print(errors)
    assert errors["blockwise_vs_single"] < 0.01 and errors["single_vs_blockwise"] < 0.01, errors
    assert errors["blockwise_vs_truth"] < errors["single_vs_truth"] + 0.01, errors
    assert segmentation_result(job, result)["adapted_rand_error"] == round(errors["blockwise_vs_truth"], 4)


def layer_files(url: str) -> dict[str, bytes]:
    folder = Path(url[len("file://"):])
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method, threshold", [("components", 0.7), ("watershed", 0.3)])
def test_redone_chunks_and_relabels_write_the_same_bytes(tmp_path, components_volume, method, threshold):
    """A redelivered task (label, stitch, write) and a second relabel change no byte."""
    _, affs = components_volume
    job = open_job(tmp_path, affs, chunk=(32, 32, 8), block=(16, 16, 4), method=method, threshold=threshold)
    run_blockwise(job, seed=5)
    scratch, layer = scratch_files(job), layer_files(job.spec.segmentation["url"])
    assert {name.split("/")[0] for name in scratch} == {"labels", "faces", "edges", "remap", "relabel.json"}
    chunk = job.plan[len(job.plan) // 2]
    extras = [label_chunk(job, chunk, no_fence)[1] for _ in range(2)]
    assert extras[0] == {**extras[1], "segment_s": extras[0]["segment_s"]}
    assert extras[0]["segment_sha256"]["labels"] == hashlib.sha256(
        scratch[f"labels/{ChunkPlan.chunk_id(chunk)}"]).hexdigest()
    stitch_chunk(job, chunk, no_fence)
    relabel(job)
    relabel(job)
    write_chunk(job, chunk, no_fence)
    write_chunk(job, chunk, no_fence)
    assert scratch_files(job) == scratch
    assert layer_files(job.spec.segmentation["url"]) == layer
    remove_scratch(job)
    assert not (Path(job.scratch_url[len("file://"):]) / "segmentation").exists()
    assert layer_files(job.spec.segmentation["url"]) == layer  # the result stays


def test_a_bad_scratch_file_is_an_error_naming_the_chunk_and_the_file(tmp_path, components_volume):
    _, affs = components_volume
    job = open_job(tmp_path, affs, chunk=(32, 32, 8), block=(16, 16, 4), method="components", threshold=0.7)
    prepare_layer(job)
    for chunk in job.plan:
        label_chunk(job, chunk, no_fence)
    folder = settings_folder(job)
    lower, upper = job.plan[0], job.plan[1]  # x neighbours: the stitch of ``upper`` reads ``lower``'s faces
    lower_id = ChunkPlan.chunk_id(lower)
    faces = folder / "faces" / lower_id

    data = bytearray(faces.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit
    faces.write_bytes(bytes(data))
    with pytest.raises(BadSegmentScratch, match=rf"segmentation/[0-9a-f]+/faces/{lower_id} of chunk {lower_id} .* corrupted"):
        stitch_chunk(job, upper, no_fence)

    faces.write_bytes(bytes(data[: len(data) // 2]))  # torn: half written
    with pytest.raises(BadSegmentScratch, match=rf"segmentation/[0-9a-f]+/faces/{lower_id} of chunk {lower_id} .* torn"):
        stitch_chunk(job, upper, no_fence)

    faces.unlink()
    with pytest.raises(BadSegmentScratch, match=rf"segmentation/[0-9a-f]+/faces/{lower_id} of chunk {lower_id} .* missing: "
                                                 rf"stage 3 \(label\)"):
        stitch_chunk(job, upper, no_fence)

    label_chunk(job, lower, no_fence)  # redone: the stitch goes through
    for chunk in job.plan:
        stitch_chunk(job, chunk, no_fence)
    relabel(job)
    (folder / "remap" / ChunkPlan.chunk_id(upper)).unlink()
    with pytest.raises(BadSegmentScratch, match=rf"segmentation/[0-9a-f]+/remap/{ChunkPlan.chunk_id(upper)} .* missing: "
                                                 rf"the relabel step"):
        write_chunk(job, upper, no_fence)


def test_scratch_of_other_settings_is_refused(tmp_path, components_volume):
    """postprocess is not part of the job id, but a new threshold never reads the old scratch."""
    _, affs = components_volume
    job = open_job(tmp_path, affs, chunk=(32, 32, 8), block=(16, 16, 4), method="components", threshold=0.7)
    chunk = job.plan[0]
    label_chunk(job, chunk, no_fence)
    spec = job.spec.to_dict()
    spec["postprocess"]["segmentation"]["threshold"] = 0.8
    other = Job.open(spec)
    assert other.scratch_url == job.scratch_url and settings_folder(other) != settings_folder(job)
    with pytest.raises(BadSegmentScratch, match=r"missing: stage 3 \(label\) of that chunk has not run"):
        write_chunk(other, chunk, no_fence)
    # a file copied in from other settings is refused by its header
    labels = settings_folder(job) / "labels" / ChunkPlan.chunk_id(chunk)
    (settings_folder(other) / "labels").mkdir(parents=True)
    (settings_folder(other) / "labels" / labels.name).write_bytes(labels.read_bytes())
    with pytest.raises(BadSegmentScratch, match=r"made for \{'threshold': 0.7\}.*stale"):
        write_chunk(other, chunk, no_fence)


def test_a_fence_that_raises_stops_every_write(tmp_path, components_volume):
    _, affs = components_volume
    job = open_job(tmp_path, affs, chunk=(32, 32, 8), block=(16, 16, 4), method="components", threshold=0.7)

    class LeaseLost(Exception):
        pass

    def lost() -> None:
        raise LeaseLost

    with pytest.raises(LeaseLost):
        label_chunk(job, job.plan[0], lost)
    assert not (Path(job.scratch_url[len("file://"):]) / "segmentation").exists()
