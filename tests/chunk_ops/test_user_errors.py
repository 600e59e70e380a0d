"""A user's mistakes: one line naming the value, exit status 1, and nothing written.

Run as users run them: the installed console script, in an environment the test controls
(no AWS credentials, no region, a read-only disk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
CHUNK_OPS = str(Path(sys.executable).with_name("chunk-ops"))


def _chunk_ops(*args: str, cwd: Path, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CHUNK_OPS, *args], cwd=cwd, capture_output=True, text=True, timeout=300, input=stdin,
                          env={**(env if env is not None else os.environ), "PYTHONPATH": str(REPO)})


def _no_aws(tmp_path: Path) -> dict:
    """This environment without any AWS credential, region or config, and no instance metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(home / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "none")}


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.strip() == "" or "Google" in result.stdout  # no result on a failure
    return errors[0]


def _job_file(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize("command", ["validate", "run", "submit"])
def test_an_s3_output_without_aws_credentials(make_spec, tmp_path, command):
    spec = make_spec()
    spec["output"]["url"] = "s3://chunk-ops-test-bucket/affinities"
    job, env = _job_file(tmp_path, spec), _no_aws(tmp_path)
    before = _files(tmp_path)
    error = _one_line_error(_chunk_ops(command, job, cwd=tmp_path, env=env))
    assert error.startswith("Error: s3://chunk-ops-test-bucket/affinities: no AWS credentials found (set ")
    assert [f for f in _files(tmp_path) if not f.startswith("home")] == [f for f in before if not f.startswith("home")]


def test_an_sqs_queue_without_a_region(make_spec, tmp_path):
    spec = make_spec()
    spec["queue"] = {"url": "sqs://chunk-ops-no-region"}
    env = {**_no_aws(tmp_path), "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    for command in ("validate", "submit"):
        error = _one_line_error(_chunk_ops(command, _job_file(tmp_path, spec), cwd=tmp_path, env=env))
        assert error == "Error: queue sqs://chunk-ops-no-region: no AWS region set (set AWS_DEFAULT_REGION, e.g. us-east-1)"
    worker = _one_line_error(_chunk_ops("worker", "--queue", "sqs://chunk-ops-no-region", cwd=tmp_path, env=env))
    assert "queue sqs://chunk-ops-no-region: no AWS region set" in worker
    assert not (tmp_path / "out").exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only file system (tmpfs mounted ro): unwritable even for root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a read-only tmpfs needs root (make test runs as root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_an_output_that_cannot_be_written_fails_validate_naming_it(make_spec, tmp_path, read_only_folder):
    spec = make_spec()
    spec["output"]["url"] = f"file://{read_only_folder}/affinities"
    for command in ("validate", "run"):
        error = _one_line_error(_chunk_ops(command, _job_file(tmp_path, spec), cwd=tmp_path))
        assert error == (f"Error: output.url file://{read_only_folder}/affinities cannot be written: "
                         f"Read-only file system (in {read_only_folder})")
    assert _files(read_only_folder) == []


def test_a_scratch_location_that_cannot_be_written(make_spec, tmp_path):
    spec = make_spec()
    (tmp_path / "a-file").write_text("not a folder")
    spec["scratch_url"] = f"file://{tmp_path}/a-file/scratch"
    error = _one_line_error(_chunk_ops("validate", _job_file(tmp_path, spec), cwd=tmp_path))
    assert error == f"Error: scratch_url file://{tmp_path}/a-file/scratch cannot be written: {tmp_path}/a-file is a file, not a folder"
    assert not (tmp_path / "out").exists()


def test_a_missing_input_layer_is_named(make_spec, tmp_path):
    spec = make_spec()
    spec["input"]["url"] = f"file://{tmp_path}/no-such-layer"
    error = _one_line_error(_chunk_ops("run", _job_file(tmp_path, spec), cwd=tmp_path))
    assert f"{tmp_path}/no-such-layer" in error and "info" in error
    assert not (tmp_path / "out").exists()


def test_sample_refuses_an_existing_layer_without_force(tmp_path):
    url = f"file://{tmp_path}/em"
    assert _chunk_ops("sample", url, "--shape", "32", "32", "4", cwd=tmp_path).returncode == 0
    files = {p: p.read_bytes() for p in (tmp_path / "em").rglob("*") if p.is_file()}
    error = _one_line_error(_chunk_ops("sample", url, "--shape", "32", "32", "4", "--seed", "3", cwd=tmp_path))
    assert error == f"Error: a layer exists at {url} already: add --force to overwrite it"
    assert {p: p.read_bytes() for p in (tmp_path / "em").rglob("*") if p.is_file()} == files
    forced = _chunk_ops("sample", url, "--shape", "32", "32", "4", "--seed", "3", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "em").rglob("*") if p.is_file()} != files


def test_submit_asks_before_enqueuing_more_than_the_limit(make_spec, tmp_path):
    spec = make_spec()  # 27 chunks
    job = _job_file(tmp_path, spec)
    queue = f"file://{tmp_path}/q.sqlite"
    error = _one_line_error(_chunk_ops("submit", job, "--queue", queue, "--confirm-above", "10", cwd=tmp_path))
    assert error == ("Error: refusing to enqueue 27 chunks (more than --confirm-above 10) without confirmation: "
                     "add --yes")
    assert not (tmp_path / "out").exists() and not (tmp_path / "q.sqlite").exists()

    env = {**os.environ, "CHUNK_OPS_CONFIRM_ABOVE": "10"}
    sent = _chunk_ops("submit", job, "--queue", queue, "--yes", "--json", cwd=tmp_path, env=env)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["sent"] == 27
    under = _chunk_ops("submit", job, "--queue", queue, "--json", "--confirm-above", "27", cwd=tmp_path)
    assert under.returncode == 0 and json.loads(under.stdout)["sent"] == 27  # at the limit: no question


def test_validate_prints_the_plan_with_its_bytes_and_hours(make_spec, tmp_path):
    spec = make_spec(out_channels=3)
    spec["postprocess"] = {"pyramid_levels": 1, "segmentation": {"method": "components"}}
    job = _job_file(tmp_path, spec)
    plan = _chunk_ops("validate", job, "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    numbers = json.loads(plan.stdout)
    voxels = 40 * 36 * 12
    assert numbers["output_bytes"] == int(voxels * 3 * 4 * (1 + 1 / 4) + voxels * 4)  # float32 + mip 1 + labels
    # stage-1 partial sums cover the region plus, per chunk, the overhang of its last patch
    assert voxels * 3 * 4 < numbers["scratch_bytes"] < 2 * voxels * 3 * 4
    assert numbers["patches_per_s"] > 0 and numbers["hours_here"] == pytest.approx(
        numbers["patches"] / numbers["patches_per_s"] / 3600, rel=0.01, abs=1e-3)
    human = _chunk_ops("validate", job, cwd=tmp_path)
    lines = human.stdout.splitlines()
    assert lines[0].startswith(f"valid: job {numbers['job_id']}, 27 chunks (0 done)")
    assert any(line.startswith("scratch: up to ") for line in lines)
    assert any(line.startswith("time: ") and "for one worker like this machine" in line for line in lines)
    assert not (tmp_path / "out").exists()
