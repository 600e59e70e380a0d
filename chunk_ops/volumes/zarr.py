"""Zarr arrays through tensorstore: ``zarr://``, created as Zarr v2 (``zarr3://`` creates v3).

Opening finds the version itself (``.zarray`` or ``zarr.json``), whichever prefix
named the array.  A created array is (c, z, y, x), dimension names c, z, y, x (v2:
xarray's ``_ARRAY_DIMENSIONS`` attribute), one chunk holding every channel, blosc-lz4
compressed; v2 chunk keys use "/" (``0/3/1/2``), v3 the default ``c/0/3/1/2``.  A
(z, y, x) array opens as one channel.  The array's attributes hold ``voxel_offset``
and ``resolution`` (x, y, z; nm), the names of a precomputed info file; without them
the array starts at 0 with resolution 1.  One array is one resolution level: a
pyramid is OME-Zarr (``ome-zarr://``).
"""

from __future__ import annotations

import numpy as np

from ..geometry import Box, Vec3
from .base import VolumeError, plain_resolution
from .tensorstore_arrays import (
    DIMENSIONS, TensorStoreVolume, array_spec, create_array, key_prefix, kvstore, open_array, read_json,
    write_json,
)

BLOSC_V2 = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
BLOSC_V3 = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}}


def zarr_version(location: str, path: str = "") -> int | None:
    """2 or 3 if a Zarr array is at ``location`` (``path`` inside it), else None."""
    kv, prefix = kvstore(location), key_prefix(path)
    if read_json(kv, f"{prefix}.zarray") is not None:
        return 2
    node = read_json(kv, f"{prefix}zarr.json")
    return 3 if node is not None and node.get("node_type") == "array" else None


def zarr_attributes(location: str, version: int, path: str = "") -> dict:
    kv, prefix = kvstore(location), key_prefix(path)
    if version == 2:
        return read_json(kv, f"{prefix}.zattrs") or {}
    return (read_json(kv, f"{prefix}zarr.json") or {}).get("attributes", {})


def open_zarr_array(location: str, url: str, path: str = ""):
    """(tensorstore array, version) of the Zarr array at ``location``/``path``."""
    version = zarr_version(location, path)
    if version is None:
        raise VolumeError(f"no zarr array at {url}")
    return open_array(array_spec("zarr" if version == 2 else "zarr3", location, path), url), version


def create_zarr_array(location: str, url: str, *, version: int, shape: Vec3, block_size: Vec3, dtype: str,
                      num_channels: int, attributes: dict, path: str = "", replace: bool = False) -> None:
    """A new (c, z, y, x) Zarr array; ``shape`` and ``block_size`` are x, y, z; with ``replace``,
    one already there is deleted first."""
    shape_czyx = [num_channels, *shape.zyx()]
    chunks_czyx = [num_channels, *block_size.zyx()]
    if version == 2:
        metadata = {"shape": shape_czyx, "chunks": chunks_czyx, "dtype": np.dtype(dtype).str, "fill_value": 0,
                    "order": "C", "compressor": BLOSC_V2, "dimension_separator": "/"}
        create_array({**array_spec("zarr", location, path), "metadata": metadata}, url, replace=replace)
        write_json(kvstore(location), f"{key_prefix(path)}.zattrs", {"_ARRAY_DIMENSIONS": DIMENSIONS, **attributes})
    else:
        metadata = {"shape": shape_czyx, "data_type": np.dtype(dtype).name, "fill_value": 0,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks_czyx}},
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, BLOSC_V3],
                    "dimension_names": DIMENSIONS, "attributes": attributes}
        create_array({**array_spec("zarr3", location, path), "metadata": metadata}, url, replace=replace)


class ZarrVolume(TensorStoreVolume):
    """A Zarr array, v2 or v3; created as v2."""

    version = 2  # of a created array

    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        store, version = open_zarr_array(location, self.url)
        attributes = zarr_attributes(location, version)
        self._use(store, attributes.get("voxel_offset", [0, 0, 0]), attributes.get("resolution", [1, 1, 1]))

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        attributes = {"voxel_offset": bounds.start.to_list(), "resolution": plain_resolution(resolution)}
        create_zarr_array(location, location, version=cls.version, shape=bounds.shape, block_size=block_size,
                          dtype=dtype, num_channels=num_channels, attributes=attributes)

    @staticmethod
    def exists(location: str) -> bool:
        return zarr_version(location) is not None
