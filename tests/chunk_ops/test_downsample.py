"""The downsampled pyramid against a numpy oracle; built box by box (one task each) as one
process builds it, byte for byte; its levels added once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from chunk_ops.downsample import FACTOR, build_block, build_mip, build_pyramid, ensure_mips, pyramid_plan
from chunk_ops.geometry import Box, Vec3
from chunk_ops.volumes import VolumeError, add_mip, create_volume, mip_count, open_volume


def _mean_2x2(czyx: np.ndarray) -> np.ndarray:
    """Oracle: 2x2x1 means, edge voxels repeated where the size is odd."""
    c, z, y, x = czyx.shape
    padded = np.pad(czyx.astype(np.float64), [(0, 0), (0, 0), (0, y % 2), (0, x % 2)], mode="edge")
    return padded.reshape(c, z, (y + 1) // 2, 2, (x + 1) // 2, 2).mean(axis=(3, 5))


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_two_levels_match_the_oracle(tmp_path, dtype):
    bounds = Box((0, 0, 0), (70, 45, 6))  # odd sizes on purpose
    vol = create_volume(f"file://{tmp_path}/layer", bounds=bounds, block_size=Vec3(16, 16, 2),
                        dtype=dtype, num_channels=2, resolution=(4, 4, 40))
    rng = np.random.default_rng(0)
    data = (rng.random((2, 6, 45, 70)) * (255 if dtype == "uint8" else 1)).astype(dtype)
    vol.write(bounds, data)

    assert build_pyramid(vol.url, 2) == [3, 3]  # chunks of 4x4x1 blocks: 3 z-slabs per level
    mip1, mip2 = open_volume(vol.url, 1), open_volume(vol.url, 2)
    assert mip1.resolution == [8, 8, 40] and mip2.resolution == [16, 16, 40]
    expected1 = _mean_2x2(data)
    got1 = mip1.read(mip1.bounds)
    tolerance = 1e-6 if dtype == "float32" else 1.0  # uint8 results are rounded
    assert got1.shape == expected1.shape and np.abs(got1 - expected1).max() <= tolerance
    expected2 = _mean_2x2(got1)
    assert np.abs(mip2.read(mip2.bounds) - expected2).max() <= tolerance


# --- the pyramid as one task per box ------------------------------------------------------
# A layer whose size is no multiple of its blocks, at an odd offset: edge padding at both ends.
BOUNDS = Box((3, 5, 1), (153, 102, 8))
BLOCK = Vec3(8, 8, 2)
LEVELS = 3


def _layer(folder: Path, dtype: str = "float32", bounds: Box = BOUNDS) -> str:
    vol = create_volume(f"file://{folder}", bounds=bounds, block_size=BLOCK, dtype=dtype, num_channels=2,
                        resolution=(4, 4, 40))
    rng = np.random.default_rng(1)
    data = rng.random((2, *bounds.shape.zyx())) * (255 if dtype == "uint8" else 1)
    vol.write(bounds, data.astype(dtype))
    return vol.url


def _files(folder: Path) -> dict[str, bytes]:
    """Every stored file of a layer (info and blocks of every level), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _scales(folder: Path) -> list[dict]:
    return json.loads((folder / "info").read_text())["scales"]


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_blocks_in_random_order_give_the_single_task_pyramid_byte_for_byte(tmp_path, dtype):
    single, distributed = tmp_path / "single", tmp_path / "distributed"
    build_pyramid(_layer(single, dtype), LEVELS)

    url = _layer(distributed, dtype)
    assert ensure_mips(url, LEVELS) == LEVELS + 1
    rng = np.random.default_rng(7)
    for mip in range(1, LEVELS + 1):  # the barrier: level mip - 1 is whole before level mip starts
        plan = pyramid_plan(url, mip)
        order = rng.permutation(len(plan))
        assert len(plan) == 1 or list(order) != sorted(order)
        for i in order:
            build_block(url, mip, plan[int(i)])

    assert [len(pyramid_plan(url, mip)) for mip in (1, 2, 3)] == [24, 8, 4]  # 75x49, 38x25, 19x13 (x 7 z)
    got, expected = _files(distributed), _files(single)
    assert len(_scales(single)) == LEVELS + 1 and sum(n != "info" for n in expected) > 100
    assert sorted(got) == sorted(expected)
    assert [n for n in expected if got[n] != expected[n]] == []


def test_the_plan_tiles_its_level_with_aligned_boxes(tmp_path):
    url = _layer(tmp_path / "layer")
    ensure_mips(url, 1)
    level, plan = open_volume(url, 1), pyramid_plan(url, 1)
    assert plan.roi == level.bounds and sum(box.size for box in plan) == level.bounds.size
    assert all(box.is_aligned(level.bounds.start, level.block_size, level.bounds) for box in plan)
    assert build_mip(url, 1) == len(plan)


def test_a_block_built_twice_gives_the_same_bytes(tmp_path):
    folder = tmp_path / "layer"
    url = _layer(folder)
    ensure_mips(url, 1)
    box = pyramid_plan(url, 1)[4]
    build_block(url, 1, box)
    first = _files(folder)
    assert len(list((folder / _scales(folder)[1]["key"]).glob("*"))) == 12  # 4 x 3 blocks: it ends at the y bound
    build_block(url, 1, box)
    assert _files(folder) == first


def test_a_rerun_adds_no_mip_and_changes_no_byte(tmp_path):
    folder = tmp_path / "layer"
    url = _layer(folder)
    assert build_pyramid(url, 2) == [24, 8]
    first = _files(folder)
    assert len(_scales(folder)) == 3
    assert build_pyramid(url, 2) == [24, 8]
    assert ensure_mips(url, 2) == 3 and ensure_mips(url, 1) == 3  # fewer levels asked: none removed
    assert _files(folder) == first


@pytest.mark.parametrize("name", ["precomputed", "ome-zarr"])
def test_two_runs_that_both_found_a_level_missing_add_it_once(tmp_path, name):
    """The bug: a level was added as "one above the top", so a run that had seen mip 2
    missing stacked mip 3 on the mip 2 another run had just added (four processes
    building a 3-level pyramid at once ended with 5 levels, about 1 time in 15).  Now a
    level is added by its index."""
    url = f"file://{tmp_path}/layer" if name == "precomputed" else f"ome-zarr://file://{tmp_path}/layer.zarr"
    create_volume(url, bounds=BOUNDS, block_size=BLOCK, dtype="uint8", num_channels=1, resolution=(4, 4, 40))
    assert ensure_mips(url, 1) == 2
    # runs A and B both read 2 levels; A adds mip 2, then B adds the mip it found missing
    assert ensure_mips(url, 2) == 3
    assert add_mip(url, FACTOR, 2) == 2
    assert mip_count(url) == 3
    assert [open_volume(url, mip).resolution for mip in range(3)] == [[4, 4, 40], [8, 8, 40], [16, 16, 40]]
    with pytest.raises(VolumeError, match="cannot add mip 5; its levels are 0 to 2"):
        add_mip(url, FACTOR, 5)


def test_single_level_formats_get_no_mips_and_one_log_line(tmp_path, caplog):
    url = f"n5://file://{tmp_path}/layer.n5"
    create_volume(url, bounds=BOUNDS, block_size=BLOCK, dtype="uint8", num_channels=1, resolution=(4, 4, 40))
    with caplog.at_level(logging.INFO, logger="chunk_ops.downsample"):
        assert ensure_mips(url, 0) == 0
        assert ensure_mips(url, 2) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"no pyramid for {url}: the n5 format holds one resolution level"]


def test_the_fence_runs_before_the_write_and_a_raising_fence_writes_nothing(tmp_path):
    folder = tmp_path / "layer"
    url = _layer(folder)
    ensure_mips(url, 1)
    level = folder / _scales(folder)[1]["key"]
    first, second = pyramid_plan(url, 1)[0], pyramid_plan(url, 1)[1]
    seen = []
    build_block(url, 1, first, fence=lambda: seen.append(sorted(p.name for p in level.glob("*"))))
    assert seen == [[]] and len(list(level.glob("*"))) == 16  # 4x4x1 blocks, after the fence

    class Fenced(Exception):
        pass

    def fence() -> None:
        raise Fenced("a newer lease holds this task")

    written = _files(folder)
    with pytest.raises(Fenced):
        build_block(url, 1, second, fence=fence)
    assert _files(folder) == written


def test_build_block_names_what_is_wrong(tmp_path):
    url = _layer(tmp_path / "layer")
    with pytest.raises(VolumeError, match="no mip 1"):
        build_block(url, 1, Box((0, 0, 1), (32, 32, 3)))
    ensure_mips(url, 1)
    with pytest.raises(ValueError, match="pyramid level 0"):
        build_block(url, 0, Box((0, 0, 1), (32, 32, 3)))
    with pytest.raises(VolumeError, match="not inside the bounds"):
        build_block(url, 1, Box((0, 0, 1), (32, 32, 30)))
    with pytest.raises(VolumeError, match="not aligned"):
        build_block(url, 1, Box((1, 2, 1), (20, 20, 3)))
