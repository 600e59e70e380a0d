"""The task-queue contract every backend keeps (SQS semantics).

- ``send_batch``: enqueue message bodies (strings), in batches.
- ``receive``: lease up to n visible messages for a visibility timeout; each comes
  back with its receive count.  A message whose receive count would pass
  ``max_receives`` goes to the dead-letter queue instead (SQS RedrivePolicy).
- ``extend``: push a lease's expiry out (the heartbeat); ``release``: make it visible
  again now (visibility 0); ``delete``: done, remove it.  A lease that has expired
  and been handed to someone else raises :class:`LeaseLost`.
- ``counts``: visible, in flight (leased) and dead-lettered messages.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol

DEFAULT_MAX_RECEIVES = 5


def batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    """Lists of up to n items, streaming (itertools.batched arrives in Python 3.12)."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


class LeaseLost(RuntimeError):
    """The lease expired and the message was received again (or deleted)."""


@dataclass(frozen=True)
class Lease:
    """A received message: its body, and the handle that proves the lease."""

    message_id: str
    receipt: str
    body: str
    receive_count: int


@dataclass(frozen=True)
class QueueCounts:
    visible: int
    in_flight: int
    dead: int

    @property
    def pending(self) -> int:
        """Work not yet done: visible plus leased."""
        return self.visible + self.in_flight


class TaskQueue(Protocol):
    url: str
    max_receives: int

    def send_batch(self, bodies: Iterable[str]) -> int: ...

    def receive(self, max_messages: int = 1, visibility_timeout: float = 60.0) -> list[Lease]: ...

    def extend(self, lease: Lease, visibility_timeout: float) -> None: ...

    def release(self, lease: Lease) -> None: ...

    def delete(self, lease: Lease) -> None: ...

    def counts(self) -> QueueCounts: ...

    def dead_letters(self, max_messages: int = 10) -> list[str]:
        """Bodies of dead-lettered messages (a peek, for reports)."""
        ...

    def redrive(self, keep: Callable[[str], bool] | None = None) -> int:
        """Move the dead-lettered messages whose body ``keep`` accepts (all by default) back
        onto the queue with a fresh receive count, after the cause was fixed; returns how
        many moved.  A queue may be shared by jobs: ``keep`` picks one job's letters."""
        ...

    def purge(self) -> None: ...
