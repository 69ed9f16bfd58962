"""Exponential moving average of the generator's weights (Karras et al. 2018, 2020)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A plain (never distributed) copy of G: parameters averaged, BN buffers copied."""

    def __init__(self, G: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(G).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, G: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in G.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buf, buf in zip(self.module.buffers(), G.buffers()):
            ema_buf.copy_(buf)
