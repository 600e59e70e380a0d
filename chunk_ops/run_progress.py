"""What a run's progress view shows, read from the sources the sensors use.

A look costs O(workers) reads plus at most ``MAP_READS`` markers, whatever the plan's
size: per stage, :class:`~chunk_ops.submit.StageWatch` (the workers' tallies and the
queue's counts; the markers are listed once, when the tallies reach the total) and the
tallies' rates; the chunk map of one z section (at most ``report.MARKER_CHUNKS`` cells)
reads ``MAP_READS`` of its open cells per look, in turn, and a cell seen done is
remembered (markers are never taken back).  Dead letters are peeked (up to
``DEAD_LETTERS_SHOWN``) with the error each chunk last failed with (:meth:`Job.failure`);
once a stage's queue has drained, its open cells with a failure record are drawn dead.

``RunProgress`` keeps that state between looks: one per run in the process serving
the view (the Airflow plugin keeps a few).  Looks of one run are served one at a time,
and a look younger than ``FRESH_S`` is handed to whoever asks the same again.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from .geometry import Box
from .job import Job
from .queues import QueueCounts
from .queues.stages import POST_STAGES, QUEUE_STAGES, StageQueues, stage_queue_url
from .report import MARKER_THREADS, section_cells
from .submit import StageWatch, stage_status
from .tally import read_stage_tally
from .task import PYRAMID, STAGE_NAMES, Task

DEAD_LETTERS_SHOWN = 10
MAP_READS = 256  # markers read per look for the map's open cells (the rest keep their last state)
FRESH_S = 1.5
QUEUE_NAMES = {1: "network", 2: "merge", 3: "post-processing"}  # by the first stage each queue serves


class RunProgress:
    """A run's stages as the progress view sees them; :meth:`look` is thread-safe."""

    def __init__(self, job: Job, queues: StageQueues, stages: list[int]):
        self.job, self.queues = job, queues
        self.watches: dict[int, StageWatch] = {}
        self._counts: dict[str, QueueCounts] = {}  # by queue URL, read once a look: stages 3-6 share one
        self.add_stages(stages)
        self._cells: dict[tuple[int, str], str] = {}  # (stage, chunk) -> last state seen
        self._turn = 0  # where the next look's marker reads begin among the open cells
        self._last: tuple[float, tuple, dict] | None = None
        self._lock = threading.Lock()

    @property
    def stages(self) -> list[int]:
        return sorted(self.watches)

    def add_stages(self, stages: list[int]) -> None:
        """Post-processing's stages are known once its phases are planned."""
        for stage in stages:
            if stage not in self.watches:
                self.watches[stage] = StageWatch(self.job, stage, partial(self._stage_counts, stage), compact=False)

    def _queue_of(self, stage: int) -> str:
        return stage_queue_url(self.queues.url, stage)

    def _stage_counts(self, stage: int) -> QueueCounts:
        return self._counts[self._queue_of(stage)]

    def look(self, z: int | None = None, map_stage: int | None = None) -> dict:
        """Everything the view draws: stages, queues, the chunk map, dead letters."""
        with self._lock:
            key = (z, map_stage, tuple(self.stages))
            if self._last is not None and self._last[1] == key and time.monotonic() - self._last[0] < FRESH_S:
                return self._last[2]
            result = self._look(z, map_stage)
            self._last = (time.monotonic(), key, result)
            return result

    def _look(self, z: int | None, map_stage: int | None) -> dict:
        self._counts = {self._queue_of(s): self.queues.counts(s) for s in reversed(self.stages)}
        dead = self._dead_letters()
        dead_stages = {d["stage"] for d in dead}
        stages, latest, drained = [], {}, {}
        for stage in self.stages:
            tally = read_stage_tally(self.job.job_url, self.job.stage_folder(stage))
            poll = self.watches[stage].poll(tally)
            status = stage_status(self.job, stage, tally)
            moving = poll.visible or poll.in_flight
            drained[stage] = not moving and poll.dead > 0
            state = poll.state
            if stage in POST_STAGES:  # one queue for stages 3-6: its counts say little of one stage
                if state != "done" and not tally.tallies:
                    state = "not started"
                elif state == "stalled":
                    state = "stalled" if stage in dead_stages else "idle"
            elif state == "running" and not poll.done and not (moving or poll.dead):
                state = "not started"  # nothing of it sent yet (a later stage)
            elif state == "stalled" and not poll.dead:
                state = "idle"
            stages.append({
                "stage": stage, "name": STAGE_NAMES[stage], "state": state, "done": poll.done, "total": poll.total,
                "chunks_per_s": status.chunks_per_s, "voxels_per_s": status.voxels_per_s,
                # no ETA for a stage nothing is moving in (done, or what is left is dead or unsent)
                "eta_s": status.eta_s if moving and state != "done" else None,
                "workers": len(tally.tallies), "pools": tally.per_pool(),
            })
            recent = max(tally.tallies, key=lambda t: t.finished_at, default=None)
            if recent is not None and recent.last_chunk:
                latest[stage] = recent.last_chunk
        queues = []
        for first in QUEUE_STAGES:
            served = [s for s in self.stages if self._queue_of(s) == self._queue_of(first)]
            if served:
                counts = self._counts[self._queue_of(first)]
                queues.append({"queue": QUEUE_NAMES[first], "stages": served, "waiting": counts.visible,
                               "leased": counts.in_flight, "dead": counts.dead})
        if map_stage not in self.watches or map_stage == PYRAMID:
            map_stage = self._front(stages)
        chunk_map = None
        if map_stage is not None:
            chunk_map = self._chunk_map(map_stage, z, latest.get(map_stage), dead, drained[map_stage])
        return {"job_id": self.job.id, "stages": stages, "queues": queues, "map": chunk_map,
                "dead_letters": dead, "dead_total": sum(q["dead"] for q in queues)}

    @staticmethod
    def _front(stages: list[dict]) -> int | None:
        """The first chunk stage not done (the work's front), else the last one."""
        chunk_stages = [s["stage"] for s in stages if s["stage"] != PYRAMID]
        open_ = [s["stage"] for s in stages if s["stage"] != PYRAMID and s["state"] != "done"]
        return (open_ or chunk_stages[-1:] or [None])[0]

    def _dead_letters(self) -> list[dict]:
        letters = []
        for body in self.queues.dead_letters(DEAD_LETTERS_SHOWN):
            try:
                task = Task.from_json(body)
            except ValueError as e:
                letters.append({"stage": None, "chunk": None, "mip": 0, "error": f"unreadable task: {e}"})
                continue
            if task.job_id != self.job.id:
                continue  # another job sharing the queue
            failure = self.job.failure(task.stage, task.box, task.mip) or {}
            letters.append({"stage": task.stage, "chunk": task.box.to_filename(), "mip": task.mip,
                            "error": failure.get("error", "no error recorded (the worker died mid-task, "
                                                          "or its store write failed)"),
                            "receive_count": failure.get("receive_count"), "worker": failure.get("worker"),
                            "at": failure.get("at")})
        return letters

    def _chunk_map(self, stage: int, z: int | None, latest: str | None, dead: list[dict], drained: bool) -> dict:
        plan = self.job.stage_plan(stage)
        z_rows = plan.axis_bounds(2)
        if z is None:  # where the work is: the z row of the chunk finished last, else the first
            at = Box.from_filename(latest).start.z if latest else z_rows[0][0]
            row = next((k for k, (z0, z1) in enumerate(z_rows) if z0 <= at < z1), 0)
        else:
            row = min(max(int(z), 0), len(z_rows) - 1)  # the view steps through rows by index
        cells, shape = section_cells(plan, row)
        samples = [sample.to_filename() for _, sample in cells]
        open_ = [(i, name) for i, name in enumerate(samples) if self._cells.get((stage, name)) != "done"]
        if len(open_) > MAP_READS:
            start = self._turn % len(open_)
            self._turn = start + MAP_READS
            open_ = (open_ + open_)[start:start + MAP_READS]
        with ThreadPoolExecutor(MARKER_THREADS) as pool:
            done = list(pool.map(lambda item: self.job.is_done(stage, cells[item[0]][1]), open_))
        for (_, name), is_done in zip(open_, done):
            if is_done:
                self._cells[(stage, name)] = "done"
        # dead: a peeked letter; or, once the queue has drained with letters dead, a failure record
        dead_chunks = {d["chunk"] for d in dead if d["stage"] == stage}
        if drained:
            dead_chunks |= self.job.failed_chunks(stage)
        states = []
        for name in samples:
            state = self._cells.get((stage, name), "not done")
            states.append("dead" if state != "done" and name in dead_chunks else state)
        return {"stage": stage, "name": STAGE_NAMES[stage], "z_index": row, "z_rows": len(z_rows),
                "z_range": list(z_rows[row]), "columns": shape.x, "rows": shape.y,
                "chunks_per_cell": -(-plan.grid_shape.x * plan.grid_shape.y // len(cells)),
                "cells": [{"state": s, "chunk": name} for name, s in zip(samples, states)]}
