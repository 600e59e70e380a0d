"""DAG Params generated from chunk_ops' job-spec schema: one schema, one form.

Each top-level field of the job spec becomes a Param whose JSON schema is that
field's schema (``$ref``s inlined), so the web UI renders a trigger form and the
REST API rejects a conf that breaks the schema with HTTP 400, before any run.
"""

from __future__ import annotations

import copy
from typing import Any

from airflow.sdk import Param

from chunk_ops.spec import job_spec_schema

# Values the form starts with; the sample job of `make demo` uses the same shape.
EXAMPLE = {
    "input": {"url": "file:///data/em", "mip": 0},
    "output": {"url": "file:///data/affinities", "dtype": "float32", "block_size": [64, 64, 12]},
    "model": {"path": "/models/rsunet.pt", "format": "pytorch", "definition": "chunk_ops.models.rsunet:RSUNet",
              "kwargs": {"widths": [8, 16, 32]}, "input_patch": [128, 128, 16], "output_patch": [96, 96, 12],
              "in_channels": 1, "out_channels": 3},
}


def _inline(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def job_params() -> dict[str, Param]:
    schema = job_spec_schema()
    defs = schema.get("$defs", {})
    required = set(schema["required"])
    params = {}
    for name, sub in schema["properties"].items():
        sub = _inline(copy.deepcopy(sub), defs)
        default = sub.pop("default", None)
        description = sub.pop("description", None)
        if name in required:
            default = EXAMPLE.get(name, default)
        elif sub.get("type") == "object":
            # optional: null, or {} as the web form shows an empty object field, or the object
            sub["type"] = ["object", "null"]
            if "required" in sub:
                sub["if"] = {"type": "object", "minProperties": 1}
                sub["then"] = {"required": sub.pop("required")}
        elif "type" in sub:
            sub["type"] = [sub["type"], "null"]
        params[name] = Param(default, description=description, title=name, **sub)
    return params


def spec_from_params(params: dict) -> dict:
    """The job spec document: the schema's fields that were given (None or {} means absent)."""
    names = job_spec_schema()["properties"]
    return {k: v for k, v in params.items() if k in names and v is not None and v != {}}
