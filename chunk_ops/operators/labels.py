"""Operators that make labels: threshold, connected components, agglomeration, channel voting.

Each is a thin click command over a pure array function of the same name (arrays
are (c, z, y, x)).  Their outputs are "segmentation" chunks with the input's box
and resolution.  Labels are per chunk: the same object in two chunks gets
unrelated ids (chunk_ops stitches nothing across chunks).
"""

from __future__ import annotations

import click
import numpy as np

from .. import segment
from ..spec import DEFAULT_THRESHOLDS
from .base import ChainTask, Operator, input_chunk_option, map_chunk, operator, output_chunk_option, per_task

LABEL_DTYPES = ("uint8", "uint16", "uint32", "uint64")
CONNECTIVITIES = ("6", "18", "26")


def threshold(array: np.ndarray, value: float, dtype: str = "uint8") -> np.ndarray:
    """1 where ``array > value``, else 0, channel by channel, as ``dtype``."""
    return (array > value).astype(dtype)


def _single_channel(array: np.ndarray, what: str) -> np.ndarray:
    if array.shape[0] != 1:
        raise ValueError(f"{what} takes a one-channel chunk, got {array.shape[0]} channels")
    return array[0]


def connected_components(array: np.ndarray, connectivity: int = 6, value: float | None = None,
                         dtype: str = "uint32") -> np.ndarray:
    """Label the connected components of a one-channel chunk (cc3d), numbered from 1.

    With ``value``, the foreground is ``array > value``; without, every nonzero label
    of an integer chunk is split into its connected pieces (0 is background), so a
    binary chunk gives the components of its ones.
    """
    if str(connectivity) not in CONNECTIVITIES:
        raise ValueError(f"connectivity {connectivity!r} is not one of 6, 18, 26")
    if dtype not in ("uint16", "uint32", "uint64"):
        raise ValueError(f"connected components are labelled as uint16, uint32 or uint64, not {dtype!r}")
    import cc3d

    image = _single_channel(array, "connected-components")
    if value is not None:
        image = image > value
    elif not (np.issubdtype(image.dtype, np.integer) or image.dtype == bool):
        raise ValueError(f"a {image.dtype} chunk needs a --threshold to say which voxels are foreground")
    labels = cc3d.connected_components(np.ascontiguousarray(image), connectivity=int(connectivity),
                                       out_dtype=np.dtype(dtype))
    return labels[None]


def agglomerate(affs: np.ndarray, value: float = 0.5, aff_threshold_low: float = 0.0001,
                aff_threshold_high: float = 0.9999, fragments: np.ndarray | None = None) -> np.ndarray:
    """uint32 (1, z, y, x) labels of (3, z, y, x) affinities: watershed, then merge by mean affinity.

    :func:`chunk_ops.segment.watershed` (waterz) does the work: merging goes on while
    the mean affinity between two regions exceeds ``value``.  Optional (1, z, y, x)
    ``fragments`` replace waterz's own watershed.
    """
    if fragments is not None:
        fragments = _single_channel(fragments, "agglomerate's fragments")
        if fragments.shape != affs.shape[1:]:
            raise ValueError(f"fragments of shape {fragments.shape} do not fit affinities {affs.shape}")
    labels = segment.watershed(affs, value, aff_threshold_low=aff_threshold_low,
                               aff_threshold_high=aff_threshold_high, fragments=fragments)
    return labels[None]


def channel_voting(array: np.ndarray) -> np.ndarray:
    """uint8 (1, z, y, x): the number (from 1) of the channel with the largest value, per voxel.

    Numbered from 1 as in chunkflow, so label 0 stays free for "no label".
    """
    if not 1 <= array.shape[0] <= 255:
        raise ValueError(f"channel voting takes 1 to 255 channels, got {array.shape[0]}")
    return (np.argmax(array, axis=0) + 1).astype(np.uint8)[None]


@operator("threshold")
@input_chunk_option
@output_chunk_option
@click.option("-t", "--threshold", "value", type=float, default=0.5, show_default=True,
              help="voxels above this become 1, the others 0")
@click.option("--dtype", type=click.Choice(LABEL_DTYPES), default="uint8", show_default=True,
              help="output dtype")
def threshold_command(input_name: str, output_name: str, value: float, dtype: str) -> Operator:
    """Binarize a chunk (e.g. a probability map): 1 where above --threshold, else 0, per channel."""
    return map_chunk("threshold", input_name, output_name,
                     lambda chunk: chunk.replace(threshold(chunk.array, value, dtype), layer_type="segmentation"))


@operator("connected-components")
@input_chunk_option
@output_chunk_option
@click.option("-c", "--connectivity", type=click.Choice(CONNECTIVITIES), default="6", show_default=True,
              help="neighbours that connect: faces (6), + edges (18), + corners (26)")
@click.option("-t", "--threshold", "value", type=float,
              help="foreground is above this; without it, each nonzero label of the chunk is split")
@click.option("--dtype", type=click.Choice(("uint16", "uint32", "uint64")), default="uint32",
              show_default=True, help="output dtype")
def connected_components_command(input_name: str, output_name: str, connectivity: str, value: float | None,
                                 dtype: str) -> Operator:
    """Label the connected components of a binary (or thresholded) one-channel chunk with cc3d."""
    return map_chunk("connected-components", input_name, output_name, lambda chunk: chunk.replace(
        connected_components(chunk.array, int(connectivity), value, dtype), layer_type="segmentation"))


@operator("agglomerate")
@input_chunk_option
@output_chunk_option
@click.option("-t", "--threshold", "value", type=float, default=DEFAULT_THRESHOLDS["watershed"],
              show_default=True, help="merge regions while their mean affinity is above this (the job "
                                      "spec's default for segmentation.threshold)")
@click.option("--aff-threshold-low", type=float, default=0.0001, show_default=True,
              help="the watershed never crosses affinities below this")
@click.option("--aff-threshold-high", type=float, default=0.9999, show_default=True,
              help="the watershed seeds where affinities are above this")
@click.option("-f", "--fragments-chunk-name", "fragments_name",
              help="a chunk of fragments (supervoxels) to agglomerate instead of waterz's watershed")
def agglomerate_command(input_name: str, output_name: str, value: float, aff_threshold_low: float,
                        aff_threshold_high: float, fragments_name: str | None) -> Operator:
    """Segment an affinity chunk (channels x, y, z) with waterz: watershed, then mean-affinity merging.

    --threshold is a mean affinity, as in the job spec's segmentation.threshold; chunkflow's
    --threshold is waterz's score 1 - mean affinity, so its 0.7 is 0.3 here.
    """
    if not 0 <= aff_threshold_low < aff_threshold_high <= 1:
        raise click.BadParameter(f"need 0 <= low < high <= 1, got {aff_threshold_low} and {aff_threshold_high}",
                                 param_hint="--aff-threshold-low/--aff-threshold-high")

    def run(task: ChainTask) -> ChainTask:
        affs = task.chunk(input_name)
        fragments = None
        if fragments_name is not None:
            fragments_chunk = task.chunk(fragments_name)
            if fragments_chunk.box != affs.box:
                raise ValueError(f"fragments chunk {fragments_name!r} covers {fragments_chunk.box}, "
                                 f"the affinities {affs.box}")
            fragments = fragments_chunk.array
        labels = agglomerate(affs.array, value, aff_threshold_low, aff_threshold_high, fragments)
        task.chunks[output_name] = affs.replace(labels, layer_type="segmentation")
        return task
    return per_task("agglomerate", run)


@operator("channel-voting")
@input_chunk_option
@output_chunk_option
def channel_voting_command(input_name: str, output_name: str) -> Operator:
    """Label each voxel with the number (from 1) of its largest channel: uint8, as chunkflow's channel-voting."""
    return map_chunk("channel-voting", input_name, output_name,
                     lambda chunk: chunk.replace(channel_voting(chunk.array), layer_type="segmentation"))
