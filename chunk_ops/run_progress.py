"""What a run's progress view shows, read from the sources the sensors use.

A look costs O(workers + cells of one map), never O(chunks): per stage,
:class:`~chunk_ops.submit.StageWatch` (the workers' tallies and the queue's counts;
the markers are listed once, when the tallies reach the total) and the tallies'
rates; the chunk map of one z section reads at most ``report.MARKER_CHUNKS`` markers,
and a cell seen done is remembered (markers are never taken back), so a view that
keeps polling reads only the cells still open.  Dead letters are peeked (up to
``DEAD_LETTERS_SHOWN``) with the error each chunk last failed with
(:meth:`Job.failure`).

``RunProgress`` keeps that state between looks: one per run in the process serving
the view (the Airflow plugin keeps a few).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from .geometry import Box
from .job import Job
from .queues.stages import QUEUE_STAGES, StageQueues, stage_queue_url
from .report import MARKER_THREADS, section_cells
from .submit import StageWatch, stage_status
from .tally import read_stage_tally
from .task import PYRAMID, STAGE_NAMES, Task

DEAD_LETTERS_SHOWN = 10
QUEUE_NAMES = {1: "network", 2: "merge", 3: "post-processing"}  # by the first stage each queue serves


class RunProgress:
    """A run's stages (in order) as the progress view sees them; :meth:`look` is thread-safe."""

    def __init__(self, job: Job, queues: StageQueues, stages: list[int]):
        self.job, self.queues, self.stages = job, queues, list(stages)
        self.watches = {stage: StageWatch(job, stage, lambda stage=stage: queues.counts(stage), compact=False)
                        for stage in self.stages}
        self._done_cells: set[tuple[int, str]] = set()  # (stage, chunk) seen done
        self._lock = threading.Lock()

    def add_stages(self, stages: list[int]) -> None:
        """Post-processing's stages are known once its phases are planned."""
        with self._lock:
            for stage in stages:
                if stage not in self.watches:
                    self.stages.append(stage)
                    self.watches[stage] = StageWatch(self.job, stage, lambda stage=stage: self.queues.counts(stage),
                                                     compact=False)

    def look(self, z: int | None = None, map_stage: int | None = None) -> dict:
        """Everything the view draws: stages, queues, the chunk map, dead letters."""
        with self._lock:
            stages, latest = [], {}
            for stage in self.stages:
                poll = self.watches[stage].poll()
                tally = read_stage_tally(self.job.job_url, self.job.stage_folder(stage))
                status = stage_status(self.job, stage, tally)
                state = poll.state
                if state == "running" and not poll.done and not (poll.visible or poll.in_flight or poll.dead):
                    state = "not started"  # nothing of it sent yet (a later stage) or nothing taken
                elif state == "stalled" and not poll.dead:
                    state = "idle"  # the queue is empty and nothing is dead: waiting to be sent more
                stages.append({
                    "stage": stage, "name": STAGE_NAMES[stage], "state": state,
                    "done": poll.done, "total": poll.total,
                    "chunks_per_s": status.chunks_per_s, "voxels_per_s": status.voxels_per_s,
                    # no ETA for a stage nothing is moving in (done, or what is left is dead or unsent)
                    "eta_s": status.eta_s if poll.visible or poll.in_flight else None,
                    "workers": len(tally.tallies), "pools": tally.per_pool(),
                })
                recent = max(tally.tallies, key=lambda t: t.finished_at, default=None)
                if recent is not None and recent.last_chunk:
                    latest[stage] = recent.last_chunk
            queues = []
            for first in QUEUE_STAGES:
                if any(stage_queue_url(self.queues.url, s) == stage_queue_url(self.queues.url, first)
                       for s in self.stages):
                    counts = self.queues.counts(first)
                    queues.append({"queue": QUEUE_NAMES[first], "stages": [s for s in self.stages if
                                   stage_queue_url(self.queues.url, s) == stage_queue_url(self.queues.url, first)],
                                   "waiting": counts.visible, "leased": counts.in_flight, "dead": counts.dead})
            dead = self._dead_letters()
            map_stage = map_stage if map_stage in self.stages and map_stage != PYRAMID else \
                self._current_map_stage(stages)
            chunk_map = self._chunk_map(map_stage, z, latest.get(map_stage), dead) if map_stage else None
        return {"job_id": self.job.id, "stages": stages, "queues": queues, "map": chunk_map,
                "dead_letters": dead, "dead_total": sum(q["dead"] for q in queues)}

    def _current_map_stage(self, stages: list[dict]) -> int | None:
        """The first chunk stage not done (the work's front), else the last one."""
        chunk_stages = [s for s in stages if s["stage"] != PYRAMID]
        open_ = [s for s in chunk_stages if s["state"] != "done"]
        return (open_ or chunk_stages or [{"stage": None}])[0 if open_ else -1]["stage"]

    def _dead_letters(self) -> list[dict]:
        letters = []
        for body in self.queues.dead_letters(DEAD_LETTERS_SHOWN):
            try:
                task = Task.from_json(body)
            except ValueError as e:
                letters.append({"stage": None, "chunk": None, "mip": 0, "error": f"unreadable task: {e}",
                                "body": body[:500]})
                continue
            failure = self.job.failure(task.stage, task.box, task.mip) if task.job_id == self.job.id else None
            letters.append({"stage": task.stage, "chunk": task.box.to_filename(), "mip": task.mip,
                            "error": failure["error"] if failure else "no error recorded (the worker died mid-task, "
                                                                          "or its store write failed)",
                            "receive_count": failure.get("receive_count") if failure else None,
                            "worker": failure.get("worker") if failure else None,
                            "at": failure.get("at") if failure else None})
        return letters

    def _chunk_map(self, stage: int, z: int | None, latest: str | None, dead: list[dict]) -> dict:
        plan = self.job.stage_plan(stage)
        z_rows = plan.axis_bounds(2)
        if z is None:  # where the work is: the z row of the chunk finished last, else the first
            z = Box.from_filename(latest).start.z if latest else z_rows[0][0]
            row = next((k for k, (z0, z1) in enumerate(z_rows) if z0 <= z < z1), 0)
        else:
            row = min(max(int(z), 0), len(z_rows) - 1)  # the view steps through rows by index
        cells, shape = section_cells(plan, row)
        dead_chunks = {d["chunk"] for d in dead if d["stage"] == stage}

        def state(sample: Box) -> str:
            key = (stage, sample.to_filename())
            if key in self._done_cells:
                return "done"
            if self.job.is_done(stage, sample):
                self._done_cells.add(key)
                return "done"
            return "dead" if key[1] in dead_chunks else "not done"

        with ThreadPoolExecutor(MARKER_THREADS) as pool:
            states = list(pool.map(state, [sample for _, sample in cells]))
        return {"stage": stage, "name": STAGE_NAMES[stage], "z_index": row, "z_rows": len(z_rows),
                "z_range": list(z_rows[row]), "columns": shape.x, "rows": shape.y,
                "chunks_per_cell": -(-plan.grid_shape.x * plan.grid_shape.y // len(cells)),
                "cells": [{"state": s, "chunk": sample.to_filename()} for (_, sample), s in zip(cells, states)]}
