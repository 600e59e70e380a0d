"""Small networks for the tests, loaded through the job spec's 'pytorch' format.

Closed-form ones (identity, affine) have exact expected outputs; ``TinyConvNet``
is a seeded, non-linear conv net whose output depends on context, so any seam or
misplaced patch shows up against the whole-volume reference.
"""

import time

import torch
from torch import nn


class Affine(nn.Module):
    """out[c] = scale[c] * x + bias[c]; with crop > 0 the centre is returned."""

    def __init__(self, scales=(1.0,), biases=(0.0,), crop=(0, 0, 0)):
        super().__init__()
        self.register_buffer("scale", torch.tensor(scales, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("bias", torch.tensor(biases, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.crop = tuple(crop)  # z, y, x voxels cut from each side

    def forward(self, x):
        y = x * self.scale + self.bias
        cz, cy, cx = self.crop
        return y[:, :, cz:y.shape[2] - cz, cy:y.shape[3] - cy, cx:y.shape[4] - cx]


class TinyConvNet(nn.Module):
    """Two 'same'-padded 3x3x3 convs and a sigmoid, seeded weights."""

    def __init__(self, in_channels=1, out_channels=1, hidden=4, seed=0, delay_s=0.0):
        super().__init__()
        self.delay_s = delay_s  # makes tasks slow enough for kill and SIGTERM tests
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv3d(in_channels, hidden, 3, padding=1)
        self.c2 = nn.Conv3d(hidden, out_channels, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        if self.delay_s:
            time.sleep(self.delay_s)
        return torch.sigmoid(self.c2(torch.tanh(self.c1(x * 4 - 2))))


class ValidConvNet(TinyConvNet):
    """Like TinyConvNet but with unpadded convs: the output patch is 4 voxels smaller per axis."""

    def __init__(self, in_channels=1, out_channels=1, hidden=4, seed=0, delay_s=0.0):
        super().__init__(in_channels, out_channels, hidden, seed, delay_s)
        self.c1.padding = (0, 0, 0)
        self.c2.padding = (0, 0, 0)


class NumpyNet(nn.Module):
    """Computes in Python inside forward: runs on PyTorch, cannot be exported to ONNX
    (torch.export traces plain NumPy ufuncs, but not a Python function mapped over them)."""

    def forward(self, x):
        import math

        import numpy as np

        return torch.from_numpy(np.vectorize(math.tanh, otypes=[np.float32])(x.detach().numpy()))
