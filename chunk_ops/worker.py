"""The worker loop: lease a task, keep the lease alive, do it, mark it done, delete it.

- A background heartbeat extends the lease every third of the visibility timeout,
  so a task may take longer than the timeout; a worker that dies stops the
  heartbeat, the lease expires, and another worker redoes the task.
- Writes are idempotent and block-aligned, and done markers are written before the
  message is deleted, so a task done twice (a redelivery) gives the same bytes.
- SIGTERM (a preemption notice): lease nothing new; finish the current task within
  ``grace_s``, or give it back at once (visibility 0) and exit.
- Transient errors are retried with exponential backoff, then the task is put back
  with a delay.  Permanent ones (a poison message, a bad spec) are put back at
  once, so the queue's receive limit moves them to the dead-letter queue.
- The worker exits after the queue stays empty for ``idle_exit_s``.
- ``tasks_in_flight`` > 1 (GPU workers): that many tasks at once in threads sharing
  one loaded model, whose forward passes take turns (``Predictor.lock``); so one
  task reads its input and another writes its result while the network computes.
- Fencing: right before each write (partial sum, output, done marker) the worker
  renews its lease synchronously; a worker that lost it (frozen or cut off past its
  lease, and the task redone or deleted meanwhile) abandons the task and writes
  nothing.  What is left is the span between a renewal and the write it guards:
  a process frozen exactly there writes once it resumes (docs/reliability.md).  A task running past ``task_deadline_s`` (a hung read) is no longer
  renewed: the worker gives its leases back and exits, so the chunk moves on.
- Stages: a queue per stage, post-processing (3-6) sharing one (:mod:`.queues.stages`); a
  worker polls only the queues of the stages it serves (``stages``), so a GPU worker
  told ``(1,)`` never merges.  After a task the worker sends the tasks it made ready
  (:func:`.stages.follow_ups`: a chunk's stitch, the pyramid block above).
- Progress: after each chunk's done marker, the worker rewrites its tally of the stage
  (:mod:`.tally`), so a poll reads a file per worker instead of listing every marker.
- Specs: with ``spec_prefixes``, a task naming a spec elsewhere is a poison message.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from .engines import THREADS_ENV, worker_threads
from .job import Job
from .progress import timestamp
from .queues import Lease, LeaseLost, TaskQueue
from .queues.stages import POST_STAGES, STAGES, StageQueues, stage_queue_url
from .stages import follow_ups, marker_record, run_task
from .tally import TallyWriter
from .task import Task, TaskError

log = logging.getLogger("chunk_ops.worker")

PERMANENT = (ValueError,)  # TaskError, SpecError, ModelError, VolumeError: retrying cannot help


@dataclass
class WorkerConfig:
    queue_url: str
    visibility_timeout_s: float = 60.0
    idle_exit_s: float = 30.0
    grace_s: float = 25.0
    retries: int = 3
    backoff_s: float = 1.0
    max_tasks: int | None = None
    tasks_in_flight: int = 1  # 0: 2 where a CUDA GPU is, else 1
    stages: tuple[int, ...] = STAGES  # the stages this worker serves; GPU workers: (1,)
    task_deadline_s: float = 7200.0  # a task still running after this is given up (a hung read)
    spec_prefixes: tuple[str, ...] = ()  # the only places specs may come from; () allows any
    threads: int | None = None  # the engines' CPU thread budget; None: CHUNK_OPS_THREADS, else every core
    # which pool this worker belongs to (local, gpu, cpu...), recorded with each task for the report
    pool: str = field(default_factory=lambda: os.environ.get("CHUNK_OPS_POOL", "default"))


@dataclass
class WorkerSummary:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    given_back: int = 0
    abandoned: int = 0  # lease lost before a write: nothing written
    by_stage: dict = field(default_factory=lambda: dict.fromkeys(STAGES, 0))


def _event(event: str, **fields) -> None:
    """One JSON line per event on stderr, timestamped (UTC), for people and log tools alike."""
    log.info(json.dumps({"event": event, "time": timestamp(), "worker": WORKER_NAME, **fields}, default=str))


WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat(threading.Thread):
    """Extends one lease until stopped; enforces the task deadline and the SIGTERM grace.

    Also keeps the leases of the chain's ``fetch-task`` (:mod:`chunk_ops.operators.sources`).
    """

    def __init__(self, worker: "Worker", lease: Lease, queue: TaskQueue):
        super().__init__(daemon=True)
        self.worker, self.lease, self.queue = worker, lease, queue
        self.stop_event = threading.Event()
        self.lost = False
        self.started = time.monotonic()

    def run(self) -> None:
        cfg = self.worker.config
        period = max(0.2, cfg.visibility_timeout_s / 3)
        next_extend = time.monotonic() + period
        # wake often: the SIGTERM grace deadline must be met whatever the lease length
        while not self.stop_event.wait(0.1):
            if self._past_grace():
                self.worker.give_back_all_and_exit("SIGTERM grace period over")
            if self.past_deadline():
                self.lost = True
                _event("task_deadline", message=self.lease.message_id, deadline_s=cfg.task_deadline_s)
                self.worker.give_back_all_and_exit(f"task deadline of {cfg.task_deadline_s} s passed",
                                                   code=EXIT_DEADLINE)
            if time.monotonic() < next_extend:
                continue
            try:
                self.queue.extend(self.lease, cfg.visibility_timeout_s)
                next_extend = time.monotonic() + period
            except LeaseLost as e:
                self.lost = True
                _event("lease_lost", message=self.lease.message_id, error=str(e))
                return
            except Exception as e:  # a queue hiccup (throttling, 5xx): try again shortly
                _event("heartbeat_error", message=self.lease.message_id, error=repr(e))

    def past_deadline(self) -> bool:
        return time.monotonic() - self.started > self.worker.config.task_deadline_s

    def _past_grace(self) -> bool:
        since = self.worker.stopping_since
        return since is not None and time.time() - since > self.worker.config.grace_s

    def confirm(self) -> None:
        """The write fence: renew the lease now, or raise LeaseLost (and write nothing)."""
        if self.lost or self.past_deadline() or self.stop_event.is_set():
            raise LeaseLost(f"message {self.lease.message_id}: this worker no longer holds its lease")
        for attempt in range(3):
            try:
                self.queue.extend(self.lease, self.worker.config.visibility_timeout_s)
                return
            except LeaseLost:
                self.lost = True
                raise
            except Exception as e:  # transient: the write waits for a definite answer
                _event("fence_error", message=self.lease.message_id, attempt=attempt + 1, error=repr(e))
                time.sleep(0.5 * 2 ** attempt)
        raise LeaseLost(f"message {self.lease.message_id}: cannot confirm the lease before writing")

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


EXIT_SIGTERM = 143
EXIT_DEADLINE = 75  # EX_TEMPFAIL: the task was given back; a new worker may try it


class Worker:
    def __init__(self, config: WorkerConfig, queues: StageQueues | None = None):
        bad = [s for s in config.stages if s not in STAGES]
        if bad or not config.stages:
            raise ValueError(f"worker stages {list(config.stages)} must be a non-empty subset of {list(STAGES)}")
        if config.threads is not None and config.threads < 1:
            raise ValueError(f"worker threads {config.threads} must be at least 1")
        if set(config.stages) & set(POST_STAGES):  # they share a queue: serving one is serving all
            config.stages = tuple(sorted(set(config.stages) | set(POST_STAGES)))
        self.config = config
        self.queues = queues or StageQueues(config.queue_url)
        self.jobs: dict[str, Job] = {}
        self.stopping_since: float | None = None
        self.summary = WorkerSummary()
        self._lock = threading.Lock()  # jobs, summary, held leases and the task count, across task threads
        self._held: dict[str, tuple[TaskQueue, Lease]] = {}
        self._exiting = threading.Lock()
        self._handled = 0
        self._tallies: dict[tuple[str, int], TallyWriter] = {}
        self._tally_name = f"{WORKER_NAME}:{uuid.uuid4().hex[:6]}"  # one per Worker, even several in one process

    def install_signal_handlers(self) -> None:
        def on_term(signum, frame):
            if self.stopping_since is None:
                self.stopping_since = time.time()
                _event("sigterm", grace_s=self.config.grace_s)

        signal.signal(signal.SIGTERM, on_term)

    def run(self) -> WorkerSummary:
        cfg = self.config
        in_flight = cfg.tasks_in_flight
        if in_flight == 0:
            import torch

            in_flight = 2 if torch.cuda.is_available() else 1
        if cfg.threads is not None:  # the engines this worker loads read their budget there (models.loading)
            os.environ[THREADS_ENV] = str(cfg.threads)
        _event("start", queue=cfg.queue_url, stages=list(cfg.stages), tasks_in_flight=in_flight,
               spec_prefixes=list(cfg.spec_prefixes) or "any", threads=worker_threads())
        others = [threading.Thread(target=self._loop, daemon=True, name=f"task-{i}")
                  for i in range(1, in_flight)]
        for t in others:
            t.start()
        self._loop()
        for t in others:
            t.join()
        for tally in self._tallies.values():
            tally.close()
        _event("stop", **{k: v for k, v in vars(self.summary).items()})
        return self.summary

    def _take_turn(self) -> bool:
        """Count one more task if ``max_tasks`` allows it."""
        with self._lock:
            if self.config.max_tasks is not None and self._handled >= self.config.max_tasks:
                return False
            self._handled += 1
            return True

    def _loop(self) -> None:
        cfg = self.config
        idle_since = time.time()
        while self.stopping_since is None and self._take_turn():
            leased = self._receive(min(2.0, cfg.idle_exit_s))
            if leased is None:
                with self._lock:
                    self._handled -= 1
                if time.time() - idle_since >= cfg.idle_exit_s:
                    _event("idle_exit", idle_s=round(time.time() - idle_since, 1))
                    break
                continue
            self.process(*leased)
            idle_since = time.time()

    def _receive(self, wait_s: float) -> tuple[Lease, int, TaskQueue] | None:
        """One task from the served stages' queues, merges first (they finish a run)."""
        seen, queues = set(), []  # one look per queue: the post-processing stages share one
        for stage in sorted(self.config.stages, reverse=True):
            url = stage_queue_url(self.queues.url, stage)
            if url not in seen and (queue := self.queues.get(stage)) is not None:
                seen.add(url)
                queues.append((stage, queue))
        if not queues:
            time.sleep(wait_s)
            return None
        deadline = time.monotonic() + wait_s
        share = 0.0  # a first look at every queue, then each waits its share, until the wait is over
        while True:
            for stage, queue in queues:
                leases = queue.receive(1, self.config.visibility_timeout_s, wait_seconds=share)
                if leases:
                    return leases[0], stage, queue
            if time.monotonic() >= deadline:
                return None
            share = wait_s / len(queues)

    def _count(self, what: str, stage: int | None = None) -> None:
        with self._lock:
            setattr(self.summary, what, getattr(self.summary, what) + 1)
            if stage is not None:
                self.summary.by_stage[stage] += 1

    def give_back_all_and_exit(self, reason: str, code: int = EXIT_SIGTERM) -> None:
        """Release every lease this worker holds, then exit (143: SIGTERM grace over).

        Task threads are inside the network, so the process leaves from here; the
        heartbeat of another task in flight waits on the lock until it does.
        """
        with self._exiting:
            with self._lock:
                held = list(self._held.values())
            for queue, lease in held:
                try:
                    queue.release(lease)
                    _event("given_back", message=lease.message_id, reason=reason)
                except Exception:  # lost already, or the queue is unreachable: it expires
                    pass
            for tally in list(self._tallies.values()):  # final, so the waiter folds them in
                try:
                    tally.close(timeout_s=1.0)
                except Exception:
                    pass
            os._exit(code)

    def _job(self, task: Task) -> Job:
        prefixes = self.config.spec_prefixes
        if prefixes and not any(task.spec_url.startswith(p) for p in prefixes):
            raise TaskError(f"task spec {task.spec_url} is not under this worker's spec prefixes {list(prefixes)}")
        # a rerun of the same job may store new post-processing settings (not in the job id):
        # post-processing tasks look at the stored spec again (one small read)
        document = Job.read_spec(task.spec_url) if task.stage in POST_STAGES else None
        with self._lock:  # task threads share one opened job (and its loaded model)
            job = self.jobs.get(task.spec_url)
            if job is None or (document is not None and job.spec.to_dict() != document):
                job = self.jobs[task.spec_url] = Job.from_spec_url(task.spec_url)
        if job.id != task.job_id:
            raise TaskError(f"task names job {task.job_id} but {task.spec_url} is job {job.id}")
        try:
            if task.mip and task.mip not in job.stage_levels(task.stage):
                raise ValueError(f"mip {task.mip} is not one of the job's pyramid levels {job.stage_levels(task.stage)}")
            job.stage_plan(task.stage, task.mip).index_of(task.box)
        except (ValueError, IndexError) as e:
            raise TaskError(f"task box {task.box} (stage {task.stage}, mip {task.mip}) is not a task of job "
                            f"{job.id} (roi {job.roi}): {e}") from None
        return job

    def process(self, lease: Lease, stage: int = 1, queue: TaskQueue | None = None) -> None:
        queue = queue or self.queues.of(stage)
        with self.holding(lease, queue) as heartbeat:
            self._process(lease, stage, queue, heartbeat)

    @contextlib.contextmanager
    def holding(self, lease: Lease, queue: TaskQueue) -> Iterator[Heartbeat]:
        """Hold a lease while it is worked on: a heartbeat renews it, and a deadline or SIGTERM
        gives it back (``give_back_all_and_exit``).  The chain's fetch-task holds its tasks so too."""
        with self._lock:
            self._held[lease.message_id] = (queue, lease)
        heartbeat = Heartbeat(self, lease, queue)
        heartbeat.start()
        try:
            yield heartbeat
        finally:
            heartbeat.stop()
            with self._lock:
                self._held.pop(lease.message_id, None)

    def _process(self, lease: Lease, stage: int, queue: TaskQueue, heartbeat: Heartbeat) -> None:
        started = time.time()
        task = job = None
        try:
            task = Task.from_json(lease.body)
            if stage_queue_url(self.queues.url, task.stage) != stage_queue_url(self.queues.url, stage):
                raise TaskError(f"a stage-{task.stage} task on the stage-{stage} queue {queue.url}")
            if task.stage not in self.config.stages:
                raise TaskError(f"a stage-{task.stage} task for a worker serving stages {list(self.config.stages)}")
            job = self._job(task)
            if job.is_done(task.stage, task.box, task.mip):
                # a redelivery of a task done already: the worker that did it may have died
                # before sending what it made ready, so send that again (copies are skipped)
                self._send_follow_ups(job, task)
                heartbeat.stop()
                self._delete(queue, lease)
                self._count("skipped")
                _event("skip_done", job=task.job_id, stage=task.stage, chunk=task.box.to_filename())
                return
            stats, extra = self._with_retries(task, job, heartbeat.confirm)
            heartbeat.confirm()
            record = marker_record(job, task.stage, stats, extra, started=started, pool=self.config.pool,
                                   receive_count=lease.receive_count, worker=WORKER_NAME)
            job.mark_done(task.stage, task.box, record, task.mip)
            self._tally(job, task.stage).count(record, task.box.to_filename())
            self._send_follow_ups(job, task)
        except LeaseLost as e:  # the fence: another worker owns this task now
            self._count("abandoned")
            _event("abandoned", message=lease.message_id, reason=str(e))
            return
        except PERMANENT as e:
            self._count("failed")
            _event("failed", message=lease.message_id, receive_count=lease.receive_count,
                   permanent=True, error=str(e))
            heartbeat.stop()
            self._give_back(queue, lease, delay_s=0)
            self._record_failure(job, task, lease, str(e), permanent=True)  # after: the store may be what failed
            return
        except Exception as e:  # transient, retried here already: try again later, maybe elsewhere
            self._count("failed")
            _event("failed", message=lease.message_id, receive_count=lease.receive_count,
                   permanent=False, error=repr(e))
            heartbeat.stop()
            self._give_back(queue, lease, delay_s=self.config.backoff_s * 2 ** self.config.retries)
            self._record_failure(job, task, lease, repr(e), permanent=False)
            return
        heartbeat.stop()
        self._delete(queue, lease)
        self._count("done", task.stage)
        _event("done", job=task.job_id, stage=task.stage, chunk=task.box.to_filename(),
               seconds=round(time.time() - started, 3), receive_count=lease.receive_count)

    def _record_failure(self, job: Job | None, task: Task | None, lease: Lease, error: str, permanent: bool) -> None:
        """Keep the error beside the job, so a dead letter can be shown with what killed it.
        A task that names no job of ours (unreadable, foreign) has no place for it: the log has it."""
        if job is None or task is None:
            return
        try:
            job.record_failure(task.stage, task.box, {
                "error": error[:4000], "permanent": permanent, "receive_count": lease.receive_count,
                "max_receives": self.queues.max_receives, "worker": WORKER_NAME, "pool": self.config.pool,
                "at": time.time()}, task.mip)
        except Exception as e:  # the store is down too: the task is given back all the same
            _event("failure_record_error", message=lease.message_id, error=repr(e))

    def _tally(self, job: Job, stage: int) -> TallyWriter:
        with self._lock:
            key = (job.job_url, stage)
            if key not in self._tallies:
                self._tallies[key] = TallyWriter(job.job_url, job.stage_folder(stage), self._tally_name, self.config.pool)
            return self._tallies[key]

    def _send_follow_ups(self, job: Job, task: Task) -> None:
        for stage, tasks in itertools.groupby(follow_ups(job, task), key=lambda t: t.stage):
            self.queues.of(stage).send_batch(t.to_json() for t in tasks)

    def _with_retries(self, task: Task, job: Job, fence):
        for attempt in range(self.config.retries + 1):
            try:
                return run_task(job, task, fence)
            except (*PERMANENT, LeaseLost):
                raise
            except Exception as e:
                if attempt == self.config.retries:
                    raise
                delay = self.config.backoff_s * 2 ** attempt
                _event("retry", chunk=task.box.to_filename(), attempt=attempt + 1, delay_s=delay, error=repr(e))
                time.sleep(delay)

    def _delete(self, queue: TaskQueue, lease: Lease) -> None:
        try:
            queue.delete(lease)
        except LeaseLost:
            # redelivered meanwhile: the other holder finds the done marker and deletes it
            _event("delete_lost", message=lease.message_id)

    def _give_back(self, queue: TaskQueue, lease: Lease, delay_s: float) -> None:
        try:
            if delay_s > 0:
                queue.extend(lease, delay_s)
            else:
                queue.release(lease)
            self._count("given_back")
        except LeaseLost:
            pass
