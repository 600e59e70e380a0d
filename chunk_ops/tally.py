"""Progress that costs O(workers), not O(chunks), per poll: each worker's tally of its work.

A done marker per chunk is the truth, but counting them means listing them: at ten
million chunks about 10,000 LIST calls, too many for a poll every few seconds.  So
each worker process also keeps one small file per stage it works on, rewritten after
each chunk it finishes (the marker first, then the tally)::

    <job>/progress/stage<n>/<worker>.json    this worker's sums: tasks, voxels, seconds,
                                             timings, patches, redeliveries, engines
    <job>/progress/stage<n>/compacted.json   tallies of workers that have exited,
                                             folded in by the stage's waiter

A poll reads the compacted file and the live workers' files.  A chunk counts once,
when its marker is first written: a worker finding a marker already there (a
redelivery) skips it uncounted.  Sums may still be off in two rare cases: a worker
killed between its marker and its tally (one chunk under), or two workers finishing
the same chunk when a lease expired during a write (one over).  So a tally never
decides alone: when it reaches the total, the waiter lists the markers once
(:class:`chunk_ops.submit.StageWatch`), and the report falls back to the markers when
the sums do not match the plan.

Only the waiter compacts (one writer), so compaction cannot lose a tally.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import asdict, dataclass, field

from . import storage
from .stages import ChunkStats

COMPACTED = "compacted.json"


def progress_prefix(folder: str) -> str:
    """Where a stage's tallies are, by its folder name (``Job.stage_folder``)."""
    return f"progress/{folder}/"


def _file_name(worker: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", worker) + ".json"


@dataclass
class Tally:
    """One worker's finished chunks of one stage, summed."""

    worker: str
    pool: str = "default"
    tasks: int = 0
    voxels: int = 0
    seconds: float = 0.0  # summed task durations
    redeliveries: int = 0
    blocks: int = 0  # output blocks the merges found stored after writing them
    started_at: float = math.inf
    finished_at: float = 0.0
    stats: ChunkStats = field(default_factory=ChunkStats)
    engines: list = field(default_factory=list)
    closed: bool = False  # the worker has exited: its tally no longer changes
    last_chunk: str | None = None  # the box (file name) it finished last: where the work is now

    def add(self, record: dict, chunk: str | None = None) -> None:
        """Count one finished chunk, from the record its done marker keeps."""
        if chunk is not None and record["finished_at"] >= self.finished_at:
            self.last_chunk = chunk
        self.tasks += 1
        self.voxels += record["voxels"]
        self.seconds += record["finished_at"] - record["started_at"]
        self.redeliveries += record["receive_count"] - 1
        self.blocks += record.get("blocks", 0)
        self.started_at = min(self.started_at, record["started_at"])
        self.finished_at = max(self.finished_at, record["finished_at"])
        self.stats.add(ChunkStats(**{k: record[k] for k in ChunkStats.__dataclass_fields__}))
        if "engine" in record and record["engine"] not in self.engines:
            self.engines.append(record["engine"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["started_at"] = None if math.isinf(self.started_at) else self.started_at
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Tally":
        d = dict(d)
        d["stats"] = ChunkStats(**d.get("stats", {}))
        d["started_at"] = math.inf if d.get("started_at") is None else d["started_at"]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class TallyWriter:
    """A worker's tally for one job and stage, written after every chunk it finishes."""

    def __init__(self, job_url: str, folder: str, worker: str, pool: str):
        self.files = storage.files_at(job_url)
        self.name = progress_prefix(folder) + _file_name(worker)
        self.tally = Tally(worker, pool)
        self._lock = threading.Lock()  # task threads of one worker share it

    def count(self, record: dict, chunk: str | None = None) -> None:
        with self._lock:
            self.tally.add(record, chunk)
            self._put()

    def close(self, timeout_s: float = -1) -> None:
        """Mark the tally final (the waiter then compacts it); ``timeout_s``: give up if a task
        thread holds it that long (a worker leaving at once)."""
        if not self._lock.acquire(timeout=timeout_s):
            return
        try:
            if self.tally.tasks:
                self.tally.closed = True
                self._put()
        finally:
            self._lock.release()

    def _put(self) -> None:
        self.files.put_json(self.name, self.tally.to_dict())


@dataclass
class StageTally:
    """All workers' tallies of a stage: what a poll knows without listing markers."""

    tasks: int
    voxels: int
    tallies: list[Tally]
    files_read: int  # the cost of this poll: one listing of the progress folder plus these

    def per_pool(self) -> dict[str, dict]:
        pools: dict[str, dict] = {}
        for t in self.tallies:
            pool = pools.setdefault(t.pool, {"tasks": 0, "voxels": 0, "seconds": 0.0})
            pool["tasks"] += t.tasks
            pool["voxels"] += t.voxels
            pool["seconds"] = round(pool["seconds"] + t.seconds, 3)
            for engine in t.engines:
                if engine not in pool.setdefault("engines", []):
                    pool["engines"].append(engine)
        return pools


def read_stage_tally(job_url: str, folder: str, *, compact: bool = False) -> StageTally:
    """The stage's tallies: one listing of its progress folder (a file per live worker,
    plus the compacted one) and a read of each.  ``compact``: fold the tallies of workers
    that have exited into the compacted file (only the stage's one waiter may)."""
    files = storage.files_at(job_url)
    prefix = progress_prefix(folder)
    names = [n for n in storage.list_folder(files, prefix) if n.endswith(".json")]
    contents = storage.get_all(files, names)
    compacted: dict[str, dict] = {}
    live: dict[str, Tally] = {}
    for name, data in contents.items():
        try:
            doc = json.loads(data) if data else None
        except ValueError:
            doc = None  # a torn write of a store without atomic puts: the next poll reads it whole
        if not isinstance(doc, dict):
            continue
        if name == prefix + COMPACTED:
            compacted.update(doc.get("workers", {}))
        else:
            live[name] = Tally.from_dict(doc)
    tallies = {worker: Tally.from_dict(d) for worker, d in compacted.items()}
    for tally in live.values():
        tallies[tally.worker] = tally  # a live file is never older than its compacted copy
    folded = [name for name, t in live.items() if t.closed]
    if compact and folded:
        files.put_json(prefix + COMPACTED, {"workers": {w: t.to_dict() for w, t in sorted(tallies.items())
                                                        if t.closed}})
        files.delete(folded)
    ordered = [tallies[w] for w in sorted(tallies)]
    return StageTally(sum(t.tasks for t in ordered), sum(t.voxels for t in ordered), ordered, len(names))
