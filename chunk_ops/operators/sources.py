"""Operators that start tasks: a grid over a region, a queue, a synthetic chunk.

``generate-tasks`` tiles a region with task boxes and passes them on, or sends them
to a queue; ``fetch-task`` leases them from that queue, so any number of
``chunk-ops chain fetch-task ...`` processes share the work.  A leased task keeps
its lease alive (the worker's :class:`~chunk_ops.worker.Heartbeat`) while it moves
through the chain; ``delete-task`` at the end removes its message.  A chain that
fails mid-task stops renewing the lease, which expires, and the task comes back.

A chain-task message is small, versioned JSON, validated on receipt (never pickle)::

    {"v": 1, "kind": "chain", "box": {"start": [x, y, z], "stop": [x, y, z]}}
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import click
import numpy as np

from ..geometry import Box, ChunkPlan, Vec3
from ..queues import Lease, TaskQueue, open_queue, probe_queue
from ..task import TaskError
from .base import ChainTask, Chunk, Operator, box_option, operator, output_chunk_option, source, triple_option

if TYPE_CHECKING:
    from ..worker import Heartbeat

log = logging.getLogger("chunk_ops.chain")

MESSAGE_VERSION = 1
MESSAGE_KIND = "chain"


def chain_message(box: Box) -> str:
    """The queue message of a chain task."""
    return json.dumps({"v": MESSAGE_VERSION, "kind": MESSAGE_KIND, "box": box.to_dict()}, separators=(",", ":"))


def message_box(body: str) -> Box:
    """The box of a received chain-task message; :class:`TaskError` if it is not one."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, TypeError) as e:
        raise TaskError(f"chain-task message is not JSON ({e}): {body[:200]!r}") from None
    if not isinstance(doc, dict) or set(doc) != {"v", "kind", "box"}:
        raise TaskError(f'a chain-task message is {{"v", "kind", "box"}}, got {body[:200]!r}')
    if doc["v"] != MESSAGE_VERSION or doc["kind"] != MESSAGE_KIND:
        raise TaskError(f"chain-task message v {doc['v']!r}, kind {doc['kind']!r} is not supported "
                        f"(expected v {MESSAGE_VERSION}, kind {MESSAGE_KIND!r})")
    try:
        return Box.from_dict(doc["box"])
    except (ValueError, TypeError) as e:
        raise TaskError(f"chain-task message box: {e}") from None


@operator("generate-tasks")
@box_option("--roi", help="the region to cover")
@click.option("--volume", "volume_url", help="cover this layer's bounds instead of --roi (any volume URL)")
@click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
              help="the mip level of --volume's bounds")
@triple_option("--chunk-size", required=True, help="task size")
@triple_option("--grid-origin", help="where the task grid starts [default: the region's start]")
@click.option("--queue", "queue_url", help="send the tasks to this queue (made if missing) for fetch-task, "
                                           "instead of passing them on")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N tasks (x fastest, then y, z)")
def generate_tasks(roi: Box | None, volume_url: str | None, mip: int, chunk_size: Vec3,
                   grid_origin: Vec3 | None, queue_url: str | None, limit: int | None) -> Operator:
    """Tasks tiling a region on a grid; tasks at the region's faces are clipped to it."""
    if (roi is None) == (volume_url is None):
        raise click.UsageError("generate-tasks: give exactly one of --roi and --volume")
    if roi is None:
        from ..volumes import open_volume

        roi = open_volume(volume_url, mip).bounds
    plan = ChunkPlan(roi, chunk_size, grid_origin or roi.start)
    boxes = plan if limit is None else itertools.islice(plan, limit)
    if queue_url is None:
        return source("generate-tasks", lambda: (ChainTask(box) for box in boxes))
    probe_queue(queue_url)  # a bad URL fails here, before any operator runs; the queue is made then

    def send() -> Iterator[ChainTask]:
        sent = open_queue(queue_url, create=True).send_batch(chain_message(box) for box in boxes)
        click.echo(f"generate-tasks: sent {sent} tasks to {queue_url}", err=True)
        return iter(())
    return source("generate-tasks", send)


@dataclass
class QueueLease:
    """A fetched task's message, renewed by a heartbeat until the task leaves the chain."""

    queue: TaskQueue
    lease: Lease
    heartbeat: Heartbeat

    def confirm(self) -> None:
        self.heartbeat.confirm()

    def delete(self) -> None:
        self.heartbeat.stop()
        self.queue.delete(self.lease)


@operator("fetch-task")
@click.option("--queue", "queue_url", required=True, help="sqs://NAME or file:///path/queue.sqlite")
@click.option("--visibility-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="lease length in seconds; a heartbeat renews it while the task runs")
@click.option("--idle-exit", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="stop after the queue stays empty this many seconds")
@click.option("--max-tasks", type=click.IntRange(min=1), help="stop after this many tasks")
def fetch_task(queue_url: str, visibility_timeout: float, idle_exit: float, max_tasks: int | None) -> Operator:
    """Lease tasks from a queue (see generate-tasks --queue); end the chain with delete-task."""
    from ..worker import Worker, WorkerConfig

    # the worker's lease keeping (heartbeat, task deadline, give-back on exit) reads a worker's config
    worker = Worker(WorkerConfig(queue_url, visibility_timeout_s=visibility_timeout, idle_exit_s=idle_exit))
    queue = worker.queues.of(1)

    def fetch() -> Iterator[ChainTask]:
        fetched, idle_since = 0, time.monotonic()
        while max_tasks is None or fetched < max_tasks:
            leases = queue.receive(1, visibility_timeout, wait_seconds=min(1.0, idle_exit))
            if not leases:
                if time.monotonic() - idle_since >= idle_exit:
                    return
                continue
            lease = leases[0]
            try:
                box = message_box(lease.body)
            except TaskError as e:  # back at once: its receives run out into the dead-letter queue
                log.error("fetch-task: message %s: %s", lease.message_id, e)
                queue.release(lease)
                continue
            with worker.holding(lease, queue) as heartbeat:
                yield ChainTask(box, lease=QueueLease(queue, lease, heartbeat))  # back once it left the chain
            fetched, idle_since = fetched + 1, time.monotonic()
    return source("fetch-task", fetch)


PATTERNS = ("zeros", "random", "ramp")
DTYPES = ("uint8", "uint16", "uint32", "uint64", "float32", "float64")


def synthetic_array(box: Box, channels: int, dtype: str, pattern: str, seed: int) -> np.ndarray:
    """(c, z, y, x) values of a synthetic chunk.

    ``random``: uniform in [0, 1) for floats, over the whole range for integers, seeded.
    ``ramp``: ``x + y + z + c`` at each voxel (global coordinates), wrapping around in
    integer types too small for it.
    """
    shape = (channels, *box.shape.zyx())
    if pattern == "zeros":
        return np.zeros(shape, dtype)
    if pattern == "random":
        rng = np.random.default_rng(seed)
        if np.dtype(dtype).kind == "f":
            return rng.random(shape).astype(dtype)
        return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)
    c, z, y, x = np.ogrid[:channels, box.start.z:box.stop.z, box.start.y:box.stop.y, box.start.x:box.stop.x]
    return (x + y + z + c).astype(np.int64).astype(dtype)


@operator("create-chunk")
@triple_option("--size", default=(64, 64, 8), help="chunk size")
@triple_option("--voxel-offset", default=(0, 0, 0), help="where the chunk starts")
@click.option("--channels", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default="uint8", show_default=True)
@click.option("--pattern", type=click.Choice(PATTERNS), default="random", show_default=True,
              help="zeros; random (seeded); ramp: x + y + z + c at each voxel")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resolution", nargs=3, type=click.FloatRange(min=0, min_open=True), default=(1.0, 1.0, 1.0),
              show_default=True, help="nm per voxel (x y z)")
@output_chunk_option
def create_chunk(size: Vec3, voxel_offset: Vec3, channels: int, dtype: str, pattern: str, seed: int,
                 resolution: tuple[float, float, float], output_name: str) -> Operator:
    """One task with a synthetic chunk, for trying chains out."""
    if not size.all_positive():
        raise click.BadParameter(f"--size {size.to_list()} must be positive on every axis")
    box = Box.from_shape(voxel_offset, size)

    def make() -> Iterator[ChainTask]:
        chunk = Chunk(synthetic_array(box, channels, dtype, pattern, seed), box, resolution)
        yield ChainTask(box, {output_name: chunk})
    return source("create-chunk", make)
