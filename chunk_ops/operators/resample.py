"""Operators that change or use a chunk's voxel grid: downsample, crop-margin, mask.

Each is a thin click command over pure array functions (arrays are (c, z, y, x)).
Grids nest as mip levels do: a voxel ``v`` at a grid ``f`` times coarser covers the
fine voxels ``[v * f, (v + 1) * f)`` on each axis.
"""

from __future__ import annotations

import click
import numpy as np

from ..geometry import Box, Vec3
from .base import ChainTask, Chunk, Operator, input_chunk_option, operator, output_chunk_option, per_task, \
    triple_option


def downsample(array: np.ndarray, factor: Vec3, segmentation: bool = False) -> np.ndarray:
    """Shrink (c, z, y, x) by ``factor`` (x y z) with tinybrain: block means, or block modes for labels.

    Integer images get the mean rounded down (tinybrain).  Where the size is no
    multiple of the factor, the edge voxels are repeated to fill the last block,
    as the pyramid (:mod:`chunk_ops.downsample`) does.
    """
    import tinybrain

    if not factor.all_positive():
        raise ValueError(f"downsampling factor must be positive, got {factor.to_list()}")
    padding = [(0, 0)] + [(0, -size % f) for size, f in zip(array.shape[1:], factor.zyx())]
    if any(after for _, after in padding):
        array = np.pad(array, padding, mode="edge")
    shrink = tinybrain.downsample_segmentation if segmentation else tinybrain.downsample_with_averaging
    xyzc = shrink(array.transpose(3, 2, 1, 0), factor.to_list(), num_mips=1)[0]
    return np.ascontiguousarray(xyzc.transpose(3, 2, 1, 0))


def coarse_box(box: Box, factor: Vec3) -> Box:
    """The smallest box of a ``factor`` times coarser grid that covers ``box``."""
    return Box(box.start // factor, box.stop.ceildiv(factor))


def upsample(array: np.ndarray, factor: Vec3) -> np.ndarray:
    """Repeat each voxel of (..., z, y, x) ``factor`` (x y z) times along each axis."""
    for axis, f in zip((-3, -2, -1), factor.zyx()):
        array = np.repeat(array, f, axis=axis)
    return array


def resolution_ratio(coarse: tuple[float, ...], fine: tuple[float, ...]) -> Vec3:
    """How many fine voxels one coarse voxel spans on each axis; a whole number, or an error."""
    ratios = [c / f for c, f in zip(coarse, fine)]
    if any(r < 1 or abs(r - round(r)) > 1e-6 for r in ratios):
        raise ValueError(f"resolution {list(coarse)} is no whole multiple of {list(fine)}")
    return Vec3.of([round(r) for r in ratios])


def crop(array: np.ndarray, box: Box, region: Box) -> np.ndarray:
    """The part of (c, z, y, x) ``array`` over ``box`` that lies in ``region``."""
    if not box.contains(region):
        raise ValueError(f"cannot crop {box} to {region}: it does not contain it")
    return np.ascontiguousarray(array[(slice(None), *region.to_zyx_slices(relative_to=box))])


def mask(array: np.ndarray, keep: np.ndarray, inverse: bool = False) -> np.ndarray:
    """``array`` (c, z, y, x) with 0 where ``keep`` (z, y, x) is false (where it is true if ``inverse``)."""
    if keep.shape != array.shape[1:]:
        raise ValueError(f"mask of shape {keep.shape} does not fit a chunk of shape {array.shape}")
    return np.where(keep.astype(bool) != inverse, array, array.dtype.type(0))


@operator("downsample")
@input_chunk_option
@output_chunk_option
@triple_option("-f", "--factor", default=(2, 2, 1), help="shrink factor")
def downsample_command(input_name: str, output_name: str, factor: Vec3) -> Operator:
    """Downsample a chunk with tinybrain: block means for images, block modes for segmentations.

    The output box and resolution are the input's at the coarser grid, so the box
    start must be a multiple of the factor.
    """
    if not factor.all_positive():
        raise click.BadParameter(f"must be positive, got {factor.to_list()}", param_hint="--factor")

    def run(task: ChainTask) -> ChainTask:
        chunk = task.chunk(input_name)
        if any(chunk.box.start % factor):
            raise ValueError(f"chunk {input_name!r} starts at {chunk.box.start.to_list()}, "
                             f"no multiple of the factor {factor.to_list()}")
        array = downsample(chunk.array, factor, segmentation=chunk.layer_type == "segmentation")
        resolution = tuple(r * f for r, f in zip(chunk.resolution, factor))
        task.chunks[output_name] = Chunk(array, coarse_box(chunk.box, factor), resolution, chunk.layer_type)
        return task
    return per_task("downsample", run)


@operator("crop-margin")
@input_chunk_option
@output_chunk_option
@triple_option("-m", "--margin", help="voxels to remove on each side; without it, crop to the task's box")
def crop_margin_command(input_name: str, output_name: str, margin: Vec3 | None) -> Operator:
    """Crop a chunk to the task's box (e.g. after reading with a context margin), or by --margin."""
    def run(task: ChainTask) -> ChainTask:
        chunk = task.chunk(input_name)
        region = task.box if margin is None else Box(chunk.box.start + margin, chunk.box.stop - margin)
        task.chunks[output_name] = chunk.replace(crop(chunk.array, chunk.box, region), box=region)
        return task
    return per_task("crop-margin", run)


@operator("mask")
@input_chunk_option
@output_chunk_option
@click.option("--mask-url", required=True, help="the mask layer (nonzero: keep)")
@click.option("--mask-mip", type=int, default=0, show_default=True, help="the mip of the mask layer to read")
@click.option("--inverse", is_flag=True, help="zero the chunk where the mask is nonzero instead")
def mask_command(input_name: str, output_name: str, mask_url: str, mask_mip: int, inverse: bool) -> Operator:
    """Zero a chunk where a mask layer is zero; the mask may be coarser (it is upsampled to the chunk's grid).

    The grid ratio is the mask's resolution over the chunk's.  Outside the mask
    layer's bounds the mask is zero.
    """
    from ..volumes import open_volume

    volume = open_volume(mask_url, mask_mip)

    def run(task: ChainTask) -> ChainTask:
        chunk = task.chunk(input_name)
        factor = resolution_ratio(tuple(volume.resolution), chunk.resolution)
        region = coarse_box(chunk.box, factor)
        coarse = volume.read(region).any(axis=0)
        fine_region = Box(region.start * factor, region.stop * factor)
        keep = upsample(coarse, factor)[chunk.box.to_zyx_slices(relative_to=fine_region)]
        task.chunks[output_name] = chunk.replace(mask(chunk.array, keep, inverse))
        return task
    return per_task("mask", run)
