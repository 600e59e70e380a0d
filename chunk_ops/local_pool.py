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
from .queues.stages import StageQueues
from .stages import RunReport
from .submit import check_stage_done, default_queue_url, enqueue_stage, finish_job


def worker_command(queue_url: str, *, idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0,
                   grace_s: float = 25.0, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable, "-m", "chunk_ops.cli", "worker", "--queue", queue_url,
        "--idle-exit", str(idle_exit_s), "--visibility-timeout", str(visibility_timeout_s),
        "--grace", str(grace_s), "--pool", "local", *extra,
    ]


def run_with_workers(job: Job, workers: int, queue_url: str | None = None, *,
                     idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0) -> RunReport:
    """Prepare, then for each stage: enqueue what is not done, run the pool until idle."""
    started = time.perf_counter()
    job.prepare()
    url = queue_url or default_queue_url(job)
    queues = StageQueues(url, create=True)
    # share the cores: N processes each with every core's worth of threads thrash
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    for stage in (1, 2):
        if enqueue_stage(job, queues, stage):
            pool = [subprocess.Popen(worker_command(url, idle_exit_s=idle_exit_s,
                                                    visibility_timeout_s=visibility_timeout_s,
                                                    extra=("--spec-prefix", job.job_url + "/")), env=env)
                    for _ in range(workers)]
            for proc in pool:
                proc.wait()
        check_stage_done(job, queues, stage)
    return finish_job(job, queues, time.perf_counter() - started)
