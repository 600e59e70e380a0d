"""Run notifications: one message per finished run, to Slack and/or email, off by default.

``RunNotifier`` is a DAG-level ``on_success_callback`` / ``on_failure_callback``. Airflow
calls it once per run that ends (in the DAG processor, not in a task), so a failed run
gives one message however many tasks failed or retried. It sends only through the
connections that exist:

    [chunkflow] notify_slack_conn_id   default chunkflow_slack  (conn type slackwebhook)
    [chunkflow] notify_smtp_conn_id    default chunkflow_smtp   (conn type smtp; recipients
                                       in the extra: {"to": ["a@lab.org", ...]})

(``AIRFLOW__CHUNKFLOW__NOTIFY_SLACK_CONN_ID``, ...; an empty value turns a channel off.)
A missing connection is one log line; a broken one or an unreachable receiver is an error
in the log after at most the connection's ``timeout`` (default 10 s), never a failed or
hung run, and nothing is resent. See docs/notifications.md.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
from airflow.providers.smtp.hooks.smtp import SmtpHook
from airflow.sdk import BaseHook, BaseNotifier, Connection, conf
from airflow.sdk.exceptions import AirflowNotFoundException

from chunkflow_airflow.links import airflow_url

SLACK_CONN_ID = "chunkflow_slack"
SMTP_CONN_ID = "chunkflow_smtp"
TIMEOUT_S = 10  # per request, unless the connection's extra sets "timeout"
SUMMARY_TASKS = ("report", "finish")  # whose XCom is the run's summary, the fuller first
MAX_LISTED = 5  # failed tasks named with a link; the rest are counted


@dataclass(frozen=True)
class RunOutcome:
    """What a message says about a finished run."""

    dag_id: str
    run_id: str
    state: str  # success | failed
    reason: str  # Airflow's: success, task_failure, all_tasks_deadlocked
    run_url: str
    failed_tasks: list[str] = field(default_factory=list)  # the causes: "task" or "task[map index]"
    failed_after: list[str] = field(default_factory=list)  # failed because a cause did
    output: str = ""  # the job's output layer
    summary: dict = field(default_factory=dict)  # the report (or finish) task's XCom

    @property
    def title(self) -> str:
        reason = "" if self.state == self.reason else f" ({self.reason})"
        return f"{self.dag_id} run {self.run_id}: {self.state}{reason}"

    def text(self) -> str:
        lines = [self.title]
        for task in self.failed_tasks[:MAX_LISTED]:
            lines.append(f"failed task: {task}  {self.task_url(task)}")
        if len(self.failed_tasks) > MAX_LISTED:
            lines.append(f"and {len(self.failed_tasks) - MAX_LISTED} more failed tasks")
        if self.failed_after:
            more = len(self.failed_after) - MAX_LISTED
            lines.append("then failed: " + ", ".join(self.failed_after[:MAX_LISTED])
                         + (f" and {more} more" if more > 0 else ""))
        if self.output:
            lines.append(f"output: {self.output}")
        lines += summary_lines(self.summary)
        lines.append(f"chunk progress: {self.run_url}/plugin/chunk_progress_run")  # the plugin's tab (dead letters)
        lines.append(f"run: {self.run_url}")
        return "\n".join(lines)

    def task_url(self, task: str) -> str:
        """The task instance's page in the Airflow UI (its log)."""
        task_id, _, index = task.rstrip("]").partition("[")
        return f"{self.run_url}/tasks/{task_id}" + (f"/mapped/{index}" if index else "")


def summary_lines(report: dict) -> list[str]:
    """The run's numbers and links from a ``RunReport.to_dict()`` (chunk_ops/stages.py)."""
    if not report:
        return []
    rate = report.get("voxels_per_s")
    lines = [
        f"job {report.get('job_id')}: {report.get('chunks')} chunks, {report.get('voxels', 0):,} voxels"
        + (f" in {report['wall_s']:.1f} s" if report.get("wall_s") else "")
        + (f" ({per_second(rate)})" if rate else "")
        + (f", amplification {report['amplification']:.2f}" if "amplification" in report else "")
        + f", {report.get('dead_letters', 0)} dead letters, {report.get('redeliveries', 0)} redeliveries"
    ]
    segmentation = report.get("segmentation") or {}
    if "segments" in segmentation:
        lines.append(f"segmentation: {segmentation['segments']} segments in {segmentation.get('url', '?')}")
    if report.get("pyramid_chunks"):
        lines.append(f"pyramid: {len(report['pyramid_chunks'])} levels")
    if (report.get("reports") or {}).get("report.html"):
        lines.append(f"report: {report['reports']['report.html']}")
    if report.get("neuroglancer"):
        lines.append(f"view: {report['neuroglancer']}")
    return lines


def per_second(voxels_per_s: float) -> str:
    """A throughput with an SI prefix: 808 voxel/s, 2.4 Mvoxel/s."""
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if voxels_per_s >= scale:
            return f"{voxels_per_s / scale:.3g} {prefix}voxel/s"
    return f"{voxels_per_s:.3g} voxel/s"


def run_url(dag_id: str, run_id: str) -> str:
    """The run's page in the Airflow UI (``[api] base_url``, as Airflow's own log links)."""
    return airflow_url(f"/dags/{dag_id}/runs/{quote(run_id, safe='')}", absolute=True)


class RunNotifier(BaseNotifier):
    """Tells Slack and/or email that a run ended: its id, state, failed tasks, summary and links.

    Connection ids default to ``[chunkflow] notify_slack_conn_id`` / ``notify_smtp_conn_id``,
    read when the callback runs, so a connection added later needs no DAG change.
    """

    def __init__(self, *, slack_conn_id: str | None = None, smtp_conn_id: str | None = None,
                 timeout_s: int = TIMEOUT_S):
        super().__init__()
        self.slack_conn_id, self.smtp_conn_id, self.timeout_s = slack_conn_id, smtp_conn_id, timeout_s

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Nothing to render. BaseNotifier's rendering would fail under dag.test(), whose DAG
        callbacks get a SerializedDAG without get_template_env (apache/airflow#64649, 3.3.2)."""

    def notify(self, context: Any) -> None:
        senders = {"slack": self.send_slack, "email": self.send_email}
        wanted = {
            "slack": self.slack_conn_id if self.slack_conn_id is not None
            else conf.get("chunkflow", "notify_slack_conn_id", fallback=SLACK_CONN_ID),
            "email": self.smtp_conn_id if self.smtp_conn_id is not None
            else conf.get("chunkflow", "notify_smtp_conn_id", fallback=SMTP_CONN_ID),
        }
        channels, off = {}, []
        for name, conn_id in wanted.items():
            conn = self.connection(conn_id) if conn_id else None
            if conn is None:
                off.append(f"{name} off (no connection {conn_id!r})" if conn_id else f"{name} off")
            else:
                channels[name] = conn
        self.log.info("run notifications: %s", "; ".join([f"{n} via {c.conn_id}" for n, c in channels.items()]
                                                          + off))
        if not channels:
            return
        outcome = self.outcome(context)
        for name, conn in channels.items():
            try:  # one channel's failure neither stops the other nor reaches Airflow
                senders[name](conn, outcome)
                self.log.info("run notification sent by %s (%s): %s", name, conn.conn_id, outcome.title)
            except Exception as e:
                self.log.error("run notification by %s (%s) failed: %s: %s", name, conn.conn_id,
                               type(e).__name__, e)

    def connection(self, conn_id: str) -> Connection | None:
        """The connection, or None when it does not exist (or cannot be read: logged)."""
        try:
            return BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            return None
        except Exception as e:
            self.log.error("reading connection %r failed: %s: %s", conn_id, type(e).__name__, e)
            return None

    def outcome(self, context: Any) -> RunOutcome:
        """The run from the callback's context: Airflow 3 gives the last failed (or, on success,
        the last succeeded) task instance's context plus ``reason``, or only ``dag``, ``run_id``
        and ``reason`` when there is no such task; the rest comes through the execution API."""
        dag_run = context.get("dag_run")
        dag = context.get("dag")
        dag_id = dag_run.dag_id if dag_run is not None else dag.dag_id
        run_id = context.get("run_id") or dag_run.run_id
        reason = context.get("reason") or ""
        state = "success" if reason == "success" else "failed"
        run_conf = (dag_run.conf or {}) if dag_run is not None else {}
        # the form's flat field, or the nested spec's (utils/params.py)
        output = run_conf.get("output_url") or (run_conf.get("output") or {}).get("url", "")
        states = self.task_states(dag_id, run_id)
        failed: list[str] = []
        if state == "failed" and states is not None:
            failed = [key for key, task_state in states.items() if task_state == "failed"]
        elif state == "failed" and context.get("ti") is not None:  # the last task that failed
            failed = [context["ti"].task_id]
        causes, after = split_failures(failed, dag)
        return RunOutcome(dag_id=dag_id, run_id=run_id, state=state, reason=reason, run_url=run_url(dag_id, run_id),
                          failed_tasks=causes, failed_after=after, output=output,
                          summary=self.summary(dag_id, run_id, states))

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str] | None:
        """{task id (mapped: ``<task_id>_<map_index>``): state} of the run, None if unavailable."""
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        try:
            return RuntimeTaskInstance.get_task_states(dag_id=dag_id, run_ids=[run_id]).get(run_id, {})
        except Exception as e:
            self.log.warning("task states of %s unavailable: %s: %s", run_id, type(e).__name__, e)
            return None

    def summary(self, dag_id: str, run_id: str, states: dict[str, str] | None) -> dict:
        """The report task's XCom, else finish's (a run that failed after finish), else {};
        only tasks that succeeded are asked (a missing XCom is an error in Airflow's log)."""
        from airflow.sdk.execution_time.xcom import XCom

        for task_id in SUMMARY_TASKS:
            if states is not None and states.get(task_id) != "success":
                continue
            try:
                value = XCom.get_one(key="return_value", dag_id=dag_id, task_id=task_id, run_id=run_id,
                                     map_index=-1)
            except Exception as e:
                self.log.warning("XCom of %s in %s unavailable: %s: %s", task_id, run_id, type(e).__name__, e)
                return {}
            if isinstance(value, dict) and value:
                return value
        return {}

    def timeout(self, conn: Connection) -> int:
        return int(conn.extra_dejson.get("timeout", self.timeout_s))

    def send_slack(self, conn: Connection, outcome: RunOutcome) -> None:
        # The provider's hook, not its SlackWebhookNotifier: that one renders the text as a Jinja
        # template. No retry handlers: a retry after a lost reply would post twice.
        hook = SlackWebhookHook(slack_webhook_conn_id=conn.conn_id, timeout=self.timeout(conn), retry_handlers=[])
        hook.send(text=slack_escape(outcome.text()), unfurl_links=False, unfurl_media=False)

    def send_email(self, conn: Connection, outcome: RunOutcome) -> None:
        to = conn.extra_dejson.get("to")
        if not to:
            raise ValueError(f'connection {conn.conn_id!r} names no recipients: set its extra {{"to": [...]}}')
        with _BoundedSmtpHook(smtp_conn_id=conn.conn_id, default_timeout_s=self.timeout_s) as hook:
            hook.send_email_smtp(to=to, subject=f"[chunkflow] {outcome.title}",
                                 html_content=f"<pre>{html.escape(outcome.text())}</pre>")


class _BoundedSmtpHook(SmtpHook):
    """The provider's SMTP hook with a short default timeout and no resend (its default:
    30 s, 5 resends; a resend after a lost reply would deliver the message twice). The
    connection's extra ``timeout`` and ``retry_limit`` still win."""

    def __init__(self, *, smtp_conn_id: str, default_timeout_s: int):
        super().__init__(smtp_conn_id=smtp_conn_id)
        self.default_timeout_s = default_timeout_s

    @property
    def timeout(self) -> int:
        return int(self.conn.extra_dejson.get("timeout", self.default_timeout_s))

    @property
    def smtp_retry_limit(self) -> int:
        return int(self.conn.extra_dejson.get("retry_limit", 0))


def slack_escape(text: str) -> str:
    """Slack reads <, > and & as markup (https://api.slack.com/reference/surfaces/formatting#escaping)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def split_failures(keys: list[str], dag: Any) -> tuple[list[str], list[str]]:
    """Failed task instances (as the execution API names them) as ``task`` / ``task[i]``, split
    into causes (no upstream task failed) and those that failed after them (a sensor with
    trigger rule all_done whose inputs were never made). Without the DAG all are causes."""
    task_ids = set(dag.task_ids) if dag is not None else set()
    names = sorted(_ti_name(key, task_ids) for key in keys)
    failed_ids = {name.partition("[")[0] for name in names}

    def after_a_failure(name: str) -> bool:
        try:
            return bool(dag.get_task(name.partition("[")[0]).get_flat_relative_ids(upstream=True) & failed_ids)
        except Exception:  # no DAG, or a task no longer in it
            return False

    after = [name for name in names if after_a_failure(name)]
    return [name for name in names if name not in after], after


def _ti_name(key: str, task_ids: set[str]) -> str:
    """The execution API names a mapped task instance ``<task_id>_<map_index>``: ``task[i]``."""
    task_id, _, index = key.rpartition("_")
    return f"{task_id}[{index}]" if key not in task_ids and task_id in task_ids and index.isdigit() else key
