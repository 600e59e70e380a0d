"""The two-stage blend, and the whole-volume reference it must equal.

Stage 1 (per chunk, needs the network): evaluate the patches whose origin lies in
the chunk, each exactly once, and store ``sum(window * prediction)`` over the
region those patches cover (the chunk plus its upper overhang) as scratch, cut
into pieces by the chunks they fall in (so a merge reads only its own parts).

Stage 2 (per chunk, merge, CPU only): add the parts of the partial sums of the
chunk itself and of its lower neighbours that fall in the chunk, divide by the
weight sum (separable, computed from the grid), cast and write the block-aligned
output.  Contributions are added in plan order, so the bytes do not depend on
the order chunks were processed in, or on how often.

Every patch is computed exactly once, so compute amplification is 1.00, and the
output equals :func:`reference_pass` up to float rounding.

Integrity: a stage-1 marker records the sha256 of each piece of its partial sum; stage 2
reads a piece only if its bytes match, and redoes the stage 1 of a chunk whose partial is
missing, torn or corrupted (then merges), so a bad partial never reaches the output.
Before each write the worker's ``fence`` confirms it still holds its lease: a worker
that lost it (frozen, partitioned, past its deadline) writes nothing.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .blend import window_3d
from .engines import Predictor
from .geometry import Box, ChunkPlan, Vec3
from .job import BadPartial, Job, NotReady
from .task import PYRAMID, Task

log = logging.getLogger(__name__)

Fence = Callable[[], None]  # raises (LeaseLost) when this worker may no longer write


def _no_fence() -> None:
    pass


@dataclass
class ChunkStats:
    """What one task did; seconds per phase and work counts."""

    read_s: float = 0.0
    infer_s: float = 0.0
    blend_s: float = 0.0
    write_s: float = 0.0
    patches: int = 0
    voxels: int = 0

    def add(self, other: "ChunkStats") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_input(raw: np.ndarray) -> np.ndarray:
    """Integer images to [0, 1] floats by their type's range; floats as they are."""
    if raw.dtype == np.uint8:
        return raw.astype(np.float32) / np.float32(255)
    if raw.dtype == np.uint16:
        return raw.astype(np.float32) / np.float32(65535)
    if raw.dtype.kind == "f":
        return raw.astype(np.float32, copy=False)
    raise ValueError(f"input dtype {raw.dtype} is not supported (uint8, uint16 or float)")


def cast_output(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    return values.astype(np.float32)


def predict_into(
    predictor: Predictor,
    image: np.ndarray,
    origins: tuple[np.ndarray, np.ndarray, np.ndarray],
    base: Vec3,
    acc: np.ndarray,
    window: np.ndarray,
    stats: ChunkStats,
    weights: np.ndarray | None = None,
) -> None:
    """Evaluate each patch once and add ``window * prediction`` into ``acc``.

    ``acc`` covers the output region starting at ``base``; ``image`` covers that
    region grown by the model's context margin, so a patch whose output starts at
    origin ``o`` reads ``image`` from ``o - base`` too.  ``weights``, when given,
    accumulates the window itself (the reference pass does that naively).
    """
    pin, pout = predictor.input_patch, predictor.output_patch
    todo = [Vec3(int(x), int(y), int(z)) for z, y, x in itertools.product(origins[2], origins[1], origins[0])]

    def blend(rel: list[Vec3], result) -> None:
        t0 = time.perf_counter()
        out = result()  # waits for the engine where it runs asynchronously
        t1 = time.perf_counter()
        for r, pred in zip(rel, out):
            where = (slice(r.z, r.z + pout.z), slice(r.y, r.y + pout.y), slice(r.x, r.x + pout.x))
            acc[(slice(None), *where)] += pred * window
            if weights is not None:
                weights[where] += window
        stats.infer_s += t1 - t0
        stats.blend_s += time.perf_counter() - t1

    # one batch in flight: the next is cut and the previous blended while it computes;
    # blending stays in plan order, so the sums (and bytes) do not change
    with predictor.lock:
        pending = None
        for first in range(0, len(todo), predictor.batch_size):
            rel = [o - base for o in todo[first:first + predictor.batch_size]]
            batch = np.stack([image[:, r.z:r.z + pin.z, r.y:r.y + pin.y, r.x:r.x + pin.x] for r in rel])
            t0 = time.perf_counter()
            result = predictor.submit(batch)
            stats.infer_s += time.perf_counter() - t0
            stats.patches += len(rel)
            if pending is not None:
                blend(*pending)
            pending = (rel, result)
        if pending is not None:
            blend(*pending)


def run_stage1(job: Job, chunk: Box, fence: Fence = _no_fence) -> tuple[ChunkStats, dict]:
    """Stage 1 of one chunk: its patches, blended into a scratch partial sum.

    Returns the work done and what its done marker must keep (its pieces' sha256).
    """
    stats = ChunkStats(voxels=chunk.size)
    part = job.partial_box(chunk)
    if part is None:
        return stats, {"partial_pieces": {}}
    t0 = time.perf_counter()
    image = normalize_input(job.input.read(part.grow(job.spec.model.margin)))
    stats.read_s += time.perf_counter() - t0
    # float32: a voxel sums the few patches over it (window x prediction), and the partial
    # is stored as float32 anyway; float64 doubled the blend's memory traffic
    acc = np.zeros((job.spec.model.out_channels, *part.shape.zyx()), np.float32)
    window = window_3d(job.blend, job.spec.model.output_patch)
    predict_into(job.predictor, image, job.grid.origins_in(chunk), part.start, acc, window, stats)
    t0 = time.perf_counter()
    fence()
    pieces = job.put_partial(chunk, acc)
    stats.write_s += time.perf_counter() - t0
    return stats, {"partial_pieces": pieces}


def _verified_piece(job: Job, neighbour: Box, chunk: Box, stats: ChunkStats, fence: Fence) -> np.ndarray:
    """The piece of the neighbour's partial sum inside ``chunk``, as its stage-1 marker
    recorded it; the neighbour's stage 1 is redone here if the piece is bad."""
    record = job.done_record(1, neighbour)
    if record is None:
        raise NotReady(f"stage 1 of chunk {neighbour.to_filename()} is not done yet: "
                       f"run it before merging its neighbours")
    dest = chunk.to_filename()
    try:
        return job.get_piece(neighbour, chunk, (record.get("partial_pieces") or {}).get(dest, ""))
    except BadPartial as e:
        log.warning("redoing stage 1 of chunk %s: %s", neighbour.to_filename(), e)
    redo, extra = run_stage1(job, neighbour, fence)
    stats.add(redo)
    fence()
    job.mark_done(1, neighbour, marker_record(job, 1, redo, {**extra, "redone_by_stage2": True},
                                              started=time.time(), pool="stage2-redo", receive_count=1))
    return job.get_piece(neighbour, chunk, extra["partial_pieces"][dest])


def run_stage2(job: Job, chunk: Box, fence: Fence = _no_fence) -> tuple[ChunkStats, dict]:
    """Stage 2 of one chunk: merge verified partial sums, normalize, cast, write."""
    stats = ChunkStats(voxels=chunk.size)
    redo = ChunkStats()
    t0 = time.perf_counter()
    acc = np.zeros((job.spec.model.out_channels, *chunk.shape.zyx()), np.float64)
    for neighbour in job.contributors(chunk):
        part = job.partial_box(neighbour)
        if part is None or not part.intersects(chunk):
            continue
        common = part.intersection(chunk)
        acc[(slice(None), *common.to_zyx_slices(chunk))] += _verified_piece(job, neighbour, chunk, redo, fence)
    t1 = time.perf_counter()
    acc /= job.grid.weight_sum(chunk, job.blend)
    result = cast_output(acc, job.spec.output_dtype)
    t2 = time.perf_counter()
    fence()
    job.output.write(chunk, result)
    # verification at the source: the chunk's blocks are stored (one existence check each),
    # so the run's verification adds up counts instead of listing every block of the layer
    missing = job.output.missing_blocks(chunk)
    if missing:
        raise RuntimeError(f"output blocks {missing[:3]} of chunk {chunk.to_filename()} are not stored "
                           f"after their write ({len(missing)} missing)")
    stats.read_s += t1 - t0
    stats.blend_s += t2 - t1
    stats.write_s += time.perf_counter() - t2
    stats.patches = redo.patches  # patches of redone stage-1 work count in the amplification
    extra = {"blocks": len(job.output.block_names(chunk))} if missing is not None else {}
    return stats, {**extra, "stage1_redone_patches": redo.patches} if redo.patches else extra


def run_pyramid_block(job: Job, box: Box, mip: int, fence: Fence = _no_fence) -> tuple[ChunkStats, dict]:
    """Stage 6: one block of pyramid level ``mip``, from the level below (mip 0: the output)."""
    from .downsample import build_block

    t0 = time.perf_counter()
    build_block(job.spec.output_url, mip, box, fence)
    return ChunkStats(voxels=box.size, write_s=time.perf_counter() - t0), {}


def run_task(job: Job, task: Task, fence: Fence = _no_fence) -> tuple[ChunkStats, dict]:
    """Do one task of any stage; returns its work and what its done marker keeps besides."""
    if task.stage == PYRAMID:
        return run_pyramid_block(job, task.box, task.mip, fence)
    if task.stage in (1, 2):
        return (run_stage1 if task.stage == 1 else run_stage2)(job, task.box, fence)
    from . import segment_blocks

    run = {3: segment_blocks.label_chunk, 4: segment_blocks.stitch_chunk, 5: segment_blocks.write_chunk}[task.stage]
    return run(job, task.box, fence)


def follow_ups(job: Job, task: Task) -> list[Task]:
    """Tasks that may have become ready now that ``task`` is done, so a stage chains into
    the next without waiting for all of its own chunks:

    - a chunk's stitch (4) needs the labels (3) of the chunk and of its lower face
      neighbours: after chunk c is labelled, c and its upper face neighbours are candidates;
    - a pyramid block at mip k+1 needs the blocks of mip k under it.

    A candidate is sent when every task it needs has its done marker.  Two tasks that
    finish together may both send it: the second copy finds its marker and is skipped,
    or, run at once, writes the same bytes.
    """
    if task.stage == 3:
        candidates = [task.box, *(c for _, c in job.plan.face_neighbours(task.box, +1))]
        ready = [c for c in candidates
                 if all(job.is_done(3, n) for n in [c, *(b for _, b in job.plan.face_neighbours(c, -1))]
                        if n != task.box)]
        return [Task(job.id, job.spec_url, 4, c) for c in ready]
    if task.stage == PYRAMID and task.mip + 1 in job.stage_levels(PYRAMID):
        from .downsample import FACTOR

        below, above = job.stage_plan(PYRAMID, task.mip), job.stage_plan(PYRAMID, task.mip + 1)
        # a level's bounds are rounded from mip 0's, so a block may lie under two parents
        parents = above.chunks_meeting(Box(task.box.start // FACTOR, task.box.stop.ceildiv(FACTOR)))
        return [Task(job.id, job.spec_url, PYRAMID, parent, task.mip + 1) for parent in parents
                if all(job.is_done(PYRAMID, b, task.mip) for b in pyramid_children(below, parent)
                       if b != task.box)]
    return []


def pyramid_children(below: ChunkPlan, parent: Box) -> list[Box]:
    """The blocks of the level below that a pyramid block is built from."""
    from .downsample import FACTOR

    return below.chunks_meeting(Box(parent.start * FACTOR, parent.stop * FACTOR))


def reference_pass(job: Job) -> np.ndarray:
    """The whole ROI in one pass: same grid, same window, weights summed naively.

    Returns (c, z, y, x) float32 over ``job.roi``.  Tests compare runs with it.
    """
    spec = job.spec
    image = normalize_input(job.input.read(job.roi.grow(spec.model.margin)))
    acc = np.zeros((spec.model.out_channels, *job.roi.shape.zyx()), np.float64)
    weights = np.zeros(job.roi.shape.zyx(), np.float64)
    window = window_3d(job.blend, spec.model.output_patch)
    origins = job.grid.origins_in(job.roi)
    predict_into(job.predictor, image, origins, job.roi.start, acc, window, ChunkStats(), weights)
    return (acc / weights).astype(np.float32)


@dataclass
class RunReport:
    job_id: str
    chunks: int
    voxels: int
    patches_evaluated: int
    patches_in_grid: int
    wall_s: float
    redeliveries: int = 0
    per_pool: dict = field(default_factory=dict)  # pool -> tasks, voxels, seconds
    stage1: ChunkStats = field(default_factory=ChunkStats)
    stage2: ChunkStats = field(default_factory=ChunkStats)
    dead_letters: int = 0  # both stages' dead-letter queues, when the run had queues
    segmentation: dict = field(default_factory=dict)  # postprocess.segmentation's result
    pyramid_chunks: list = field(default_factory=list)  # chunks written per pyramid level
    reports: dict = field(default_factory=dict)  # report.md/.html/.png URLs
    neuroglancer: str = ""  # viewer link (hosted for gs:// and s3://; see report.py for file://)
    counted_from: str = "markers"  # where the sums come from: every done marker, or the workers' tallies

    @property
    def amplification(self) -> float:
        """Patches evaluated by this run / patches of a whole-volume single pass."""
        return self.patches_evaluated / self.patches_in_grid

    @classmethod
    def from_dict(cls, d: dict) -> "RunReport":
        """The inverse of :meth:`to_dict` (derived keys dropped)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for stage in ("stage1", "stage2"):
            fields[stage] = ChunkStats(**fields[stage])
        return cls(**fields)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["amplification"] = round(self.amplification, 4)
        d["voxels_per_s"] = self.voxels / self.wall_s if self.wall_s else None
        return d


def marker_record(job: Job, stage: int, stats: ChunkStats, extra: dict, *, started: float, pool: str,
                  receive_count: int, worker: str | None = None) -> dict:
    """What a chunk's done marker keeps: the task's timings and counts, who did it, and
    (stage 1) its partial sum pieces' sha256 and the engine that ran the network."""
    record = {**stats.to_dict(), **extra, "pool": pool, "receive_count": receive_count,
              "started_at": started, "finished_at": time.time()}
    if worker is not None:
        record["worker"] = worker
    if stage == 1:  # merges run no network
        record["engine"] = job.predictor.engine.name
    return record
