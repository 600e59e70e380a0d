"""The stage sensor's trigger: serializes itself, polls without blocking, reports the end."""

from __future__ import annotations

import asyncio
import importlib

import pytest

from chunk_ops.job import Job
from chunk_ops.queues.stages import StageQueues
from chunk_ops.submit import enqueue_stage
from chunk_ops.worker import Worker, WorkerConfig


@pytest.fixture
def prepared(make_spec, tmp_path):
    job = Job.open(make_spec(chunk=(16, 16, 4)))
    job.prepare()
    queue = StageQueues(f"file://{tmp_path}/q.sqlite", create=True)
    return job, queue


def _trigger(job, queue):
    from chunkflow_airflow.triggers.chunk_queue import StageDoneTrigger

    return StageDoneTrigger(job.spec_url, queue.url, 1, aws_conn_id=None, poll_interval=0.2, stall_after_s=0.5)


def _first_event(trigger, timeout: float):
    async def first():
        async for event in trigger.run():
            return event

    return asyncio.run(asyncio.wait_for(first(), timeout))


def test_serialize_round_trips(prepared):
    trigger = _trigger(*prepared)
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (path, kwargs)


def test_keeps_polling_while_tasks_are_pending(prepared):
    job, queue = prepared
    enqueue_stage(job, queue, 1)
    with pytest.raises(TimeoutError):
        _first_event(_trigger(job, queue), timeout=1.5)


def test_fires_success_when_every_chunk_is_done(prepared):
    job, queue = prepared
    enqueue_stage(job, queue, 1)
    Worker(WorkerConfig(queue.url, idle_exit_s=0.5), queue).run()
    event = _first_event(_trigger(job, queue), timeout=30)
    assert event.payload["status"] == "success" and event.payload["done"] == len(job.plan)


def test_fires_an_error_when_the_queue_drains_unfinished(prepared):
    job, queue = prepared
    enqueue_stage(job, queue, 1)
    while leases := queue.of(1).receive(max_messages=10, visibility_timeout=60):
        for lease in leases:
            queue.of(1).delete(lease)  # lost without being done, as if dead-lettered
    event = _first_event(_trigger(job, queue), timeout=30)
    assert event.payload["status"] == "error" and event.payload["done"] < event.payload["total"]
