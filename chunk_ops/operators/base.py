"""What chunk operators share: the stream item, the registry, the chained command.

``chunk-ops chain OP [OPTIONS] OP [OPTIONS] ...`` composes operators as chunkflow's
command line does (click ``group(chain=True)``).  Each operator's command runs its
set-up once (parse options, load a model, open a volume) and returns a function
from a stream of :class:`ChainTask` to a stream of them; the result callback
threads the stream through every operator in order and drains it.

A task carries the region it is about (``box``) and named chunks (``chunks``,
default name ``"chunk"``, like chunkflow's ``-i``/``-o`` chunk names); operators
read and add chunks by name.  An operator drops a task from the rest of the chain
by not yielding it (``skip-all-zero``, ``skip-if-done``).

Adding an operator is one module in this package that defines it with
:func:`operator`; every module here is imported when the chain command is built.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import click
import numpy as np

from ..geometry import Box, Vec3
from ..queues.base import LeaseLost

log = logging.getLogger("chunk_ops.chain")

DEFAULT_CHUNK = "chunk"


@dataclass
class Chunk:
    """An array with where it lies: (c, z, y, x) voxels of ``box`` at ``resolution`` (nm, x y z)."""

    array: np.ndarray
    box: Box
    resolution: tuple[float, float, float]
    layer_type: str = "image"  # "image" or "segmentation", as Neuroglancer names them

    def __post_init__(self) -> None:
        if self.array.ndim != 4:
            raise ValueError(f"a chunk array is (c, z, y, x); got shape {self.array.shape}")
        if tuple(self.array.shape[1:]) != self.box.shape.zyx():
            raise ValueError(f"chunk array of shape {self.array.shape} does not fit {self.box} "
                             f"(z, y, x {self.box.shape.zyx()})")

    def replace(self, array: np.ndarray, **changes: Any) -> "Chunk":
        """The same place, new values (same shape in z, y, x unless ``box`` changes too)."""
        return Chunk(array, changes.get("box", self.box), changes.get("resolution", self.resolution),
                     changes.get("layer_type", self.layer_type))


class HeldLease(Protocol):
    """The queue message a task came from, kept leased while the task moves through the chain."""

    def confirm(self) -> None:
        """The write fence: renew the lease now, or raise LeaseLost."""

    def delete(self) -> None:
        """The task is done: remove its message (raises LeaseLost if another worker has it now)."""


@dataclass
class ChainTask:
    """One item of the stream: a region, the chunks made for it so far, and bookkeeping."""

    box: Box
    chunks: dict[str, Chunk] = field(default_factory=dict)
    lease: HeldLease | None = None  # set by fetch-task; delete-task deletes the message
    seconds: dict[str, float] = field(default_factory=dict)  # operator name -> time spent

    def fence(self) -> None:
        """Call right before writing: a task whose lease was lost (another worker has it) writes nothing."""
        if self.lease is not None:
            self.lease.confirm()

    def chunk(self, name: str) -> Chunk:
        try:
            return self.chunks[name]
        except KeyError:
            raise click.UsageError(
                f"no chunk named {name!r} in task {self.box} (chunks: {sorted(self.chunks) or 'none'}); "
                f"an operator before this one must make it (e.g. load-precomputed -o {name})"
            ) from None


Operator = Callable[[Iterator[ChainTask]], Iterator[ChainTask]]


@click.group(chain=True, name="chain")
@click.pass_context
def chain(ctx: click.Context) -> None:
    """Compose chunk operators in one command, as in chunkflow.

    \b
    chunk-ops chain generate-tasks --roi 0 0 0 512 512 64 --chunk-size 256 256 32 \\
        load-precomputed --url file:///data/em \\
        inference --job job.json \\
        save-precomputed --url file:///data/affinities
    """


@chain.result_callback()
def run_chain(operators: list[Operator]) -> None:
    stream: Iterator[ChainTask] = iter(())
    streams = []
    for op in operators:
        stream = op(stream)
        streams.append(stream)
    started, done = time.perf_counter(), 0
    try:
        for _ in stream:
            done += 1
    except ValueError as e:  # bad input met mid-stream (VolumeError, SpecError...): its message names it
        raise click.ClickException(str(e)) from None
    finally:
        # close every stage now, not when the traceback dies, so sources let go of what
        # they hold (fetch-task stops renewing a failed task's lease, which then expires)
        for s in reversed(streams):
            getattr(s, "close", lambda: None)()
    click.echo(f"{done} tasks through {len(operators)} operators in {time.perf_counter() - started:.1f} s", err=True)


def operator(name: str, **command_kwargs: Any) -> Callable:
    """Register a chain command; the decorated function does the set-up and returns an Operator.

    A ``ValueError`` in the set-up (a bad URL, spec or option) becomes a one-line error
    naming the operator.
    """
    def register(setup: Callable[..., Operator]) -> click.Command:
        @functools.wraps(setup)  # keeps the click options and the help text
        def checked(*args: Any, **kwargs: Any) -> Operator:
            try:
                return setup(*args, **kwargs)
            except ValueError as e:
                raise click.ClickException(f"{name}: {e}") from None
        return chain.command(name, **command_kwargs)(checked)
    return register


def per_task(name: str, fn: Callable[[ChainTask], ChainTask | None]) -> Operator:
    """An Operator applying ``fn`` to each task (timed under ``name``); ``None`` drops the task.

    A ``ValueError`` stops the chain with a one-line error naming the operator and the
    task; a task whose lease was lost is dropped (another worker has it now).
    """
    def run(stream: Iterator[ChainTask]) -> Iterator[ChainTask]:
        for task in stream:
            t0 = time.perf_counter()
            try:
                result = fn(task)
            except ValueError as e:
                raise click.ClickException(f"{name} {task.box}: {e}") from None
            except LeaseLost as e:
                log.warning("%s %s: dropped, its lease is lost: %s", name, task.box, e)
                continue
            task.seconds[name] = task.seconds.get(name, 0.0) + time.perf_counter() - t0
            if result is not None:
                yield result
    return run


def map_chunk(name: str, input_name: str, output_name: str, fn: Callable[[Chunk], Chunk]) -> Operator:
    """An Operator that makes chunk ``output_name`` of each task from its chunk ``input_name``."""
    def run(task: ChainTask) -> ChainTask:
        task.chunks[output_name] = fn(task.chunk(input_name))
        return task
    return per_task(name, run)


def source(name: str, make: Callable[[], Iterable[ChainTask]]) -> Operator:
    """An Operator that passes upstream tasks on, then adds its own (task sources)."""
    def run(stream: Iterator[ChainTask]) -> Iterator[ChainTask]:
        yield from stream
        yield from make()
    return run


def triple_option(*names: str, required: bool = False, default: tuple[int, int, int] | None = None,
                  help: str = "") -> Callable:
    """An option taking three integers ``x y z``, handed to the command as a :class:`Vec3` (or None)."""
    def to_vec3(ctx, param, value):
        return None if value is None else Vec3.of(value)
    return click.option(*names, nargs=3, type=int, required=required, default=default, callback=to_vec3,
                        show_default=default is not None, help=help + " (x y z)")


def box_option(*names: str, required: bool = False, help: str = "") -> Callable:
    """An option taking six integers ``x0 y0 z0 x1 y1 z1``, handed to the command as a :class:`Box` (or None)."""
    def to_box(ctx, param, value):
        if value is None:
            return None
        try:
            return Box(Vec3.of(value[:3]), Vec3.of(value[3:]))
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return click.option(*names, nargs=6, type=int, required=required, default=None, callback=to_box,
                        metavar="X0 Y0 Z0 X1 Y1 Z1", help=help + " (voxels, half-open: start x y z, stop x y z)")


input_chunk_option = click.option("-i", "--input-chunk-name", "input_name", default=DEFAULT_CHUNK,
                                  show_default=True, help="the chunk this operator reads")
output_chunk_option = click.option("-o", "--output-chunk-name", "output_name", default=DEFAULT_CHUNK,
                                   show_default=True, help="the name of the chunk this operator makes")


def load_all() -> click.Group:
    """Import every operator module of this package (each registers its commands) and return the group."""
    for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        if module.name != "base":
            importlib.import_module(f"{__package__}.{module.name}")
    return chain
