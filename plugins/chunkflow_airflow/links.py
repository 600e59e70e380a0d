"""Extra links on a run's chunk tasks (the enqueue operators and the stage sensors).

Each points at the progress plugin (``progress_view``), which resolves the run to its
job when it is clicked: the links need nothing but the run's identity, so they are
right on every task of the run, even one that failed before the job had a report.
"""

from __future__ import annotations

from urllib.parse import quote

from airflow.sdk import BaseOperatorLink, conf

PREFIX = "/chunkflow"  # where plugin.py mounts the progress app


def airflow_url(path: str, *, absolute: bool = False) -> str:
    """A page of this Airflow from ``[api] base_url``; without one, from the UI's root, or
    (``absolute``: for messages read elsewhere) Airflow's default address."""
    base = conf.get("api", "base_url", fallback="") or ("http://localhost:8080" if absolute else "")
    return base.rstrip("/") + path


def run_url(dag_id: str, run_id: str, page: str = "") -> str:
    """The progress app's page of a run."""
    return airflow_url(f"{PREFIX}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}{page}")


class ChunkProgressLink(BaseOperatorLink):
    name = "Chunk progress"

    def get_link(self, operator, *, ti_key) -> str:
        return run_url(ti_key.dag_id, ti_key.run_id)


class RunReportLink(BaseOperatorLink):
    name = "Run report"

    def get_link(self, operator, *, ti_key) -> str:
        return run_url(ti_key.dag_id, ti_key.run_id, "/report")


class NeuroglancerInputLink(BaseOperatorLink):
    name = "Neuroglancer: input"

    def get_link(self, operator, *, ti_key) -> str:
        return run_url(ti_key.dag_id, ti_key.run_id, "/neuroglancer/input")


class NeuroglancerOutputLink(BaseOperatorLink):
    name = "Neuroglancer: output"

    def get_link(self, operator, *, ti_key) -> str:
        return run_url(ti_key.dag_id, ti_key.run_id, "/neuroglancer/output")


class NeuroglancerSegmentationLink(BaseOperatorLink):
    name = "Neuroglancer: segmentation"

    def get_link(self, operator, *, ti_key) -> str:
        return run_url(ti_key.dag_id, ti_key.run_id, "/neuroglancer/segmentation")


RUN_LINKS = (ChunkProgressLink(), RunReportLink(), NeuroglancerInputLink(), NeuroglancerOutputLink(),
             NeuroglancerSegmentationLink())
