"""The reprocessing DAG: scheduled from config; unchanged, finished jobs end at once."""

from __future__ import annotations

import json


def test_reprocess_dag_is_scheduled_from_config(dagbag):
    assert dagbag.import_errors == {}
    dag = dagbag.get_dag("chunkflow_reprocess")
    assert dag is not None and dag.catchup is False
    assert dag.timetable.expression in ("@weekly", "0 0 * * 0")  # [chunkflow] reprocess_schedule's default
    assert dag.get_task("run_inference").task_type == "TriggerDagRunOperator"


def test_a_finished_unchanged_job_triggers_nothing(dagbag, make_spec, tmp_path, monkeypatch):
    """(New and changed jobs, which do trigger runs, are tested against airflow standalone.)"""
    from chunk_ops.job import Job
    from chunk_ops.pipeline import run_job

    spec = make_spec()
    run_job(Job.open(spec), workers=1)  # finished: every chunk has its done markers
    listing = tmp_path / "jobs.json"
    listing.write_text(json.dumps([spec]))
    monkeypatch.setenv("AIRFLOW__CHUNKFLOW__REPROCESS_JOBS", str(listing))

    run = dagbag.get_dag("chunkflow_reprocess").test()
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success"
    assert states["run_inference"] == "skipped"  # nothing mapped: no inference run
