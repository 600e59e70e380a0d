"""
### Seamless ConvNet inference over a precomputed volume

Runs one chunk_ops job: the trigger form's fields are the job spec
(`chunk_ops/job_spec.schema.json`). Each task calls one step of `chunk_ops.pipeline`, the
sequence `chunk-ops run` runs too, so both write the same files. Steps:

1. **validate** the spec against the volumes and the model (nothing written on error);
2. **prepare** the output layer and store the spec next to it;
3. **stage 1**: enqueue a task per chunk not done yet; local worker tasks, GPU pods and
   CPU pods (spot/preemptible node pools) drain the queue side by side, with standing
   workers outside Airflow (`workers.standing`: the docker-compose `worker` service) if
   any; a deferrable sensor waits for every chunk, reading the workers' tallies (a file
   per worker, whatever the chunk count) and listing the done markers once at the end;
4. **stage 2** (merge, no GPU): the same with local and CPU workers only;
5. **finish**: verify every chunk's markers and the output's blocks, remove the scratch;
6. **post-processing** on the post queue, local and CPU workers: phase 1 labels each chunk,
   stitches its faces and builds the **pyramid** block by block; **relabel** (one task);
   phase 2 writes the relabelled chunks; **segment** gives the result (or, for a region
   up to `max_voxels` in mode auto, segments it in one task);
7. **report**: summary in the log and XCom; Markdown/HTML with a picture (from coarse
   mips) and a Neuroglancer link next to the output.

**Watching a run**: the run's **Chunk progress** tab (and the DAG's) shows each stage's
chunks done, waiting, leased and dead, throughput and ETA, a map of a z section, and the
dead letters with the error that killed each; after a fix its **Redrive** button puts them
back and restarts the stage's pools and sensor.  The enqueue and sensor tasks link to that
view, the report and Neuroglancer (input, output, segmentation).

A worker that is preempted loses nothing: its lease expires and another worker redoes
the chunk; a killed pod fails its task instance and Airflow's retry starts another. Pod
tasks are deferrable (a running pod holds no worker slot); GPU pods take a slot of the
Airflow pool `chunk_ops_gpu`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG, task
from chunkflow_airflow.notifiers import RunNotifier
from chunkflow_airflow.operators.chunk_queue import EnqueueChunksOperator
from chunkflow_airflow.sensors.chunk_queue import StageDoneSensor
from chunkflow_airflow.utils.params import job_params

with DAG(
    dag_id="chunkflow_inference",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["chunk_ops", "inference"],
    doc_md=__doc__,
    params=job_params(),
    max_active_runs=4,
    # one message per finished run, to Slack and/or email when their connections exist
    # (docs/notifications.md); none configured: off
    on_success_callback=RunNotifier(),
    on_failure_callback=RunNotifier(),
) as dag:

    @task
    def validate(params: dict | None = None) -> dict:
        """Parse the spec and open the job: volumes, region, model (one forward pass), output access."""
        from chunk_ops import pipeline
        from chunk_ops.spec import section_with_defaults
        from chunk_ops.submit import default_queue_url
        from chunkflow_airflow.utils.params import spec_from_params
        from chunkflow_airflow.utils.pods import check_pools

        document = spec_from_params(params)
        job = pipeline.validate(document, probe_queue=False)  # the queue is reached through a connection
        for warning in pipeline.plan_warnings(job):
            print(f"warning: {warning}")
        check_pools(section_with_defaults("workers", document.get("workers")), default_queue_url(job))
        return document

    @task(multiple_outputs=True)
    def prepare(document: dict) -> dict:
        """Create the output layer (if new) and store the spec; nothing before this writes."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job
        from chunk_ops.spec import section_with_defaults
        from chunk_ops.submit import default_queue_url

        job = Job.open(document)
        pipeline.prepare(job)
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
        """One pool's workers for a stage (sized from the queue depth, capped by the request)."""
        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook
        from chunkflow_airflow.utils.pods import pool_members

        return pool_members(info, pool, stage, sent, ChunkQueueHook(info["queue_url"], info["aws_conn_id"]))

    @task(retries=2, retry_delay=timedelta(seconds=10))
    def local_worker(index: int, info: dict) -> dict:
        """A chunk_ops worker on this Airflow worker; exits when the queue stays empty."""
        from chunk_ops.engines import local_share
        from chunk_ops.worker import Worker, WorkerConfig
        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

        queues = ChunkQueueHook(info["queue_url"], info["aws_conn_id"]).get_queues()
        config = WorkerConfig(info["queue_url"], idle_exit_s=float(info["workers"]["idle_exit_s"]),
                              visibility_timeout_s=float(info["workers"]["lease_s"]), pool="local",
                              spec_prefixes=(info["spec_url"].rsplit("/", 1)[0] + "/",),
                              # the local pool's workers share this machine's cores instead of each taking all
                              threads=local_share(max(1, info["workers"]["local"])))
        summary = Worker(config, queues).run()
        return {"index": index, "done": summary.done, "skipped": summary.skipped, "failed": summary.failed}

    def pod_pool(pool: str, name: str, kwargs):
        """One pod per member; deferrable (the pod's wait frees the worker slot), GPU pods in
        the Airflow pool ``chunk_ops_gpu`` (see ``pod_operator_kwargs``)."""
        from chunkflow_airflow.utils.pods import pod_operator_kwargs

        return KubernetesPodOperator.partial(
            task_id=f"{pool}_pool_{name}", **pod_operator_kwargs(pool),
        ).expand_kwargs(kwargs)

    @task
    def finish(info: dict) -> dict:
        """Every chunk of both stages verified; scratch removed; the run's summary from the markers."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job
        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

        queues = ChunkQueueHook(info["queue_url"], info["aws_conn_id"]).get_queues()
        return pipeline.finish(Job.from_spec_url(info["spec_url"]), queues).to_dict()

    @task(multiple_outputs=True)
    def prepare_post(info: dict) -> dict:
        """The pyramid's levels and the segmentation layer; which stages end each post-processing phase."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job

        job = Job.from_spec_url(info["spec_url"])
        pipeline.prepare_post(job)
        return {"segmentation": pipeline.segmentation_mode(job),
                "phase1": pipeline.phase_stages(job, 1), "phase2": pipeline.phase_stages(job, 2)}

    @task
    def enqueue_post(info: dict, phase: int) -> int:
        """A post-processing phase's ready tasks not done yet, on the post queue; how many were sent."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job
        from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

        job = Job.from_spec_url(info["spec_url"])
        queues = ChunkQueueHook(info["queue_url"], info["aws_conn_id"], info["max_receives"]).get_queues(create=True)
        return pipeline.send_phase(job, queues, phase)

    @task
    def relabel(info: dict) -> dict:
        """Blockwise segmentation's one global step: segment equivalences to final ids."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job

        return pipeline.relabel(Job.from_spec_url(info["spec_url"]))

    @task
    def segment(info: dict, relabelled: dict) -> dict:
        """postprocess.segmentation: one task over a small region, else the blockwise result (nothing for none)."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job

        return pipeline.segment(Job.from_spec_url(info["spec_url"]), relabelled)

    @task
    def pyramid(info: dict) -> list[int]:
        """The pyramid's blocks per level (2x2x1 each), every one verified done."""
        from chunk_ops import pipeline
        from chunk_ops.job import Job

        return pipeline.pyramid(Job.from_spec_url(info["spec_url"]))

    @task
    def report(info: dict, summary: dict, segmentation: dict, mips: list[int]) -> dict:
        """report.json/.md/.html/.png and a Neuroglancer link by the output; the summary in the log and XCom."""
        import json

        from chunk_ops import pipeline
        from chunk_ops.job import Job

        result = pipeline.report(Job.from_spec_url(info["spec_url"]), summary, segmentation=segmentation,
                                 pyramid_chunks=mips).to_dict()
        print(json.dumps(result, indent=2))
        return result

    def drain(sent, stage: int, stages, name: str):
        """Workers for the tasks just sent (local workers, pods), then a sensor for ``stages``."""
        cloud_pools = ("gpu", "cpu") if stage == 1 else ("cpu",)  # merges and post-processing need no GPU
        sizes = {pool: size_pool.override(task_id=f"size_{pool}_pool_{name}")(info, sent, stage, pool)
                 for pool in ("local", *cloud_pools)}
        local = local_worker.override(task_id=f"local_pool_{name}").partial(info=info).expand(index=sizes["local"])
        for pool in cloud_pools:
            pod_pool(pool, name, sizes[pool])
        # Local workers leave when no task is visible; pods may still hold leases then,
        # so the sensor waits for the done markers. "all_done": it judges by the markers
        # even if a local worker task failed or the pool was empty (skipped).
        done = StageDoneSensor(
            task_id=f"{name}_done", spec_url=info["spec_url"], queue_url=info["queue_url"], stages=stages,
            aws_conn_id=info["aws_conn_id"], poke_interval=5, timeout=7 * 24 * 3600, trigger_rule="all_done",
        )
        local >> done
        return done

    info = prepare(validate())
    previous = info
    for stage in (1, 2):
        enqueue = EnqueueChunksOperator(
            task_id=f"enqueue_stage{stage}", spec_url=info["spec_url"], queue_url=info["queue_url"],
            stage=stage, aws_conn_id=info["aws_conn_id"], max_receives=info["max_receives"],
        )
        previous >> enqueue
        previous = drain(enqueue.output, stage, [stage], f"stage{stage}")
    summary = finish(info)
    previous >> summary
    # post-processing: (1) label, stitch and the pyramid, (2) after the global relabel, write the labels
    post = prepare_post(info)
    summary >> post
    sent = enqueue_post.override(task_id="enqueue_post1")(info, 1)
    post >> sent
    phase1 = drain(sent, 3, post["phase1"], "post1")
    relabelled = relabel(info)
    phase1 >> relabelled
    sent = enqueue_post.override(task_id="enqueue_post2")(info, 2)
    relabelled >> sent
    phase2 = drain(sent, 5, post["phase2"], "post2")
    labels, mips = segment(info, relabelled), pyramid(info)
    phase2 >> labels
    phase1 >> mips
    report(info, summary, labels, mips)
