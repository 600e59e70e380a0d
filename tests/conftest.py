"""Test-wide settings and the services tests share (started here, stopped by pid)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import settings

# One ONNX export cache for the whole run (workers started by tests inherit it), not ~/.cache.
os.environ.setdefault("CHUNK_OPS_CACHE", tempfile.mkdtemp(prefix="chunk_ops_cache_"))

# The operator's model allowlist (chunk_ops.models.registry): the test networks and nothing
# else; workers started by tests inherit it.
os.environ["CHUNK_OPS_MODEL_ALLOWLIST"] = f"{Path(__file__).parent / 'chunk_ops' / 'nets.py'}:*"

# Two shared cores: wall-clock deadlines would make property tests flaky, not stricter.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_sqs():
    """A real moto server process (SQS over HTTP); boto3 reaches it through the env.

    Yields the endpoint URL; the process is stopped by its pid at the end.
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_SQS", "AWS_DEFAULT_REGION",
                                            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ENDPOINT_URL_SQS=endpoint, AWS_DEFAULT_REGION="us-east-1",
                      AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
