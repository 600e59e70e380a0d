"""The chunk progress view: a FastAPI app the Airflow api-server mounts at ``/chunkflow``.

Pages (shown in the Airflow UI as a tab of each run and of the DAG, see ``plugin.py``):

    /runs/{dag_id}/{run_id}                 the run's progress (HTML; polls the JSON below)
    /runs/{dag_id}/{run_id}/report          the run's report.html (its picture inlined; no scripts)
    /runs/{dag_id}/{run_id}/neuroglancer/L  L = input, output or segmentation: the hosted
                                            Neuroglancer, or how to view a local layer
    /dags/{dag_id}                          the DAG's recent runs, each with its progress
    /api/runs/{dag_id}/{run_id}/progress    JSON: chunk_ops.run_progress.RunProgress.look
    /api/runs/{dag_id}/{run_id}/redrive     POST: dead letters back on their queues

A run is found through its ``prepare`` task's XComs (spec, queue, connection) and its
``prepare_post`` XComs (the post-processing stages).  Access is Airflow's: the UI's
session cookie or a bearer token, checked with the api-server's own DAG permissions
(read the run to look, edit it to redrive).  The redrive POST also needs a header a
cross-site form cannot send, so a page elsewhere cannot make a logged-in browser redrive.
"""

from __future__ import annotations

import base64
import html
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.models.xcom import XComModel

PAGE = (Path(__file__).with_name("progress_view.html")).read_text()
REDRIVE_HEADER = "X-Chunkflow-Redrive"
# the stage sensors' drains in the DAG, by stage: their pool tasks are cleared after a redrive
DRAINS = {1: "stage1", 2: "stage2", 3: "post1", 4: "post1", 6: "post1", 5: "post2"}
KEPT_RUNS = 16  # runs whose progress state (watches, done cells) stays in memory

# no /docs or /openapi.json: every route here needs a login, the API's description too
app = FastAPI(title="chunk_ops progress", docs_url=None, redoc_url=None, openapi_url=None)
can_read = Depends(requires_access_dag("GET", DagAccessEntity.RUN))
can_edit = Depends(requires_access_dag("PUT", DagAccessEntity.RUN))
can_clear = Depends(requires_access_dag("PUT", DagAccessEntity.TASK_INSTANCE))  # the redrive restarts tasks

_runs: OrderedDict[tuple[str, str], Any] = OrderedDict()
_runs_lock = threading.Lock()


def _xcoms(session, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    rows = session.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id)).all()
    return {row.key: XComModel.deserialize_value(row) for row in rows}


def _run_info(session, dag_id: str, run_id: str) -> dict:
    run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if run is None:
        raise HTTPException(404, f"no run {run_id!r} of DAG {dag_id!r}")
    info = _xcoms(session, dag_id, run_id, "prepare")
    if "spec_url" not in info:
        raise HTTPException(409, f"run {run_id!r} has no prepared job yet (its prepare task has not succeeded; "
                                 f"state {run.state})")
    post = _xcoms(session, dag_id, run_id, "prepare_post")
    post_stages = {*post.get("phase1", []), *post.get("phase2", [])}
    if post_stages & {4, 5}:  # the phases name the stages that end them: blockwise labels (3) come first
        post_stages.add(3)
    return {"state": str(run.state), "spec_url": info["spec_url"], "queue_url": info["queue_url"],
            "aws_conn_id": info.get("aws_conn_id"), "post_stages": sorted(post_stages)}


def _progress(dag_id: str, run_id: str, info: dict):
    """The run's RunProgress, kept between looks (the last ``KEPT_RUNS`` runs)."""
    from chunk_ops.job import Job
    from chunk_ops.run_progress import RunProgress
    from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook

    key = (dag_id, run_id, info["spec_url"], info["queue_url"])  # a cleared run may prepare another job
    with _runs_lock:
        progress = _runs.get(key)
    if progress is None:  # opened outside the lock: a slow store holds up only this run's view
        try:
            job = Job.from_spec_url(info["spec_url"])
            queues = ChunkQueueHook(info["queue_url"], info["aws_conn_id"]).get_queues()
        except ValueError as e:  # e.g. no queue yet: prepared, not enqueued
            raise HTTPException(409, f"run {run_id!r} cannot be followed yet: {e}") from None
        with _runs_lock:
            progress = _runs.setdefault(key, RunProgress(job, queues, [1, 2]))
            while len(_runs) > KEPT_RUNS:
                _runs.popitem(last=False)
    with _runs_lock:
        _runs.move_to_end(key)
    progress.add_stages(info["post_stages"])
    return progress


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=[can_read])
def run_page(dag_id: str, run_id: str) -> str:
    return PAGE.replace("{{DAG_ID}}", html.escape(dag_id)).replace("{{RUN_ID}}", html.escape(run_id))


@app.get("/api/runs/{dag_id}/{run_id}/progress", dependencies=[can_read])
def run_progress(dag_id: str, run_id: str, session: SessionDep, z: int | None = None,
                 stage: int | None = None) -> dict:
    info = _run_info(session, dag_id, run_id)
    look = _progress(dag_id, run_id, info).look(z=z, map_stage=stage)
    return {"dag_id": dag_id, "run_id": run_id, "run_state": info["state"], **look}


@app.post("/api/runs/{dag_id}/{run_id}/redrive", dependencies=[can_edit, can_clear])
def redrive(dag_id: str, run_id: str, session: SessionDep,
            x_chunkflow_redrive: Annotated[str | None, Header()] = None) -> dict:
    """Move this run's dead letters (its job's; a queue may be shared) back onto their
    queues with a fresh receive count.  Where a stage has no worker task alive any more,
    name its pool tasks to clear (with everything after them) so workers come for the
    letters: the page asks Airflow's REST API to clear those, as a user clearing tasks
    would.  Where workers are still alive, they take the letters themselves."""
    from airflow.models.taskinstance import TaskInstance
    from chunk_ops.task import Task

    if x_chunkflow_redrive != "1":
        raise HTTPException(403, f"a redrive needs the header {REDRIVE_HEADER}: 1 (sent by the progress page)")
    info = _run_info(session, dag_id, run_id)
    progress = _progress(dag_id, run_id, info)
    stages: set[int] = set()

    def ours(body: str) -> bool:
        try:
            task = Task.from_json(body)
        except ValueError:
            return False  # unreadable: it would only die again
        if task.job_id != progress.job.id:
            return False
        stages.add(task.stage)
        return True

    moved = progress.queues.redrive(ours)
    states = dict(session.execute(select(TaskInstance.task_id, TaskInstance.state).where(
        TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)).all())
    alive = {"running", "queued", "scheduled", "deferred", "up_for_retry", "up_for_reschedule", "restarting"}
    clear, live = [], []
    for drain in sorted({DRAINS[s] for s in stages}):
        workers = [t for t in states if t.endswith(f"_pool_{drain}") and not t.startswith("size_")]
        given_up = str(states.get(f"{drain}_done")) in ("failed", "upstream_failed")  # the run must restart
        if any(str(states[t]) in alive for t in workers) and not given_up:
            live.append(drain)
        else:
            clear += sorted(t for t in states if t.startswith("size_") and t.endswith(f"_pool_{drain}"))
    return {"moved": sum(moved.values()), "by_queue": {str(k): v for k, v in moved.items()},
            "stages": sorted(stages), "clear_task_ids": clear, "live": live}


@app.get("/runs/{dag_id}/{run_id}/report", response_class=HTMLResponse, dependencies=[can_read])
def report_page(dag_id: str, run_id: str, session: SessionDep) -> HTMLResponse:
    from chunk_ops.job import Job
    from cloudfiles import CloudFiles

    job = Job.from_spec_url(_run_info(session, dag_id, run_id)["spec_url"])
    files = CloudFiles(job.job_url)
    page = files.get("report.html")
    if page is None:
        return HTMLResponse(f"<p>Run {html.escape(run_id)} has no report yet: it is written by the run's last task "
                            f"(<code>report</code>) next to the output, under <code>{html.escape(job.job_url)}</code>.</p>")
    # The file comes from the output's storage, which others may write: it is shown with no
    # script and no origin of its own (CSP sandbox), its picture inlined.
    picture = files.get("report.png") or b""
    inline = f'src="data:image/png;base64,{base64.b64encode(picture).decode()}"'
    return HTMLResponse(page.decode(errors="replace").replace("src=report.png", inline), headers={
        "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff"})


@app.get("/runs/{dag_id}/{run_id}/neuroglancer/{layer}", response_model=None, dependencies=[can_read])
def neuroglancer(dag_id: str, run_id: str, layer: str, session: SessionDep) -> RedirectResponse | HTMLResponse:
    from chunk_ops.job import Job
    from chunk_ops.report import NEUROGLANCER, hosted_link, job_layers
    from chunk_ops.view import browser_readable, local_viewer_url, view_command

    job = Job.from_spec_url(_run_info(session, dag_id, run_id)["spec_url"])
    layers = {found.name: (found, url) for found, url in job_layers(job)}
    if layer not in layers:
        raise HTTPException(404, f"this run has no {layer!r} layer; it has {sorted(layers)}")
    found, url = layers[layer]
    if browser_readable(url):
        return RedirectResponse(hosted_link([found], job.input.resolution, job.roi))
    return HTMLResponse(
        f"<p>The {html.escape(layer)} layer, <code>{html.escape(url)}</code>, is on this machine's disk: the "
        f"hosted Neuroglancer ({NEUROGLANCER}) cannot read it. Run</p><pre>{html.escape(view_command([url]))}</pre>"
        f"<p>where the data is, then open <a href='{local_viewer_url()}'>{local_viewer_url()}</a>.</p>")


@app.get("/dags/{dag_id}", response_class=HTMLResponse, dependencies=[can_read])
def dag_page(dag_id: str, session: SessionDep) -> str:
    runs = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id)
                           .order_by(DagRun.id.desc()).limit(25)).all()
    rows = "".join(
        f"<tr><td><a href='../runs/{quote(dag_id, safe='')}/{quote(r.run_id, safe='')}'>{html.escape(r.run_id)}</a></td>"
        f"<td>{html.escape(str(r.state))}</td><td>{r.start_date or ''}</td></tr>" for r in runs)
    return (f"<!doctype html><title>{html.escape(dag_id)}: chunk progress</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:16px}td,th{padding:4px 10px;text-align:left}</style>"
            f"<h2>Chunk progress of {html.escape(dag_id)}'s runs</h2><table><tr><th>run</th><th>state</th>"
            f"<th>started</th></tr>{rows or '<tr><td colspan=3>no runs yet</td></tr>'}</table>")
