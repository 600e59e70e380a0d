"""Chaos on SQS (a real moto server process): SIGKILLs, freezes past the lease, duplicates.

Both stages of a 75-chunk job run on worker processes leasing from SQS while the
test, at random moments,

- SIGKILLs a worker and starts a fresh one in its place;
- SIGSTOPs a worker while it holds a lease (mid-task) for longer than the
  visibility timeout, so another worker receives the task and finishes it, then
  SIGCONTs it: the write fence must make the resumed worker abandon the task
  (``"event": "abandoned"`` on its stderr) rather than write;
- and every task message of each stage is sent twice (half the copies adjacent, so
  the two usually run at the same time on two workers; half at the end of the queue).

The output must still equal the whole-volume reference, block by block, with no
dead letters, no empty block files and no temporary files left behind.

Note: moto accepts an old receipt handle while the message exists (real SQS answers
MessageNotInflight for a message not in flight), so a resumed worker loses its lease
only once another worker has deleted the message; the test resumes a frozen worker
after its term *and* once the others have moved past its expired message.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from cloudvolume import CloudVolume

from chunk_ops import storage
from chunk_ops.geometry import Box, Vec3
from chunk_ops.job import Job
from chunk_ops.stages import reference_pass
from chunk_ops.pipeline import finish
from chunk_ops.submit import check_stage_done, stage_messages
from chunk_ops.volumes import open_volume
from tests.chunk_ops.test_worker import ARTIFACTS, _queue, _slow_job, _spawn, _wait_until

VISIBILITY_S = 3.0  # SQS counts whole seconds
DELAY_S = 1.0  # one forward batch (up to 3 patches): a stage-1 task with patches lasts >= 1 s
FREEZE_S = 3.0 * VISIBILITY_S  # > 2x the lease: another worker has time to redo the task
WORKERS = 3


class _Worker:
    """A worker process and its stderr, read line by line on a thread (JSON events)."""

    def __init__(self, queue_url: str):
        self.proc = _spawn(queue_url, visibility_timeout_s=VISIBILITY_S, idle_exit_s=600.0, grace_s=5.0)
        self.lines: list[tuple[float, str]] = []  # (monotonic time read, line)
        self.frozen_until: float | None = None
        self.killed_at: float | None = None
        self.thawed_at = float("-inf")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def events(self, since: float = 0.0) -> list[tuple[float, dict]]:
        found = []
        for t, line in list(self.lines):
            if t >= since and line.startswith("{"):
                try:
                    found.append((t, json.loads(line)))
                except ValueError:
                    pass
        return found

    def count(self, event: str) -> int:
        return sum(1 for _, e in self.events() if e.get("event") == event)

    @property
    def started(self) -> bool:
        return any(e.get("event") == "start" for _, e in self.events())

    def last_event(self) -> tuple[float, dict] | None:
        events = self.events()
        return events[-1] if events else None

    def freeze(self, seconds: float) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.frozen_until = time.monotonic() + seconds

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.frozen_until = None
        self.thawed_at = time.monotonic()

    def kill(self) -> None:
        if self.frozen_until is not None:
            self.proc.send_signal(signal.SIGCONT)  # SIGKILL works on a stopped process; tidy anyway
        self.proc.kill()
        self.killed_at = time.monotonic()
        self.proc.wait()
        self._reader.join(10)

    def stop(self) -> int:
        """SIGTERM an idle worker: it leases nothing more and exits 0."""
        if self.frozen_until is not None:
            self.thaw()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._reader.join(10)
        return code


def _mid_task(worker: _Worker, queues, stage: int) -> bool:
    """Is this worker (very likely) holding a lease of the stage right now?

    A worker logs ``done`` (or ``skip_done``) after each task and receives the next at
    once while messages are visible.  Stage 1: no newer event for a quarter of a second
    means it is inside a task with patches to compute (empty chunks and skips take a few
    ms).  Stage 2 (merges take ~0.1 s): its last merge ended 15-50 ms ago, so it has
    received the next one and is merging it.
    """
    last = worker.last_event()
    if last is None or not worker.started or worker.proc.poll() is not None:
        return False
    t, event = last
    age = time.monotonic() - t
    if event.get("event") not in ("done", "skip_done") or event.get("stage") != stage:
        return False
    if stage == 2:
        return 0.015 <= age <= 0.05
    return 0.25 <= age <= 0.6 and queues.counts(stage).visible > 0


def _output_blocks(job) -> list[Box]:
    out = open_volume(job.spec.output_url, 0)
    b, size = out.bounds, out.block_size
    boxes = []
    for z in range(b.start.z, b.stop.z, size.z):
        for y in range(b.start.y, b.stop.y, size.y):
            for x in range(b.start.x, b.stop.x, size.x):
                start = Vec3(x, y, z)
                boxes.append(Box(start, (start + size).minimum(b.stop)))
    return boxes


def _reference_job(make_spec) -> Job:
    """The same job with a network that does not sleep (the same seeded weights): its
    reference pass takes a second, not one ``DELAY_S`` per batch."""
    slow = make_spec(net_kwargs={"in_channels": 1, "out_channels": 1, "delay_s": DELAY_S}, chunk=(8, 8, 4))
    fast = make_spec(net_kwargs={"in_channels": 1, "out_channels": 1, "delay_s": 0.0}, chunk=(8, 8, 4),
                     output="reference")
    a, b = (torch.load(s["model"]["path"]) for s in (slow, fast))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return Job.open(fast)


@pytest.mark.slow
def test_chaos_on_sqs_kills_freezes_and_duplicates_lose_nothing(moto_sqs, make_spec, tmp_path):
    job = _slow_job(make_spec, delay_s=DELAY_S, chunk=(8, 8, 4))  # batch_size 3: one forward per 3 patches
    assert len(job.plan) >= 64
    queues = _queue("sqs", tmp_path, max_receives=50)
    assert queues.url.startswith("sqs://")
    rng = random.Random(11)
    started = time.monotonic()
    workers = [_Worker(queues.url) for _ in range(WORKERS)]
    retired: list[_Worker] = []  # killed ones, kept for their stderr
    kills = freezes = duplicates = 0
    by_stage = {1: {"kills": 0, "freezes": 0, "duplicates": 0}, 2: {"kills": 0, "freezes": 0, "duplicates": 0}}
    freeze_log: list[dict] = []  # one per freeze: worker pid, stage, aimed, thawed at

    def thaw_due(now: float) -> None:
        """SIGCONT a frozen worker once its term is over and its task has moved on.

        Moved on: since its lease expired, the other workers have finished three tasks
        (the expired message, visible again, comes before the rest of the queue), or the
        queue shows nothing visible (so it was received again), or 30 s have passed.
        """
        for w in workers:
            if w.frozen_until is None or now < w.frozen_until:
                continue
            f = next(f for f in reversed(freeze_log) if f["worker"] is w)
            expired = f["frozen_at"] + VISIBILITY_S + 0.5
            finished = sum(1 for o in workers + retired if o is not w
                           for _, e in o.events(expired) if e.get("event") in ("done", "skip_done"))
            if finished >= 3 or now - f["frozen_at"] > 30 or queues.counts(f["stage"]).visible == 0:
                w.thaw()
                f["thawed_at"] = now

    def note_abandons() -> None:
        """A freeze counts as abandoned when the first task its worker ends once resumed (the
        one it held while frozen) ends in an abandon: the fence kept it from writing."""
        for f in freeze_log:
            if f["thawed_at"] is not None and not f["abandoned"]:
                outcomes = [e["event"] for _, e in f["worker"].events(f["thawed_at"])
                            if e.get("event") in ("abandoned", "done", "skip_done", "failed")]
                f["abandoned"] = outcomes[:1] == ["abandoned"]

    try:
        for stage in (1, 2):
            bodies = list(stage_messages(job, stage, skip_done=False))
            assert len(bodies) == len(job.plan)
            # every task twice: half the copies adjacent (two workers usually hold the same chunk at
            # once), half at the end (found done, mostly); a chunk without an adjacent copy is redone
            # by its own redelivered message when its worker is killed or frozen
            stage_started = time.monotonic()
            adjacent, late = [], []
            for body in bodies:
                adjacent.append(body)
                (adjacent if rng.random() < 0.5 else late).append(body)
            sent = queues.of(stage).send_batch(adjacent + late)
            assert sent == 2 * len(bodies)
            duplicates += sent - len(bodies)
            by_stage[stage]["duplicates"] = sent - len(bodies)

            # stage 1 (~1 s tasks) runs for a minute: an action every 2-3.5 s; the merges take a few
            # seconds in all: a freeze at once, then a kill, then one every 1-2 s
            pause = (2.0, 3.5) if stage == 1 else (1.0, 2.0)
            next_action = time.monotonic() + (rng.uniform(2.0, 3.0) if stage == 1 else rng.uniform(0.3, 0.8))
            actions = 0
            while not job.done_mask(stage).all():
                now = time.monotonic()
                assert now - started < 420, f"chaos run did not finish stage {stage}"
                thaw_due(now)
                note_abandons()
                if now < next_action:
                    time.sleep(0.05)
                    continue
                awake = [w for w in workers if w.frozen_until is None]
                # until a freeze has ended in an abandon, stage 1 keeps trying (one frozen worker at a time)
                forcing = stage == 1 and actions > 0 and not any(f["abandoned"] for f in freeze_log)
                freeze_turn = forcing or actions % 3 == (1 if stage == 1 else 0)
                if freeze_turn and len(awake) < len(workers) and forcing:
                    next_action = now + 0.5  # one frozen worker at a time: wait for it to resume
                    continue
                # stage 1: one frozen worker at a time; the merges are over in seconds: a second may
                # freeze while one from stage 1 still is
                if freeze_turn and len(awake) >= (len(workers) if stage == 1 else 2):
                    # aim: a worker inside a task, i.e. holding a lease; if none shows for a while
                    # (and no abandon is being forced), a worker at a random moment
                    candidates = [w for w in awake if _mid_task(w, queues, stage)]
                    if candidates:
                        victim, aimed = rng.choice(candidates), True
                    elif forcing or now - next_action < (5.0 if stage == 1 else 1.0):
                        time.sleep(0.02 if stage == 1 else 0.003)
                        continue
                    else:
                        victim, aimed = rng.choice([w for w in awake if w.started] or awake), False
                    victim.freeze(FREEZE_S)
                    freeze_log.append({"worker": victim, "pid": victim.proc.pid, "stage": stage, "aimed": aimed,
                                       "frozen_at": time.monotonic(), "thawed_at": None, "abandoned": False})
                    freezes += 1
                    by_stage[stage]["freezes"] += 1
                else:
                    # not one that was just resumed: its fence comes first
                    killable = [w for w in awake if now - w.thawed_at > 3.0]
                    if not killable:
                        next_action = now + 0.5
                        continue
                    victim = rng.choice(killable)
                    victim.kill()
                    retired.append(victim)
                    workers[workers.index(victim)] = _Worker(queues.url)
                    kills += 1
                    by_stage[stage]["kills"] += 1
                actions += 1
                next_action = time.monotonic() + rng.uniform(*pause)
            check_stage_done(job, queues, stage)
            by_stage[stage]["seconds"] = round(time.monotonic() - stage_started, 1)

        # every freeze lasts its full term (past the lease), then the queues drain (duplicates
        # skipped, expired leases redone)
        while any(w.frozen_until is not None for w in workers):
            thaw_due(time.monotonic())
            time.sleep(0.05)
        _wait_until(lambda: all(queues.counts(s).pending == 0 for s in (1, 2)), 90,
                    "both stage queues to drain")
        _wait_until(lambda: all(w.started for w in workers), 60, "the last replacements to start")
        time.sleep(1.0)  # a resumed worker's last abandon is logged
        codes = [w.stop() for w in workers]
        assert codes == [0] * len(workers), [w.lines[-5:] for w in workers]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.kill()
    wall_s = time.monotonic() - started

    everyone = retired + workers
    note_abandons()
    abandons = sum(w.count("abandoned") for w in everyone)
    lease_lost = sum(w.count("lease_lost") for w in everyone)
    skipped = sum(w.count("skip_done") for w in everyone)
    dead = queues.counts(1).dead + queues.counts(2).dead

    report = finish(job, queues, wall_s)  # raises unless every chunk of stage 2 is done

    result = {
        "chunks": len(job.plan), "workers": WORKERS, "visibility_timeout_s": VISIBILITY_S,
        "kills": kills, "freezes": freezes, "freezes_abandoned": sum(f["abandoned"] for f in freeze_log),
        "abandons": abandons, "lease_lost": lease_lost, "duplicates_sent": duplicates,
        "skipped_as_done": skipped, "redeliveries": report.redeliveries, "dead_letters": dead,
        "by_stage": by_stage,
        "freeze_log": [{**{k: v for k, v in f.items() if k in ("pid", "stage", "aimed", "abandoned")},
                        "after_thaw": [e["event"] for _, e in f["worker"].events(f["thawed_at"] or 1e18)][:4],
                        "killed_s_after_thaw": (None if f["worker"].killed_at is None or f["thawed_at"] is None
                                                else round(f["worker"].killed_at - f["thawed_at"], 2))}
                       for f in freeze_log],
        "wall_s": round(wall_s, 1),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "chaos_sqs.json").write_text(json.dumps(result, indent=2))
    print("chaos_sqs:", json.dumps(result))

    assert kills >= 3 and freezes >= 2
    assert all(by_stage[s]["kills"] + by_stage[s]["freezes"] > 0 for s in (1, 2)), by_stage
    assert result["freezes_abandoned"] >= 1, "no freeze past the lease ended in an abandon (the fence)"
    assert abandons >= result["freezes_abandoned"]
    assert report.redeliveries >= 1, "no chunk was done by a redelivered message (a lease that expired)"
    assert dead == 0 and queues.dead_letters() == []

    # the output: the whole-volume reference, and every block file whole and readable on its own
    reference = _reference_job(make_spec)
    assert (reference.roi, len(reference.plan), len(reference.grid)) == (job.roi, len(job.plan), len(job.grid))
    expected = reference_pass(reference)
    assert np.abs(open_volume(job.spec.output_url, 0).read(job.roi) - expected).max() <= 1e-5
    out_dir = storage.local_path(job.spec.output_url)
    scale_dir = out_dir / CloudVolume(job.spec.output_url, mip=0, progress=False).key
    files = [p for p in scale_dir.iterdir() if p.is_file()]
    blocks = _output_blocks(job)
    assert len(files) == len(blocks), sorted(p.name for p in files)
    assert [p.name for p in files if p.stat().st_size == 0] == []
    single = open_volume(job.spec.output_url, 0)
    for box in blocks:
        part = box.intersection(job.roi)
        block = single.read(box)  # fill_missing is off: a missing or undecodable block raises
        assert np.abs(block[(slice(None), *part.to_zyx_slices(box))]
                      - expected[(slice(None), *part.to_zyx_slices(job.roi))]).max() <= 1e-5, box

    # nothing a killed writer left behind, anywhere under the job's folders
    leftovers = [str(p) for p in tmp_path.rglob("*") if storage.TEMPORARY.search(p.name)]
    assert leftovers == []
    check_stage_done(job, queues, 1)
    assert len(job.done_records(2)) == len(job.plan)
