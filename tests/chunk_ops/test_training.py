"""`chunk-ops train`: reproducible from the command, trained weights that load safely."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from chunk_ops.cli import main
from chunk_ops.models.demo import bundled_weights
from chunk_ops.sample import synthetic_em, write_sample
from chunk_ops.train import TrainConfig, train

TINY = TrainConfig(widths=(4, 8), input_patch=(32, 32, 8), output_patch=(16, 16, 4), batch_size=2, steps=3)


@pytest.fixture(scope="module")
def volumes():
    return [synthetic_em((48, 48, 12), seed=1000)]


def test_the_same_config_gives_the_same_weights_bit_for_bit(volumes):
    a = train(volumes, TINY, log=lambda _: None).state_dict()
    b = train(volumes, TINY, log=lambda _: None).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = train(volumes, TrainConfig(**{**TINY.__dict__, "seed": 1}), log=lambda _: None).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_lowers_the_loss(volumes):
    losses = []
    cfg = TrainConfig(**{**TINY.__dict__, "steps": 100})
    train(volumes, cfg, log=lambda line: losses.append(float(line.split("loss ")[1].split()[0])))
    assert losses[-1] < 0.7 * losses[0]


def test_the_command_trains_on_given_layers_and_records_how(tmp_path):
    write_sample(f"file://{tmp_path}/img", (64, 64, 12), seed=1001, labels_url=f"file://{tmp_path}/gt")
    out = tmp_path / "w.pt"
    result = CliRunner().invoke(main, ["train", str(out), "--steps", "2", "--image", f"file://{tmp_path}/img",
                                       "--labels", f"file://{tmp_path}/gt"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["config"]["steps"] == 2 and record["data"] == [[f"file://{tmp_path}/img", f"file://{tmp_path}/gt"]]
    assert set(torch.load(out, weights_only=True)) == set(torch.load(bundled_weights(), weights_only=True))


def test_a_volume_smaller_than_the_training_patch_is_refused_by_size(tmp_path):
    write_sample(f"file://{tmp_path}/img", (48, 48, 12), seed=1001, labels_url=f"file://{tmp_path}/gt")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "w.pt"), "--image", f"file://{tmp_path}/img",
                                       "--labels", f"file://{tmp_path}/gt"])
    assert result.exit_code == 1
    assert "training volume (z, y, x) (12, 48, 48) is smaller than the patch (12, 64, 64)" in result.output
    assert not (tmp_path / "w.pt").exists()


def test_mismatched_image_and_label_options_are_refused(tmp_path):
    result = CliRunner().invoke(main, ["train", str(tmp_path / "w.pt"), "--image", "file:///a"])
    assert result.exit_code != 0 and "1 --image but 0 --labels" in result.output
    assert not (tmp_path / "w.pt").exists()


def test_the_bundled_weights_record_the_command_that_reproduces_them():
    record = json.loads(bundled_weights().with_suffix(".json").read_text())
    assert record["command"].startswith("chunk-ops train chunk_ops/models/weights/rsunet_affinities.pt")
    assert record["config"] == {**TrainConfig().__dict__, "widths": list(TrainConfig().widths),
                                "input_patch": list(TrainConfig().input_patch),
                                "output_patch": list(TrainConfig().output_patch),
                                "synthetic_shape": list(TrainConfig().synthetic_shape),
                                "synthetic_seeds": list(TrainConfig().synthetic_seeds)}
    assert record["seconds"] <= 15 * 60
