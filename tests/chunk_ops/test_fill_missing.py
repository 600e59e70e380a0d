"""Inputs with holes: blocks missing from storage (``input.fill_missing``) and blacked-out
sections (``input.blackout_sections``), through whole jobs on precomputed layers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from chunk_ops.geometry import Box
from chunk_ops.job import Job
from chunk_ops.pipeline import run_job
from chunk_ops.volumes import VolumeError, create_volume, open_volume

FILL = 100  # raw input units; not 0, so a filled hole differs from an unwritten block
# blocks of the sample layer (16 x 16 x 4 on a 40 x 36 x 12 volume) deleted from storage
MISSING = [Box((16, 16, 4), (32, 32, 8)), Box((32, 0, 8), (40, 16, 12))]
BLACKOUT = 5  # a z section inside a block that stays


def _copy(source_url: str, target_url: str) -> np.ndarray:
    """A copy of a precomputed layer, blocks alike; returns its voxels."""
    source = open_volume(source_url)
    target = create_volume(target_url, bounds=source.bounds, block_size=source.block_size, dtype=source.dtype.name,
                           num_channels=source.num_channels, resolution=source.resolution)
    data = source.read(source.bounds)
    target.write(source.bounds, data)
    return data


def _block_file(url: str, box: Box) -> Path:
    """The stored file of one block of a file:// precomputed layer (cloud-volume gzips it)."""
    (found,) = Path(url.removeprefix("file://")).glob(f"*/{box.to_filename()}*")
    return found


@pytest.fixture
def holey(make_spec, tmp_path):
    """The sample input with MISSING deleted, and a copy where those blocks and the section
    BLACKOUT really hold FILL."""
    spec = make_spec()
    holey_url, filled_url = f"file://{tmp_path}/holey", f"file://{tmp_path}/filled"
    data = _copy(spec["input"]["url"], holey_url)
    for box in MISSING:
        _block_file(holey_url, box).unlink()
    bounds = open_volume(holey_url).bounds
    for box in MISSING:
        data[(slice(None), *box.to_zyx_slices(bounds))] = FILL
    data[:, BLACKOUT] = FILL
    filled = create_volume(filled_url, bounds=bounds, block_size=open_volume(holey_url).block_size,
                           dtype="uint8", num_channels=1, resolution=open_volume(holey_url).resolution)
    filled.write(bounds, data)
    return holey_url, filled_url


def _spec(make_spec, input_url: str, output: str, **input_options) -> dict:
    spec = make_spec(output=output)
    spec["input"] = {"url": input_url, "fill_value": FILL, **input_options}
    return spec


def _output_blocks(url: str) -> list[Path]:
    root = Path(url.removeprefix("file://"))
    return [p for p in root.rglob("*") if p.is_file() and p.name != "info" and "jobs" not in p.parts]


def test_holes_reach_the_network_as_the_fill_value(make_spec, holey):
    holey_url, filled_url = holey
    job = Job.open(_spec(make_spec, holey_url, "out", fill_missing=True, blackout_sections=[BLACKOUT]))
    run_job(job)
    reference = Job.open(_spec(make_spec, filled_url, "reference"))
    run_job(reference)
    got = open_volume(job.spec.output_url).read(job.roi)
    np.testing.assert_array_equal(got, open_volume(reference.spec.output_url).read(reference.roi))

    # the holes mattered: the output over the original input differs around them
    original = Job.open(_spec(make_spec, make_spec()["input"]["url"], "original"))
    run_job(original)
    assert np.abs(got - open_volume(original.spec.output_url).read(original.roi)).max() > 0.01


def test_without_fill_missing_the_job_fails_naming_the_block_and_writes_no_block(make_spec, holey):
    holey_url, _ = holey
    job = Job.open(_spec(make_spec, holey_url, "out"))
    with pytest.raises(VolumeError) as e:
        run_job(job)
    message = str(e.value)
    assert "\n" not in message and "input.fill_missing" in message
    named = re.search(r"block (\S+) is missing", message).group(1)
    assert any(named == f"{holey_url}/4_4_40/{box.to_filename()}" for box in MISSING), message
    assert _output_blocks(job.spec.output_url) == []


def test_the_holes_are_part_of_the_job_id(make_spec, holey):
    holey_url, _ = holey
    ids = {Job.open(_spec(make_spec, holey_url, "out", **options)).id for options in (
        {}, {"fill_missing": True}, {"fill_missing": True, "blackout_sections": [BLACKOUT]},
        {"fill_missing": True, "blackout_sections": [BLACKOUT, 7]},
    )}
    assert len(ids) == 4
    in_order = Job.open(_spec(make_spec, holey_url, "out", blackout_sections=[3, 7]))
    assert Job.open(_spec(make_spec, holey_url, "out", blackout_sections=[7, 3, 7])).id == in_order.id


def test_a_blackout_section_outside_the_input_is_refused_before_anything_is_written(make_spec, holey, tmp_path):
    holey_url, _ = holey
    with pytest.raises(VolumeError, match=r"blackout section 12 is outside the z range \[0, 12\)"):
        Job.open(_spec(make_spec, holey_url, "out", fill_missing=True, blackout_sections=[2, 12]))
    assert not (tmp_path / "out").exists()
