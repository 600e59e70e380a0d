"""Which Python code a job may run: ``model.definition``, resolved against an allowlist.

A job spec arrives from a trigger form, the REST API or a queue message naming a
stored spec, so its ``model.definition`` (``package.module:Class`` or
``/path/file.py:Class``) is untrusted text.  It is checked here, before anything is
imported, against:

- the networks bundled with chunk_ops (``BUNDLED``);
- networks installed as entry points in the group ``chunk_ops.models``
  (``[project.entry-points."chunk_ops.models"] mynet = "mylab.nets:MyNet"``);
- the operator's allowlist, ``CHUNK_OPS_MODEL_ALLOWLIST``: comma-separated entries,
  each ``module:Class``, ``module:*`` (any class of that module), ``/path/file.py:Class``,
  ``/path/file.py:*`` or a folder ``/path/`` (any ``.py`` file below it).  It is set
  where workers and Airflow run (deployment, pod or compose environment), never by
  the trigger.

The attribute must then be a ``torch.nn.Module`` class.  The definition's source
bytes are hashed (:func:`definition_sha256`) into the job id and the ONNX cache key,
and checked again when a worker builds the network, so an edited ``forward()`` is a
new job, never a mix of two networks in one output.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from types import ModuleType

from ..engines import ModelError

BUNDLED = frozenset({"chunk_ops.models.rsunet:RSUNet"})
ALLOWLIST_ENV = "CHUNK_OPS_MODEL_ALLOWLIST"
ENTRY_POINT_GROUP = "chunk_ops.models"


def _split(definition: str) -> tuple[str, str]:
    target, sep, attr = definition.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ModelError(f"model.definition {definition!r} is not 'package.module:Class' or '/path/file.py:Class'")
    return target, attr


def _entry_points() -> set[str]:
    return {ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def operator_allowlist() -> list[str]:
    return [e.strip() for e in os.environ.get(ALLOWLIST_ENV, "").split(",") if e.strip()]


def _allowed_by(entry: str, target: str, attr: str) -> bool:
    if entry.endswith("/"):  # a folder of .py files
        folder = os.path.realpath(entry)
        return target.endswith(".py") and os.path.realpath(target).startswith(folder + os.sep)
    allowed_target, _, allowed_attr = entry.rpartition(":")
    if allowed_target.endswith(".py") and target.endswith(".py"):
        same = os.path.realpath(allowed_target) == os.path.realpath(target)
    else:
        same = allowed_target == target
    return same and allowed_attr in ("*", attr)


def check_allowed(definition: str) -> None:
    """Refuse, before any import, a definition that no allowlist names."""
    target, attr = _split(definition)
    if definition in BUNDLED or definition in _entry_points():
        return
    if any(_allowed_by(entry, target, attr) for entry in operator_allowlist()):
        return
    raise ModelError(
        f"model.definition {definition!r} is not allowed: a job may name the bundled networks "
        f"({', '.join(sorted(BUNDLED))}), installed '{ENTRY_POINT_GROUP}' entry points, or what the "
        f"operator lists in {ALLOWLIST_ENV} where the workers run"
    )


def _source_path(target: str) -> str:
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ModelError(f"model.definition file {target!r} does not exist")
        return target
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError) as e:
        raise ModelError(f"cannot find model.definition module {target!r}: {e}") from None
    if found is None or not found.origin or not os.path.isfile(found.origin):
        raise ModelError(f"cannot find the source of model.definition module {target!r}")
    return found.origin


def _sha256_of_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def definition_sha256(definition: str, expected_sha256: str | None = None) -> str:
    """The sha256 of the file that defines the network (checked against the allowlist first);
    with ``expected_sha256`` (the job's), a source changed since raises ModelError."""
    check_allowed(definition)
    path = _source_path(_split(definition)[0])
    actual = _sha256_of_file(path)
    _check_source(path, actual, expected_sha256)
    return actual


def _load_file(path: str, expected_sha256: str | None) -> ModuleType:
    with open(path, "rb") as f:
        source = f.read()
    _check_source(path, hashlib.sha256(source).hexdigest(), expected_sha256)
    name = f"chunk_ops_user_model_{hashlib.sha256(source).hexdigest()[:16]}"
    module = sys.modules.get(name)
    if module is None:  # a file module like any other, but running the very bytes that were hashed
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        sys.modules[name] = module
        try:
            exec(compile(source, path, "exec"), module.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _check_source(path: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise ModelError(
            f"model.definition source {path} changed since the job was prepared (sha256 {actual[:12]}..., "
            f"expected {expected[:12]}...); a changed network is a new job: submit it again"
        )


def load_definition(definition: str, expected_sha256: str | None = None) -> type:
    """The network class named by ``definition``: allowlisted, source unchanged, a torch Module."""
    import torch

    check_allowed(definition)
    target, attr = _split(definition)
    try:
        if target.endswith(".py"):
            module = _load_file(_source_path(target), expected_sha256)
        else:
            module = importlib.import_module(target)
            _check_source(module.__file__ or target, _sha256_of_file(_source_path(target)), expected_sha256)
        cls = getattr(module, attr)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise ModelError(f"cannot import model.definition {definition!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelError(f"model.definition {definition!r} is not a torch.nn.Module class")
    return cls
