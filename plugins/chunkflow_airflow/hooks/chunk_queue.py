"""The task queue of a run, opened from Airflow.

``sqs://`` queues use the Amazon provider's ``SqsHook`` and its Airflow connection
(region, credentials, and an ``endpoint_url`` extra for a local SQS-compatible
server); ``file://`` queues are chunk_ops' embedded queue on this machine.
"""

from __future__ import annotations

from functools import cached_property

from airflow.sdk import BaseHook


class ChunkQueueHook(BaseHook):
    """Wraps a chunk_ops ``TaskQueue``; the client is built lazily."""

    def __init__(self, queue_url: str, aws_conn_id: str | None = "aws_default", max_receives: int | None = None):
        super().__init__()
        self.queue_url = queue_url
        self.aws_conn_id = aws_conn_id
        self.max_receives = max_receives

    @cached_property
    def sqs_hook(self):
        from airflow.providers.amazon.aws.hooks.sqs import SqsHook

        return SqsHook(aws_conn_id=self.aws_conn_id)

    def _open(self, url: str, *, create: bool = False, max_receives: int | None = None):
        if url.startswith("sqs://"):
            from chunk_ops.queues.sqs import SqsQueue

            return SqsQueue(url, create=create, max_receives=max_receives, client=self.sqs_hook.get_conn())
        from chunk_ops.queues import open_queue

        return open_queue(url, create=create, max_receives=max_receives)

    def get_queues(self, create: bool = False):
        """The run's stage queues (``chunk_ops.queues.stages``), through this hook's connection."""
        from chunk_ops.queues.stages import StageQueues

        return StageQueues(self.queue_url, create=create, max_receives=self.max_receives, opener=self._open)

    def worker_env(self) -> dict[str, str]:
        """Environment for a worker pod or process to reach the same queue."""
        if not self.queue_url.startswith("sqs://"):
            return {}
        conn = self.sqs_hook.conn_config
        env = {}
        if conn.region_name:
            env["AWS_DEFAULT_REGION"] = conn.region_name
        if conn.endpoint_url:
            env["AWS_ENDPOINT_URL_SQS"] = conn.endpoint_url
        return env
