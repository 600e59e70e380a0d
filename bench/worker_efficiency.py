"""Worker efficiency: how much of a single-process run is the network itself.

Method, in one process and one run:

1. Write an EM-like uint8 sample volume and the demo RSUNet into a temp dir and
   open a job over the whole volume (production-like chunk size).
2. ``job.prepare()`` (model load + check, output layer) is one-time and is not
   timed.  One warm-up forward pass of a full batch follows.
3. Worker path, timed: ``run_stage1`` for every chunk, then ``run_stage2`` for
   every chunk, then ``remove_scratch``.  Total = the wall time of those calls.
4. Bare forward passes, timed: right after each chunk's stage 1 (side by side,
   so that load from other work on a shared machine hits both measurements
   alike) the same patches in the same batches (same order, same batch size)
   are cut from that chunk's input, read and normalized before any timer
   starts; only ``job.predictor.engine(batch)`` calls are timed.  Forward time
   = their sum.  These passes are outside the worker path's timers.
5. Peak memory of the worker path: the kernel's RSS high-water mark (VmHWM) is
   reset to the current RSS (``/proc/self/clear_refs`` = 5) as each worker-path
   block starts and read as it ends; "peak RSS increase" = the largest of those
   minus the RSS before the first block (the model and torch already loaded).

Efficiency = forward time / total time (goals: >= 0.90 at the demo chunking
256 x 256 x 24, >= 0.85 at 160 x 160 x 20).  The engine is the default one
(``inference.engine: auto``) on its default threads.

6. The whole job as users run it, ``pipeline.run_job``: in this process and with
   local pools of 1 and 2 worker processes, prepare to report, same volume.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._report import bar_chart, write_section  # noqa: E402
from chunk_ops.geometry import Box, Vec3
from chunk_ops.job import Job
from chunk_ops.models.demo import write_demo_job
from chunk_ops.sample import write_sample
from chunk_ops.stages import ChunkStats, normalize_input, run_stage1, run_stage2

DEFAULT_SHAPE = (512, 512, 120)
# chunk -> (storage block, efficiency goal): the demo's chunking, and a small one where
# fixed costs weigh more (its blocks about as large as the demo's)
CHUNKINGS = {(256, 256, 24): ((64, 64, 12), 0.90), (160, 160, 20): ((80, 80, 10), 0.85)}
POOL_WORKERS = (1, 2)


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Meter:
    """Wall time and peak RSS summed over the ``with`` blocks it wraps.

    The kernel's RSS high-water mark is reset on entry and read on exit, so work
    done between blocks (the bare forward passes) counts for neither.
    """

    def __init__(self) -> None:
        self.seconds, self.exact, self.rss0, self.peak_kb = 0.0, True, _status_kb("VmRSS"), 0

    def __enter__(self) -> None:
        self.exact &= _reset_peak_rss()
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.peak_kb = max(self.peak_kb, _status_kb("VmHWM"))

    @property
    def peak_increase(self) -> int:
        """Bytes: peak RSS inside the blocks minus RSS when the meter was made."""
        return (self.peak_kb - self.rss0) * 1024


def forward_only(job: Job, chunk: Box) -> float:
    """Seconds spent in engine calls on ``chunk``'s patches, input pre-read."""
    part = job.partial_box(chunk)
    if part is None:
        return 0.0
    pred = job.predictor
    image = normalize_input(job.input.read(part.grow(job.spec.model.margin)))
    ox, oy, oz = job.grid.origins_in(chunk)
    rel = [Vec3(int(x), int(y), int(z)) - part.start for z, y, x in itertools.product(oz, oy, ox)]
    pin, spent = pred.input_patch, 0.0
    for first in range(0, len(rel), pred.batch_size):
        batch = np.stack([image[:, r.z:r.z + pin.z, r.y:r.y + pin.y, r.x:r.x + pin.x]
                          for r in rel[first:first + pred.batch_size]])
        t0 = time.perf_counter()
        pred.engine(batch)
        spent += time.perf_counter() - t0
    return spent


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return (f"{len(os.sched_getaffinity(0))} cores (nproc), {cpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def run(shape: tuple[int, int, int], chunk: tuple[int, int, int], block: tuple[int, int, int]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="chunk_ops_bench_"))
    try:
        write_sample(f"file://{tmp}/image", shape, seed=1)
        spec = write_demo_job(tmp, f"file://{tmp}/image", f"file://{tmp}/output")
        spec["chunk_size"], spec["output"]["block_size"] = list(chunk), list(block)
        job = Job.open(spec)
        job.prepare()
        pred, model = job.predictor, job.spec.model
        pred.engine(np.zeros((pred.batch_size, model.in_channels, *pred.input_patch.zyx()), np.float32))
        chunks = list(job.plan)
        parts = [p for p in map(job.partial_box, chunks) if p is not None]
        in_bytes = max(p.grow(model.margin).size for p in parts) * model.in_channels * job.input.dtype.itemsize
        out_bytes = max(c.size for c in chunks) * model.out_channels * 4

        meter, s1, s2, forward = Meter(), ChunkStats(), ChunkStats(), 0.0
        for c in chunks:  # side by side, so drift on a shared machine hits both alike
            with meter:  # the worker's path: stage 1, then its marker (the partial's checksum)
                stats, extra = run_stage1(job, c)
                job.mark_done(1, c, {**stats.to_dict(), **extra, "finished_at": time.time()})
                s1.add(stats)
            forward += forward_only(job, c)
        with meter:
            for c in chunks:
                s2.add(run_stage2(job, c)[0])
            job.remove_scratch()
        return dict(shape=shape, chunk=chunk, chunks=len(chunks), patches=s1.patches, voxels=job.roi.size,
                    engine=pred.engine.name,
                    batch=pred.batch_size, total=meter.seconds, forward=forward, s1=s1, s2=s2,
                    in_bytes=in_bytes, out_bytes=out_bytes, out_channels=model.out_channels,
                    patch_in=s1.patches * pred.input_patch.prod(),
                    peak=meter.peak_increase, exact_peak=meter.exact)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pool_runs(shape: tuple[int, int, int], chunk: tuple[int, int, int]) -> list[dict]:
    """The whole job (``pipeline.run_job``) in this process and with local pools of 1 and 2
    worker processes (embedded queue), wall time from prepare to report, same volume."""
    from chunk_ops.pipeline import run_job

    tmp = Path(tempfile.mkdtemp(prefix="chunk_ops_bench_"))
    try:
        write_sample(f"file://{tmp}/image", shape, seed=1)
        rows = []
        for workers in (0, *POOL_WORKERS):
            spec = write_demo_job(tmp, f"file://{tmp}/image", f"file://{tmp}/out{workers}")
            spec["chunk_size"] = list(chunk)
            spec["postprocess"] = {"segmentation": {"method": "none"}, "pyramid_levels": 0}
            job = Job.open(spec)
            t0 = time.perf_counter()
            report = run_job(job, workers=workers, queue_url=f"file://{tmp}/queue{workers}.sqlite")
            seconds = time.perf_counter() - t0
            rows.append({"workers": workers, "seconds": seconds, "mvox_s": job.roi.size / seconds / 1e6,
                         "amplification": report.amplification})
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rows(r: dict) -> list[tuple[str, str]]:
    s1, s2, total = r["s1"], r["s2"], r["total"]
    phases = [("stage 1 read (+normalize)", s1.read_s), ("stage 1 infer", s1.infer_s),
              ("stage 1 blend (window x prediction)", s1.blend_s), ("stage 1 write (scratch pieces)", s1.write_s),
              ("stage 2 read (own scratch pieces)", s2.read_s), ("stage 2 blend (normalize, cast)", s2.blend_s),
              ("stage 2 write (output layer)", s2.write_s)]
    other = total - sum(t for _, t in phases)
    mib = 1 / 2**20
    ref = r["in_bytes"] + r["out_bytes"]
    eff = r["forward"] / total
    return [
        ("chunks (count)", f"{' x '.join(map(str, r['chunk']))} ({r['chunks']})"),
        ("**efficiency = forward / total**", f"**{eff:.3f}** (goal >= {r['goal']:.2f}: {'met' if eff >= r['goal'] else 'NOT met'})"),
        ("worker path total (stage 1 + stage 2 + scratch removal)", f"{total:.1f} s"),
        ("bare forward passes (same patches, same batches)", f"{r['forward']:.1f} s"),
        *((f"{name}", f"{t:.1f} s ({t / total:.1%})") for name, t in phases),
        ("other (markers, allocation, scratch removal)", f"{other:.1f} s ({other / total:.1%})"),
        ("throughput, worker path (output voxels)", f"{r['voxels'] / total / 1e6:.3f} Mvoxel/s"),
        ("throughput, bare forward (output voxels; patch input voxels)",
         f"{r['voxels'] / r['forward'] / 1e6:.3f}; {r['patch_in'] / r['forward'] / 1e6:.2f} Mvoxel/s"),
        ("peak RSS increase of the worker path", f"{r['peak'] * mib:.0f} MiB"
         + ("" if r["exact_peak"] else " (VmHWM since start: an upper bound)")),
        (f"input chunk + margin (uint8) + output chunk (float32 x {r['out_channels']})",
         f"{r['in_bytes'] * mib:.1f} + {r['out_bytes'] * mib:.1f} = {ref * mib:.1f} MiB"),
        ("peak RSS increase / (input + output chunk bytes)", f"{r['peak'] / ref:.1f}x"),
    ]


def markdown(results: list[dict], pool: list[dict], command: str, engine: str) -> str:
    tables = [_rows(r) for r in results]
    x, y, z = results[0]["shape"]
    r0 = results[0]
    lines = [
        "## Worker efficiency", "",
        "```", command, "```", "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Volume {x} x {y} x {z} = {r0['voxels'] / 1e6:.1f} Mvoxel (uint8), demo RSUNet, engine {engine} "
        f"(the default), {r0['patches']} patches, batch size {r0['batch']}",
        "- Method: see the docstring of `bench/worker_efficiency.py`; `job.prepare()` is not timed; "
        "each chunk's bare forward passes are timed right after its stage 1, outside the worker-path timers.", "",
        "| measure | " + " | ".join(f"chunks {' x '.join(map(str, r['chunk']))}" for r in results) + " |",
        "| --- |" + " --- |" * len(results),
    ]
    for i, (name, _) in enumerate(tables[0]):
        lines.append(f"| {name} | " + " | ".join(t[i][1] for t in tables) + " |")
    lines += ["", "![efficiency](img/worker_efficiency.png)", "",
              f"The whole job through `pipeline.run_job` (prepare to report; chunks "
              f"{' x '.join(map(str, results[0]['chunk']))}; pools: worker processes on the embedded queue, "
              "each with cores / workers threads, started per stage):", "",
              "| run | seconds | Mvoxel/s | vs in process | amplification |", "| --- | --- | --- | --- | --- |"]
    base = pool[0]["seconds"]
    for row in pool:
        what = "in process (`chunk-ops run`)" if row["workers"] == 0 else f"local pool, {row['workers']} worker(s)"
        lines.append(f"| {what} | {row['seconds']:.1f} | {row['mvox_s']:.3f} | {base / row['seconds']:.2f}x | "
                     f"{row['amplification']:.2f} |")
    lines += ["", "![workers](img/worker_pools.png)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=3, type=int, default=DEFAULT_SHAPE, metavar=("X", "Y", "Z"))
    ap.add_argument("--write", action="store_true", help="replace this section in docs/benchmarks.md")
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    command = ".venv/bin/python bench/worker_efficiency.py"
    if shape != DEFAULT_SHAPE:
        command += " --shape " + " ".join(map(str, shape))
    command += " --write" if args.write else ""
    results = []
    for chunk, (block, goal) in CHUNKINGS.items():
        results.append({**run(shape, chunk, block), "goal": goal})
    pool = pool_runs(shape, next(iter(CHUNKINGS)))
    engine = results[0]["engine"]
    section = markdown(results, pool, command, engine)
    sys.stdout.write(section)
    img = REPO / "docs" / "img"
    bar_chart([(f"chunks {' x '.join(map(str, r['chunk']))}: forward / worker path", r["forward"] / r["total"])
               for r in results], img / "worker_efficiency.png",
              f"Worker efficiency, forward time / worker-path time ({engine}; 1.0 = the forward limit)")
    bar_chart([("in process" if p["workers"] == 0 else f"{p['workers']} local worker(s)", p["mvox_s"]) for p in pool],
              img / "worker_pools.png", "Whole job, Mvoxel/s of output (prepare to report)")
    if args.write:
        write_section("worker_efficiency", section)


if __name__ == "__main__":
    main()
