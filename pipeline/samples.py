"""Sample grids from a fixed latent batch: the same images for the whole run and across resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.io import atomic_write, draw_latents, seeded_generator


def fixed_latents(
    seed: int, n: int, latent_dim: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Latents drawn from their own stream, so they depend on (seed, n) only."""
    return draw_latents(n, latent_dim, device, seeded_generator(seed, "sample-grid"))


@torch.no_grad()
def generate(G: nn.Module, z: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """G(z) in eval mode (running BN statistics, no dropout), float32, in chunks of ``chunk``
    latents; G's training mode is restored afterwards."""
    was_training = G.training
    G.eval()
    try:
        return torch.cat([G(part).float() for part in z.split(chunk)])
    finally:
        G.train(was_training)


def render(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """G(z) in eval mode as (N, 1, 28, 28) in [0, 1], on the CPU."""
    return ((generate(G, z).reshape(-1, 1, 28, 28) + 1) / 2).clamp(0, 1).cpu()


def grid(images01: torch.Tensor) -> torch.Tensor:
    from torchvision.utils import make_grid  # imported here: torchvision costs seconds at start-up

    nrow = max(1, int(round(len(images01) ** 0.5)))
    return make_grid(images01, nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images01: torch.Tensor, path: Path) -> np.ndarray:
    """Write the grid as PNG atomically; returns it as an HxWx3 uint8 array for the trackers."""
    from torchvision.utils import save_image

    g = grid(images01)
    atomic_write(path, lambda tmp: save_image(g, str(tmp), format="png"))
    return g.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
