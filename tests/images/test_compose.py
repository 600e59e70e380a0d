"""The docker-compose stack, end to end: PostgreSQL, moto's SQS server, Airflow's
api-server, scheduler, dag-processor and triggerer, and two standing workers. A job is
triggered through the compose api-server's REST API and runs on the worker containers
over the compose SQS server; the output equals the whole-volume reference; `down`
leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from chunk_ops.job import Job
from chunk_ops.models.demo import write_demo_job
from chunk_ops.sample import write_sample
from chunk_ops.stages import reference_pass
from chunk_ops.volumes import open_volume
from scripts.airflow_local import AirflowApi
from tests.conftest import free_port
from tests.dags.conftest import REPO
from tests.images.conftest import share_with_containers

pytestmark = pytest.mark.slow


def _compose_binary() -> str:
    found = shutil.which("docker-compose") or "/usr/bin/docker-compose"
    assert Path(found).exists(), "docker-compose is missing: install Debian's docker-compose (make test does)"
    return found


def test_a_job_triggered_over_rest_runs_on_the_compose_workers(docker, images, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    env_file = tmp_path / "compose.env"
    env_file.write_text((REPO / "compose.env.example").read_text() + "\n".join([
        f"CHUNK_OPS_DATA={data}", f"AIRFLOW_PORT={port}", "CHUNK_OPS_TAG=test",
        f"POSTGRES_IMAGE={images.postgres}", "AIRFLOW_PARALLELISM=6", ""]))
    admin_password = next(line.split("=", 1)[1] for line in env_file.read_text().splitlines()
                          if line.startswith("AIRFLOW_ADMIN_PASSWORD="))
    project = f"chunkops{uuid.uuid4().hex[:8]}"
    compose = [_compose_binary(), "--project-name", project, "--file", str(REPO / "docker-compose.yaml"),
               "--env-file", str(env_file)]

    def compose_run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run([*compose, *args], capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"docker-compose {' '.join(args)}:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result

    # the job's data, written on the host into the bind mount: /data in the containers
    write_sample(f"file://{data}/image", (192, 192, 24), seed=3)
    spec = write_demo_job(data, "file:///data/image", "file:///data/affinities")
    spec["model"]["path"] = "/data/rsunet_affinities.pt"
    spec["chunk_size"] = [128, 128, 12]
    spec["postprocess"] = {"segmentation": {"method": "none"}}
    spec["queue"] = {"url": "sqs://chunk-ops"}  # the queue the compose workers poll
    spec["workers"] = {"local": 0, "standing": True}
    share_with_containers(data)

    try:
        compose_run("up", "--detach", "--scale", "worker=2", timeout=900)
        api = AirflowApi(f"http://127.0.0.1:{port}")
        deadline = time.time() + 300
        while not api.healthy():
            assert time.time() < deadline, compose_run("logs", "--tail", "50").stdout[-5000:]
            time.sleep(3)
        api.login("admin", admin_password)
        api.wait_for_dag(timeout_s=300)
        status, run = api.trigger(spec)
        assert status == 200, run
        state = api.wait_for_run(run["dag_run_id"], timeout_s=900)
        assert state == "success", compose_run("logs", "--tail", "80", "scheduler", "worker").stdout[-6000:]
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color"], capture_output=True, text=True)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        compose_run("down", "--volumes", "--remove-orphans", timeout=300)

    left = docker("ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={project}").stdout
    assert left.strip() == "", "docker-compose down left containers"
    assert docker("volume", "ls", "--quiet", "--filter", f"label=com.docker.compose.project={project}").stdout.strip() == ""

    # every chunk was done by the compose workers, and the output is seamless
    (job_dir,) = (data / "affinities" / "jobs").iterdir()
    records = [json.loads(p.read_text()) for p in (job_dir / "done").rglob("*.json")]
    assert records and {r["pool"] for r in records} == {"compose"}
    host_spec = {**spec, "input": {"url": f"file://{data}/image"},
                 "output": {**spec["output"], "url": f"file://{data}/affinities"},
                 "model": {**spec["model"], "path": str(data / "rsunet_affinities.pt")}}
    host_spec.pop("queue")
    job = Job.open(host_spec)
    merged = [p for stage in ("stage1", "stage2") for p in (job_dir / "done" / stage).glob("*.json")]
    assert len(merged) == 2 * len(job.plan)
    assert len(records) == len(merged) + sum(len(job.stage_plan(6, mip)) for mip in (1, 2))  # pyramid blocks too
    got = open_volume(job.spec.output_url, 0).read(job.roi)
    assert np.abs(got - reference_pass(job)).max() <= 1e-5
