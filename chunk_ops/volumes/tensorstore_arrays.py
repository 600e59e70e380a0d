"""What the formats tensorstore opens share: Zarr v2, Zarr v3, OME-Zarr and N5 arrays.

tensorstore reads and writes them on ``file://``, ``gs://``, ``s3://`` (and reads
``http(s)://``).  The array seen here is (c, z, y, x), or (z, y, x) for one channel,
with its domain moved to the volume's voxel offset, so a box indexes it as it is.
Every chunk is stored, even one that equals the fill value (tensorstore skips those
by default), so a missing chunk is one that was never written; reads are strict,
tensorstore reports such a chunk, and the base class names it or fills it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import tensorstore as ts

from ..geometry import Box, Vec3
from .base import MissingBlock, Volume, VolumeError, plain_resolution

DIMENSIONS = ["c", "z", "y", "x"]


def kvstore(location: str) -> ts.KvStore:
    """The key-value store of a folder URL (file://, gs://, s3://, http(s)://)."""
    try:
        return ts.KvStore.open(location.rstrip("/") + "/").result()
    except ValueError as e:
        raise VolumeError(f"cannot open storage at {location}: {_first_line(e)}") from None


def read_json(store: ts.KvStore, key: str) -> dict | None:
    """The JSON object stored at ``key``; None if there is none."""
    result = store.read(key).result()
    if result.state != "value":
        return None
    try:
        value = json.loads(result.value)
    except ValueError:
        raise VolumeError(f"{key} in {store.url} is not JSON") from None
    return value if isinstance(value, dict) else None


def write_json(store: ts.KvStore, key: str, value: dict) -> None:
    store.write(key, json.dumps(value, indent=2).encode()).result()


def key_prefix(path: str) -> str:
    """The key prefix of an array at ``path`` inside a folder ("" for the folder itself)."""
    return f"{path.strip('/')}/" if path else ""


def array_spec(driver: str, location: str, path: str = "") -> dict:
    """How every array is opened: strict reads, every chunk stored."""
    return {
        "driver": driver,
        "kvstore": location.rstrip("/") + "/" + key_prefix(path),
        "fill_missing_data_reads": False,
        "store_data_equal_to_fill_value": True,
    }


def open_array(spec: dict, url: str) -> ts.TensorStore:
    try:
        return ts.open(spec).result()
    except ValueError as e:
        raise VolumeError(f"cannot open {url}: {_first_line(e)}") from None


def create_array(spec: dict, url: str, *, replace: bool = False) -> None:
    try:
        ts.open({**spec, "create": True, "delete_existing": replace}).result()
    except ValueError as e:
        raise VolumeError(f"cannot create {url}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    """tensorstore's message without the spec it appends."""
    return str(error).split(" [tensorstore_spec=")[0].splitlines()[0]


class TensorStoreVolume(Volume):
    """A volume on one tensorstore array; a format's constructor opens it and calls :meth:`_use`."""

    _store: ts.TensorStore

    def _use(self, store: ts.TensorStore, voxel_offset, resolution) -> None:
        """Take ``store`` ((c,) z, y, x) with its offset and resolution (x, y, z)."""
        if store.rank == 3:
            store = store[ts.newaxis]
        if store.rank != 4:
            raise VolumeError(f"{self.url} has {store.rank} dimensions; a volume is (z, y, x) or (c, z, y, x)")
        offset = Vec3.of([int(v) for v in voxel_offset])
        self._store = store[ts.d[:].translate_to[0, offset.z, offset.y, offset.x]]
        c, z, y, x = store.shape
        self.bounds = Box.from_shape(offset, (x, y, z))
        chunk = store.chunk_layout.read_chunk.shape[1:]
        self.block_size = Vec3(chunk[2], chunk[1], chunk[0])
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        self.num_channels = c
        self.resolution = plain_resolution(resolution)

    def _index(self, box: Box) -> tuple:
        return (slice(None), *box.to_zyx_slices())

    def _read_inside(self, box: Box) -> np.ndarray:
        try:
            return self._store[self._index(box)].read().result()
        except ValueError as e:
            if "NOT_FOUND" not in str(e):
                raise
            # 'chunk {0, 1, 1, 1} stored at local file "/x.zarr/0/1/1/1" is missing'
            found = re.search(r'stored at .*?"([^"]+)" is missing', str(e))
            raise MissingBlock(found.group(1) if found else _first_line(e)) from None

    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        self._store[self._index(box)].write(data).result()
