"""Post-processing as chunk tasks: blockwise segmentation and the pyramid through the pipeline,
in this process in a random order, and with a worker pool in which one worker is killed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from chunk_ops import pipeline
from chunk_ops.downsample import build_pyramid
from chunk_ops.job import Job
from chunk_ops.queues.stages import StageQueues
from chunk_ops.segment import adapted_rand_error, components
from chunk_ops.task import Task, TaskError
from chunk_ops.volumes import open_volume
from tests.chunk_ops.test_reliability import _files, _hooked_worker, _wait_stopped

REPO = Path(__file__).parents[2]


def _spec(make_spec, mode: str) -> dict:
    spec = make_spec(out_channels=3, chunk=(16, 16, 4))  # 3 x 3 x 3 chunks of a 40 x 36 x 12 region
    spec["postprocess"] = {"pyramid_levels": 2,
                           "segmentation": {"method": "components", "threshold": 0.5, "mode": mode}}
    return spec


def _same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """Equal partitions of the voxels (ids may differ): each id of one maps to one id of the other."""
    assert adapted_rand_error(a, b) == 0.0 and adapted_rand_error(b, a) == 0.0
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _layer_files(job: Job) -> dict[str, bytes]:
    """The output layer's files (its scales and the segmentation layer), not the job's records."""
    return {name: data for name, data in _files(job.spec.output_url).items() if not name.startswith("jobs/")}


def _single_task_labels(job: Job) -> np.ndarray:
    return components(open_volume(job.spec.output_url, 0).read(job.roi), job.spec.segmentation["threshold"])


def test_blockwise_components_in_a_random_order_equal_the_single_task(make_spec):
    job = Job.open(_spec(make_spec, "blockwise"))
    order = list(range(len(job.plan)))
    random.Random(7).shuffle(order)
    report = pipeline.run_job(job, order=order)
    assert len(job.plan) >= 8
    labels = open_volume(job.spec.segmentation["url"], 0).read(job.roi)[0]
    _same_partition(labels, _single_task_labels(job))
    assert report.segmentation["segments"] == len(np.unique(labels))
    # every post-processing task has its marker, and the pyramid is the single-task one, byte for byte
    for stage in (3, 4, 5):
        assert job.done_mask(stage).all()
    distributed = _layer_files(job)
    build_pyramid(job.spec.output_url, 2)
    assert _layer_files(job) == distributed
    assert report.pyramid_chunks == [len(job.stage_plan(6, mip)) for mip in (1, 2)]
    # a rerun finds every marker: the same files, no new mip
    pipeline.run_job(Job.open(job.spec.to_dict()))
    assert len(json.loads(Path(job.spec.output_url.removeprefix("file://"), "info").read_text())["scales"]) == 3
    assert _layer_files(job) == distributed
    # a new threshold is not in the job id, but segmentation's stages start afresh for it
    spec = job.spec.to_dict()
    spec["postprocess"]["segmentation"]["threshold"] = 0.6
    again = Job.open(spec)
    assert again.id == job.id and not again.done_mask(3).any()
    pipeline.run_job(again, order=order)
    _same_partition(open_volume(again.spec.segmentation["url"], 0).read(again.roi)[0], _single_task_labels(again))
    # and back: the first settings' markers are all there, but the layer holds the second's labels
    back = Job.open(job.spec.to_dict())
    assert back.done_mask(5).all()
    pipeline.run_job(back)
    _same_partition(open_volume(back.spec.segmentation["url"], 0).read(back.roi)[0], _single_task_labels(back))


def test_a_post_processing_worker_killed_mid_task_is_redone_by_the_pool(make_spec, tmp_path):
    job = Job.open(_spec(make_spec, "blockwise"))
    job.prepare()
    for stage in (1, 2):
        pipeline.run_stage_here(job, stage)
    pipeline.finish(job)
    queues = StageQueues(f"file://{tmp_path}/{uuid.uuid4().hex[:8]}.sqlite", create=True)
    pipeline.prepare_post(job)
    tasks = list(pipeline.phase_tasks(job, 1))
    assert {t.stage for t in tasks} == {3, 6}  # labels and the first pyramid level; stitches follow
    for stage in (3, 6):
        queues.of(stage).send_batch(t.to_json() for t in tasks if t.stage == stage)
    # a worker stops itself as it opens its first segmentation scratch file, and is killed there
    scratch = Path(job.scratch_url.removeprefix("file://")) / "segmentation"
    victim = _hooked_worker(queues.url, {"HOOK_STOP_IN_WRITE": str(scratch)}, "--visibility-timeout", "2")
    _wait_stopped(victim, "the worker writing a chunk's labels")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    pipeline.drain_with_pool(job, queues, 2, pipeline.phase_stages(job, 1), visibility_timeout_s=5)
    relabelled = pipeline.relabel(job)
    assert pipeline.send_phase(job, queues, 2) == len(job.plan)
    pipeline.drain_with_pool(job, queues, 2, pipeline.phase_stages(job, 2), visibility_timeout_s=5)
    result = pipeline.segment(job, relabelled)
    labels = open_volume(job.spec.segmentation["url"], 0).read(job.roi)[0]
    _same_partition(labels, _single_task_labels(job))
    assert result["segments"] == len(np.unique(labels))
    redelivered = [r for r in (job.done_record(3, box) for box in job.plan) if r["receive_count"] > 1]
    assert len(redelivered) == 1  # the killed worker's chunk, leased again once its lease ran out


def test_auto_mode_segments_small_regions_in_one_task_and_single_refuses_large_ones(make_spec):
    spec = _spec(make_spec, "auto")
    assert pipeline.segmentation_mode(Job.open(spec)) == "single"
    spec["postprocess"]["segmentation"]["max_voxels"] = 1000
    assert pipeline.segmentation_mode(Job.open(spec)) == "blockwise"
    spec["postprocess"]["segmentation"]["mode"] = "single"
    with pytest.raises(ValueError, match="max_voxels 1000 for mode 'single'"):
        Job.open(spec)


def test_pyramid_task_messages_name_their_mip_and_others_none():
    box = {"start": [0, 0, 0], "stop": [4, 4, 1]}
    body = {"v": 1, "job": "j", "spec": "file:///s/spec.json", "stage": 6, "box": box, "mip": 2}
    assert Task.from_json(json.dumps(body)).mip == 2
    for bad in ({**body, "mip": 0}, {k: v for k, v in body.items() if k != "mip"},
                {**body, "stage": 3}, {**body, "mip": "2"}):
        with pytest.raises(TaskError, match="mip|fields"):
            Task.from_json(json.dumps(bad))
