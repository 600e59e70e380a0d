"""Task queues: one contract (``base.py``), two backends.

``sqs://<name>``               Amazon SQS (or any SQS-compatible endpoint)
``file:///path/queue.sqlite``  the embedded queue, on this machine's disk (default)
"""

from __future__ import annotations

from .base import DEFAULT_MAX_RECEIVES, Lease, LeaseLost, QueueCounts, TaskQueue


def open_queue(url: str, *, create: bool = False, max_receives: int | None = None) -> TaskQueue:
    """Open (or with ``create``, make) the queue named by ``url``."""
    if url.startswith("sqs://"):
        from .sqs import SqsQueue

        return SqsQueue(url, create=create, max_receives=max_receives)
    if url.startswith("file://") or url.startswith("/"):
        from .embedded import EmbeddedQueue

        return EmbeddedQueue(url if url.startswith("file://") else f"file://{url}",
                             create=create, max_receives=max_receives)
    raise ValueError(f"unsupported queue URL {url!r}: use sqs://<name> or file:///path/queue.sqlite")


def probe_queue(url: str) -> None:
    """Check that the queue named by ``url`` can be used (it may not exist yet); ValueError naming it."""
    if url.startswith("sqs://"):
        from .sqs import probe

        probe(url)
        return
    if url.startswith("file://") or url.startswith("/"):
        from ..storage import probe_writable

        path = url.removeprefix("file://")
        probe_writable("file://" + path.rsplit("/", 1)[0], what=f"queue {url}: its folder")
        return
    open_queue(url)  # raises: unsupported scheme


__all__ = ["DEFAULT_MAX_RECEIVES", "Lease", "LeaseLost", "QueueCounts", "TaskQueue", "open_queue"]
