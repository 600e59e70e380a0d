"""Raw precomputed blocks written by chunk_ops itself (gzip level 1), checked against cloud-volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cloudfiles.compression import gunzip, gzip_compress
from cloudvolume import CloudVolume

from chunk_ops.geometry import Box, Vec3
from chunk_ops.volumes.precomputed import PrecomputedVolume

BOUNDS = Box((10, 20, 3), (50, 44, 9))  # non-zero offset; x and z end mid-block
BLOCK = Vec3(16, 8, 4)
BOXES = [BOUNDS, Box((26, 28, 3), (50, 44, 7))]  # both touch the upper x bound (clipped blocks)
CASES = [("float32", 3), ("uint8", 1)]


def make_layer(tmp_path: Path, name: str, dtype: str, channels: int, encoding: str = "raw") -> str:
    url = f"file://{tmp_path}/{name}"
    if encoding == "raw":
        PrecomputedVolume.create(url, bounds=BOUNDS, block_size=BLOCK, dtype=dtype,
                                 num_channels=channels, resolution=[4, 4, 40])
    else:
        info = CloudVolume.create_new_info(
            num_channels=channels, layer_type="segmentation", data_type=dtype, encoding=encoding,
            resolution=[4, 4, 40], voxel_offset=BOUNDS.start.to_list(),
            volume_size=BOUNDS.shape.to_list(), chunk_size=BLOCK.to_list(),
        )
        CloudVolume(url, info=info, progress=False).commit_info()
    return url


def data_for(dtype: str, channels: int, box: Box) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (channels, *box.shape.zyx())
    if dtype == "float32":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 256, shape, dtype=dtype)


def stored_blocks(tmp_path: Path, name: str) -> dict[str, bytes]:
    """The block files of a layer's one scale, as stored (gzip), by file name."""
    (scale,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
    return {p.name: p.read_bytes() for p in sorted(scale.iterdir())}


@pytest.mark.parametrize("dtype,channels", CASES)
@pytest.mark.parametrize("box", BOXES, ids=["whole", "corner"])
def test_reads_back_exactly_through_cloudvolume(tmp_path, dtype, channels, box):
    url = make_layer(tmp_path, "ours", dtype, channels)
    data = data_for(dtype, channels, box)
    PrecomputedVolume(url).write(box, data)

    xyzc = np.asarray(CloudVolume(url, progress=False, bounded=True)[box.to_slices()])
    assert xyzc.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(xyzc.transpose(3, 2, 1, 0), data)
    np.testing.assert_array_equal(PrecomputedVolume(url).read(box), data)


@pytest.mark.parametrize("dtype,channels", CASES)
@pytest.mark.parametrize("box", BOXES, ids=["whole", "corner"])
def test_blocks_are_cloudvolumes_blocks_at_gzip_level_1(tmp_path, dtype, channels, box):
    data = data_for(dtype, channels, box)
    PrecomputedVolume(make_layer(tmp_path, "ours", dtype, channels)).write(box, data)
    theirs = make_layer(tmp_path, "theirs", dtype, channels)
    CloudVolume(theirs, progress=False, non_aligned_writes=False)[box.to_slices()] = data.transpose(3, 2, 1, 0)

    ours, reference = stored_blocks(tmp_path, "ours"), stored_blocks(tmp_path, "theirs")
    assert list(ours) == list(reference)  # same names, e.g. "42-50_20-28_7-9.gz" (clipped)
    assert any(name.startswith("42-50_") for name in ours)
    for name, stored in ours.items():
        raw = gunzip(reference[name])
        assert stored[:2] == b"\x1f\x8b", name  # gzip
        assert gunzip(stored) == raw, name
        assert stored[8] == 4, name  # gzip header XFL: 4 = fastest (level 1); level 9 writes 2
        assert len(stored) == len(gzip_compress(raw, 1)), name


def test_other_encodings_still_go_through_cloudvolume(tmp_path):
    url = make_layer(tmp_path, "seg", "uint32", 1, encoding="compressed_segmentation")
    data = np.random.default_rng(3).integers(0, 5, (1, *BOUNDS.shape.zyx()), dtype=np.uint32)
    PrecomputedVolume(url).write(BOUNDS, data)
    xyzc = np.asarray(CloudVolume(url, progress=False)[BOUNDS.to_slices()])
    np.testing.assert_array_equal(xyzc.transpose(3, 2, 1, 0), data)


def test_mem_layers_keep_cloudvolumes_in_memory_blocks(tmp_path):
    url = f"mem://{tmp_path.name}/layer"  # cloud-volume keeps raw mem:// blocks as arrays, not files
    PrecomputedVolume.create(url, bounds=BOUNDS, block_size=BLOCK, dtype="float32", num_channels=3,
                             resolution=[4, 4, 40])
    data = data_for("float32", 3, BOUNDS)
    PrecomputedVolume(url).write(BOUNDS, data)
    np.testing.assert_array_equal(PrecomputedVolume(url).read(BOUNDS), data)


def test_a_sharded_scale_is_written_as_shards_by_cloud_volume(tmp_path):
    """Loose block files in a sharded scale would be invisible to every reader."""
    url = f"file://{tmp_path}/sharded"
    info = CloudVolume.create_new_info(
        num_channels=1, layer_type="image", data_type="uint8", encoding="raw", resolution=[4, 4, 40],
        voxel_offset=[0, 0, 0], volume_size=[32, 32, 8], chunk_size=[16, 16, 4],
    )
    info["scales"][0]["sharding"] = {
        "@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 0, "hash": "identity",
        "minishard_bits": 0, "shard_bits": 0, "minishard_index_encoding": "gzip", "data_encoding": "gzip",
    }
    CloudVolume(url, info=info, progress=False).commit_info()
    box = Box((0, 0, 0), (32, 32, 8))
    data = np.random.default_rng(3).integers(0, 255, (1, 8, 32, 32), dtype=np.uint8)
    PrecomputedVolume(url).write(box, data)
    scale = Path(f"{tmp_path}/sharded") / CloudVolume(url).key
    assert all(p.name.endswith(".shard") for p in scale.iterdir())
    read = np.asarray(CloudVolume(url, progress=False)[0:32, 0:32, 0:8]).transpose(3, 2, 1, 0)
    assert np.array_equal(read, data)
