"""The run report: how to view the layers (hosted link or `chunk-ops view`), and a picture people can read."""

from __future__ import annotations

import io
import json
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

from chunk_ops.geometry import Box
from chunk_ops.job import Job
from chunk_ops.report import GAP, LINE, NEUROGLANCER, STATE_COLOURS, hosted_link, job_layers
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
