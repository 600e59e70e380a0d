"""The chunk_ops Airflow plugin (the one file of plugins/ that Airflow loads as a plugin;
the package chunkflow_airflow/ is imported from it): the chunk progress view and the
run's extra links.

- ``fastapi_apps``: ``chunkflow_airflow.progress_view.app`` at ``/chunkflow`` on the api-server.
- ``external_views``: the progress view as a tab of each run and of the DAG in the UI.
- ``operator_extra_links``: registered so the api-server can show the links
  (``chunkflow_airflow.links.RUN_LINKS``) that the enqueue operators and stage sensors carry.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from chunkflow_airflow.links import PREFIX, RUN_LINKS


class ChunkflowPlugin(AirflowPlugin):
    name = "chunkflow"
    operator_extra_links = list(RUN_LINKS)

    @property
    def fastapi_apps(self) -> list[dict]:  # imported lazily: only the api-server serves it
        from chunkflow_airflow.progress_view import app

        return [{"app": app, "url_prefix": PREFIX, "name": "chunk progress"}]

    # hrefs relative to the UI's base URL, so an Airflow served under a path finds them too
    external_views = [
        {"name": "Chunk progress", "href": PREFIX.lstrip("/") + "/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "chunk_progress_run"},
        {"name": "Chunk progress", "href": PREFIX.lstrip("/") + "/dags/{DAG_ID}", "destination": "dag",
         "url_route": "chunk_progress_dag"},
    ]
