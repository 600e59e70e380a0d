"""Inference engines: run a network on a batch of patches.

Every engine takes float32 ``(batch, channel, z, y, x)`` arrays and returns
float32 arrays of the same layout.  :class:`Predictor` adds what the job spec
promises on top of any engine: checked channel counts and patch sizes, centre
cropping to the output patch, and counts of the patches it evaluated (the
numerator of compute amplification).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .geometry import Vec3


class ModelError(ValueError):
    """A model cannot be loaded or does not match the job spec."""


class Engine(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class TorchEngine:
    """PyTorch on CPU or CUDA; fp16/bf16 through autocast, outputs back in float32."""

    def __init__(self, module, *, device: str = "auto", precision: str = "float32"):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ModelError("inference.device is 'cuda' but no CUDA device is available")
        self._torch = torch
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
        if self.autocast_dtype is torch.float16 and self.device.type == "cpu":
            raise ModelError("inference.precision 'float16' needs a CUDA device; use 'bfloat16' on CPUs")
        self.name = f"torch-{self.device.type}-{precision}"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, non_blocking=True)
            if self.autocast_dtype is None:
                y = self.module(x)
            else:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    y = self.module(x)
            return y.float().cpu().numpy()


class OnnxRuntimeEngine:
    """ONNX Runtime on CPU (the CUDA provider when installed and asked for)."""

    def __init__(self, session):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.name = "onnxruntime-" + session.get_providers()[0]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)


def _centre_crop_slices(have: tuple[int, ...], want: Vec3) -> tuple[slice, ...]:
    return tuple(slice((h - w) // 2, (h - w) // 2 + w) for h, w in zip(have, want.zyx()))


@dataclass
class Predictor:
    """An engine bound to the job's patch sizes and channel counts."""

    engine: Engine
    input_patch: Vec3
    output_patch: Vec3
    in_channels: int
    out_channels: int
    batch_size: int = 1
    patches_evaluated: int = field(default=0, init=False)

    def check(self) -> None:
        """One forward pass on zeros: channels and output size must match the spec."""
        probe = np.zeros((1, self.in_channels, *self.input_patch.zyx()), np.float32)
        try:
            out = self.engine(probe)
        except Exception as e:  # the engine's own message says what it disliked
            raise ModelError(
                f"the model failed on a (1, {self.in_channels}, {', '.join(map(str, self.input_patch.zyx()))}) "
                f"input, i.e. model.in_channels={self.in_channels}, model.input_patch (x,y,z)="
                f"{self.input_patch.to_list()}: {type(e).__name__}: {e}"
            ) from e
        if out.ndim != 5 or out.shape[1] != self.out_channels:
            raise ModelError(
                f"the model returns {out.shape[1] if out.ndim == 5 else '?'} channels "
                f"(output shape {tuple(out.shape)}), but model.out_channels is {self.out_channels}"
            )
        spatial = out.shape[2:]
        if any(h < w or (h - w) % 2 for h, w in zip(spatial, self.output_patch.zyx())):
            raise ModelError(
                f"the model's output patch (z,y,x) {tuple(spatial)} cannot be centre-cropped to "
                f"model.output_patch (x,y,z) {self.output_patch.to_list()}"
            )
        self.patches_evaluated = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.engine(batch)
        self.patches_evaluated += len(batch)
        if out.shape[2:] != self.output_patch.zyx():
            out = out[(slice(None), slice(None), *_centre_crop_slices(out.shape[2:], self.output_patch))]
        return out
