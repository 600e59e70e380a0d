"""Voxel geometry: integer vectors, half-open boxes and block-aligned chunk grids.

Every public coordinate is in voxels, in x, y, z order, and boxes are half-open
``[start, stop)``, as in cloud-volume and Neuroglancer.  These are small immutable
values: safe as dictionary keys, cheap to copy, validated on creation.

A chunk grid tiles a region of interest (ROI) with chunks whose boundaries sit on
``origin + k * chunk_size``; the chunks at the ROI's edges are clipped to it::

      origin        ROI.start                              ROI.stop
        |-------------|====:=========|==============|=======|----|
        |  chunk 0    |  chunk 1     |  chunk 2     | chunk 3    |
                      ^ clipped                             ^ clipped

Chunk ``(i, j, k)`` has id ``"x0-x1_y0-y1_z0-z1"`` (its box as a file name), so
ids are deterministic and readable.  :class:`ChunkPlan` is a lazy sequence over
the chunks: index to box in O(1), no list of boxes is ever built.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Iterator, Sequence, overload

AXES = ("x", "y", "z")


def _as_int(value: object, what: str) -> int:
    # numpy integers have __index__; floats, strings and bools are refused.
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value.__index__())  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class Vec3:
    """An integer x, y, z triple with elementwise arithmetic."""

    x: int
    y: int
    z: int

    def __post_init__(self) -> None:
        if type(self.x) is int and type(self.y) is int and type(self.z) is int:
            return  # the common case, kept cheap: plans build millions of these
        for axis in AXES:
            object.__setattr__(self, axis, _as_int(getattr(self, axis), f"Vec3.{axis}"))

    @classmethod
    def of(cls, value: "Vec3 | Sequence[int] | int") -> "Vec3":
        """A Vec3 from a Vec3, an (x, y, z) sequence, or one int for all axes."""
        if isinstance(value, Vec3):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value, value, value)
        try:
            items = list(value)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"expected an (x, y, z) triple, got {value!r}") from None
        if len(items) != 3:
            raise ValueError(f"expected an (x, y, z) triple, got {value!r}")
        return cls(*items)

    def __iter__(self) -> Iterator[int]:
        yield self.x
        yield self.y
        yield self.z

    def __getitem__(self, axis: int) -> int:
        return (self.x, self.y, self.z)[axis]

    def __len__(self) -> int:
        return 3

    def _zip(self, other: "Vec3 | Sequence[int] | int", op) -> "Vec3":
        o = Vec3.of(other)
        return Vec3(op(self.x, o.x), op(self.y, o.y), op(self.z, o.z))

    def __add__(self, other):
        return self._zip(other, int.__add__)

    def __sub__(self, other):
        return self._zip(other, int.__sub__)

    def __mul__(self, other):
        return self._zip(other, int.__mul__)

    def __floordiv__(self, other):
        return self._zip(other, int.__floordiv__)

    def __mod__(self, other):
        return self._zip(other, int.__mod__)

    def __neg__(self) -> "Vec3":
        return Vec3(-self.x, -self.y, -self.z)

    def ceildiv(self, other: "Vec3 | Sequence[int] | int") -> "Vec3":
        return self._zip(other, lambda a, b: -(-a // b))

    def minimum(self, other) -> "Vec3":
        return self._zip(other, min)

    def maximum(self, other) -> "Vec3":
        return self._zip(other, max)

    def all_positive(self) -> bool:
        return self.x > 0 and self.y > 0 and self.z > 0

    def prod(self) -> int:
        return self.x * self.y * self.z

    def zyx(self) -> tuple[int, int, int]:
        """The numpy array order used by networks, (z, y, x)."""
        return (self.z, self.y, self.x)

    def to_list(self) -> list[int]:
        return [self.x, self.y, self.z]

    def __repr__(self) -> str:
        return f"Vec3({self.x}, {self.y}, {self.z})"


_FILENAME = re.compile(r"^(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)_(-?\d+)-(-?\d+)$")


@dataclass(frozen=True, slots=True)
class Box:
    """A half-open box ``[start, stop)`` in voxels, x, y, z order.

    ``start <= stop`` on every axis; a box with ``start == stop`` on some axis is
    empty (it contains no voxel) and is allowed, since intersections produce them.
    """

    start: Vec3
    stop: Vec3

    def __post_init__(self) -> None:
        if type(self.start) is not Vec3:
            object.__setattr__(self, "start", Vec3.of(self.start))
        if type(self.stop) is not Vec3:
            object.__setattr__(self, "stop", Vec3.of(self.stop))
        s, e = self.start, self.stop
        if s.x > e.x or s.y > e.y or s.z > e.z:
            raise ValueError(f"box start {self.start.to_list()} exceeds stop {self.stop.to_list()}")

    # --- named constructors and their inverses ---------------------------------
    @classmethod
    def from_shape(cls, start, shape) -> "Box":
        start = Vec3.of(start)
        return cls(start, start + Vec3.of(shape))

    @classmethod
    def from_dict(cls, d: dict) -> "Box":
        if not isinstance(d, dict) or set(d) != {"start", "stop"}:
            raise ValueError(f'a box is {{"start": [x, y, z], "stop": [x, y, z]}}, got {d!r}')
        return cls(Vec3.of(d["start"]), Vec3.of(d["stop"]))

    def to_dict(self) -> dict:
        return {"start": self.start.to_list(), "stop": self.stop.to_list()}

    @classmethod
    def from_filename(cls, name: str) -> "Box":
        m = _FILENAME.match(name)
        if not m:
            raise ValueError(f"not a box file name (x0-x1_y0-y1_z0-z1): {name!r}")
        v = [int(g) for g in m.groups()]
        return cls(Vec3(v[0], v[2], v[4]), Vec3(v[1], v[3], v[5]))

    def to_filename(self) -> str:
        return "_".join(f"{a}-{b}" for a, b in zip(self.start, self.stop))

    def to_slices(self) -> tuple[slice, slice, slice]:
        """Slices in x, y, z order (cloud-volume indexing)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def to_zyx_slices(self, relative_to: "Box | None" = None) -> tuple[slice, slice, slice]:
        """Slices in z, y, x order into an array that covers ``relative_to``."""
        base = relative_to.start if relative_to is not None else Vec3(0, 0, 0)
        s, e = self.start - base, self.stop - base
        return (slice(s.z, e.z), slice(s.y, e.y), slice(s.x, e.x))

    # --- queries -------------------------------------------------------------
    @property
    def shape(self) -> Vec3:
        return self.stop - self.start

    @property
    def size(self) -> int:
        return self.shape.prod()

    def is_empty(self) -> bool:
        return self.size == 0

    def contains(self, other: "Box") -> bool:
        return all(a <= c for a, c in zip(self.start, other.start)) and all(
            d <= b for b, d in zip(self.stop, other.stop)
        )

    def intersection(self, other: "Box") -> "Box":
        """The common part; empty (start == stop) where the boxes do not overlap."""
        start = self.start.maximum(other.start)
        stop = self.stop.minimum(other.stop).maximum(start)
        return Box(start, stop)

    def intersects(self, other: "Box") -> bool:
        return not self.intersection(other).is_empty()

    # --- new boxes -------------------------------------------------------------
    def grow(self, amount) -> "Box":
        """Grow by ``amount`` voxels on both sides of each axis (shrink if negative)."""
        a = Vec3.of(amount)
        return Box(self.start - a, self.stop + a)

    def shift(self, offset) -> "Box":
        o = Vec3.of(offset)
        return Box(self.start + o, self.stop + o)

    def is_aligned(self, grid_origin, block, bounds: "Box | None" = None) -> bool:
        """Do the faces of this box lie on the block grid (or on ``bounds``' faces)?"""
        origin, block = Vec3.of(grid_origin), Vec3.of(block)
        for ax in range(3):
            if (self.start[ax] - origin[ax]) % block[ax]:
                return False
            at_bound = bounds is not None and self.stop[ax] == bounds.stop[ax]
            if (self.stop[ax] - origin[ax]) % block[ax] and not at_bound:
                return False
        return True

    def __repr__(self) -> str:
        return f"Box({self.start.to_list()}, {self.stop.to_list()})"


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """The chunks that tile ``roi`` on the grid ``origin + k * chunk_size``.

    A lazy, indexable sequence: ``plan[i]`` is a :class:`Box`, ``len(plan)`` is the
    chunk count, ``plan[a:b]`` is a smaller plan view, iteration yields boxes in
    x-fastest order.  Only the per-axis chunk bounds are stored (a few thousand
    integers even for a petavoxel volume), never one entry per chunk.
    """

    roi: Box
    chunk_size: Vec3
    origin: Vec3
    # per axis: the (start, stop) of each chunk along it, clipped to the ROI
    _axis_bounds: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "chunk_size", Vec3.of(self.chunk_size))
        object.__setattr__(self, "origin", Vec3.of(self.origin))
        if not self.chunk_size.all_positive():
            raise ValueError(f"chunk size must be positive, got {self.chunk_size.to_list()}")
        if self.roi.is_empty():
            raise ValueError(f"region of interest is empty: {self.roi}")
        bounds = []
        for ax in range(3):
            lo, hi, c, o = self.roi.start[ax], self.roi.stop[ax], self.chunk_size[ax], self.origin[ax]
            first = o + (lo - o) // c * c
            bounds.append(tuple((max(a, lo), min(a + c, hi)) for a in range(first, hi, c)))
        object.__setattr__(self, "_axis_bounds", tuple(bounds))

    @property
    def first_index(self) -> Vec3:
        """Grid index of the chunk holding the ROI's first voxel."""
        return (self.roi.start - self.origin) // self.chunk_size

    @property
    def grid_shape(self) -> Vec3:
        """Chunks per axis."""
        return Vec3(*(len(b) for b in self._axis_bounds))

    def axis_bounds(self, axis: int) -> tuple[tuple[int, int], ...]:
        """The (start, stop) of the chunks along one axis, clipped to the ROI."""
        return self._axis_bounds[axis]

    def __len__(self) -> int:
        bx, by, bz = self._axis_bounds
        return len(bx) * len(by) * len(bz)

    def grid_index(self, i: int) -> Vec3:
        """Chunk grid position (relative to the ROI's first chunk) of linear index i."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"chunk index {i} out of range for a plan of {n} chunks")
        i %= n
        gx, gy = len(self._axis_bounds[0]), len(self._axis_bounds[1])
        return Vec3(i % gx, (i // gx) % gy, i // (gx * gy))

    def linear_index(self, grid_index: Vec3) -> int:
        gx, gy, gz = self.grid_shape
        g = Vec3.of(grid_index)
        if not (0 <= g.x < gx and 0 <= g.y < gy and 0 <= g.z < gz):
            raise IndexError(f"grid index {g.to_list()} outside the grid {[gx, gy, gz]}")
        return g.x + gx * (g.y + gy * g.z)

    def box_at(self, grid_index: Vec3) -> Box:
        """The chunk at a grid position, clipped to the ROI."""
        bx, by, bz = self._axis_bounds
        (x0, x1), (y0, y1), (z0, z1) = bx[grid_index.x], by[grid_index.y], bz[grid_index.z]
        return Box(Vec3(x0, y0, z0), Vec3(x1, y1, z1))

    @overload
    def __getitem__(self, i: int) -> Box: ...
    @overload
    def __getitem__(self, i: slice) -> "ChunkPlanView": ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return ChunkPlanView(self, range(len(self))[i])
        return self.box_at(self.grid_index(i))

    def __iter__(self) -> Iterator[Box]:
        bx, by, bz = self._axis_bounds
        for (z0, z1), (y0, y1), (x0, x1) in itertools.product(bz, by, bx):
            yield Box(Vec3(x0, y0, z0), Vec3(x1, y1, z1))

    def chunks_meeting(self, box: Box) -> list[Box]:
        """The chunks that share a voxel with ``box``, in plan order."""
        inside = box.intersection(self.roi)
        if inside.is_empty():
            return []
        lo = (inside.start - self.origin) // self.chunk_size - self.first_index
        hi = (inside.stop - 1 - self.origin) // self.chunk_size - self.first_index
        return [self.box_at(Vec3(gx, gy, gz)) for gz in range(lo.z, hi.z + 1)
                for gy in range(lo.y, hi.y + 1) for gx in range(lo.x, hi.x + 1)]

    def face_neighbours(self, box: Box, side: int) -> list[tuple[int, Box]]:
        """(axis, chunk) of each chunk sharing a face with ``box`` on its lower (``side`` -1)
        or upper (+1) x, y and z side, where the plan has one."""
        found = []
        for axis in range(3):
            edge = box.start[axis] - 1 if side < 0 else box.stop[axis]
            if not self.roi.start[axis] <= edge < self.roi.stop[axis]:
                continue
            point = [edge if a == axis else box.start[a] for a in range(3)]
            found.append((axis, self.chunks_meeting(Box(point, [p + 1 for p in point]))[0]))
        return found

    def index_of(self, box: Box) -> int:
        """Linear index of the chunk whose box is ``box`` (raises if it is none)."""
        g = (box.start - self.origin) // self.chunk_size - self.first_index
        i = self.linear_index(g)
        if self[i] != box:
            raise ValueError(f"{box} is not a chunk of this plan")
        return i

    @staticmethod
    def chunk_id(box: Box) -> str:
        return box.to_filename()


@dataclass(frozen=True, slots=True)
class ChunkPlanView:
    """A slice of a plan: a range of linear indices, still lazy."""

    plan: ChunkPlan
    indices: range

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ChunkPlanView(self.plan, self.indices[i])
        return self.plan[self.indices[i]]

    def __iter__(self) -> Iterator[Box]:
        for i in self.indices:
            yield self.plan[i]
