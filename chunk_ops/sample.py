"""Synthetic serial-section EM with ground truth, deterministic by seed.

Used to train the bundled network, to measure segmentation quality on held-out
seeds, and by the demo, tests and benchmarks.  What it draws, on an anisotropic
grid (4 x 4 x 40 nm voxels by default):

- cells: a Voronoi tessellation of random seeds, in physical units with z
  distances shrunk so cells run as neurite-like columns through many sections,
  on coordinates warped by a smooth random field so borders curve;
- dark membranes, 2-3 pixels wide, on the cell borders within each section;
- cytoplasm with a per-cell density, fine texture, mitochondria-like blobs and
  vesicle-like dots that never touch a membrane;
- blur, noise, and per-section brightness and contrast drift.

Ground truth labels every voxel with its cell id, except membrane voxels, which
are 0 (unlabelled; segmentation metrics ignore them, as in SNEMI3D and CREMI).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .geometry import Box, Vec3
from .volumes import Volume, create_volume

RESOLUTION_NM = (4, 4, 40)


@dataclass(frozen=True)
class SyntheticEM:
    """Knobs of the generator; lengths in pixels (x/y) unless named otherwise."""

    cell_spacing: float = 44.0    # mean distance between cell seeds in x/y
    z_stretch: float = 4.0        # cells are this much longer along z than wide (physical)
    warp: float = 9.0             # amplitude of the border-bending displacement
    membrane_width: int = 2
    blur: float = 0.8
    noise: float = 9.0
    section_drift: float = 7.0    # std of per-section brightness offset


def _cell_labels(zyx: tuple[int, int, int], rng: np.random.Generator, p: SyntheticEM) -> np.ndarray:
    """uint32 cell ids (1..n) of a warped, z-stretched Voronoi tessellation."""
    nz, ny, nx = zyx
    z_px = RESOLUTION_NM[2] / RESOLUTION_NM[0] / p.z_stretch  # one section, in x/y-pixel units
    pad = p.cell_spacing
    extent = np.array([nz * z_px + 2 * pad, ny + 2 * pad, nx + 2 * pad])
    count = max(1, int(np.prod(extent) / p.cell_spacing ** 3))
    seeds = rng.uniform(0, 1, size=(count, 3)) * extent - pad
    warp = [
        ndimage.gaussian_filter(rng.standard_normal(zyx, dtype=np.float32), sigma=(2, 24, 24))
        for _ in range(2)
    ]
    for w in warp:
        w *= p.warp / (w.std() + 1e-12)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in zyx), indexing="ij")
    points = np.stack([z.ravel() * z_px, (y + warp[0]).ravel(), (x + warp[1]).ravel()], axis=1)
    _, nearest = cKDTree(seeds).query(points, workers=-1)
    labels = nearest.reshape(zyx).astype(np.uint32) + 1
    # ids in order of first appearance, so they do not depend on unused seeds
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return (order[inverse.reshape(zyx)] + 1).astype(np.uint32)


def _membranes(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels on a cell border within their section, widened to ``width`` or so."""
    border = np.zeros(labels.shape, bool)
    for axis in (1, 2):
        differs = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        border[tuple(lo)] |= differs
        if width > 1:
            border[tuple(hi)] |= differs
    if width > 2:
        border = ndimage.binary_dilation(border, np.ones((1, 3, 3), bool), iterations=(width - 1) // 2)
    return border


def _blobs(shape, rng, allowed: np.ndarray, density: float, radius: float) -> np.ndarray:
    """Ellipsoid-ish blobs of about ``radius`` pixels centred where ``allowed``."""
    candidates = np.flatnonzero(allowed)
    count = int(allowed.size * density)
    if count == 0 or candidates.size == 0:
        return np.zeros(shape, bool)
    centres = np.zeros(shape, bool)
    centres.flat[rng.choice(candidates, size=min(count, candidates.size), replace=False)] = True
    sampling = (RESOLUTION_NM[2] / RESOLUTION_NM[0] / 2, 1.0, 1.0)  # blobs span a few sections
    return ndimage.distance_transform_edt(~centres, sampling=sampling) < radius


def synthetic_em(shape_xyz, seed: int = 0, params: SyntheticEM = SyntheticEM()) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 image and uint32 ground-truth labels, both (z, y, x), of x, y, z shape."""
    zyx = Vec3.of(shape_xyz).zyx()
    rng = np.random.default_rng(seed)
    labels = _cell_labels(zyx, rng, params)
    membrane = _membranes(labels, params.membrane_width)

    # cytoplasm: a density per cell plus fine texture
    density = rng.normal(0, 12, size=int(labels.max()) + 1).astype(np.float32)
    texture = ndimage.gaussian_filter(rng.standard_normal(zyx, dtype=np.float32), sigma=(0.5, 1.5, 1.5))
    image = 160 + density[labels] + 40 * texture

    # organelles stay clear of membranes, so they never bridge two cells
    clearance = ndimage.distance_transform_edt(~membrane, sampling=(10.0, 1.0, 1.0))
    mito = _blobs(zyx, rng, clearance > 9, density=5e-5, radius=5.5)
    vesicle = _blobs(zyx, rng, clearance > 4, density=2e-4, radius=1.8) & ~mito
    image[mito] = 105 + 10 * texture[mito]
    image[vesicle] = 115
    image[membrane] = 45

    image = ndimage.gaussian_filter(image, sigma=(0.3, params.blur, params.blur))
    gain = rng.normal(1.0, 0.05, size=(zyx[0], 1, 1)).astype(np.float32)
    offset = rng.normal(0.0, params.section_drift, size=(zyx[0], 1, 1)).astype(np.float32)
    image = image * gain + offset + rng.normal(0, params.noise, size=zyx).astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    truth = np.where(membrane, 0, labels).astype(np.uint32)
    return image, truth


def write_sample(url: str, shape_xyz, *, seed: int = 0, labels_url: str | None = None,
                 block_size=(64, 64, 8), offset=(0, 0, 0)) -> Volume:
    """Write a synthetic EM image layer at ``url`` (and its ground truth at ``labels_url``)."""
    shape = Vec3.of(shape_xyz)
    bounds = Box.from_shape(Vec3.of(offset), shape)
    image, truth = synthetic_em(shape, seed)
    vol = create_volume(url, bounds=bounds, block_size=Vec3.of(block_size), dtype="uint8",
                        num_channels=1, resolution=RESOLUTION_NM)
    vol.write(bounds, image[None])
    if labels_url is not None:
        labels = create_volume(labels_url, bounds=bounds, block_size=Vec3.of(block_size), dtype="uint32",
                               num_channels=1, resolution=RESOLUTION_NM, layer_type="segmentation")
        labels.write(bounds, truth[None])
    return vol
