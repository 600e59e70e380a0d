"""`chunk-ops view` and show_arrays, looked at in a real Neuroglancer client in headless Chromium."""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chunk_ops.geometry import Box, Vec3
from chunk_ops.sample import write_sample
from chunk_ops.view import local_viewer_url, show_arrays
from chunk_ops.volumes import create_volume
from tests.conftest import free_port

CHUNK_OPS = str(Path(sys.executable).with_name("chunk-ops"))
ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
# software WebGL: Neuroglancer draws with WebGL2 and the machine has no GPU
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 800}
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by `make test`"
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def _chunk_ops(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([CHUNK_OPS, *args], text=True, **kwargs,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})


def _served_blocks(layer: Path) -> set[str]:
    """Request paths of every stored block of a precomputed layer folder (names without .gz)."""
    return {f"/{layer.name}/{block.parent.name}/{block.name.removesuffix('.gz')}"
            for block in layer.glob("*/*-*_*-*_*-*")}


def _answered(log: str) -> dict[str, int]:
    """Path -> HTTP status of each GET in the command's access log (stderr)."""
    return {path: int(status) for path, status in re.findall(r'"GET (\S+) HTTP/1\.[01]" (\d{3})', log)}


def _colours(png: bytes, box: tuple[int, int, int, int]) -> int:
    """Distinct RGB colours in a region of a screenshot."""
    region = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").crop(box)).reshape(-1, 3)
    return len(np.unique(region, axis=0))


def _wait_for(condition, what: str, timeout_s: float = 90):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


def test_view_serves_file_layers_to_neuroglancer_until_sigint(tmp_path, browser):
    image, truth = tmp_path / "image", tmp_path / "truth"
    write_sample(f"file://{image}", (96, 80, 8), labels_url=f"file://{truth}", block_size=(32, 32, 8))
    expected = _served_blocks(image) | _served_blocks(truth) | {"/image/info", "/truth/info"}
    assert len(expected) == 2 * 9 + 2
    port = free_port()
    log = tmp_path / "view.log"
    with log.open("w") as stderr:
        view = _chunk_ops("view", f"file://{image}", f"file://{truth}", "--port", str(port), "--no-browser",
                          stdout=subprocess.PIPE, stderr=stderr)
    try:
        assert select.select([view.stdout], [], [], 60)[0], "no viewer URL within 60 s"
        url = view.stdout.readline().strip()
        assert url == local_viewer_url(port) == f"http://127.0.0.1:{port}/v/chunk-ops/", log.read_text()

        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        # every block of both layers, and their info files, fetched by the browser and answered
        _wait_for(lambda: expected <= _answered(log.read_text()).keys(), "the browser to fetch every block")
        answered = _answered(log.read_text())
        assert {answered[path] for path in expected} == {200}, answered
        page.get_by_text("image", exact=True).wait_for(timeout=30_000)
        page.get_by_text("truth", exact=True).wait_for(timeout=30_000)
        # the middle of the view is data (EM under segment colours), not the empty background
        middle = (VIEWPORT["width"] // 2 - 150, VIEWPORT["height"] // 2 - 150,
                  VIEWPORT["width"] // 2 + 150, VIEWPORT["height"] // 2 + 150)

        def drawn() -> bytes | None:
            png = page.screenshot()
            return png if _colours(png, middle) > 200 else None

        shot = _wait_for(drawn, "the layers to be drawn")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "view.png").write_bytes(shot)
        page.close()
    finally:
        view.send_signal(signal.SIGINT)
        code = view.wait(30)
    assert code == 0, log.read_text()
    assert log.read_text().rstrip().endswith("stopped")


def test_view_of_a_missing_layer_is_one_line_naming_it(tmp_path):
    write_sample(f"file://{tmp_path}/image", (32, 32, 8))
    missing = f"file://{tmp_path}/nothing-here"
    view = _chunk_ops("view", f"file://{tmp_path}/image", missing, "--port", "0", "--no-browser",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = view.communicate(timeout=60)
    assert view.returncode == 1
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and missing in err, err


def _shows(page, left: tuple, right: tuple) -> bool:
    """Is the left part of the view's middle about colour ``left``, its right part ``right``?"""
    picture = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    cx, cy = VIEWPORT["width"] // 2, VIEWPORT["height"] // 2
    seen = picture.getpixel((cx - 150, cy + 50)), picture.getpixel((cx + 150, cy + 50))
    return all(np.abs(np.subtract(pixel, colour)).max() < 50 for pixel, colour in zip(seen, (left, right)))


def test_view_shows_a_zarr_layer_read_through_chunk_ops(tmp_path, browser):
    """A format Neuroglancer is not given a URL for: read by open_volume, served as a LocalVolume."""
    bounds = Box((500, 600, 10), (564, 648, 14))
    url = f"zarr://file://{tmp_path}/em.zarr"
    layer = create_volume(url, bounds=bounds, block_size=Vec3(32, 32, 4), dtype="uint8", num_channels=1,
                          resolution=(8, 8, 40))
    data = np.zeros((1, *bounds.shape.zyx()), np.uint8)
    data[..., :32] = 255  # left half white, right half black; the empty view is grey
    layer.write(bounds, data)
    view = _chunk_ops("view", url, "--port", "0", "--no-browser", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert select.select([view.stdout], [], [], 60)[0], "no viewer URL within 60 s"
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(view.stdout.readline().strip())
        page.get_by_text("em.zarr", exact=True).wait_for(timeout=30_000)
        _wait_for(lambda: _shows(page, (255, 255, 255), (0, 0, 0)), "the white and black halves")
        page.close()
    finally:
        view.send_signal(signal.SIGINT)
        assert view.wait(30) == 0


def _halves(rgb_left: int, rgb_right: int, box: Box) -> np.ndarray:
    """A 3-channel float chunk: channel ``rgb_left`` 1 in its left half, ``rgb_right`` 1 in its right half."""
    chunk = np.zeros((3, *box.shape.zyx()), np.float32)
    chunk[rgb_left, :, :, : box.shape.x // 2] = 1.0
    chunk[rgb_right, :, :, box.shape.x // 2:] = 1.0
    return chunk


def test_show_arrays_places_rgb_chunks_at_their_box_and_a_second_call_replaces_them(browser):
    """A 3-channel float chunk away from the origin, drawn as RGB: left half red, right half blue;
    then the next chunk (blue | red) at the same URL, in the page already open."""
    import neuroglancer

    box = Box((1000, 2000, 30), (1064, 2048, 34))
    labels = np.arange(64 * 48 * 4, dtype=np.uint32).reshape(1, 4, 48, 64)
    url = show_arrays({"rgb": (_halves(0, 2, box), box, (8, 8, 40), "image"),
                       "labels": (labels, box.shift((0, 0, 100)), (8, 8, 40), "segmentation")})
    try:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.get_by_text("labels", exact=True).wait_for(timeout=30_000)
        _wait_for(lambda: _shows(page, RED, BLUE), "the red and blue halves")
        assert show_arrays({"next": (_halves(2, 0, box), box, (8, 8, 40), "image")}) == url
        _wait_for(lambda: _shows(page, BLUE, RED), "the blue and red halves of the next chunk")
        assert page.get_by_text("labels", exact=True).count() == 0
        page.close()
    finally:
        neuroglancer.stop()


def test_view_stops_on_sigterm_with_status_0(tmp_path):
    write_sample(f"file://{tmp_path}/image", (32, 32, 8))
    view = _chunk_ops("view", f"file://{tmp_path}/image", "--port", "0", "--no-browser",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert select.select([view.stdout], [], [], 60)[0], "no viewer URL within 60 s"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v/chunk-ops/", view.stdout.readline().strip())
    view.send_signal(signal.SIGTERM)
    _, err = view.communicate(timeout=30)
    assert view.returncode == 0, err


def test_show_arrays_refuses_an_array_that_does_not_fit_its_box():
    box = Box((0, 0, 0), (8, 8, 2))
    with pytest.raises(ValueError, match=r"layer 'x': array of shape \(1, 2, 8, 9\)"):
        show_arrays({"x": (np.zeros((1, 2, 8, 9), np.uint8), box, (4, 4, 40), "image")})
    with pytest.raises(ValueError, match="layer type 'segmentations'"):
        show_arrays({"x": (np.zeros((1, 2, 8, 8), np.uint32), box, (4, 4, 40), "segmentations")})
