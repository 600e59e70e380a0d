"""Worker pods for spot/preemptible node pools: one KubernetesPodOperator per worker.

The pod tasks are deferrable: a task creates its pod, then hands the wait to the triggerer
and gives its Airflow worker slot back until the pod ends, so a run's 64 GPU and 128 CPU
pods need no 192 worker slots (``[core] parallelism``). GPU pods also take a slot of the
Airflow pool ``GPU_POOL`` for as long as they live (created with ``--include-deferred``),
so concurrent runs share the cluster's GPUs instead of each sizing itself as if alone.

Node selectors and tolerations follow each cloud's conventions:
- GKE: spot nodes carry ``cloud.google.com/gke-spot=true`` (and the matching taint
  when the pool is tainted); GPU nodes are tainted ``nvidia.com/gpu``.
- EKS: managed node groups label spot capacity ``eks.amazonaws.com/capacityType=SPOT``;
  GPU nodes are tainted ``nvidia.com/gpu``.
"""

from __future__ import annotations

import math
from datetime import timedelta

from kubernetes.client import models as k8s

SPOT = {
    "gke": ({"cloud.google.com/gke-spot": "true"},
            [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]),
    "eks": ({"eks.amazonaws.com/capacityType": "SPOT"},
            [{"key": "eks.amazonaws.com/capacityType", "operator": "Equal", "value": "SPOT", "effect": "NoSchedule"}]),
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# Each pool's container resources; a pod's CPU request is also its worker's thread budget.
WORKER_RESOURCES = {
    "gpu": k8s.V1ResourceRequirements(requests={"cpu": "4", "memory": "16Gi"},
                                      limits={"memory": "16Gi", "nvidia.com/gpu": "1"}),
    "cpu": k8s.V1ResourceRequirements(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}),
}

# The worker image's user (images/worker/Dockerfile); pods never run as root.
WORKER_UID = 10001
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": WORKER_UID, "runAsGroup": WORKER_UID,
                        "fsGroup": WORKER_UID, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


# The Airflow pool of GPU pods: slots = the cluster's GPUs (one pod, one GPU). Create it with
# deferred tasks counted, since a GPU pod's task is deferred for most of the pod's life:
#   airflow pools set chunk_ops_gpu 64 "GPU worker pods (cluster GPUs)" --include-deferred
GPU_POOL = "chunk_ops_gpu"


def pod_operator_kwargs(pool: str) -> dict:
    """What every pod of a cloud pool shares: ``KubernetesPodOperator.partial`` arguments
    (the DAG's pod pools; the tests render and run pods from the same arguments)."""
    kwargs = {
        "cmds": ["chunk-ops"],
        "container_resources": WORKER_RESOURCES[pool],
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "retries": 5,  # a preempted pod fails its task; the retry starts a new pod
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "startup_timeout_seconds": 900,  # scale-up from zero nodes, image pull
        # the pod's wait runs in the triggerer: no worker slot is held while the pod runs
        "deferrable": True,
        "poll_interval": 10,  # seconds between the triggerer's reads of a pod's phase
    }
    if pool == "gpu":
        kwargs["pool"] = GPU_POOL
    return kwargs


def check_pools(workers: dict, queue_url: str) -> None:
    """Refuse a run that no worker would serve: its sensors would wait forever."""
    if workers["local"] or workers["gpu"]["max"] or workers["cpu"]["max"] or workers["standing"]:
        return
    raise ValueError(
        f"workers: no pool would take the tasks of queue {queue_url} (local 0, gpu.max 0, cpu.max 0, "
        "standing false); set workers.standing to true if workers outside Airflow (the docker-compose "
        "worker service) poll that queue"
    )


def threads_for_request(cpu: str) -> int:
    """A worker's thread budget from its container's CPU request (``"2"``, ``"500m"``): the
    node has more cores, but the pod is scheduled for, and shares the node by, its request."""
    from chunk_ops.engines import threads_for
    from kubernetes.utils import parse_quantity

    try:
        cpus = float(parse_quantity(cpu))
    except ValueError:
        raise ValueError(f"CPU request {cpu!r} is not a Kubernetes quantity (e.g. '2', '500m')") from None
    return threads_for(cpus)


def _allowlist_env() -> dict[str, str]:
    import os

    from chunk_ops.models.registry import ALLOWLIST_ENV

    return {ALLOWLIST_ENV: os.environ[ALLOWLIST_ENV]} if os.environ.get(ALLOWLIST_ENV) else {}


# A preempted pod gets SIGTERM, then SIGKILL after this many seconds (spot nodes give about
# 30 s of notice); the worker finishes or gives back its task within WORKER_GRACE_S of it.
TERMINATION_GRACE_S = 30
WORKER_GRACE_S = 20


def worker_arguments(queue_url: str, idle_exit_s: float, lease_s: float, pool: str = "cpu",
                     spec_prefix: str | None = None) -> list[str]:
    args = ["worker", "--queue", queue_url, "--idle-exit", str(idle_exit_s), "--visibility-timeout", str(lease_s),
            "--grace", str(WORKER_GRACE_S)]
    if pool == "gpu":  # two tasks share the GPU: one reads or writes while the other computes;
        # and GPUs never merge: they poll only the stage-1 queue
        args += ["--tasks-in-flight", "2", "--stages", "1"]
    if spec_prefix:  # the pod opens this run's spec only
        args += ["--spec-prefix", spec_prefix]
    return args


def pod_kwargs(pool: str, stage: int, count: int, *, job_id: str, queue_url: str, cloud: str,
               idle_exit_s: float, lease_s: float, env: dict[str, str], spec_prefix: str | None = None) -> list[dict]:
    """Per-pod arguments for ``KubernetesPodOperator.partial(...).expand_kwargs(...)``."""
    from chunk_ops.engines import THREADS_ENV

    selector, tolerations = SPOT[cloud]
    tolerations = tolerations + ([GPU_TOLERATION] if pool == "gpu" else [])
    threads = threads_for_request(WORKER_RESOURCES[pool].requests["cpu"])
    return [
        {
            "name": f"chunk-ops-{pool}-s{stage}-{job_id[:8]}-{i}",
            "arguments": worker_arguments(queue_url, idle_exit_s, lease_s, pool, spec_prefix),
            # the operator's model allowlist travels with the pods (never from the trigger)
            "env_vars": {**env, **_allowlist_env(), "CHUNK_OPS_POOL": pool, THREADS_ENV: str(threads)},
            "node_selector": dict(selector),
            "tolerations": [dict(t) for t in tolerations],
            "labels": {"app": "chunk-ops-worker", "pool": pool, "job": job_id[:16], "stage": str(stage)},
            "security_context": dict(POD_SECURITY_CONTEXT),
            "container_security_context": dict(CONTAINER_SECURITY_CONTEXT),
            "termination_grace_period": TERMINATION_GRACE_S,
        }
        for i in range(count)
    ]


def pool_size(workers: dict, pool: str, stage: int, pending: int) -> int:
    """How many workers a pool gets for a stage, from the tasks pending and the request's limits.

    Local: ``workers.local`` whenever there is work.  Cloud: one worker per
    ``tasks_per_worker`` pending tasks; the GPU pool fills first (stage 1 only: merges
    never hold a GPU), CPU pods take the rest; each capped by its ``max``.
    """
    if pending <= 0:
        return 0
    if pool == "local":
        return workers["local"]
    wanted = math.ceil(pending / workers["tasks_per_worker"])
    gpu = min(workers["gpu"]["max"], wanted) if stage == 1 else 0
    if pool == "gpu":
        return gpu
    if pool == "cpu":
        return min(workers["cpu"]["max"], wanted - gpu)
    raise ValueError(f"unknown pool {pool!r} (local, gpu, cpu)")


def pool_members(info: dict, pool: str, stage: int, sent: int, hook) -> list:
    """A stage's members of one pool, for ``.expand``: worker indices (local) or per-pod
    KubernetesPodOperator kwargs (gpu, cpu).  ``info`` is the prepare step's XCom;
    ``hook`` a ChunkQueueHook on the run's queue (queue depth, and the pods' queue env)."""
    if not sent:
        return []
    workers = info["workers"]
    if pool == "local":
        return list(range(pool_size(workers, pool, stage, sent)))
    count = pool_size(workers, pool, stage, hook.get_queues().counts(stage).pending)
    pods = pod_kwargs(pool, stage, count, job_id=info["job_id"], queue_url=info["queue_url"],
                      spec_prefix=info["spec_url"].rsplit("/", 1)[0] + "/", cloud=workers["cloud"],
                      idle_exit_s=workers["idle_exit_s"], lease_s=workers["lease_s"], env=hook.worker_env())
    return [{**kw, "image": workers["image"], "namespace": workers["namespace"]} for kw in pods]

