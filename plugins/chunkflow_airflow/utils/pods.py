"""Worker pods for spot/preemptible node pools: one KubernetesPodOperator per worker.

Node selectors and tolerations follow each cloud's conventions:
- GKE: spot nodes carry ``cloud.google.com/gke-spot=true`` (and the matching taint
  when the pool is tainted); GPU nodes are tainted ``nvidia.com/gpu``.
- EKS: managed node groups label spot capacity ``eks.amazonaws.com/capacityType=SPOT``;
  GPU nodes are tainted ``nvidia.com/gpu``.
"""

from __future__ import annotations

SPOT = {
    "gke": ({"cloud.google.com/gke-spot": "true"},
            [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]),
    "eks": ({"eks.amazonaws.com/capacityType": "SPOT"},
            [{"key": "eks.amazonaws.com/capacityType", "operator": "Equal", "value": "SPOT", "effect": "NoSchedule"}]),
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def worker_arguments(queue_url: str, idle_exit_s: float, lease_s: float, pool: str = "cpu") -> list[str]:
    args = ["worker", "--queue", queue_url, "--idle-exit", str(idle_exit_s), "--visibility-timeout", str(lease_s)]
    if pool == "gpu":  # two tasks share the GPU: one reads or writes while the other computes
        args += ["--tasks-in-flight", "2"]
    return args


def pod_kwargs(pool: str, stage: int, count: int, *, job_id: str, queue_url: str, cloud: str,
               idle_exit_s: float, lease_s: float, env: dict[str, str]) -> list[dict]:
    """Per-pod arguments for ``KubernetesPodOperator.partial(...).expand_kwargs(...)``."""
    selector, tolerations = SPOT[cloud]
    tolerations = tolerations + ([GPU_TOLERATION] if pool == "gpu" else [])
    return [
        {
            "name": f"chunk-ops-{pool}-s{stage}-{job_id[:8]}-{i}",
            "arguments": worker_arguments(queue_url, idle_exit_s, lease_s, pool),
            "env_vars": {**env, "CHUNK_OPS_POOL": pool},
            "node_selector": dict(selector),
            "tolerations": [dict(t) for t in tolerations],
            "labels": {"app": "chunk-ops-worker", "pool": pool, "job": job_id[:16], "stage": str(stage)},
        }
        for i in range(count)
    ]
