"""Fixtures: real file:// precomputed volumes and model files in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chunk_ops.sample import write_sample
from chunk_ops.volumes import volume_exists
from tests.chunk_ops import nets

NETS_FILE = Path(nets.__file__)


def save_net(folder: Path, name: str, kwargs: dict) -> Path:
    """Build ``nets.<name>(**kwargs)`` and save its state_dict; return the file."""
    net = getattr(nets, name)(**kwargs)
    path = folder / f"{name}-{abs(hash(repr(sorted(kwargs.items()))))}.pt"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def make_spec(tmp_path):
    """Write a sample image layer and a test net; return a job spec dict for them."""

    def make(
        *, shape=(40, 36, 12), net="TinyConvNet", net_kwargs=None, input_patch=(12, 12, 4),
        output_patch=None, out_channels=1, in_channels=1, overlap=(4, 4, 2), chunk=(16, 16, 4),
        block=(8, 8, 2), roi=None, blend="bump", dtype="float32", batch_size=3, seed=0,
        output="out",
    ) -> dict:
        image_url = f"file://{tmp_path}/image"
        if not volume_exists(image_url):
            write_sample(image_url, shape, seed=seed, block_size=(16, 16, 4))
        kwargs = net_kwargs if net_kwargs is not None else (
            {"in_channels": in_channels, "out_channels": out_channels} if "Conv" in net else {}
        )
        weights = save_net(tmp_path, net, kwargs)
        spec = {
            "input": {"url": image_url},
            "output": {"url": f"file://{tmp_path}/{output}", "dtype": dtype, "block_size": list(block)},
            "chunk_size": list(chunk),
            "model": {
                "path": str(weights),
                "format": "pytorch",
                "definition": f"{NETS_FILE}:{net}",
                "kwargs": kwargs,
                "input_patch": list(input_patch),
                "in_channels": in_channels,
                "out_channels": out_channels,
            },
            # the test nets sleep or count calls in Python: they run on PyTorch itself
            "inference": {"overlap": list(overlap), "blend": blend, "batch_size": batch_size, "engine": "pytorch"},
        }
        if output_patch is not None:
            spec["model"]["output_patch"] = list(output_patch)
        if roi is not None:
            spec["roi"] = {"start": list(roi[0]), "stop": list(roi[1])}
        return spec

    return make
