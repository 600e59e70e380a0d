"""Bad input: a clear error naming the bad value, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chunk_ops.job import Job
from chunk_ops.spec import SpecError, parse_spec
from chunk_ops.pipeline import run_job


def _output_dir(spec: dict) -> Path:
    return Path(spec["output"]["url"].removeprefix("file://"))


def _run(spec: dict) -> None:
    run_job(Job.open(spec))


def _roi_outside(spec):
    spec["roi"] = {"start": [10, 0, 0], "stop": [50, 20, 8]}
    return r"roi \{'start': \[10, 0, 0\], 'stop': \[50, 20, 8\]\} is outside the input volume .*\(bounds \{'start': \[0, 0, 0\], 'stop': \[40, 36, 12\]\}"


def _chunk_not_block_multiple(spec):
    spec["chunk_size"] = [20, 16, 4]
    return r"chunk_size \[20, 16, 4\] is not a multiple of output.block_size \[8, 8, 2\]"


def _patch_larger_than_region(spec):
    spec["roi"] = {"start": [0, 0, 0], "stop": [10, 36, 12]}
    return r"output patch \[12, 12, 4\] is larger than the region of interest \[10, 36, 12\]"


def _out_channels_mismatch(spec):
    spec["model"]["out_channels"] = 2
    return r"the model returns 1 channels .* but model.out_channels is 2"


def _in_channels_mismatch(spec):
    spec["model"]["in_channels"] = 3
    return r"input layer file://.*/image has 1 channels but model.in_channels is 3"


def _missing_input_layer(spec):
    spec["input"]["url"] += "-nowhere"
    return r"no precomputed layer at file://.*/image-nowhere"


def _missing_model_file(spec):
    spec["model"]["path"] += ".missing"
    return r"cannot read model file '.*\.pt\.missing'"


def _corrupt_model_file(spec):
    path = Path(spec["model"]["path"])
    path.write_bytes(b"this is not a model" * 10)
    return rf"model file '{path}' is not a readable state_dict"


def _weights_of_another_net(spec):
    spec["model"]["kwargs"]["hidden"] = 5
    return r"does not fit .*nets.py:TinyConvNet"


def _blend_typo(spec):
    spec["inference"]["blend"] = "bumpy"
    return r"inference.blend: 'bumpy' is not one of \['bump', 'gaussian', 'constant'\]"


def _overlap_too_big(spec):
    spec["inference"]["overlap"] = [4, 12, 2]
    return r"inference.overlap \[4, 12, 2\] must be smaller than model.output_patch \[12, 12, 4\]"


def _unknown_field(spec):
    spec["chunksize"] = [1, 2, 3]
    return r"Additional properties are not allowed \('chunksize' was unexpected\)"


def _roi_wrong_type(spec):
    spec["roi"] = {"start": [0, 0, "0"], "stop": [8, 8, 8]}
    return r"roi.start.2: '0' is not of type 'integer'"


CASES = [
    _roi_outside, _chunk_not_block_multiple, _patch_larger_than_region, _out_channels_mismatch,
    _in_channels_mismatch, _missing_input_layer, _missing_model_file, _corrupt_model_file,
    _weights_of_another_net, _blend_typo, _overlap_too_big, _unknown_field, _roi_wrong_type,
]


@pytest.mark.parametrize("break_spec", CASES, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_named_and_nothing_is_written(make_spec, break_spec):
    spec = make_spec()
    pattern = break_spec(spec)
    with pytest.raises(ValueError, match=pattern):
        _run(spec)
    assert not _output_dir(spec).exists()


def test_existing_output_of_another_shape_is_refused_untouched(make_spec):
    spec = make_spec()
    _run(spec)
    info = _output_dir(spec) / "info"
    before = info.read_bytes()
    spec["model"]["out_channels"] = 3
    spec["model"]["kwargs"]["out_channels"] = 3
    from tests.chunk_ops.conftest import save_net

    spec["model"]["path"] = str(save_net(Path(spec["model"]["path"]).parent, "TinyConvNet", spec["model"]["kwargs"]))
    with pytest.raises(ValueError, match=r"existing output layer .* 1 channels, model.out_channels is 3"):
        _run(spec)
    assert info.read_bytes() == before


def test_spec_rules_beyond_the_schema():
    base = {
        "input": {"url": "file:///x"}, "output": {"url": "file:///y"},
        "model": {"path": "m.pt", "format": "torchscript", "input_patch": [8, 8, 4], "out_channels": 1},
    }
    parse_spec(base)  # valid as it is
    odd = json.loads(json.dumps(base))
    odd["model"]["output_patch"] = [5, 8, 4]
    with pytest.raises(SpecError, match=r"input_patch \[8, 8, 4\] minus model.output_patch \[5, 8, 4\] must be even"):
        parse_spec(odd)
    no_definition = json.loads(json.dumps(base))
    no_definition["model"]["format"] = "pytorch"
    with pytest.raises(SpecError, match="model.definition is required for format 'pytorch'"):
        parse_spec(no_definition)
