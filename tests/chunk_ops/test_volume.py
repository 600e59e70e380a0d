"""Volume I/O through cloud-volume on file:// layers."""

from __future__ import annotations

import numpy as np
import pytest
from cloudvolume import CloudVolume

from chunk_ops.geometry import Box, Vec3
from chunk_ops.volumes import Volume, VolumeError, create_volume, open_volume


@pytest.fixture
def layer(tmp_path):
    # y is 30 voxels: one whole 16-voxel block and a 14-voxel one at the face
    vol = create_volume(
        f"file://{tmp_path}/layer", bounds=Box((10, 20, 30), (74, 50, 38)), block_size=Vec3(16, 16, 4),
        dtype="float32", num_channels=2, resolution=(4, 4, 40),
    )
    vol.write(vol.bounds, np.zeros((2, 8, 30, 64), np.float32))
    return vol


def test_arrays_are_czyx_and_land_where_cloudvolume_says(layer):
    box = Box((10, 20, 30), (26, 36, 34))
    data = np.arange(2 * 4 * 16 * 16, dtype=np.float32).reshape(2, 4, 16, 16)  # c, z, y, x
    layer.write(box, data)
    raw = CloudVolume(layer.url, progress=False)[10:26, 20:36, 30:34]  # x, y, z, c
    for c, z, y, x in [(0, 0, 0, 0), (1, 3, 2, 5), (0, 1, 15, 7), (1, 2, 9, 15)]:
        assert raw[x, y, z, c] == data[c, z, y, x]
    np.testing.assert_array_equal(layer.read(box), data)
    assert layer.resolution == [4, 4, 40]


def test_reads_outside_the_bounds_are_filled(tmp_path, layer):
    layer.write(layer.bounds, np.ones((2, 8, 30, 64), np.float32))
    filled = open_volume(layer.url, 0, fill_value=-7.0)
    out = filled.read(Box((5, 20, 30), (15, 22, 31)))  # 5 voxels in x before the volume
    assert out.shape == (2, 1, 2, 10)
    assert (out[..., :5] == -7).all() and (out[..., 5:] == 1).all()


@pytest.mark.parametrize(
    "box, message",
    [
        (Box((12, 20, 30), (26, 36, 34)), r"not aligned to the storage blocks \[16, 16, 4\]"),
        (Box((10, 20, 30), (26, 36, 33)), r"not aligned to the storage blocks"),
        (Box((58, 20, 30), (80, 36, 34)), r"outside the layer bounds"),
    ],
)
def test_unaligned_or_outside_writes_are_refused_and_write_nothing(layer, box, message):
    before = layer.read(layer.bounds)
    with pytest.raises(VolumeError, match=message) as e:
        layer.write(box, np.ones((2, *box.shape.zyx()), np.float32))
    assert repr(box) in str(e.value)
    np.testing.assert_array_equal(layer.read(layer.bounds), before)


def test_writes_ending_at_the_volume_face_are_aligned(layer):
    """A box may stop at the volume's face even where that is mid-block."""
    box = Box((10, 36, 30), (26, 50, 34))  # y stops at the face, 50, inside the second block
    layer.write(box, np.full((2, 4, 14, 16), 3, np.float32))
    assert (layer.read(box) == 3).all()


def test_a_missing_layer_is_named(tmp_path):
    with pytest.raises(VolumeError, match=rf"no precomputed layer at file://{tmp_path}/none"):
        open_volume(f"file://{tmp_path}/none", 0)
