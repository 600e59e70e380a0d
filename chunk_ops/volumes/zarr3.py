"""Zarr v3 arrays: ``zarr3://``.  Everything but the version of a created array is
:mod:`.zarr`'s (an existing v2 array opens here too)."""

from __future__ import annotations

from .zarr import ZarrVolume


class Zarr3Volume(ZarrVolume):
    version = 3
