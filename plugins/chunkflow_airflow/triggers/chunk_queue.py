"""Triggers for chunk_ops runs: they run in the triggerer and never block it."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from airflow.triggers.base import BaseTrigger, TriggerEvent


def stage_progress(spec_url: str, queue_url: str, stage: int, aws_conn_id: str | None) -> dict:
    """Done chunks of a stage and the queue's counts (blocking I/O: run it in a thread)."""
    from chunk_ops.job import Job
    from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

    job = Job.from_spec_url(spec_url)
    counts = ChunkQueueHook(queue_url, aws_conn_id).get_queues().counts(stage)
    done = int(job.done_mask(stage).sum())
    return {"job_id": job.id, "stage": stage, "done": done, "total": len(job.plan),
            "visible": counts.visible, "in_flight": counts.in_flight, "dead": counts.dead}


class StageDoneTrigger(BaseTrigger):
    """Fires when every chunk of a stage is done, or when the queue has drained
    without finishing it (the rest is dead-lettered): then the event is an error."""

    def __init__(self, spec_url: str, queue_url: str, stage: int, aws_conn_id: str | None = "aws_default",
                 poll_interval: float = 10.0):
        super().__init__()
        self.spec_url = spec_url
        self.queue_url = queue_url
        self.stage = stage
        self.aws_conn_id = aws_conn_id
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"spec_url": self.spec_url, "queue_url": self.queue_url, "stage": self.stage,
             "aws_conn_id": self.aws_conn_id, "poll_interval": self.poll_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            progress = await asyncio.to_thread(
                stage_progress, self.spec_url, self.queue_url, self.stage, self.aws_conn_id)
            if progress["done"] == progress["total"]:
                yield TriggerEvent({"status": "success", **progress})
                return
            if progress["visible"] == 0 and progress["in_flight"] == 0:
                yield TriggerEvent({"status": "error", **progress,
                                    "message": "the queue drained with chunks not done (see the dead-letter queue)"})
                return
            self.log.info("stage %s: %d of %d chunks done; queue visible %d, in flight %d, dead %d",
                          self.stage, progress["done"], progress["total"], progress["visible"],
                          progress["in_flight"], progress["dead"])
            await asyncio.sleep(self.poll_interval)
