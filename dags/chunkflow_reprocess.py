"""
### Scheduled reprocessing of listed chunk_ops jobs

On the schedule `[chunkflow] reprocess_schedule` (default `@weekly`; environment
`AIRFLOW__CHUNKFLOW__REPROCESS_SCHEDULE`), reads the JSON list of job specs in the file
named by `[chunkflow] reprocess_jobs` (`AIRFLOW__CHUNKFLOW__REPROCESS_JOBS`) and, for each,
works out its job id, which hashes the inputs, region, parameters and **model bytes**:

- a job whose chunks are all merged already is unchanged and ends here, at once;
- a job that is new, unfinished, or whose model file changed (a new job id) is
  triggered as a `chunkflow_inference` run, and this DAG waits for those runs.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, conf, task

with DAG(
    dag_id="chunkflow_reprocess",
    schedule=conf.get("chunkflow", "reprocess_schedule", fallback="@weekly"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["chunk_ops", "reprocessing"],
    doc_md=__doc__,
    max_active_runs=1,
) as dag:

    @task
    def jobs_needing_work() -> list[dict]:
        """The listed jobs that are not finished under their current job id."""
        import json
        from pathlib import Path

        from chunk_ops.job import Job

        path = conf.get("chunkflow", "reprocess_jobs", fallback="")
        if not path:
            raise ValueError("set [chunkflow] reprocess_jobs to a JSON file listing job specs")
        documents = json.loads(Path(path).read_text())
        if not isinstance(documents, list):
            raise ValueError(f"{path} must hold a JSON list of job specs, not {type(documents).__name__}")
        todo = []
        for document in documents:
            job = Job.open(document)
            finished = job.done_mask(2).all()
            print(f"job {job.id} ({job.spec.output_url}): {'unchanged, finished' if finished else 'to run'}")
            if not finished:
                todo.append(document)
        return todo

    TriggerDagRunOperator.partial(
        task_id="run_inference",
        trigger_dag_id="chunkflow_inference",
        wait_for_completion=True,
        poke_interval=10,
        allowed_states=["success"],
        failed_states=["failed"],
    ).expand(conf=jobs_needing_work())
