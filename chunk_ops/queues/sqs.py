"""Amazon SQS through boto3: ``sqs://<queue name>``.

Region and endpoint come from boto3's usual configuration (``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL_SQS`` or ``AWS_ENDPOINT_URL``), so a local SQS-compatible server
serves tests and docker-compose unchanged.  ``create=True`` makes the queue and its
dead-letter queue ``<name>-dead`` with a RedrivePolicy; SQS itself then moves a
message after ``max_receives`` receives.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterable

from .base import DEFAULT_MAX_RECEIVES, Lease, LeaseLost, QueueCounts, batched

_MAX_BATCH = 10  # SendMessageBatch / ReceiveMessage limit
_SEND_THREADS = 16
_IN_FLIGHT = 64
# error codes that mean the receipt handle no longer holds the message
_LEASE_GONE = {"ReceiptHandleIsInvalid", "MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight",
               "InvalidReceiptHandle"}


def sqs_client(url: str = "sqs://"):
    """A boto3 SQS client; a missing region or endpoint is a one-line error naming ``url``."""
    import boto3
    from botocore.exceptions import BotoCoreError

    from ..storage import describe_cloud_error

    try:
        return boto3.client("sqs")
    except BotoCoreError as e:
        raise ValueError(f"queue {url}: {describe_cloud_error(e)}") from None


def probe(url: str) -> None:
    """Can this queue be reached (region, credentials, endpoint)?  It may not exist yet."""
    from botocore.exceptions import BotoCoreError, ClientError

    from ..storage import describe_cloud_error

    name = url.removeprefix("sqs://").strip("/")
    if not name:
        raise ValueError(f"queue URL {url!r} names no queue (expected sqs://<name>)")
    client = sqs_client(url)
    try:
        client.get_queue_url(QueueName=name)
    except ClientError as e:
        code = e.response["Error"]["Code"]
        if "NonExistentQueue" not in code and "QueueDoesNotExist" not in code:  # a missing queue is made later
            raise ValueError(f"queue {url}: {describe_cloud_error(e)}") from None
    except BotoCoreError as e:
        raise ValueError(f"queue {url}: {describe_cloud_error(e)}") from None


class SqsQueue:
    def __init__(self, url: str, *, max_receives: int | None = None, create: bool = False, client=None):
        from botocore.exceptions import ClientError

        self.url = url
        self.name = url.removeprefix("sqs://").strip("/")
        if not self.name:
            raise ValueError(f"queue URL {url!r} names no queue (expected sqs://<name>)")
        self.client = client or sqs_client(url)
        self._ClientError = ClientError
        if create:
            self._create(max_receives or DEFAULT_MAX_RECEIVES)
        try:
            self.queue_url = self.client.get_queue_url(QueueName=self.name)["QueueUrl"]
            self.dead_url = self.client.get_queue_url(QueueName=f"{self.name}-dead")["QueueUrl"]
        except ClientError as e:
            raise ValueError(f"no SQS queue {self.name!r} (or its {self.name}-dead): {e}") from None
        policy = self.client.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
        )["Attributes"].get("RedrivePolicy")
        self.max_receives = int(json.loads(policy)["maxReceiveCount"]) if policy else DEFAULT_MAX_RECEIVES

    def _create(self, max_receives: int) -> None:
        dead_url = self.client.create_queue(QueueName=f"{self.name}-dead")["QueueUrl"]
        dead_arn = self.client.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])[
            "Attributes"]["QueueArn"]
        redrive = json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": str(max_receives)})
        url = self.client.create_queue(QueueName=self.name)["QueueUrl"]
        current = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["RedrivePolicy"]).get("Attributes", {})
        if "RedrivePolicy" not in current:  # an existing queue keeps its receive limit
            self.client.set_queue_attributes(QueueUrl=url, Attributes={"RedrivePolicy": redrive})

    def send_batch(self, bodies: Iterable[str]) -> int:
        """Send in SendMessageBatch calls of 10, several in flight at once.

        Each call waits a network round trip, so calls overlap on threads; at most
        ``_IN_FLIGHT`` batches are pending, so a long stream is never held in memory.
        """
        sent = 0
        with ThreadPoolExecutor(max_workers=_SEND_THREADS) as pool:
            pending: set[Future] = set()
            for batch in batched(bodies, _MAX_BATCH):
                if len(pending) >= _IN_FLIGHT:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    sent += sum(f.result() for f in finished)
                pending.add(pool.submit(self._send, batch))
            sent += sum(f.result() for f in pending)
        return sent

    def _send(self, bodies: list[str]) -> int:
        entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)]
        result = self.client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
        if result.get("Failed"):
            raise RuntimeError(f"SQS refused {len(result['Failed'])} messages: {result['Failed'][:3]}")
        return len(bodies)

    def receive(self, max_messages: int = 1, visibility_timeout: float = 60.0,
                wait_seconds: float = 0.0) -> list[Lease]:
        result = self.client.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max(1, min(max_messages, _MAX_BATCH)),
            VisibilityTimeout=math.ceil(visibility_timeout),
            WaitTimeSeconds=min(20, math.ceil(wait_seconds)),
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        return [
            Lease(m["MessageId"], m["ReceiptHandle"], m["Body"],
                  int(m.get("Attributes", {}).get("ApproximateReceiveCount", 1)))
            for m in result.get("Messages", [])
        ]

    def _lease_error(self, lease: Lease, error) -> Exception:
        """LeaseLost when SQS says the receipt no longer holds the message; any other
        error (throttling, a 5xx) is returned as it is, so callers retry it."""
        code = error.response.get("Error", {}).get("Code", "")
        message = error.response.get("Error", {}).get("Message", "")
        if code in _LEASE_GONE or "receipt handle" in message.lower() or "not available" in message.lower():
            return LeaseLost(f"message {lease.message_id}: {code}: {message}")
        return error

    def _visibility(self, lease: Lease, seconds: int) -> None:
        try:
            self.client.change_message_visibility(
                QueueUrl=self.queue_url, ReceiptHandle=lease.receipt, VisibilityTimeout=seconds)
        except self._ClientError as e:
            raise self._lease_error(lease, e) from None

    def extend(self, lease: Lease, visibility_timeout: float) -> None:
        self._visibility(lease, math.ceil(visibility_timeout))

    def release(self, lease: Lease) -> None:
        self._visibility(lease, 0)

    def delete(self, lease: Lease) -> None:
        try:
            self.client.delete_message(QueueUrl=self.queue_url, ReceiptHandle=lease.receipt)
        except self._ClientError as e:
            raise self._lease_error(lease, e) from None

    def _approximate(self, url: str) -> tuple[int, int]:
        attrs = self.client.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def counts(self) -> QueueCounts:
        visible, in_flight = self._approximate(self.queue_url)
        dead_visible, dead_hidden = self._approximate(self.dead_url)
        return QueueCounts(visible, in_flight, dead_visible + dead_hidden)

    def dead_letters(self, max_messages: int = 10) -> list[str]:
        result = self.client.receive_message(
            QueueUrl=self.dead_url, MaxNumberOfMessages=max(1, min(max_messages, _MAX_BATCH)),
            VisibilityTimeout=0,
        )
        return [m["Body"] for m in result.get("Messages", [])]

    def redrive(self, keep: Callable[[str], bool] | None = None, deadline_s: float = 300.0) -> int:
        """Receive from the dead-letter queue, send to the queue, then delete: a crash in
        between leaves a copy in both, and a copy is harmless (a done chunk is skipped).
        Letters ``keep`` refuses (another job's) stay, hidden for the move's duration.
        Moved by hand rather than with StartMessageMoveTask, which moves all or nothing,
        runs asynchronously and is missing from SQS-compatible servers.  The approximate
        counts may read 0 for a while, so it goes on until two receives come back empty."""
        moved, empty, deadline = 0, 0, time.monotonic() + deadline_s
        while empty < 2 and time.monotonic() < deadline:
            messages = self.client.receive_message(
                QueueUrl=self.dead_url, MaxNumberOfMessages=_MAX_BATCH, VisibilityTimeout=math.ceil(deadline_s) + 60,
                WaitTimeSeconds=1,
            ).get("Messages", [])
            empty = 0 if messages else empty + 1
            ours = [m for m in messages if keep is None or keep(m["Body"])]
            if not ours:
                continue
            self._send([m["Body"] for m in ours])
            self.client.delete_message_batch(QueueUrl=self.dead_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(ours)])
            moved += len(ours)
        return moved

    def purge(self) -> None:
        self.client.purge_queue(QueueUrl=self.queue_url)
