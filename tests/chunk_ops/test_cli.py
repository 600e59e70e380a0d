"""The chunk-ops command line, run as users run it: the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from chunk_ops.volumes import open_volume

CHUNK_OPS = str(Path(sys.executable).with_name("chunk-ops"))


def _chunk_ops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHUNK_OPS, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def test_validate_then_run(make_spec, tmp_path):
    spec = make_spec()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    out_dir = Path(spec["output"]["url"].removeprefix("file://"))

    checked = _chunk_ops("validate", str(job_file), "--json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    summary = json.loads(checked.stdout)
    assert summary["valid"] is True and summary["chunks"] == 3 * 3 * 3
    assert summary["engine_here"] == "torch-cpu-float32"  # the spec asks for engine pytorch
    assert not out_dir.exists(), "validate must not write"

    ran = _chunk_ops("run", str(job_file), "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["job_id"] == summary["job_id"] and report["amplification"] == 1.0
    stored = json.loads((out_dir / "jobs" / report["job_id"] / "report.json").read_text())
    assert stored["patches_evaluated"] == report["patches_evaluated"] > 0
    out = open_volume(spec["output"]["url"], 0).read(open_volume(spec["output"]["url"], 0).bounds)
    assert out.shape == (1, 12, 36, 40) and 0 < out.min() and out.max() < 1  # sigmoid outputs everywhere


def test_bad_job_exits_non_zero_with_the_reason(make_spec, tmp_path):
    spec = make_spec()
    spec["chunk_size"] = [12, 16, 4]
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    result = _chunk_ops("run", str(job_file), cwd=tmp_path)
    assert result.returncode == 1
    assert "chunk_size [12, 16, 4] is not a multiple of output.block_size [8, 8, 2]" in result.stderr

    job_file.write_text("{not json")
    result = _chunk_ops("validate", str(job_file), cwd=tmp_path)
    assert result.returncode == 2 and "job spec is not valid JSON" in result.stderr


def test_sample_writes_a_layer(tmp_path):
    result = _chunk_ops("sample", f"file://{tmp_path}/em", "--shape", "64", "48", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    vol = open_volume(f"file://{tmp_path}/em", 0)
    image = vol.read(vol.bounds)
    assert image.shape == (1, 8, 48, 64) and image.dtype == np.uint8
    assert image.std() > 10  # membranes and texture, not a flat image


def test_submit_workers_and_status_over_sqs(make_spec, tmp_path, moto_sqs):
    """The commands a lab without Airflow runs by hand, against a real SQS server (moto)."""
    from chunk_ops.job import Job
    from chunk_ops.stages import reference_pass

    spec = make_spec()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    queue = f"sqs://cli-{tmp_path.name[-12:]}"

    for stage in ("1", "2"):
        submitted = _chunk_ops("submit", str(job_file), "--queue", queue, "--stage", stage, "--json", cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        assert json.loads(submitted.stdout)["sent"] == 27
        worked = _chunk_ops("worker", "--queue", queue, "--idle-exit", "2", cwd=tmp_path)
        assert worked.returncode == 0, worked.stderr
        assert worked.stderr.count('"event": "done"') == 27
        events = [json.loads(line) for line in worked.stderr.splitlines() if line.startswith("{")]
        assert all(e["time"].endswith("Z") and e["time"][:4].isdigit() for e in events)  # timestamped, UTC

    status = _chunk_ops("status", str(job_file), "--queue", queue, "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["stages"]["1"]["done"] == report["stages"]["2"]["done"] == 27
    assert report["queues"] == {str(s): {"visible": 0, "in_flight": 0, "dead": 0, "pending": 0} for s in range(1, 7)}
    assert report["stages"]["1"]["voxels_per_s"] > 0 and report["stages"]["1"]["eta_s"] == 0

    finished = _chunk_ops("finish", str(job_file), "--queue", queue, "--json", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["amplification"] == 1.0
    job_dir = Path(spec["output"]["url"].removeprefix("file://")) / "jobs" / report["job_id"]
    assert (job_dir / "report.json").exists() and not any((job_dir / "scratch").rglob("*.npy"))

    again = _chunk_ops("submit", str(job_file), "--queue", queue, "--json", cwd=tmp_path)
    assert json.loads(again.stdout)["sent"] == 0  # a rerun of a finished job sends nothing

    job = Job.open(spec)
    assert np.abs(open_volume(spec["output"]["url"], 0).read(job.roi) - reference_pass(job)).max() <= 1e-5


def test_sample_with_labels_then_evaluate(tmp_path):
    made = _chunk_ops("sample", f"file://{tmp_path}/em", "--shape", "64", "64", "8", "--labels",
                      f"file://{tmp_path}/truth", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    same = _chunk_ops("evaluate", f"file://{tmp_path}/truth", f"file://{tmp_path}/truth", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout) == {"adapted_rand_error": 0.0, "voxels": 64 * 64 * 8}
    _chunk_ops("sample", f"file://{tmp_path}/other", "--shape", "64", "64", "4", cwd=tmp_path)
    bad = _chunk_ops("evaluate", f"file://{tmp_path}/other", f"file://{tmp_path}/truth", cwd=tmp_path)
    assert bad.returncode == 1 and "differ from" in bad.stderr


def test_export_onnx_writes_a_model_that_runs_the_same_job(tmp_path):
    import onnx

    from chunk_ops.models.demo import write_demo_job

    spec = write_demo_job(tmp_path, "file:///unused", "file:///unused-out")
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    made = _chunk_ops("export-onnx", str(job_file), str(tmp_path / "net.onnx"), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 16, 128, 128] and isinstance(dims[0], str)  # patch fixed, batch free
    spec["model"] = {**spec["model"], "path": str(tmp_path / "net.onnx"), "format": "onnx"}
    job_file.write_text(json.dumps(spec))
    again = _chunk_ops("export-onnx", str(job_file), str(tmp_path / "again.onnx"), cwd=tmp_path)
    assert again.returncode == 1 and "is ONNX already" in again.stderr


def test_a_standing_worker_makes_its_queue_only_when_asked(tmp_path):
    url = f"file://{tmp_path}/standing.sqlite"
    refused = _chunk_ops("worker", "--queue", url, "--idle-exit", "0.5", cwd=tmp_path)
    assert refused.returncode != 0 and url in refused.stderr and not (tmp_path / "standing.sqlite").exists()
    made = _chunk_ops("worker", "--queue", url, "--idle-exit", "0.5", "--create-queue", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "standing.sqlite").exists()
