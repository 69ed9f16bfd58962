"""The MLP GAN: plain PyTorch modules, no distributed code.

Generator: z -> [Linear, BatchNorm1d, ReLU] x len(g_hidden) -> Linear -> Tanh.
Discriminator: x -> [Linear, LeakyReLU, Dropout] x len(d_hidden) -> Linear, returning *logits*:
the loss is BCE-with-logits, which stays finite under mixed precision where Sigmoid + BCELoss
saturates to log(0).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig


class Generator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg.latent_dim
        for hidden in cfg.g_hidden:
            # With BN the Linear bias is cancelled by the mean subtraction, so it is dropped.
            layers.append(nn.Linear(width, hidden, bias=not cfg.g_batchnorm))
            if cfg.g_batchnorm:
                # Keyword arguments: BatchNorm1d's second positional parameter is eps, not momentum.
                layers.append(nn.BatchNorm1d(hidden, eps=cfg.bn_eps, momentum=cfg.bn_momentum))
            layers.append(nn.ReLU(inplace=True))
            width = hidden
        layers += [nn.Linear(width, cfg.image_size), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = cfg.latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn as ``rand >= p`` on the CPU, where ``bernoulli_`` is
    slow (measured 5-10% of a whole training step on 2 cores); elsewhere plain ``nn.Dropout``.
    Same semantics: zero with probability p, scale survivors by 1 / (1 - p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        # One multiply forward and one backward: the mask carries the 1 / (1 - p) scale.
        scaled_keep = (torch.rand_like(x) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scaled_keep


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = cfg.image_size
        for hidden in cfg.d_hidden:
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(cfg.leaky_slope, inplace=True)]
            if cfg.d_dropout > 0:
                layers.append(Dropout(cfg.d_dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def build_models(cfg: ModelConfig) -> tuple[Generator, Discriminator]:
    return Generator(cfg), Discriminator(cfg)


def linear_shapes(cfg: ModelConfig) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of every Linear layer of G and D, for FLOP counting."""
    g = list(zip([cfg.latent_dim, *cfg.g_hidden], [*cfg.g_hidden, cfg.image_size]))
    d = list(zip([cfg.image_size, *cfg.d_hidden], [*cfg.d_hidden, 1]))
    return {"G": g, "D": d}
