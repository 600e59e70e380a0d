"""Worker pods: rendered by the real KubernetesPodOperator, validated against the
Kubernetes schema, and their command run as a local process against a real SQS server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.dags.rendered_pods import render_pods


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_rendered_pods_validate_strictly(dagbag, tmp_path, pool):
    dag = dagbag.get_dag("chunkflow_inference")
    manifests = render_pods(dag, 1, pool, "sqs://run-42", {"AWS_DEFAULT_REGION": "us-east-1"},
                            spec_prefix="s3://lab/out/jobs/0123456789abcdef/")
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    for manifest in manifests:
        path = tmp_path / f"{manifest['metadata']['name']}.json"
        path.write_text(json.dumps(manifest))
        result = subprocess.run([validate, "--strict", str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        container = manifest["spec"]["containers"][0]
        assert container["command"] == ["chunk-ops"]
        assert container["args"][:3] == ["worker", "--queue", "sqs://run-42"]
        limits = container["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == (pool == "gpu")
        # GPU workers keep two tasks in flight, so chunk reads and writes overlap the GPU
        assert ("--tasks-in-flight" in container["args"]) == (pool == "gpu")
        # GPU workers poll only the stage-1 queue: they never take a merge
        args = container["args"]
        assert (args[args.index("--stages") + 1] if "--stages" in args else "1,2") == ("1" if pool == "gpu" else "1,2")
        # a pod opens only its run's spec; the operator's model allowlist travels with it
        assert args[args.index("--spec-prefix") + 1] == "s3://lab/out/jobs/0123456789abcdef/"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["CHUNK_OPS_MODEL_ALLOWLIST"] == os.environ["CHUNK_OPS_MODEL_ALLOWLIST"]
        # never root; SIGKILL comes after the worker's own grace period has passed
        assert manifest["spec"]["securityContext"]["runAsNonRoot"] is True
        assert manifest["spec"]["securityContext"]["runAsUser"] != 0
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        grace = float(container["args"][container["args"].index("--grace") + 1])
        assert manifest["spec"]["terminationGracePeriodSeconds"] > grace
        tolerations = {t["key"] for t in manifest["spec"]["tolerations"]}
        if pool == "gpu":
            assert manifest["spec"]["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
            assert "nvidia.com/gpu" in tolerations
        else:
            assert manifest["spec"]["nodeSelector"] == {"eks.amazonaws.com/capacityType": "SPOT"}
            assert "nvidia.com/gpu" not in tolerations
    assert len({m["metadata"]["name"] for m in manifests}) == len(manifests)


def test_a_pods_command_and_env_process_tasks_from_sqs(dagbag, make_spec, moto_sqs, tmp_path):
    """Run what the pod would run, as a local process: same command, same env."""
    from chunk_ops.job import Job
    from chunk_ops.queues.stages import StageQueues
    from chunk_ops.submit import enqueue_stage

    job = Job.open(make_spec())
    job.prepare()
    queue = StageQueues(f"sqs://pods-{uuid.uuid4().hex[:10]}", create=True)
    assert enqueue_stage(job, queue, 1) == len(job.plan)
    env = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_SQS": moto_sqs}
    (manifest,) = render_pods(dagbag.get_dag("chunkflow_inference"), 1, "cpu", queue.url, env, count=1,
                              spec_prefix=job.job_url + "/")
    container = manifest["spec"]["containers"][0]
    pod_env = {e["name"]: e["value"] for e in container["env"]}
    assert pod_env == {**env, "CHUNK_OPS_MODEL_ALLOWLIST": os.environ["CHUNK_OPS_MODEL_ALLOWLIST"],
                       "CHUNK_OPS_POOL": "cpu", "CHUNK_OPS_THREADS": "2"}  # the cpu pool's CPU request
    args = container["args"]
    args[args.index("--idle-exit") + 1] = "2"  # a short idle exit for the test
    command = [str(Path(sys.executable).with_name(container["command"][0])), *args]
    secrets = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # a pod's service account
    result = subprocess.run(command, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **pod_env, **secrets},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert job.done_mask(1).all()
    assert queue.counts(1).pending == 0
    assert {r["pool"] for r in job.done_records(1)} == {"cpu"}


def test_pod_tasks_defer_and_gpu_pods_take_a_gpu_pool_slot(dagbag):
    """Pods wait in the triggerer, not in a worker slot (tests/dags/test_pod_slots.py shows
    it under `airflow standalone`); GPU pods share the cluster's GPUs through one Airflow pool."""
    from chunkflow_airflow.utils.pods import GPU_POOL

    dag = dagbag.get_dag("chunkflow_inference")
    for stage, pool in ((1, "gpu"), (1, "cpu"), (2, "cpu")):
        task = dag.get_task(f"{pool}_pool_stage{stage}")
        assert task.task_type == "KubernetesPodOperator"
        assert task.partial_kwargs["deferrable"] is True
        assert task.partial_kwargs["retries"] == 5  # a preempted pod's task is retried with a new pod
        assert task.pool == (GPU_POOL if pool == "gpu" else "default_pool")
