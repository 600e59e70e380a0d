"""Airflow for the DAG tests: a private AIRFLOW_HOME with a migrated SQLite database.

The environment is set when this file is imported, before anything imports Airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="chunkops-airflow-"))
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__PARALLELISM": "4",
}
os.environ.update(AIRFLOW_ENV)
if str(REPO / "plugins") not in sys.path:
    sys.path.append(str(REPO / "plugins"))


@pytest.fixture(scope="session")
def airflow_db():
    """``airflow db migrate`` once per session, into the private home."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    result = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr[-3000:]
    return AIRFLOW_HOME


@pytest.fixture
def dagbag(airflow_db):
    """Parsed anew for each test: dag.test() merges run_conf into the Param objects the DAG
    and its tasks share, so one test's conf would leak into the next test's runs."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


from tests.chunk_ops.conftest import make_spec  # noqa: E402,F401  (the same sample volumes and nets)
