from tests.dags.conftest import AIRFLOW_ENV, airflow_db, dagbag  # noqa: F401  (Airflow env before any import)
from tests.chunk_ops.conftest import make_spec  # noqa: F401
