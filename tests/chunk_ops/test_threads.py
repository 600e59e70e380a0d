"""Thread budgets: workers sharing a machine each compute on their share of its cores.

Whoever starts a worker knows how many share the machine: the local pool and the
DAG's local workers divide the cores, a pod gets its CPU request.  The budget
reaches the worker as CHUNK_OPS_THREADS (or ``worker --threads``) and every engine
is built with it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from chunk_ops.engines import THREADS_ENV, machine_cores, threads_for, worker_threads
from chunk_ops.job import Job
from chunk_ops.models.loading import load_predictor
from chunk_ops.pipeline import run_job, worker_command
from chunk_ops.spec import parse_spec
from tests.chunk_ops import nets


def _torchscript_model(folder: Path) -> dict:
    path = folder / "net.ts"
    torch.jit.save(torch.jit.trace(nets.TinyConvNet(1, 1).eval(), torch.zeros(1, 1, 4, 12, 12)), path)
    return {"path": str(path), "format": "torchscript", "input_patch": [12, 12, 4], "out_channels": 1}


@pytest.fixture
def torch_threads():
    """torch's thread count is process-wide: give the test process its own back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpus, expected", [(8 / 3, 2), (2 / 2, 1), (2 / 4, 1), (16 / 1, 16), (2.5, 2)])
def test_the_budget_is_the_whole_cores_of_a_workers_share(cpus, expected):
    assert threads_for(cpus) == expected


@pytest.mark.parametrize("cpus", [0, -1.0])
def test_a_share_of_no_cores_is_refused_by_value(cpus):
    with pytest.raises(ValueError, match=rf"must be positive, got {cpus}"):
        threads_for(cpus)


def test_a_lone_worker_takes_every_core_it_may_run_on(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert worker_threads() == machine_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(THREADS_ENV, "3")
    assert worker_threads() == 3


@pytest.mark.parametrize("bad", ["0", "two", "-1", "1.5"])
def test_a_bad_budget_is_refused_by_value(monkeypatch, bad):
    monkeypatch.setenv(THREADS_ENV, bad)
    with pytest.raises(ValueError, match=rf"^CHUNK_OPS_THREADS='{re.escape(bad)}' is not a positive whole number"):
        worker_threads()


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime", "pytorch"])
def test_each_engine_runs_on_the_budget(monkeypatch, tmp_path, torch_threads, caplog, engine):
    """Not the runtimes' defaults (every core; OpenVINO ignores torch's and OpenMP's settings)."""
    monkeypatch.setenv("CHUNK_OPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(THREADS_ENV, "1")
    torch.set_num_threads(2)
    spec = parse_spec({
        "input": {"url": "file:///unused/image"},
        "output": {"url": "file:///unused/output", "block_size": [4, 4, 4]},
        "model": _torchscript_model(tmp_path),
        "inference": {"engine": engine, "batch_size": 2, "device": "cpu"},
    })
    with caplog.at_level(logging.INFO, logger="chunk_ops.models.loading"):
        engine_used = load_predictor(spec).engine
    if engine == "openvino":  # what the compiled model runs on
        compiled = engine_used.request.get_compiled_model()
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
        if machine_cores() > 1:  # a share of the machine: not pinned to core 0 like every other worker
            assert compiled.get_property("ENABLE_CPU_PINNING") is False
    elif engine == "onnxruntime":
        assert engine_used.session.get_session_options().intra_op_num_threads == 1
    else:
        assert torch.get_num_threads() == 1
    assert engine_used.threads == 1
    assert f"engine {engine_used.name} on 1 threads" in caplog.text


@pytest.fixture
def pods(monkeypatch):
    """The plugin's pod helpers (they import kubernetes and chunk_ops, not Airflow)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "plugins"))
    from chunkflow_airflow.utils import pods

    return pods


def test_pods_get_their_budget_from_their_cpu_request(pods):
    for pool in ("gpu", "cpu"):
        request = pods.WORKER_RESOURCES[pool].requests["cpu"]
        (pod,) = pods.pod_kwargs(pool, 1, 1, job_id="0123456789abcdef", queue_url="sqs://q", cloud="gke",
                            idle_exit_s=30, lease_s=60, env={})
        assert request.isdigit() and pod["env_vars"][THREADS_ENV] == request  # whole cores: one thread each


@pytest.mark.parametrize("request_cpu, expected", [("500m", 1), ("2500m", 2), ("3", 3), ("1.5", 1)])
def test_a_fractional_cpu_request_gives_its_whole_cores(pods, request_cpu, expected):
    assert pods.threads_for_request(request_cpu) == expected


def test_a_cpu_request_that_is_no_quantity_is_refused_by_value(pods):
    with pytest.raises(ValueError, match="CPU request 'two cores' is not a Kubernetes quantity"):
        pods.threads_for_request("two cores")


def _events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_the_worker_option_sets_the_budget(tmp_path):
    command = worker_command(f"file://{tmp_path}/q.sqlite", idle_exit_s=0.2, extra=("--create-queue", "--threads", "1"))
    env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [e["threads"] for e in _events(result.stderr) if e["event"] == "start"] == [1]


def test_a_local_pool_of_two_workers_gives_each_its_share_of_the_cores(make_spec, tmp_path, capfd):
    """On this project's 2-core machines: one thread each.  OpenVINO ignores OMP_NUM_THREADS,
    so only the budget holds it to that."""
    spec = make_spec()
    spec["model"] = _torchscript_model(tmp_path)
    spec["inference"]["engine"] = "openvino"
    spec["postprocess"] = {"pyramid_levels": 0}  # no post-processing pool: one pool of two workers only
    run_job(Job.open(spec), workers=2)
    stderr = capfd.readouterr().err  # the workers' events and logs (this process logs to pytest)
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    starts = [e for e in _events(stderr) if e["event"] == "start"]
    assert len(starts) == 2 and {e["threads"] for e in starts} == {share}  # one pool serves both stages
    engines = re.findall(r"engine (\S+) on (\d+) threads", stderr)  # the stage-1 workers that loaded the model
    assert engines and set(engines) == {("openvino-cpu-float32", str(share))}
