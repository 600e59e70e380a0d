"""The run report: how to view the layers (hosted link or `chunk-ops view`), and a picture people can read."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chunk_ops import report
from chunk_ops.downsample import FACTOR
from chunk_ops.geometry import Box, Vec3
from chunk_ops.job import Job
from chunk_ops.report import (GAP, LINE, NEUROGLANCER, STATE_COLOURS, PictureGrid, hosted_link, job_layers,
                              level_for_picture, picture_of, section_picture)
from chunk_ops.volumes import add_mip, create_volume, open_volume
from chunk_ops.pipeline import run_job
from chunk_ops.view import RGB_SHADER, Layer, browser_readable, local_viewer_url, neuroglancer_source, view_command


def test_layers_on_gs_and_s3_get_a_hosted_neuroglancer_link():
    urls = ["gs://lab/em", "s3://lab/affinities"]
    assert all(browser_readable(url) for url in urls)
    assert not any(browser_readable(url) for url in ("file:///data/em", "zarr://gs://lab/em.zarr"))
    layers = [Layer("input", neuroglancer_source(urls[0]), "image", 1),
              Layer("output", neuroglancer_source(urls[1]), "image", 3)]
    link = hosted_link(layers, [4, 4, 40], Box((0, 100, 10), (1000, 300, 30)))

    assert link.startswith(NEUROGLANCER + "#!")
    state = json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))
    assert [(layer["name"], layer["source"]) for layer in state["layers"]] == [
        ("input", "precomputed://gs://lab/em"), ("output", "precomputed://s3://lab/affinities")]
    assert "shader" not in state["layers"][0] and state["layers"][1]["shader"] == RGB_SHADER
    assert state["position"] == [500, 200, 20]
    assert state["dimensions"]["z"] == [40e-9, "m"]


def test_view_command_quotes_urls():
    assert view_command(["file:///data/my em", "gs://b/x"]) == "chunk-ops view 'file:///data/my em' gs://b/x"


def test_report_of_a_local_job_gives_the_view_command_and_a_titled_picture_with_a_legend(make_spec):
    spec = make_spec()
    job = Job.open(spec)
    summary = run_job(job)
    job_dir = Path(job.job_url.removeprefix("file://"))
    md, page = (job_dir / "report.md").read_text(), (job_dir / "report.html").read_text()

    urls = [url for _, url in job_layers(job)]
    assert urls[:2] == [spec["input"]["url"], spec["output"]["url"]]
    command = "chunk-ops view " + " ".join(urls)
    assert f"run `{command}` on this machine, then open <{local_viewer_url()}>" in md
    assert f"<code>{command}</code>" in page and f'href="{local_viewer_url()}"' in page
    assert NEUROGLANCER not in md + page
    assert summary.neuroglancer == f"{command}  (then open {local_viewer_url()})"

    picture = np.asarray(Image.open(io.BytesIO((job_dir / "report.png").read_bytes())).convert("RGB"))
    shape = job.roi.shape
    zoom = max(1, 256 // max(shape.x, shape.y))
    panels_top, panel_height = 2 * LINE, shape.y * zoom
    assert picture.shape[0] == panels_top + panel_height + GAP + LINE  # header and titles above, legend below
    titles, legend = picture[:panels_top], picture[panels_top + panel_height:]
    assert (titles.max(-1) < 100).sum() > 200, "header and panel titles are drawn as dark text"
    assert (legend.max(-1) < 100).sum() > 100, "legend labels are drawn as dark text"
    legend_colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert set(STATE_COLOURS.values()) <= legend_colours  # "not done" too: every chunk of this run is merged
    chunk_panel = picture[panels_top:panels_top + panel_height, -shape.x * zoom:]
    assert {tuple(c) for c in chunk_panel.reshape(-1, 3)} & set(STATE_COLOURS.values()) == {STATE_COLOURS["merged"]}


# --- the picture at any volume size: coarse levels, tiles, bounded marker reads ----------------
def _panel(picture: np.ndarray, k: int, size: tuple[int, int], zoom: int = 1) -> np.ndarray:
    """Panel ``k`` (0 input, 1 output, ...) of a composed picture, at its zoom."""
    width, height = size[0] * zoom, size[1] * zoom
    x = k * (width + GAP)
    return picture[2 * LINE:2 * LINE + height, x:x + width]


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _oracle_mean(plane: np.ndarray, step: int) -> np.ndarray:
    """(y, x) -> mean over step x step pixels (the last ones partial), by numpy alone."""
    h, w = plane.shape
    return np.array([[plane[y:y + step, x:x + step].mean() for x in range(0, w, step)]
                     for y in range(0, h, step)])


@pytest.mark.parametrize("offset", [(0, 0), (3, 5)])
def test_picture_of_averages_each_pixels_voxels_in_tiles(tmp_path, monkeypatch, offset):
    """Images are the mean of each pixel's voxels (partial pixels at the far edges too), whatever
    the tiling: tiny tiles here give the same picture as one read."""
    rng = np.random.default_rng(0)
    bounds = Box((0, 0, 0), (301, 203, 3))
    volume = create_volume(f"file://{tmp_path}/img", bounds=bounds, block_size=Vec3(16, 16, 1), dtype="float32",
                           num_channels=2, resolution=[4, 4, 40])
    data = rng.random((2, 3, 203, 301), dtype=np.float32)
    volume.write(bounds, data)
    region = Box((offset[0], offset[1], 1), (301, 203, 2))
    grid = PictureGrid(region, 3, (4.0, 4.0, 40.0))
    monkeypatch.setattr(report, "TILE_VOXELS", 700)
    monkeypatch.setattr(report, "TILE_WIDTH", 50)
    picture = picture_of(open_volume(volume.url), grid)

    assert picture.shape == (2, *grid.size[::-1]) == (2, -(-(203 - offset[1]) // 3), -(-(301 - offset[0]) // 3))
    for c in range(2):
        expected = _oracle_mean(data[c, 1, offset[1]:, offset[0]:], 3)
        np.testing.assert_allclose(picture[c], expected, rtol=1e-5)


def test_picture_of_a_coarser_level_maps_pixels_by_resolution_and_picks_labels(tmp_path):
    """A level 2x coarser in x, y and 4x in z: pixel (i, j) of a 4-voxel step covers its voxels
    (2i, 2j) .. (2i + 1, 2j + 1); z section 9 is that level's section 2; labels take one of them
    (the middle one, rounded down), images their mean."""
    fine = Box((0, 0, 0), (64, 48, 12))
    coarse_bounds = Box((0, 0, 0), (32, 24, 3))
    labels = np.arange(32 * 24 * 3, dtype=np.uint32).reshape(1, 3, 24, 32) + 1
    url = f"file://{tmp_path}/seg"
    coarse = create_volume(url, bounds=coarse_bounds, block_size=Vec3(8, 8, 1), dtype="uint32",
                           num_channels=1, resolution=[8, 8, 160], layer_type="segmentation")
    coarse.write(coarse_bounds, labels)
    grid = PictureGrid(Box((0, 0, 9), (fine.stop.x, fine.stop.y, 10)), 4, (4.0, 4.0, 40.0))
    assert grid.section_in(160) == 2

    picked = picture_of(open_volume(url), grid, labels=True)[0]
    assert picked.shape == (12, 16) and picked.dtype == np.uint32
    np.testing.assert_array_equal(picked, labels[0, 2, ::2, ::2])  # the first of each pixel's two voxels
    mean = picture_of(open_volume(url), grid)[0]
    np.testing.assert_allclose(mean, labels[0, 2].reshape(12, 2, 16, 2).mean((1, 3)))


def test_rows_of_pixels_taller_than_a_block_are_read_one_row_each(tmp_path):
    """A pixel 40 rows tall over 8-row blocks: only its middle row is read (and averaged along x)."""
    bounds = Box((0, 0, 0), (120, 120, 1))
    volume = create_volume(f"file://{tmp_path}/img", bounds=bounds, block_size=Vec3(8, 8, 1), dtype="uint8",
                           num_channels=1, resolution=[4, 4, 40])
    data = np.broadcast_to(np.arange(120, dtype=np.uint8)[:, None], (120, 120))  # value = row
    volume.write(bounds, data[None, None].copy())
    grid = PictureGrid(bounds, 40, (4.0, 4.0, 40.0))
    reads = []
    original = volume.read
    volume.read = lambda box: reads.append(box) or original(box)

    picture = picture_of(volume, grid)[0]
    np.testing.assert_array_equal(picture, [[19.0] * 3, [59.0] * 3, [99.0] * 3])
    assert {box.shape.y for box in reads} == {1}


def _huge_job(make_spec, tmp_path, side: int, levels: int):
    """A job over side x side x 64 voxels: input and output declared with ``levels`` coarser
    mips (input 2x2x2, output 2x2x1 as the pyramid), no block written anywhere yet."""
    bounds = Box((0, 0, 0), (side, side, 64))
    image = f"file://{tmp_path}/image"
    create_volume(image, bounds=bounds, block_size=Vec3(128, 128, 1), dtype="uint8", num_channels=1,
                  resolution=[4, 4, 40])
    for mip in range(1, levels + 1):
        add_mip(image, Vec3(2, 2, 2), mip)
    spec = make_spec(out_channels=3, chunk=(256, 256, 8), block=(128, 128, 8))
    spec["input"]["fill_missing"] = True
    create_volume(spec["output"]["url"], bounds=bounds, block_size=Vec3(128, 128, 8), dtype="float32",
                  num_channels=3, resolution=[4, 4, 40])
    for mip in range(1, levels + 1):
        add_mip(spec["output"]["url"], FACTOR, mip)
    return Job.open(spec)


def test_report_of_a_huge_region_reads_coarse_levels_in_bounded_memory(make_spec, tmp_path):
    """32768 x 32768 x 64 voxels: the middle section at full resolution is 1 GiB of input and
    12 GiB of float32 output.  The picture (1024 px, 32 voxels a pixel) reads mip 5 of both
    layers, whose blocks hold known squares, and stays far below one such section in memory.
    The section has 16384 chunks: the chunk map reads the markers of 4096 of them (one per
    2 x 2 chunks), and none when the caller says every chunk was verified merged."""
    side = 32768
    job = _huge_job(make_spec, tmp_path, side, levels=5)
    grid = PictureGrid.of(job)
    assert (grid.step, grid.size, grid.z) == (32, (1024, 1024), 32)
    source = level_for_picture(job.spec.input_url, grid.pixel_nm)
    output = level_for_picture(job.spec.output_url, grid.pixel_nm)
    assert (source.mip, source.resolution, output.mip, output.resolution) == (5, [128, 128, 1280], 5, [128, 128, 40])
    assert grid.section_in(source.resolution[2]) == 1 and grid.section_in(output.resolution[2]) == 32
    # input mip 5 section 1 (full-res z 32..63): a square of 200; section 0 must not show
    square = np.full((1, 1, 128, 128), 200, np.uint8)
    source.write(Box((512, 256, 1), (640, 384, 2)), square)
    source.write(Box((0, 0, 0), (128, 128, 1)), square + 55)
    block = np.zeros((3, 8, 128, 128), np.float32)
    block[0], block[2] = 1.0, 0.5
    output.write(Box((256, 640, 32), (384, 768, 40)), block)
    section = [c for c in job.plan.chunks_meeting(grid.region)]
    assert len(section) == 128 * 128
    job.mark_done(2, job.plan.box_at(Vec3(0, 0, 4)), {"finished_at": 1.0})  # cell (0, 0) samples chunk (0, 0)
    job.mark_done(1, job.plan.box_at(Vec3(2, 0, 4)), {"finished_at": 1.0})  # cell (1, 0): chunk (2, 0)
    del section

    tracemalloc.start()
    started = time.perf_counter()
    data = section_picture(job)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_section = side * side * (1 + 3 * 4)  # input uint8 + output 3 x float32 at full resolution
    print(f"huge report picture: peak {peak / 2 ** 20:.1f} MiB traced (full-resolution section "
          f"{full_section / 2 ** 30:.1f} GiB), {seconds:.1f} s")
    assert peak < side * side / 20, "far below even the input's section alone (1 GiB)"

    picture = _png(data)
    inp, out, states = (_panel(picture, k, grid.size) for k in range(3))
    assert (inp[256:384, 512:640] == 200).all() and inp[:128, :128].max() == 0
    assert (inp.sum() == 200 * 3 * 128 * 128)
    assert (out[640:768, 256:384] == (255, 0, 128)).all() and out[:640].max() == 0
    # a cell: 2 x 2 chunks of 256 voxels = 16 x 16 px, inside a white outline
    assert (states[1:15, 1:15] == STATE_COLOURS["merged"]).all()
    assert (states[1:15, 17:31] == STATE_COLOURS["stage 1 only"]).all()
    assert {tuple(c) for c in states[17:].reshape(-1, 3)} == {STATE_COLOURS["not done"], (255, 255, 255)}

    started = time.perf_counter()
    verified = _png(section_picture(job, verified=True))
    assert time.perf_counter() - started < seconds
    colours = {tuple(c) for c in _panel(verified, 2, grid.size).reshape(-1, 3)}
    assert colours & set(STATE_COLOURS.values()) == {STATE_COLOURS["merged"]}


def test_small_region_picture_shows_the_layers_where_they_are(make_spec, tmp_path):
    """64 x 48 voxels, zoom 4: the input's square, the output's red square and each chunk's own
    state appear at their place; the other z sections do not show."""
    bounds = Box((0, 0, 0), (64, 48, 8))
    image = create_volume(f"file://{tmp_path}/image", bounds=bounds, block_size=Vec3(16, 16, 4), dtype="uint8",
                          num_channels=1, resolution=[4, 4, 40])
    raw = np.full((1, 8, 48, 64), 30, np.uint8)
    raw[0, 4, 8:24, 16:32] = 220  # the middle section is z 4
    raw[0, 3, 30:40, 40:60] = 255
    image.write(bounds, raw)
    spec = make_spec(out_channels=3, chunk=(16, 16, 4), block=(16, 16, 4))
    out = create_volume(spec["output"]["url"], bounds=bounds, block_size=Vec3(16, 16, 4), dtype="float32",
                        num_channels=3, resolution=[4, 4, 40])
    values = np.zeros((3, 8, 48, 64), np.float32)
    values[0, 4, 16:32, 32:48] = 1.0
    out.write(bounds, values)
    job = Job.open(spec)
    job.mark_done(2, job.plan.box_at(Vec3(0, 0, 1)), {"finished_at": 1.0})
    job.mark_done(1, job.plan.box_at(Vec3(1, 0, 1)), {"finished_at": 1.0})
    job.mark_done(2, job.plan.box_at(Vec3(3, 2, 0)), {"finished_at": 1.0})  # another section: not drawn

    picture = _png(section_picture(job))
    zoom = 4
    inp, outp, states = (_panel(picture, k, (64, 48), zoom)[::zoom, ::zoom] for k in range(3))
    expected = np.full((48, 64), 30, np.uint8)
    expected[8:24, 16:32] = 220
    np.testing.assert_array_equal(inp[..., 0], expected)
    red = np.zeros((48, 64, 3), np.uint8)
    red[16:32, 32:48, 0] = 255
    np.testing.assert_array_equal(outp, red)
    inner = states[1:15, 1:15], states[1:15, 17:31], states[33:47, 49:63]
    assert [tuple(np.unique(c.reshape(-1, 3), axis=0)[0]) for c in inner] == [
        STATE_COLOURS["merged"], STATE_COLOURS["stage 1 only"], STATE_COLOURS["not done"]]
    assert (states[0, :] == 255).all(), "chunks many pixels wide keep their white outline"
