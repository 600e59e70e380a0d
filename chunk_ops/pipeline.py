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

import itertools
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import numpy as np
from cloudfiles import CloudFiles

from . import storage
from .downsample import ensure_mips
from .engines import THREADS_ENV, local_share
from .geometry import ChunkPlan, Vec3
from .job import Job
from .progress import Progress, event
from .queues.stages import StageQueues
from .report import neuroglancer_link, write_report
from .segment import segment_job
from .stages import RunReport, marker_record, pyramid_children, run_task
from .submit import (StageIncomplete, StageWatch, check_output_blocks, check_stage_done, default_queue_url,
                     enqueue_stage, run_report)
from .tally import TallyWriter
from .task import PYRAMID, STAGE_NAMES, Task
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
    warnings: list[str]  # what a person should know before starting it

    def to_dict(self) -> dict:
        return asdict(self)


MANY_CHUNKS = 1_000_000  # past this, each chunk's fixed costs (messages, markers) add up: say so
REQUESTS_PER_CHUNK = 10  # queue requests: send, receive, a lease renewal per write, delete; two stages
WRITES_PER_CHUNK = 4  # a done marker and a tally rewrite per stage


def plan_warnings(job: Job) -> list[str]:
    """Warnings about a job's shape: a chunk count whose fixed per-chunk costs add up."""
    n = len(job.plan)
    if n <= MANY_CHUNKS:
        return []
    size = job.spec.chunk_size
    while len(ChunkPlan(job.roi, size, job.plan.origin)) > MANY_CHUNKS // 4 and size.x < job.roi.shape.x:
        size = Vec3(size.x * 2, size.y * 2, size.z)
    fewer = len(ChunkPlan(job.roi, size, job.plan.origin))
    return [f"{n:,} chunks: about {REQUESTS_PER_CHUNK * n / 1e6:,.0f} million queue requests and "
            f"{WRITES_PER_CHUNK * n / 1e6:,.0f} million small writes (done markers, tallies) besides the output; "
            f"chunk_size {size.to_list()} gives {fewer:,} chunks (a multiple of the storage block "
            f"{job.spec.block_size.to_list()}; partial sums grow with it)"]


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
                        round(rate, 2), round(len(job.grid) / rate / 3600, 3), plan_warnings(job))


# --- prepare ---------------------------------------------------------------------------
def prepare(job: Job) -> None:
    """Create the output layer (if new) and store the spec; nothing before this writes."""
    job.prepare()


# --- stages ----------------------------------------------------------------------------
def run_stage_here(job: Job, stage: int, order: list[int] | None = None, mip: int = 0) -> None:
    """One stage (of a pyramid: one level) in this process, task by task, skipping those done."""
    plan = job.stage_plan(stage, mip)
    done = job.done_mask(stage, mip)
    indices = range(len(plan)) if order is None else [i for i in order if i < len(plan)]
    todo = [i for i in indices if not done[i]]
    tally = TallyWriter(job.job_url, job.stage_folder(stage), f"{IN_PROCESS_POOL}:{os.getpid()}:{uuid.uuid4().hex[:6]}", IN_PROCESS_POOL)
    name = f"stage {stage} ({STAGE_NAMES[stage]}{f' mip {mip}' if mip else ''})"
    with Progress(len(plan), name, unit="tasks", initial=len(plan) - len(todo)) as bar:
        for i in todo:
            started = time.time()
            stats, extra = run_task(job, Task(job.id, job.spec_url, stage, plan[i], mip))
            record = marker_record(job, stage, stats, extra, started=started, pool=IN_PROCESS_POOL, receive_count=1)
            job.mark_done(stage, plan[i], record, mip)
            tally.count(record, plan[i].to_filename())
            bar.update()
    tally.close()


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


def _pool_starter(job: Job, queues: StageQueues, workers: int, idle_exit_s: float,
                  visibility_timeout_s: float) -> Callable[[], list[subprocess.Popen]]:
    """Starts ``workers`` worker processes on the job's queues, sharing the cores (N processes
    each with every core's worth of threads thrash)."""
    threads = str(local_share(workers))
    env = {**os.environ, THREADS_ENV: threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    command = worker_command(queues.url, idle_exit_s=idle_exit_s, visibility_timeout_s=visibility_timeout_s,
                             extra=("--spec-prefix", job.job_url + "/"))
    return lambda: [subprocess.Popen(command, env=env) for _ in range(workers)]


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
    start_pool = _pool_starter(job, queues, workers, idle_exit_s, visibility_timeout_s)
    merges_from = 0
    pool = start_pool()
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
                pool = start_pool()
            time.sleep(0.5)


# --- after the merge --------------------------------------------------------------------
def finish(job: Job, queues: StageQueues | None = None, wall_s: float | None = None) -> RunReport:
    """Verify the run (every chunk's markers of both stages, listed; every output block in
    the region, listed), remove the scratch and what killed writers left; the summary."""
    for stage in (1, 2):
        check_stage_done(job, queues, stage)
    check_output_blocks(job)
    job.remove_scratch()
    for url in (job.spec.output_url, job.job_url):
        folder = storage.local_path(url)
        if folder is not None and folder.is_dir():
            storage.sweep_temporaries(folder)
    report = run_report(job, wall_s)
    if queues is not None:
        report.dead_letters = queues.counts(1).dead + queues.counts(2).dead
    return report


# --- post-processing: blockwise segmentation (stages 3-5) and the pyramid (stage 6) -----------
# Two phases on the post queue: (1) label each chunk, stitching each as soon as it and its
# lower neighbours are labelled, and the pyramid, each block as soon as the blocks under it
# are done; then one global relabel; (2) write the relabelled chunks.

SEGMENTATION_WRITTEN = "segmentation_written.json"  # which settings wrote the segmentation layer last


def segmentation_mode(job: Job) -> str:
    """none, single (one task over the region: small regions) or blockwise."""
    options = job.spec.segmentation
    if options["method"] == "none":
        return "none"
    if options["mode"] == "auto":
        return "single" if job.roi.size <= options["max_voxels"] else "blockwise"
    return options["mode"]


def prepare_post(job: Job) -> None:
    """The pyramid's levels and the segmentation layer, before their tasks are sent."""
    ensure_mips(job.spec.output_url, job.spec.postprocess["pyramid_levels"])
    if segmentation_mode(job) == "blockwise":
        from . import segment_blocks

        segment_blocks.prepare_layer(job)
        # done markers of these settings whose labels were overwritten since (by a run with
        # other settings into the same layer) no longer describe it: those stages run again
        written = CloudFiles(job.job_url).get_json(SEGMENTATION_WRITTEN)
        if written and written["url"] == job.spec.segmentation["url"] and written["by"] != job.stage_folder(5) \
                and job.done_mask(5).any():
            event(f"segmentation layer {written['url']} was last written by {written['by']}: "
                  f"{job.stage_folder(5)} runs again")
            files = CloudFiles(job.job_url)
            for stage in (3, 4, 5):
                for prefix in (f"done/{job.stage_folder(stage)}/", f"progress/{job.stage_folder(stage)}/"):
                    files.delete(list(files.list(prefix=prefix)))


def phase_stages(job: Job, phase: int) -> list[int]:
    """The stages whose completion ends a post-processing phase (1 or 2)."""
    blockwise = segmentation_mode(job) == "blockwise"
    if phase == 1:
        return ([4] if blockwise else []) + ([PYRAMID] if job.stage_levels(PYRAMID) else [])
    return [5] if blockwise else []


def phase_tasks(job: Job, phase: int) -> Iterator[Task]:
    """A phase's tasks that are ready and not done, streamed in stage order: a fresh run's
    first tasks, and a rerun's way back in wherever the last one stopped (one listing of each
    stage's markers)."""
    blockwise = segmentation_mode(job) == "blockwise"
    new = lambda stage, box, mip=0: Task(job.id, job.spec_url, stage, box, mip)  # noqa: E731
    if phase == 2:
        if blockwise:
            yield from (new(5, job.plan[int(i)]) for i in np.flatnonzero(~job.done_mask(5)))
        return
    if blockwise:
        labelled, stitched = job.done_mask(3), job.done_mask(4)
        yield from (new(3, job.plan[int(i)]) for i in np.flatnonzero(~labelled))
        if labelled.any():
            for i in np.flatnonzero(labelled & ~stitched):
                box = job.plan[int(i)]
                if all(labelled[job.plan.index_of(n)] for _, n in job.plan.face_neighbours(box, -1)):
                    yield new(4, box)
    below = None
    for mip in job.stage_levels(PYRAMID):
        plan, done = job.stage_plan(PYRAMID, mip), job.done_mask(PYRAMID, mip)
        for i in np.flatnonzero(~done):
            box = plan[int(i)]
            if below is None or all(below[1][below[0].index_of(b)] for b in pyramid_children(below[0], box)):
                yield new(PYRAMID, box, mip)
        below = (plan, done)


def send_phase(job: Job, queues: StageQueues, phase: int) -> int:
    """Send a phase's ready tasks to the post queue, in batches as they are made; how many."""
    sent = 0
    for stage, tasks in itertools.groupby(phase_tasks(job, phase), key=lambda t: t.stage):
        sent += queues.of(stage).send_batch(t.to_json() for t in tasks)
    return sent


def relabel(job: Job) -> dict:
    """The one global step of blockwise segmentation: equivalences to final ids ({} if none)."""
    if segmentation_mode(job) != "blockwise":
        return {}
    from . import segment_blocks

    files, name = CloudFiles(job.job_url), f"{job.stage_folder(5)}.relabel.json"
    if job.done_mask(5).all() and files.exists(name):
        return files.get_json(name)  # a rerun: every chunk is written, the scratch gone
    event(f"relabelling the segments of {len(job.plan)} chunks")
    result = segment_blocks.relabel(job)
    files.put_json(name, result)
    return result


def segment(job: Job, relabelled: dict | None = None) -> dict:
    """``postprocess.segmentation``'s result ({} when its method is none): the single task over a
    small region here, or (blockwise, after phase 2) the result of the chunks' tasks."""
    mode = segmentation_mode(job)
    files = CloudFiles(job.job_url)
    if mode == "single":
        event(f"segmenting {job.roi.size} voxels in one task ({job.spec.segmentation['method']})")
        result = segment_job(job)
        files.put_json(SEGMENTATION_WRITTEN, {"url": job.spec.segmentation["url"], "by": "single task"})
        return result
    if mode == "blockwise":
        from . import segment_blocks

        for stage in (3, 4, 5):
            check_stage_done(job, None, stage)
        result = segment_blocks.segmentation_result(job, relabelled or {})
        segment_blocks.remove_scratch(job)
        files.put_json("segmentation.json", result)
        files.put_json(SEGMENTATION_WRITTEN, {"url": job.spec.segmentation["url"], "by": job.stage_folder(5)})
        return result
    return {}


def pyramid(job: Job) -> list[int]:
    """The pyramid's blocks per level, every one verified done."""
    check_stage_done(job, None, PYRAMID)
    return [len(job.stage_plan(PYRAMID, mip)) for mip in job.stage_levels(PYRAMID)]


def post_here(job: Job, order: list[int] | None = None) -> tuple[dict, list[int]]:
    """Post-processing in this process: the same tasks, stage by stage."""
    prepare_post(job)
    blockwise = segmentation_mode(job) == "blockwise"
    for stage in (3, 4) if blockwise else ():
        run_stage_here(job, stage, order)
    for mip in job.stage_levels(PYRAMID):
        run_stage_here(job, PYRAMID, order, mip)
    relabelled = relabel(job)
    if blockwise:
        run_stage_here(job, 5, order)
    return segment(job, relabelled), pyramid(job)


def post_with_pool(job: Job, queues: StageQueues, workers: int, **pool_options) -> tuple[dict, list[int]]:
    """Post-processing with a local pool on the job's post queue, phase by phase."""
    prepare_post(job)
    relabelled: dict = {}
    for phase in (1, 2):
        if send_phase(job, queues, phase):
            drain_with_pool(job, queues, workers, phase_stages(job, phase), **pool_options)
        if phase == 1:
            relabelled = relabel(job)
    return segment(job, relabelled), pyramid(job)


def drain_with_pool(job: Job, queues: StageQueues, workers: int, stages: list[int], *,
                    idle_exit_s: float = 3.0, visibility_timeout_s: float = 60.0) -> None:
    """Run a pool of ``workers`` processes until every task of ``stages`` is done; raises
    :class:`StageIncomplete` if one stalls (its queue drained with tasks not done)."""
    start_pool = _pool_starter(job, queues, workers, idle_exit_s, visibility_timeout_s)
    watches = [StageWatch(job, stage, lambda stage=stage: queues.counts(stage)) for stage in stages]
    total = sum(w.total for w in watches)
    pool = start_pool()
    try:
        with Progress(total, " and ".join(STAGE_NAMES[s] for s in stages), unit="tasks") as bar:
            while True:
                polls = [w.poll() for w in watches]
                bar.set(sum(p.done for p in polls))
                if all(p.state == "done" for p in polls):
                    return
                stalled = [p for p in polls if p.state == "stalled"]
                if stalled:
                    raise StageIncomplete(f"stage {stalled[0].stage} of job {job.id} stalled: {stalled[0].to_dict()}; "
                                          f"dead letters: {queues.dead_letters(3)}")
                if not any(proc.poll() is None for proc in pool):
                    pool = start_pool()
                time.sleep(0.5)
    finally:
        for proc in pool:
            proc.terminate()
        for proc in pool:
            proc.wait()


def report(job: Job, summary: RunReport | dict, *, segmentation: dict, pyramid_chunks: list[int]) -> RunReport:
    """The finish step's summary with the segment and pyramid steps' results, written as
    report.json, .md, .html and .png next to the output; the summary gets their URLs."""
    if isinstance(summary, dict):  # from an XCom
        summary = RunReport.from_dict(summary)
    summary.segmentation, summary.pyramid_chunks = segmentation, pyramid_chunks
    summary.reports = write_report(job, summary.to_dict(), verified=True)  # after finish: every chunk merged
    summary.neuroglancer = neuroglancer_link(job)
    job.write_report(summary.to_dict())
    return summary


def complete(job: Job, queues: StageQueues | None = None, wall_s: float | None = None,
             workers: int = 0) -> RunReport:
    """The steps after the merge, in order: finish, post-processing (here, or with a local
    pool of ``workers`` on ``queues``), report."""
    summary = finish(job, queues, wall_s)
    if workers and queues is not None:
        segmentation, levels = post_with_pool(job, queues, workers)
    else:
        segmentation, levels = post_here(job)
    return report(job, summary, segmentation=segmentation, pyramid_chunks=levels)


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
    summary = finish(job, queues, time.perf_counter() - started)
    if queues is None:
        segmentation, levels = post_here(job, order)
    else:
        segmentation, levels = post_with_pool(job, queues, workers, idle_exit_s=idle_exit_s,
                                              visibility_timeout_s=visibility_timeout_s)
    summary.wall_s = time.perf_counter() - started
    return report(job, summary, segmentation=segmentation, pyramid_chunks=levels)
