"""The embedded default, end to end: `airflow standalone` on this machine, a job through the REST API.

    python scripts/airflow_local.py demo [--workdir demo] [--port 8080]
    python scripts/airflow_local.py stop [--workdir demo]

makes the sample volume, the demo network and a job spec, starts ``airflow standalone``
in the background (SQLite, LocalExecutor, embedded queue, local worker pool), triggers
``chunkflow_inference`` through the REST API, shows progress until the run ends, and
prints the UI address, the output, the report, and the command that stops Airflow.
The same helpers start and drive Airflow in the REST and web-UI tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "chunkflow_inference"


def airflow_env(home: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a local Airflow whose DAGs and plugins are this checkout's."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **(extra or {}),
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",  # standalone starts its parts by name
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",  # two cores: the scheduler forks this many task runners
        "AIRFLOW__API__PORT": str(port),
        # this machine only: standalone's users have generated passwords; expose it on purpose
        # (AIRFLOW__API__HOST=0.0.0.0, behind TLS and real users) or through an SSH tunnel
        "AIRFLOW__API__HOST": os.environ.get("AIRFLOW__API__HOST", "127.0.0.1"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
    }


class AirflowApi:
    """Airflow 3's REST API at ``url``: log in, trigger a DAG, watch its runs.

    Serves the local standalone Airflow below and the docker-compose stack alike.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.token: str | None = None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as r:
                return json.load(r)["metadatabase"]["status"] == "healthy"
        except (OSError, ValueError, KeyError):
            return False

    def login(self, username: str, password: str) -> None:
        status, body = self.request("POST", "/auth/token", {"username": username, "password": password}, auth=False)
        if status not in (200, 201):
            raise RuntimeError(f"login as {username!r} failed: HTTP {status} {body}")
        self.token = body["access_token"]

    def request(self, method: str, path: str, payload: dict | None = None, auth: bool = True) -> tuple[int, dict]:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth and self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"detail": body.decode(errors="replace")}

    def wait_for_dag(self, dag_id: str = DAG_ID, timeout_s: float = 180) -> None:
        """Until the DAG processor has parsed the DAG; then unpause it."""
        deadline = time.time() + timeout_s
        while self.request("GET", f"/api/v2/dags/{dag_id}")[0] != 200:
            if time.time() > deadline:
                raise RuntimeError(f"DAG {dag_id} did not appear within {timeout_s}s")
            time.sleep(2)
        status, body = self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        if status != 200:
            raise RuntimeError(f"could not unpause {dag_id}: HTTP {status} {body}")

    def trigger(self, conf: dict, dag_id: str = DAG_ID) -> tuple[int, dict]:
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})

    def runs(self, dag_id: str = DAG_ID) -> list[dict]:
        status, body = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")
        if status != 200:
            raise RuntimeError(f"listing runs of {dag_id}: HTTP {status} {body}")
        return body["dag_runs"]

    def wait_for_run(self, run_id: str, dag_id: str = DAG_ID, timeout_s: float = 900, progress=None) -> str:
        deadline = time.time() + timeout_s
        while True:
            status, run = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if status != 200:
                raise RuntimeError(f"run {run_id}: HTTP {status} {run}")
            if progress:
                progress(self.task_states(run_id, dag_id))
            if run["state"] in ("success", "failed"):
                return run["state"]
            if time.time() > deadline:
                raise RuntimeError(f"run {run_id} still {run['state']} after {timeout_s}s")
            time.sleep(3)

    def task_states(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, int]:
        _, body = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")
        states: dict[str, int] = {}
        for ti in body.get("task_instances", []):
            states[ti["state"] or "none"] = states.get(ti["state"] or "none", 0) + 1
        return states


class LocalAirflow(AirflowApi):
    """``airflow standalone`` of this checkout, in the background, in its own process group."""

    def __init__(self, home: Path, port: int, extra_env: dict[str, str] | None = None):
        super().__init__(f"http://127.0.0.1:{port}")
        self.home, self.port, self.extra_env = home, port, extra_env
        self.process: subprocess.Popen | None = None

    @property
    def pid_file(self) -> Path:
        return self.home / "standalone.pid"

    def start(self, timeout_s: float = 240) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "standalone.log", "ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("airflow")), "standalone"],
            env=airflow_env(self.home, self.port, self.extra_env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid_file.write_text(str(self.process.pid))
        deadline = time.time() + timeout_s
        while not self.healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"airflow standalone exited; see {self.home / 'standalone.log'}")
            if time.time() > deadline:
                raise RuntimeError(f"airflow standalone not healthy after {timeout_s}s; see {self.home / 'standalone.log'}")
            time.sleep(2)
        self.login_generated()

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process.pid)
            self.process.wait(10)

    def login_generated(self) -> None:
        """Log in with the password that standalone generated."""
        passwords = self.home / "simple_auth_manager_passwords.json.generated"
        deadline = time.time() + 60
        while not passwords.exists():
            if time.time() > deadline:
                raise RuntimeError(f"{passwords} was not written")
            time.sleep(1)
        username, password = next(iter(json.loads(passwords.read_text()).items()))
        self.login(username, password)


def stop_group(pid: int) -> None:
    """SIGINT, as Airflow asks, to standalone's whole process group; then SIGTERM and
    SIGKILL for what lingers (the scheduler's executor workers ignore SIGINT)."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)  # anyone left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.5)


def demo(workdir: Path, port: int) -> int:
    from chunk_ops.geometry import Vec3
    from chunk_ops.models.demo import write_demo_job
    from chunk_ops.sample import write_sample

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    image_url = f"file://{workdir}/image"
    print(f"1/4 sample EM volume -> {image_url}", flush=True)
    truth_url = f"file://{workdir}/truth"
    write_sample(image_url, Vec3(512, 512, 48), seed=1, labels_url=truth_url)
    job = write_demo_job(workdir, image_url, f"file://{workdir}/affinities", truth_url)
    job["workers"] = {"local": 2, "idle_exit_s": 5}
    (workdir / "job.json").write_text(json.dumps(job, indent=2) + "\n")

    airflow = LocalAirflow(workdir / "airflow", port)
    print(f"2/4 starting airflow standalone (log: {airflow.home / 'standalone.log'})", flush=True)
    airflow.start()
    airflow.wait_for_dag()
    # the pool GPU worker pods take a slot of (none run here; without it the DAG shows a warning)
    airflow.request("POST", "/api/v2/pools", {"name": "chunk_ops_gpu", "slots": 1, "include_deferred": True,
                                              "description": "GPU worker pods (docs/kubernetes.md)"})
    status, run = airflow.trigger(job)
    if status != 200:
        print(f"trigger refused: HTTP {status} {run}", file=sys.stderr)
        return 1
    print(f"3/4 triggered {DAG_ID} run {run['dag_run_id']} through the REST API", flush=True)
    last = {}

    def show(states: dict) -> None:
        nonlocal last
        if states != last:
            print("    tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())), flush=True)
            last = states

    state = airflow.wait_for_run(run["dag_run_id"], progress=show)
    _, xcom = airflow.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}/taskInstances/report/xcomEntries/return_value")
    print(f"4/4 run {state}", flush=True)
    if "value" in xcom:
        print(json.dumps(xcom["value"], indent=2) if not isinstance(xcom["value"], str) else xcom["value"])
    print(f"\nAirflow UI:   {airflow.url}  (user and password in {airflow.home / 'simple_auth_manager_passwords.json.generated'})")
    print(f"chunk map:    {airflow.url}/dags/{DAG_ID}/runs/{run['dag_run_id']}/plugin/chunk_progress_run")
    print("              the UI listens on 127.0.0.1 only; from another machine: ssh -L "
          f"{airflow.port}:127.0.0.1:{airflow.port} <this host>, or (deliberately, with TLS and real users) "
          "AIRFLOW__API__HOST=0.0.0.0 make demo")
    print(f"output layer: file://{workdir}/affinities")
    print(f"segmentation: file://{workdir}/affinities/segmentation (ground truth file://{workdir}/truth)")
    print(f"reports:      {workdir}/affinities/jobs/*/report.html (.md, .png, .json)")
    print(f"stop Airflow: {Path(sys.executable).parent}/python scripts/airflow_local.py stop --workdir {workdir}")
    return 0 if state == "success" else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="sample job through airflow standalone")
    d.add_argument("--workdir", type=Path, default=REPO / "demo")
    d.add_argument("--port", type=int, default=8080)
    s = sub.add_parser("stop", help="stop the airflow standalone that demo started")
    s.add_argument("--workdir", type=Path, default=REPO / "demo")
    args = parser.parse_args()
    if args.command == "stop":
        pid_file = args.workdir.resolve() / "airflow" / "standalone.pid"
        if not pid_file.exists():
            print(f"no {pid_file}: nothing to stop", file=sys.stderr)
            return 1
        stop_group(int(pid_file.read_text()))
        pid_file.unlink()
        return 0
    return demo(args.workdir, args.port)


if __name__ == "__main__":
    sys.exit(main())
