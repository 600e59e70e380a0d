"""Blend windows and the global patch grid.

A window weights the voxels of one output patch.  For a patch of n voxels along
an axis, i in [0, n), each window is built from one 1D factor per axis:

- ``bump`` (chunkflow's): ``u = 2 (i + 1) / (n + 1) - 1``, ``f = exp(-1 / (1 - u^2))``,
  scaled to a maximum of 1 and clamped below at ``WINDOW_FLOOR``;
  ``w(x, y, z) = fx(x) fy(y) fz(z)``.  chunkflow also rescales the 3D bump into
  [1, 1e6] and normalizes it by 27 shifted copies; we divide by the exact weight
  sum instead, which equals that normalization inside the volume and is also
  right at its faces.
- ``gaussian`` (MONAI 1.6.1's ``compute_importance_map(patch, "gaussian",
  sigma_scale=0.125)``): ``f = exp(-(i - (n - 1) / 2)^2 / (2 sigma^2))`` with
  ``sigma = 0.125 n``, not rescaled (its peak is below 1 when n is even), and
  the 3D product is clamped below: ``w = max(fx(x) fy(y) fz(z), WINDOW_FLOOR)``.
- ``constant``: ``w = 1`` (a plain average of overlapping patches).

So no voxel of a patch has zero weight.

The patch grid is global: output patch origins sit at ``roi.start + k * stride``
on each axis, and the last patch is moved back to end at the ROI's face (as in
MONAI), so the grid is the Cartesian product of three 1D origin lists.  Stage 2
divides by the weight sum ``W(v) = sum over origins o of w(v - o)``.  For
``bump`` and ``constant`` the window is separable and the grid a product, so
``W(x, y, z) = Wx(x) Wy(y) Wz(z)`` costs O(chunk edge).  The 3D clamp makes
``gaussian`` inseparable, so its W adds the 3D window of every patch that
reaches the box, in the order the reference pass does.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from .geometry import Box, Vec3

WINDOW_FLOOR = 1e-3


class BlendMode(StrEnum):
    BUMP = "bump"
    GAUSSIAN = "gaussian"
    CONSTANT = "constant"

    @classmethod
    def parse(cls, name: str) -> "BlendMode":
        try:
            return cls(name)
        except ValueError:
            close = difflib.get_close_matches(str(name), [m.value for m in cls], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown blend window {name!r}: choose one of {[m.value for m in cls]}{hint}"
            ) from None


def window_1d(mode: BlendMode | str, n: int) -> np.ndarray:
    """The 1D factor of a window along an axis of ``n`` voxels (float64).

    ``bump`` and ``constant`` factors peak at 1 and are clamped at WINDOW_FLOOR;
    the ``gaussian`` factor is MONAI's raw exponential, clamped only in 3D.
    """
    mode = BlendMode.parse(mode)
    i = np.arange(n, dtype=np.float64)
    if mode is BlendMode.CONSTANT:
        return np.ones(n)
    if mode is BlendMode.GAUSSIAN:
        sigma = 0.125 * n
        return np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma * sigma))
    u = 2.0 * (i + 1) / (n + 1) - 1.0
    w = np.exp(-1.0 / (1.0 - u * u))
    return np.maximum(w / w.max(), WINDOW_FLOOR)


def _outer(wx: np.ndarray, wy: np.ndarray, wz: np.ndarray) -> np.ndarray:
    return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]


def window_3d(mode: BlendMode | str, patch: Vec3) -> np.ndarray:
    """The window of an output patch, as a (z, y, x) float32 array."""
    mode = BlendMode.parse(mode)
    w = _outer(*(window_1d(mode, n) for n in patch))
    if mode is BlendMode.GAUSSIAN:
        w = np.maximum(w, WINDOW_FLOOR)  # MONAI clamps the product, not each factor
    return w.astype(np.float32)


@dataclass(frozen=True)
class PatchGrid:
    """Output patch origins over a region of interest.

    ``roi`` is the output region; ``patch`` the output patch; ``stride`` the
    distance between neighbouring origins (output patch minus overlap).
    """

    roi: Box
    patch: Vec3
    stride: Vec3

    def __post_init__(self) -> None:
        if any(p > s for p, s in zip(self.patch, self.roi.shape)):
            raise ValueError(
                f"output patch {self.patch.to_list()} is larger than the region of interest "
                f"{self.roi.shape.to_list()} ({self.roi})"
            )
        if not self.stride.all_positive() or any(s > p for s, p in zip(self.stride, self.patch)):
            raise ValueError(
                f"patch stride {self.stride.to_list()} must be in [1, output patch "
                f"{self.patch.to_list()}] on every axis"
            )

    def axis_origins(self, axis: int, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        """Sorted origins along ``axis`` that lie in ``[lo, hi)`` (default: all)."""
        start, p, s = self.roi.start[axis], self.patch[axis], self.stride[axis]
        span = self.roi.shape[axis] - p  # the last origin is start + span
        lo = start if lo is None else lo
        hi = start + span + 1 if hi is None else hi
        k0 = max(0, -(-(lo - start) // s))
        k1 = -(-(min(span, hi - start)) // s) if hi - start > 0 else 0
        regular = start + s * np.arange(k0, max(k0, k1), dtype=np.int64)
        if lo <= start + span < hi:
            regular = np.append(regular, start + span)
        return regular

    def origins_in(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-axis origins of the patches whose origin lies in ``box``."""
        return tuple(self.axis_origins(a, box.start[a], box.stop[a]) for a in range(3))  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(np.prod([len(self.axis_origins(a)) for a in range(3)]))

    def origins_reaching(self, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-axis origins of the patches whose output touches ``box``: they start less than
        one patch below it."""
        return tuple(self.axis_origins(a, box.start[a] - self.patch[a] + 1, box.stop[a])  # type: ignore[return-value]
                     for a in range(3))

    def weight_sum(self, box: Box, mode: BlendMode | str) -> np.ndarray:
        """Sum of all patches' windows over ``box``, as a (z, y, x) float64 array."""
        mode = BlendMode.parse(mode)
        reach = self.origins_reaching(box)
        if mode is BlendMode.GAUSSIAN:
            window = window_3d(mode, self.patch).astype(np.float64)
            acc = np.zeros(box.shape.zyx())
            for z, y, x in itertools.product(reach[2], reach[1], reach[0]):
                patch = Box.from_shape(Vec3(int(x), int(y), int(z)), self.patch)
                common = patch.intersection(box)
                acc[common.to_zyx_slices(box)] += window[common.to_zyx_slices(patch)]
            return acc
        per_axis = []
        for a in range(3):
            lo, hi, p = box.start[a], box.stop[a], self.patch[a]
            w1 = window_1d(mode, p)
            acc1 = np.zeros(hi - lo)
            for o in reach[a]:
                s, e = max(o, lo), min(o + p, hi)
                acc1[s - lo:e - lo] += w1[s - o:e - o]
            per_axis.append(acc1)
        return _outer(*per_axis)
