"""One pipeline behind every entry point: `chunk-ops run` in one process, `chunk-ops run
--workers 2` (a local pool on a queue) and the Airflow DAG write the same files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dags.conftest import REPO

CHUNK_OPS = str(Path(sys.executable).with_name("chunk-ops"))
ENTRY_POINTS = ("in_process", "pool", "dag")


def _chunk_ops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHUNK_OPS, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _layer_files(folder: Path) -> dict[str, bytes]:
    """Every file of the output layer, its pyramid and its segmentation: not the job folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "jobs" not in p.relative_to(folder).parts}


@pytest.fixture
def three_jobs(make_spec, tmp_path):
    specs = {}
    for name in ENTRY_POINTS:
        spec = make_spec(output=name, out_channels=3, chunk=(16, 16, 4))
        spec["postprocess"] = {"pyramid_levels": 2, "segmentation": {"method": "watershed", "threshold": 0.5}}
        spec["workers"] = {"local": 2, "idle_exit_s": 1}
        specs[name] = spec
    return specs


def test_run_the_local_pool_and_the_dag_write_the_same_files(three_jobs, dagbag, tmp_path):
    reports = {}
    for name, args in (("in_process", ()), ("pool", ("--workers", "2"))):
        job_file = tmp_path / f"{name}.json"
        job_file.write_text(json.dumps(three_jobs[name]))
        ran = _chunk_ops("run", str(job_file), "--json", *args, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr[-3000:]
        reports[name] = json.loads(ran.stdout)  # stdout holds the result only: waterz's chatter went to stderr
    dag_run = dagbag.get_dag("chunkflow_inference").test(run_conf=three_jobs["dag"])
    assert dag_run.state == "success"
    reports["dag"] = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "report").xcom_pull(
        task_ids="report")

    layers = {name: _layer_files(tmp_path / name) for name in ENTRY_POINTS}
    names = set(layers["in_process"])
    assert {"info", "segmentation/info"} <= names and any(n.startswith("segmentation/") and n != "segmentation/info"
                                                           for n in names)
    scales = json.loads(layers["in_process"]["info"])["scales"]
    assert len(scales) == 3  # mip 0 and the two pyramid levels
    for name in ("pool", "dag"):
        assert set(layers[name]) == names, f"{name} wrote other files"
        different = [n for n in names if layers[name][n] != layers["in_process"][n]]
        assert not different, f"{name} differs from the in-process run in {different[:5]}"

    for name in ENTRY_POINTS:
        report = reports[name]
        assert report["amplification"] == 1.0 and report["chunks"] == 27 and report["dead_letters"] == 0
        assert report["segmentation"]["segments"] == reports["in_process"]["segmentation"]["segments"] > 0
        assert report["pyramid_chunks"] == reports["in_process"]["pyramid_chunks"]
        job_dir = tmp_path / name / "jobs" / report["job_id"]
        stored = json.loads((job_dir / "report.json").read_text())
        assert set(stored) == set(reports["in_process"])  # the same report, whoever ran it
        assert "report.html" in report["reports"] and (job_dir / "report.md").exists()
        pictures = {n: (tmp_path / n / "jobs" / reports[n]["job_id"] / "report.png").read_bytes()
                    for n in ENTRY_POINTS}
        assert pictures[name] == pictures["in_process"]


def test_an_in_process_rerun_skips_every_done_chunk(make_spec, tmp_path):
    spec = make_spec()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    first = _chunk_ops("run", str(job_file), "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    job_dir = tmp_path / "out" / "jobs" / json.loads(first.stdout)["job_id"]
    markers = {p: p.stat().st_mtime_ns for p in job_dir.glob("done/stage*/*.json")}
    assert len(markers) == 2 * 27

    again = _chunk_ops("run", str(job_file), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in job_dir.glob("done/stage*/*.json")} == markers  # nothing redone
    assert "stage 1 (network): 27/27 tasks (100%)" in again.stderr  # progress says so, on stderr
    assert again.stdout.startswith(f"job {job_dir.name}: 27 chunks done")  # stdout: the result only
