"""Run notifications (plugins/chunkflow_airflow/notifiers.py): a real `airflow standalone` whose
Slack webhook and SMTP connections point at receivers started here, and the notifier alone."""

from __future__ import annotations

import email
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest

from scripts.airflow_local import DAG_ID
from tests.conftest import free_port
from tests.dags.browser import standalone

RECIPIENT = "ops@lab.example"


class Webhook:
    """A Slack incoming webhook stand-in on a local port: keeps every POST's JSON body, answers ok."""

    def __init__(self):
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T0/B0/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts_with(self, needle: str) -> list[str]:
        return [p["text"] for p in list(self.posts) if needle in p.get("text", "")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Inbox:
    """An SMTP server on a local port (aiosmtpd) keeping every message's text."""

    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list[dict] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_DATA(self, server, session, envelope) -> str:
        message = email.message_from_bytes(envelope.content)
        body = "".join(part.get_payload(decode=True).decode() for part in message.walk()
                       if part.get_content_type() == "text/html")
        self.messages.append({"to": envelope.rcpt_tos, "subject": message["Subject"], "body": body})
        return "250 OK"

    def with_(self, needle: str) -> list[dict]:
        return [m for m in list(self.messages) if needle in m["subject"] + m["body"]]

    def close(self) -> None:
        self.controller.stop()


def slack_conn(url: str) -> str:
    return json.dumps({"conn_type": "slackwebhook", "password": url})


def smtp_conn(port: int, **extra) -> str:
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "extra": {"to": [RECIPIENT], "from_email": "chunkflow@lab.example",
                                 "disable_ssl": True, "disable_tls": True, **extra}})


def wait_for(found, timeout_s: float, settle_s: float) -> list:
    """``found()`` once it is non-empty, and again ``settle_s`` later (to catch a second copy)."""
    deadline = time.time() + timeout_s
    while not found():
        assert time.time() < deadline, f"nothing arrived within {timeout_s}s"
        time.sleep(1)
    time.sleep(settle_s)
    return found()


def minimal_context(run_id: str) -> dict:
    """What Airflow 3 gives a DAG callback when the run has no task instance to describe."""
    from airflow.sdk import DAG

    return {"dag": DAG(DAG_ID), "run_id": run_id, "reason": "task_failure"}


# --- the notifier alone ------------------------------------------------------------------------
@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


def test_connections_turned_off_by_config_send_nothing(airflow_db, webhook, monkeypatch):
    from chunkflow_airflow.notifiers import RunNotifier

    monkeypatch.setenv("AIRFLOW_CONN_CHUNKFLOW_SLACK", slack_conn(webhook.url))
    monkeypatch.setenv("AIRFLOW__CHUNKFLOW__NOTIFY_SLACK_CONN_ID", "")
    RunNotifier()(minimal_context("manual__off"))
    monkeypatch.delenv("AIRFLOW__CHUNKFLOW__NOTIFY_SLACK_CONN_ID")
    RunNotifier()(minimal_context("manual__on"))  # the same connection, not turned off: sent
    assert [p["text"].splitlines()[0] for p in webhook.posts] == [f"{DAG_ID} run manual__on: failed (task_failure)"]


def test_a_receiver_that_never_answers_costs_one_timeout_and_breaks_nothing(airflow_db, monkeypatch, capsys):
    from chunkflow_airflow.notifiers import RunNotifier

    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("AIRFLOW_CONN_CHUNKFLOW_SLACK", slack_conn(f"http://127.0.0.1:{silent.getsockname()[1]}/x"))
        monkeypatch.setenv("AIRFLOW_CONN_CHUNKFLOW_SMTP", smtp_conn(free_port()))  # nobody listens
        started = time.time()
        RunNotifier(timeout_s=2)(minimal_context("manual__silent"))  # raises nothing
        assert time.time() - started < 10
    out = capsys.readouterr().out
    assert "run notification by slack (chunkflow_slack) failed: TimeoutError" in out
    assert "run notification by email (chunkflow_smtp) failed: ConnectionRefusedError" in out


def test_without_connections_a_run_ends_as_it_would(dagbag, make_spec, capsys):
    """dag.test() runs the DAG's callbacks in this process: with no connection the notifier
    says so in one line, sends nothing and the run ends as it would."""
    spec = make_spec(output="quiet")
    spec["chunk_sise"] = [64, 64, 8]
    run = dagbag.get_dag(DAG_ID).test(run_conf=spec)
    assert run.state == "failed"
    lines = [line for line in capsys.readouterr().out.splitlines() if "run notification" in line]
    assert len(lines) == 1, lines
    assert "slack off (no connection 'chunkflow_slack'); email off (no connection 'chunkflow_smtp')" in lines[0]


def test_a_message_names_the_cause_apart_from_tasks_that_failed_after_it(dagbag):
    from chunkflow_airflow.notifiers import RunOutcome, split_failures

    dag = dagbag.get_dag(DAG_ID)
    # as the execution API names them: a mapped task instance is <task_id>_<map_index>
    causes, after = split_failures(["stage1_done", "validate", "local_pool_stage1_0"], dag)
    assert causes == ["validate"] and after == ["local_pool_stage1[0]", "stage1_done"]
    outcome = RunOutcome(DAG_ID, "manual__1", "failed", "task_failure", "http://ui/dags/d/runs/manual__1")
    assert outcome.task_url("local_pool_stage1[0]") == "http://ui/dags/d/runs/manual__1/tasks/local_pool_stage1/mapped/0"


# --- a real Airflow --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def receivers():
    hook, inbox = Webhook(), Inbox()
    try:
        yield hook, inbox
    finally:
        hook.close()
        inbox.close()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, receivers):
    hook, inbox = receivers
    port = free_port()
    with standalone(tmp_path_factory.mktemp("airflow-notify"), port=port, extra_env={
        "AIRFLOW_CONN_CHUNKFLOW_SLACK": slack_conn(hook.url),
        "AIRFLOW_CONN_CHUNKFLOW_SMTP": smtp_conn(inbox.port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
    }) as local:
        yield local


@pytest.fixture(scope="module")
def started() -> dict[str, str]:
    return {}


@pytest.fixture
def runs(airflow, make_spec, started) -> dict[str, str]:
    """One failing and one successful run, triggered together by the first test that asks
    (they overlap on two cores); their run ids."""
    if not started:
        failing = make_spec(output="typo")
        failing["chunk_sise"] = [64, 64, 8]  # unknown key: validate fails, nothing is written
        good = make_spec(output="notified")
        good["workers"] = {"local": 1, "idle_exit_s": 2}
        for name, spec in (("failed", failing), ("success", good)):
            status, run = airflow.trigger(spec)
            assert status == 200, run
            started[name] = run["dag_run_id"]
    return started


def test_a_failing_run_posts_once_with_the_run_id_and_the_failing_task(airflow, runs, receivers):
    hook, inbox = receivers
    run_id = runs["failed"]
    assert airflow.wait_for_run(run_id, timeout_s=300) == "failed"
    texts = wait_for(lambda: hook.texts_with(run_id), timeout_s=120, settle_s=15)
    assert len(texts) == 1, texts
    text = texts[0]
    print(text)  # what a failure message looks like, in the test's output
    assert text.splitlines()[0] == f"{DAG_ID} run {run_id}: failed (task_failure)"
    # the cause alone, with its log page (sensors that ran after it anyway are listed apart)
    causes = [line for line in text.splitlines() if line.startswith("failed task: ")]
    assert len(causes) == 1 and causes[0].startswith("failed task: validate  "), text
    assert causes[0].endswith(f"/dags/{DAG_ID}/runs/{quote(run_id, safe='')}/tasks/validate"), text
    assert f"run: {airflow.url}/dags/{DAG_ID}/runs/" in text
    mails = wait_for(lambda: inbox.with_(run_id), timeout_s=30, settle_s=0)
    assert len(mails) == 1 and mails[0]["to"] == [RECIPIENT] and "failed task: validate" in mails[0]["body"]


def test_a_successful_run_posts_once_with_its_summary_and_links(airflow, runs, receivers):
    hook, inbox = receivers
    run_id = runs["success"]
    assert airflow.wait_for_run(run_id, timeout_s=600) == "success"
    status, xcom = airflow.request(
        "GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/report/xcomEntries/return_value")
    assert status == 200, xcom
    report = xcom["value"] if isinstance(xcom["value"], dict) else json.loads(xcom["value"])
    texts = wait_for(lambda: hook.texts_with(run_id), timeout_s=120, settle_s=10)
    assert len(texts) == 1, texts
    text = texts[0]
    print(text)
    assert text.splitlines()[0] == f"{DAG_ID} run {run_id}: success"
    assert f"job {report['job_id']}: {report['chunks']} chunks, {report['voxels']:,} voxels" in text
    assert "0 dead letters" in text and "failed task" not in text
    assert f"report: {report['reports']['report.html']}" in text
    assert f"run: {airflow.url}/dags/{DAG_ID}/runs/" in text
    assert len(inbox.with_(run_id)) == 1
