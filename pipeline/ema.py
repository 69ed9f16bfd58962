"""Exponential moving average of the generator's weights (Karras et al. 2018, 2020), with
BatchNorm statistics that belong to the averaged weights."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pipeline.io import draw_latents, seeded_generator

RECALIBRATION_BATCH = 256
"""Latents per forward pass when the EMA generator's BatchNorm statistics are recomputed."""


class EMA:
    """A plain (never distributed) copy of G whose parameters are averaged.

    BatchNorm buffers: with ``bn_batches == 0`` they are G's live statistics, copied every step
    (cheap, but they belong to G's weights, not to the average); otherwise
    ``recalibrate_bn`` recomputes them for the averaged weights before the EMA generator is
    sampled, scored or saved.
    """

    def __init__(self, G: nn.Module, decay: float, bn_batches: int = 0) -> None:
        self.decay, self.bn_batches = decay, bn_batches
        self.module = copy.deepcopy(G).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, G: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in G.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        if self.bn_batches == 0:
            for ema_buf, buf in zip(self.module.buffers(), G.buffers()):
                ema_buf.copy_(buf)

    @torch.no_grad()
    def recalibrate_bn(self, seed: int, step: int) -> None:
        """Reset the BatchNorm statistics and re-estimate them as the cumulative average over
        ``bn_batches`` forward passes in train mode on fresh latents. The latents depend on
        (seed, step) only, so every rank computes the same statistics without communicating,
        and a resumed run recomputes exactly what the uninterrupted one did."""
        norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.bn_batches == 0 or not norms:
            return
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
        device = next(self.module.parameters()).device
        generator = seeded_generator(seed, "ema-bn", step)
        self.module.train()
        try:
            for _ in range(self.bn_batches):
                self.module(
                    draw_latents(RECALIBRATION_BATCH, self.module.latent_dim, device, generator)
                )
        finally:
            self.module.eval()
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
