"""PyTorch, TorchScript and torch.export models -> what the CPU engines read (OpenVINO, ONNX Runtime).

- ONNX (ONNX Runtime; OpenVINO for a ``pytorch``-format module): a Module or a
  torch.export program is exported with the torch.export-based exporter, a
  TorchScript module with the TorchScript-based one (the only exporter that takes
  ScriptModules).
- OpenVINO converts a TorchScript module or a torch.export program directly
  (``openvino.convert_model``).

A conversion takes seconds, so a machine makes each one once: the result is cached
on local disk (``$CHUNK_OPS_CACHE``, else ``~/.cache/chunk_ops``) by the model's
bytes, definition, patch and the converters' versions, and workers starting
together wait for the first one's result instead of converting too.  The key is
computed without importing torch, and the model is built only to convert it, so
a worker that finds its conversion cached never imports torch.  A model
that a converter cannot take is remembered as well, so the fallback to PyTorch is
reported once per machine, not by every worker.  The cache is only an
accelerator: any file in it is re-checked by the engine's own one-patch probe
like any other model; delete the folder to convert again.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

ONNX_OPSET = 18


class ConversionError(Exception):
    """A converter cannot take the model; the message says which converter and why, on one line.

    ``remembered``: the failure was found earlier (by this or another worker) and read from the cache.
    """

    def __init__(self, message: str, *, remembered: bool):
        super().__init__(message)
        self.remembered = remembered


def cache_dir() -> Path:
    root = os.environ.get("CHUNK_OPS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "chunk_ops")
    return Path(root)


def _example(in_channels: int, input_patch_zyx: tuple[int, int, int]):
    import torch

    return torch.zeros((1, in_channels, *input_patch_zyx), dtype=torch.float32)


def export_onnx(module, in_channels: int, input_patch_zyx: tuple[int, int, int]) -> bytes:
    """The module as ONNX bytes: input ``(batch, in_channels, z, y, x)``, batch dynamic (a
    ``torch.export.ExportedProgram``: its input dimensions as it was exported with)."""
    import torch

    example = _example(in_channels, input_patch_zyx)
    buffer = io.BytesIO()
    # the exporter's chatter (e.g. "torchvision is not installed") is not the user's business
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(module, torch.export.ExportedProgram):  # its shapes, static or dynamic, are its own
            program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
                                        input_names=["input"], output_names=["output"])
            program.save(buffer, external_data=False)
            return buffer.getvalue()
        module = module.eval()
        if isinstance(module, torch.jit.ScriptModule):
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
            return buffer.getvalue()
        program = torch.onnx.export(
            module, (example,), dynamo=True, verbose=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    program.save(buffer, external_data=False)
    return buffer.getvalue()


def convert_openvino(model, in_channels: int, input_patch_zyx: tuple[int, int, int]):
    """A TorchScript module (input shape dynamic: the engine fixes it) or a torch.export program
    (its input's static dimensions kept, so that the engine can check them) as an ``openvino.Model``."""
    import openvino as ov
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        from .exported import program_input_shape

        shape = [-1 if d is None else d for d in program_input_shape(model)]
        return ov.convert_model(model, input=[ov.PartialShape(shape)])
    return ov.convert_model(model, example_input=_example(in_channels, input_patch_zyx))


def converted(engine: str, build: Callable[[], Any], ident: dict, in_channels: int,
              input_patch_zyx: tuple[int, int, int]):
    """The model as CPU engine ``engine`` reads it, through the cache: an ``openvino.Model``
    (OpenVINO, from TorchScript or torch.export) or ONNX bytes.

    ``build()`` gives the model to convert (a Module, ScriptModule or ExportedProgram): it
    is called only when the conversion is not cached yet, and its errors are not
    conversion failures (they propagate, uncached).  ``ident``: what identifies the model
    (its bytes' hash, ``format``, definition...).  Raises :class:`ConversionError`.
    """
    fmt = ident["format"]
    ident = {**ident, "torch": importlib.metadata.version("torch"), "in_channels": in_channels,
             "patch": list(input_patch_zyx)}
    if engine == "openvino" and fmt in ("torchscript", "torch_export"):
        import openvino as ov

        return _through_cache(
            "openvino", ".xml", {**ident, "converter": f"openvino.convert_model {ov.__version__}"},
            build, lambda model: convert_openvino(model, in_channels, input_patch_zyx),
            save=lambda model, path: ov.save_model(model, path, compress_to_fp16=False),
            load=lambda path: ov.Core().read_model(path))
    exporter = "TorchScript-based ONNX export" if fmt == "torchscript" else "torch.export-based ONNX export"
    return _through_cache(
        "onnx", ".onnx", {**ident, "converter": f"{exporter}, opset {ONNX_OPSET}"},
        build, lambda model: export_onnx(model, in_channels, input_patch_zyx),
        save=lambda data, path: path.write_bytes(data), load=lambda path: path.read_bytes())


def _through_cache(kind: str, suffix: str, ident: dict, build: Callable[[], Any], convert: Callable[[Any], Any], *,
                   save: Callable[[Any, Path], None], load: Callable[[Path], Any]) -> Any:
    """``convert(build())``, made once per machine: cached as ``<cache>/<kind>/<id><suffix>``
    (files beside it with other suffixes belong to it), failures of ``convert`` as ``<id>.failed``."""
    what = ident["converter"]
    folder = cache_dir() / kind
    stem = folder / hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    path, failed = stem.with_suffix(suffix), stem.with_suffix(".failed")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(stem.with_suffix(".lock"), "a")
    except OSError as e:
        log.warning("cannot use the model cache at %s (%s): converting the model in every worker", folder, e)
        return _convert(what, convert, build())
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker converts; the others wait, then read its result
        if path.is_file():
            return load(path)
        if failed.is_file():
            raise ConversionError(failed.read_text(), remembered=True)
        model = build()
        try:
            result = _convert(what, convert, model)
        except ConversionError as e:
            failed.write_text(str(e))
            raise
        try:
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                save(result, Path(tmp) / f"model{suffix}")
                # the main file last: once it exists, so do the files it names
                for part in sorted(Path(tmp).iterdir(), key=lambda p: p.suffix == suffix):
                    os.replace(part, stem.with_suffix(part.suffix))
        except OSError as e:
            log.warning("cannot cache the converted model at %s: %s", path, e)
        return result


def _convert(what: str, convert: Callable[[Any], Any], model: Any) -> Any:
    try:
        return convert(model)
    except (OSError, MemoryError):  # this machine's trouble, not the model's: not a conversion failure
        raise
    except Exception as e:
        raise ConversionError(f"{what}: {_reason(e)}", remembered=False) from e


def _reason(error: BaseException) -> str:
    """The root cause of a converter's (multi-line, sometimes coloured) error, on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip(" -") for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()]
    lines = [line for line in lines if line]
    return f"{type(error).__name__}: {lines[-1]}" if lines else type(error).__name__
