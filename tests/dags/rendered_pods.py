"""Worker pods as the DAG renders them: the real KubernetesPodOperator, built from the
DAG's own pool partial and the pool-sizing code's per-pod kwargs, serialized to manifests."""

from __future__ import annotations


def render_pods(dag, stage: int, pool: str, queue_url: str, env: dict, count: int = 2, *,
                image: str = "chunk-ops-worker:1.0", idle_exit_s: float = 30, lease_s: float = 60,
                spec_prefix: str | None = None) -> list[dict]:
    """Manifests (camelCase, as the API server takes them) of ``count`` pods of one pool."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from chunkflow_airflow.utils.pods import pod_kwargs
    from kubernetes.client import ApiClient

    mapped = dag.get_task(f"{pool}_pool_stage{stage}")
    partial = {k: v for k, v in mapped.partial_kwargs.items() if k not in ("task_id", "dag")}
    manifests = []
    for i, kw in enumerate(pod_kwargs(pool, stage, count, job_id="0123456789abcdef", queue_url=queue_url,
                                      cloud="gke" if pool == "gpu" else "eks", idle_exit_s=idle_exit_s,
                                      lease_s=lease_s, env=env, spec_prefix=spec_prefix)):
        op = KubernetesPodOperator(task_id=f"render_{pool}_{i}", image=image, namespace="connectomics",
                                   **partial, **kw)
        manifests.append(ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True)))
    return manifests
