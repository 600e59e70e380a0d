"""bfloat16 against float32 where it matters: the segmentation of a held-out volume.

Method: the bundled, trained RSUNet over a synthetic volume with a seed it was not
trained on (7), a whole job run in this process (stage 1, stage 2, watershed) with
each CPU engine at float32 and, where this CPU has bf16 units, at bfloat16, in turn,
``--rounds`` times (round-robin, so drift on a shared machine hits every engine alike).
Per engine and precision: the adapted Rand error of the watershed segmentation against
the ground truth and its segment count; the largest and mean absolute difference of the
affinities from PyTorch float32; the share of affinities at or above the watershed's
seed threshold (0.9999); and two time ratios to PyTorch float32 (higher is faster), of
medians over the rounds: stage-1 inference seconds, and the job's wall time (model
loading not timed: a worker does it once).
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._report import write_section  # noqa: E402
from bench.engines import machine  # noqa: E402
from chunk_ops.engines import cpu_has_bf16  # noqa: E402
from chunk_ops.job import Job  # noqa: E402
from chunk_ops.models.demo import write_demo_job  # noqa: E402
from chunk_ops.pipeline import run_job  # noqa: E402
from chunk_ops.sample import write_sample  # noqa: E402
from chunk_ops.train import TRAIN_SEEDS  # noqa: E402
from chunk_ops.volumes import open_volume  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "precision.md"
HELD_OUT_SEED = 7
SEED_THRESHOLD = 0.9999  # chunk_ops.segment.watershed's aff_threshold_high
REFERENCE = ("pytorch", "float32")
# PyTorch bf16 without bf16 units is emulated and refused; OpenVINO runs float32 there (and says so)
CASES = [REFERENCE, ("openvino", "float32"),
         *([("pytorch", "bfloat16"), ("openvino", "bfloat16")] if cpu_has_bf16() else [])]


def run_case(folder: Path, image_url: str, truth_url: str, engine: str, precision: str) -> dict:
    out = folder / f"{engine}-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    spec = write_demo_job(folder, image_url, f"file://{out}/affinities", truth_url)
    spec["inference"].update(engine=engine, precision=precision, device="cpu")
    spec["postprocess"]["pyramid_levels"] = 0
    job = Job.open(spec)
    job.prepare()  # model load and conversion: once per worker, not per chunk
    t0 = time.perf_counter()
    report = run_job(job)
    wall = time.perf_counter() - t0
    return {"name": job.predictor.engine.name, "wall_s": wall, "infer_s": report.stage1.infer_s,
            "are": report.segmentation["adapted_rand_error"], "segments": report.segmentation["segments"],
            "affinities": open_volume(spec["output"]["url"], 0).read(job.roi)}


def measure(shape: tuple[int, int, int], rounds: int) -> list[dict]:
    assert HELD_OUT_SEED not in TRAIN_SEEDS
    folder = Path(tempfile.mkdtemp(prefix="chunk_ops_precision_"))
    try:
        image_url, truth_url = f"file://{folder}/image", f"file://{folder}/truth"
        write_sample(image_url, shape, seed=HELD_OUT_SEED, labels_url=truth_url)
        runs: dict = {case: [] for case in CASES}
        for _ in range(rounds):
            for case in CASES:
                runs[case].append(run_case(folder, image_url, truth_url, *case))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    reference = runs[REFERENCE]
    base_wall = statistics.median(r["wall_s"] for r in reference)
    base_infer = statistics.median(r["infer_s"] for r in reference)
    rows = []
    for case in CASES:
        first = runs[case][0]
        diff = np.abs(first["affinities"] - reference[0]["affinities"])
        rows.append({"name": first["name"], "asked": f"{case[0]} {case[1]}",
                     "infer_ratio": base_infer / statistics.median(r["infer_s"] for r in runs[case]),
                     "wall_ratio": base_wall / statistics.median(r["wall_s"] for r in runs[case]),
                     "max_diff": float(diff.max()), "mean_diff": float(diff.mean()),
                     "seed_share": float((first["affinities"] >= SEED_THRESHOLD).mean()),
                     "are": sorted({r["are"] for r in runs[case]}), "segments": first["segments"]})
    return rows


def markdown(rows: list[dict], shape, rounds: int, command: str) -> str:
    lines = [
        f"### Held-out volume {shape[0]} x {shape[1]} x {shape[2]} (seed {HELD_OUT_SEED})", "",
        "```", command, "```", "",
        f"- Machine: {machine()}",
        f"- Date: {datetime.date.today().isoformat()}; {rounds} rounds, time ratios of medians; "
        "method in the docstring of `bench/precision.py`.", "",
        "| engine (as it reports itself) | asked for | inference speed vs PyTorch fp32 | job wall time speed "
        "vs PyTorch fp32 | max abs diff vs PyTorch fp32 | mean abs diff | affinities >= 0.9999 | adapted Rand error | "
        "segments |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {r['name']} | {r['asked']} | **{r['infer_ratio']:.2f}x** | {r['wall_ratio']:.2f}x | "
          f"{r['max_diff']:.1e} | {r['mean_diff']:.1e} | {r['seed_share']:.3f} | "
          f"**{' / '.join(f'{a:.4f}' for a in r['are'])}** | {r['segments']} |" for r in rows),
    ]
    if not cpu_has_bf16():
        lines += ["", "This CPU has no bf16 units: bfloat16 cannot be measured here (OpenVINO would run float32, "
                      "PyTorch would emulate it)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=3, type=int, default=(256, 256, 32), metavar=("X", "Y", "Z"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="replace this shape's section in docs/precision.md")
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    command = ".venv/bin/python bench/precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(measure(shape, args.rounds), shape, args.rounds, command.strip())
    print(text)
    if args.write:
        write_section(f"precision-{shape[0]}x{shape[1]}x{shape[2]}", text, DOC)


if __name__ == "__main__":
    main()
