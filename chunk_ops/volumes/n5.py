"""N5 datasets through tensorstore: ``n5://file:///x.n5`` (also gs://, s3://).

N5 lists dimensions fastest-varying first, so a created dataset is (x, y, z, c) in
its ``attributes.json`` (axes x, y, z, c; what Neuroglancer and the Java tools
read) and is seen here transposed, as (c, z, y, x); a 3-dimensional (x, y, z)
dataset opens as one channel.  Blocks hold every channel, gzip-compressed.
``attributes.json`` also holds ``resolution`` and ``units`` per dimension (the N5
viewers' convention: ``[rx, ry, rz, 1]``, ``["nm", "nm", "nm", ""]``) and
``voxel_offset`` (x, y, z); without them the dataset starts at 0 with resolution 1.
"""

from __future__ import annotations

import numpy as np

from ..geometry import Box, Vec3
from .base import VolumeError, plain_resolution
from .tensorstore_arrays import TensorStoreVolume, array_spec, create_array, kvstore, open_array, read_json


class N5Volume(TensorStoreVolume):
    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        attributes = read_json(kvstore(location), "attributes.json") or {}
        if "dimensions" not in attributes:
            raise VolumeError(f"no N5 dataset at {self.url}")
        store = open_array(array_spec("n5", location), self.url).T  # (x, y, z[, c]) -> ([c,] z, y, x)
        self._use(store, attributes.get("voxel_offset", [0, 0, 0]), attributes.get("resolution", [1, 1, 1])[:3])

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        metadata = {
            "dimensions": [*bounds.shape, num_channels],
            "blockSize": [*block_size, num_channels],
            "dataType": np.dtype(dtype).name,
            "compression": {"type": "gzip", "level": 1},
            "axes": ["x", "y", "z", "c"],
            "resolution": [*plain_resolution(resolution), 1],
            "units": ["nm", "nm", "nm", ""],
            "voxel_offset": bounds.start.to_list(),
        }
        create_array({**array_spec("n5", location), "metadata": metadata}, location)

    @staticmethod
    def exists(location: str) -> bool:
        return "dimensions" in (read_json(kvstore(location), "attributes.json") or {})
