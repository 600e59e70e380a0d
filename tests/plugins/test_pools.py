"""Which pools serve a run: a run that no worker would serve is refused before it starts."""

from __future__ import annotations

import pytest

from chunk_ops.spec import section_with_defaults


def _workers(**overrides) -> dict:
    return section_with_defaults("workers", overrides)


def test_a_run_without_any_pool_is_refused_naming_the_queue():
    from chunkflow_airflow.utils.pods import check_pools

    with pytest.raises(ValueError, match=r"sqs://run-7.*local 0, gpu.max 0, cpu.max 0, standing false"):
        check_pools(_workers(local=0), "sqs://run-7")


@pytest.mark.parametrize("pools", [{"local": 1}, {"local": 0, "standing": True}, {"local": 0, "gpu": {"max": 2}},
                                   {"local": 0, "cpu": {"max": 3}}])
def test_any_one_pool_is_enough(pools):
    from chunkflow_airflow.utils.pods import check_pools

    check_pools(_workers(**pools), "sqs://run-7")


@pytest.mark.parametrize("stage, pending, gpu_max, cpu_max, expected", [
    (1, 100, 4, 8, {"gpu": 4, "cpu": 8, "local": 2}),  # both capped
    (1, 10, 4, 8, {"gpu": 3, "cpu": 0, "local": 2}),  # 10 tasks / 4 per worker: 3 workers, GPUs first
    (1, 30, 4, 8, {"gpu": 4, "cpu": 4, "local": 2}),  # 8 wanted: 4 GPU pods, the rest on CPUs
    (2, 30, 4, 8, {"gpu": 0, "cpu": 8, "local": 2}),  # merges never go to GPUs
    (1, 0, 4, 8, {"gpu": 0, "cpu": 0, "local": 0}),  # nothing to do, nobody started
])
def test_pool_sizes_fill_gpus_first_then_cpus_within_their_limits(stage, pending, gpu_max, cpu_max, expected):
    from chunkflow_airflow.utils.pods import pool_size

    workers = _workers(local=2, tasks_per_worker=4, gpu={"max": gpu_max}, cpu={"max": cpu_max})
    assert {pool: pool_size(workers, pool, stage, pending) for pool in expected} == expected


def test_pool_members_are_pod_kwargs_sized_from_the_real_queue_depth(tmp_path):
    """GPU and CPU pools above 0, against an embedded queue holding 9 tasks."""
    from chunk_ops.queues.stages import StageQueues
    from chunkflow_airflow.hooks.chunk_queue import ChunkQueueHook
    from chunkflow_airflow.utils.pods import pool_members

    url = f"file://{tmp_path}/q.sqlite"
    StageQueues(url, create=True).of(1).send_batch([f'{{"n": {i}}}' for i in range(9)])
    info = {"job_id": "0123456789abcdef", "queue_url": url, "spec_url": f"file://{tmp_path}/out/jobs/x/spec.json",
            "workers": _workers(local=1, tasks_per_worker=2, gpu={"max": 3}, cpu={"max": 10})}
    hook = ChunkQueueHook(url, None)
    gpu, cpu = (pool_members(info, pool, 1, 9, hook) for pool in ("gpu", "cpu"))
    assert len(gpu) == 3 and len(cpu) == 2  # ceil(9 / 2) = 5 workers: 3 GPUs, 2 CPU pods
    assert all("--stages" in pod["arguments"] for pod in gpu) and not any("--stages" in p["arguments"] for p in cpu)
    assert {pod["labels"]["pool"] for pod in gpu + cpu} == {"gpu", "cpu"}
    assert all(pod["image"] == info["workers"]["image"] for pod in gpu + cpu)
    assert pool_members(info, "local", 1, 9, hook) == [0]
    assert pool_members(info, "gpu", 1, 0, hook) == []  # nothing sent: no pods
