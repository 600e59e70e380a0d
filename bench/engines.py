"""Inference engines on this machine's CPU, against PyTorch eager float32, in one run.

Method:

1. Forward throughput.  The bundled, trained RSUNet, the demo patch (input
   128 x 128 x 16, batch 2) on synthetic EM patches.  Each engine is loaded
   through the job spec (``inference.engine`` / ``precision``) exactly as a worker
   loads it, warmed up with two calls, then timed round-robin: every round times
   ``--calls`` forward calls of each engine in turn, so drift on a shared machine
   hits all engines alike.  Throughput = input voxels / median round time;
   ratio = engine throughput / PyTorch eager float32 throughput.  The largest
   absolute difference from PyTorch float32 on the same batch is shown beside it.
2. End to end.  A whole job (stage 1 + stage 2 over every chunk, run in this
   process) on a synthetic volume, once with the default CPU engine (``auto``)
   and once with PyTorch, alternating ``--e2e-rounds`` times; output voxels per
   second of the job's wall time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import write_section  # noqa: E402
from chunk_ops.engines import cpu_has_bf16  # noqa: E402
from chunk_ops.job import Job  # noqa: E402
from chunk_ops.models.demo import bundled_model_spec, bundled_weights, write_demo_job  # noqa: E402
from chunk_ops.models.loading import load_predictor  # noqa: E402
from chunk_ops.sample import synthetic_em, write_sample  # noqa: E402
from chunk_ops.spec import parse_spec  # noqa: E402
from chunk_ops.pipeline import run_job  # noqa: E402

# PyTorch bf16 on a CPU without bf16 units is emulated (145x slower here) and refused by the engine
ENGINES = [("pytorch", "float32"), *([("pytorch", "bfloat16")] if cpu_has_bf16() else []),
           ("onnxruntime", "float32"), ("openvino", "float32"), ("openvino", "bfloat16")]


def _spec(engine: str, precision: str, batch: int):
    return parse_spec({
        "input": {"url": "file:///unused"}, "output": {"url": "file:///unused-out", "block_size": [64, 64, 8]},
        "model": bundled_model_spec(bundled_weights()),
        "inference": {"engine": engine, "precision": precision, "batch_size": batch, "device": "cpu"},
    })


def forward_throughput(rounds: int, calls: int, batch: int) -> list[dict]:
    image, _ = synthetic_em((128, 128, 16 * batch), seed=21)
    x = (image.reshape(batch, 1, 16, 128, 128) / 255).astype(np.float32)
    predictors = {key: load_predictor(_spec(*key, batch)) for key in ENGINES}
    outputs = {}
    for key, p in predictors.items():
        p.engine(x)
        outputs[key] = p.engine(x)
    times: dict = {key: [] for key in ENGINES}
    for _ in range(rounds):
        for key, p in predictors.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                p.engine(x)
            times[key].append(time.perf_counter() - t0)
    voxels = x.size * calls
    reference = outputs[("pytorch", "float32")]
    base = voxels / statistics.median(times[("pytorch", "float32")])
    rows = []
    for key in ENGINES:
        rate = voxels / statistics.median(times[key])
        rows.append({"engine": predictors[key].engine.name, "asked": f"{key[0]} {key[1]}",
                     "mvox_s": rate / 1e6, "ratio": rate / base,
                     "max_diff": float(np.abs(outputs[key] - reference).max())})
    return rows


def end_to_end(shape, rounds: int) -> dict:
    rates: dict = {"auto": [], "pytorch": []}
    names = {}
    for r in range(rounds):
        for engine in ("auto", "pytorch"):
            tmp = Path(tempfile.mkdtemp(prefix="chunk_ops_bench_"))
            try:
                write_sample(f"file://{tmp}/image", shape, seed=1)
                spec = write_demo_job(tmp, f"file://{tmp}/image", f"file://{tmp}/out")
                spec["postprocess"] = {"segmentation": {"method": "none"}, "pyramid_levels": 0}
                spec["inference"]["engine"] = engine
                job = Job.open(spec)
                job.prepare()  # model load and conversion: once per worker, not per chunk
                names[engine] = job.predictor.engine.name
                t0 = time.perf_counter()
                run_job(job)
                rates[engine].append(job.roi.size / (time.perf_counter() - t0))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    auto, torch_rate = statistics.median(rates["auto"]), statistics.median(rates["pytorch"])
    return {"auto_name": names["auto"], "torch_name": names["pytorch"], "auto": auto, "pytorch": torch_rate,
            "ratio": auto / torch_rate}


def machine() -> str:
    import openvino as ov
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return (f"{len(os.sched_getaffinity(0))} cores, {cpu}; OpenVINO CPU capabilities {', '.join(caps)}; "
            f"torch {torch.__version__}, openvino {ov.__version__.split('-')[0]}, Python {platform.python_version()}")


def markdown(rows: list[dict], e2e: dict, shape, command: str, batch: int) -> str:
    lines = [
        "## Inference engines (CPU)", "", "```", command, "```", "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Network: the bundled trained RSUNet (affinities), input patch 128 x 128 x 16, batch {batch}; "
        "method in the docstring of `bench/engines.py`.", "",
        "| engine (as it reports itself) | asked for | Mvoxel/s (input) | vs PyTorch eager fp32 | max abs diff vs PyTorch fp32 |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {r['engine']} | {r['asked']} | {r['mvox_s']:.2f} | **{r['ratio']:.2f}x** | {r['max_diff']:.1e} |"
          for r in rows),
        "",
        f"End to end, a whole job on a {shape[0]} x {shape[1]} x {shape[2]} synthetic volume (stage 1 + stage 2, "
        "one process, output voxels per second):", "",
        "| engine | Mvoxel/s | ratio |", "| --- | --- | --- |",
        f"| default CPU engine: {e2e['auto_name']} | {e2e['auto'] / 1e6:.3f} | **{e2e['ratio']:.2f}x** |",
        f"| {e2e['torch_name']} | {e2e['pytorch'] / 1e6:.3f} | 1.00x |",
    ]
    if not cpu_has_bf16():
        lines += ["", "This CPU has no bf16 units (no `avx512_bf16`/`amx_bf16` flag): OpenVINO runs float32 when "
                  "bfloat16 is asked (its engine name says so), so the bf16 goal (4x) cannot be measured here; "
                  "PyTorch bf16 autocast is emulated (one batch took 61 s against 0.42 s at float32) and the "
                  "engine refuses it."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--e2e-shape", nargs=3, type=int, default=(256, 256, 48), metavar=("X", "Y", "Z"))
    ap.add_argument("--e2e-rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="replace this section in docs/benchmarks.md")
    args = ap.parse_args(argv)
    rows = forward_throughput(args.rounds, args.calls, args.batch)
    e2e = end_to_end(tuple(args.e2e_shape), args.e2e_rounds)
    command = ".venv/bin/python bench/engines.py " + " ".join(sys.argv[1:])
    text = markdown(rows, e2e, args.e2e_shape, command.strip(), args.batch)
    print(text)
    if args.write:
        write_section("engines", text)


if __name__ == "__main__":
    main()
