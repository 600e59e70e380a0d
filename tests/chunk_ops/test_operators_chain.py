"""The chained command's sources, volume I/O, inference, control and view operators, run as
``chunk-ops chain ...`` (click's CliRunner, in this process) on real file:// volumes and
real embedded queues."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from chunk_ops.cli import main
from chunk_ops.geometry import Box, ChunkPlan, Vec3
from chunk_ops.job import Job
from chunk_ops.operators.io import FAMILIES
from chunk_ops.queues import open_queue
from chunk_ops.pipeline import run_job
from chunk_ops.task import Task
from chunk_ops.volumes import FORMATS, create_volume, open_volume, volume_exists


def chain(*args: object) -> Result:
    return CliRunner().invoke(main, ["chain", *map(str, args)])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def inference_summary(result: Result) -> dict:
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith('{"operator": "inference"')]
    assert len(lines) == 1, result.stderr
    return lines[0]


def box_args(box: Box) -> list[int]:
    return [*box.start, *box.stop]


def write_job(spec: dict, folder: Path) -> Path:
    path = folder / "job.json"
    path.write_text(json.dumps(spec))
    return path


def markers(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.json")}


JOBS = {
    "whole-volume": dict(),
    "roi-inside": dict(roi=((3, 5, 1), (37, 30, 11))),
    "uint8": dict(dtype="uint8"),
}


@pytest.mark.parametrize("case", sorted(JOBS))
def test_chain_equals_the_job_runner_and_a_rerun_skips_done_tasks(make_spec, tmp_path, case):
    spec = make_spec(**JOBS[case])  # job: chunks 16x16x4, patch 12x12x4, overlap 4x4x2, TinyConvNet
    job = Job.open(spec)
    run_job(job)
    expected = open_volume(job.spec.output_url).read(job.roi)
    job_file = write_job(spec, tmp_path)
    chained, done = f"file://{tmp_path}/chained", tmp_path / "done"
    # tasks 12x12x2: neither the job's chunks nor a multiple of its patch stride
    args = ["load-precomputed", "--url", spec["input"]["url"], "--expand-margin", 11, 11, 3,
            "inference", "--job", job_file,
            "save-precomputed", "--url", chained, "--volume-bounds", *box_args(job.roi), "--block-size", 4, 4, 2,
            "mark-done", "--prefix", f"file://{done}"]
    tasks = ChunkPlan(job.roi, Vec3(12, 12, 2), job.roi.start)
    assert {b.shape for b in tasks} != {Vec3(12, 12, 2)}, "some tasks must be clipped at the region's faces"

    first = ok(chain("generate-tasks", "--roi", *box_args(job.roi), "--chunk-size", 12, 12, 2, *args))

    got = open_volume(chained).read(job.roi)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == np.uint8:
        # equal bytes: the sums differ only by float rounding (~1e-7), which moves no value here
        # across a rounding step
        assert np.array_equal(got, expected)
    else:
        assert np.abs(got - expected).max() <= 1e-5
    assert markers(done) == {f"{b.to_filename()}.json" for b in tasks}
    ran = inference_summary(first)
    assert ran["tasks"] == len(tasks) and ran["patches"] >= ran["patches_in_job_grid"] == len(job.grid)

    rerun = ok(chain("generate-tasks", "--roi", *box_args(job.roi), "--chunk-size", 12, 12, 2,
                     "skip-if-done", "--prefix", f"file://{done}", *args))
    assert inference_summary(rerun)["tasks"] == 0 and inference_summary(rerun)["patches"] == 0
    assert "0 tasks through" in rerun.stderr


def test_inference_without_enough_margin_fails_naming_it_and_writes_nothing(make_spec, tmp_path):
    spec = make_spec()
    job_file = write_job(spec, tmp_path)
    out = f"file://{tmp_path}/chained"
    result = chain("generate-tasks", "--roi", 0, 0, 0, 40, 36, 12, "--chunk-size", 16, 16, 4,
                   "load-precomputed", "--url", spec["input"]["url"], "--expand-margin", 4, 4, 1,
                   "inference", "--job", job_file,
                   "save-precomputed", "--url", out, "--volume-bounds", 0, 0, 0, 40, 36, 12, "--block-size", 8, 8, 2)
    assert result.exit_code == 1
    message = result.output.strip().splitlines()
    assert len(message) == 1, result.output
    assert "inference Box([0, 0, 0], [16, 16, 4])" in message[0]
    # patches (12x12x4, stride 8x8x2) at origins x, y 0 and 8, z 0 and 2 reach 4, 4, 2 voxels past the box
    assert "a margin of [0, 0, 0] below and [4, 4, 2] above the task box, it has [4, 4, 1] and [4, 4, 1]" in message[0]
    assert "--expand-margin 11 11 3" in message[0]
    assert not volume_exists(out)


def test_inference_options_replace_the_jobs_fields(make_spec, tmp_path):
    """--blend constant: the same chain with another window is another result."""
    spec = make_spec(blend="bump")
    job_file = write_job(spec, tmp_path)
    outputs = {}
    for blend in ("bump", "constant"):
        out = f"file://{tmp_path}/{blend}"
        ok(chain("generate-tasks", "--roi", 0, 0, 0, 40, 36, 12, "--chunk-size", 16, 16, 4,
                 "load-precomputed", "--url", spec["input"]["url"], "--expand-margin", 11, 11, 3,
                 "inference", "--job", job_file, "--blend", blend, "--batch-size", 5,
                 "save-precomputed", "--url", out, "--volume-bounds", 0, 0, 0, 40, 36, 12, "--block-size", 8, 8, 2))
        outputs[blend] = open_volume(out).read(Box((0, 0, 0), (40, 36, 12)))
    assert np.abs(outputs["bump"] - outputs["constant"]).max() > 1e-3

    bad = chain("generate-tasks", "--roi", 0, 0, 0, 40, 36, 12, "--chunk-size", 16, 16, 4,
                "inference", "--job", job_file, "--blend", "gausian")
    assert bad.exit_code == 1
    assert bad.output == "Error: inference: job spec field inference.blend: 'gausian' is not one of " \
                         "['bump', 'gaussian', 'constant']\n"


def test_queue_tasks_are_each_done_once_and_deleted(make_spec, tmp_path):
    image = make_spec()["input"]["url"]
    queue_url = f"file://{tmp_path}/q.sqlite"
    sent = ok(chain("generate-tasks", "--volume", image, "--chunk-size", 16, 16, 4, "--queue", queue_url))
    assert "sent 27 tasks" in sent.stderr and "0 tasks through" in sent.stderr
    assert open_queue(queue_url).counts().visible == 27

    copy, done = f"file://{tmp_path}/copy", tmp_path / "done"
    worked = ok(chain("fetch-task", "--queue", queue_url, "--idle-exit", 0.3,
                      "load-precomputed", "--url", image,
                      "save-precomputed", "--url", copy, "--volume-bounds", 0, 0, 0, 40, 36, 12,
                      "--block-size", 8, 8, 2,
                      "mark-done", "--prefix", f"file://{done}",
                      "delete-task"))
    assert "27 tasks through" in worked.stderr
    counts = open_queue(queue_url).counts()
    assert (counts.visible, counts.in_flight, counts.dead) == (0, 0, 0)
    assert len(markers(done)) == 27
    whole = Box((0, 0, 0), (40, 36, 12))
    assert np.array_equal(open_volume(copy).read(whole), open_volume(image).read(whole))


def test_a_chain_failing_mid_task_leaves_its_message_to_come_back(make_spec, tmp_path):
    image = make_spec()["input"]["url"]
    queue_url = f"file://{tmp_path}/q.sqlite"
    ok(chain("generate-tasks", "--volume", image, "--chunk-size", 20, 36, 12, "--queue", queue_url))
    wrong = f"file://{tmp_path}/float-layer"  # the image is uint8: saving there fails
    create_volume(wrong, bounds=Box((0, 0, 0), (40, 36, 12)), block_size=Vec3(8, 8, 2), dtype="float32",
                  num_channels=1, resolution=(4, 4, 40))
    failed = chain("fetch-task", "--queue", queue_url, "--visibility-timeout", 2, "--idle-exit", 0.3,
                   "load-precomputed", "--url", image, "save-precomputed", "--url", wrong, "delete-task")
    assert failed.exit_code == 1 and "is uint8, the layer at" in failed.output
    counts = open_queue(queue_url).counts()
    assert (counts.visible, counts.in_flight) == (1, 1)  # leased, not deleted, no longer renewed
    time.sleep(2.5)
    assert open_queue(queue_url).counts().visible == 2


def test_a_message_that_is_no_chain_task_goes_to_the_dead_letters(tmp_path):
    queue_url = f"file://{tmp_path}/q.sqlite"
    queue = open_queue(queue_url, create=True, max_receives=1)
    queue.send_batch([Task("job", "file:///spec.json", 1, Box((0, 0, 0), (1, 1, 1))).to_json()])
    result = ok(chain("fetch-task", "--queue", queue_url, "--idle-exit", 0.5, "delete-task"))
    assert "0 tasks through" in result.stderr
    assert queue.counts().dead == 1


def test_fetch_task_from_a_missing_queue_fails_in_one_line(tmp_path):
    result = chain("fetch-task", "--queue", f"file://{tmp_path}/none.sqlite", "delete-task")
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"Error: fetch-task: no embedded queue at file://{tmp_path}/none.sqlite")


def test_generate_tasks_refuses_a_bad_region(tmp_path):
    result = chain("generate-tasks", "--roi", 0, 0, 0, 10, -4, 8, "--chunk-size", 4, 4, 4)
    assert result.exit_code == 2 and "box start [0, 0, 0] exceeds stop [10, -4, 8]" in result.output
    both = chain("generate-tasks", "--chunk-size", 4, 4, 4)
    assert both.exit_code == 2 and "exactly one of --roi and --volume" in both.output


def ramp(box: Box, channels: int = 1) -> np.ndarray:
    c, z, y, x = np.ogrid[:channels, box.start.z:box.stop.z, box.start.y:box.stop.y, box.start.x:box.stop.x]
    return x + y + z + c


LOCATIONS = {"precomputed": "vol", "zarr": "vol.zarr", "zarr3": "vol.zarr", "ome-zarr": "vol.zarr", "n5": "vol.n5",
             "h5": "vol.h5#/raw", "tif": "vol-tif/", "npy": "vol.npy"}
BLOCKS = {"tif": (16, 12, 1)}  # a TIFF stack stores whole z sections


@pytest.mark.parametrize("command, fmt", [(family, family) for family in sorted(FAMILIES)]
                         + [("zarr", "zarr3"), ("zarr", "ome-zarr"), ("volume", "n5"), ("volume", "precomputed")])
def test_save_and_load_commands_round_trip_each_format(tmp_path, command, fmt):
    """save-COMMAND then load-COMMAND; a bare storage URL gets the command's format, else the URL
    names it; checked against the closed-form ramp through a precomputed copy."""
    if fmt not in FORMATS:
        pytest.skip(f"volume format {fmt!r}: chunk_ops/volumes has no module for it yet")
    whole = Box((2, 0, 1), (18, 12, 7))
    where = f"file://{tmp_path}/{LOCATIONS[fmt]}"
    url = where if fmt == command else f"{fmt}://{where}"
    ok(chain("create-chunk", "--size", 16, 12, 6, "--voxel-offset", 2, 0, 1, "--channels", 2, "--dtype", "uint16",
             "--pattern", "ramp", f"save-{command}", "--url", url, "--volume-bounds", *box_args(whole),
             "--block-size", *BLOCKS.get(fmt, (8, 4, 2))))
    assert volume_exists(f"{fmt}://{where}")
    copy = f"file://{tmp_path}/copy"
    ok(chain("generate-tasks", "--roi", *box_args(whole), "--chunk-size", 8, 4, 2,
             f"load-{command}", "--url", url,
             "save-precomputed", "--url", copy, "--volume-bounds", *box_args(whole), "--block-size", 8, 4, 2))
    got = open_volume(copy).read(whole)
    assert got.dtype == np.uint16 and np.array_equal(got, ramp(whole, 2))


def test_a_command_bound_to_a_format_refuses_another(tmp_path):
    result = chain("generate-tasks", "--roi", 0, 0, 0, 4, 4, 4, "--chunk-size", 4, 4, 4,
                   "load-zarr", "--url", f"precomputed://file://{tmp_path}/x")
    assert result.exit_code == 1
    assert "load-zarr: --url 'precomputed://file://" in result.output
    assert "is a precomputed volume, not zarr" in result.output


def test_save_needs_bounds_and_blocks_to_create_a_layer(tmp_path):
    missing = chain("create-chunk", "--size", 4, 4, 4, "save-precomputed", "--url", f"file://{tmp_path}/new")
    assert missing.exit_code == 1
    assert "give --volume-bounds and --block-size to create it" in missing.output
    assert not (tmp_path / "new").exists()


def test_random_chunks_are_seeded_and_all_zero_chunks_are_skipped(tmp_path):
    def random_layer(name: str, seed: int) -> np.ndarray:
        url = f"file://{tmp_path}/{name}"
        ok(chain("create-chunk", "--size", 8, 8, 4, "--pattern", "random", "--seed", seed,
                 "save-precomputed", "--url", url, "--volume-bounds", 0, 0, 0, 8, 8, 4, "--block-size", 8, 8, 4))
        return open_volume(url).read(Box((0, 0, 0), (8, 8, 4)))

    a, again, other = random_layer("a", 1), random_layer("again", 1), random_layer("other", 2)
    assert np.array_equal(a, again) and not np.array_equal(a, other) and len(np.unique(a)) > 100

    zeros = f"file://{tmp_path}/zeros"
    skipped = ok(chain("create-chunk", "--pattern", "zeros", "skip-all-zero",
                       "save-precomputed", "--url", zeros, "--volume-bounds", 0, 0, 0, 64, 64, 8,
                       "--block-size", 8, 8, 4))
    assert "0 tasks through" in skipped.stderr and not volume_exists(zeros)


def test_view_prints_a_viewer_url_that_serves(tmp_path):
    result = ok(chain("create-chunk", "--size", 8, 8, 4, "--pattern", "ramp", "view", "--no-wait"))
    url = result.stdout.strip()
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as page:
        assert page.status == 200
