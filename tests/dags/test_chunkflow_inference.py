"""The inference DAG: imports cleanly and cheaply; runs end to end with dag.test()."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.dags.conftest import AIRFLOW_ENV, REPO

DAG_FILE = REPO / "dags" / "chunkflow_inference.py"


def test_dag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    dag = dagbag.get_dag("chunkflow_inference")
    assert dag is not None and "chunk_ops" in dag.tags
    task_types = {t.task_id: t.task_type for t in dag.tasks}
    assert task_types["gpu_pool_stage1"] == "KubernetesPodOperator"
    assert "gpu_pool_stage2" not in task_types  # merges never hold a GPU
    assert task_types["stage1_done"] == "StageDoneSensor"


def test_importing_the_dag_file_loads_no_torch_and_touches_no_volume():
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in ('torch', 'cloudvolume', 'onnxruntime') if m in sys.modules];"
        "print(','.join(heavy) or 'none')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(DAG_FILE)], capture_output=True, text=True,
                            env={**AIRFLOW_ENV, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "plugins")},
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "none"


def test_params_reject_bad_conf_naming_the_field(dagbag):
    from airflow.sdk.definitions.param import ParamsDict

    dag = dagbag.get_dag("chunkflow_inference")
    params = ParamsDict(dag.params)
    with pytest.raises(Exception, match=r"Invalid input for param chunk_size: \[256, 256\] is too short"):
        params.update({"chunk_size": [256, 256]})


def _run(dag, conf: dict):
    return dag.test(run_conf=conf)


def test_dag_test_end_to_end_with_the_embedded_queue(dagbag, make_spec):
    from chunk_ops.job import Job
    from chunk_ops.stages import reference_pass
    from chunk_ops.volumes import open_volume

    from chunk_ops.segment import adapted_rand_error, components

    dag = dagbag.get_dag("chunkflow_inference")
    spec = make_spec(out_channels=3)
    spec["workers"] = {"local": 2, "idle_exit_s": 1}
    # segmentation as chunk tasks on the post queue (label, stitch, relabel, write), pyramid blocks too
    spec["postprocess"] = {"segmentation": {"method": "components", "threshold": 0.5, "mode": "blockwise"}}
    run = _run(dag, spec)
    assert run.state == "success", run.state
    job = Job.open(spec)
    out = open_volume(spec["output"]["url"], 0).read(job.roi)
    assert np.abs(out - reference_pass(job)).max() <= 1e-5
    labels = open_volume(job.spec.segmentation["url"], 0).read(job.roi)[0]
    single = components(out, 0.5)
    assert adapted_rand_error(single, labels) == 0.0 and adapted_rand_error(labels, single) == 0.0
    assert all(job.done_mask(stage).all() for stage in (3, 4, 5))
    posts = {ti.task_id: ti.xcom_pull(task_ids=ti.task_id) for ti in run.get_task_instances()
             if ti.task_id.startswith("enqueue_post")}
    assert posts["enqueue_post1"] == len(job.plan) + len(job.stage_plan(6, 1))  # labels, first pyramid level
    assert posts["enqueue_post2"] == len(job.plan)  # relabelled writes
    report = json.loads((Path(spec["output"]["url"].removeprefix("file://")) / "jobs" / job.id / "report.json").read_text())
    assert report["amplification"] == 1.0 and report["patches_evaluated"] == len(job.grid)
    assert report["per_pool"]["local"]["tasks"] == 2 * len(job.plan)  # both stages, all by the local pool
    job_dir = Path(spec["output"]["url"].removeprefix("file://")) / "jobs" / job.id
    assert "open in Neuroglancer" in (job_dir / "report.md").read_text()
    assert (job_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mip1 = open_volume(spec["output"]["url"], 1)
    assert mip1.resolution[0] == 2 * open_volume(spec["output"]["url"], 0).resolution[0]
    np.testing.assert_allclose(mip1.read(mip1.bounds)[:, :, :2, :2].mean(), out[:, :, :4, :4].mean(), rtol=1e-5)

    again = _run(dag, spec)
    assert again.state == "success"
    sent = {ti.task_id: ti.xcom_pull(task_ids=ti.task_id) for ti in again.get_task_instances()
            if ti.task_id.startswith("enqueue_stage")}
    assert sent == {"enqueue_stage1": 0, "enqueue_stage2": 0}  # a rerun skips every chunk
    posts = {ti.task_id: ti.xcom_pull(task_ids=ti.task_id) for ti in again.get_task_instances()
             if ti.task_id.startswith("enqueue_post")}
    assert posts == {"enqueue_post1": 0, "enqueue_post2": 0}


def test_dag_test_segments_with_the_bundled_network_and_reports_quality(dagbag, tmp_path):
    from chunk_ops.models.demo import write_demo_job
    from chunk_ops.sample import write_sample
    from chunk_ops.volumes import open_volume

    image, truth = f"file://{tmp_path}/image", f"file://{tmp_path}/truth"
    write_sample(image, (192, 192, 24), seed=12, labels_url=truth)
    spec = write_demo_job(tmp_path, image, f"file://{tmp_path}/affinities", truth)
    spec["chunk_size"] = [128, 128, 24]
    spec["workers"] = {"local": 1, "idle_exit_s": 1}
    run = _run(dagbag.get_dag("chunkflow_inference"), spec)
    assert run.state == "success", run.state
    report = next(ti for ti in run.get_task_instances() if ti.task_id == "report").xcom_pull(task_ids="report")
    assert report["per_pool"]["local"]["engines"] == ["openvino-cpu-float32"]  # auto on a CPU worker
    seg = report["segmentation"]
    assert seg["method"] == "watershed" and seg["adapted_rand_error"] <= 0.10
    labels = open_volume(seg["url"], 0)
    assert labels.dtype == np.uint32 and labels.read(labels.bounds).max() == seg["segments"]
    job_dir = Path(str(tmp_path)) / "affinities" / "jobs"
    assert "segmentation adapted_rand_error" in next(job_dir.glob("*/report.md")).read_text()


def test_dag_test_end_to_end_with_sqs_through_an_airflow_connection(dagbag, make_spec, moto_sqs, monkeypatch):
    """Only the connection's endpoint_url extra points at the SQS server (moto)."""
    from chunk_ops.job import Job
    from chunk_ops.stages import reference_pass
    from chunk_ops.volumes import open_volume

    monkeypatch.delenv("AWS_ENDPOINT_URL_SQS")
    monkeypatch.setenv("AIRFLOW_CONN_CHUNKOPS_SQS", json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"region_name": "us-east-1", "endpoint_url": moto_sqs},
    }))
    spec = make_spec(chunk=(16, 16, 4))
    spec["queue"] = {"url": f"sqs://dag-{uuid.uuid4().hex[:10]}", "aws_conn_id": "chunkops_sqs"}
    spec["workers"] = {"local": 1, "idle_exit_s": 2}
    run = _run(dagbag.get_dag("chunkflow_inference"), spec)
    assert run.state == "success"
    job = Job.open(spec)
    assert np.abs(open_volume(spec["output"]["url"], 0).read(job.roi) - reference_pass(job)).max() <= 1e-5
