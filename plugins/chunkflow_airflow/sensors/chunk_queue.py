"""Sensors for chunk_ops runs."""

from __future__ import annotations

from typing import Any, Sequence

from airflow.sdk import BaseSensorOperator, conf

from chunkflow_airflow.triggers.chunk_queue import StageDoneTrigger, stage_progress


class StageDoneSensor(BaseSensorOperator):
    """Waits until every chunk of a stage has its done marker.

    Deferrable by default (``[operators] default_deferrable``): the wait happens in the
    triggerer, holding no worker slot. Fails when the queue drains with chunks not done.
    """

    template_fields: Sequence[str] = ("spec_url", "queue_url", "stage", "aws_conn_id")

    def __init__(self, *, spec_url: str, queue_url: str, stage: int, aws_conn_id: str | None = "aws_default",
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=True),
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_url = spec_url
        self.queue_url = queue_url
        self.stage = stage
        self.aws_conn_id = aws_conn_id
        self.deferrable = deferrable

    def _check(self, progress: dict) -> bool:
        if progress["done"] == progress["total"]:
            return True
        if progress["visible"] == 0 and progress["in_flight"] == 0:
            raise RuntimeError(f"stage {self.stage} stopped with {progress['total'] - progress['done']} chunks "
                               f"not done; {progress['dead']} dead-lettered tasks: {progress}")
        return False

    def poke(self, context) -> bool:
        return self._check(stage_progress(self.spec_url, self.queue_url, int(self.stage), self.aws_conn_id))

    def execute(self, context) -> Any:
        if not self.deferrable or self.poke(context):
            return super().execute(context) if not self.deferrable else None
        self.defer(
            trigger=StageDoneTrigger(self.spec_url, self.queue_url, int(self.stage), self.aws_conn_id,
                                     poll_interval=self.poke_interval),
            method_name="execute_complete",
        )

    def execute_complete(self, context, event: dict | None = None) -> dict:
        if not event or event.get("status") != "success":
            raise RuntimeError(f"stage {self.stage} did not finish: {event}")
        self.log.info("stage %s done: %d of %d chunks", self.stage, event["done"], event["total"])
        return event
