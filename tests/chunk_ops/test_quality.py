"""Segmentation quality of the bundled network through the whole pipeline, on a held-out volume.

The volume's seed is not one the network was trained on (chunk_ops.train.TRAIN_SEEDS).
Chunked, blended inference on the default CPU engine, then watershed + agglomeration,
scored against the ground truth with the adapted Rand error; the trivial baseline
(thresholded raw intensity, its best threshold) is measured beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from chunk_ops.job import Job
from chunk_ops.models.demo import write_demo_job
from chunk_ops.sample import synthetic_em, write_sample
from chunk_ops.segment import adapted_rand_error, components, intensity_baseline
from chunk_ops.spec import DEFAULT_THRESHOLDS
from chunk_ops.pipeline import run_job
from chunk_ops.train import TRAIN_SEEDS
from chunk_ops.volumes import open_volume, volume_exists

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
HELD_OUT_SEED = 7
SHAPE = (256, 256, 32)


def test_held_out_adapted_rand_error_is_at_most_0_10_and_beats_the_baseline(tmp_path):
    assert HELD_OUT_SEED not in TRAIN_SEEDS
    image_url, truth_url = f"file://{tmp_path}/image", f"file://{tmp_path}/truth"
    write_sample(image_url, SHAPE, seed=HELD_OUT_SEED, labels_url=truth_url)
    spec = write_demo_job(tmp_path, image_url, f"file://{tmp_path}/affinities", truth_url)
    spec["chunk_size"] = [128, 128, 24]  # 8 chunks: seams inside the region
    job = Job.open(spec)
    report = run_job(job)
    seg = report.segmentation
    assert report.amplification == 1.0
    assert seg["method"] == "watershed" and volume_exists(seg["url"])

    # the stored segmentation is what was scored
    image, truth = synthetic_em(SHAPE, seed=HELD_OUT_SEED)
    stored = open_volume(seg["url"], 0).read(job.roi)[0]
    assert round(adapted_rand_error(truth, stored), 4) == seg["adapted_rand_error"]

    affinities = open_volume(spec["output"]["url"], 0).read(job.roi)
    components_error = adapted_rand_error(truth, components(affinities, DEFAULT_THRESHOLDS["components"]))
    baseline = {t: adapted_rand_error(truth, intensity_baseline(image, t)) for t in range(60, 200, 10)}
    best_threshold = min(baseline, key=baseline.get)
    result = {"held_out_seed": HELD_OUT_SEED, "shape_xyz": SHAPE, "engine": job.predictor.engine.name,
              "watershed_adapted_rand_error": seg["adapted_rand_error"], "segments": seg["segments"],
              "components_adapted_rand_error": round(components_error, 4),
              "baseline_adapted_rand_error": round(baseline[best_threshold], 4),
              "baseline_threshold": best_threshold}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    assert seg["adapted_rand_error"] <= 0.10, result
    assert seg["adapted_rand_error"] < baseline[best_threshold] / 2, result
