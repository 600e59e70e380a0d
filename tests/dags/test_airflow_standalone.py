"""A real `airflow standalone`, started here: REST triggering (the web UI's trigger form: test_trigger_form.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.airflow_local import DAG_ID
from tests.dags.browser import standalone


@pytest.fixture(scope="module")
def reprocess_list(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reprocess") / "jobs.json"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, reprocess_list):
    with standalone(tmp_path_factory.mktemp("airflow-home"), dags=(DAG_ID, "chunkflow_reprocess"),
                    extra_env={"AIRFLOW__CHUNKFLOW__REPROCESS_JOBS": str(reprocess_list),
                               "AIRFLOW__CHUNKFLOW__REPROCESS_SCHEDULE": "@weekly"}) as local:
        yield local


def _runs(airflow) -> int:
    status, body = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns")
    assert status == 200
    return body["total_entries"]


def test_invalid_conf_gets_400_naming_the_field_and_no_run(airflow, make_spec):
    spec = make_spec()
    spec["chunk_size"] = [256, 256]
    before = _runs(airflow)
    status, body = airflow.trigger(spec)
    assert status == 400, body
    assert "chunk_size" in json.dumps(body) and "too short" in json.dumps(body)
    assert _runs(airflow) == before


def _failed_at_validate(airflow, spec: dict) -> str:
    """Trigger; the run must fail in its validate task, before prepare. Returns validate's log."""
    status, run = airflow.trigger(spec)
    assert status == 200, run
    assert airflow.wait_for_run(run["dag_run_id"], timeout_s=300) == "failed"
    _, body = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances?limit=100")
    states = {ti["task_id"]: ti["state"] for ti in body["task_instances"]}
    assert states["validate"] == "failed" and states["prepare"] in ("upstream_failed", None), states
    status, log = airflow.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/validate/logs/1?full_content=true")
    return json.dumps(log)


@pytest.mark.parametrize("missing", ["input", "output", "model"])
def test_a_conf_without_a_required_section_fails_validate_naming_it_and_writes_nothing(airflow, make_spec, missing):
    """No longer HTTP 400: each required section has a flat alternative in the trigger form
    (input_url, output_url, model_path) and Airflow checks each Param on its own, so "one
    of the two" is checked by the validate task, before anything is written."""
    spec = make_spec(output=f"without-{missing}")
    del spec[missing]
    log = _failed_at_validate(airflow, spec)
    assert f"job spec field {missing}." in log and "is missing" in log
    if missing != "output":
        assert not Path(spec["output"]["url"].removeprefix("file://")).exists()


def test_a_conf_with_an_unknown_key_fails_validate_naming_it_and_writes_nothing(airflow, make_spec):
    spec = make_spec(output="typo")
    spec["chunk_sise"] = [64, 64, 8]  # a typo of chunk_size
    log = _failed_at_validate(airflow, spec)
    assert "unknown job spec field(s) ['chunk_sise']" in log
    assert not Path(spec["output"]["url"].removeprefix("file://")).exists()


def test_a_model_definition_outside_the_allowlist_runs_nothing_over_rest(airflow, make_spec, tmp_path):
    proof = tmp_path / "pwned"
    spec = make_spec(output="hostile")
    spec["model"]["definition"] = "os:system"
    spec["model"]["kwargs"] = {"command": f"touch {proof}"}
    log = _failed_at_validate(airflow, spec)
    assert "model.definition 'os:system' is not allowed" in log
    assert not proof.exists()
    assert not Path(spec["output"]["url"].removeprefix("file://")).exists()


def test_trigger_with_conf_poll_to_success_and_read_the_report(airflow, make_spec):
    spec = make_spec()
    spec["workers"] = {"local": 1, "idle_exit_s": 2}
    status, run = airflow.trigger(spec)
    assert status == 200, run
    assert airflow.wait_for_run(run["dag_run_id"], timeout_s=600) == "success"
    status, xcom = airflow.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/finish/xcomEntries/return_value")
    assert status == 200, xcom
    summary = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    assert summary["amplification"] == 1.0 and summary["dead_letters"] == 0
    report = Path(spec["output"]["url"].removeprefix("file://")) / "jobs" / summary["job_id"] / "report.json"
    assert json.loads(report.read_text())["patches_evaluated"] == summary["patches_evaluated"] > 0


def test_reprocessing_skips_unchanged_jobs_and_reruns_a_new_model(airflow, make_spec, reprocess_list, tmp_path):
    from tests.chunk_ops.conftest import save_net

    spec = make_spec(output="reprocessed")
    spec["workers"] = {"local": 1, "idle_exit_s": 2}
    reprocess_list.write_text(json.dumps([spec]))

    def reprocess() -> int:
        """Trigger the reprocessing DAG; return how many inference runs it started."""
        before = len(airflow.runs())
        status, run = airflow.trigger({}, dag_id="chunkflow_reprocess")
        assert status == 200, run
        assert airflow.wait_for_run(run["dag_run_id"], dag_id="chunkflow_reprocess", timeout_s=600) == "success"
        return len(airflow.runs()) - before

    assert reprocess() == 1  # a new job: run
    assert reprocess() == 0  # unchanged and finished: ends at once
    # a new model version: other weights in the same file, same spec text: a new job id, run again
    weights = Path(spec["model"]["path"])
    retrained = save_net(tmp_path, "TinyConvNet", dict(spec["model"]["kwargs"], seed=5))
    weights.write_bytes(retrained.read_bytes())
    assert reprocess() == 1


def _task_processes(airflow, run_id: str, task_id: str, map_index: int = 0) -> list:
    """The process running a task instance: Airflow titles it 'airflow worker -- <ti id>'."""
    import psutil

    status, ti = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}")
    if status != 200 or ti.get("state") != "running":
        return []
    title = f"airflow worker -- {ti['id']}"
    return [p for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(title)]


def test_a_killed_pool_task_is_retried_and_the_run_ends_correct(airflow, make_spec):
    """Preemption: the local pool's task process is SIGKILLed mid-run; Airflow retries the
    task, the dead worker's lease expires, and the chunk is redone."""
    import time

    import numpy as np

    from chunk_ops.job import Job
    from chunk_ops.stages import reference_pass
    from chunk_ops.volumes import open_volume

    spec = make_spec(net_kwargs={"in_channels": 1, "out_channels": 1, "delay_s": 0.4}, chunk=(16, 16, 4),
                     output="preempted")
    spec["workers"] = {"local": 1, "idle_exit_s": 3, "lease_s": 4}
    status, run = airflow.trigger(spec)
    assert status == 200, run
    job = Job.open(spec)
    deadline = time.time() + 300
    while not (job.done_mask(1).any() and _task_processes(airflow, run["dag_run_id"], "local_pool_stage1")):
        assert time.time() < deadline, "the local pool never started working"
        time.sleep(0.5)
    victims = _task_processes(airflow, run["dag_run_id"], "local_pool_stage1")
    assert len(victims) == 1
    victims[0].kill()
    assert airflow.wait_for_run(run["dag_run_id"], timeout_s=600) == "success"
    status, ti = airflow.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/local_pool_stage1/0")
    assert status == 200 and ti["try_number"] >= 2, ti
    out = open_volume(spec["output"]["url"], 0).read(job.roi)
    assert np.abs(out - reference_pass(job)).max() <= 1e-5
