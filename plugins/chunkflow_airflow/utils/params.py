"""DAG Params generated from chunk_ops' job-spec schema: one schema, one form.

Each top-level field of the job spec becomes a Param whose JSON schema is that
field's schema (``$ref``s inlined), so the web UI renders a trigger form and the
REST API rejects a conf that breaks the schema with HTTP 400, before any run.
The required sections (input, output, model) have no default: a conf without one
is refused with HTTP 400, never run on placeholder paths.  Keys that are not job
spec fields (a typo) fail the run's validate task, before anything is written.
"""

from __future__ import annotations

import copy
from typing import Any

from airflow.sdk import Param

from chunk_ops.spec import SpecError, job_spec_schema

# Examples shown with the required sections (not defaults); `make demo`'s job has this shape.
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
        if name in required:  # no default: a trigger must give it
            params[name] = Param(description=description, title=name, examples=[EXAMPLE[name]], **sub)
            continue
        if sub.get("type") == "object":
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
    """The job spec document: the schema's fields that were given (None or {} means absent).

    A key that is no field of the job spec is refused, naming it: a typo must not be
    silently ignored."""
    names = job_spec_schema()["properties"]
    unknown = sorted(k for k in params if k not in names)
    if unknown:
        raise SpecError(f"unknown job spec field(s) {unknown} in the run's conf; the fields are {sorted(names)}")
    return {k: v for k, v in params.items() if v is not None and v != {}}
