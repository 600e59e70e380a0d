"""The run report written next to the output: Markdown, HTML, a picture, a Neuroglancer link.

The picture shows the middle z section of the region: the input, the output (the
first three channels as RGB, or one channel as grey), and a map of the chunks
that cut that section, coloured by state (merged / stage 1 only / not done).
"""

from __future__ import annotations

import html
import io
import json
import urllib.parse

import numpy as np
from cloudfiles import CloudFiles
from PIL import Image, ImageDraw

from .geometry import Box
from .job import Job

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"
STATE_COLOURS = {"merged": (46, 160, 67), "stage 1": (230, 180, 20), "not done": (200, 50, 50)}


def neuroglancer_link(job: Job) -> str:
    """A Neuroglancer state with the input image and the output layer.

    gs:// and s3:// layers open as they are; a file:// layer needs a local server
    (e.g. ``CloudVolume(url).viewer()``) in its place.
    """
    centre = [(a + b) // 2 for a, b in zip(job.roi.start, job.roi.stop)]
    state = {
        "layers": [
            {"type": "image", "source": f"precomputed://{job.spec.input_url}", "name": "input"},
            {"type": "image", "source": f"precomputed://{job.spec.output_url}", "name": "output",
             "shader": "void main() { emitRGB(vec3(toNormalized(getDataValue(0)), "
                       "toNormalized(getDataValue(1)), toNormalized(getDataValue(2)))); }"
             if job.spec.model.out_channels >= 3 else None},
        ],
        "position": centre,
        "layout": "xy",
    }
    segmentation = job.spec.segmentation
    if segmentation["method"] != "none":
        state["layers"].append({"type": "segmentation", "source": f"precomputed://{segmentation['url']}",
                                "name": "segmentation"})
    for layer in state["layers"]:
        if layer.get("shader") is None:
            layer.pop("shader", None)
    return NEUROGLANCER + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


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
        state = "merged" if merged[i] else "stage 1" if stage1[i] else "not done"
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
    """PNG: input | output | [segmentation |] chunk states, at the middle z section of the region."""
    from .volumes import open_volume, volume_exists

    z = (job.roi.start.z + job.roi.stop.z) // 2
    plane = Box((job.roi.start.x, job.roi.start.y, z), (job.roi.stop.x, job.roi.stop.y, z + 1))
    raw = job.input.read(plane)[0, 0]
    out = open_volume(job.spec.output_url, 0).read(plane)[:, 0]
    left = Image.fromarray(_to_uint8(raw)).convert("RGB")
    right = Image.fromarray(np.stack([_to_uint8(c) for c in out[:3]], -1)) if len(out) >= 3 \
        else Image.fromarray(_to_uint8(out[0])).convert("RGB")
    images = [left, right]
    segmentation = job.spec.segmentation
    if segmentation["method"] != "none" and volume_exists(segmentation["url"]):
        images.append(Image.fromarray(_label_colours(open_volume(segmentation["url"], 0).read(plane)[0, 0])))
    images.append(_chunk_map(job, z, left.size))
    zoom = max(1, 256 // max(left.width, left.height))  # small regions: big enough to see
    panels = [im.resize((im.width * zoom, im.height * zoom), Image.NEAREST) for im in images]
    gap, width, height = 8, panels[0].width, panels[0].height
    picture = Image.new("RGB", (width * len(panels) + gap * (len(panels) - 1), height), (255, 255, 255))
    for k, image in enumerate(panels):
        picture.paste(image, (k * (width + gap), 0))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def write_report(job: Job, summary: dict) -> dict[str, str]:
    """Write report.md, report.html and report.png under the job's folder; return their URLs."""
    files = CloudFiles(job.job_url)
    files.put("report.png", section_picture(job), content_type="image/png", compress=None)
    link = neuroglancer_link(job)
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
          f"- [open in Neuroglancer]({link})", "",
          "![input | output | segmentation, if any | chunks (green merged, yellow stage 1 only, red not done)]"
          "(report.png)", "",
          "| measure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    files.put("report.md", "\n".join(md).encode(), content_type="text/markdown", compress=None)
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    page = (f"<!doctype html><meta charset=utf-8><title>chunk_ops run {job.id}</title>"
            f"<h1>chunk_ops run {job.id}</h1><p>output <code>{html.escape(job.spec.output_url)}</code> &middot; "
            f"<a href=\"{html.escape(link)}\">open in Neuroglancer</a></p>"
            f"<img src=report.png alt=\"input, output, segmentation, chunk states\"><table>{table}</table>")
    files.put("report.html", page.encode(), content_type="text/html", compress=None)
    return {name: f"{job.job_url}/{name}" for name in ("report.md", "report.html", "report.png")}
