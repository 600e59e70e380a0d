"""The demo network: the bundled RSUNet as a state_dict, and a job spec that uses it.

Until trained weights ship, the weights are a seeded initialization: the demo
shows the machinery (chunking, blending, output layer), not segmentation quality.
"""

from __future__ import annotations

from pathlib import Path

DEMO_WIDTHS = [8, 16, 32]
DEMO_INPUT_PATCH = [128, 128, 16]   # x, y, z
DEMO_OUTPUT_PATCH = [96, 96, 12]    # the centre, where every voxel had full context


def write_demo_model(workdir: Path, input_url: str, output_url: str, seed: int = 0) -> dict:
    """Save the demo RSUNet's weights in ``workdir`` and return a job spec using them."""
    import torch

    from .rsunet import RSUNet

    torch.manual_seed(seed)
    net = RSUNet(in_channels=1, out_channels=3, widths=DEMO_WIDTHS)
    weights = Path(workdir) / "rsunet_demo.pt"
    torch.save(net.state_dict(), weights)
    return {
        "input": {"url": input_url},
        "output": {"url": output_url, "dtype": "float32", "block_size": [64, 64, 12]},
        "chunk_size": [256, 256, 24],
        "model": {
            "path": str(weights),
            "format": "pytorch",
            "definition": "chunk_ops.models.rsunet:RSUNet",
            "kwargs": {"in_channels": 1, "out_channels": 3, "widths": DEMO_WIDTHS},
            "input_patch": DEMO_INPUT_PATCH,
            "output_patch": DEMO_OUTPUT_PATCH,
            "in_channels": 1,
            "out_channels": 3,
        },
        "inference": {"overlap": [32, 32, 4], "blend": "bump", "batch_size": 2},
    }
