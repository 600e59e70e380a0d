"""The trigger form: Params from the job-spec schema, flat common fields over folded sections.

Unit tests give ``spec_from_params`` what a run's task gets (Airflow's ``process_params``:
every Param's value sent, else its default, each validated), for a conf as the web form
sends it (every Param, the filled ones changed) and as a REST caller sends it (the nested
job spec). The last test drives the real form in headless Chromium against
``airflow standalone`` and runs the job it triggers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chunk_ops.models.demo import bundled_model_spec, bundled_weights
from chunk_ops.geometry import Box
from chunk_ops.spec import SpecError, job_id, job_spec_schema, parse_spec
from scripts.airflow_local import DAG_ID
from tests.dags.browser import logged_in_page, standalone

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
SECTIONS = ["Data", "Model", "Inference", "Workers", "Post-processing"]


def task_params(conf: dict) -> dict:
    """The params a task of a run triggered with ``conf`` gets (as ``process_params``)."""
    from airflow.sdk.definitions.param import ParamsDict

    from chunkflow_airflow.utils.params import job_params

    params = ParamsDict(job_params())
    params.update(conf)
    return params.validate()


def form_conf(**filled) -> dict:
    """The conf the web form sends: every Param with its default, the filled ones changed."""
    from chunkflow_airflow.utils.params import job_params

    return {name: param.value for name, param in job_params().items()} | filled


def spec_of(conf: dict) -> dict:
    from chunkflow_airflow.utils.params import spec_from_params

    return spec_from_params(task_params(conf))


def test_every_param_has_a_title_a_description_and_a_place():
    from chunkflow_airflow.utils.params import job_params

    params = job_params()
    assert list(params)[:6] == ["input_url", "output_url", "model_path", "chunk_size", "roi_start", "roi_stop"]
    assert all("section" not in params[name].schema for name in list(params)[:6])  # the open part
    sections = [p.schema["section"] for p in list(params.values())[6:]]
    assert sorted(set(sections), key=sections.index) == SECTIONS  # each section's fields together, in order
    assert set(params) >= set(job_spec_schema()["properties"])  # every nested field still a Param (REST)
    for name, param in params.items():
        assert param.schema["title"] and param.description, name
    assert params["input_url"].schema["title"] == "Input image URL"
    assert params["workers"].schema["section"] == "Workers"
    assert "idle_exit_s" in params["workers"].description  # the JSON editor's keys are named


def test_chunk_size_keeps_its_default_and_description_through_the_ref():
    from chunkflow_airflow.utils.params import job_params

    chunk = job_params()["chunk_size"]
    assert chunk.value == [256, 256, 32]
    assert chunk.description == "voxels per task; a multiple of the output block size"
    assert chunk.schema["items"] == {"type": "integer", "minimum": 1}  # the $ref's definition, inlined


def test_the_common_fields_alone_make_a_whole_job_with_the_bundled_network(tmp_path):
    weights = tmp_path / "rsunet.pt"
    doc = spec_of(form_conf(input_url="file:///data/em", output_url="file:///data/aff", model_path=str(weights)))
    assert doc["model"] == bundled_model_spec(weights)
    assert doc["input"]["url"] == "file:///data/em" and doc["output"]["url"] == "file:///data/aff"
    # the same job (id) as its nested spec sent over REST or run by the CLI: the form's defaults are the schema's
    nested = {"input": {"url": "file:///data/em"}, "output": {"url": "file:///data/aff"},
              "model": bundled_model_spec(weights)}
    roi = Box.from_dict({"start": [0, 0, 0], "stop": [64, 64, 8]})
    ids = {job_id(parse_spec(d), "sha", roi) for d in (doc, spec_of(nested), nested)}
    assert len(ids) == 1


def test_a_rest_callers_nested_sections_are_taken_as_sent(make_spec):
    """No default is mixed into a section a caller gives: the test net's model has no
    output_patch, definition or kwargs of the bundled network's, its workers no defaults."""
    spec = make_spec(roi=((0, 0, 0), (32, 32, 8)))
    spec["workers"] = {"local": 1, "idle_exit_s": 2}
    doc = spec_of(spec)
    for name, section in spec.items():
        assert doc[name] == section, name
    roi = Box.from_dict(spec["roi"])
    assert job_id(parse_spec(doc), "sha", roi) == job_id(parse_spec(spec), "sha", roi)


def test_the_form_with_a_nested_section_edited_keeps_the_edit(make_spec):
    """A form user who edits the Model section's JSON gets that network; model_path fills its path."""
    model = make_spec()["model"]
    path = model.pop("path")
    doc = spec_of(form_conf(input_url="file:///data/em", output_url="file:///data/aff", model_path=path,
                            model=model))
    assert doc["model"] == {**model, "path": path}


@pytest.mark.parametrize("flat, section, key, value", [
    ("input_url", "input", "url", "file:///data/em"),
    ("output_url", "output", "url", "file:///data/aff"),
    ("model_path", "model", "path", "/models/a.pt"),
    ("roi_start", "roi", "start", [0, 0, 0]),
])
def test_a_flat_field_and_its_nested_twin_must_agree(make_spec, flat, section, key, value):
    spec = make_spec()
    spec.setdefault(section, {"start": [0, 0, 0], "stop": [8, 8, 4]})[key] = value
    assert spec_of({**spec, flat: value})[section][key] == value  # the same twice: fine
    other = [1, 1, 1] if isinstance(value, list) else "file:///elsewhere"
    with pytest.raises(SpecError, match=rf"{flat} .* and {section}\.{key} .* differ"):
        spec_of({**spec, flat: other})


def test_the_region_from_its_two_flat_fields():
    conf = form_conf(input_url="file:///data/em", output_url="file:///data/aff", model_path="/m.pt")
    assert spec_of({**conf, "roi_start": [0, 0, 0], "roi_stop": [64, 64, 8]})["roi"] == {
        "start": [0, 0, 0], "stop": [64, 64, 8]}
    assert "roi" not in spec_of(conf)  # neither: the whole volume
    with pytest.raises(SpecError, match=r"roi\.stop is missing: fill roi_stop \('Region stop \(x, y, z\)'"):
        spec_of({**conf, "roi_start": [0, 0, 0]})


@pytest.mark.parametrize("missing, flat", [("input", "input_url"), ("output", "output_url"), ("model", "model_path")])
def test_a_conf_without_a_required_field_is_refused_naming_it(make_spec, missing, flat):
    spec = make_spec()
    del spec[missing]
    with pytest.raises(SpecError, match=rf"job spec field {missing}\.\w+ is missing: fill {flat} "):
        spec_of(spec)


def test_an_unknown_key_is_refused_by_name(make_spec):
    with pytest.raises(SpecError, match=r"unknown job spec field\(s\) \['chunk_sise'\]"):
        spec_of({**make_spec(), "chunk_sise": [64, 64, 8]})


@pytest.mark.parametrize("conf, field", [
    ({"chunk_size": [256, 256]}, "chunk_size"),
    ({"input_url": "/no/scheme"}, "input_url"),
    ({"model": {"path": "/m.pt", "input_patch": [8, 8, 4], "out_channels": 1}}, "model"),  # no format
    ({"workers": {"local": -1}}, "workers"),
])
def test_a_bad_value_is_still_refused_before_any_run(conf, field):
    """What the REST API answers with HTTP 400: each Param checks its own value."""
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match=f"param {field}"):
        task_params(conf)


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    with standalone(tmp_path_factory.mktemp("airflow-home")) as local:
        yield local


def test_the_web_form_shows_sections_and_runs_a_job_from_the_common_fields(airflow, tmp_path):
    from playwright.sync_api import expect

    from chunk_ops.sample import write_sample

    image_url, output_url = f"file://{tmp_path}/image", f"file://{tmp_path}/affinities"
    write_sample(image_url, (128, 128, 16), seed=1)  # one chunk, a few patches of the bundled network
    weights = tmp_path / "rsunet_affinities.pt"
    shutil.copyfile(bundled_weights(), weights)
    before = {run["dag_run_id"] for run in airflow.runs()}

    with logged_in_page(airflow, f"/dags/{DAG_ID}") as page:
        page.wait_for_url(f"**/dags/{DAG_ID}**", timeout=60_000)
        page.get_by_role("button", name="Trigger").first.click()
        form = page.get_by_role("dialog")
        form.get_by_text("Run Parameters").wait_for(timeout=30_000)

        # the common fields are open, with titles and descriptions
        for title in ("Input image URL", "Output layer URL", "Model file", "Chunk size (x, y, z)",
                      "Region start (x, y, z)"):
            expect(form.get_by_text(title, exact=True)).to_be_visible()
        expect(form.get_by_text("image layer, e.g. file:///data/em")).to_be_visible()
        expect(form.get_by_text("voxels per task; a multiple of the output block size")).to_be_visible()
        # the advanced sections are there, folded
        for section in SECTIONS:
            expect(form.get_by_role("button", name=section, exact=True)).to_be_visible()
        for folded in ("#element_input", "#element_model", "#element_workers", "#element_postprocess"):
            expect(form.locator(folded)).to_be_hidden()
        expect(form.get_by_text("Worker pools", exact=True)).to_be_hidden()

        form.locator("#element_input_url").fill(image_url)
        form.locator("#element_output_url").fill(output_url)
        form.locator("#element_model_path").fill(str(weights))
        ARTIFACTS.mkdir(exist_ok=True)
        page.set_viewport_size({"width": 1400, "height": 2200})  # the dialog scrolls inside: show all of it
        page.screenshot(path=str(ARTIFACTS / "trigger_form.png"), full_page=True)

        # a section opens on a click, showing its fields and what they take
        form.get_by_role("button", name="Workers", exact=True).click()
        expect(form.get_by_text("Worker pools", exact=True)).to_be_visible()
        expect(form.get_by_text("worker pools, all draining the same queue", exact=False)).to_be_visible()
        expect(form.locator("#element_workers")).to_be_visible()

        form.get_by_role("button", name="Trigger", exact=True).click()
        expect(form).to_be_hidden(timeout=30_000)

    new = [run for run in airflow.runs() if run["dag_run_id"] not in before]
    assert len(new) == 1, new
    assert airflow.wait_for_run(new[0]["dag_run_id"], timeout_s=900) == "success"
    assert new[0]["conf"]["input_url"] == image_url and new[0]["conf"]["model_path"] == str(weights)
    assert (Path(output_url.removeprefix("file://")) / "info").exists()
