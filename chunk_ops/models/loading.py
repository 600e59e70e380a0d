"""Load a model named by the job spec, safely, into an engine.

Formats:
- ``torchscript``: a ``torch.jit.save`` file; no Python code is imported.
- ``pytorch``: a class named by ``definition`` (``package.module:Class`` or
  ``/path/file.py:Class``) built with ``kwargs``, and a state_dict read with
  ``torch.load(..., weights_only=True)`` (never pickle-executing code).
- ``onnx``: an ONNX graph run by ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import os
from urllib.parse import urlparse

from ..engines import ModelError, OnnxRuntimeEngine, Predictor, TorchEngine
from ..spec import JobSpec, ModelSpec


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


def _import_definition(definition: str):
    target, _, attr = definition.rpartition(":")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise ModelError(f"model.definition file {target!r} does not exist")
            spec = importlib.util.spec_from_file_location(f"chunk_ops_user_model_{abs(hash(target))}", target)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
        return getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ModelError(f"cannot import model.definition {definition!r}: {e}") from None


def _torch_module(model: ModelSpec, data: bytes):
    import torch

    if model.format == "torchscript":
        try:
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as e:
            raise ModelError(f"model file {model.path!r} is not a readable TorchScript file: {e}") from None
    cls = _import_definition(model.definition or "")
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


def _onnx_engine(model: ModelSpec, data: bytes) -> OnnxRuntimeEngine:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelError(f"model file {model.path!r} is not a readable ONNX model: {e}") from None
    return OnnxRuntimeEngine(session)


def load_predictor(spec: JobSpec, data: bytes | None = None) -> Predictor:
    """Load the spec's model, check it on one patch, and return its predictor."""
    model = spec.model
    data = read_model_bytes(model.path) if data is None else data
    if model.format == "onnx":
        engine = _onnx_engine(model, data)
    else:
        engine = TorchEngine(_torch_module(model, data), device=spec.device, precision=spec.precision)
    predictor = Predictor(
        engine=engine, input_patch=model.input_patch, output_patch=model.output_patch,
        in_channels=model.in_channels, out_channels=model.out_channels, batch_size=spec.batch_size,
    )
    predictor.check()
    return predictor
