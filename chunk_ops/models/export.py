"""PyTorch -> ONNX, so PyTorch models run on the CPU engines (OpenVINO, ONNX Runtime).

The export (torch.export based, several seconds) is cached on local disk by
the model bytes, the definition and the patch, so a machine exports a model
once, not once per worker process.  The cache is only an accelerator: any file
in it is re-checked by the engine's own one-patch probe like any other model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

ONNX_OPSET = 18


def cache_dir() -> Path:
    root = os.environ.get("CHUNK_OPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chunk_ops")
    return Path(root)


def export_onnx(module, in_channels: int, input_patch_zyx: tuple[int, int, int]) -> bytes:
    """The module as ONNX bytes: input ``(batch, in_channels, z, y, x)``, batch dynamic."""
    import torch

    example = torch.zeros((1, in_channels, *input_patch_zyx), dtype=torch.float32)
    buffer = io.BytesIO()
    module = module.eval()
    # the exporter's chatter (e.g. "torchvision is not installed") is not the user's business
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    program.save(buffer, external_data=False)
    return buffer.getvalue()


def cached_onnx(module, model_sha256: str, key: dict, in_channels: int,
                input_patch_zyx: tuple[int, int, int]) -> bytes:
    """:func:`export_onnx`, through the local cache."""
    import torch

    ident = json.dumps({"model": model_sha256, "torch": torch.__version__, "opset": ONNX_OPSET,
                        "in_channels": in_channels, "patch": list(input_patch_zyx), **key}, sort_keys=True)
    path = cache_dir() / "onnx" / (hashlib.sha256(ident.encode()).hexdigest()[:24] + ".onnx")
    if path.is_file():
        return path.read_bytes()
    data = export_onnx(module, in_channels, input_patch_zyx)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)  # atomic: concurrent workers never read half a file
    except OSError as e:
        log.warning("cannot cache the ONNX export at %s: %s", path, e)
    return data
