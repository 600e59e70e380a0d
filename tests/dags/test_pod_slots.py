"""Pod tasks free their Airflow worker slot while their pods run.

Real: ``airflow standalone`` (scheduler, LocalExecutor with ``[core] parallelism`` 2,
triggerer, API server), the cncf provider's KubernetesPodOperator and KubernetesPodTrigger
with the DAG's own pod arguments (``pod_operator_kwargs``) and per-pod kwargs
(``pod_kwargs``), the Kubernetes Python clients (sync and asyncio) they use, and an
Airflow pool ``chunk_ops_gpu`` with deferred tasks counted.

Emulated: the Kubernetes API server. No kube-apiserver can run here (none in Debian
bookworm or on PyPI; no image registry for kind/k3s), so ``EmulatedKubeApi`` below serves
the few pod endpoints the operator and its trigger call (create, get, list by label
selector, patch labels, delete, logs, events) from memory, and plays the kubelet: a
created pod turns Running at once; it ends when the test says so.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from scripts import airflow_local
from scripts.airflow_local import LocalAirflow
from tests.conftest import free_port

PARALLELISM = 2  # worker slots: fewer than the pods
GPU_SLOTS = 4  # the Airflow pool: the cluster's GPUs
PODS = 5  # GPU pods the run asks for: more than both
NAMESPACE = "connectomics"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _selected(labels: dict, selector: str) -> bool:
    """Equality-based label selectors: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = re.split("==?", term, maxsplit=1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class EmulatedKubeApi:
    """An in-memory stand-in for kube-apiserver's core/v1 pod endpoints, and the kubelet."""

    def __init__(self):
        self.pods: dict[tuple[str, str], dict] = {}
        self.created: list[dict] = []  # every pod body as the operator posted it
        self.deleted: list[str] = []
        self.peak_running = 0
        self.lock = threading.Condition()
        self.versions = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    # the kubelet's side
    def running(self) -> list[str]:
        with self.lock:
            return [n for (_, n), p in self.pods.items() if p["status"]["phase"] == "Running"]

    def finish(self, name: str, exit_code: int = 0) -> None:
        """The pod's only container exits: the pod is Succeeded (or Failed)."""
        with self.lock:
            pod = self.pods[(NAMESPACE, name)]
            container = pod["spec"]["containers"][0]["name"]
            pod["status"].update(
                phase="Succeeded" if exit_code == 0 else "Failed",
                containerStatuses=[{"name": container, "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                                    "state": {"terminated": {"exitCode": exit_code, "reason": "Completed",
                                                             "startedAt": _now(), "finishedAt": _now()}}}])
            pod["metadata"]["resourceVersion"] = str(next(self.versions))
            self.lock.notify_all()

    def _start_pod(self, pod: dict) -> None:  # lock held: scheduled, pulled, started
        container = pod["spec"]["containers"][0]["name"]
        pod["status"] = {
            "phase": "Running", "startTime": _now(), "hostIP": "10.0.0.1", "podIP": "10.1.0.1",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": _now()}
                           for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": container, "ready": True, "restartCount": 0, "image": "x", "imageID": "",
                                   "started": True, "state": {"running": {"startedAt": _now()}}}],
        }
        self.peak_running = max(self.peak_running, sum(
            p["status"]["phase"] == "Running" for p in self.pods.values()))

    # the API server's side
    def _handler(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body, content_type="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a cancelled poll)
                    self.close_connection = True

            def _status(self, code: int, reason: str, message: str):
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason, "message": message})

            def _body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")

            def _route(self, method: str):
                url = urlparse(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/(pods|events)(?:/([^/]+))?(?:/(log))?", url.path)
                if not m:
                    return self._status(404, "NotFound", f"{method} {url.path}: not served by the emulated API")
                namespace, kind, name, sub = m.groups()
                if kind == "events":
                    if query.get("watch") in ("true", "1"):  # a watch that sees no event, then ends
                        time.sleep(min(float(query.get("timeoutSeconds", 1)), 2))
                        return self._send(200, b"")
                    return self._send(200, {"kind": "EventList", "apiVersion": "v1", "items": [],
                                            "metadata": {"resourceVersion": "1"}})
                with api.lock:
                    if name is None and method == "GET":
                        items = [p for (ns, _), p in api.pods.items()
                                 if ns == namespace and _selected(p["metadata"].get("labels", {}),
                                                                  query.get("labelSelector", ""))]
                        return self._send(200, {"kind": "PodList", "apiVersion": "v1", "items": items,
                                                "metadata": {"resourceVersion": str(next(api.versions))}})
                    if name is None and method == "POST":
                        pod = self._body()
                        pod_name = pod["metadata"]["name"]
                        if (namespace, pod_name) in api.pods:
                            return self._status(409, "AlreadyExists", f'pods "{pod_name}" already exists')
                        api.created.append(json.loads(json.dumps(pod)))
                        pod["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now(),
                                               resourceVersion=str(next(api.versions)))
                        pod["status"] = {"phase": "Pending"}
                        api.pods[(namespace, pod_name)] = pod
                        threading.Timer(0.3, self._kubelet_starts, (namespace, pod_name)).start()
                        return self._send(201, pod)
                    pod = api.pods.get((namespace, name))
                    if pod is None:
                        return self._status(404, "NotFound", f'pods "{name}" not found')
                    if sub == "log":
                        if query.get("follow") == "true":  # a followed log ends when the container does
                            api.lock.wait_for(lambda: pod["status"]["phase"] in ("Succeeded", "Failed")
                                              or (namespace, name) not in api.pods, timeout=600)
                        return self._send(200, f"emulated kubelet: pod {name} ran\n".encode(), "text/plain")
                    if method == "GET":
                        return self._send(200, pod)
                    if method == "PATCH":
                        labels = self._body().get("metadata", {}).get("labels", {})
                        pod["metadata"].setdefault("labels", {}).update(labels)
                        return self._send(200, pod)
                    if method == "DELETE":
                        del api.pods[(namespace, name)]
                        api.deleted.append(name)
                        api.lock.notify_all()
                        return self._send(200, pod)
                return self._status(405, "MethodNotAllowed", method)

            def _kubelet_starts(self, namespace: str, name: str):
                with api.lock:
                    pod = api.pods.get((namespace, name))
                    if pod is not None and pod["status"]["phase"] == "Pending":
                        api._start_pod(pod)
                        pod["metadata"]["resourceVersion"] = str(next(api.versions))
                        api.lock.notify_all()

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PATCH(self):
                self._route("PATCH")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler


DAG_FILE = '''
"""GPU pods as chunkflow_inference starts them (its pod arguments, its per-pod kwargs),
deferrable and, for comparison, not."""
import json
from datetime import datetime

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG
from chunkflow_airflow.utils.pods import pod_operator_kwargs

MEMBERS = json.loads({members!r})
for dag_id, deferrable in (("pod_slots_deferrable", True), ("pod_slots_sync", False)):
    with DAG(dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
        # the test's only changes: poll every second, fail at once instead of retrying
        KubernetesPodOperator.partial(
            task_id="gpu_pool_stage1", **{{**pod_operator_kwargs("gpu"), "deferrable": deferrable,
                                          "poll_interval": 1, "retries": 0}},
        ).expand_kwargs(MEMBERS)
    globals()[dag_id] = dag
'''


@pytest.fixture(scope="module")
def kube():
    api = EmulatedKubeApi().start()
    yield api
    api.stop()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, kube):
    from chunkflow_airflow.utils.pods import pod_kwargs

    home = tmp_path_factory.mktemp("airflow-slots")
    dags = home / "dags"
    dags.mkdir()
    # the members the DAG's size_pool task returns for PODS GPU pods (pods.pool_members)
    members = [{**kw, "image": "chunk-ops-worker:1.0-cuda", "namespace": NAMESPACE}
               for kw in pod_kwargs("gpu", 1, PODS, job_id="0123456789abcdef", queue_url="sqs://slots",
                                    cloud="gke", idle_exit_s=30, lease_s=60, env={"AWS_DEFAULT_REGION": "us-east-1"})]
    (dags / "pod_slots.py").write_text(DAG_FILE.format(members=json.dumps(members)))
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
        "clusters": [{"name": "emulated", "cluster": {"server": kube.url}}],
        "users": [{"name": "airflow", "user": {"token": "emulated"}}],
        "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "airflow",
                                                      "namespace": NAMESPACE}}],
    }))
    overrides = {
        "AIRFLOW__CORE__PARALLELISM": str(PARALLELISM),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig), "namespace": NAMESPACE}}),
    }
    env = airflow_local.airflow_env
    local = LocalAirflow(home, free_port())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(airflow_local, "airflow_env", lambda *a, **k: {**env(*a, **k), **overrides})
        try:
            local.start()
            status, body = local.request("POST", "/api/v2/pools", {
                "name": "chunk_ops_gpu", "slots": GPU_SLOTS, "include_deferred": True,
                "description": "GPU worker pods (cluster GPUs)"})
            assert status in (200, 201), body
            for dag_id in ("pod_slots_deferrable", "pod_slots_sync"):
                local.wait_for_dag(dag_id)
            yield local
        finally:
            local.stop()


def _states(airflow, dag_id: str, run_id: str) -> dict[str, int]:
    status, body = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")
    assert status == 200, body
    counts: dict[str, int] = {}
    for ti in body["task_instances"]:
        counts[ti["state"] or "none"] = counts.get(ti["state"] or "none", 0) + 1
    return counts


def _until(what, predicate, timeout_s: float = 300, every_s: float = 0.5):
    deadline = time.time() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def _finish_all(airflow, kube, dag_id: str, run_id: str) -> str:
    """The kubelet ends every running pod, as they come, until the run ends."""
    deadline = time.time() + 300
    while True:
        for name in kube.running():
            kube.finish(name)
        status, run = airflow.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        if run["state"] in ("success", "failed"):
            return run["state"]
        assert time.time() < deadline, f"run {run_id} still {run['state']}"
        time.sleep(0.5)


def test_deferrable_pods_run_beyond_parallelism_within_the_gpu_pool(airflow, kube):
    start = len(kube.created)
    t0 = time.time()
    status, run = airflow.trigger({}, dag_id="pod_slots_deferrable")
    assert status == 200, run
    run_id = run["dag_run_id"]
    # GPU_SLOTS pods run at once with PARALLELISM worker slots: their tasks are deferred
    # (no slot held), and the pool holds back the last pod until a GPU frees up
    states = _until(f"{GPU_SLOTS} pods running, their tasks deferred",
                    lambda: len(kube.running()) == GPU_SLOTS
                    and (s := _states(airflow, "pod_slots_deferrable", run_id)).get("deferred") == GPU_SLOTS and s)
    seen_at = time.time() - t0
    time.sleep(5)  # long enough for the scheduler to start the fifth, if anything let it
    states = _states(airflow, "pod_slots_deferrable", run_id)
    assert states.get("deferred") == GPU_SLOTS and states.get("running", 0) == 0, states
    assert states.get("scheduled", 0) + states.get("queued", 0) == PODS - GPU_SLOTS, states  # waits for the pool
    assert len(kube.created) - start == GPU_SLOTS and len(kube.running()) == GPU_SLOTS
    status, pool = airflow.request("GET", "/api/v2/pools/chunk_ops_gpu")
    assert pool["deferred_slots"] == GPU_SLOTS and pool["open_slots"] == 0, pool
    assert _finish_all(airflow, kube, "pod_slots_deferrable", run_id) == "success"
    assert len(kube.created) - start == PODS  # the fifth pod started once a GPU was free
    assert kube.peak_running == GPU_SLOTS > PARALLELISM
    assert not kube.pods  # every pod deleted when its task ended (on_finish_action)
    print(f"\ndeferrable, parallelism {PARALLELISM}: {GPU_SLOTS} of {PODS} pods running at once "
          f"{seen_at:.0f}s after the trigger, task states {states}; run done in {time.time() - t0:.0f}s")


def test_without_deferral_pods_wait_for_worker_slots(airflow, kube):
    """The comparison: the same pods, not deferrable, never run more than PARALLELISM at once."""
    kube.peak_running = 0
    start = len(kube.created)
    t0 = time.time()
    status, run = airflow.trigger({}, dag_id="pod_slots_sync")
    assert status == 200, run
    run_id = run["dag_run_id"]
    _until(f"{PARALLELISM} pods running", lambda: len(kube.running()) == PARALLELISM
           and _states(airflow, "pod_slots_sync", run_id).get("running") == PARALLELISM)
    time.sleep(8)  # a third pod would have been created by now if a slot allowed it
    assert len(kube.created) - start == PARALLELISM
    states = _states(airflow, "pod_slots_sync", run_id)
    assert states.get("running") == PARALLELISM and "deferred" not in states, states
    assert _finish_all(airflow, kube, "pod_slots_sync", run_id) == "success"
    assert len(kube.created) - start == PODS
    assert kube.peak_running == PARALLELISM
    print(f"\nsync: at most {PARALLELISM} pods at once; run done in {time.time() - t0:.0f}s")


def test_the_pods_the_operator_created_validate_strictly(airflow, kube, tmp_path):
    """What reached the (emulated) API server is a valid pod for a real one."""
    assert kube.created
    validate = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(kube.created[-1]))
    result = subprocess.run([validate, "--strict", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = kube.created[-1]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
