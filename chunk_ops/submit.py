"""Putting a job on a queue, and reading where it stands.

Enqueueing streams from the lazy plan in batches and skips, in bulk, the chunks
whose done marker exists (one listing into a bitmap, not one lookup per chunk),
so a rerun of the same job only sends what is missing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .job import Job
from .queues import QueueCounts
from .queues.stages import STAGES, StageQueues
from .stages import ChunkStats, RunReport
from .task import Task


def default_queue_url(job: Job) -> str:
    """The spec's queue; else the embedded one beside a local output, or in the cache folder."""
    if job.spec.queue_url:
        return job.spec.queue_url
    if job.job_url.startswith("file://"):  # a local output, in any format
        return f"{job.job_url}/queue.sqlite"
    return f"file://{Path.home()}/.cache/chunk_ops/queues/{job.id}.sqlite"


def stage_messages(job: Job, stage: int, skip_done: bool = True,
                   on_each: Callable[[], None] | None = None) -> Iterator[str]:
    """The stage's task messages in plan order; ``on_each`` is called per chunk, sent or skipped."""
    done = job.done_mask(stage) if skip_done else None
    for i, box in enumerate(job.plan):
        if done is None or not done[i]:
            yield Task(job.id, job.spec_url, stage, box).to_json()
        if on_each is not None:
            on_each()


def enqueue_stage(job: Job, queues: StageQueues, stage: int,
                  on_each: Callable[[], None] | None = None) -> int:
    """Send the stage's tasks that are not done yet to its queue; returns how many were sent."""
    return queues.of(stage).send_batch(stage_messages(job, stage, on_each=on_each))


@dataclass
class StageStatus:
    done: int
    total: int
    voxels_per_s: float | None
    eta_s: float | None


@dataclass
class JobStatus:
    job_id: str
    queues: dict[int, QueueCounts]  # per stage
    stages: dict[int, StageStatus]
    dead_letters: list[str]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["queues"] = {stage: {**asdict(c), "pending": c.pending} for stage, c in self.queues.items()}
        return d


def stage_status(job: Job, stage: int) -> StageStatus:
    records = job.done_records(stage)
    total = len(job.plan)
    rate = eta = None
    if records:
        first = min(r["started_at"] for r in records)
        last = max(r["finished_at"] for r in records)
        voxels = sum(r["voxels"] for r in records)
        if last > first:
            rate = voxels / (last - first)
            remaining = job.roi.size - voxels
            eta = max(0.0, remaining / rate) if len(records) < total else 0.0
    return StageStatus(len(records), total, rate, eta)


def job_status(job: Job, queues: StageQueues) -> JobStatus:
    return JobStatus(
        job_id=job.id,
        queues={stage: queues.counts(stage) for stage in STAGES},
        stages={stage: stage_status(job, stage) for stage in STAGES},
        dead_letters=queues.dead_letters(),
    )


def wait_for_stage(job: Job, queues: StageQueues, stage: int, poll_s: float = 1.0,
                   timeout_s: float | None = None) -> bool:
    """Wait until every chunk of the stage is done (True) or nothing is left to try (False)."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        if job.done_mask(stage).all():
            return True
        if queues.counts(stage).pending == 0:
            return bool(job.done_mask(stage).all())
        if deadline is not None and time.time() > deadline:
            return False
        time.sleep(poll_s)


class StageIncomplete(RuntimeError):
    """A stage ended with chunks not done (their tasks are dead-lettered or lost)."""


def check_stage_done(job: Job, queues: StageQueues | None, stage: int) -> list[dict]:
    """Verification: every chunk has a valid marker (each one read and parsed); returns them."""
    records = job.done_records(stage)
    missing = len(job.plan) - len(records)
    if missing:
        where = f"; queue {queues.counts(stage)}; dead letters: {queues.dead_letters(3)}" if queues else ""
        raise StageIncomplete(f"stage {stage} of job {job.id}: {missing} of {len(job.plan)} chunks not done{where}")
    return records


def report_from_markers(job: Job, wall_s: float | None = None,
                        records: dict[int, list[dict]] | None = None) -> RunReport:
    """The run's report, from the done markers (each holds its task's timings).

    ``wall_s`` defaults to the span from the first task's start to the last one's end;
    ``records`` are the markers per stage when the caller has read them already.
    """
    report = RunReport(job.id, len(job.plan), job.roi.size, 0, len(job.grid), 0.0)
    first, last = float("inf"), 0.0
    for stage, total in ((1, report.stage1), (2, report.stage2)):
        for record in records[stage] if records is not None else job.done_records(stage):
            total.add(ChunkStats(**{k: record[k] for k in ChunkStats.__dataclass_fields__}))
            report.redeliveries += record["receive_count"] - 1
            first, last = min(first, record["started_at"]), max(last, record["finished_at"])
            pool = report.per_pool.setdefault(record.get("pool", "default"), {"tasks": 0, "voxels": 0, "seconds": 0.0})
            pool["tasks"] += 1
            pool["voxels"] += record["voxels"]
            pool["seconds"] = round(pool["seconds"] + record["finished_at"] - record["started_at"], 3)
            if "engine" in record and record["engine"] not in pool.setdefault("engines", []):
                pool["engines"].append(record["engine"])
    report.patches_evaluated = report.stage1.patches + report.stage2.patches  # + stage-1 work redone
    report.wall_s = wall_s if wall_s is not None else max(0.0, last - first)
    return report
