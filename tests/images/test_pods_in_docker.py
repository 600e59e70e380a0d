"""The DAG's GPU and CPU worker pods, run for real: each rendered pod's container
(image, command, args, env, limits, security context) becomes a `docker run` of the
worker image against a real job on an SQS server on this host; `docker stop` with the
pod's grace period stands in for a spot node's preemption."""

from __future__ import annotations

import json
import sys
import time
import uuid

import numpy as np
import pytest

from chunk_ops.job import Job
from chunk_ops.queues.stages import StageQueues
from chunk_ops.stages import reference_pass
from chunk_ops.submit import enqueue_stage
from chunk_ops.volumes import open_volume
from tests.chunk_ops.conftest import NETS_FILE
from tests.dags.rendered_pods import render_pods
from tests.images.conftest import share_with_containers
from tests.images.pods import docker_run_args

pytestmark = pytest.mark.slow


def _set(args: list[str], option: str, value: str) -> None:
    args[args.index(option) + 1] = value


class Pods:
    """Rendered pods of one job, started as containers; removed at the end."""

    def __init__(self, docker, dag, image: str, job_dir, sqs_endpoint: str, queue_url: str):
        self.docker, self.dag, self.image = docker, dag, image
        self.queue_url, self.names = queue_url, []
        self.env = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_SQS": sqs_endpoint}
        self.extra = ("--network", "host",  # the SQS server listens on this host's loopback
                      "--volume", f"{job_dir}:{job_dir}",  # file:// layers at the same paths
                      "--volume", f"{NETS_FILE.parent}:{NETS_FILE.parent}:ro",  # the test nets' source
                      # what a pod's service account provides
                      "--env", "AWS_ACCESS_KEY_ID=testing", "--env", "AWS_SECRET_ACCESS_KEY=testing")

    def manifest(self, pool: str, stage: int) -> dict:
        (manifest,) = render_pods(self.dag, stage, pool, self.queue_url, self.env, count=1, image=self.image)
        return manifest

    def start(self, manifest: dict, *, grace_s: float | None = None) -> str:
        name = f"{manifest['metadata']['name']}-{uuid.uuid4().hex[:6]}"
        args = docker_run_args(manifest, name=name, gpus=False, extra=self.extra)
        if "nvidia.com/gpu" in manifest["spec"]["containers"][0]["resources"]["limits"]:
            print(f"{name}: no NVIDIA runtime here; the nvidia.com/gpu limit is left out, "
                  "the worker runs its engine on the CPU", file=sys.stderr)
        _set(args, "--idle-exit", "3")  # a short idle exit, so the test need not wait
        if grace_s is not None:
            _set(args, "--grace", str(grace_s))
        self.docker("run", *args)
        self.names.append(name)
        return name

    def wait(self, name: str, timeout: float = 600) -> int:
        return int(self.docker("wait", name, timeout=timeout).stdout.strip())

    def logs(self, name: str) -> list[dict]:
        result = self.docker("logs", name)
        events = []
        for line in (result.stdout + result.stderr).splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def remove(self) -> None:
        if self.names:
            self.docker("rm", "--force", *self.names, check=False)


@pytest.fixture
def pods(docker, images, dagbag, moto_sqs, tmp_path):
    queue = StageQueues(f"sqs://pods-docker-{uuid.uuid4().hex[:10]}", create=True)
    started = Pods(docker, dagbag.get_dag("chunkflow_inference"), images.worker, tmp_path, moto_sqs, queue.url)
    started.queue = queue
    yield started
    started.remove()


def _slow_job(make_spec, delay_s: float) -> Job:
    spec = make_spec(net_kwargs={"in_channels": 1, "out_channels": 1, "delay_s": delay_s})
    job = Job.open(spec)
    job.prepare()
    return job


def test_gpu_and_cpu_pods_from_the_dag_run_a_job_side_by_side(pods, make_spec, tmp_path):
    job = _slow_job(make_spec, delay_s=0.1)
    share_with_containers(tmp_path)
    assert enqueue_stage(job, pods.queue, 1) == len(job.plan)
    gpu, cpu = pods.start(pods.manifest("gpu", 1)), pods.start(pods.manifest("cpu", 1))
    assert (pods.wait(gpu), pods.wait(cpu)) == (0, 0)
    assert job.done_mask(1).all()
    assert {r["pool"] for r in job.done_records(1)} == {"gpu", "cpu"}  # both pods took chunks

    # merges: CPU pods only, as the DAG renders them for stage 2
    assert enqueue_stage(job, pods.queue, 2) == len(job.plan)
    merge = pods.start(pods.manifest("cpu", 2))
    assert pods.wait(merge) == 0
    assert job.done_mask(2).all()
    got = open_volume(job.spec.output_url, 0).read(job.roi)
    assert np.abs(got - reference_pass(job)).max() <= 1e-5
    for stage in (1, 2):
        counts = pods.queue.counts(stage)
        assert (counts.pending, counts.dead) == (0, 0)


def test_docker_stop_mid_task_gives_the_chunk_back_and_another_pod_finishes(pods, make_spec, tmp_path):
    # about 3 s a chunk: the stop lands at most about 1.5 s after a "done", so the task then
    # running outlasts the 1 s grace whatever the timing, and is given back
    job = _slow_job(make_spec, delay_s=1.0)
    share_with_containers(tmp_path)
    assert enqueue_stage(job, pods.queue, 1) == len(job.plan)
    manifest = pods.manifest("cpu", 1)
    first = pods.start(manifest, grace_s=1)  # a task outlasts the grace: it is given back
    deadline = time.time() + 300
    while not any(e["event"] == "done" for e in pods.logs(first)):  # busy with its next chunk now
        assert time.time() < deadline, "the first pod finished no chunk"
        time.sleep(0.5)
    # what the kubelet does to a pod on a preempted node: SIGTERM, SIGKILL after the grace period
    grace = manifest["spec"]["terminationGracePeriodSeconds"]
    pods.docker("stop", "--time", str(grace), first, timeout=grace + 30)
    events = pods.logs(first)
    assert pods.wait(first) == 143  # the worker left on its own (143), not SIGKILLed (137)
    assert [e for e in events if e["event"] == "given_back"], events[-5:]

    second = pods.start(manifest)
    assert pods.wait(second) == 0
    assert job.done_mask(1).all()
    assert enqueue_stage(job, pods.queue, 2) == len(job.plan)
    assert pods.wait(pods.start(pods.manifest("cpu", 2))) == 0
    got = open_volume(job.spec.output_url, 0).read(job.roi)
    assert np.abs(got - reference_pass(job)).max() <= 1e-5
    for stage in (1, 2):
        counts = pods.queue.counts(stage)
        assert (counts.pending, counts.in_flight, counts.dead) == (0, 0, 0)
