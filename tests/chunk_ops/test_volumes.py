"""The volume contract, run on every format in ``FORMATS``; then formats in jobs and pyramids."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from chunk_ops.downsample import build_pyramid
from chunk_ops.geometry import Box, Vec3
from chunk_ops.job import Job
from chunk_ops.spec import SpecError, job_spec_schema, parse_spec
from chunk_ops.pipeline import validate
from chunk_ops.pipeline import run_job
from chunk_ops.storage import StorageError
from chunk_ops.volumes import (
    FORMATS, VolumeError, create_volume, layer_folder, open_volume, split_format, volume_exists,
)

# one layer URL per format: adding a format means adding it here
LAYERS = {
    "precomputed": "file://{tmp}/layer",
    "zarr": "zarr://file://{tmp}/layer.zarr",
    "zarr3": "zarr3://file://{tmp}/layer.zarr",
    "ome-zarr": "ome-zarr://file://{tmp}/layer.ome.zarr",
    "n5": "n5://file://{tmp}/layer.n5",
    "h5": "h5://file://{tmp}/layer.h5#/volumes/raw",
    "tif": "tif://file://{tmp}/stack",
    "npy": "npy://file://{tmp}/layer.npy",
}
WHOLE_SECTION_BLOCKS = {"tif"}  # a block spans the volume in x and y
NOTHING_MISSING = {"npy"}  # every block of the file is stored

BOUNDS = Box((10, 20, 3), (50, 44, 9))  # 40 x 24 x 6: x and z end mid-block
RESOLUTION = [3.5, 4, 40]
CASES = [("uint8", 1), ("float32", 3), ("uint32", 1), ("uint64", 1), ("uint64", 3)]


def layer_url(name: str, tmp_path: Path) -> str:
    return LAYERS[name].format(tmp=tmp_path)


def block_for(name: str) -> Vec3:
    return Vec3(40, 24, 4) if name in WHOLE_SECTION_BLOCKS else Vec3(16, 8, 4)


def random_data(dtype: str, channels: int, box: Box, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (channels, *box.shape.zyx())
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    # labels above 2**53 would not survive a trip through float64
    return rng.integers(1, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def make_layer(name: str, tmp_path: Path, dtype: str = "float32", channels: int = 1):
    return create_volume(layer_url(name, tmp_path), bounds=BOUNDS, block_size=block_for(name), dtype=dtype,
                         num_channels=channels, resolution=RESOLUTION)


def test_every_format_is_in_the_contract():
    assert set(LAYERS) == set(FORMATS)


@pytest.mark.parametrize("dtype, channels", CASES)
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_written_blocks_read_back_with_their_metadata(tmp_path, name, dtype, channels):
    url = layer_url(name, tmp_path)
    assert not volume_exists(url)
    vol = make_layer(name, tmp_path, dtype, channels)
    assert volume_exists(url)
    data = random_data(dtype, channels, BOUNDS)
    # two block-aligned boxes that tile the volume: z 3-7 (one block) and 7-9 (ends at the face)
    lower, upper = Box((10, 20, 3), (50, 44, 7)), Box((10, 20, 7), (50, 44, 9))
    vol.write(lower, data[:, :4])
    vol.write(upper, data[:, 4:])

    for opened in (vol, open_volume(url)):
        assert opened.bounds == BOUNDS
        assert opened.block_size == block_for(name)
        assert opened.dtype == np.dtype(dtype)
        assert opened.num_channels == channels
        assert opened.resolution == RESOLUTION
        got = opened.read(BOUNDS)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, data)
    inner = Box((13, 21, 4), (31, 40, 8))  # crosses blocks on every axis
    np.testing.assert_array_equal(open_volume(url).read(inner), data[(slice(None), *inner.to_zyx_slices(BOUNDS))])


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_reads_outside_the_bounds_are_filled(tmp_path, name):
    vol = make_layer(name, tmp_path)
    data = random_data("float32", 1, BOUNDS)
    vol.write(BOUNDS, data)
    box = Box((5, 40, 8), (15, 50, 10))  # before x, after y and z
    got = open_volume(vol.url, fill_value=-7.0).read(box)
    assert got.shape == (1, 2, 10, 10)
    inside = box.intersection(BOUNDS)
    np.testing.assert_array_equal(got[(slice(None), *inside.to_zyx_slices(box))],
                                  data[(slice(None), *inside.to_zyx_slices(BOUNDS))])
    mask = np.ones(got.shape, bool)
    mask[(slice(None), *inside.to_zyx_slices(box))] = False
    assert (got[mask] == -7).all() and mask.sum() == got.size - inside.size


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_unaligned_writes_are_refused_and_write_nothing(tmp_path, name):
    vol = make_layer(name, tmp_path)
    vol.write(BOUNDS, np.zeros((1, 6, 24, 40), np.float32))
    box = Box((10, 20, 4), (50, 44, 7))  # z starts mid-block (blocks start at 3, 7)
    with pytest.raises(VolumeError, match=re.escape(f"{box!r} is not aligned to the storage blocks")) as e:
        vol.write(box, np.ones((1, 3, 24, 40), np.float32))
    assert vol.url in str(e.value) and "\n" not in str(e.value)
    assert (open_volume(vol.url).read(BOUNDS) == 0).all()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_missing_layer_is_an_error_naming_it(tmp_path, name):
    url = layer_url(name, tmp_path)
    with pytest.raises(VolumeError, match=re.escape(url)):
        open_volume(url)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_missing_blocks_are_named_or_filled(tmp_path, name):
    vol = make_layer(name, tmp_path)
    written = Box((10, 20, 3), (50, 44, 7))  # the first z block only
    data = random_data("float32", 1, written)
    vol.write(written, data)
    box = Box((20, 22, 5), (30, 30, 9))  # half written, half never written
    if name in NOTHING_MISSING:
        assert (open_volume(vol.url, fill_value=5.0).read(box)[:, 2:] == 0).all()  # what an unwritten block holds
        return
    with pytest.raises(VolumeError, match=r"block .* is missing.*input\.fill_missing") as e:
        open_volume(vol.url).read(box)
    assert vol.url in str(e.value) and "\n" not in str(e.value)

    got = open_volume(vol.url, fill_value=5.0, fill_missing=True).read(box)
    np.testing.assert_array_equal(got[:, :2], data[:, 2:4, 2:10, 10:20])
    assert (got[:, 2:] == 5).all()


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_blacked_out_sections_read_as_the_fill_value(tmp_path, name):
    vol = make_layer(name, tmp_path, "uint8", 3)
    data = random_data("uint8", 3, BOUNDS)
    vol.write(BOUNDS, data)
    got = open_volume(vol.url, fill_value=9, blackout_sections=[4, 8]).read(BOUNDS)
    expected = data.copy()
    expected[:, [1, 5]] = 9  # z 4 and 8, from z 3
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(VolumeError, match=r"blackout section 9 is outside the z range \[3, 9\)"):
        open_volume(vol.url, blackout_sections=[9])


# --- URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("foo://file:///x", r"foo://file:///x: unknown scheme 'foo://'"),
    ("ftp://host/x", r"ftp://host/x: unknown scheme 'ftp://'"),
    ("zarr:///data/x.zarr", r"zarr:///data/x.zarr: after 'zarr://' comes a storage URL"),
    ("h5://file:///data/x.h5", r"h5://file:///data/x.h5 names no dataset"),
    ("npy://gs://bucket/x.npy", r"npy://gs://bucket/x.npy: \.npy volumes are local files"),
])
def test_bad_urls_are_named(url, message):
    with pytest.raises(VolumeError, match=message):
        open_volume(url)


def test_split_format():
    assert split_format("zarr://gs://b/x.zarr") == ("zarr", "gs://b/x.zarr")
    assert split_format("precomputed://s3://b/x") == ("precomputed", "s3://b/x")
    assert split_format("gs://b/x") == ("precomputed", "gs://b/x")


def test_single_level_formats_have_no_mip_1(tmp_path):
    vol = make_layer("zarr", tmp_path)
    with pytest.raises(VolumeError, match=re.escape(f"{vol.url} holds one resolution level: it has no mip 1")):
        open_volume(vol.url, 1)


def test_single_file_layers_keep_their_files_beside_them(tmp_path):
    assert layer_folder(f"npy://file://{tmp_path}/a.npy") == f"file://{tmp_path}/a.npy.d"
    assert layer_folder(f"h5://file://{tmp_path}/a.h5#/x/raw") == f"file://{tmp_path}/a.h5.d/x/raw"
    assert layer_folder(f"zarr://file://{tmp_path}/a.zarr") == f"file://{tmp_path}/a.zarr"


# --- each format's own metadata, as other tools read it -----------------------------------
def test_zarr_offset_and_resolution_are_attributes_other_tools_read(tmp_path):
    for name, version in (("zarr", 2), ("zarr3", 3)):
        vol = make_layer(name, tmp_path / name, "uint32", 1)
        array = zarr.open_array(str(tmp_path / name / "layer.zarr"), mode="r")
        assert array.metadata.zarr_format == version
        assert array.shape == (1, 6, 24, 40) and array.chunks == (1, 4, 8, 16)
        assert array.attrs["voxel_offset"] == [10, 20, 3] and array.attrs["resolution"] == RESOLUTION
        assert vol.bounds == BOUNDS


@pytest.mark.parametrize("version", [2, 3])
def test_zarr_arrays_written_elsewhere_open_whatever_their_version(tmp_path, version):
    """A (z, y, x) array from zarr-python with no chunk_ops attributes: one channel at 0, resolution 1."""
    data = np.arange(6 * 10 * 12, dtype=np.uint16).reshape(6, 10, 12)
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=data.shape, chunks=(2, 5, 6), dtype="uint16",
                              zarr_format=version)
    array[:] = data
    vol = open_volume(f"zarr://file://{tmp_path}/a.zarr")
    assert vol.bounds == Box((0, 0, 0), (12, 10, 6)) and vol.block_size == Vec3(6, 5, 2)
    assert vol.num_channels == 1 and vol.resolution == [1, 1, 1]
    np.testing.assert_array_equal(vol.read(vol.bounds)[0], data)


def test_ome_zarr_metadata_is_ome_0_4(tmp_path):
    make_layer("ome-zarr", tmp_path, "uint8", 3)
    attrs = json.loads((tmp_path / "layer.ome.zarr" / ".zattrs").read_text())
    image = attrs["multiscales"][0]
    assert image["version"] == "0.4"
    assert [a["name"] for a in image["axes"]] == ["c", "z", "y", "x"]
    assert image["axes"][0]["type"] == "channel" and image["axes"][3]["unit"] == "nanometer"
    scale, translation = image["datasets"][0]["coordinateTransformations"]
    assert scale == {"type": "scale", "scale": [1, 40, 4, 3.5]}
    assert translation == {"type": "translation", "translation": [0, 3 * 40, 20 * 4, 10 * 3.5]}
    assert zarr.open_array(str(tmp_path / "layer.ome.zarr" / "0"), mode="r").shape == (3, 6, 24, 40)


def test_n5_lists_dimensions_x_first(tmp_path):
    make_layer("n5", tmp_path, "uint8", 3)
    attrs = json.loads((tmp_path / "layer.n5" / "attributes.json").read_text())
    assert attrs["dimensions"] == [40, 24, 6, 3] and attrs["blockSize"] == [16, 8, 4, 3]
    assert attrs["resolution"] == [3.5, 4, 40, 1] and attrs["voxel_offset"] == [10, 20, 3]


def test_tiff_sections_are_files_other_tools_read(tmp_path):
    vol = make_layer("tif", tmp_path, "uint8", 1)
    data = random_data("uint8", 1, BOUNDS)
    vol.write(BOUNDS, data)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "stack" / "00005.tif"), data[0, 2])


def test_a_tiff_stack_without_sidecar_opens_in_name_order(tmp_path):
    data = np.random.default_rng(1).integers(0, 255, (3, 7, 9), dtype=np.uint8)
    (tmp_path / "scan").mkdir()
    for i, section in enumerate(data):
        tifffile.imwrite(tmp_path / "scan" / f"slice_{i:03d}.tiff", section)
    vol = open_volume(f"tif://file://{tmp_path}/scan")
    assert vol.bounds == Box((0, 0, 0), (9, 7, 3)) and vol.block_size == Vec3(9, 7, 1)
    np.testing.assert_array_equal(vol.read(Box((2, 1, 1), (9, 7, 3)))[0], data[1:, 1:, 2:])


def test_tiff_blocks_must_cover_the_sections(tmp_path):
    with pytest.raises(VolumeError, match=r"block_size \[16, 8, 4\] .* x and y must cover the volume's \[40, 24\]"):
        create_volume(layer_url("tif", tmp_path), bounds=BOUNDS, block_size=Vec3(16, 8, 4), dtype="uint8",
                      num_channels=1, resolution=RESOLUTION)
    assert not volume_exists(layer_url("tif", tmp_path))


def test_npy_sidecar_keeps_offset_resolution_and_blocks(tmp_path):
    make_layer("npy", tmp_path, "uint8", 1)
    assert np.load(tmp_path / "layer.npy").shape == (1, 6, 24, 40)
    sidecar = json.loads((tmp_path / "layer.npy.json").read_text())
    assert sidecar == {"voxel_offset": [10, 20, 3], "resolution": RESOLUTION, "block_size": [16, 8, 4]}


# --- pyramids -------------------------------------------------------------------------
def test_ome_zarr_pyramid_equals_the_precomputed_one(tmp_path):
    data = random_data("float32", 2, BOUNDS)
    levels = {}
    for name in ("precomputed", "ome-zarr"):
        vol = make_layer(name, tmp_path, "float32", 2)
        vol.write(BOUNDS, data)
        assert build_pyramid(vol.url, 2) == build_pyramid(vol.url, 2)  # a rerun adds no level
        levels[name] = [open_volume(vol.url, mip) for mip in (1, 2)]
    for ome, pre in zip(levels["ome-zarr"], levels["precomputed"]):
        assert (ome.bounds, ome.resolution, ome.block_size) == (pre.bounds, pre.resolution, pre.block_size)
        np.testing.assert_array_equal(ome.read(ome.bounds), pre.read(pre.bounds))
    image = json.loads((tmp_path / "layer.ome.zarr" / ".zattrs").read_text())["multiscales"][0]
    assert [d["path"] for d in image["datasets"]] == ["0", "1", "2"]
    assert image["datasets"][2]["coordinateTransformations"][0]["scale"] == [1, 40, 16, 14]


def test_single_level_formats_get_no_pyramid_and_say_why(tmp_path, caplog):
    vol = make_layer("n5", tmp_path)
    vol.write(BOUNDS, random_data("float32", 1, BOUNDS))
    with caplog.at_level(logging.INFO, logger="chunk_ops.downsample"):
        assert build_pyramid(vol.url, 2) == []
    assert [r.getMessage() for r in caplog.records] == [
        f"no pyramid for {vol.url}: the n5 format holds one resolution level"]


# --- formats in job specs and jobs ------------------------------------------------------
def test_the_schema_takes_every_format_prefix():
    pattern = re.compile(job_spec_schema()["$defs"]["layer_url"]["pattern"])
    for name in FORMATS:
        assert pattern.match(f"{name}://file:///data/em"), name
    assert not pattern.match("foo://file:///data/em")


def test_a_spec_with_an_unknown_format_is_refused(make_spec):
    spec = make_spec()
    spec["input"]["url"] = "zarr2://" + spec["input"]["url"]
    with pytest.raises(SpecError, match=r"job spec field input\.url: 'zarr2://file://.*' does not match"):
        parse_spec(spec)


def test_input_and_output_in_one_place_are_refused_whatever_the_format(make_spec, tmp_path):
    spec = make_spec()
    spec["input"]["url"] = f"zarr://file://{tmp_path}/em.zarr"
    spec["output"]["url"] = f"n5://file://{tmp_path}/em.zarr/out"
    with pytest.raises(SpecError, match=r"input\.url .* contains output\.url"):
        parse_spec(spec)


def _copy_layer(source_url: str, target_url: str, block: Vec3) -> None:
    source = open_volume(source_url)
    target = create_volume(target_url, bounds=source.bounds, block_size=block, dtype=source.dtype.name,
                           num_channels=source.num_channels, resolution=source.resolution)
    target.write(source.bounds, source.read(source.bounds))


@pytest.mark.parametrize("name", sorted(set(FORMATS) - {"precomputed"}))
def test_a_job_gives_the_same_output_in_any_format(make_spec, tmp_path, name):
    """Input and output in one format: the output equals the precomputed job's, value for value."""
    # TIFF blocks are whole sections of the 40 x 36 x 12 sample
    grid = dict(block=(40, 36, 2), chunk=(40, 36, 4)) if name in WHOLE_SECTION_BLOCKS else {}
    reference = Job.open(make_spec(output="reference", **grid))
    run_job(reference)
    expected = open_volume(reference.spec.output_url).read(reference.roi)

    spec = make_spec(**grid)
    input_url = LAYERS[name].format(tmp=tmp_path / "in")
    _copy_layer(spec["input"]["url"], input_url, Vec3(40, 36, 4) if grid else Vec3(16, 16, 4))
    spec["input"]["url"] = input_url
    spec["output"]["url"] = LAYERS[name].format(tmp=tmp_path / "out")
    job = Job.open(spec)
    run_job(job)
    out = open_volume(spec["output"]["url"])
    assert out.bounds == reference.roi and out.block_size == reference.spec.block_size
    np.testing.assert_array_equal(out.read(job.roi), expected)
    assert job.id != reference.id
    report = json.loads(Path(layer_folder(job.spec.output_url).removeprefix("file://"), "jobs", job.id,
                             "report.json").read_text())
    assert report["amplification"] == 1.0


@pytest.mark.parametrize("name", ["ome-zarr", "npy"])
def test_validate_probes_where_the_output_is_stored(make_spec, tmp_path, monkeypatch, name):
    """The write probe goes to the layer's storage folder, not to its URL read as a path."""
    spec = make_spec()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    spec["output"]["url"] = LAYERS[name].format(tmp=tmp_path / "out")
    validate(spec, probe_queue=False)
    assert list((tmp_path / "cwd").iterdir()) == [] and not (tmp_path / "out").exists()

    (tmp_path / "a-file").write_text("")
    spec["output"]["url"] = LAYERS[name].format(tmp=tmp_path / "a-file")
    with pytest.raises(StorageError, match=r"output\.url .* cannot be written: .*a-file is a file"):
        validate(spec, probe_queue=False)
