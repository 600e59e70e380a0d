"""Volumes in any supported format behind one interface, picked by URL scheme.

    open_volume(url, mip)        an existing layer at one mip
    create_volume(url, ...)      a new single-mip layer (then open it)
    volume_exists(url)           is there a layer at url?
    layer_folder(url)            the storage folder for files that go with a layer (a job's)
    mip_count(url), add_mip(url, factor, mip)   the levels of a pyramid (precomputed, OME-Zarr)

A URL is a storage URL (``file://``, ``gs://``, ``s3://``, ``http(s)://``, ``mem://``),
which is a Neuroglancer precomputed layer (cloud-volume), or a format prefix in
front of one, as Neuroglancer writes them; each format is one module of this package,
registered in ``FORMATS``::

    precomputed://gs://bucket/em     the same as gs://bucket/em
    zarr://file:///data/em.zarr      Zarr (v2 when created; v2 or v3 when opened)
    zarr3://file:///data/em.zarr     Zarr v3
    ome-zarr://file:///data/em.zarr  OME-Zarr 0.4 multiscale image; mip N is its level N
    n5://file:///data/em.n5          N5
    h5://file:///data/em.h5#/raw     HDF5 file and dataset (local files)
    tif://file:///data/em/           TIFF stack, one file per z section
    npy://file:///data/em.npy        NumPy array (local files)

Each module's docstring says how that format keeps offset, resolution and blocks.
``layer_type`` (image or segmentation) is precomputed's; other formats store none.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterable, Iterator

from ..geometry import Box, Vec3
from .base import MissingBlock, Volume, VolumeError

# scheme prefix -> "module:Class"; imported on first use (format libraries load only when needed)
FORMATS: dict[str, str] = {
    "precomputed": "precomputed:PrecomputedVolume",
    "zarr": "zarr:ZarrVolume",
    "zarr3": "zarr3:Zarr3Volume",
    "ome-zarr": "ome_zarr:OmeZarrVolume",
    "n5": "n5:N5Volume",
    "h5": "hdf5:Hdf5Volume",
    "tif": "tiff:TiffStackVolume",
    "npy": "npy:NpyVolume",
}
DEFAULT_FORMAT = "precomputed"
# where a layer can live; a bare storage URL is a precomputed layer
STORAGE_SCHEMES = ("file", "gs", "s3", "http", "https", "mem")


def split_format(url: str) -> tuple[str, str]:
    """``"zarr://file:///x"`` -> ``("zarr", "file:///x")``; a bare storage URL (or a plain
    path) is precomputed.  Unknown schemes are a ``VolumeError`` naming the URL."""
    head, sep, rest = url.partition("://")
    if not sep:
        return DEFAULT_FORMAT, url
    if head in FORMATS:
        storage_scheme = rest.partition("://")[0]
        if "://" not in rest or storage_scheme not in STORAGE_SCHEMES:
            raise VolumeError(f"{url}: after '{head}://' comes a storage URL "
                              f"({', '.join(s + '://' for s in STORAGE_SCHEMES)})")
        return head, rest
    if head in STORAGE_SCHEMES:
        return DEFAULT_FORMAT, url
    raise VolumeError(f"{url}: unknown scheme '{head}://' (formats: {', '.join(FORMATS)}; "
                      f"storage: {', '.join(STORAGE_SCHEMES)})")


def format_class(url: str) -> tuple[type[Volume], str]:
    name, location = split_format(url)
    module, cls = FORMATS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls), location


@contextlib.contextmanager
def _named(url: str) -> Iterator[None]:
    """Credential, permission and endpoint failures of the storage under a layer: one
    :class:`VolumeError` naming the layer, instead of the cloud library's traceback."""
    try:
        yield
    except VolumeError:
        raise
    except Exception as e:
        if not (type(e).__module__.startswith(("botocore", "google.auth", "google.api_core"))
                or isinstance(e, PermissionError)):
            raise
        from ..storage import describe_cloud_error

        raise VolumeError(f"{url}: {describe_cloud_error(e)}") from None


def open_volume(url: str, mip: int = 0, *, fill_value: float = 0.0, fill_missing: bool = False,
                blackout_sections: Iterable[int] = ()) -> Volume:
    """The layer at ``url`` at ``mip``.  Reads outside its bounds, of blocks missing from
    storage (with ``fill_missing``; else they are an error naming the block) and of the z
    sections ``blackout_sections`` give ``fill_value``."""
    cls, location = format_class(url)
    if mip and not cls.multiscale:
        raise VolumeError(f"{url} holds one resolution level: it has no mip {mip}")
    with _named(url):
        volume = cls(location, mip, url=url, fill_value=fill_value, fill_missing=fill_missing)
    volume.black_out(blackout_sections)
    return volume


def create_volume(url: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
                  resolution, layer_type: str = "image") -> Volume:
    """Create a new single-mip layer at ``url`` and open it."""
    cls, location = format_class(url)
    with _named(url):
        cls.create(location, bounds=bounds, block_size=block_size, dtype=dtype, num_channels=num_channels,
                   resolution=resolution, layer_type=layer_type)
    return open_volume(url)


def volume_exists(url: str) -> bool:
    cls, location = format_class(url)
    with _named(url):
        return cls.exists(location)


def layer_folder(url: str) -> str:
    """The storage URL of a folder that belongs to the layer at ``url``: the layer's own
    folder, or one beside a single-file layer (``em.npy.d``, ``em.h5.d/raw``)."""
    cls, location = format_class(url)
    return cls.folder(location)


def mip_count(url: str) -> int:
    cls, location = format_class(url)
    return cls.mip_count(location)


def supports_mips(url: str) -> bool:
    """Can the layer's format hold a pyramid (several resolution levels)?"""
    return format_class(url)[0].multiscale


def add_mip(url: str, factor: Vec3, mip: int) -> int:
    """Make sure the layer has level ``mip``, ``factor`` coarser than level ``mip - 1``
    (which must exist); returns ``mip``.  A level that is there already is left as it is,
    so two runs that both found it missing add it once."""
    cls, location = format_class(url)
    return cls.add_mip(location, factor, mip)


__all__ = [
    "FORMATS", "MissingBlock", "Volume", "VolumeError", "add_mip", "create_volume", "layer_folder",
    "mip_count", "open_volume", "split_format", "supports_mips", "volume_exists",
]
