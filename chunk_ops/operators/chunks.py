"""Operators on a task's named chunks: copy-chunk, delete-chunk, multiply."""

from __future__ import annotations

import click
import numpy as np

from .base import ChainTask, Operator, input_chunk_option, map_chunk, operator, output_chunk_option, per_task


def multiply(array: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """``array * multiplier`` in ``array``'s dtype; a one-channel multiplier applies to every channel."""
    if multiplier.shape[1:] != array.shape[1:] or multiplier.shape[0] not in (1, array.shape[0]):
        raise ValueError(f"cannot multiply a chunk of shape {array.shape} by one of shape {multiplier.shape}")
    return (array * multiplier).astype(array.dtype, copy=False)


@operator("copy-chunk")
@input_chunk_option
@output_chunk_option
def copy_chunk_command(input_name: str, output_name: str) -> Operator:
    """Copy a chunk under another name (chunkflow's copy-var), e.g. to keep the image before a mask."""
    return map_chunk("copy-chunk", input_name, output_name, lambda chunk: chunk.replace(chunk.array.copy()))


@operator("delete-chunk")
@click.option("-i", "--input-chunk-name", "names", multiple=True, required=True,
              help="a chunk to drop (repeat the option for more)")
def delete_chunk_command(names: tuple[str, ...]) -> Operator:
    """Drop chunks from each task to free their memory (chunkflow's delete-var)."""
    def run(task: ChainTask) -> ChainTask:
        for name in names:
            task.chunk(name)  # a name that is not there is an error, not a silent no-op
            del task.chunks[name]
        return task
    return per_task("delete-chunk", run)


@operator("multiply")
@input_chunk_option
@output_chunk_option
@click.option("-m", "--multiplier-chunk-name", "multiplier_name", required=True,
              help="the chunk to multiply by (same box; one channel or as many as the input)")
def multiply_command(input_name: str, output_name: str, multiplier_name: str) -> Operator:
    """Multiply a chunk voxel by voxel by another chunk of the same box, keeping the first's dtype."""
    def run(task: ChainTask) -> ChainTask:
        chunk, multiplier = task.chunk(input_name), task.chunk(multiplier_name)
        if multiplier.box != chunk.box:
            raise ValueError(f"chunk {multiplier_name!r} covers {multiplier.box}, chunk {input_name!r} {chunk.box}")
        task.chunks[output_name] = chunk.replace(multiply(chunk.array, multiplier.array))
        return task
    return per_task("multiply", run)
