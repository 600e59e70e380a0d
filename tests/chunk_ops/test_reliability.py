"""Adversarial runs: each defect of issue 10, forced, then the output compared with the reference.

Races are forced, not hoped for: a worker process stops itself at a chosen point of its
write path (``tests/chunk_ops/write_hooks.py``) and the test resumes or kills it; a hung
read is a FIFO in place of an input block; a full disk is a tiny tmpfs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from chunk_ops import storage
from chunk_ops.cli import main as cli
from chunk_ops.downsample import build_pyramid
from chunk_ops.job import Job
from chunk_ops.queues import LeaseLost
from chunk_ops.queues.stages import StageQueues
from chunk_ops.spec import SpecError, parse_spec
from chunk_ops.pipeline import run_job
from chunk_ops.stages import reference_pass
from chunk_ops.pipeline import finish
from chunk_ops.submit import enqueue_stage, job_status
from chunk_ops.task import Task, TaskError
from chunk_ops.volumes import open_volume
from chunk_ops.worker import EXIT_DEADLINE, Worker, WorkerConfig
from tests.chunk_ops.conftest import NETS_FILE, save_net
from tests.chunk_ops.test_worker import _wait_until

REPO = Path(__file__).parents[2]


# --- helpers --------------------------------------------------------------------------
def _queues(tmp_path: Path, max_receives: int = 3) -> StageQueues:
    return StageQueues(f"file://{tmp_path}/{uuid.uuid4().hex[:8]}.sqlite", create=True, max_receives=max_receives)


def _drain(queues: StageQueues, stages=(1, 2), **kw):
    config = dict(idle_exit_s=0.5, visibility_timeout_s=30.0, retries=0, backoff_s=0.1)
    config.update(kw)
    return Worker(WorkerConfig(queues.url, stages=tuple(stages), **config), queues).run()


def _send(queues: StageQueues, job: Job, stage: int, boxes) -> None:
    queues.of(stage).send_batch([Task(job.id, job.spec_url, stage, b).to_json() for b in boxes])


def _prepared(spec: dict) -> Job:
    job = Job.open(spec)
    job.prepare()
    return job


def _hooked_worker(queue_url: str, hooks: dict, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.chunk_ops.write_hooks", "worker", "--queue", queue_url,
               "--pool", "hooked", "--idle-exit", "1", *args]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **hooks},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_stopped(proc: subprocess.Popen, what: str) -> None:
    _wait_until(lambda: proc.poll() is not None or _state(proc.pid) == "T", 90, what)
    assert proc.poll() is None, f"{what}: the worker exited instead: {proc.stderr.read()[-3000:]}"


def _output(job: Job) -> np.ndarray:
    return open_volume(job.spec.output_url, 0).read(job.roi)


def _assert_equals_reference(job: Job) -> None:
    assert np.abs(_output(job) - reference_pass(job)).max() <= 1e-5


def _folder(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _leftovers(url: str) -> list[Path]:
    return [p for p in _folder(url).rglob("*") if p.is_file() and storage.TEMPORARY.search(p.name)]


def _files(url: str) -> dict[str, bytes]:
    root = _folder(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 1. a worker that lost its lease writes nothing --------------------------------------
def test_a_worker_frozen_past_its_lease_writes_nothing_into_a_newer_job(make_spec, tmp_path):
    spec = make_spec(chunk=(16, 16, 4))
    old = _prepared(spec)
    queues = _queues(tmp_path)
    enqueue_stage(old, queues, 1)
    _drain(queues, stages=(1,))
    chunk = old.plan[4]
    _send(queues, old, 2, [chunk])
    stale = _hooked_worker(queues.url, {"HOOK_STOP_BEFORE_MERGE_WRITE": "1"},
                           "--visibility-timeout", "2", "--max-tasks", "1")
    try:
        _wait_stopped(stale, "the merge to stop before its write")
        time.sleep(3)  # past its 2 s lease: the task is someone else's now
        _send(queues, old, 2, [b for b in old.plan if b != chunk])
        _drain(queues, stages=(2,))  # redoes the frozen worker's chunk too
        finish(old, queues)

        # a reprocess of the same output layer: new weights, a new job, run to the end
        spec["model"]["path"] = str(save_net(tmp_path, "TinyConvNet", dict(spec["model"]["kwargs"], seed=4)))
        new = Job.open(spec)
        assert new.id != old.id
        run_job(new)
        _assert_equals_reference(new)

        stale.send_signal(signal.SIGCONT)  # the frozen worker wakes up with the old job's merge in hand
        assert stale.wait(60) == 0
    finally:
        stale.kill()
    log = stale.stderr.read()
    assert '"event": "abandoned"' in log, log[-3000:]
    _assert_equals_reference(new)


# --- 2. a writer killed mid-write leaves no torn block ------------------------------------
def test_a_duplicate_writer_killed_mid_write_leaves_every_block_whole(make_spec, tmp_path):
    LEASE_S = 8  # the duplicate's lease must outlive the other worker's merges (slower on a busy machine)
    job = _prepared(make_spec(chunk=(16, 16, 4)))
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    _drain(queues, stages=(1,))
    chunk = job.plan[4]
    scale_dir = _folder(job.spec.output_url) / open_volume(job.spec.output_url, 0)._cv.key
    _send(queues, job, 2, [chunk])
    duplicate = _hooked_worker(
        queues.url, {"HOOK_STOP_BEFORE_MERGE_WRITE": "1", "HOOK_STOP_IN_WRITE": str(scale_dir)},
        "--visibility-timeout", str(LEASE_S), "--max-tasks", "1")
    try:
        _wait_stopped(duplicate, "the duplicate merge to stop before its write")
        _send(queues, job, 2, job.plan)  # the other copy of that merge, and every other merge
        _drain(queues, stages=(2,), visibility_timeout_s=60.0)
        assert job.is_done(2, chunk)
        duplicate.send_signal(signal.SIGCONT)  # it still holds its own lease: it writes...
        _wait_stopped(duplicate, "the duplicate to stop inside its block write")
    finally:
        duplicate.kill()  # ...and is killed in the middle of it
        duplicate.wait()
    time.sleep(LEASE_S + 0.5)  # its lease runs out; the redelivery finds the chunk done
    summary = _drain(queues, stages=(2,))
    assert summary.skipped == 1
    finish(job, queues)
    assert all(p.stat().st_size > 0 for p in scale_dir.iterdir()), "a torn (empty) block"
    _assert_equals_reference(job)
    assert _leftovers(job.spec.output_url) == []


# --- 3. scratch belongs to its job; input, output and scratch are separate ----------------
def test_jobs_sharing_a_scratch_url_keep_to_their_own_partial_sums(make_spec, tmp_path):
    scratch = tmp_path / "shared-scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("someone else's file")
    specs = [make_spec(chunk=(16, 16, 4), output=f"out{i}") for i in range(2)]
    specs[1]["model"]["path"] = str(save_net(tmp_path, "TinyConvNet", dict(specs[1]["model"]["kwargs"], seed=3)))
    jobs = []
    for spec in specs:
        spec["scratch_url"] = f"file://{scratch}"
        jobs.append(_prepared(spec))
    queues = _queues(tmp_path)
    for job in jobs:  # both jobs' stage 1 before either merges: their partial sums coexist
        enqueue_stage(job, queues, 1)
    _drain(queues, stages=(1,))
    enqueue_stage(jobs[0], queues, 2)
    _drain(queues, stages=(2,))
    finish(jobs[0], queues)  # removes the first job's partial sums only
    enqueue_stage(jobs[1], queues, 2)
    summary = _drain(queues, stages=(2,))
    assert summary.failed == 0
    finish(jobs[1], queues)
    for job in jobs:
        _assert_equals_reference(job)
    assert [p.name for p in scratch.rglob("*") if p.is_file()] == ["keep.txt"]
    assert sorted(p.name for p in scratch.rglob("*") if p.is_dir()) == sorted(
        job.id for job in jobs if (scratch / job.id).is_dir())  # no per-chunk piece folders left


@pytest.mark.parametrize("case", ["output is the input", "scratch is the input", "scratch is the output",
                                  "scratch inside the input", "output inside the input"])
def test_input_output_and_scratch_must_be_separate_locations(make_spec, tmp_path, case):
    spec = make_spec()
    image = spec["input"]["url"]
    where = {"output is the input": ("output", image), "scratch is the input": ("scratch_url", image),
             "scratch is the output": ("scratch_url", spec["output"]["url"]),
             "scratch inside the input": ("scratch_url", image + "/tmp"),
             "output inside the input": ("output", image + "/derived")}[case]
    if where[0] == "output":
        spec["output"]["url"] = where[1]
    else:
        spec["scratch_url"] = where[1]
    before = _files(image)
    with pytest.raises(SpecError, match="must be separate locations"):
        parse_spec(spec)
    result = CliRunner().invoke(cli, ["run", _write_job(tmp_path, spec)])
    assert result.exit_code != 0 and "must be separate locations" in result.output
    assert _files(image) == before  # the input is untouched
    if where[0] != "output":
        assert not _folder(spec["output"]["url"]).exists()  # and no output was made


def _write_job(folder: Path, spec: dict) -> str:
    path = folder / f"job-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(spec))
    return str(path)


# --- 4. no code runs that the operator did not allow ----------------------------------------
def test_a_model_definition_outside_the_allowlist_is_refused_before_any_import(make_spec, tmp_path):
    proof = tmp_path / "pwned"
    spec = make_spec()
    spec["model"]["definition"] = "os:system"
    spec["model"]["kwargs"] = {"command": f"touch {proof}"}
    for command in ("validate", "run", "submit"):
        result = CliRunner().invoke(cli, [command, _write_job(tmp_path, spec)])
        assert result.exit_code != 0
        assert "model.definition 'os:system' is not allowed" in result.output
    assert not proof.exists()
    assert not _folder(spec["output"]["url"]).exists()


def test_a_message_naming_a_spec_written_by_someone_else_runs_nothing(make_spec, tmp_path, monkeypatch):
    """A hostile spec.json (a shell command as its network) on a queue, in a message carrying
    the hostile document's own job id, as an attacker can compute it."""
    from chunk_ops.spec import job_id

    proof = tmp_path / "pwned"
    spec = make_spec()
    job = _prepared(spec)
    hostile_dir = tmp_path / "elsewhere" / "jobs" / job.id
    hostile_dir.mkdir(parents=True)
    document = {**spec, "model": {**spec["model"], "definition": "os:system",
                                  "kwargs": {"command": f"touch {proof}"}}}
    (hostile_dir / "spec.json").write_text(json.dumps(document))
    (hostile_dir / "model.sha256").write_text(job.model_sha256)
    with monkeypatch.context() as m:  # the attacker's own computation of that id
        m.setenv("CHUNK_OPS_MODEL_ALLOWLIST", "os:system")
        hostile_id = job_id(parse_spec(document), job.model_sha256, job.roi)
    hostile = Task(hostile_id, f"file://{hostile_dir}/spec.json", 1, job.plan[0]).to_json()
    for prefixes in ((), (job.job_url + "/",)):  # refused by the allowlist; and by the spec prefix first
        queues = _queues(tmp_path, max_receives=1)
        queues.of(1).send_batch([hostile])
        summary = _drain(queues, stages=(1,), spec_prefixes=prefixes)
        assert summary.done == 0 and summary.failed == 1
        assert queues.counts(1).dead == 1 or queues.of(1).receive(1) == []
    assert not proof.exists()


# --- 5. the network's source is part of the job ---------------------------------------------
def test_an_edited_network_is_a_new_job_and_never_a_stale_export(make_spec, tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    lab.mkdir()
    source = lab / "mynets.py"
    shutil.copy(NETS_FILE, source)
    monkeypatch.setenv("CHUNK_OPS_MODEL_ALLOWLIST", f"{lab}/")

    def spec_for(output: str, engine: str) -> dict:
        spec = make_spec(chunk=(16, 16, 4), output=output)
        spec["model"]["definition"] = f"{source}:TinyConvNet"
        spec["inference"]["engine"] = engine
        return spec

    first = _prepared(spec_for("v1", "openvino"))
    run_job(first)
    v1 = _output(first)

    text = source.read_text()
    edited = text.replace("return torch.sigmoid(self.c2(torch.tanh(self.c1(x * 4 - 2))))",
                          "return torch.sigmoid(self.c2(torch.tanh(self.c1(x * 4 - 2))) + 1.5)")
    assert edited != text
    source.write_text(edited)

    stored = Job.from_spec_url(first.spec_url)  # a worker of the first job, after the edit
    with pytest.raises(ValueError, match="changed since the job was prepared"):
        stored.predictor
    assert Job.open(spec_for("v1", "openvino")).id != first.id  # same spec text, edited network: a new job
    second = Job.open(spec_for("v2", "openvino"))
    assert second.id == Job.open(spec_for("v2", "pytorch")).id  # the engine is not part of the job
    run_job(second)
    truth = reference_pass(Job.open(spec_for("v2-reference", "pytorch")))  # the edited network on PyTorch
    assert np.abs(_output(second) - truth).max() <= 1e-4
    assert np.abs(_output(second) - v1).max() > 0.05  # the edit shows: no stale ONNX export was reused


# --- 6. a hung read does not hold its chunk forever --------------------------------------------
def test_a_hung_read_passes_the_task_deadline_and_the_chunk_moves_on(make_spec, tmp_path):
    job = _prepared(make_spec(chunk=(16, 16, 4)))
    queues = _queues(tmp_path)
    _send(queues, job, 1, [job.plan[0]])
    block = next((_folder(job.spec.input_url) / open_volume(job.spec.input_url, 0)._cv.key).glob("0-16_0-16_0-4*"))
    saved = block.read_bytes()
    block.unlink()
    os.mkfifo(block)  # reading it blocks, like a stuck mount
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "chunk_ops.cli", "worker", "--queue", queues.url, "--idle-exit", "30",
             "--visibility-timeout", "2", "--task-deadline", "4"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            code = worker.wait(90)
        except subprocess.TimeoutExpired:
            worker.kill()
            raise AssertionError("the worker kept the hung task (and its lease) past its deadline")
        assert code == EXIT_DEADLINE, worker.stderr.read()[-3000:]
        assert '"event": "task_deadline"' in worker.stderr.read()
        counts = queues.counts(1)
        assert (counts.visible, counts.in_flight) == (1, 0)  # given back at once, for another worker
    finally:
        block.unlink()
        block.write_bytes(saved)  # the mount recovers
    assert _drain(queues, stages=(1,)).done == 1
    assert job.is_done(1, job.plan[0])


# --- 7. partial sums are checked before they are blended ----------------------------------------
@pytest.mark.parametrize("damage", ["corrupted but loadable", "truncated"])
def test_a_bad_partial_sum_is_redone_never_blended(make_spec, tmp_path, damage):
    job = _prepared(make_spec(chunk=(16, 16, 4)))
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    _drain(queues, stages=(1,))
    partial = _folder(job.scratch_url) / job.piece_name(job.plan[0], job.plan[0])
    if damage == "truncated":
        partial.write_bytes(partial.read_bytes()[: partial.stat().st_size // 2])
    else:
        values = np.load(partial)
        np.save(partial, values * 0.5)  # a valid .npy of the right shape, wrong values
    enqueue_stage(job, queues, 2)
    summary = _drain(queues, stages=(2,))
    assert summary.failed == 0 and queues.counts(2).dead == 0
    report = finish(job, queues)
    _assert_equals_reference(job)
    assert job.done_record(1, job.plan[0]).get("redone_by_stage2") is True
    assert report.amplification > 1.0  # the redone patches are counted, not hidden


# --- 8. a marker that cannot be written is not a marker ----------------------------------------
def test_a_full_disk_at_mark_done_neither_crashes_the_worker_nor_fakes_a_marker(make_spec, tmp_path):
    job = _prepared(make_spec(chunk=(16, 16, 4)))
    done = _folder(job.job_url) / "done" / "stage1"
    done.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(done)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        filler = done / "filler.bin"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"x" * 512)
                    f.flush()
            except OSError:
                pass
        queues = _queues(tmp_path)
        _send(queues, job, 1, job.plan[:2])
        summary = _drain(queues, stages=(1,), max_tasks=2)  # must not raise
        assert summary.done == 0 and summary.failed == 2
        assert [p.name for p in done.iterdir()] == ["filler.bin"], "an empty marker was left behind"
        assert not job.done_mask(1).any() and not job.is_done(1, job.plan[0])
        filler.unlink()  # space again
        time.sleep(0.2)
        summary = _drain(queues, stages=(1,))
        assert summary.done == 2
        assert sum(1 for p in done.iterdir()) == 2
        assert job_status(job, queues).stages[1].done == 2
    finally:
        subprocess.run(["umount", "-l", str(done)], check=False)


# --- 9. hostile bodies and stray files ------------------------------------------------------------
def test_the_embedded_queue_survives_hostile_bodies_and_stray_files(make_spec, tmp_path):
    spec = make_spec(chunk=(16, 16, 4))
    job = _prepared(spec)
    queues = _queues(tmp_path, max_receives=1)
    path = queues.url.removeprefix("file://")
    with sqlite3.connect(path) as db:  # bytes that are not UTF-8, as another program could write them
        db.execute("INSERT INTO messages (body, visible_at) VALUES (CAST(? AS TEXT), 0)", (b"\xff\xfe{bad",))
    stage_float = json.loads(Task(job.id, job.spec_url, 1, job.plan[0]).to_json())
    stage_float["stage"] = 1.0
    queues.of(1).send_batch([json.dumps(stage_float)])
    with pytest.raises(TaskError, match="stage 1.0 is not one of"):
        Task.from_json(json.dumps(stage_float))
    enqueue_stage(job, queues, 1)
    stray = _folder(job.job_url) / "done" / "stage1" / ".DS_Store"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"\x00\x01binary")

    summary = _drain(queues, stages=(1,))
    assert summary.done == len(job.plan) and summary.failed == 2
    assert queues.counts(1).dead == 2
    assert not (_folder(job.job_url) / "done" / "stage1.0").exists()

    job_file = _write_job(tmp_path, spec)
    status = CliRunner().invoke(cli, ["status", job_file, "--queue", queues.url, "--json"])
    assert status.exit_code == 0, status.output
    report = json.loads(status.stdout)
    assert report["stages"]["1"]["done"] == len(job.plan)
    assert any("\\xff" in letter for letter in report["dead_letters"])
    submit = CliRunner().invoke(cli, ["submit", job_file, "--queue", queues.url, "--json"])
    assert submit.exit_code == 0, submit.output
    assert json.loads(submit.stdout)["sent"] == 0


# --- 10. stages, heartbeats, throttling, receive limits, the pyramid --------------------------------
def test_a_gpu_worker_serving_stage_1_never_takes_a_merge(make_spec, tmp_path):
    job = _prepared(make_spec(chunk=(16, 16, 4)))
    queues = _queues(tmp_path)
    enqueue_stage(job, queues, 1)
    _drain(queues, stages=(1,), max_tasks=3)
    enqueue_stage(job, queues, 2)  # merges enqueued while stage-1 workers are still alive
    gpu = _drain(queues, stages=(1,))
    assert gpu.by_stage[2] == 0 and gpu.by_stage[1] == len(job.plan) - 3
    counts = queues.counts(2)
    assert (counts.visible, counts.in_flight) == (len(job.plan), 0)  # untouched: no receive counted
    cpu = _drain(queues, stages=(1, 2))
    assert cpu.by_stage[2] == len(job.plan)
    finish(job, queues)
    _assert_equals_reference(job)


class _SlowRelease:
    """A queue whose release takes a while, as a slow network would make it."""

    def __init__(self, queue):
        self.queue = queue

    def __getattr__(self, name):
        return getattr(self.queue, name)

    def release(self, lease):
        self.queue.release(lease)
        time.sleep(1.0)  # a running heartbeat would extend the lease meanwhile


def test_a_task_given_back_is_visible_at_once_not_hidden_by_its_heartbeat(tmp_path):
    queues = _queues(tmp_path)
    queues._queues[1] = _SlowRelease(queues.of(1))
    queues.of(1).send_batch([json.dumps({"v": 1, "job": "x", "spec": "file:///nowhere/spec.json",
                                         "stage": 1, "box": {"start": [0, 0, 0], "stop": [8, 8, 4]}})])
    worker = Worker(WorkerConfig(queues.url, stages=(1,), visibility_timeout_s=0.6, max_tasks=1), queues)
    worker.run()
    assert worker.summary.failed == 1
    counts = queues.counts(1)
    assert (counts.visible, counts.in_flight) == (1, 0)


def test_a_throttled_sqs_call_is_not_a_lost_lease(moto_sqs):
    from botocore.exceptions import ClientError

    queues = StageQueues(f"sqs://throttle-{uuid.uuid4().hex[:8]}", create=True)
    queue = queues.of(1)
    queue.send_batch(["{}"])
    lease = queue.receive(1, 30)[0]
    client = queue.client

    class Throttled:
        def __getattr__(self, name):
            return getattr(client, name)

        def change_message_visibility(self, **kw):
            raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "Rate exceeded"}},
                              "ChangeMessageVisibility")

    queue.client = Throttled()
    with pytest.raises(ClientError):
        queue.extend(lease, 30)  # retried by the heartbeat, not taken for a lost lease
    queue.client = client
    queue.extend(lease, 30)
    queue.delete(lease)
    with pytest.raises(LeaseLost):
        queue.extend(lease, 30)


@pytest.mark.parametrize("kind", ["embedded", "sqs"])
def test_max_receives_applies_to_new_queues_only(tmp_path, request, kind):
    if kind == "sqs":
        request.getfixturevalue("moto_sqs")
        url = f"sqs://limits-{uuid.uuid4().hex[:8]}"
    else:
        url = f"file://{tmp_path}/limits.sqlite"
    assert StageQueues(url, create=True, max_receives=2).max_receives == 2
    again = StageQueues(url, create=True, max_receives=9)
    assert again.max_receives == 2 and again.of(2).max_receives == 2
    assert StageQueues(url).max_receives == 2


def test_rebuilding_the_pyramid_adds_no_level_and_changes_no_byte(make_spec, tmp_path):
    job = _prepared(make_spec(chunk=(16, 16, 4)))
    run_job(job)
    url = job.spec.output_url
    build_pyramid(url, 2)
    first = _files(url)
    build_pyramid(url, 2)
    assert json.loads((_folder(url) / "info").read_text())["scales"].__len__() == 3
    assert _files(url) == first
