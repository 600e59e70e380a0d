"""``view``: a task's chunks in a local Neuroglancer viewer (:func:`chunk_ops.view.show_arrays`)."""

from __future__ import annotations

import sys

import click

from .base import ChainTask, Operator, operator, per_task


@operator("view")
@click.option("-i", "--input-chunk-name", "names", multiple=True,
              help="a chunk to show (repeat) [default: every chunk of the task]")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="address the viewer serves on (0.0.0.0: reachable from other machines)")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0: any free port")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="after each task, wait for Enter (Ctrl-C: stop waiting); only when stdin is a terminal")
def view(names: tuple[str, ...], bind: str, port: int, wait: bool) -> Operator:
    """Show each task's chunks in Neuroglancer; print the viewer's URL on stdout."""
    from ..view import show_arrays

    waiting = wait and sys.stdin.isatty()

    def show(task: ChainTask) -> ChainTask:
        nonlocal waiting
        shown = {name: task.chunk(name) for name in (names or sorted(task.chunks))}
        if not shown:
            raise ValueError("the task has no chunk to show; an operator before view must make one")
        url = show_arrays({name: (c.array, c.box, c.resolution, c.layer_type) for name, c in shown.items()},
                          bind=bind, port=port)
        click.echo(url)
        if waiting:
            try:
                input(f"{task.box}: {', '.join(shown)} at {url}; Enter: next task, Ctrl-C: stop waiting ")
            except (KeyboardInterrupt, EOFError):
                waiting = False
                click.echo("", err=True)
        return task
    return per_task("view", show)
