"""Triggers for chunk_ops runs: they run in the triggerer and never block it."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Sequence

from airflow.triggers.base import BaseTrigger, TriggerEvent


def open_watches(spec_url: str, queue_url: str, stages: Sequence[int], aws_conn_id: str | None,
                 stall_after_s: float = 60.0) -> list:
    """A ``chunk_ops.submit.StageWatch`` per stage (blocking I/O: run it in a thread)."""
    from chunk_ops.job import Job
    from chunk_ops.submit import StageWatch
    from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

    job = Job.from_spec_url(spec_url)
    queues = ChunkQueueHook(queue_url, aws_conn_id).get_queues()
    return [StageWatch(job, stage, lambda stage=stage: queues.counts(stage), stall_after_s=stall_after_s)
            for stage in stages]


def poll_watches(watches: list) -> dict:
    """One poll of every watch: success, error (a stage stalled) or running, with the counts."""
    polls = [w.poll() for w in watches]
    states = {p.state for p in polls}
    status = "success" if states <= {"done"} else "error" if "stalled" in states else "running"
    event = {"status": status, "stages": [p.to_dict() for p in polls],
             "done": sum(p.done for p in polls), "total": sum(p.total for p in polls)}
    if status == "error":
        stalled = next(p for p in polls if p.state == "stalled")
        event["message"] = (f"stage {stalled.stage}: the queue drained with {stalled.total - stalled.done} tasks "
                            f"not done ({stalled.dead} dead-lettered; see the dead-letter queue)")
    return event


def as_stages(stages: int | str | Sequence[int]) -> list[int]:
    """Stages as given to a sensor: one int, a list, or their rendered template text."""
    if isinstance(stages, str):
        stages = [int(s) for s in stages.strip("[] ").replace(",", " ").split()]
    return [int(stages)] if isinstance(stages, int) else [int(s) for s in stages]


class StageDoneTrigger(BaseTrigger):
    """Fires when every task of the stages is done, or when one stalls (its queue drained,
    confirmed on two polls, with tasks not done: the rest is dead-lettered): an error then.

    Each poll reads the workers' tallies, never the whole marker listing
    (:class:`chunk_ops.submit.StageWatch`).
    """

    def __init__(self, spec_url: str, queue_url: str, stages: list[int], aws_conn_id: str | None = "aws_default",
                 poll_interval: float = 10.0, stall_after_s: float = 60.0):
        super().__init__()
        self.spec_url = spec_url
        self.queue_url = queue_url
        self.stages = as_stages(stages)
        self.aws_conn_id = aws_conn_id
        self.poll_interval = poll_interval
        self.stall_after_s = stall_after_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"spec_url": self.spec_url, "queue_url": self.queue_url, "stages": self.stages,
             "aws_conn_id": self.aws_conn_id, "poll_interval": self.poll_interval,
             "stall_after_s": self.stall_after_s},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        watches = await asyncio.to_thread(open_watches, self.spec_url, self.queue_url, self.stages, self.aws_conn_id,
                                          self.stall_after_s)
        while True:
            event = await asyncio.to_thread(poll_watches, watches)
            if event["status"] != "running":
                yield TriggerEvent(event)
                return
            self.log.info("stages %s: %d of %d tasks done; %s", self.stages, event["done"], event["total"],
                          "; ".join(f"stage {p['stage']}: queue visible {p['visible']}, leased {p['in_flight']}, "
                                    f"dead {p['dead']}" for p in event["stages"]))
            await asyncio.sleep(self.poll_interval)
