"""Sensors for chunk_ops runs."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.sdk import BaseSensorOperator, conf

from chunkflow_airflow.links import RUN_LINKS
from chunkflow_airflow.triggers.chunk_queue import StageDoneTrigger, as_stages, open_watches, poll_watches


class StageDoneSensor(BaseSensorOperator):
    """Waits until every task of ``stages`` (one stage or a list) has its done marker.

    Deferrable by default (``[operators] default_deferrable``): the wait happens in the
    triggerer, holding no worker slot. Polls cost a read per worker, not a marker listing;
    fails when a stage stalls (its queue drained, on two polls, with tasks not done).
    """

    template_fields: Sequence[str] = ("spec_url", "queue_url", "stages", "aws_conn_id")
    operator_extra_links = RUN_LINKS

    def __init__(self, *, spec_url: str, queue_url: str, stages: int | Sequence[int] | str,
                 aws_conn_id: str | None = "aws_default", stall_after_s: float = 60.0,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=True),
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_url = spec_url
        self.queue_url = queue_url
        self.stages = stages
        self.aws_conn_id = aws_conn_id
        self.stall_after_s = stall_after_s  # the queue empty this long, no progress, tasks missing: fail
        self.deferrable = deferrable
        self._watches: list | None = None  # kept across pokes (poke mode)

    def _check(self, event: dict) -> bool:
        if event["status"] == "error":
            raise RuntimeError(f"stages {as_stages(self.stages)}: {event['message']}: {event['stages']}")
        return event["status"] == "success"

    def poke(self, context) -> bool:
        if not as_stages(self.stages):
            return True  # nothing to wait for (e.g. no post-processing)
        if self._watches is None:
            self._watches = open_watches(self.spec_url, self.queue_url, as_stages(self.stages), self.aws_conn_id,
                                         self.stall_after_s)
        return self._check(poll_watches(self._watches))

    def execute(self, context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if not as_stages(self.stages):
            return None
        self.defer(
            trigger=StageDoneTrigger(self.spec_url, self.queue_url, as_stages(self.stages), self.aws_conn_id,
                                     poll_interval=self.poke_interval, stall_after_s=self.stall_after_s),
            method_name="execute_complete",
        )

    def execute_complete(self, context, event: dict | None = None) -> dict:
        if not event or event.get("status") != "success":
            raise RuntimeError(f"stages {as_stages(self.stages)} did not finish: {event}")
        self.log.info("stages %s done: %d of %d tasks", as_stages(self.stages), event["done"], event["total"])
        return event
