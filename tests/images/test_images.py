"""The images themselves: the worker image runs a job from a queue on this host and
matches the whole-volume reference; no image runs as root or carries a secret."""

from __future__ import annotations

import subprocess
import uuid

import numpy as np
import pytest

from chunk_ops.job import Job
from chunk_ops.models.demo import write_demo_job
from chunk_ops.queues.stages import StageQueues
from chunk_ops.sample import write_sample
from chunk_ops.stages import reference_pass
from chunk_ops.submit import enqueue_stage
from chunk_ops.volumes import open_volume
from tests.dags.conftest import REPO
from tests.images.conftest import share_with_containers

pytestmark = pytest.mark.slow


def test_a_worker_container_runs_the_bundled_network_from_a_host_queue(docker, images, moto_sqs, tmp_path):
    """The image as a lab runs it by hand: `docker run IMAGE worker --queue sqs://...`,
    the default engine (OpenVINO on a CPU) and the bundled trained network."""
    image = f"file://{tmp_path}/image"
    write_sample(image, (160, 160, 24), seed=5)
    spec = write_demo_job(tmp_path, image, f"file://{tmp_path}/affinities")
    spec["chunk_size"] = [128, 128, 12]  # 2 x 2 x 2 chunks
    spec["postprocess"] = {"segmentation": {"method": "none"}}
    job = Job.open(spec)
    job.prepare()
    share_with_containers(tmp_path)
    queue = StageQueues(f"sqs://image-{uuid.uuid4().hex[:10]}", create=True)
    name = f"chunk-ops-worker-test-{uuid.uuid4().hex[:6]}"
    run = ["run", "--rm", "--network", "host", "--volume", f"{tmp_path}:{tmp_path}",
           "--env", "AWS_DEFAULT_REGION=us-east-1", "--env", f"AWS_ENDPOINT_URL_SQS={moto_sqs}",
           "--env", "AWS_ACCESS_KEY_ID=testing", "--env", "AWS_SECRET_ACCESS_KEY=testing",
           images.worker, "worker", "--queue", queue.url, "--idle-exit", "3"]
    for stage in (1, 2):
        assert enqueue_stage(job, queue, stage) == len(job.plan)
        docker(*run[:1], "--name", f"{name}-{stage}", *run[1:], timeout=900)
        assert job.done_mask(stage).all()
    assert {r["engine"] for r in job.done_records(1)} == {"openvino-cpu-float32"}  # "auto" on a CPU
    got = open_volume(job.spec.output_url, 0).read(job.roi)
    assert np.abs(got - reference_pass(job)).max() <= 1e-5


def test_every_image_runs_as_a_non_root_user(docker, images):
    for image in (images.worker, images.airflow, images.sqs, images.postgres):
        user = docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
        assert user and user.split(":")[0] not in ("root", "0"), f"{image} runs as {user!r}"
        uid = docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
        assert uid != "0", f"{image} runs as uid 0"


def test_the_worker_image_has_no_compiler(docker, images):
    found = docker("run", "--rm", "--entrypoint", "sh", images.worker, "-c",
                   "for c in gcc cc g++ c++ clang make; do command -v $c; done; true").stdout.split()
    assert found == []


def _example_secrets() -> dict[str, str]:
    secrets = {}
    for line in (REPO / "compose.env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            secrets[key] = value
    assert len(secrets) >= 6 and all(len(v) >= 8 for v in secrets.values())
    return secrets


def _stream_contains(stream, needles: list[bytes], chunk: int = 1 << 20) -> set[bytes]:
    """Which needles occur in a byte stream (read in chunks that overlap by the longest needle)."""
    found, tail, keep = set(), b"", max(map(len, needles)) - 1
    while block := stream.read(chunk):
        window = tail + block
        found.update(n for n in needles if n in window)
        tail = window[-keep:]
    return found


def test_no_image_carries_a_secret_of_the_example_env_file(docker, images):
    """Not in the build history, the image config, or any file of the image."""
    secrets = _example_secrets()
    needles = [v.encode() for v in secrets.values()]
    for image in (images.worker, images.airflow, images.sqs, images.postgres):
        history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        config = docker("image", "inspect", image).stdout
        for key, value in secrets.items():
            assert value not in history and value not in config, f"{key}'s example value is in {image}'s metadata"
        container = docker("create", image).stdout.strip()
        try:
            export = subprocess.Popen([docker.binary, "export", container], stdout=subprocess.PIPE)
            found = _stream_contains(export.stdout, needles)
            assert export.wait(600) == 0
        finally:
            docker("rm", container)
        assert not found, f"{image} holds example secrets {sorted(found)}"
