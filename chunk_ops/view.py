"""Neuroglancer on chunk_ops layers and chunks, served from this machine.

    serve(urls, bind=..., port=..., open_browser=...)  ``chunk-ops view``: prints the viewer URL,
                                                        serves until SIGINT or SIGTERM
    show_arrays(layers, bind=..., port=0) -> URL        in-memory chunks (the chain's ``view``
                                                        operator); serves while the process lives
    view_command(urls), local_viewer_url(port)          what a run report tells people to run and open
    neuroglancer_source(url), viewer_state(...)         layer URLs and states as Neuroglancer reads them

The viewer is the ``neuroglancer`` package's own server and bundled client, at
``http://BIND:PORT/v/TOKEN/``.  ``chunk-ops view`` uses a fixed port (``VIEWER_PORT``)
and token (``VIEWER_TOKEN``), so the URL a report gives is the one the command prints.

How each layer reaches the browser:

- precomputed on ``gs://``, ``s3://``, ``http(s)://``: its own URL (``precomputed://gs://...``);
  the browser reads it (with the browser's access to the bucket).
- precomputed on ``file://``: its folder is served over HTTP on the bind address (a free
  port, CORS open to any origin, cloud-files' ``.gz``/``.br``/``.zstd`` blocks sent as they
  are with a ``Content-Encoding``), so the browser reads the stored blocks and mips itself.
  Each request is logged on stderr.
- anything else chunk_ops opens (``zarr://...``, ``h5://...``, ...), wherever it lives:
  read through :func:`~chunk_ops.volumes.open_volume` when the browser asks for a region,
  and served by the viewer's server as a ``neuroglancer.LocalVolume``: whatever chunk_ops
  can read, it can show, at its bounds and resolution (mip 0; coarser views are
  downsampled on the fly).

``show_arrays`` takes ``{name: (array (c, z, y, x), Box, resolution (x, y, z nm), layer_type)}``
with ``layer_type`` ``"image"`` or ``"segmentation"`` and serves the arrays as LocalVolumes
in one viewer per process: each call replaces what the last one showed (a page open on
it follows) and returns the same URL.  One viewer server runs per process (Neuroglancer's):
the first call's bind address and port hold for every later call.  Image layers of 3 or
more channels are drawn as RGB from the first three.

``neuroglancer`` is imported when a viewer starts: the CLI and the report import this module.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
import urllib.parse
import webbrowser
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import Box, Vec3
from .storage import local_path
from .volumes import Volume, open_volume, split_format

VIEWER_PORT = 9015
VIEWER_TOKEN = "chunk-ops"
LAYER_TYPES = ("image", "segmentation")
RGB_SHADER = ("void main() { emitRGB(vec3(toNormalized(getDataValue(0)), "
              "toNormalized(getDataValue(1)), toNormalized(getDataValue(2)))); }")
# cloud-files' names for compressed objects -> HTTP Content-Encoding; browsers decode them
COMPRESSED_SUFFIXES = {".gz": "gzip", ".br": "br", ".zstd": "zstd"}
REMOTE_STORAGE = ("gs://", "s3://", "http://", "https://")
FIT_PIXELS = 600  # the region's longer side in x, y spans about this many screen pixels at first

# show_arrays' one viewer, whose state each call replaces (so earlier chunks are freed); held
# here because Neuroglancer's server holds viewers by weak reference only.
_arrays_viewer = None


@dataclass(frozen=True)
class Layer:
    """One Neuroglancer layer: its name, where its data comes from, how to draw it."""

    name: str
    source: Any  # a Neuroglancer data source URL, or a neuroglancer.LocalVolume
    layer_type: str  # "image" or "segmentation"
    num_channels: int

    def __post_init__(self) -> None:
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer {self.name!r}: layer type {self.layer_type!r} is not one of {LAYER_TYPES}")

    def to_json(self) -> dict:
        layer = {"type": self.layer_type, "source": self.source, "name": self.name}
        if self.layer_type == "image" and self.num_channels >= 3:
            layer["shader"] = RGB_SHADER
        return layer


def viewer_state(layers: list[Layer], resolution, box: Box) -> dict:
    """A Neuroglancer state: x y z in nm at ``resolution``; an xy view centred on ``box``, which fills it."""
    return {
        "dimensions": {axis: [float(r) * 1e-9, "m"] for axis, r in zip("xyz", resolution)},
        "position": [(a + b) / 2 for a, b in zip(box.start, box.stop)],
        "crossSectionScale": max(box.shape.x, box.shape.y) / FIT_PIXELS,
        "layers": [layer.to_json() for layer in layers],
        "layout": "xy",
    }


def neuroglancer_source(url: str) -> str:
    """A chunk_ops layer URL as a Neuroglancer data source: ``gs://b/x`` -> ``precomputed://gs://b/x``."""
    name, location = split_format(url)
    return f"{name}://{location}"


def browser_readable(url: str) -> bool:
    """Can Neuroglancer in a browser anywhere read this layer itself (precomputed on gs/s3/http(s))?"""
    name, location = split_format(url)
    return name == "precomputed" and location.startswith(REMOTE_STORAGE)


def local_viewer_url(port: int = VIEWER_PORT) -> str:
    """The URL ``chunk-ops view --port PORT`` prints (bound to 127.0.0.1, the default)."""
    return f"http://127.0.0.1:{port}/v/{VIEWER_TOKEN}/"


def view_command(urls: list[str]) -> str:
    return "chunk-ops view " + " ".join(shlex.quote(url) for url in urls)


# --- chunk-ops view -----------------------------------------------------------------------------

def serve(urls: list[str], *, bind: str = "127.0.0.1", port: int = VIEWER_PORT, open_browser: bool = True) -> None:
    """Show the layers at ``urls``; print the viewer URL on stdout; serve until SIGINT or SIGTERM.

    A missing or unreadable layer raises :class:`~chunk_ops.volumes.VolumeError` naming it,
    before anything is served.
    """
    volumes = [open_volume(url, 0) for url in urls]
    names = layer_names(urls)
    folders = {name: local_path(split_format(url)[1]).resolve() for name, url in zip(names, urls)
               if _served_as_files(url)}
    viewer = _start_viewer(bind, port, VIEWER_TOKEN)
    host = urllib.parse.urlsplit(viewer.get_viewer_url()).hostname
    files = LayerFileServer((bind, 0), folders)
    threading.Thread(target=files.serve_forever, name="layer-files", daemon=True).start()
    files_url = f"http://{host}:{files.server_address[1]}"
    layers = [_layer(name, url, volume, files_url) for name, url, volume in zip(names, urls, volumes)]
    _set_state(viewer, viewer_state(layers, volumes[0].resolution, volumes[0].bounds))

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(viewer.get_viewer_url(), flush=True)
    print(f"serving {len(layers)} layer(s): " + ", ".join(f"{n} ({u})" for n, u in zip(names, urls))
          + (f"; files at {files_url}" if folders else "") + "; Ctrl-C stops", file=sys.stderr, flush=True)
    if open_browser:
        webbrowser.open(viewer.get_viewer_url())
    stop.wait()
    files.shutdown()
    files.server_close()
    import neuroglancer

    neuroglancer.stop()
    print("stopped", file=sys.stderr, flush=True)


def layer_names(urls: list[str]) -> list[str]:
    """The last path part of each layer's location (``.../affinities`` -> ``affinities``), made unique."""
    names: list[str] = []
    for url in urls:
        base = split_format(url)[1].rstrip("/").rsplit("/", 1)[-1] or "layer"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _served_as_files(url: str) -> bool:
    name, location = split_format(url)
    return name == "precomputed" and local_path(location) is not None


def _layer(name: str, url: str, volume: Volume, files_url: str) -> Layer:
    layer_type = _layer_type(url, volume)
    if _served_as_files(url):
        source = f"precomputed://{files_url}/{urllib.parse.quote(name)}"
    elif browser_readable(url):
        source = neuroglancer_source(url)
    else:  # other formats, wherever they live: read here, through open_volume
        source = _local_volume(VolumeArray(volume), volume.bounds.start, volume.resolution, layer_type)
    return Layer(name, source, layer_type, volume.num_channels)


def _layer_type(url: str, volume: Volume) -> str:
    """Precomputed layers name their type in the info file; other formats: guessed from the data."""
    name, location = split_format(url)
    if name == "precomputed":
        from cloudfiles import CloudFiles

        return CloudFiles(location).get_json("info").get("type", "image")
    is_labels = volume.num_channels == 1 and volume.dtype in (np.uint16, np.uint32, np.uint64)
    return "segmentation" if is_labels else "image"


class LayerFileServer(ThreadingHTTPServer):
    """Local layer folders over HTTP: ``/NAME/PATH`` is ``folders[NAME] / PATH``."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], folders: dict[str, Path]) -> None:
        self.folders = folders
        super().__init__(address, _LayerFileHandler)


class _LayerFileHandler(BaseHTTPRequestHandler):
    server: LayerFileServer

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_OPTIONS(self) -> None:  # a CORS preflight
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.end_headers()

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")  # the viewer runs on another port
        super().end_headers()

    def _answer(self, send_body: bool) -> None:
        found = self._find(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        if found is None:
            self.send_error(404)
            return
        path, encoding = found
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _find(self, path: str) -> tuple[Path, str | None] | None:
        """The file for a request path and its Content-Encoding; None outside the layer folders."""
        name, _, rest = path.lstrip("/").partition("/")
        folder = self.server.folders.get(name)
        if folder is None or not rest:
            return None
        target = (folder / rest).resolve()
        if not target.is_relative_to(folder):
            return None
        if target.is_file():
            return target, None
        for suffix, encoding in COMPRESSED_SUFFIXES.items():
            packed = target.with_name(target.name + suffix)
            if packed.is_file():
                return packed, encoding
        return None


# --- in-memory chunks and other formats: LocalVolume --------------------------------------------

def show_arrays(layers: dict[str, tuple[np.ndarray, Box, Any, str]], *, bind: str = "127.0.0.1",
                port: int = 0) -> str:
    """Show (c, z, y, x) arrays at their boxes in this process's arrays viewer; return its URL.

    ``layers``: name -> (array, box, resolution (x, y, z nm), "image" or "segmentation").
    They replace what the viewer showed before; it serves while this process lives.
    """
    global _arrays_viewer
    import neuroglancer

    if not layers:
        raise ValueError("show_arrays needs at least one layer")
    shown = []
    for name, (array, box, resolution, layer_type) in layers.items():
        if array.ndim != 4 or tuple(array.shape[1:]) != box.shape.zyx():
            raise ValueError(f"layer {name!r}: array of shape {array.shape} is not (c, z, y, x) of {box}")
        data = array[0] if array.shape[0] == 1 else array
        shown.append(Layer(name, _local_volume(data, box.start, resolution, layer_type), layer_type, array.shape[0]))
    _, first_box, first_resolution, _ = next(iter(layers.values()))
    if _arrays_viewer is None or not neuroglancer.is_server_running():
        _arrays_viewer = _start_viewer(bind, port, token=None)
    _check_port(_arrays_viewer, port)
    _set_state(_arrays_viewer, viewer_state(shown, first_resolution, first_box))
    return _arrays_viewer.get_viewer_url()


class VolumeArray:
    """A chunk_ops volume as a lazy array, read on demand: (z, y, x) for one channel, else (c, z, y, x)."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.dtype = volume.dtype
        self.shape = volume.bounds.shape.zyx()
        if volume.num_channels > 1:
            self.shape = (volume.num_channels, *self.shape)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        *c, z, y, x = index  # LocalVolume asks with slices whose start and stop are given
        box = Box(Vec3(x.start, y.start, z.start), Vec3(x.stop, y.stop, z.stop))
        data = self.volume.read(box.shift(self.volume.bounds.start))
        return data[c[0]] if c else data[0]


def _local_volume(data, start: Vec3, resolution, layer_type: str):
    """A LocalVolume of ``data``, (z, y, x) or (c, z, y, x), whose first voxel is at ``start`` (x y z).

    Channels are a Neuroglancer channel dimension ("c^"): the shader's ``getDataValue(i)``.
    """
    import neuroglancer

    zyx_scales = [float(r) for r in reversed(list(resolution))]
    if len(data.shape) == 3:
        space = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="nm", scales=zyx_scales)
        offset = list(start.zyx())
    else:
        space = neuroglancer.CoordinateSpace(names=["c^", "z", "y", "x"], units=["", "nm", "nm", "nm"],
                                             scales=[1, *zyx_scales])
        offset = [0, *start.zyx()]
    return neuroglancer.LocalVolume(data, dimensions=space, voxel_offset=offset, volume_type=layer_type)


# --- the viewer ---------------------------------------------------------------------------------

def _start_viewer(bind: str, port: int, token: str | None):
    """A viewer on this process's Neuroglancer server (started here at ``bind:port``, 0: any port)."""
    import neuroglancer

    neuroglancer.set_server_bind_address(bind, port)
    try:
        viewer = neuroglancer.Viewer(token=token)
    except OSError as e:
        raise ValueError(f"cannot serve the viewer at {bind}:{port}: {e.strerror or e}") from None
    _check_port(viewer, port)
    return viewer


def _check_port(viewer, port: int) -> None:
    running = urllib.parse.urlsplit(viewer.get_viewer_url()).port
    if port and running != port:
        raise ValueError(f"port {port}: this process's Neuroglancer server already runs on port {running}")


def _set_state(viewer, state: dict) -> None:
    import neuroglancer

    viewer.set_state(neuroglancer.ViewerState(state))
