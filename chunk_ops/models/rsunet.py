"""A residual symmetric 3D U-Net for anisotropic serial-section EM.

After Lee et al., "Superhuman accuracy on the SNEMI3D connectomics challenge"
(2017): sections are thin in x/y and thick in z, so the net pools and upsamples
in x/y only, uses 1x3x3 convolutions where z context is not yet useful, joins the
skip connections by addition (symmetric), and wraps each level in a residual
block.  Tensors are (batch, channel, z, y, x); padding keeps the patch size, so
the output patch equals the input patch and chunk_ops crops its centre when the
job asks for a smaller output patch (the border voxels see the least context).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel))


class _ConvBnAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int]):
        super().__init__(_conv(cin, cout, kernel), nn.BatchNorm3d(cout), nn.ELU(inplace=True))


class _ResidualBlock(nn.Module):
    """1x3x3 conv, then two 3x3x3 convs added back to its output."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pre = _ConvBnAct(cin, cout, (1, 3, 3))
        self.body = nn.Sequential(
            _ConvBnAct(cout, cout, (3, 3, 3)),
            _conv(cout, cout, (3, 3, 3)),
            nn.BatchNorm3d(cout),
        )
        self.act = nn.ELU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        return self.act(x + self.body(x))


class RSUNet(nn.Module):
    """Residual symmetric U-Net; ``widths`` gives the channels at each level.

    The input patch's y and x must be multiples of ``2 ** (len(widths) - 1)``.
    ``out_channels=3`` predicts nearest-neighbour affinities (x, y, z); a sigmoid
    keeps outputs in [0, 1].
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 3, widths=(8, 16, 32, 64)):
        super().__init__()
        widths = list(widths)
        self.embed = _ConvBnAct(in_channels, widths[0], (1, 5, 5))
        self.down = nn.ModuleList(
            _ResidualBlock(a, b) for a, b in zip([widths[0]] + widths[:-1], widths)
        )
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(b, a, (1, 2, 2), stride=(1, 2, 2))
            for a, b in zip(widths[:-1], widths[1:])
        )
        self.up_blocks = nn.ModuleList(_ResidualBlock(a, a) for a in widths[:-1])
        self.head = nn.Sequential(_conv(widths[0], out_channels, (1, 5, 5)), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the deepest level feeds the way up directly
        for up, block in zip(reversed(self.up), reversed(self.up_blocks)):
            x = block(up(x) + skips.pop())
        return self.head(x)
