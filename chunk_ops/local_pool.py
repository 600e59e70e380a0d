"""A whole job on this machine: a queue and a pool of worker processes, no Airflow.

What a lab without Airflow runs (``chunk-ops run JOB --workers N``), and what the
chaos tests drive: stage 1 is enqueued and drained by the pool, then stage 2,
then the scratch is removed and the report written from the done markers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Sequence

from .job import Job
from .queues import open_queue
from .stages import ChunkStats, RunReport
from .submit import default_queue_url, enqueue_stage


def worker_command(queue_url: str, *, idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0,
                   grace_s: float = 25.0, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "chunk_ops.cli", "worker", "--queue", queue_url,
        "--idle-exit", str(idle_exit_s), "--visibility-timeout", str(visibility_timeout_s),
        "--grace", str(grace_s), *extra,
    ]


def report_from_markers(job: Job, wall_s: float) -> RunReport:
    """The run's report, from the done markers (each holds its task's timings)."""
    report = RunReport(job.id, len(job.plan), job.roi.size, 0, len(job.grid), wall_s)
    for stage, total in ((1, report.stage1), (2, report.stage2)):
        for record in job.done_records(stage):
            total.add(ChunkStats(**{k: record[k] for k in ChunkStats.__dataclass_fields__}))
            report.redeliveries += record["receive_count"] - 1
    report.patches_evaluated = report.stage1.patches
    return report


class StageFailed(RuntimeError):
    pass


def run_with_workers(job: Job, workers: int, queue_url: str | None = None, *,
                     idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0) -> RunReport:
    """Prepare, then for each stage: enqueue what is not done, run the pool until idle."""
    started = time.perf_counter()
    job.prepare()
    url = queue_url or default_queue_url(job)
    queue = open_queue(url, create=True)
    # share the cores: N processes each with every core's worth of threads thrash
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    for stage in (1, 2):
        if enqueue_stage(job, queue, stage):
            pool = [subprocess.Popen(worker_command(url, idle_exit_s=idle_exit_s,
                                                    visibility_timeout_s=visibility_timeout_s), env=env)
                    for _ in range(workers)]
            for proc in pool:
                proc.wait()
        missing = int((~job.done_mask(stage)).sum())
        if missing:
            raise StageFailed(
                f"stage {stage} of job {job.id}: {missing} of {len(job.plan)} chunks not done; "
                f"dead letters: {queue.dead_letters(3)}"
            )
    job.remove_scratch()
    report = report_from_markers(job, time.perf_counter() - started)
    job.write_report(report.to_dict())
    return report
