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
