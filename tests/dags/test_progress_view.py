"""The chunk progress view in a real `airflow standalone`, driven by headless Chromium.

One run is watched from start to end: chunks move from waiting to done and the map
fills; a chunk whose input block is missing is dead-lettered with its error shown; the
block is put back, the Redrive button brings the dead letters back, and the run completes.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from scripts.airflow_local import DAG_ID
from tests.dags.browser import logged_in_page, standalone

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
MISSING = "32-40_0-16_8-12"  # an input block of the sample layer (16 x 16 x 4 blocks on 40 x 36 x 12)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    with standalone(tmp_path_factory.mktemp("airflow-home")) as local:
        yield local


@pytest.fixture
def browser_page(airflow):
    with logged_in_page(airflow, height=1300) as page:
        yield page


def _stage_row(page, stage: int) -> tuple[str, int, int]:
    row = page.locator(f"#stages tr[data-stage='{stage}']")
    done, total = (int(v) for v in row.locator("td.done").inner_text().split("/"))
    return row.locator("td.state").inner_text(), done, total


def _cells(page) -> dict[str, int]:
    return {state: page.locator(f"#map .cell.{state}").count() for state in ("done", "notdone", "dead")}


def test_progress_view_follows_a_run_and_its_redrive_brings_a_dead_chunk_back(airflow, browser_page, make_spec):
    from chunk_ops.job import Job

    page = browser_page
    spec = make_spec(net_kwargs={"in_channels": 1, "out_channels": 1, "delay_s": 0.25}, output="watched")
    spec["workers"] = {"local": 1, "idle_exit_s": 5}
    spec["queue"] = {"max_receives": 2}
    image = Path(spec["input"]["url"].removeprefix("file://"))
    (block,) = image.glob(f"*/{MISSING}*")
    hidden = block.with_name("hidden-" + block.name)
    block.rename(hidden)  # the input is incomplete: the chunks that read this block fail until it is back
    status, run = airflow.trigger(spec)
    assert status == 200, run
    run_id = run["dag_run_id"]

    # the run's tab in the Airflow UI holds the view
    page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{run_id}", wait_until="networkidle")
    page.get_by_text("Chunk progress", exact=True).first.click()
    page.wait_for_url("**/plugin/chunk_progress_run", timeout=30_000)
    frame = page.frame_locator("iframe").first
    frame.locator("#stages tr[data-stage='1']").wait_for(timeout=180_000)
    assert run_id in frame.locator("body").inner_text()
    # and the run's tasks link to it, to the report and to Neuroglancer
    status, links = airflow.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/enqueue_stage1/links")
    assert status == 200, links
    assert set(links["extra_links"]) == {"Chunk progress", "Run report", "Neuroglancer: input",
                                         "Neuroglancer: output", "Neuroglancer: segmentation"}
    assert links["extra_links"]["Chunk progress"].startswith("/chunkflow/runs/chunkflow_inference/")

    page.goto(f"{airflow.url}/chunkflow/runs/{DAG_ID}/{run_id}", wait_until="networkidle")
    page.locator("#stages tr[data-stage='1']").wait_for(timeout=180_000)
    page.locator("#z-down").click()  # hold the map at the first z row (it follows the work otherwise)
    page.wait_for_function("document.getElementById('map-title').textContent.includes('z row 1 of 3') && "
                           "!document.getElementById('map-title').textContent.includes('following')")
    seen, filled = [], []
    deadline = time.time() + 300
    while time.time() < deadline:
        state, done, total = _stage_row(page, 1)
        cells = _cells(page)
        if not seen or (done, cells["done"]) != (seen[-1], filled[-1]):
            seen.append(done)
            filled.append(cells["done"])
        if 0 < done < total and len(seen) == 3:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "progress_view.png"), full_page=True)
        queue = page.locator("#queues tr[data-queue='network']")
        if page.locator("#dead tbody tr").count() and queue.locator("td.waiting").inner_text() == "0" \
                and queue.locator("td.leased").inner_text() == "0":
            break  # what could be done is done; the rest is dead-lettered
        time.sleep(0.5)
    assert total == 27
    assert seen == sorted(seen) and len(set(seen)) >= 3, f"done counts seen: {seen}"  # chunks moved to done
    assert filled == sorted(filled) and filled[-1] > filled[0], f"done cells seen: {filled}"  # the map filled

    # the dead letters, each with the error that killed it
    page.locator("#dead tbody tr").first.wait_for(timeout=120_000)
    dead_text = page.locator("#dead").inner_text()
    assert MISSING in dead_text or "missing" in dead_text.lower(), dead_text
    for _ in range(2):  # to the last z row, where a chunk reading the missing block lies
        page.locator("#z-up").click()
    page.wait_for_function("document.getElementById('map-title').textContent.includes('z row 3 of 3')")
    page.wait_for_function("document.querySelectorAll('#map .cell.dead').length >= 1", timeout=10_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "progress_view_dead_letters.png"), full_page=True)
    assert airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")[1]["state"] in ("running", "failed")

    hidden.rename(block)  # the fix
    page.locator("#redrive").click()
    page.wait_for_function("document.getElementById('message').textContent.startsWith('redrove')", timeout=60_000)
    message = page.locator("#message").inner_text()
    # its workers restarted (cleared), or, if the stage's worker was still about, taken by it
    assert re.search(r"redrove [1-9]\d* dead letter", message), message
    assert "cleared size_local_pool_stage1" in message or "stage1 are still running" in message, message
    assert airflow.wait_for_run(run_id, timeout_s=600) == "success"

    job = Job.open(spec)
    assert job.done_mask(1).all() and job.done_mask(2).all()
    page.reload(wait_until="networkidle")
    page.wait_for_function("document.querySelectorAll('#map .cell.done').length > 0", timeout=30_000)
    assert _cells(page)["dead"] == 0 and page.locator("#dead tbody tr").count() == 0
    assert _stage_row(page, 1)[1:] == (27, 27)
    # the run's links: the report (no scripts, its picture inlined) and how to view local layers
    from urllib.parse import quote

    run_page = f"{airflow.url}/chunkflow/runs/{DAG_ID}/{quote(run_id, safe='')}"
    response = page.goto(f"{run_page}/report")
    assert response.ok and response.headers["content-security-policy"].startswith("sandbox")
    assert job.id in page.inner_text("body") and page.locator("img[src^='data:image/png;base64,']").count() == 1
    page.goto(f"{run_page}/neuroglancer/output")
    assert "chunk-ops view" in page.inner_text("body")  # file:// layers: the hosted viewer cannot read them


def test_the_local_api_server_listens_on_this_machine_only(airflow):
    import psutil

    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == airflow.port}
    assert listening == {"127.0.0.1"}, listening
