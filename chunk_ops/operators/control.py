"""Operators that decide a task's fate: skip it, mark it done, delete its queue message.

Done markers are one small JSON object per task box, ``<prefix>/<x0-x1_y0-y1_z0-z1>.json``,
written whole (on local disk through a temporary name and a rename, see
:mod:`chunk_ops.storage`), so a marker that exists is complete: ``skip-if-done``
only asks whether it exists.  Put ``mark-done`` after the last write and
``delete-task`` after that: a task that fails before either is done again.
"""

from __future__ import annotations

import logging
import time

import click
import numpy as np

from ..geometry import Box
from ..queues import LeaseLost
from .base import ChainTask, Operator, input_chunk_option, operator, per_task

log = logging.getLogger("chunk_ops.chain")


def marker_name(box: Box) -> str:
    return f"{box.to_filename()}.json"


prefix_option = click.option("--prefix", required=True,
                             help="where the done markers are (file:///..., gs://..., s3://...)")


@operator("skip-all-zero")
@input_chunk_option
def skip_all_zero(input_name: str) -> Operator:
    """Drop tasks whose chunk is all zero (nothing to compute or write)."""
    return per_task("skip-all-zero", lambda task: task if np.any(task.chunk(input_name).array) else None)


@operator("skip-if-done")
@prefix_option
def skip_if_done(prefix: str) -> Operator:
    """Drop tasks that have a done marker under --prefix (written by mark-done)."""
    from cloudfiles import CloudFiles

    markers = CloudFiles(prefix)

    def check(task: ChainTask) -> ChainTask | None:
        if markers.exists(marker_name(task.box)):
            log.info("skip-if-done: %s is done", task.box)
            return None
        return task
    return per_task("skip-if-done", check)


@operator("mark-done")
@prefix_option
def mark_done(prefix: str) -> Operator:
    """Write the task's done marker under --prefix: its box, when it finished, seconds per operator."""
    from cloudfiles import CloudFiles

    from .. import storage  # noqa: F401  file:// markers are written whole

    markers = CloudFiles(prefix)

    def mark(task: ChainTask) -> ChainTask:
        task.fence()
        markers.put_json(marker_name(task.box), {"box": task.box.to_dict(), "finished_at": time.time(),
                                                 "seconds": task.seconds})
        return task
    return per_task("mark-done", mark)


@operator("delete-task")
def delete_task() -> Operator:
    """Delete the task's queue message (see fetch-task): it is done.  Tasks not from a queue pass."""
    def delete(task: ChainTask) -> ChainTask:
        if task.lease is not None:
            try:
                task.lease.delete()
            except LeaseLost as e:  # redelivered meanwhile: its new holder finds the work done
                log.warning("delete-task %s: %s", task.box, e)
            task.lease = None  # nothing left to fence
        return task
    return per_task("delete-task", delete)
