"""A Docker engine and the project's images, for the container tests.

The engine is Debian's ``docker.io``: if none answers, ``dockerd`` is started here and
stopped by its pid at the end. Images are built once per session by images/build.sh
(Docker's layer cache keeps them cheap between runs on the same machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.dags.conftest import REPO, airflow_db, dagbag  # noqa: F401  (the rendered pods come from the DAG)
from tests.chunk_ops.conftest import make_spec  # noqa: F401

WORKER_UID = 10001


def docker_binary() -> str:
    """A Docker CLI with BuildKit: Debian's (``/usr/bin/docker``) unless ``docker`` has buildx."""
    on_path = shutil.which("docker")
    if on_path and subprocess.run([on_path, "buildx", "version"], capture_output=True).returncode == 0:
        return on_path
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    if on_path:
        return on_path
    raise RuntimeError("no docker CLI: install Debian's docker.io (make test does)")


@dataclass
class Docker:
    binary: str

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}):\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result

    def answers(self) -> bool:
        return self("info", check=False, timeout=30).returncode == 0


@pytest.fixture(scope="session")
def docker():
    engine = Docker(docker_binary())
    if engine.answers():
        yield engine
        return
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        raise RuntimeError("no Docker engine: install Debian's docker.io (make test does)")
    log = open(Path(tempfile.mkdtemp(prefix="dockerd-")) / "dockerd.log", "wb")
    daemon = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 60
    while not engine.answers():
        if daemon.poll() is not None or time.time() > deadline:
            daemon.kill()
            raise RuntimeError(f"dockerd did not start; see {log.name}")
        time.sleep(1)
    try:
        yield engine
    finally:
        os.kill(daemon.pid, signal.SIGTERM)  # dockerd stops its containers, then exits
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()


@dataclass
class Images:
    worker: str
    airflow: str
    sqs: str
    postgres: str
    build_log: str  # images/build.sh's summary: name, size, seconds


@pytest.fixture(scope="session")
def images(docker) -> Images:
    """Every image, built by images/build.sh (as `make images` does) from the local base."""
    env = {**os.environ, "DOCKER": docker.binary, "PIP": str(Path(sys.executable).with_name("pip")),
           "TAG": "test"}
    result = subprocess.run([str(REPO / "images" / "build.sh")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=2400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(f"\n{result.stdout}", file=sys.stderr)
    return Images(*(f"chunk-ops-{name}:test" for name in ("worker", "airflow", "sqs", "postgres")),
                  build_log=result.stdout)


def share_with_containers(folder: Path) -> None:
    """Let the images' non-root user (uid 10001) write in a folder the host made."""
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, WORKER_UID, WORKER_UID, follow_symlinks=False)
