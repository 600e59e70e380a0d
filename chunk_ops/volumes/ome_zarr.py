"""OME-Zarr 0.4 multiscale images through tensorstore: ``ome-zarr://file:///x.zarr`` (also gs://, s3://).

The location is a Zarr v2 group whose ``.zattrs`` hold ``multiscales`` (the first
image is used); mip N is its dataset N, a Zarr array (:mod:`.zarr`).  Created
images have axes c, z, y, x: the channel axis is there for one channel too, so
every image has one shape rank; an image with axes z, y, x opens as one channel.
Each dataset's ``coordinateTransformations`` are a ``scale``, the resolution (x, y,
z in nanometers; 1 for c), and a ``translation``, the voxel offset times the
resolution, so the offset is ``translation / scale``.  Axis units micrometer and
angstrom are read as nanometers.  :meth:`OmeZarrVolume.add_mip` adds a level (the
downsampled pyramid).
"""

from __future__ import annotations

from ..geometry import Box, Vec3
from .base import VolumeError, plain_resolution
from .tensorstore_arrays import TensorStoreVolume, kvstore, read_json, write_json
from .zarr import create_zarr_array, open_zarr_array

TO_NANOMETERS = {"nanometer": 1, "micrometer": 1000, "angstrom": 0.1}
AXES = [
    {"name": "c", "type": "channel"},
    *({"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"),
]


def _multiscale(location: str, url: str) -> tuple[dict, dict]:
    """The group's attributes and its first multiscale image."""
    attributes = read_json(kvstore(location), ".zattrs") or {}
    images = attributes.get("multiscales")
    if not images:
        raise VolumeError(f"no OME-Zarr image at {url} (no 'multiscales' in its .zattrs)")
    return attributes, images[0]


def _dataset(path: str, bounds: Box, resolution: list) -> dict:
    """A multiscale dataset entry: scale = resolution, translation = offset * resolution (c, z, y, x)."""
    scale = [1, *resolution[::-1]]
    translation = [0, *(o * r for o, r in zip(bounds.start.zyx(), resolution[::-1]))]
    return {"path": path, "coordinateTransformations": [
        {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation},
    ]}


class OmeZarrVolume(TensorStoreVolume):
    multiscale = True

    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        _, image = _multiscale(location, self.url)
        axes = [a["name"] if isinstance(a, dict) else a for a in image.get("axes", [])]
        if axes not in (["c", "z", "y", "x"], ["z", "y", "x"]):
            raise VolumeError(f"{self.url} has axes {axes}; chunk_ops reads [c,] z, y, x")
        datasets = image["datasets"]
        if not 0 <= mip < len(datasets):
            raise VolumeError(f"{self.url} has no mip {mip} (its levels are 0 to {len(datasets) - 1})")
        scale, translation = [1.0] * len(axes), [0.0] * len(axes)
        for transform in datasets[mip].get("coordinateTransformations", []):
            if transform["type"] == "scale":
                scale = transform["scale"]
            elif transform["type"] == "translation":
                translation = transform["translation"]
        units = [TO_NANOMETERS.get(a.get("unit"), 1) if isinstance(a, dict) else 1 for a in image["axes"]]
        resolution = [s * u for s, u in zip(scale, units)][::-1][:3]  # x, y, z
        offset = [round(t / s) for t, s in zip(translation, scale)][::-1][:3]
        store, _ = open_zarr_array(location, self.url, datasets[mip]["path"])
        self._use(store, offset, resolution)

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        """The group, its level 0, then its metadata: the image exists once that is written."""
        resolution = plain_resolution(resolution)
        store = kvstore(location)
        write_json(store, ".zgroup", {"zarr_format": 2})
        create_zarr_array(location, location, version=2, shape=bounds.shape, block_size=block_size, dtype=dtype,
                          num_channels=num_channels, attributes={}, path="0")
        image = {"version": "0.4", "name": location.rstrip("/").rsplit("/", 1)[-1], "axes": AXES,
                 "datasets": [_dataset("0", bounds, resolution)]}
        write_json(store, ".zattrs", {"multiscales": [image]})

    @staticmethod
    def exists(location: str) -> bool:
        return bool((read_json(kvstore(location), ".zattrs") or {}).get("multiscales"))

    @classmethod
    def mip_count(cls, location: str) -> int:
        return len(_multiscale(location, location)[1]["datasets"])

    @classmethod
    def add_mip(cls, location: str, factor: Vec3, mip: int) -> int:
        """Level ``mip``, ``factor`` coarser than level ``mip - 1``, placed as cloud-volume
        places a precomputed layer's next scale: level 0's offset and size divided by the
        whole factor from level 0, the offset rounded down, the size up.  Its dataset path
        is its index, so two runs that add the same level write the same metadata."""
        attributes, image = _multiscale(location, location)
        new = cls._level_to_add(location, len(image["datasets"]), mip)
        if new is None:
            return mip
        base, below = cls(location, 0), cls(location, new - 1)
        total = Vec3.of([round(t / b) * f for t, b, f in zip(below.resolution, base.resolution, factor)])
        bounds = Box.from_shape(base.bounds.start // total, base.bounds.shape.ceildiv(total))
        resolution = plain_resolution(r * f for r, f in zip(base.resolution, total))
        path = str(new)
        create_zarr_array(location, location, version=2, shape=bounds.shape, block_size=below.block_size,
                          dtype=below.dtype.name, num_channels=below.num_channels, attributes={}, path=path,
                          replace=True)  # a level a crash left unlisted
        image["datasets"].append(_dataset(path, bounds, resolution))
        write_json(kvstore(location), ".zattrs", attributes)
        return new
