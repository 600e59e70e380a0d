"""DAG Params generated from chunk_ops' job-spec schema: one schema, one form.

Airflow 3's trigger form groups Params by their ``section``; Params without one go to
its first section, "Run Parameters", the only section open when the form opens. So:

- unsectioned, on top: the common settings as flat fields, ``input_url``,
  ``output_url``, ``model_path``, ``chunk_size``, ``roi_start``, ``roi_stop``;
- folded until opened, sections Data, Model, Inference, Workers, Post-processing:
  each top-level field of the job spec (``input``, ``model``, ``workers``, ...) as one
  Param whose JSON schema is that field's schema, defaulting to its filled-in
  defaults. REST callers keep sending the nested job spec unchanged.

Precedence. A task gets every Param: the value sent, else its default. A nested
section a caller sends replaces that Param's default as a whole, so no default is
ever mixed into a given section. A flat field has no default: when given, it fills
its nested twin (``input_url`` -> ``input.url``), and both given with different
values is an error naming both. The Model section defaults to the bundled network
without its path, so ``model_path`` to a copy of the bundled weights is a whole model.

Airflow checks each Param on its own, so "input_url or input.url" cannot be said in
a schema: a conf with neither passes the REST API and fails the run's validate task,
naming the missing field, before anything is written. A bad value of a Param (e.g.
``chunk_size`` of two numbers) is still refused with HTTP 400, before any run.
"""

from __future__ import annotations

import copy
from typing import Any

from airflow.sdk import Param

from chunk_ops.models.demo import bundled_model_spec
from chunk_ops.spec import SpecError, job_spec_schema, section_with_defaults

# flat field -> (section, key) of its nested twin, which supplies its schema, title and description
FLAT = {
    "input_url": ("input", "url"),
    "output_url": ("output", "url"),
    "model_path": ("model", "path"),
    "roi_start": ("roi", "start"),
    "roi_stop": ("roi", "stop"),
}
# the open part of the form, in this order; chunk_size is a top-level field of its own
COMMON = ("input_url", "output_url", "model_path", "chunk_size", "roi_start", "roi_stop")
# the job spec's other top-level fields by form section, folded until opened
SECTIONS = {
    "Data": ("input", "output", "roi", "scratch_url"),
    "Model": ("model",),
    "Inference": ("inference",),
    "Workers": ("workers", "queue"),
    "Post-processing": ("postprocess",),
}


def _inline(node: Any, defs: dict) -> Any:
    """``node`` with every ``$ref`` replaced by its definition; the keys beside a ``$ref``
    (a field's own default, title, description) win over the definition's."""
    if isinstance(node, dict):
        if "$ref" in node:
            own = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs), **_inline(own, defs)}
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _optional(sub: dict, name: str) -> dict:
    """A field's schema that also takes null (absent), and {} for an object (the form's
    empty object); keys a flat field can give are not required in the section."""
    sub = dict(sub)
    if sub.get("type") == "object":
        sub["type"] = ["object", "null"]
        required = [k for k in sub.pop("required", []) if (name, k) not in FLAT.values()]
        if required:
            sub["if"] = {"type": "object", "minProperties": 1}
            sub["then"] = {"required": required}
    elif "type" in sub:
        sub["type"] = [sub["type"], "null"]
    return sub


def _section_default(name: str) -> Any:
    """What the form shows for a top-level field: every default filled in, the bundled
    network for the model (without its path), None where nothing is filled (roi)."""
    if name == "model":
        return {k: v for k, v in bundled_model_spec("").items() if k != "path"}
    sub = job_spec_schema()["properties"][name]
    if sub.get("type") == "object":
        return section_with_defaults(name, None) or None
    return copy.deepcopy(sub.get("default"))


def _param(name: str, sub: dict, default: Any, section: str | None) -> Param:
    sub = dict(sub)
    sub.pop("default", None)
    if not sub.get("title") or not sub.get("description"):  # every field the form shows explains itself
        raise SpecError(f"job spec field {name!r} needs a title and a description in the schema to show in the form")
    description = sub.pop("description")
    if section is not None:
        sub["section"] = section
    return Param(default, description=description, **sub)


def job_params() -> dict[str, Param]:
    """The DAG's Params in form order: the common fields, then the folded sections."""
    schema = job_spec_schema()
    defs = schema.get("$defs", {})
    props = {name: _inline(copy.deepcopy(sub), defs) for name, sub in schema["properties"].items()}
    placed = [*COMMON, *(name for names in SECTIONS.values() for name in names)]
    unplaced = sorted(set(props) - set(placed))
    if unplaced:
        raise SpecError(f"job spec field(s) {unplaced} have no place in the trigger form (params.SECTIONS)")
    params = {}
    for name in COMMON:
        if name in FLAT:
            section, key = FLAT[name]
            params[name] = _param(name, _optional(props[section]["properties"][key], name), None, None)
        else:
            params[name] = _param(name, _optional(props[name], name), _section_default(name), None)
    for section, names in SECTIONS.items():
        for name in names:
            sub = _optional(props[name], name)
            keys = list(props[name].get("properties", {}))
            if keys:  # the JSON editor shows one object: name its keys
                sub["description"] = f"{sub.get('description', sub['title'])} (JSON keys: {', '.join(keys)})"
            params[name] = _param(name, sub, _section_default(name), section)
    return params


def spec_from_params(params: dict) -> dict:
    """The job spec document from a run's params (each sent value, else the Param's default).

    Nested fields that are None or {} are absent; flat fields fill their nested twins.
    A key that is no field of the job spec is refused, naming it: a typo must not be
    silently ignored."""
    schema = job_spec_schema()
    names = set(schema["properties"]) | set(FLAT)
    unknown = sorted(k for k in params if k not in names)
    if unknown:
        raise SpecError(f"unknown job spec field(s) {unknown} in the run's conf; the fields are {sorted(names)}")
    doc = {k: copy.deepcopy(v) for k, v in params.items() if k not in FLAT and v is not None and v != {}}
    for flat, (section, key) in FLAT.items():
        value = params.get(flat)
        if value is None or value == "":
            continue
        part = doc.setdefault(section, {})
        if key in part and part[key] != value:
            raise SpecError(f"{flat} {value!r} and {section}.{key} {part[key]!r} differ: give one of them")
        part[key] = value
    for flat, (section, key) in FLAT.items():
        sub = schema["properties"][section]
        needed = section in doc or section in schema["required"]
        if needed and key in sub.get("required", []) and key not in doc.get(section, {}):
            raise SpecError(f"job spec field {section}.{key} is missing: fill {flat} "
                            f"({sub['properties'][key]['title']!r} in the trigger form) or give {section}.{key}")
    return doc
