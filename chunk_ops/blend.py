"""Blend windows and the global patch grid.

Windows are separable: ``w(x, y, z) = wx(x) * wy(y) * wz(z)``, each 1D window
scaled to a maximum of 1 and clamped below at ``WINDOW_FLOOR`` so that no voxel
of a patch has zero weight.  For a patch of n voxels along an axis, i in [0, n):

- ``bump`` (chunkflow's): ``u = 2 (i + 1) / (n + 1) - 1``, ``w = exp(-1 / (1 - u^2))``.
  chunkflow also rescales the 3D bump into [1, 1e6] and normalizes it by 27
  shifted copies; we divide by the exact weight sum instead, which equals that
  normalization inside the volume and is also right at its faces.
- ``gaussian`` (MONAI's): ``w = exp(-(i - (n - 1) / 2)^2 / (2 sigma^2))``,
  ``sigma = 0.125 n``.
- ``constant``: ``w = 1`` (a plain average of overlapping patches).

The patch grid is global: output patch origins sit at ``roi.start + k * stride``
on each axis, and the last patch is moved back to end at the ROI's face (as in
MONAI), so the grid is the Cartesian product of three 1D origin lists.  Because
the window is separable and the grid is a product, the weight sum is separable
too, ``W(x, y, z) = Wx(x) Wy(y) Wz(z)``: stage 2 computes it from the grid in
O(chunk edge) instead of storing a weight channel per voxel.
"""

from __future__ import annotations

import difflib
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
    """The 1D window of length ``n`` (float64, maximum 1, minimum WINDOW_FLOOR)."""
    mode = BlendMode.parse(mode)
    i = np.arange(n, dtype=np.float64)
    if mode is BlendMode.CONSTANT:
        w = np.ones(n)
    elif mode is BlendMode.BUMP:
        u = 2.0 * (i + 1) / (n + 1) - 1.0
        w = np.exp(-1.0 / (1.0 - u * u))
    else:
        sigma = 0.125 * n
        w = np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma * sigma))
    return np.maximum(w / w.max(), WINDOW_FLOOR)


def window_3d(mode: BlendMode | str, patch: Vec3) -> np.ndarray:
    """The separable window of an output patch, as a (z, y, x) float32 array."""
    wx, wy, wz = (window_1d(mode, n) for n in patch)
    return (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32)


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

    def weight_sum(self, box: Box, mode: BlendMode | str) -> np.ndarray:
        """Sum of all patches' windows over ``box``, as a (z, y, x) float64 array."""
        per_axis = []
        for a in range(3):
            lo, hi, p = box.start[a], box.stop[a], self.patch[a]
            w1 = window_1d(mode, p)
            acc = np.zeros(hi - lo)
            for o in self.axis_origins(a, lo - p + 1, hi):
                s, e = max(o, lo), min(o + p, hi)
                acc[s - lo:e - lo] += w1[s - o:e - o]
            per_axis.append(acc)
        wx, wy, wz = per_axis
        return wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
