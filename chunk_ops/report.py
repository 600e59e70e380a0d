"""The run report written next to the output: Markdown, HTML, a picture, how to view the layers.

The picture shows the middle z section of the region, one titled panel each: the
input, the output (the first three channels as RGB, or one channel as grey), the
segmentation (if any) and a map of the chunks that cut that section, coloured by
state, with a legend of the state colours.

Viewing: precomputed layers that all live on gs://, s3:// or http(s):// get a link to
the hosted Neuroglancer; otherwise the report gives the ``chunk-ops view`` command for the
job's layers and the local viewer URL it prints (fixed port and token,
:mod:`chunk_ops.view`).
"""

from __future__ import annotations

import html
import io
import json
import urllib.parse

import numpy as np
from cloudfiles import CloudFiles
from PIL import Image, ImageDraw, ImageFont

from .geometry import Box
from .job import Job
from .view import Layer, browser_readable, local_viewer_url, neuroglancer_source, view_command, viewer_state

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"
STATE_COLOURS = {"merged": (46, 160, 67), "stage 1 only": (230, 180, 20), "not done": (200, 50, 50)}
TEXT_COLOUR = (20, 20, 20)
LINE = 20  # pixels per line of text in the picture
GAP = 8  # pixels between panels


def job_layers(job: Job) -> list[tuple[Layer, str]]:
    """The job's layers (input, output, segmentation if any) as hosted-viewer layers, with their URLs."""
    urls = {"input": job.spec.input_url, "output": job.spec.output_url}
    segmentation = job.spec.segmentation
    if segmentation["method"] != "none":
        urls["segmentation"] = segmentation["url"]
    kinds = {"input": ("image", job.input.num_channels), "output": ("image", job.spec.model.out_channels),
             "segmentation": ("segmentation", 1)}
    return [(Layer(name, neuroglancer_source(url), *kinds[name]), url) for name, url in urls.items()]


def hosted_link(layers: list[Layer], resolution, box: Box) -> str:
    """A link to the hosted Neuroglancer showing ``layers`` at ``box`` (sources reachable from anywhere)."""
    state = viewer_state(layers, resolution, box)
    return NEUROGLANCER + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


def view_instructions(job: Job) -> tuple[str, str | None]:
    """(the URL to open, the command to run here first or None).

    Hosted Neuroglancer when it can read every layer (precomputed on gs://, s3://,
    http(s)://); else ``chunk-ops view`` on the job's layers and the URL that command prints.
    """
    layers = job_layers(job)
    urls = [url for _, url in layers]
    if all(browser_readable(url) for url in urls):
        return hosted_link([layer for layer, _ in layers], job.input.resolution, job.roi), None
    return local_viewer_url(), view_command(urls)


def neuroglancer_link(job: Job) -> str:
    """The hosted Neuroglancer link, or for local layers: the command, then the URL it prints."""
    url, command = view_instructions(job)
    return url if command is None else f"{command}  (then open {url})"


def _to_uint8(plane: np.ndarray) -> np.ndarray:
    if plane.dtype == np.uint8:
        return plane
    plane = plane.astype(np.float32)
    if plane.max() <= 1.0 and plane.min() >= 0.0:
        return (plane * 255).round().astype(np.uint8)
    lo, hi = float(plane.min()), float(plane.max())
    return ((plane - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)


def _chunk_map(job: Job, z: int, shape_xy: tuple[int, int]) -> Image.Image:
    merged, stage1 = job.done_mask(2), job.done_mask(1)
    canvas = Image.new("RGB", shape_xy, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, box in enumerate(job.plan):
        if not box.start.z <= z < box.stop.z:
            continue
        state = "merged" if merged[i] else "stage 1 only" if stage1[i] else "not done"
        x0, y0 = box.start.x - job.roi.start.x, box.start.y - job.roi.start.y
        x1, y1 = box.stop.x - job.roi.start.x - 1, box.stop.y - job.roi.start.y - 1
        draw.rectangle([x0, y0, x1, y1], fill=STATE_COLOURS[state], outline=(255, 255, 255))
    return canvas


def _label_colours(labels: np.ndarray) -> np.ndarray:
    """(y, x) labels -> (y, x, 3) uint8: a fixed pseudo-random colour per label, 0 black."""
    hashed = (labels.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2 ** 24)
    rgb = np.stack([(hashed >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], -1).astype(np.uint8)
    rgb[labels == 0] = 0
    return rgb


def section_picture(job: Job) -> bytes:
    """PNG: titled panels input | output | [segmentation |] chunk states at the middle z section,
    with the z index above and the chunk-state legend below."""
    from .volumes import open_volume, volume_exists

    z = (job.roi.start.z + job.roi.stop.z) // 2
    plane = Box((job.roi.start.x, job.roi.start.y, z), (job.roi.stop.x, job.roi.stop.y, z + 1))
    raw = job.input.read(plane)[0, 0]
    out = job.output.read(plane)[:, 0]
    left = Image.fromarray(_to_uint8(raw)).convert("RGB")
    right = Image.fromarray(np.stack([_to_uint8(c) for c in out[:3]], -1)) if len(out) >= 3 \
        else Image.fromarray(_to_uint8(out[0])).convert("RGB")
    panels = {"input": left, "output": right}
    segmentation = job.spec.segmentation
    if segmentation["method"] != "none" and volume_exists(segmentation["url"]):
        panels["segmentation"] = Image.fromarray(_label_colours(open_volume(segmentation["url"], 0).read(plane)[0, 0]))
    panels["chunk states"] = _chunk_map(job, z, left.size)
    header = f"z {z} (middle section of z [{job.roi.start.z}, {job.roi.stop.z}))"
    buf = io.BytesIO()
    _compose(header, panels).save(buf, format="PNG")
    return buf.getvalue()


def _compose(header: str, panels: dict[str, Image.Image]) -> Image.Image:
    """A header line, the panels side by side under their titles, the chunk-state legend below."""
    zoom = max(1, 256 // max(max(im.size) for im in panels.values()))  # small regions: big enough to see
    images = [im.resize((im.width * zoom, im.height * zoom), Image.NEAREST) for im in panels.values()]
    width, height = images[0].size
    legend_top = 2 * LINE + height + GAP
    picture = Image.new("RGB", (width * len(images) + GAP * (len(images) - 1), legend_top + LINE),
                        (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=14)
    draw.text((0, 2), header, fill=TEXT_COLOUR, font=font)
    for k, (title, image) in enumerate(zip(panels, images)):
        x = k * (width + GAP)
        draw.text((x, LINE + 2), title, fill=TEXT_COLOUR, font=font)
        picture.paste(image, (x, 2 * LINE))
    x = 0
    for state, colour in STATE_COLOURS.items():
        draw.rectangle([x, legend_top + 3, x + 13, legend_top + 16], fill=colour)
        draw.text((x + 18, legend_top + 2), state, fill=TEXT_COLOUR, font=font)
        x += 18 + int(draw.textlength(state, font=font)) + 2 * GAP
    return picture


def write_report(job: Job, summary: dict) -> dict[str, str]:
    """Write report.md, report.html and report.png under the job's folder; return their URLs."""
    files = CloudFiles(job.job_url)
    files.put("report.png", section_picture(job), content_type="image/png", compress=None)
    url, command = view_instructions(job)
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    for pool, work in (summary.get("per_pool") or {}).items():
        rows.append((f"pool {pool}", ", ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}"
                                              for k, v in work.items())))
    for section in ("stage1", "stage2", "segmentation"):
        for k, v in (summary.get(section) or {}).items():
            rows.append((f"{section} {k}", round(v, 4) if isinstance(v, float) else v))
    md = [f"# chunk_ops run {job.id}", "",
          f"- input: `{job.spec.input_url}` (mip {job.spec.input_mip})",
          f"- output: `{job.spec.output_url}`",
          f"- region: {job.roi.to_dict()}, {len(job.plan)} chunks of {job.spec.chunk_size.to_list()}",
          f"- [open in Neuroglancer]({url})" if command is None else
          f"- open in Neuroglancer: run `{command}` on this machine, then open <{url}>", "",
          "![input | output | segmentation, if any | chunk states, at the middle z section](report.png)", "",
          "| measure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    files.put("report.md", "\n".join(md).encode(), content_type="text/markdown", compress=None)
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    viewing = (f"<a href=\"{html.escape(url)}\">open in Neuroglancer</a>" if command is None else
               f"open in Neuroglancer: run <code>{html.escape(command)}</code> on this machine, then open "
               f"<a href=\"{html.escape(url)}\">{html.escape(url)}</a>")
    page = (f"<!doctype html><meta charset=utf-8><title>chunk_ops run {job.id}</title>"
            f"<h1>chunk_ops run {job.id}</h1><p>output <code>{html.escape(job.spec.output_url)}</code> &middot; "
            f"{viewing}</p>"
            f"<img src=report.png alt=\"input, output, segmentation, chunk states\"><table>{table}</table>")
    files.put("report.html", page.encode(), content_type="text/html", compress=None)
    return {name: f"{job.job_url}/{name}" for name in ("report.md", "report.html", "report.png")}
