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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cloudfiles import CloudFiles
from PIL import Image, ImageDraw, ImageFont

from .geometry import Box, ChunkPlan, Vec3
from .job import Job
from .volumes import Volume
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


# --- the picture: every layer read at about the picture's scale, in tiles ----------------------
PICTURE_SIDE = 1024  # the longest side of a panel, in pixels (before the zoom of tiny regions)
TILE_VOXELS = 1 << 19  # voxels per channel read at once: peak memory is a few tiles plus the picture
TILE_WIDTH = 2048  # voxels along x read at once
MARKER_CHUNKS = 4096  # at most this many chunks' done markers are read for the chunk map
MARKER_THREADS = 16


@dataclass(frozen=True)
class PictureGrid:
    """The panels' pixels over the middle section: one pixel is ``step`` x ``step`` voxels
    of the region (at the job's input mip, ``resolution`` nm per voxel); the last pixel of a
    row or column may reach past the region and covers only its part inside::

        region x  |<- step ->|<- step ->| ... |<- step ->|<-part->|
        pixel     |    0     |    1     | ... |          | width-1|
    """

    region: Box  # the region's one z section
    step: int
    resolution: tuple[float, float, float]

    @classmethod
    def of(cls, job: Job, side: int = PICTURE_SIDE) -> "PictureGrid":
        z = (job.roi.start.z + job.roi.stop.z) // 2
        region = Box((job.roi.start.x, job.roi.start.y, z), (job.roi.stop.x, job.roi.stop.y, z + 1))
        step = max(1, -(-max(region.shape.x, region.shape.y) // side))
        return cls(region, step, tuple(float(r) for r in job.input.resolution))

    @property
    def z(self) -> int:
        return self.region.start.z

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return tuple(-(-self.region.shape[a] // self.step) for a in (0, 1))

    @property
    def pixel_nm(self) -> tuple[float, float]:
        return self.step * self.resolution[0], self.step * self.resolution[1]

    def edges(self, axis: int, resolution: float) -> tuple[np.ndarray, np.ndarray]:
        """Along x (0) or y (1): the [lo, hi) voxel range of each pixel in a layer level of
        ``resolution`` nm per voxel.  A voxel i of a level covers [i r, (i + 1) r) nm, as in
        Neuroglancer, whatever that level's (rounded) voxel offset; every range holds a voxel."""
        start, stop = self.region.start[axis], self.region.stop[axis]
        bounds = np.minimum(start + self.step * np.arange(self.size[axis] + 1), stop)
        scale = self.resolution[axis] / float(resolution)
        lo = np.floor(bounds[:-1] * scale + 1e-9).astype(np.int64)
        hi = np.ceil(bounds[1:] * scale - 1e-9).astype(np.int64)
        hi[:-1] = np.maximum(lo[1:], lo[:-1] + 1)  # contiguous ranges where the pixels are
        return lo, np.maximum(hi, lo + 1)

    def section_in(self, resolution_z: float) -> int:
        """The z index, in a level of ``resolution_z`` nm per section, holding the section's middle."""
        return int(np.floor((self.z + 0.5) * self.resolution[2] / float(resolution_z)))


def level_for_picture(url: str, pixel_nm: tuple[float, float], **options) -> Volume:
    """The coarsest level of the layer whose x and y voxels are still no larger than a pixel
    (the finest level when none is); missing blocks read as the fill value."""
    from .volumes import mip_count, open_volume

    levels = [open_volume(url, mip, fill_missing=True, **options) for mip in range(mip_count(url))]
    fits = [v for v in levels if all(r <= p * (1 + 1e-6) for r, p in zip(v.resolution[:2], pixel_nm))]
    if not fits:
        return min(levels, key=lambda v: v.resolution[0] * v.resolution[1])
    return max(fits, key=lambda v: (v.resolution[0] * v.resolution[1], -v.mip))


def _groups(lo: np.ndarray, hi: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Runs [i, j) of pixels whose voxel ranges span at most ``limit`` voxels (at least one pixel)."""
    groups, i = [], 0
    while i < len(lo):
        j = max(i + 1, int(np.searchsorted(hi, lo[i] + limit, side="right")))
        groups.append((i, j))
        i = j
    return groups


def _reduce(data: np.ndarray, axis: int, lo: np.ndarray, hi: np.ndarray, labels: bool) -> np.ndarray:
    """Pixels along ``axis`` of ``data`` from their [lo, hi) ranges (relative to the data):
    the mean (images; ranges contiguous) or the middle voxel (labels, or ranges that overlap)."""
    if len(lo) == data.shape[axis] and (hi - lo == 1).all():  # a voxel a pixel: nothing to reduce
        return data
    if labels or np.any(lo[1:] != hi[:-1]) or lo[0] != 0 or hi[-1] != data.shape[axis]:
        return np.take(data, (lo + hi - 1) // 2, axis=axis)
    shape = [1] * data.ndim
    shape[axis] = len(lo)
    total = np.add.reduceat(data, lo, axis=axis, dtype=np.float32)
    total /= (hi - lo).reshape(shape)
    return total


def picture_of(volume: Volume, grid: PictureGrid, *, labels: bool = False) -> np.ndarray:
    """(c, height, width) of ``volume`` at the grid's pixels: images averaged over each pixel
    (float32), labels the pixel's middle voxel.  Read in tiles of at most about
    ``TILE_VOXELS`` voxels per channel, so memory holds a tile and the picture, never the section.
    Where a pixel spans more rows than a storage block, only its middle row is read."""
    width, height = grid.size
    xlo, xhi = grid.edges(0, volume.resolution[0])
    ylo, yhi = grid.edges(1, volume.resolution[1])
    z = grid.section_in(volume.resolution[2])
    picture = np.zeros((volume.num_channels, height, width), volume.dtype if labels else np.float32)
    sparse = float(np.mean(yhi - ylo)) > volume.block_size.y
    if sparse:  # each pixel's middle row only: reading the others would fetch more blocks
        ylo = (ylo + yhi - 1) // 2
        yhi = ylo + 1
    for x0, x1 in _groups(xlo, xhi, TILE_WIDTH):
        a, b = int(xlo[x0]), int(xhi[x1 - 1])
        rows_per_tile = max(1, TILE_VOXELS // (b - a))
        for y0, y1 in _groups(ylo, yhi, rows_per_tile) if not sparse else \
                [(i, min(i + rows_per_tile, height)) for i in range(0, height, rows_per_tile)]:
            if sparse:
                rows = [volume.read(Box((a, int(r), z), (b, int(r) + 1, z + 1)))[:, 0] for r in ylo[y0:y1]]
                tile, top = np.concatenate(rows, axis=1), np.arange(y1 - y0)
                bottom = top + 1
            else:
                c, d = int(ylo[y0]), int(yhi[y1 - 1])
                tile = volume.read(Box((a, c, z), (b, d, z + 1)))[:, 0]
                top, bottom = ylo[y0:y1] - c, yhi[y0:y1] - c
            strip = _reduce(tile, 1, top, bottom, labels)
            del tile
            picture[:, y0:y1, x0:x1] = _reduce(strip, 2, xlo[x0:x1] - a, xhi[x0:x1] - a, labels)
    return picture


def _to_uint8(plane: np.ndarray, dtype=None) -> np.ndarray:
    """A picture-scale plane as grey levels: uint8 data (``dtype``) as it is, floats in [0, 1]
    times 255, anything else stretched over this plane's own range (the picture's pixels,
    not the full-resolution section)."""
    if plane.dtype == np.uint8:
        return plane
    plane = plane.astype(np.float32)
    if dtype is not None and np.dtype(dtype) == np.uint8:
        return np.clip(np.rint(plane), 0, 255).astype(np.uint8)
    lo, hi = float(plane.min()), float(plane.max())
    if lo >= 0.0 and hi <= 1.0:
        return (plane * 255).round().astype(np.uint8)
    return ((plane - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)


def section_cells(plan: ChunkPlan, gz: int, max_cells: int = MARKER_CHUNKS) -> tuple[list[tuple[Box, Box]], Vec3]:
    """The chunk map of z row ``gz`` of ``plan``: cells (the box drawn, the chunk at its middle
    whose state it shows) in row-major order, and the (columns, rows, 1) of cells.

    Every chunk of the section is its own cell while there are at most ``max_cells`` of them;
    a larger section is cut into at most that many cells of neighbouring chunks, so the
    markers read for a map stay bounded whatever the plan's size."""
    gx, gy = plan.grid_shape.x, plan.grid_shape.y
    shrink = max(1.0, (gx * gy / max_cells) ** 0.5)
    xcuts, ycuts = (np.unique(np.linspace(0, g, max(1, int(g / shrink)) + 1).astype(int)) for g in (gx, gy))
    cells = []
    for y0, y1 in zip(ycuts[:-1], ycuts[1:]):
        for x0, x1 in zip(xcuts[:-1], xcuts[1:]):
            first, last = plan.box_at(Vec3(x0, y0, gz)), plan.box_at(Vec3(x1 - 1, y1 - 1, gz))
            cells.append((Box(first.start, last.stop), plan.box_at(Vec3((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2, gz))))
    return cells, Vec3(len(xcuts) - 1, len(ycuts) - 1, 1)


def _section_states(job: Job, z: int, verified: bool) -> tuple[list[tuple[Box, str]], int]:
    """The chunk map's cells (:func:`section_cells`): (the box drawn, its state), and how many
    of the section's chunks one cell stands for.  A cell's state is read from its middle
    chunk's markers (stage 2, then stage 1 where that is missing).  ``verified`` (every
    stage-2 marker checked, as the finish step does) draws every cell merged and reads no marker.
    """
    plan = job.plan
    gz = next(k for k, (z0, z1) in enumerate(plan.axis_bounds(2)) if z0 <= z < z1)
    cells, _ = section_cells(plan, gz)
    if verified:
        states = ["merged"] * len(cells)
    else:
        samples = [sample for _, sample in cells]
        with ThreadPoolExecutor(MARKER_THREADS) as pool:
            states = list(pool.map(lambda box: "merged" if job.is_done(2, box) else
                                   "stage 1 only" if job.is_done(1, box) else "not done", samples))
    per_cell = -(-plan.grid_shape.x * plan.grid_shape.y // len(cells))
    return [(box, state) for (box, _), state in zip(cells, states)], per_cell


def _chunk_map(job: Job, grid: PictureGrid, cells: list[tuple[Box, str]]) -> Image.Image:
    canvas = Image.new("RGB", grid.size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    origin, step = grid.region.start, grid.step
    for box, state in cells:
        x0, y0 = (box.start.x - origin.x) // step, (box.start.y - origin.y) // step
        x1, y1 = -(-(box.stop.x - origin.x) // step) - 1, -(-(box.stop.y - origin.y) // step) - 1
        outline = (255, 255, 255) if min(x1 - x0, y1 - y0) >= 3 else None  # cells of a few pixels: no lines
        draw.rectangle([x0, y0, x1, y1], fill=STATE_COLOURS[state], outline=outline)
    return canvas


def _label_colours(labels: np.ndarray) -> np.ndarray:
    """(y, x) labels -> (y, x, 3) uint8: a fixed pseudo-random colour per label, 0 black."""
    hashed = (labels.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2 ** 24)
    rgb = np.stack([(hashed >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], -1).astype(np.uint8)
    rgb[labels == 0] = 0
    return rgb


def section_picture(job: Job, *, verified: bool = False) -> bytes:
    """PNG: titled panels input | output | [segmentation |] chunk states at the middle z section,
    with the z index above and the chunk-state legend below.

    Panels are at most ``PICTURE_SIDE`` pixels on their longest side; each layer is read at
    its coarsest level still as fine as a pixel (the output's pyramid, the input's own mips),
    in tiles.  ``verified``: every chunk is known merged (see :func:`_section_states`).
    """
    from .volumes import volume_exists

    grid = PictureGrid.of(job)
    spec = job.spec
    source = level_for_picture(spec.input_url, grid.pixel_nm, fill_value=spec.fill_value)
    raw = picture_of(source, grid)[0] if grid.z not in spec.blackout_sections else \
        np.full(grid.size[::-1], spec.fill_value, np.float32)
    target = level_for_picture(spec.output_url, grid.pixel_nm)
    out = picture_of(target, grid)
    left = Image.fromarray(_to_uint8(raw, source.dtype)).convert("RGB")
    right = Image.fromarray(np.stack([_to_uint8(c, target.dtype) for c in out[:3]], -1)) if len(out) >= 3 \
        else Image.fromarray(_to_uint8(out[0], target.dtype)).convert("RGB")
    del raw, out
    panels = {"input": left, "output": right}
    segmentation = spec.segmentation
    if segmentation["method"] != "none" and volume_exists(segmentation["url"]):
        labels = picture_of(level_for_picture(segmentation["url"], grid.pixel_nm), grid, labels=True)[0]
        panels["segmentation"] = Image.fromarray(_label_colours(labels))
    cells, per_cell = _section_states(job, grid.z, verified)
    title = "chunk states" if per_cell == 1 else f"chunk states (1 read per {per_cell} chunks)"
    if verified and per_cell > 1:
        title = "chunk states (verified)"
    panels[title] = _chunk_map(job, grid, cells)
    header = f"z {grid.z} (middle section of z [{job.roi.start.z}, {job.roi.stop.z}))"
    if grid.step > 1:
        header += f", 1 pixel = {grid.step} x {grid.step} voxels"
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


def write_report(job: Job, summary: dict, *, verified: bool = False) -> dict[str, str]:
    """Write report.md, report.html and report.png under the job's folder; return their URLs.
    ``verified``: the caller checked every chunk's stage-2 marker (the picture reads none)."""
    files = CloudFiles(job.job_url)
    files.put("report.png", section_picture(job, verified=verified), content_type="image/png", compress=None)
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
