"""Train the bundled RSUNet to predict affinities, on the CPU, reproducibly.

``chunk-ops train`` runs :func:`train` on image/label layers, or on synthetic EM
(:mod:`chunk_ops.sample`) made from training seeds that no test or benchmark
evaluates on.  The same command on the same PyTorch build and thread count
gives the same weights bit for bit: seeded data order and augmentation, a fixed
number of steps (never a time limit), deterministic algorithms.

Loss: binary cross-entropy on the centre of each patch (the part inference
keeps), with boundaries and interiors weighted equally in each batch, so the
rarer boundary edges are not neglected; a missed boundary merges two cells.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .segment import label_affinities

TRAIN_SEEDS = (1000, 1001, 1002, 1003)  # evaluation uses other seeds


@dataclass(frozen=True)
class TrainConfig:
    widths: tuple[int, ...] = (8, 16, 32)
    input_patch: tuple[int, int, int] = (64, 64, 12)    # x, y, z
    output_patch: tuple[int, int, int] = (48, 48, 8)    # centre the loss looks at
    batch_size: int = 4
    steps: int = 600
    learning_rate: float = 2e-3
    seed: int = 0
    threads: int = 2
    synthetic_shape: tuple[int, int, int] = (192, 192, 32)
    synthetic_seeds: tuple[int, ...] = field(default=TRAIN_SEEDS)


class _Sampler:
    """Random augmented patches (image, target affinities) from a list of volumes."""

    def __init__(self, volumes: list[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig, rng: np.random.Generator):
        self.volumes = volumes
        self.cfg = cfg
        self.rng = rng
        self.zyx = tuple(reversed(cfg.input_patch))
        for image, _ in volumes:
            if any(s < p for s, p in zip(image.shape, self.zyx)):
                raise ValueError(f"training volume (z, y, x) {image.shape} is smaller than the patch {self.zyx}")

    def one(self) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.volumes[self.rng.integers(len(self.volumes))]
        start = [self.rng.integers(0, s - p + 1) for s, p in zip(image.shape, self.zyx)]
        where = tuple(slice(a, a + p) for a, p in zip(start, self.zyx))
        img = image[where].astype(np.float32) / 255
        lab = labels[where]
        for axis in range(3):  # flips
            if self.rng.random() < 0.5:
                img, lab = np.flip(img, axis), np.flip(lab, axis)
        if self.rng.random() < 0.5:  # x <-> y; sections keep their orientation
            img, lab = img.transpose(0, 2, 1), lab.transpose(0, 2, 1)
        gain, offset = self.rng.normal(1.0, 0.1), self.rng.normal(0.0, 0.05)
        img = np.clip(img * gain + offset, 0, 1)
        return np.ascontiguousarray(img[None]), label_affinities(np.ascontiguousarray(lab))

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.one() for _ in range(self.cfg.batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def synthetic_volumes(cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    from .sample import synthetic_em

    return [synthetic_em(cfg.synthetic_shape, seed=s) for s in cfg.synthetic_seeds]


def train(volumes: list[tuple[np.ndarray, np.ndarray]], cfg: TrainConfig,
          log: Callable[[str], None] = print):
    """Train an RSUNet(1 -> 3 affinities) on (uint8 image, labels) pairs; return it in eval mode."""
    import torch

    from .models.rsunet import RSUNet

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(cfg.seed)
    sampler = _Sampler(volumes, cfg, rng)
    net = RSUNet(in_channels=1, out_channels=3, widths=cfg.widths)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate, total_steps=cfg.steps)
    margin = [(i - o) // 2 for i, o in zip(reversed(cfg.input_patch), reversed(cfg.output_patch))]
    centre = (slice(None), slice(None), *(slice(m, m + o) for m, o in zip(margin, reversed(cfg.output_patch))))
    net.train()
    started = time.perf_counter()
    running = 0.0
    for step in range(1, cfg.steps + 1):
        image, target = sampler.batch()
        pred = net(torch.from_numpy(image))[centre]
        truth = torch.from_numpy(target)[centre]
        # equal total weight for boundary and interior edges, per channel
        positive = truth.sum(dim=(0, 2, 3, 4), keepdim=True)
        negative = truth[:, 0].numel() - positive
        weight = torch.where(truth > 0.5, 0.5 / positive.clamp(min=1), 0.5 / negative.clamp(min=1))
        loss = torch.nn.functional.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), truth, weight=weight,
                                                        reduction="sum") / truth.shape[1]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if step % 50 == 0 or step == cfg.steps:
            log(f"step {step}/{cfg.steps} loss {running / (50 if step % 50 == 0 else step % 50):.4f} "
                f"({time.perf_counter() - started:.0f} s)")
            running = 0.0
    return net.eval()


def config_dict(cfg: TrainConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
