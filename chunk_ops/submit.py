"""Putting a job on a queue, and reading where it stands.

Enqueueing streams from the lazy plan in batches and skips, in bulk, the chunks
whose done marker exists (one listing into a bitmap, not one lookup per chunk),
so a rerun of the same job only sends what is missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .geometry import Box, ChunkPlan
from .job import Job
from .queues import QueueCounts
from .queues.stages import STAGES, StageQueues
from .stages import ChunkStats, RunReport
from .tally import StageTally, read_stage_tally
from .task import Task

log = logging.getLogger(__name__)


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
    chunks_per_s: float | None  # over the stage's wall time so far, all workers together
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


def stage_status(job: Job, stage: int, tally: StageTally | None = None) -> StageStatus:
    """Where a stage stands, from the workers' tallies (no marker listing); ``tally``: read already."""
    tally = tally or read_stage_tally(job.job_url, job.stage_folder(stage))
    total = job.stage_total(stage)
    chunks_per_s = voxels_per_s = eta = None
    first = min((t.started_at for t in tally.tallies), default=0.0)
    last = max((t.finished_at for t in tally.tallies), default=0.0)
    if tally.tasks and last > first:
        chunks_per_s, voxels_per_s = tally.tasks / (last - first), tally.voxels / (last - first)
        eta = max(0.0, (total - tally.tasks) / chunks_per_s)
    return StageStatus(min(tally.tasks, total), total, chunks_per_s, voxels_per_s, eta)


def job_status(job: Job, queues: StageQueues) -> JobStatus:
    return JobStatus(
        job_id=job.id,
        queues={stage: queues.counts(stage) for stage in STAGES},
        stages={stage: stage_status(job, stage) for stage in STAGES},
        dead_letters=queues.dead_letters(),
    )


@dataclass
class StagePoll:
    """One look at a stage: ``state`` is running, done or stalled (the queue drained with
    tasks not done: dead-lettered or never sent)."""

    stage: int
    state: str
    done: int
    total: int
    visible: int
    in_flight: int
    dead: int
    files_read: int  # tallies read by this poll (plus one listing of their folder)
    listed: bool  # this poll listed the stage's done markers

    def to_dict(self) -> dict:
        return asdict(self)


class StageWatch:
    """Decides, poll by poll, whether a stage is done, still running, or stalled.

    A poll reads the workers' tallies (:mod:`.tally`), not the done markers, so it costs
    the same at a hundred chunks as at ten million.  The markers decide only when the
    tallies reach the stage's total (one listing; chunks still missing are then looked up
    on their own, or listed again when there are many), and before a stage is called
    stalled: the queue must read empty on every poll for ``stall_after_s`` (two polls at
    least) with no progress.  SQS's counts are approximate and may read 0 for a while
    (AWS says up to about a minute) with tasks visible or leased; that never fails a stage.
    """

    RECHECK_ONE_BY_ONE = 1000  # more missing chunks than this: list again rather than one read each

    def __init__(self, job: Job, stage: int, counts: Callable[[], QueueCounts], *, compact: bool = True,
                 stall_after_s: float = 60.0):
        self.job, self.stage, self.counts, self.compact = job, stage, counts, compact
        self.stall_after_s = stall_after_s
        self.total = job.stage_total(stage)
        self.missing: dict[int, np.ndarray] | None = None  # plan indices by mip, once the markers were listed
        self._drained: tuple[float, int, int] | None = None  # since when the queue reads empty, tally, polls

    def _list_missing(self) -> dict[int, np.ndarray]:
        return {mip: np.flatnonzero(~self.job.done_mask(self.stage, mip)) for mip in self.job.stage_levels(self.stage)}

    def missing_boxes(self, limit: int | None = None) -> list[tuple[int, Box]]:
        """(mip, box) of missing tasks, up to ``limit`` (after a listing)."""
        out = []
        for mip, indices in (self.missing or {}).items():
            plan = self.job.stage_plan(self.stage, mip)
            out += [(mip, plan[int(i)]) for i in indices[: None if limit is None else limit - len(out)]]
        return out

    def _count_missing(self) -> int:
        return sum(len(v) for v in self.missing.values()) if self.missing is not None else -1

    def _recheck(self) -> None:
        if self._count_missing() > self.RECHECK_ONE_BY_ONE:
            self.missing = self._list_missing()
            return
        self.missing = {mip: np.array([i for i in indices if not self.job.is_done(
            self.stage, self.job.stage_plan(self.stage, mip)[int(i)], mip)], dtype=np.int64)
            for mip, indices in self.missing.items()}

    def poll(self, tally: StageTally | None = None) -> StagePoll:
        """``tally``: the stage's tallies, read already by a caller that shows them too."""
        tally = tally or read_stage_tally(self.job.job_url, self.job.stage_folder(self.stage), compact=self.compact)
        counts = self.counts()
        listed = False
        if self.missing is None and tally.tasks >= self.total:
            self.missing, listed = self._list_missing(), True
        elif self._count_missing() > 0:
            listed = self._count_missing() > self.RECHECK_ONE_BY_ONE
            self._recheck()
        now = time.monotonic()
        drained = counts.visible == 0 and counts.in_flight == 0
        if not drained or self._drained is None or self._drained[1] != tally.tasks:
            self._drained = (now, tally.tasks, 1) if drained else None
        else:
            self._drained = (self._drained[0], tally.tasks, self._drained[2] + 1)
        quiet = self._drained is not None and self._drained[2] >= 2 and now - self._drained[0] >= self.stall_after_s
        if quiet and self.missing is None:
            self.missing, listed = self._list_missing(), True  # empty for long, no progress: the markers decide
        if self._count_missing() == 0:
            state = "done"
        elif quiet:
            state = "stalled"
        else:
            state = "running"
        done = self.total - self._count_missing() if self.missing is not None else min(tally.tasks, self.total)
        return StagePoll(self.stage, state, done, self.total, counts.visible, counts.in_flight, counts.dead,
                         tally.files_read, listed)


def wait_for_stage(job: Job, queues: StageQueues, stage: int, poll_s: float = 1.0,
                   timeout_s: float | None = None) -> bool:
    """Wait until every task of the stage is done (True) or it stalled or timed out (False)."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    watch = StageWatch(job, stage, lambda: queues.counts(stage))
    while True:
        state = watch.poll().state
        if state != "running":
            return state == "done"
        if deadline is not None and time.time() > deadline:
            return False
        time.sleep(poll_s)


class StageIncomplete(RuntimeError):
    """A stage ended with chunks not done (their tasks are dead-lettered or lost)."""


def check_stage_done(job: Job, queues: StageQueues | None, stage: int) -> None:
    """Verification: every task of the stage has its done marker (one listing, names only)."""
    watch = StageWatch(job, stage, lambda: QueueCounts(0, 0, 0))
    watch.missing = watch._list_missing()
    if watch._count_missing():
        where = f"; queue {queues.counts(stage)}; dead letters: {queues.dead_letters(3)}" if queues else ""
        first = ", ".join(box.to_filename() for _, box in watch.missing_boxes(3))
        raise StageIncomplete(f"stage {stage} of job {job.id}: {watch._count_missing()} of {job.stage_total(stage)} "
                              f"tasks not done (first: {first}){where}")


LIST_BLOCKS_UP_TO = 1_000_000  # about 1,000 LIST requests on an object store


def check_output_blocks(job: Job) -> int:
    """Verification: every storage block of the output inside the region is stored.

    Up to ``LIST_BLOCKS_UP_TO`` blocks the layer is listed (a block deleted after its merge
    is found too).  Above that, listing costs hours (640 million blocks at ten million
    chunks), so the proof is the merges': each checked its own blocks right after writing
    them and counted them in its tally, and the counts must add up to the region's blocks;
    if they do not (a tally lost or doubled, a job begun before tallies), the layer is
    listed after all.  Listing goes a column of blocks at a time, so memory stays at one
    column.  Returns the blocks in the region, 0 where the format cannot name its blocks."""
    output = job.output
    blocks = ChunkPlan(job.roi, output.block_size, output.bounds.start)
    if output.block_names(blocks[0]) is None:
        log.info("output %s: its format does not name blocks; verified by the markers only", job.spec.output_url)
        return 0
    if len(blocks) > LIST_BLOCKS_UP_TO:
        tallied = sum(t.blocks for t in read_stage_tally(job.job_url, job.stage_folder(2)).tallies)
        if tallied == len(blocks):
            return tallied
        log.info("output %s: merges counted %d of %d blocks; listing them", job.spec.output_url, tallied, len(blocks))
    missing, first = 0, []
    for x0, x1 in blocks.axis_bounds(0):
        column = Box((x0, job.roi.start.y, job.roi.start.z), (x1, job.roi.stop.y, job.roi.stop.z))
        stored = output.stored_block_names(f"{x0}-{x1}_")
        absent = [name for name in output.block_names(column) if name not in stored]
        missing += len(absent)
        first += absent[: 3 - len(first)]
    if missing:
        raise StageIncomplete(f"output {job.spec.output_url}: {missing} of {len(blocks)} storage blocks in the region "
                              f"are missing although every merge is marked done (first: {', '.join(first)}); the "
                              f"layer was changed after the merge: rerun the job after removing the done/stage2 "
                              f"markers of those chunks")
    return len(blocks)


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


MARKERS_FOR_REPORT_UP_TO = 100_000  # chunks; beyond, reading every marker for a report costs too much


def run_report(job: Job, wall_s: float | None = None) -> RunReport:
    """The run's report from the workers' tallies (a file per worker).

    When the tallies do not count every chunk exactly (a worker killed between its marker
    and its tally, a chunk finished twice when a lease expired, a job begun before tallies),
    the done markers are read one by one instead, up to ``MARKERS_FOR_REPORT_UP_TO`` chunks;
    above that the tallies stand, and ``counted_from`` says how many chunks they counted.
    """
    tallies = {stage: read_stage_tally(job.job_url, job.stage_folder(stage)) for stage in (1, 2)}
    counts = [t.tasks for t in tallies.values()]
    if counts != [len(job.plan)] * 2 and (len(job.plan) <= MARKERS_FOR_REPORT_UP_TO or 0 in counts):
        log.info("tallies of job %s count %s chunks of %d: the report reads every marker", job.id, counts, len(job.plan))
        return report_from_markers(job, wall_s)
    report = RunReport(job.id, len(job.plan), job.roi.size, 0, len(job.grid), 0.0)
    report.counted_from = "tallies" if counts == [len(job.plan)] * 2 else \
        f"tallies: {counts[0]} and {counts[1]} chunks counted in stages 1 and 2, of {len(job.plan)}"
    first, last = float("inf"), 0.0
    for stage, total in ((1, report.stage1), (2, report.stage2)):
        for tally in tallies[stage].tallies:
            total.add(tally.stats)
            report.redeliveries += tally.redeliveries
            first, last = min(first, tally.started_at), max(last, tally.finished_at)
        for name, work in tallies[stage].per_pool().items():
            pool = report.per_pool.setdefault(name, {"tasks": 0, "voxels": 0, "seconds": 0.0})
            for key in ("tasks", "voxels", "seconds"):
                pool[key] = round(pool[key] + work[key], 3) if key == "seconds" else pool[key] + work[key]
            for engine in work.get("engines", []):
                if engine not in pool.setdefault("engines", []):
                    pool["engines"].append(engine)
    report.patches_evaluated = report.stage1.patches + report.stage2.patches  # + stage-1 work redone
    report.wall_s = wall_s if wall_s is not None else max(0.0, last - first)
    return report
