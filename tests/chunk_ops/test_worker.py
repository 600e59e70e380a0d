"""Fault-tolerant workers: poison messages, SIGTERM, restarts, and a chaos run with kills."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from chunk_ops.job import Job
from chunk_ops.pipeline import run_job, worker_command
from chunk_ops.queues.stages import StageQueues
from chunk_ops.stages import reference_pass
from chunk_ops.submit import enqueue_stage, job_status, report_from_markers
from chunk_ops.task import Task
from chunk_ops.volumes import open_volume
from chunk_ops.worker import Worker, WorkerConfig

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"


def _queue(kind: str, tmp_path: Path, max_receives: int = 3):
    url = (f"sqs://worker-{uuid.uuid4().hex[:12]}" if kind == "sqs"
           else f"file://{tmp_path}/{uuid.uuid4().hex[:8]}.sqlite")
    return StageQueues(url, create=True, max_receives=max_receives)


def _read(job: Job) -> np.ndarray:
    return open_volume(job.spec.output_url, 0).read(job.roi)


@pytest.mark.parametrize("kind", ["embedded", "sqs"])
def test_poison_messages_end_in_the_dead_letter_queue(make_spec, tmp_path, request, kind):
    if kind == "sqs":
        request.getfixturevalue("moto_sqs")
    job = Job.open(make_spec(chunk=(16, 16, 4)))
    job.prepare()
    queue = _queue(kind, tmp_path, max_receives=2)
    outside = Task(job.id, job.spec_url, 1, job.plan[0].shift((1000, 0, 0))).to_json()
    wrong_types = json.dumps({"v": 1, "job": 7, "spec": job.spec_url, "stage": "1", "box": [0, 0, 0]})
    poison = ["{not json", json.dumps({"v": 2}), wrong_types, outside]
    queue.of(1).send_batch(poison)
    assert enqueue_stage(job, queue, 1) == len(job.plan)

    summary = Worker(WorkerConfig(queue.url, visibility_timeout_s=30, idle_exit_s=1.5), queue).run()

    assert job.done_mask(1).all() and summary.done == len(job.plan)
    counts = queue.counts(1)
    assert (counts.visible, counts.in_flight, counts.dead) == (0, 0, 4)
    assert sorted(queue.dead_letters(10)) == sorted(poison)
    assert summary.failed == 4 * 2  # each poison message was tried max_receives times, then redriven


def _spawn(queue_url: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(worker_command(queue_url, **kw), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _slow_job(make_spec, delay_s: float, **kw) -> Job:
    spec = make_spec(net_kwargs={"in_channels": 1, "out_channels": 1, "delay_s": delay_s}, **kw)
    job = Job.open(spec)
    job.prepare()
    return job


def _wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def test_sigterm_finishes_the_task_within_the_grace_period(make_spec, tmp_path):
    job = _slow_job(make_spec, delay_s=2.0, chunk=(48, 48, 16), batch_size=50)  # one chunk, two slow batches
    queue = _queue("embedded", tmp_path)
    enqueue_stage(job, queue, 1)
    proc = _spawn(queue.url, grace_s=60)
    _wait_until(lambda: queue.counts(1).in_flight == 1, 60, "the worker to lease the task")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, proc.stderr.read()
    assert job.done_mask(1).all()
    assert queue.counts(1).pending == 0


def test_sigterm_gives_the_task_back_when_the_grace_period_is_too_short(make_spec, tmp_path):
    job = _slow_job(make_spec, delay_s=3.0, chunk=(48, 48, 16), batch_size=50)
    queue = _queue("embedded", tmp_path)
    enqueue_stage(job, queue, 1)
    proc = _spawn(queue.url, grace_s=1.0, visibility_timeout_s=600)
    _wait_until(lambda: queue.counts(1).in_flight == 1, 60, "the worker to lease the task")
    time.sleep(0.5)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert time.time() - signalled < 1.0 + 3.0  # grace, plus the heartbeat's poll
    counts = queue.counts(1)
    assert (counts.visible, counts.in_flight) == (1, 0), "given back at once, not after the 600 s lease"
    assert not job.done_mask(1).any()
    assert '"event": "given_back"' in proc.stderr.read()


def test_restart_processes_only_the_missing_chunks(make_spec, tmp_path):
    spec = make_spec(chunk=(8, 8, 4))
    job = Job.open(spec)
    job.prepare()
    queue = _queue("embedded", tmp_path)
    enqueue_stage(job, queue, 1)
    Worker(WorkerConfig(queue.url, idle_exit_s=1, max_tasks=20), queue).run()  # then "every worker stops"
    assert job.done_mask(1).sum() == 20
    status = job_status(job, queue)
    assert status.stages[1].done == 20 and status.stages[1].total == len(job.plan)
    assert status.stages[1].voxels_per_s > 0 and status.stages[1].eta_s > 0
    restart = time.time()

    rerun = Job.open(spec)
    assert rerun.id == job.id
    report = run_job(rerun, workers=1, queue_url=queue.url)
    redone = [r for r in rerun.done_records(1) if r["started_at"] >= restart]
    assert len(redone) == len(job.plan) - 20
    assert np.abs(_read(rerun) - reference_pass(rerun)).max() <= 1e-5
    assert report.amplification == 1.0

    # the same job again: nothing left to do, nothing sent
    assert enqueue_stage(Job.open(spec), queue, 1) == 0 and enqueue_stage(Job.open(spec), queue, 2) == 0


def test_a_new_model_version_is_a_new_job(make_spec):
    spec = make_spec()
    first = Job.open(spec)
    from tests.chunk_ops.conftest import save_net

    spec["model"]["kwargs"]["seed"] = 1
    spec["model"]["path"] = str(save_net(Path(spec["model"]["path"]).parent, "TinyConvNet", spec["model"]["kwargs"]))
    spec["model"]["kwargs"].pop("seed")  # same spec text, only the weights differ
    assert Job.open(spec).id != first.id


@pytest.mark.slow
def test_chaos_kills_lose_nothing(make_spec, tmp_path):
    """75 chunks, 3 workers, one SIGKILLed every ~2 s and replaced, until both stages end."""
    job = _slow_job(make_spec, delay_s=0.4, chunk=(8, 8, 4))
    assert len(job.plan) >= 64
    queue = _queue("embedded", tmp_path, max_receives=50)
    rng = random.Random(3)
    kw = dict(visibility_timeout_s=2.0, idle_exit_s=600.0)
    workers = [_spawn(queue.url, **kw) for _ in range(3)]
    kills = 0
    started = time.time()
    try:
        for stage in (1, 2):
            enqueue_stage(job, queue, stage)
            while not job.done_mask(stage).all():
                assert time.time() - started < 600, "chaos run did not finish"
                time.sleep(rng.uniform(1.5, 2.5))
                victim = rng.randrange(len(workers))
                workers[victim].kill()
                workers[victim].wait()
                kills += 1
                workers[victim] = _spawn(queue.url, **kw)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    job.remove_scratch()
    report = report_from_markers(job, time.time() - started)
    result = {"chunks": len(job.plan), "kills": kills, "redeliveries": report.redeliveries,
              "dead_letters": (queue.counts(1).dead + queue.counts(2).dead), "wall_s": round(report.wall_s, 1)}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "chaos.json").write_text(json.dumps(result, indent=2))
    print("chaos:", result)
    assert kills >= 5
    assert (queue.counts(1).dead + queue.counts(2).dead) == 0
    assert np.abs(_read(job) - reference_pass(job)).max() <= 1e-5


def test_a_model_changed_in_place_is_refused_by_a_running_job(make_spec, tmp_path):
    """Workers open the stored job by its recorded model hash and check the bytes they load."""
    from tests.chunk_ops.conftest import save_net

    spec = make_spec()
    job = Job.open(spec)
    job.prepare()
    other = save_net(tmp_path, "TinyConvNet", dict(spec["model"]["kwargs"], seed=9))
    Path(spec["model"]["path"]).write_bytes(other.read_bytes())
    stored = Job.from_spec_url(job.spec_url)
    assert stored.id == job.id  # the plan, done markers, status: no model read needed
    with pytest.raises(ValueError, match=r"changed since job .* was prepared"):
        stored.predictor


def test_transient_errors_retry_with_backoff_then_come_back_later(make_spec, tmp_path):
    """A merge that runs before its stage-1 inputs exist is not ready: retried in place with
    backoff, then put back with a delay (not dead-lettered); once stage 1 is done it succeeds."""
    job = Job.open(make_spec(chunk=(48, 48, 16)))  # one chunk
    job.prepare()
    queue = _queue("embedded", tmp_path, max_receives=5)
    enqueue_stage(job, queue, 2)
    config = WorkerConfig(queue.url, idle_exit_s=0.2, retries=2, backoff_s=0.1, max_tasks=1)
    started = time.time()
    summary = Worker(config, queue).run()
    assert summary.failed == 1 and summary.done == 0
    assert time.time() - started >= 0.1 + 0.2  # two backoffs before giving up in place
    counts = queue.counts(2)
    assert (counts.visible, counts.in_flight, counts.dead) == (0, 1, 0)  # back after a delay, not dead

    enqueue_stage(job, queue, 1)
    # stage 1, then the delayed merge (or, if it is visible again first, one more put-back)
    Worker(WorkerConfig(queue.url, idle_exit_s=2.0, retries=2, backoff_s=0.1), queue).run()
    assert job.done_mask(1).all() and job.done_mask(2).all()
    assert [r["receive_count"] for r in job.done_records(2)] in ([2], [3])
    assert queue.counts(2).dead == 0


class _TurnCounter:
    """Wraps an engine; records the most forward passes that ever ran at once."""

    def __init__(self, engine):
        import threading

        self.engine, self.name = engine, engine.name
        self.running = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, batch):
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.engine(batch)
        finally:
            with self._lock:
                self.running -= 1


def test_two_tasks_in_flight_share_one_model_and_take_turns_at_it(make_spec, tmp_path):
    job = _slow_job(make_spec, delay_s=0.05, chunk=(16, 16, 4))
    counter = _TurnCounter(job.predictor.engine)
    job.predictor.engine = counter
    queue = _queue("embedded", tmp_path)
    enqueue_stage(job, queue, 1)
    worker = Worker(WorkerConfig(queue.url, idle_exit_s=1.5, tasks_in_flight=2), queue)
    worker.jobs[job.spec_url] = job  # the worker's threads use this job, and so the counting engine

    summary = worker.run()

    assert summary.done == len(job.plan) and job.done_mask(1).all()
    assert counter.most == 1, "forward passes of two tasks ran at the same time"
    spans = sorted((r["started_at"], r["finished_at"]) for r in job.done_records(1))
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "tasks never overlapped: only one was in flight"
    enqueue_stage(job, queue, 2)
    Worker(WorkerConfig(queue.url, idle_exit_s=1.5, tasks_in_flight=2), queue).run()
    assert np.abs(_read(job) - reference_pass(job)).max() <= 1e-5


def test_sigterm_past_the_grace_period_gives_back_every_task_in_flight(make_spec, tmp_path):
    job = _slow_job(make_spec, delay_s=3.0, chunk=(16, 16, 4), batch_size=50)
    queue = _queue("embedded", tmp_path)
    enqueue_stage(job, queue, 1)
    proc = _spawn(queue.url, grace_s=1.0, visibility_timeout_s=600, extra=["--tasks-in-flight", "2"])
    _wait_until(lambda: queue.counts(1).in_flight == 2, 60, "the worker to lease two tasks")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    counts = queue.counts(1)
    assert (counts.visible, counts.in_flight) == (len(job.plan), 0), "both leases given back at once"
    assert proc.stderr.read().count('"event": "given_back"') == 2
