"""Operators for chunk_ops runs."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

from airflow.sdk import BaseOperator

from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook
from chunkflow_airflow.links import RUN_LINKS


class EnqueueChunksOperator(BaseOperator):
    """Enqueue one stage's tasks of a prepared job, skipping chunks already done.

    Returns the number of tasks sent (0 for a rerun of a finished job).
    """

    template_fields: Sequence[str] = ("spec_url", "queue_url", "stage", "aws_conn_id", "max_receives")
    operator_extra_links = RUN_LINKS

    def __init__(self, *, spec_url: str, queue_url: str, stage: int, aws_conn_id: str | None = "aws_default",
                 max_receives: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec_url = spec_url
        self.queue_url = queue_url
        self.stage = stage
        self.aws_conn_id = aws_conn_id
        self.max_receives = max_receives

    @cached_property
    def hook(self) -> ChunkQueueHook:
        max_receives = int(self.max_receives) if self.max_receives is not None else None
        return ChunkQueueHook(self.queue_url, self.aws_conn_id, max_receives)

    def execute(self, context) -> int:
        from chunk_ops.job import Job
        from chunk_ops.submit import enqueue_stage

        job = Job.from_spec_url(self.spec_url)
        sent = enqueue_stage(job, self.hook.get_queues(create=True), int(self.stage))
        self.log.info("stage %s of job %s: %d tasks sent, %d already done",
                      self.stage, job.id, sent, len(job.plan) - sent)
        return sent
