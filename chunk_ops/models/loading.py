"""Load a model named by the job spec, safely, into an engine.

Formats:
- ``torchscript``: a ``torch.jit.save`` file; no Python code is imported.
- ``pytorch``: a class named by ``definition`` (``package.module:Class`` or
  ``/path/file.py:Class``, allowlisted: see :mod:`.registry`) built with ``kwargs``, and a state_dict read with
  ``torch.load(..., weights_only=True)`` (never pickle-executing code).
- ``torch_export``: a ``torch.export.save`` file (``.pt2``) of ``torch.export.export(module,
  (example,))``, read with ``torch.export.load`` once checked to hold nothing torch would run
  as code (:func:`load_exported_program`): no Python code is imported, only torch operators
  run.  Its input's static dimensions hold: export the batch dimension dynamic, or set
  ``inference.batch_size`` to the exported batch.
- ``onnx``: an ONNX graph.

Engines (``inference.engine``): ``pytorch`` (CPU or CUDA), ``openvino`` and
``onnxruntime`` (CPU; PyTorch, TorchScript and torch.export models are converted for them and
cached, see :mod:`.export`).  ``auto`` picks the fastest available: PyTorch on a
CUDA device, else OpenVINO (on this project's CPUs 2-3x PyTorch eager at float32),
else PyTorch, or ONNX Runtime for ONNX models; a model its CPU engine cannot take
runs on PyTorch, with one warning per machine saying why.  The choice is logged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import logging
import os
import sys
from urllib.parse import urlparse

import numpy as np

from ..engines import (ModelError, OnnxRuntimeEngine, OpenVinoEngine, Predictor, TorchEngine, fixed_batch,
                       fixed_input_shape_error,
                       worker_threads)
from ..spec import JobSpec, ModelSpec
from .registry import definition_sha256 as source_sha256
from .exported import exported_module, load_exported_program, program_input_shape
from .registry import load_definition

log = logging.getLogger(__name__)


def read_model_bytes(path: str) -> bytes:
    """The model file's bytes from a local path or a file://, gs://, s3:// URL."""
    scheme = urlparse(path).scheme
    try:
        if scheme in ("", "file"):
            local = path[len("file://"):] if scheme == "file" else path
            with open(local, "rb") as f:
                return f.read()
        from cloudfiles import CloudFiles

        base, name = path.rsplit("/", 1)
        data = CloudFiles(base).get(name)
    except OSError as e:
        raise ModelError(f"cannot read model file {path!r}: {e.strerror or e}") from None
    if data is None:
        raise ModelError(f"cannot read model file {path!r}: not found")
    return data


def model_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def torch_module(model: ModelSpec, data: bytes, definition_sha256: str | None = None):
    """The network as a torch Module (format torch_export: a ``torch.export.ExportedProgram``,
    whose ``module()`` runs it); for format pytorch, its definition's source must hash to
    ``definition_sha256`` (the job's) when given."""
    import torch

    if model.format == "torch_export":
        return load_exported_program(model.path, data)
    if model.format == "torchscript":
        try:
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as e:
            raise ModelError(f"model file {model.path!r} is not a readable TorchScript file: {e}") from None
    cls = load_definition(model.definition or "", definition_sha256)
    try:
        module = cls(**model.kwargs)
    except TypeError as e:
        raise ModelError(f"cannot build {model.definition} with model.kwargs {model.kwargs}: {e}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"model file {model.path!r} is not a readable state_dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ModelError(f"model file {model.path!r} does not fit {model.definition}: {e}") from None
    return module


def _onnxruntime_engine(spec: JobSpec, onnx: bytes, threads: int):
    if spec.precision != "float32":
        raise ModelError(f"inference.precision {spec.precision!r} is not available with engine onnxruntime; "
                         f"use 'float32', or engine 'openvino' or 'pytorch'")
    try:
        engine = OnnxRuntimeEngine(onnx, threads=threads)
    except Exception as e:
        raise ModelError(f"model file {spec.model.path!r} is not a readable ONNX model: {e}") from None
    shape = [d if isinstance(d, int) else None for d in engine.session.get_inputs()[0].shape]
    _check_fixed_shape(spec, shape)
    return fixed_batch(engine, shape[0])


def _openvino_engine(spec: JobSpec, model, threads: int) -> OpenVinoEngine:
    """``model``: ONNX bytes, or an ``openvino.Model`` converted from TorchScript or torch.export."""
    import openvino as ov

    if isinstance(model, bytes):
        try:
            model = ov.Core().read_model(model, b"")
        except Exception as e:
            raise ModelError(f"model file {spec.model.path!r} is not a readable ONNX model: {e}") from None
    shape = [d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape()]
    if spec.model.format != "torch_export":  # its graph may depend on its static batch: not reshaped
        shape[0] = None  # the batch is reshaped below
    _check_fixed_shape(spec, shape)
    try:
        model.reshape([spec.batch_size, spec.model.in_channels, *spec.model.input_patch.zyx()])
    except Exception as e:
        raise ModelError(f"the model cannot take model.input_patch (x,y,z) "
                         f"{spec.model.input_patch.to_list()}: {e}") from None
    return fixed_batch(OpenVinoEngine(model, threads=threads, precision=spec.precision), spec.batch_size)


def _torch_engine(spec: JobSpec, module, threads: int):
    """PyTorch running ``module`` (format torch_export: the program, checked against the job first)."""
    batch = None
    if spec.model.format == "torch_export":
        shape = program_input_shape(module)
        _check_fixed_shape(spec, shape)
        module, batch = exported_module(module, spec.device), shape[0]
    engine = TorchEngine(module, threads=threads, device=spec.device, precision=spec.precision)
    return fixed_batch(engine, batch)


def _check_fixed_shape(spec: JobSpec, shape: list) -> None:
    why = fixed_input_shape_error(shape, spec.batch_size, spec.model.in_channels, spec.model.input_patch)
    if why:
        if spec.model.format == "torch_export" and len(shape) == 5 and shape[0] not in (None, spec.batch_size):
            why += (f"; export it with a dynamic batch dimension (torch.export.export(module, (example,), "
                    f"dynamic_shapes=({{0: torch.export.Dim('batch')}},))) or set inference.batch_size to {shape[0]}")
        raise ModelError(f"model file {spec.model.path!r} does not fit the job: {why}")


def may_have_gpu() -> bool:
    """Whether this machine may have a GPU: its device nodes exist (NVIDIA /dev/nvidiactl,
    /dev/nvidia0; ROCm /dev/kfd; WSL2 /dev/dxg), or it is not Linux (no such nodes to look at).

    ``torch.cuda.is_available()`` imports torch (about 1 s, here), which a worker running a
    cached OpenVINO or ONNX conversion never needs; without these nodes the answer is no anyway
    (a container given no GPU has none of them).
    """
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def choose_engine(spec: JobSpec) -> str:
    """The engine a worker runs ``spec`` with: ``inference.engine``, with ``auto`` resolved."""
    engine, fmt = spec.engine, spec.model.format
    if engine == "auto":
        cuda = False
        if spec.device != "cpu" and fmt != "onnx" and may_have_gpu():
            import torch

            cuda = torch.cuda.is_available()
        if cuda:
            engine = "pytorch"
        elif _available("openvino"):
            engine = "openvino"
        else:
            engine = "onnxruntime" if fmt == "onnx" else "pytorch"
    if engine == "pytorch" and fmt == "onnx":
        raise ModelError("inference.engine 'pytorch' cannot run an ONNX model; use 'openvino' or 'onnxruntime'")
    if engine != "pytorch" and spec.device == "cuda":
        raise ModelError(f"inference.engine {engine!r} runs on CPUs; inference.device 'cuda' needs 'pytorch'")
    if engine != "pytorch" and not _available(engine):
        raise ModelError(f"inference.engine {engine!r} is not installed on this worker")
    return engine


def load_predictor(spec: JobSpec, data: bytes | None = None, definition_sha256: str | None = None) -> Predictor:
    """Load the spec's model into its engine, check it on one batch, and return its predictor.

    ``definition_sha256``: the job's hash of the network's source (format pytorch); the
    source must still match it, and it keys the conversion cache with the weights.  The
    engine runs on this worker's thread budget (:func:`~chunk_ops.engines.worker_threads`).
    """
    model = spec.model
    data = read_model_bytes(model.path) if data is None else data
    if model.format == "pytorch":  # checked here too: a cached conversion never builds the module
        definition_sha256 = source_sha256(model.definition or "", definition_sha256)
    engine_name = choose_engine(spec)
    threads = worker_threads()
    # the torch model, built at most once, and only when needed: not for a cached conversion
    build = functools.cache(lambda: torch_module(model, data, definition_sha256))
    readable = data  # what a CPU engine reads: ONNX bytes, or an OpenVINO model
    if engine_name != "pytorch" and model.format != "onnx":
        from .export import ConversionError, converted

        ident = {"model": model_sha256(data), "format": model.format, "definition": model.definition,
                 "kwargs": model.kwargs, "definition_sha256": definition_sha256}
        try:
            readable = converted(engine_name, build, ident, model.in_channels, model.input_patch.zyx())
        except ConversionError as e:
            why = f"cannot convert the model for engine {engine_name!r}: {e}"
            if spec.engine != "auto":
                raise ModelError(f"{why} (inference.engine 'pytorch' runs it as it is)") from None
            # auto: PyTorch runs any model. The worker that found the failure warns; the
            # others on this machine read it from the conversion cache and only note it
            log.log(logging.INFO if e.remembered else logging.WARNING, "%s; running it on PyTorch", why)
            engine_name = "pytorch"
    if engine_name == "pytorch":
        engine = _torch_engine(spec, build(), threads)
    elif engine_name == "openvino":
        engine = _openvino_engine(spec, readable, threads)
    else:
        engine = _onnxruntime_engine(spec, readable, threads)
    predictor = Predictor(
        engine=engine, input_patch=model.input_patch, output_patch=model.output_patch,
        in_channels=model.in_channels, out_channels=model.out_channels, batch_size=spec.batch_size,
    )
    predictor.check()
    log.info("engine %s on %d threads for model %s (inference.engine=%s)", engine.name, engine.threads,
             model.path, spec.engine)
    return predictor
