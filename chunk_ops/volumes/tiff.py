"""TIFF stacks through tifffile: ``tif://file:///data/em/``, a folder of one TIFF file per z section.

One file per section (not one multi-page file) so that workers write separate
sections at once and a reader fetches only the sections it needs, on file://,
gs:// or s3:// alike (cloud-files).  Each file is a (y, x) image, or (c, y, x)
for several channels, zlib-compressed.  A sidecar in the folder, ``volume.json``,
holds ``voxel_offset``, ``size``, ``resolution`` (x, y, z; nm), ``dtype``,
``num_channels`` and ``block_size``; section z is the file ``{z:05d}.tif``, and a
missing file is a missing block.  A folder without the sidecar (a stack from
elsewhere) opens read as it is: its ``.tif``/``.tiff`` files in name order are the
sections 0, 1, ..., the first gives shape and dtype, resolution is 1.

A block is whole sections (x and y cover the volume, z as created, 1 by default),
so ``block_size`` x and y must cover the volume's.
"""

from __future__ import annotations

import io
import json

import numpy as np
import tifffile
from cloudfiles import CloudFiles

from .. import storage  # noqa: F401  file:// sections are written whole (temporary name, rename)
from ..geometry import Box, Vec3
from .base import MissingBlock, Volume, VolumeError, plain_resolution

SIDECAR = "volume.json"
SUFFIXES = (".tif", ".tiff")


def section_name(z: int) -> str:
    return f"{z:05d}.tif"


def _listed_sections(files: CloudFiles) -> list[str]:
    """The folder's TIFF files in name order (none if the folder does not exist)."""
    try:
        return sorted(n for n in files.list(flat=True) if n.lower().endswith(SUFFIXES))
    except FileNotFoundError:
        return []


def _decode(data: bytes, name: str) -> np.ndarray:
    """A section as (c, y, x), whether stored (y, x), (c, y, x) or RGB (y, x, samples)."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            image = series.asarray()
    except (tifffile.TiffFileError, ValueError) as e:
        raise VolumeError(f"{name} is not a readable TIFF image: {e}") from None
    if series.axes.endswith("S"):
        image = np.moveaxis(image, -1, 0)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise VolumeError(f"{name} holds a {image.ndim}-dimensional image; a section is (y, x) or (c, y, x)")
    return image


def _encode(section: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, section[0] if len(section) == 1 else section, photometric="minisblack",
                     compression="zlib", compressionargs={"level": 1})
    return buf.getvalue()


class TiffStackVolume(Volume):
    def __init__(self, location: str, mip: int = 0, **options) -> None:
        super().__init__(location, mip, **options)
        self._files = CloudFiles(location)
        try:
            meta = self._files.get_json(SIDECAR)
        except json.JSONDecodeError:
            raise VolumeError(f"{location}/{SIDECAR} is not JSON") from None
        if meta is not None:
            self._names = None  # section z is section_name(z)
            self.bounds = Box.from_shape(Vec3.of(meta["voxel_offset"]), Vec3.of(meta["size"]))
            self.dtype, self.num_channels = np.dtype(meta["dtype"]), int(meta["num_channels"])
            self.resolution = plain_resolution(meta["resolution"])
            self.block_size = Vec3.of(meta["block_size"])
            return
        self._names = _listed_sections(self._files)
        if not self._names:
            raise VolumeError(f"no TIFF stack at {self.url} (no {SIDECAR}, no .tif files)")
        first = _decode(self._files.get(self._names[0]), self._names[0])
        c, y, x = first.shape
        self.bounds = Box((0, 0, 0), (x, y, len(self._names)))
        self.dtype, self.num_channels = first.dtype, c
        self.resolution = [1, 1, 1]
        self.block_size = Vec3(x, y, 1)

    def _name(self, z: int) -> str:
        return section_name(z) if self._names is None else self._names[z - self.bounds.start.z]

    @classmethod
    def create(cls, location: str, *, bounds: Box, block_size: Vec3, dtype: str, num_channels: int,
               resolution, layer_type: str = "image") -> None:
        if block_size.x < bounds.shape.x or block_size.y < bounds.shape.y:
            raise VolumeError(
                f"block_size {block_size.to_list()} of tif://{location}: a TIFF stack stores whole z sections, "
                f"so x and y must cover the volume's {bounds.shape.to_list()[:2]}"
            )
        CloudFiles(location).put_json(SIDECAR, {
            "voxel_offset": bounds.start.to_list(), "size": bounds.shape.to_list(),
            "resolution": plain_resolution(resolution), "dtype": np.dtype(dtype).name,
            "num_channels": num_channels, "block_size": block_size.to_list(),
        })

    @staticmethod
    def exists(location: str) -> bool:
        files = CloudFiles(location)
        return files.exists(SIDECAR) or bool(_listed_sections(files))

    def _read_inside(self, box: Box) -> np.ndarray:
        names = [self._name(z) for z in range(box.start.z, box.stop.z)]
        found = {r["path"]: r["content"] for r in self._files.get(names)}
        y, x = box.to_zyx_slices(relative_to=self.bounds)[1:]
        out = np.empty((self.num_channels, *box.shape.zyx()), self.dtype)
        for i, name in enumerate(names):
            if found.get(name) is None:
                if self.fill_missing:  # known here: no second, block-by-block read
                    out[:, i] = self.fill_value
                    continue
                raise MissingBlock(f"{self.location.rstrip('/')}/{name}")
            out[:, i] = _decode(found[name], name)[:, y, x]
        return out

    def _write_aligned(self, box: Box, data: np.ndarray) -> None:
        """Aligned boxes span whole sections (the blocks cover x and y)."""
        self._files.puts(
            [(self._name(z), _encode(data[:, i])) for i, z in enumerate(range(box.start.z, box.stop.z))],
            compress=None, content_type="image/tiff",
        )
