"""A run as named steps: the one sequence behind every entry point.

    validate -> prepare -> stage 1 -> stage 2 -> finish -> segment -> pyramid -> report

``chunk-ops run`` (in this process, or with a local pool of worker processes) calls
:func:`run_job`; the Airflow DAG calls the same steps, one task per step, with its
own worker pools draining the queues in between.  So every entry point writes the
same files: output, segmentation, pyramid, report.json/.md/.html/.png.

Steps are idempotent: a chunk whose done marker exists is not done again (in this
process as in a pool), pyramid levels are rewritten with the same bytes, and the
report is rewritten from the markers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import storage
from .downsample import build_pyramid
from .engines import THREADS_ENV, local_share
from .job import Job
from .progress import Progress, event
from .queues.stages import StageQueues
from .report import neuroglancer_link, write_report
from .segment import segment_job
from .stages import RunReport, marker_record, run_stage1, run_stage2
from .submit import check_stage_done, default_queue_url, enqueue_stage, report_from_markers
from .task import Task
from .volumes import layer_folder

IN_PROCESS_POOL = "in-process"


# --- validate ------------------------------------------------------------------------
def validate(document: dict, *, queue_url: str | None = None, probe_queue: bool = True) -> Job:
    """Open the job (volumes, region, model: one forward pass) and check that its output
    and scratch locations and its queue (``queue_url``, else the job's) can be used,
    writing nothing that stays."""
    job = Job.open(document)
    job.predictor
    storage.probe_writable(layer_folder(job.spec.output_url), what="output.url")  # storage, not zarr://...
    if job.spec.scratch_url:
        storage.probe_writable(job.spec.scratch_url, what="scratch_url")
    if probe_queue:
        from .queues import probe_queue as probe

        probe(queue_url or default_queue_url(job))
    return job


@dataclass
class PlanEstimate:
    """What a job will write and take, before it runs."""

    chunks: int
    chunks_done: int
    patches: int
    output_bytes: int  # uncompressed: the layer, its pyramid and the segmentation
    scratch_bytes: int  # peak: every stage-1 partial sum (float32) before the merge
    patches_per_s: float  # this machine, one worker, measured on the job's model
    hours_here: float  # one worker like this machine

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(job: Job, *, timing_batches: int = 2) -> PlanEstimate:
    spec = job.spec
    itemsize = np.dtype(spec.output_dtype).itemsize
    pyramid = sum(4 ** -level for level in range(spec.postprocess["pyramid_levels"] + 1))
    output = job.roi.size * spec.model.out_channels * itemsize * pyramid
    if spec.segmentation["method"] != "none":
        output += job.roi.size * 4
    # partial sums are separable: their extent along an axis depends only on the chunk's span there
    extent = [0, 0, 0]
    first = job.plan[0]
    for axis in range(3):
        for lo, hi in job.plan.axis_bounds(axis):
            start, stop = first.start.to_list(), first.stop.to_list()
            start[axis], stop[axis] = lo, hi
            part = job.partial_box(type(first)(start, stop))
            extent[axis] += part.shape[axis] if part is not None else 0
    scratch = extent[0] * extent[1] * extent[2] * spec.model.out_channels * 4
    predictor = job.predictor
    batch = np.zeros((predictor.batch_size, spec.model.in_channels, *spec.model.input_patch.zyx()), np.float32)
    counted = predictor.patches_evaluated
    t0 = time.perf_counter()
    for _ in range(timing_batches):
        predictor(batch)
    rate = timing_batches * predictor.batch_size / (time.perf_counter() - t0)
    predictor.patches_evaluated = counted  # timing is not the job's work
    return PlanEstimate(len(job.plan), int(job.done_mask(2).sum()), len(job.grid), int(output), int(scratch),
                        round(rate, 2), round(len(job.grid) / rate / 3600, 3))


# --- prepare ---------------------------------------------------------------------------
def prepare(job: Job) -> None:
    """Create the output layer (if new) and store the spec; nothing before this writes."""
    job.prepare()


# --- stages ----------------------------------------------------------------------------
def run_stage_here(job: Job, stage: int, order: list[int] | None = None) -> None:
    """One stage in this process, chunk by chunk, skipping chunks already done."""
    done = job.done_mask(stage)
    indices = range(len(job.plan)) if order is None else order
    todo = [i for i in indices if not done[i]]
    work = run_stage1 if stage == 1 else run_stage2
    with Progress(len(job.plan), f"stage {stage}", initial=len(job.plan) - len(todo)) as bar:
        for i in todo:
            started = time.time()
            stats, extra = work(job, job.plan[i])
            job.mark_done(stage, job.plan[i], marker_record(
                job, stage, stats, extra, started=started, pool=IN_PROCESS_POOL, receive_count=1))
            bar.update()


def worker_command(queue_url: str, *, idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0,
                   grace_s: float = 25.0, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        sys.executable, "-m", "chunk_ops.cli", "worker", "--queue", queue_url,
        "--idle-exit", str(idle_exit_s), "--visibility-timeout", str(visibility_timeout_s),
        "--grace", str(grace_s), "--pool", "local", *extra,
    ]


def enqueue(job: Job, queues: StageQueues, stage: int) -> int:
    """Send the stage's chunks not done yet to its queue, with progress; returns how many."""
    with Progress(len(job.plan), f"enqueue stage {stage}", unit="tasks") as bar:
        return enqueue_stage(job, queues, stage, on_each=bar.update)


def _ready_merges(job: Job, done1: np.ndarray, done2: np.ndarray, start: int) -> tuple[list, int]:
    """The merges from plan index ``start`` on whose contributors have all finished stage 1,
    in plan order up to the first that is not ready (workers go in plan order too); returns
    those not done yet and the index to go on from."""
    ready, i = [], start
    while i < len(job.plan):
        box = job.plan[i]
        if not all(done1[job.plan.index_of(c)] for c in job.contributors(box)):
            break
        if not done2[i]:
            ready.append(box)
        i += 1
    return ready, i


def run_with_pool(job: Job, queues: StageQueues, workers: int, *,
                  idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0) -> None:
    """Both stages with one pool of ``workers`` worker processes, each serving both: the
    chunks not done yet go to stage 1, and each merge is sent as soon as its chunk and lower
    neighbours have finished stage 1, so merges run alongside the network and the workers
    never stop and start between the stages.  Returns when the pool has gone idle."""
    enqueue(job, queues, 1)
    done2 = job.done_mask(2)
    if done2.all():  # a rerun of a finished job: nothing for a pool to do
        return
    # share the cores: N processes each with every core's worth of threads thrash
    threads = str(local_share(workers))
    env = {**os.environ, THREADS_ENV: threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = worker_command(queues.url, idle_exit_s=idle_exit_s, visibility_timeout_s=visibility_timeout_s,
                             extra=("--spec-prefix", job.job_url + "/"))
    merges_from = 0
    pool = [subprocess.Popen(command, env=env) for _ in range(workers)]
    with Progress(2 * len(job.plan), "stage 1 and merges") as bar:
        while True:
            running = any(proc.poll() is None for proc in pool)
            done1 = job.done_mask(1)
            ready, merges_from = _ready_merges(job, done1, done2, merges_from)
            if ready:
                queues.of(2).send_batch(Task(job.id, job.spec_url, 2, box).to_json() for box in ready)
            merged = int(job.done_mask(2).sum())
            bar.set(int(done1.sum()) + merged)
            if running and merged == len(job.plan):  # all done: stop now rather than wait out the idle exit
                for proc in pool:
                    proc.terminate()
                for proc in pool:
                    proc.wait()
                return
            if not running:
                # the queues decide, not this poll: merges sent as the last worker idled out, or a
                # task given back with a delay, still need workers (dead letters end it: bounded)
                if not ready and queues.counts(1).pending + queues.counts(2).pending == 0:
                    return
                pool = [subprocess.Popen(command, env=env) for _ in range(workers)]
            time.sleep(0.5)


# --- after the merge --------------------------------------------------------------------
def finish(job: Job, queues: StageQueues | None = None, wall_s: float | None = None) -> RunReport:
    """Verify every chunk of both stages, remove the scratch and what killed writers left."""
    records = {stage: check_stage_done(job, queues, stage) for stage in (1, 2)}  # every marker read once
    job.remove_scratch()
    for url in (job.spec.output_url, job.job_url):
        folder = storage.local_path(url)
        if folder is not None and folder.is_dir():
            storage.sweep_temporaries(folder)
    report = report_from_markers(job, wall_s, records)
    if queues is not None:
        report.dead_letters = queues.counts(1).dead + queues.counts(2).dead
    return report


def segment(job: Job) -> dict:
    """``postprocess.segmentation`` of the finished output ({} when its method is none)."""
    if job.spec.segmentation["method"] != "none":
        event(f"segmenting {job.roi.size} voxels ({job.spec.segmentation['method']})")
    return segment_job(job)


def pyramid(job: Job) -> list[int]:
    """``postprocess.pyramid_levels`` downsampled mips of the output; chunks written per level."""
    levels = job.spec.postprocess["pyramid_levels"]
    with Progress(levels, "pyramid", unit="levels") as bar:
        return build_pyramid(job.spec.output_url, levels, on_level=lambda _: bar.update())


def report(job: Job, summary: RunReport | dict, *, segmentation: dict, pyramid_chunks: list[int]) -> RunReport:
    """The finish step's summary with the segment and pyramid steps' results, written as
    report.json, .md, .html and .png next to the output; the summary gets their URLs."""
    if isinstance(summary, dict):  # from an XCom
        summary = RunReport.from_dict(summary)
    summary.segmentation, summary.pyramid_chunks = segmentation, pyramid_chunks
    summary.reports = write_report(job, summary.to_dict())
    summary.neuroglancer = neuroglancer_link(job)
    job.write_report(summary.to_dict())
    return summary


def complete(job: Job, queues: StageQueues | None = None, wall_s: float | None = None) -> RunReport:
    """The steps after the merge, in order: finish, segment, pyramid, report."""
    summary = finish(job, queues, wall_s)
    return report(job, summary, segmentation=segment(job), pyramid_chunks=pyramid(job))


# --- the whole run ---------------------------------------------------------------------------
def run_job(job: Job, *, workers: int = 0, queue_url: str | None = None, order: list[int] | None = None,
            idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0) -> RunReport:
    """Every step after validate, on this machine: in this process (``workers`` 0) or with a
    local pool on the job's queue.  Returns the report, as written to report.json."""
    started = time.perf_counter()
    prepare(job)
    queues = None
    if workers:
        queues = StageQueues(queue_url or default_queue_url(job), create=True)
    if queues is None:
        for stage in (1, 2):
            run_stage_here(job, stage, order)
    else:
        run_with_pool(job, queues, workers, idle_exit_s=idle_exit_s, visibility_timeout_s=visibility_timeout_s)
    return complete(job, queues, time.perf_counter() - started)
