"""Volumes in any supported format behind one interface, picked by URL scheme.

    open_volume(url, mip)        an existing layer at one mip
    create_volume(url, ...)      a new single-mip layer (then open it)
    volume_exists(url)           is there a layer at url?

URLs: ``file://``, ``gs://``, ``s3://``, ``http(s)://`` or ``precomputed://...``:
Neuroglancer precomputed (cloud-volume).  Other formats name themselves with a
scheme prefix in front of where they live, as Neuroglancer writes them (for
example ``zarr://file:///data/em.zarr``); each is one module of this package,
registered in ``FORMATS``.
"""

from __future__ import annotations

import importlib

from ..geometry import Box, Vec3
from .base import Volume, VolumeError

# scheme prefix -> "module:Class"; imported on first use (format libraries load only when needed)
FORMATS: dict[str, str] = {
    "precomputed": "precomputed:PrecomputedVolume",
}
DEFAULT_FORMAT = "precomputed"


def split_format(url: str) -> tuple[str, str]:
    """``"zarr://file:///x"`` -> ``("zarr", "file:///x")``; a bare storage URL is precomputed."""
    head, sep, rest = url.partition("://")
    if sep and head in FORMATS and "://" in rest:
        return head, rest
    if sep and head == "precomputed":
        return "precomputed", rest
    return DEFAULT_FORMAT, url


def format_class(url: str) -> tuple[type[Volume], str]:
    name, location = split_format(url)
    module, cls = FORMATS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls), location


def open_volume(url: str, mip: int = 0, *, fill_value: float = 0.0) -> Volume:
    """The layer at ``url`` at ``mip``; reads outside its bounds give ``fill_value``."""
    cls, location = format_class(url)
    volume = cls(location, mip, fill_value)
    volume.url = url
    return volume


def create_volume(url: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
                  resolution, layer_type: str = "image") -> Volume:
    """Create a new single-mip layer at ``url`` and open it."""
    cls, location = format_class(url)
    cls.create(location, bounds=bounds, block_size=block_size, dtype=dtype, num_channels=num_channels,
               resolution=resolution, layer_type=layer_type)
    return open_volume(url)


def volume_exists(url: str) -> bool:
    cls, location = format_class(url)
    return cls.exists(location)


__all__ = ["FORMATS", "Volume", "VolumeError", "create_volume", "open_volume", "split_format", "volume_exists"]
