"""Operators that read and write volumes: ``load-volume`` and ``save-volume``, in any format.

Both go through :func:`chunk_ops.volumes.open_volume`, so a URL names its format
(``zarr://file:///data/em.zarr``, ``h5://file:///data/em.h5#/raw``; a bare
``file://``, ``gs://`` or ``s3://`` URL is precomputed).  The names chunkflow users
know (``load-precomputed``, ``save-zarr``, ...) are the same two commands, bound to
one format: their ``--url`` may name only where the data lives, and the format is
added.

``load-*`` reads the task's box grown by ``--expand-margin`` (context for a
network); outside the layer's bounds it reads ``--fill-value``, as a job's input
does.  ``save-*`` writes exactly the task's box of its chunk (cropping the margin
away), so writes stay aligned to the layer's blocks when the tasks are; it creates
a missing layer from the first chunk's dtype, channels and resolution, with
``--volume-bounds`` and ``--block-size``.
"""

from __future__ import annotations

import click
import numpy as np

from ..geometry import Box, Vec3
from .base import (ChainTask, Chunk, Operator, box_option, input_chunk_option, operator, output_chunk_option,
                   per_task, triple_option)

# per-format command -> the formats its --url may name; a bare storage URL gets the first
FAMILIES: dict[str, tuple[str, ...]] = {
    "precomputed": ("precomputed",),
    "zarr": ("zarr", "zarr3", "ome-zarr"),
    "n5": ("n5",),
    "h5": ("h5",),
    "tif": ("tif",),
    "npy": ("npy",),
}
URL_EXAMPLES = {
    None: "e.g. file:///data/em (precomputed), zarr://file:///data/em.zarr, h5://file:///data/em.h5#/raw",
    "precomputed": "e.g. file:///data/em, gs://bucket/em, s3://bucket/em",
    "zarr": "e.g. file:///data/em.zarr; zarr3://, ome-zarr:// URLs too",
    "n5": "e.g. file:///data/em.n5/raw",
    "h5": "e.g. file:///data/em.h5#/raw (file, then the dataset)",
    "tif": "e.g. file:///data/em/ (a TIFF stack: one file per z section)",
    "npy": "e.g. file:///data/em.npy",
}


def volume_url(url: str, family: str | None) -> str:
    """The volume URL a command bound to ``family`` opens (None: any format, as given).

    A URL that names only where the data lives gets the family's format; one that
    names a format must name one of the family's.
    """
    from ..volumes import DEFAULT_FORMAT, split_format

    if family is None:
        return url
    head, sep, rest = url.partition("://")
    if sep and "://" in rest:  # "zarr://file:///x" names its format
        named = split_format(url)[0]
        if named not in FAMILIES[family]:
            raise ValueError(f"--url {url!r} is a {named} volume, not {family}: use load-volume/save-volume, "
                             f"or the command of its format")
        return url
    fmt = FAMILIES[family][0]
    return url if fmt == DEFAULT_FORMAT else f"{fmt}://{url}"


def layer_type_of(dtype: np.dtype) -> str:
    """Neuroglancer's layer type for a dtype: 32- and 64-bit unsigned integers are labels."""
    return "segmentation" if np.dtype(dtype) in (np.uint32, np.uint64) else "image"


def load_operator(name: str, url: str, mip: int, expand_margin: Vec3, fill_missing: bool, fill_value: float,
                  output_name: str) -> Operator:
    from ..volumes import open_volume

    if any(m < 0 for m in expand_margin):
        raise ValueError(f"--expand-margin {expand_margin.to_list()} must not be negative")
    volume = open_volume(url, mip, fill_value=fill_value, fill_missing=fill_missing)

    def load(task: ChainTask) -> ChainTask:
        box = task.box.grow(expand_margin)
        array = volume.read(box)
        task.chunks[output_name] = Chunk(array, box, tuple(volume.resolution), layer_type_of(array.dtype))
        return task
    return per_task(name, load)


def save_operator(name: str, url: str, volume_bounds: Box | None, block_size: Vec3 | None,
                  input_name: str) -> Operator:
    from ..volumes import Volume, VolumeError, create_volume, open_volume, volume_exists

    def check(volume: Volume) -> Volume:
        if volume_bounds is not None and volume.bounds != volume_bounds:
            raise VolumeError(f"the layer at {url} has bounds {volume.bounds}, not --volume-bounds {volume_bounds}")
        if block_size is not None and volume.block_size != block_size:
            raise VolumeError(f"the layer at {url} has blocks {volume.block_size.to_list()}, "
                              f"not --block-size {block_size.to_list()}")
        return volume

    layer: list[Volume] = []  # opened now, or made from the first chunk
    if volume_exists(url):
        layer.append(check(open_volume(url, 0)))
    elif volume_bounds is None or block_size is None:
        raise VolumeError(f"no layer at {url}: give --volume-bounds and --block-size to create it")

    def opened(chunk: Chunk) -> Volume:
        if not layer:
            if volume_exists(url):  # another process made it meanwhile
                layer.append(check(open_volume(url, 0)))
            else:
                layer.append(create_volume(url, bounds=volume_bounds, block_size=block_size,
                                           dtype=chunk.array.dtype.name, num_channels=chunk.array.shape[0],
                                           resolution=chunk.resolution, layer_type=chunk.layer_type))
        return layer[0]

    def save(task: ChainTask) -> ChainTask:
        chunk = task.chunk(input_name)
        if not chunk.box.contains(task.box):
            raise ValueError(f"chunk {input_name!r} covers {chunk.box}, not all of the task box {task.box}")
        volume = opened(chunk)
        if chunk.array.dtype != volume.dtype:
            raise ValueError(f"chunk {input_name!r} is {chunk.array.dtype}, the layer at {url} is {volume.dtype}")
        data = chunk.array[(slice(None), *task.box.to_zyx_slices(chunk.box))]
        task.fence()
        volume.write(task.box, data)
        return task
    return per_task(name, save)


def load_command(name: str, family: str | None) -> None:
    """Register ``name``: load-volume bound to a format family (None: any format)."""
    @operator(name, help=f"Read each task's box (grown by --expand-margin) from a "
                         f"{family or 'volume'} layer into a chunk.")
    @click.option("--url", required=True, help=f"the layer ({URL_EXAMPLES[family]})")
    @click.option("--mip", type=click.IntRange(min=0), default=0, show_default=True,
                  help="resolution level; task boxes are in its voxels")
    @triple_option("--expand-margin", default=(0, 0, 0), help="also read this many voxels around the box")
    @click.option("--fill-missing", is_flag=True,
                  help="read blocks that were never written as --fill-value, instead of failing")
    @click.option("--fill-value", type=float, default=0.0, show_default=True,
                  help="what missing blocks and voxels outside the layer's bounds (margins at its faces) read as")
    @output_chunk_option
    def command(url: str, mip: int, expand_margin: Vec3, fill_missing: bool, fill_value: float,
                output_name: str) -> Operator:
        return load_operator(name, volume_url(url, family), mip, expand_margin, fill_missing, fill_value,
                             output_name)


def save_command(name: str, family: str | None) -> None:
    """Register ``name``: save-volume bound to a format family (None: any format)."""
    @operator(name, help=f"Write the task's box of a chunk to a {family or 'volume'} layer (mip 0), "
                         f"creating the layer if it is missing.")
    @click.option("--url", required=True, help=f"the layer ({URL_EXAMPLES[family]})")
    @box_option("--volume-bounds", help="bounds of a layer to create; an existing layer must have them")
    @triple_option("--block-size", help="storage blocks of a layer to create; an existing layer must have them")
    @input_chunk_option
    def command(url: str, volume_bounds: Box | None, block_size: Vec3 | None, input_name: str) -> Operator:
        return save_operator(name, volume_url(url, family), volume_bounds, block_size, input_name)


load_command("load-volume", None)
save_command("save-volume", None)
for _family in FAMILIES:
    load_command(f"load-{_family}", _family)
    save_command(f"save-{_family}", _family)
