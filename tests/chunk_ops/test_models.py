"""Model formats, safe loading, engines and the bundled RSUNet."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from chunk_ops.engines import ModelError, TorchEngine, cpu_has_bf16
from chunk_ops.job import Job
from chunk_ops.models.loading import load_predictor
from chunk_ops.models.rsunet import RSUNet
from chunk_ops.pipeline import run_job
from chunk_ops.spec import parse_spec
from chunk_ops.volumes import open_volume
from tests.chunk_ops import nets


def _export(net: torch.nn.Module, fmt: str, folder: Path, patch_zyx, dynamic_batch=True) -> Path:
    example = torch.zeros(1, 1, *patch_zyx)
    if fmt == "torchscript":
        path = folder / "net.ts"
        torch.jit.save(torch.jit.trace(net, example), path)
    elif fmt == "torch_export":
        path = folder / "net.pt2"
        dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        torch.export.save(torch.export.export(net, (example.expand(2, -1, -1, -1, -1),), dynamic_shapes=dynamic), path)
    else:
        path = folder / "net.onnx"
        axes = {"x": {0: "n"}, "y": {0: "n"}} if dynamic_batch else None
        torch.onnx.export(net, example, path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes)
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export", "onnx"])
def test_every_format_gives_the_same_volume(make_spec, tmp_path, fmt):
    reference_spec = make_spec(out_channels=2, output="from-state-dict")
    reference = Job.open(reference_spec)
    run_job(reference)

    net = nets.TinyConvNet(in_channels=1, out_channels=2).eval()
    spec = make_spec(out_channels=2, output=f"from-{fmt}")
    spec["model"].update(path=str(_export(net, fmt, tmp_path, (4, 12, 12))), format=fmt)
    spec["inference"]["engine"] = "onnxruntime" if fmt == "onnx" else "pytorch"
    del spec["model"]["definition"], spec["model"]["kwargs"]
    job = Job.open(spec)
    run_job(job)
    a = open_volume(reference_spec["output"]["url"], 0).read(reference.roi)
    b = open_volume(spec["output"]["url"], 0).read(job.roi)
    assert job.predictor.engine.name.startswith("onnxruntime" if fmt == "onnx" else "torch")
    assert np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_onnx_model_with_fixed_patch_size_rejects_another_patch(make_spec, tmp_path, engine):
    net = nets.TinyConvNet().eval()
    spec = make_spec(batch_size=1)
    spec["model"].update(path=str(_export(net, "onnx", tmp_path, (4, 16, 16), dynamic_batch=False)), format="onnx")
    spec["inference"]["engine"] = engine
    del spec["model"]["definition"], spec["model"]["kwargs"]
    with pytest.raises(ModelError, match=r"input patch is fixed at \(x,y,z\) \[16, 16, 4\], but model.input_patch is \[12, 12, 4\]"):
        run_job(Job.open(spec))
    assert not Path(spec["output"]["url"].removeprefix("file://")).exists()


class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_state_dicts_load_with_weights_only(make_spec, tmp_path):
    """A pickle that runs code on load is refused, and its code does not run."""
    spec = make_spec()
    payload = _Payload()
    payload.marker = str(tmp_path / "marker")
    buf = io.BytesIO()
    torch.save({"c1.weight": payload}, buf, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    Path(spec["model"]["path"]).write_bytes(buf.getvalue())
    with pytest.raises(ModelError, match="is not a readable state_dict"):
        run_job(Job.open(spec))
    assert not (tmp_path / "marker").exists()


def _pt2_with(folder: Path, marker: Path, part: str) -> Path:
    """A torch.export file of TinyConvNet (batch dynamic) with ``part`` made to write ``marker`` when
    torch.export.load reads it or its program runs; ``part`` "" leaves it as torch.export.save wrote it."""
    net = nets.TinyConvNet().eval()
    program = torch.export.export(net, (torch.zeros(2, 1, 4, 12, 12),), dynamic_shapes=({0: torch.export.Dim("b")},))
    saved = io.BytesIO()
    torch.export.save(program, saved)
    payload = _Payload()
    payload.marker = str(marker)
    code = f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"
    path = folder / f"{part or 'plain'}.pt2"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as tampered:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("models/model.json"):
                doc = json.loads(data)
                if part == "guard":  # exec'd by program.module()
                    doc["guards_code"] = [code]
                elif part == "shape expression":  # parsed by sympy, i.e. eval'd, while loading
                    data = json.dumps(doc).replace('"Symbol(\'s', f'"{code} or Symbol(\'s', 1).encode()
                    doc = json.loads(data)
                elif part == "graph call":  # the loader resolves targets by name under torch
                    doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.getcwd"
                data = json.dumps(doc).encode()
            elif name.endswith("sample_inputs/model.pt") and part == "pickle":
                buffer = io.BytesIO()
                torch.save({"x": payload}, buffer)
                data = buffer.getvalue()
            tampered.writestr(name, data)
        if part == "compiled code":
            tampered.writestr(f"{source.namelist()[0].split('/')[0]}/data/aotinductor/model/model.so", b"\x7fELF")
    return path


@pytest.mark.parametrize("layer", ["batch norm", "dropout"])
def test_a_torch_export_program_exported_in_training_mode_is_refused(make_spec, tmp_path, layer):
    """eval() cannot switch an exported graph: in training mode each patch would depend on its batch."""
    extra = torch.nn.BatchNorm3d(1) if layer == "batch norm" else torch.nn.Dropout(0.5)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3, padding=1), extra)
    doc = make_spec()
    del doc["model"]["definition"], doc["model"]["kwargs"]
    doc["model"].update(path=str(_export(net.eval(), "torch_export", tmp_path, (4, 12, 12))), format="torch_export")
    load_predictor(parse_spec(doc))  # the same network exported in eval mode loads
    doc["model"]["path"] = str(_export(net.train(), "torch_export", tmp_path, (4, 12, 12)))
    with pytest.raises(ModelError, match=r"exported in training mode .*Export it after module\.eval\(\)"):
        load_predictor(parse_spec(doc))


@pytest.mark.parametrize("part,why", [
    ("pickle", "is a pickle of more than tensors"),
    ("guard", "a guard is not a comparison of input sizes"),
    ("shape expression", "a shape expression is not plain arithmetic"),
    # torch's verifier refuses it while loading; chunk_ops checks again, should a later torch allow more
    ("graph call", "(is refused: its graph calls|is not a readable torch.export file: SpecViolationError: "
                   "Operator) '?<built-in function getcwd>'?"),
    ("compiled code", "compiled code"),
])
def test_a_torch_export_file_that_would_run_code_is_refused_before_it_runs(make_spec, tmp_path, part, why):
    doc = make_spec()
    del doc["model"]["definition"], doc["model"]["kwargs"]
    marker = tmp_path / "marker"
    x = np.random.default_rng(0).random((3, 1, 4, 12, 12), dtype=np.float32)
    doc["model"].update(path=str(_pt2_with(tmp_path, marker, "")), format="torch_export")
    assert load_predictor(parse_spec(doc))(x).shape == x.shape  # torch.export.save's own file loads
    doc["model"]["path"] = str(_pt2_with(tmp_path, marker, part))
    with pytest.raises(ModelError, match=why if part == "graph call" else f"is refused: .*{why}"):
        load_predictor(parse_spec(doc))(x)
    assert not marker.exists()


def test_bfloat16_autocast_stays_close_to_float32_or_is_refused_where_emulated():
    torch.manual_seed(0)
    net = RSUNet(widths=(4, 8)).eval()
    x = np.random.default_rng(0).random((2, 1, 4, 32, 32), dtype=np.float32)
    fp32 = TorchEngine(net, threads=torch.get_num_threads(), device="cpu", precision="float32")(x)
    if not cpu_has_bf16():
        with pytest.raises(ModelError, match="no bf16 units"):
            TorchEngine(net, threads=torch.get_num_threads(), device="cpu", precision="bfloat16")
        return
    bf16 = TorchEngine(net, threads=torch.get_num_threads(), device="cpu", precision="bfloat16")(x)
    assert fp32.dtype == bf16.dtype == np.float32
    assert 0 < np.abs(fp32 - bf16).max() < 5e-2


def test_float16_on_cpu_is_refused_with_a_reason():
    with pytest.raises(ModelError, match="float16' needs a CUDA device"):
        TorchEngine(RSUNet(widths=(4, 8)), threads=torch.get_num_threads(), device="cpu", precision="float16")


def test_rsunet_keeps_the_patch_and_predicts_affinities():
    net = RSUNet(in_channels=1, out_channels=3, widths=(4, 8, 16)).eval()
    with torch.inference_mode():
        y = net(torch.rand(2, 1, 6, 32, 48))
    assert y.shape == (2, 3, 6, 32, 48)
    assert 0 <= float(y.min()) and float(y.max()) <= 1
    # anisotropic: pooling is x/y only, so a z size of 1 still works
    with torch.inference_mode():
        assert net(torch.rand(1, 1, 1, 16, 16)).shape == (1, 3, 1, 16, 16)
