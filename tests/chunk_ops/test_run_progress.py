"""What the progress view reads (chunk_ops.run_progress), with real workers and the embedded queue."""

from __future__ import annotations

from pathlib import Path

import pytest

from chunk_ops import run_progress
from chunk_ops.job import Job
from chunk_ops.queues.stages import StageQueues
from chunk_ops.run_progress import RunProgress
from chunk_ops.submit import enqueue_stage
from chunk_ops.worker import Worker, WorkerConfig

MISSING = "32-40_0-16_8-12"  # an input block of the sample layer (16 x 16 x 4 blocks on 40 x 36 x 12)


@pytest.fixture(autouse=True)
def every_look_fresh(monkeypatch):
    monkeypatch.setattr(run_progress, "FRESH_S", 0.0)  # the view's short cache would hide the steps here


def test_stages_map_and_dead_letters_with_their_errors_then_a_redrive(make_spec, tmp_path):
    spec = make_spec()
    job = Job.open(spec)
    job.prepare()
    queues = StageQueues(f"file://{tmp_path}/queue.sqlite", create=True, max_receives=1)
    progress = RunProgress(job, queues, [1, 2])

    before = progress.look()
    stage1 = before["stages"][0]
    assert (stage1["state"], stage1["done"], stage1["total"]) == ("not started", 0, 27)
    assert before["map"]["stage"] == 1 and {c["state"] for c in before["map"]["cells"]} == {"not done"}

    (block,) = Path(spec["input"]["url"].removeprefix("file://")).glob(f"*/{MISSING}*")
    hidden = block.with_name("hidden-" + block.name)
    block.rename(hidden)
    enqueue_stage(job, queues, 1)
    assert progress.look()["queues"][0] == {"queue": "network", "stages": [1], "waiting": 27, "leased": 0, "dead": 0}
    Worker(WorkerConfig(queues.url, idle_exit_s=1), queues).run()

    look = progress.look(z=2)
    stage1 = look["stages"][0]
    dead = look["dead_letters"]
    assert dead and look["dead_total"] == len(dead) and stage1["done"] == 27 - len(dead)
    assert stage1["eta_s"] is None and stage1["chunks_per_s"] > 0 and stage1["workers"] == 1
    for letter in dead:  # each with the error that killed it, naming the missing block
        assert letter["stage"] == 1 and MISSING in letter["error"] and letter["receive_count"] == 1
    cells = {c["chunk"]: c["state"] for c in look["map"]["cells"]}
    assert look["map"]["z_index"] == 2 and len(cells) == 9
    assert {chunk for chunk, state in cells.items() if state == "dead"} == \
        {d["chunk"] for d in dead if d["chunk"].endswith("8-12")}
    assert job.failure(1, job.plan[0]) is None  # a chunk that never failed has no record

    hidden.rename(block)  # the fix, then the redrive
    assert queues.redrive(lambda body: job.id in body) == {1: len(dead), 2: 0, 3: 0}
    assert progress.look()["queues"][0]["waiting"] == len(dead)
    Worker(WorkerConfig(queues.url, idle_exit_s=1), queues).run()
    after = progress.look(z=2, map_stage=1)
    assert progress.look()["map"]["stage"] == 2  # by itself the map moves on to the next stage
    assert after["stages"][0]["done"] == 27 and after["dead_total"] == 0 and after["dead_letters"] == []
    assert {c["state"] for c in after["map"]["cells"]} == {"done"}


def test_the_map_follows_the_work_and_remembers_done_cells(make_spec, tmp_path, monkeypatch):
    spec = make_spec()
    job = Job.open(spec)
    job.prepare()
    queues = StageQueues(f"file://{tmp_path}/queue.sqlite", create=True)
    progress = RunProgress(job, queues, [1, 2])
    enqueue_stage(job, queues, 1)
    Worker(WorkerConfig(queues.url, idle_exit_s=1, max_tasks=12), queues).run()  # rows 1 and part of 2
    look = progress.look()
    assert look["map"]["z_index"] == 1  # where the last finished chunk lies
    assert [c["state"] for c in look["map"]["cells"]].count("done") == 3

    reads = []
    monkeypatch.setattr(Job, "is_done", lambda self, *a, **k: reads.append(a) or False)
    progress.look()
    assert len(reads) == 6  # the 3 cells seen done are not read again


def test_a_look_reads_a_bounded_number_of_markers_in_turn(make_spec, tmp_path, monkeypatch):
    spec = make_spec(shape=(160, 160, 4), chunk=(8, 8, 4))  # 400 chunks in one z row
    job = Job.open(spec)
    job.prepare()
    queues = StageQueues(f"file://{tmp_path}/queue.sqlite", create=True)
    progress = RunProgress(job, queues, [1, 2])
    reads = []
    monkeypatch.setattr(Job, "is_done", lambda self, stage, box, mip=0: reads.append(box.to_filename()) or False)
    progress.look()
    first = list(reads)
    reads.clear()
    progress.look()
    assert len(first) == len(reads) == run_progress.MAP_READS
    assert len(set(first) | set(reads)) == 400  # the second look goes on where the first stopped
