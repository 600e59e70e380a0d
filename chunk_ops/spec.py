"""The job spec: one JSON document, one schema (``job_spec.schema.json``).

The same schema serves the Airflow DAG's Params, the CLI and the workers.
:func:`parse_spec` checks the document against the schema, then the rules a
schema cannot say (patch arithmetic); it touches no storage.  Checks that need
the volumes or the model (region inside the volume, channels) happen when a
:class:`chunk_ops.job.Job` is opened, still before anything is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema

from .geometry import Box, Vec3
from .volumes import VolumeError, split_format


# postprocess.segmentation.threshold by method: agglomerate while the mean affinity is
# above 0.3; a single leaky edge merges two components, so they need a strict 0.99 (on the
# held-out synthetic volume: adapted Rand error 0.66 at 0.9, 0.19 at 0.99, watershed 0.02)
DEFAULT_THRESHOLDS = {"watershed": 0.3, "components": 0.99}


class SpecError(ValueError):
    """The job spec is invalid; the message names the field and the bad value."""


@lru_cache(maxsize=1)
def job_spec_schema() -> dict:
    text = resources.files("chunk_ops").joinpath("job_spec.schema.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class ModelSpec:
    path: str
    format: str
    input_patch: Vec3
    output_patch: Vec3
    in_channels: int
    out_channels: int
    definition: str | None = None
    kwargs_json: str = "{}"  # canonical JSON, so the spec stays hashable

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    @property
    def margin(self) -> Vec3:
        """Input context on each side of the output patch."""
        return (self.input_patch - self.output_patch) // 2


@dataclass(frozen=True)
class JobSpec:
    input_url: str
    input_mip: int
    fill_value: float
    fill_missing: bool  # input blocks missing from storage read as fill_value (else an error)
    blackout_sections: tuple[int, ...]  # input z sections read as fill_value
    output_url: str
    output_dtype: str
    block_size: Vec3
    roi: Box | None
    chunk_size: Vec3
    model: ModelSpec
    overlap: Vec3
    blend: str
    precision: str
    device: str
    engine: str
    batch_size: int
    scratch_url: str | None
    queue_url: str | None
    document: str  # the validated document with defaults filled in, canonical JSON

    @property
    def stride(self) -> Vec3:
        return self.model.output_patch - self.overlap

    def to_dict(self) -> dict:
        return json.loads(self.document)

    @property
    def postprocess(self) -> dict:
        """``postprocess`` with every default filled in (pyramid_levels, segmentation)."""
        return section_with_defaults("postprocess", self.to_dict().get("postprocess"))

    @property
    def segmentation(self) -> dict:
        """``postprocess.segmentation`` with defaults: method, threshold, url, truth_url, mode, max_voxels."""
        seg = self.postprocess["segmentation"]
        seg.setdefault("threshold", DEFAULT_THRESHOLDS.get(seg["method"]))
        seg.setdefault("url", f"{self.output_url}/segmentation")
        seg.setdefault("truth_url", None)
        return seg


def _fill_defaults(doc: dict, schema: dict, create_objects: bool = False) -> dict:
    """Copy of ``doc`` with the schema's defaults filled in.

    With ``create_objects``, absent sub-objects that need no field are made too, so
    every default of a section shows.
    """
    out = copy.deepcopy(doc)
    for name, sub in schema.get("properties", {}).items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name not in out and create_objects and sub.get("type") == "object" and not sub.get("required"):
            out[name] = {}
        if isinstance(out.get(name), dict) and sub.get("type") == "object":
            out[name] = _fill_defaults(out[name], sub, create_objects)
    return out


def section_with_defaults(name: str, value: dict | None) -> dict:
    """A top-level object of a job spec (e.g. ``workers``) with every default filled in."""
    return _fill_defaults(value or {}, job_spec_schema()["properties"][name], create_objects=True)


def _schema_error(error: jsonschema.ValidationError) -> SpecError:
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    return SpecError(f"job spec field {where}: {error.message}")


def parse_spec(document: dict[str, Any]) -> JobSpec:
    """Validate a job document and return the typed spec."""
    if not isinstance(document, dict):
        raise SpecError(f"a job spec is a JSON object, got {type(document).__name__}")
    schema = job_spec_schema()
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        raise _schema_error(error)
    doc = _fill_defaults(document, schema)
    doc.setdefault("inference", {})
    doc = _fill_defaults(doc, schema)  # fills defaults inside the new "inference"

    m = doc["model"]
    input_patch = Vec3.of(m["input_patch"])
    output_patch = Vec3.of(m.get("output_patch", m["input_patch"]))
    m["output_patch"] = output_patch.to_list()
    if any(o > i for o, i in zip(output_patch, input_patch)):
        raise SpecError(
            f"model.output_patch {output_patch.to_list()} is larger than "
            f"model.input_patch {input_patch.to_list()}"
        )
    if any((i - o) % 2 for o, i in zip(output_patch, input_patch)):
        raise SpecError(
            f"model.input_patch {input_patch.to_list()} minus model.output_patch "
            f"{output_patch.to_list()} must be even on every axis (the output is centred)"
        )
    seg = section_with_defaults("postprocess", doc.get("postprocess"))["segmentation"]
    if seg["method"] != "none" and m["out_channels"] != 3:
        raise SpecError(
            f"postprocess.segmentation.method {seg['method']!r} needs affinities (model.out_channels 3: "
            f"x, y, z), but model.out_channels is {m['out_channels']}"
        )
    if m["format"] == "pytorch" and not m.get("definition"):
        raise SpecError("model.definition is required for format 'pytorch' (e.g. 'chunk_ops.models.rsunet:RSUNet')")
    if m.get("definition"):
        from .models.registry import check_allowed  # before anything imports it

        check_allowed(m["definition"])
    _check_locations(doc)

    inf = doc["inference"]
    overlap = Vec3.of(inf.get("overlap", (output_patch // 2).to_list()))
    inf["overlap"] = overlap.to_list()
    if any(ov >= p for ov, p in zip(overlap, output_patch)):
        raise SpecError(
            f"inference.overlap {overlap.to_list()} must be smaller than "
            f"model.output_patch {output_patch.to_list()} on every axis"
        )

    block = Vec3.of(doc["output"]["block_size"])
    chunk = Vec3.of(doc["chunk_size"])
    if any(c % b for c, b in zip(chunk, block)):
        raise SpecError(
            f"chunk_size {chunk.to_list()} is not a multiple of output.block_size {block.to_list()}"
        )

    # one spelling per set of sections, so the job id does not depend on their order
    doc["input"]["blackout_sections"] = sorted(set(doc["input"]["blackout_sections"]))

    roi = None
    if "roi" in doc:
        try:
            roi = Box.from_dict(doc["roi"])
        except ValueError as e:
            raise SpecError(f"job spec field roi: {e}") from None
        if roi.is_empty():
            raise SpecError(f"job spec field roi is empty: {doc['roi']}")

    model = ModelSpec(
        path=m["path"],
        format=m["format"],
        input_patch=input_patch,
        output_patch=output_patch,
        in_channels=m["in_channels"],
        out_channels=m["out_channels"],
        definition=m.get("definition"),
        kwargs_json=json.dumps(m.get("kwargs", {}), sort_keys=True),
    )
    return JobSpec(
        input_url=doc["input"]["url"].rstrip("/"),
        input_mip=doc["input"]["mip"],
        fill_value=float(doc["input"]["fill_value"]),
        fill_missing=doc["input"]["fill_missing"],
        blackout_sections=tuple(doc["input"]["blackout_sections"]),
        output_url=doc["output"]["url"].rstrip("/"),
        output_dtype=doc["output"]["dtype"],
        block_size=block,
        roi=roi,
        chunk_size=chunk,
        model=model,
        overlap=overlap,
        blend=inf["blend"],
        precision=inf["precision"],
        device=inf["device"],
        engine=inf["engine"],
        batch_size=inf["batch_size"],
        scratch_url=doc.get("scratch_url"),
        queue_url=doc.get("queue", {}).get("url"),
        document=json.dumps(doc, sort_keys=True, separators=(",", ":")),
    )


def _location(url: str) -> str:
    """A URL compared by location: no format prefix, plain paths are file://, no trailing slash."""
    try:
        url = split_format(url)[1]
    except VolumeError:  # not a layer URL (a scratch folder): compared as written
        pass
    url = url.rstrip("/")
    return url if "://" in url else f"file://{url}"


def _check_locations(doc: dict) -> None:
    """Input, output and scratch must be separate: a job never writes where it reads, and
    removing its scratch never touches a layer."""
    places = {"input.url": doc["input"]["url"], "output.url": doc["output"]["url"]}
    if doc.get("scratch_url"):
        places["scratch_url"] = doc["scratch_url"]
    names = list(places)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            la, lb = _location(places[a]), _location(places[b])
            if la == lb or la.startswith(lb + "/") or lb.startswith(la + "/"):
                how = "equals" if la == lb else "is inside" if la.startswith(lb + "/") else "contains"
                raise SpecError(f"job spec field {a} {places[a]!r} {how} {b} {places[b]!r}: "
                                f"input, output and scratch must be separate locations")


# Fields that do not change the output bytes, so they stay out of the job id.
_NOT_IN_JOB_ID = {("inference", "device"), ("inference", "engine"), ("inference", "batch_size"), ("scratch_url",), ("queue",), ("workers",), ("postprocess",)}


def job_id(spec: JobSpec, model_sha256: str, roi: Box, definition_sha256: str | None = None) -> str:
    """Deterministic id of everything that changes the output.

    Inputs, region (resolved, so "whole volume" and the same explicit box agree),
    model bytes, the network definition's source bytes and parameters; a new model
    version, or an edited network, gives a new id.
    """
    doc = spec.to_dict()
    for path in _NOT_IN_JOB_ID:
        d = doc
        for key in path[:-1]:
            d = d.get(key, {})
        d.pop(path[-1], None)
    doc["roi"] = roi.to_dict()
    doc["model"]["sha256"] = model_sha256
    if definition_sha256 is not None:
        doc["model"]["definition_sha256"] = definition_sha256
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
