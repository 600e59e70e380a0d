"""The bundled network: an RSUNet trained on synthetic EM to predict affinities.

``weights/rsunet_affinities.pt`` is a state_dict (loads with ``weights_only=True``);
``weights/rsunet_affinities.json`` records how it was trained (the command that
reproduces it: ``chunk-ops train chunk_ops/models/weights/rsunet_affinities.pt``).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

BUNDLED_WIDTHS = [8, 16, 32]
DEMO_INPUT_PATCH = [128, 128, 16]   # x, y, z
DEMO_OUTPUT_PATCH = [96, 96, 12]    # the centre, where every voxel had full context


def bundled_weights() -> Path:
    return Path(str(resources.files("chunk_ops.models").joinpath("weights/rsunet_affinities.pt")))


def bundled_model_spec(path: str | Path) -> dict:
    """The job spec's ``model`` section for the bundled weights stored at ``path``."""
    return {
        "path": str(path),
        "format": "pytorch",
        "definition": "chunk_ops.models.rsunet:RSUNet",
        "kwargs": {"in_channels": 1, "out_channels": 3, "widths": BUNDLED_WIDTHS},
        "input_patch": DEMO_INPUT_PATCH,
        "output_patch": DEMO_OUTPUT_PATCH,
        "in_channels": 1,
        "out_channels": 3,
    }


def write_demo_job(workdir: Path, input_url: str, output_url: str, truth_url: str | None = None) -> dict:
    """Copy the bundled weights into ``workdir``; return a job spec that segments with them.

    The copy keeps the job's model file where workers on this machine read it,
    independent of where the package is installed.
    """
    weights = Path(workdir) / "rsunet_affinities.pt"
    shutil.copyfile(bundled_weights(), weights)
    segmentation = {"method": "watershed"}
    if truth_url:
        segmentation["truth_url"] = truth_url
    return {
        "input": {"url": input_url},
        "output": {"url": output_url, "dtype": "float32", "block_size": [64, 64, 12]},
        "chunk_size": [256, 256, 24],
        "model": bundled_model_spec(weights),
        "inference": {"overlap": [32, 32, 4], "blend": "bump", "batch_size": 2},
        "postprocess": {"segmentation": segmentation},
    }
