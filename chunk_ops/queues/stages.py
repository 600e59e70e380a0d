"""A run's queues: one per stage, so each worker serves only the stages it is told.

Stage 1 (the network) uses the queue URL as given; stage 2 (merges) a sibling
named after it (``sqs://name`` -> ``sqs://name-merge``, ``file:///q.sqlite`` ->
``file:///q-merge.sqlite``); the post-processing stages (3-6: blockwise segmentation,
pyramid) share a third, ``-post``: CPU work, each task naming its stage, served together.
A GPU worker told ``--stages 1`` never even sees a merge, by construction: stage-2
tasks are never on its queue.  (One shared queue cannot do that: a worker that
receives a task it does not serve and puts it back still counts a receive towards
the dead-letter limit.)
"""

from __future__ import annotations

import re
import time
from typing import Callable

from . import open_queue
from .base import QueueCounts, TaskQueue

from ..task import STAGES

SUFFIXES = {2: "-merge", 3: "-post", 4: "-post", 5: "-post", 6: "-post"}
QUEUE_STAGES = (1, 2, 3)  # a stage on each queue
POST_STAGES = (3, 4, 5, 6)  # on the one -post queue


def stage_queue_url(url: str, stage: int) -> str:
    if stage == 1:
        return url
    if stage not in SUFFIXES:
        raise ValueError(f"stage {stage!r} is not one of {list(STAGES)}")
    match = re.fullmatch(r"(.*?)(\.sqlite3?|\.db)?", url.rstrip("/"))
    return f"{match.group(1)}{SUFFIXES[stage]}{match.group(2) or ''}"


class StageQueues:
    """The stage queues behind one queue URL; stage 1's must exist (or be created)."""

    REOPEN_S = 5.0  # a worker started before stage 2's queue exists looks again this often

    def __init__(self, url: str, *, create: bool = False, max_receives: int | None = None,
                 opener: Callable[..., TaskQueue] = open_queue):
        """``opener(url, create=, max_receives=)`` opens one queue (Airflow passes its hook's)."""
        self.url = url
        self._open = opener
        first = opener(url, create=create, max_receives=max_receives)
        self._queues: dict[str, TaskQueue] = {url: first}  # by queue URL: stages 3-6 share one
        self._tried: dict[str, float] = {}
        if create:  # the other stages' queues get the same receive limit
            for stage in QUEUE_STAGES[1:]:
                other = stage_queue_url(url, stage)
                self._queues[other] = opener(other, create=True, max_receives=first.max_receives)

    @property
    def max_receives(self) -> int:
        return self._queues[self.url].max_receives

    def get(self, stage: int) -> TaskQueue | None:
        """The stage's queue, or None while it does not exist yet."""
        url = stage_queue_url(self.url, stage)
        queue = self._queues.get(url)
        if queue is None and time.monotonic() - self._tried.get(url, -self.REOPEN_S) >= self.REOPEN_S:
            self._tried[url] = time.monotonic()
            try:
                queue = self._queues[url] = self._open(url)
            except ValueError:
                return None
        return queue

    def of(self, stage: int) -> TaskQueue:
        queue = self.get(stage) or self._open(stage_queue_url(self.url, stage))
        self._queues[stage_queue_url(self.url, stage)] = queue
        return queue

    def counts(self, stage: int) -> QueueCounts:
        queue = self.get(stage)
        return queue.counts() if queue is not None else QueueCounts(0, 0, 0)

    def dead_letters(self, max_messages: int = 10) -> list[str]:
        letters: list[str] = []
        for stage in QUEUE_STAGES:
            queue = self.get(stage)
            if queue is not None and len(letters) < max_messages:
                letters += queue.dead_letters(max_messages - len(letters))
        return letters

    def redrive(self, keep: Callable[[str], bool] | None = None) -> dict[int, int]:
        """The dead letters ``keep`` accepts (all by default) back on their stage queues after
        a fix: how many moved, by queue (named by its first stage)."""
        moved = {}
        for stage in QUEUE_STAGES:
            queue = self.get(stage)
            if queue is not None:
                moved[stage] = queue.redrive(keep)
        return moved
