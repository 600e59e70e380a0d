"""Image intensity operators: rescale, per-section contrast, 8-bit quantization.

Each operator is a thin click command over a pure array function of the same name
(arrays are (c, z, y, x)); the output chunk keeps the input's box and resolution.
"""

from __future__ import annotations

import click
import numpy as np

from .base import Operator, input_chunk_option, map_chunk, operator, output_chunk_option

DTYPES = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "float32", "float64")
AFFINITY_CHANNELS = "xyz"  # the order of affinity channels (chunk_ops.segment)
QUANTIZE_MODES = ("all", "x", "y", "z", "xy", "xyz")


def dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """The full range of an integer dtype; floats have none, so they are refused."""
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"a {dtype} chunk has no intrinsic range: give its --min and --max")
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)


def _check_range(low: float, high: float, what: str) -> None:
    if not low < high:
        raise ValueError(f"{what} minimum {low} must be below its maximum {high}")


def normalize_intensity(array: np.ndarray, in_range: tuple[float, float] | None = None,
                        out_range: tuple[float, float] | None = None, dtype: str = "float32") -> np.ndarray:
    """Map ``in_range`` linearly onto ``out_range``, clipping values outside it.

    ``in_range`` defaults to the input's dtype range (0..255 for uint8); ``out_range``
    to [0, 1] for a float ``dtype`` and to the dtype's range for an integer one,
    where values are rounded.
    """
    out_dtype = np.dtype(dtype)
    low, high = in_range if in_range is not None else dtype_range(array.dtype)
    _check_range(low, high, "input range")
    if out_range is None:
        out_range = (0.0, 1.0) if np.issubdtype(out_dtype, np.floating) else dtype_range(out_dtype)
    out_low, out_high = out_range
    _check_range(out_low, out_high, "output range")
    if np.issubdtype(out_dtype, np.integer):
        info = np.iinfo(out_dtype)
        if out_low < info.min or out_high > info.max:
            raise ValueError(f"output range [{out_low}, {out_high}] does not fit {out_dtype} "
                             f"([{info.min}, {info.max}])")
    unit = np.clip((array.astype(np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    scaled = np.float32(out_low) + unit * np.float32(out_high - out_low)
    return (np.round(scaled) if np.issubdtype(out_dtype, np.integer) else scaled).astype(out_dtype)


def check_percentiles(lower: float, upper: float) -> None:
    if not 0 <= lower < upper <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower} and {upper}")


def normalize_contrast(array: np.ndarray, lower_percentile: float = 1.0,
                       upper_percentile: float = 99.0) -> np.ndarray:
    """Stretch each z section of each channel so its percentiles span the output range.

    Zero is missing data in EM (as in chunkflow's and igneous' contrast correction):
    the percentiles are those of the section's nonzero voxels, zero voxels stay zero,
    and sections that are all zero stay zero.  The output has the input's dtype:
    integers span [1, dtype max] (so no real voxel becomes 0), floats [0, 1].  A flat
    section (both percentiles equal) has no contrast to stretch and is left as it is.
    """
    check_percentiles(lower_percentile, upper_percentile)
    integer = np.issubdtype(array.dtype, np.integer)
    out_low, out_high = (1.0, float(np.iinfo(array.dtype).max)) if integer else (0.0, 1.0)
    out = array.copy()
    for channel in range(array.shape[0]):
        for z in range(array.shape[1]):
            section = array[channel, z]
            real = section != 0
            values = section[real]
            if values.size == 0:
                continue
            low, high = np.percentile(values, [lower_percentile, upper_percentile])
            if high <= low:
                continue
            unit = np.clip((values.astype(np.float64) - low) / (high - low), 0, 1)
            stretched = out_low + unit * (out_high - out_low)
            out[channel, z][real] = np.round(stretched) if integer else stretched
    return out


def quantize(array: np.ndarray, mode: str = "all") -> np.ndarray:
    """float values in [0, 1] as uint8 0..255 (clipped, rounded).

    ``mode`` "all" quantizes every channel; a string of affinity channel letters
    ("xy", "z", ...) quantizes their mean into one grey channel, as chunkflow's
    quantize does for viewing affinities.
    """
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"quantize takes a float chunk with values in [0, 1], got dtype {array.dtype}")
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode {mode!r} is not one of {QUANTIZE_MODES}")
    if mode != "all":
        if array.shape[0] != len(AFFINITY_CHANNELS):
            raise ValueError(f"quantize --mode {mode} takes 3 affinity channels (x, y, z), "
                             f"got {array.shape[0]} channels")
        picked = [AFFINITY_CHANNELS.index(letter) for letter in mode]
        array = array[picked].mean(axis=0, keepdims=True)
    from ..stages import cast_output  # the job's own float -> uint8 rule

    return cast_output(array, "uint8")


@operator("normalize-intensity")
@input_chunk_option
@output_chunk_option
@click.option("--min", "in_min", type=float, help="input value mapped to the output minimum [dtype min]")
@click.option("--max", "in_max", type=float, help="input value mapped to the output maximum [dtype max]")
@click.option("--out-min", type=float, help="output minimum [0 for float, else dtype min]")
@click.option("--out-max", type=float, help="output maximum [1 for float, else dtype max]")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="output dtype")
def normalize_intensity_command(input_name: str, output_name: str, in_min: float | None, in_max: float | None,
                                out_min: float | None, out_max: float | None, dtype: str) -> Operator:
    """Rescale an image chunk linearly, clipping: by default its dtype range to [0, 1] float32.

    chunkflow's normalize-intensity (uint8 to [-1, 1]) is ``--out-min -1 --out-max 1``.
    """
    in_range = _pair(in_min, in_max, "--min", "--max")
    out_range = _pair(out_min, out_max, "--out-min", "--out-max")

    return map_chunk("normalize-intensity", input_name, output_name, lambda chunk: chunk.replace(
        normalize_intensity(chunk.array, in_range, out_range, dtype), layer_type="image"))


def _pair(low: float | None, high: float | None, low_name: str, high_name: str) -> tuple[float, float] | None:
    if (low is None) != (high is None):
        raise click.UsageError(f"give both {low_name} and {high_name}, or neither "
                               f"(got {low_name} {low}, {high_name} {high})")
    return None if low is None else (low, high)


@operator("normalize-contrast")
@input_chunk_option
@output_chunk_option
@click.option("--lower-percentile", type=float, default=1.0, show_default=True,
              help="percentile of each section's nonzero voxels mapped to the bottom of the range")
@click.option("--upper-percentile", type=float, default=99.0, show_default=True,
              help="percentile of each section's nonzero voxels mapped to the top of the range")
def normalize_contrast_command(input_name: str, output_name: str, lower_percentile: float,
                               upper_percentile: float) -> Operator:
    """Stretch the contrast of each z section between two percentiles of its nonzero voxels.

    Zero voxels (missing data) and all-zero sections stay zero; integer images span
    [1, dtype max], float images [0, 1].  Unlike chunkflow's normalize-section-contrast,
    the levels come from the chunk itself, not from precomputed per-section histograms.
    """
    check_percentiles(lower_percentile, upper_percentile)

    return map_chunk("normalize-contrast", input_name, output_name, lambda chunk: chunk.replace(
        normalize_contrast(chunk.array, lower_percentile, upper_percentile)))


@operator("quantize")
@input_chunk_option
@output_chunk_option
@click.option("--mode", type=click.Choice(QUANTIZE_MODES), default="all", show_default=True,
              help="all: every channel; x, y, z, xy, xyz: the mean of those affinity channels")
def quantize_command(input_name: str, output_name: str, mode: str) -> Operator:
    """Turn a float chunk in [0, 1] into uint8 (round(clip(x) * 255)), e.g. affinities for viewing."""
    return map_chunk("quantize", input_name, output_name,
                     lambda chunk: chunk.replace(quantize(chunk.array, mode), layer_type="image"))
