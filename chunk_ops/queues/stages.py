"""A run's queues: one per stage, so each worker serves only the stages it is told.

Stage 1 (the network) uses the queue URL as given; stage 2 (merges) a sibling
named after it (``sqs://name`` -> ``sqs://name-merge``, ``file:///q.sqlite`` ->
``file:///q-merge.sqlite``).  A GPU worker told ``--stages 1`` never even sees a
merge, by construction: stage-2 tasks are never on its queue.  (One shared queue
cannot do that: a worker that receives a task it does not serve and puts it back
still counts a receive towards the dead-letter limit.)
"""

from __future__ import annotations

import re
import time
from typing import Callable

from . import open_queue
from .base import QueueCounts, TaskQueue

STAGES = (1, 2)


def stage_queue_url(url: str, stage: int) -> str:
    if stage == 1:
        return url
    if stage != 2:
        raise ValueError(f"stage {stage!r} is not one of {list(STAGES)}")
    match = re.fullmatch(r"(.*?)(\.sqlite3?|\.db)?", url.rstrip("/"))
    return f"{match.group(1)}-merge{match.group(2) or ''}"


class StageQueues:
    """The stage queues behind one queue URL; stage 1's must exist (or be created)."""

    REOPEN_S = 5.0  # a worker started before stage 2's queue exists looks again this often

    def __init__(self, url: str, *, create: bool = False, max_receives: int | None = None,
                 opener: Callable[..., TaskQueue] = open_queue):
        """``opener(url, create=, max_receives=)`` opens one queue (Airflow passes its hook's)."""
        self.url = url
        self._open = opener
        first = opener(url, create=create, max_receives=max_receives)
        self._queues: dict[int, TaskQueue] = {1: first}
        self._tried: dict[int, float] = {}
        if create:  # the merge queue gets the same receive limit
            self._queues[2] = opener(stage_queue_url(url, 2), create=True, max_receives=first.max_receives)

    @property
    def max_receives(self) -> int:
        return self._queues[1].max_receives

    def get(self, stage: int) -> TaskQueue | None:
        """The stage's queue, or None while it does not exist yet."""
        queue = self._queues.get(stage)
        if queue is None and time.monotonic() - self._tried.get(stage, -self.REOPEN_S) >= self.REOPEN_S:
            self._tried[stage] = time.monotonic()
            try:
                queue = self._queues[stage] = self._open(stage_queue_url(self.url, stage))
            except ValueError:
                return None
        return queue

    def of(self, stage: int) -> TaskQueue:
        queue = self.get(stage) or self._open(stage_queue_url(self.url, stage))
        self._queues[stage] = queue
        return queue

    def counts(self, stage: int) -> QueueCounts:
        queue = self.get(stage)
        return queue.counts() if queue is not None else QueueCounts(0, 0, 0)

    def dead_letters(self, max_messages: int = 10) -> list[str]:
        letters: list[str] = []
        for stage in STAGES:
            queue = self.get(stage)
            if queue is not None and len(letters) < max_messages:
                letters += queue.dead_letters(max_messages - len(letters))
        return letters
