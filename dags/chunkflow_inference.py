"""
### Seamless ConvNet inference over a precomputed volume

Runs one chunk_ops job: the trigger form's fields are the job spec
(`chunk_ops/job_spec.schema.json`). Stages:

1. **validate** the spec against the volumes and the model (nothing written on error);
2. **prepare** the output layer and store the spec next to it;
3. **stage 1**: enqueue a task per chunk not done yet; local worker tasks, GPU pods and
   CPU pods (spot/preemptible node pools) drain the queue side by side, with standing
   workers outside Airflow (`workers.standing`: the docker-compose `worker` service) if
   any; a deferrable sensor waits for every chunk's done marker;
4. **stage 2** (merge, no GPU): the same with local and CPU workers only;
5. **verify** every chunk, remove the scratch, **segment** (postprocess.segmentation); build the downsampled **pyramid**;
6. **report**: summary in the log and XCom; Markdown/HTML with a picture and a
   Neuroglancer link next to the output.

A worker that is preempted loses nothing: its lease expires and another worker redoes
the chunk; a killed pod fails its task instance and Airflow's retry starts another.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG, task
from chunkflow_airflow.operators.chunk_queue import EnqueueChunksOperator
from chunkflow_airflow.sensors.chunk_queue import StageDoneSensor
from chunkflow_airflow.utils.params import job_params
from kubernetes.client import models as k8s

WORKER_RESOURCES = {
    "gpu": k8s.V1ResourceRequirements(requests={"cpu": "4", "memory": "16Gi"},
                                      limits={"memory": "16Gi", "nvidia.com/gpu": "1"}),
    "cpu": k8s.V1ResourceRequirements(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}),
}

with DAG(
    dag_id="chunkflow_inference",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["chunk_ops", "inference"],
    doc_md=__doc__,
    params=job_params(),
    max_active_runs=4,
) as dag:

    @task
    def validate(params: dict | None = None) -> dict:
        """Parse the spec and open the job: volumes, region, model (one forward pass)."""
        from chunk_ops.job import Job
        from chunk_ops.spec import section_with_defaults
        from chunk_ops.submit import default_queue_url
        from chunkflow_airflow.utils.params import spec_from_params
        from chunkflow_airflow.utils.pods import check_pools

        document = spec_from_params(params)
        job = Job.open(document)
        check_pools(section_with_defaults("workers", document.get("workers")), default_queue_url(job))
        job.predictor  # loads the model and checks it on one patch
        return document

    @task(multiple_outputs=True)
    def prepare(document: dict) -> dict:
        """Create the output layer (if new) and store the spec; nothing before this writes."""
        from chunk_ops.job import Job
        from chunk_ops.spec import section_with_defaults
        from chunk_ops.submit import default_queue_url

        job = Job.open(document)
        job.prepare()
        queue = section_with_defaults("queue", document.get("queue"))
        return {
            "job_id": job.id,
            "spec_url": job.spec_url,
            "queue_url": default_queue_url(job),
            "aws_conn_id": queue["aws_conn_id"],
            "max_receives": queue["max_receives"],
            "chunks": len(job.plan),
            "workers": section_with_defaults("workers", document.get("workers")),
        }

    @task
    def size_pool(info: dict, sent: int, stage: int, pool: str) -> list:
        """One pool's workers for a stage: sized from the queue depth, capped by the request.

        Local: a list of worker indices. GPU/CPU: per-pod KubernetesPodOperator kwargs.
        The GPU pool fills first; CPU pods take the rest; merges (stage 2) get no GPU.
        """
        import math

        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook
        from chunkflow_airflow.utils.pods import pod_kwargs

        w = info["workers"]
        if not sent:
            return []
        if pool == "local":
            return list(range(w["local"]))
        hook = ChunkQueueHook(info["queue_url"], info["aws_conn_id"])
        wanted = math.ceil(hook.get_queues().counts(stage).pending / w["tasks_per_worker"])
        gpu = min(w["gpu"]["max"], wanted) if stage == 1 else 0
        count = gpu if pool == "gpu" else min(w["cpu"]["max"], max(0, wanted - gpu))
        pods = pod_kwargs(pool, stage, count, job_id=info["job_id"], queue_url=info["queue_url"],
                          spec_prefix=info["spec_url"].rsplit("/", 1)[0] + "/",
                          cloud=w["cloud"], idle_exit_s=w["idle_exit_s"], lease_s=w["lease_s"],
                          env=hook.worker_env())
        return [{**kw, "image": w["image"], "namespace": w["namespace"]} for kw in pods]

    @task(retries=2, retry_delay=timedelta(seconds=10))
    def local_worker(index: int, info: dict) -> dict:
        """A chunk_ops worker on this Airflow worker; exits when the queue stays empty."""
        import os

        import torch

        from chunk_ops.worker import Worker, WorkerConfig
        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

        # the local pool's workers share this machine's cores instead of each taking all
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, info["workers"]["local"])))
        queues = ChunkQueueHook(info["queue_url"], info["aws_conn_id"]).get_queues()
        config = WorkerConfig(info["queue_url"], idle_exit_s=float(info["workers"]["idle_exit_s"]),
                              visibility_timeout_s=float(info["workers"]["lease_s"]), pool="local",
                              spec_prefixes=(info["spec_url"].rsplit("/", 1)[0] + "/",))
        summary = Worker(config, queues).run()
        return {"index": index, "done": summary.done, "skipped": summary.skipped, "failed": summary.failed}

    def pod_pool(pool: str, stage: int, kwargs):
        return KubernetesPodOperator.partial(
            task_id=f"{pool}_pool_stage{stage}",
            cmds=["chunk-ops"],
            container_resources=WORKER_RESOURCES[pool],
            get_logs=True,
            on_finish_action="delete_pod",
            retries=5,
            retry_delay=timedelta(seconds=30),
            retry_exponential_backoff=True,
            startup_timeout_seconds=900,
        ).expand_kwargs(kwargs)

    @task
    def finish(info: dict) -> dict:
        """Every chunk of both stages done; scratch removed; segmented; report written by the output."""
        from chunk_ops.job import Job
        from chunk_ops.submit import finish_job
        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

        queues = ChunkQueueHook(info["queue_url"], info["aws_conn_id"]).get_queues()
        summary = finish_job(Job.from_spec_url(info["spec_url"]), queues).to_dict()
        summary["dead_letters"] = queues.counts(1).dead + queues.counts(2).dead
        return summary

    @task
    def pyramid(info: dict, params: dict | None = None) -> list[int]:
        """Downsampled mips of the output (2x2x1 each), for browsing the result."""
        from chunk_ops.downsample import build_pyramid
        from chunk_ops.job import Job
        from chunk_ops.spec import section_with_defaults

        levels = section_with_defaults("postprocess", (params or {}).get("postprocess"))["pyramid_levels"]
        return build_pyramid(Job.from_spec_url(info["spec_url"]).spec.output_url, levels)

    @task
    def report(info: dict, summary: dict, mips: list[int]) -> dict:
        """Summary in the log and XCom; report.md/.html/.png and a Neuroglancer link by the output."""
        import json

        from chunk_ops.job import Job
        from chunk_ops.report import neuroglancer_link, write_report

        job = Job.from_spec_url(info["spec_url"])
        summary = {**summary, "pyramid_chunks": mips}
        files = write_report(job, summary)
        result = {**summary, "reports": files, "neuroglancer": neuroglancer_link(job)}
        print(json.dumps(result, indent=2))
        return result

    info = prepare(validate())
    previous = info
    for stage in (1, 2):
        enqueue = EnqueueChunksOperator(
            task_id=f"enqueue_stage{stage}", spec_url=info["spec_url"], queue_url=info["queue_url"],
            stage=stage, aws_conn_id=info["aws_conn_id"], max_receives=info["max_receives"],
        )
        previous >> enqueue
        cloud_pools = ("gpu", "cpu") if stage == 1 else ("cpu",)  # merges need no GPU
        sizes = {pool: size_pool.override(task_id=f"size_{pool}_pool_stage{stage}")(info, enqueue.output, stage, pool)
                 for pool in ("local", *cloud_pools)}
        local = local_worker.override(task_id=f"local_pool_stage{stage}").partial(info=info).expand(index=sizes["local"])
        for pool in cloud_pools:
            pod_pool(pool, stage, sizes[pool])
        # Local workers leave when no task is visible; pods may still hold leases then,
        # so the sensor waits for the done markers. "all_done": it judges by the markers
        # even if a local worker task failed or the pool was empty (skipped).
        done = StageDoneSensor(
            task_id=f"stage{stage}_done", spec_url=info["spec_url"], queue_url=info["queue_url"], stage=stage,
            aws_conn_id=info["aws_conn_id"], poke_interval=5, timeout=7 * 24 * 3600, trigger_rule="all_done",
        )
        local >> done
        previous = done
    summary = finish(info)
    mips = pyramid(info)
    previous >> summary >> mips  # the pyramid reads the finished output
    report(info, summary, mips)
