"""One GAN training step: a D phase, then a G phase, each a short function.

What is global and what is per replica, at a glance:
- global: G's BatchNorm statistics (synchronized BN), the gradients (DDP all-reduce);
- per replica: latents z, D's dropout masks, instance noise (each rank's own random stream)
  and the L2 penalty on D, added to D's loss on every replica.

Losses are BCE-with-logits on D's logits: Sigmoid + BCELoss saturates to log(0) under mixed
precision, the logit form does not.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
from pipeline.distributed import all_reduce_max

# Per-step statistics accumulated on the device (no host sync) and reduced at log intervals.
STAT_NAMES = (
    "d_loss",
    "g_loss",
    "d_real",
    "d_fake",
    "d_penalty",
    "d_grad_norm",
    "g_grad_norm",
    "d_skipped",
    "g_skipped",
)


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient, seen identically on every rank."""


@dataclass
class GANState:
    """The prepared (possibly DDP-wrapped) networks and their optimizers."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    d_penalty_params: list[nn.Parameter]
    """D's parameters under the L2 penalty (weights, and biases when configured)."""


def instance_noise_std(cfg: TrainConfig, step: int) -> float:
    """Constant std, or linear decay to 0 over ``instance_noise_decay_steps`` (Sønderby et al. 2016)."""
    if cfg.instance_noise_decay_steps <= 0:
        return cfg.instance_noise_std
    return cfg.instance_noise_std * max(0.0, 1.0 - step / cfg.instance_noise_decay_steps)


def penalty_params(D: nn.Module, include_biases: bool) -> list[nn.Parameter]:
    return [p for name, p in D.named_parameters() if include_biases or not name.endswith("bias")]


def l2_penalty(params: list[nn.Parameter], weight: float) -> torch.Tensor:
    """lambda * sum_i ||theta_i||^2; its gradient is 2 * lambda * theta."""
    return weight * torch.stack([p.pow(2).sum() for p in params]).sum()


def _add_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return x + std * torch.randn_like(x) if std > 0 else x


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _finite_everywhere(*values: torch.Tensor) -> bool:
    """True when every value is finite on every rank: one tiny all-reduce, the step's only sync."""
    bad = (
        torch.stack([(~torch.isfinite(v)).any() for v in values]).any().to(torch.float32).reshape(1)
    )
    return not bool(all_reduce_max(bad).item())


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradient for ``module``'s parameters inside the block."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def _apply_or_skip(
    opt: torch.optim.Optimizer,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    on_nonfinite: str,
    phase: str,
    step: int,
) -> bool:
    """Step the optimizer unless some rank saw a non-finite value; returns True when skipped."""
    if _finite_everywhere(loss, grad_norm):
        opt.step()
        return False
    opt.zero_grad(set_to_none=True)
    if on_nonfinite == "stop":
        raise NonFiniteError(
            f"non-finite {phase} loss or gradient at step {step} (seen on at least one rank); "
            "lower the learning rates, or set train.on_nonfinite=skip to skip such updates"
        )
    return True


def d_phase(
    s: GANState, accelerator, cfg: TrainConfig, real: torch.Tensor, z: torch.Tensor, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Update D on a real batch and G(z); returns the fake batch (with G's graph) for the G phase."""
    fake = s.G(z)
    std = instance_noise_std(cfg, step)
    with accelerator.autocast():
        # Real and fake through D as one batch: one larger matmul per layer. D has no BatchNorm,
        # so this equals two separate passes; dropout masks and noise stay per sample.
        logits = s.D(_add_noise(torch.cat([real, fake.detach()]), std)).float()
    d_real, d_fake = logits[: real.shape[0]], logits[real.shape[0] :]
    loss = F.binary_cross_entropy_with_logits(
        d_real, torch.ones_like(d_real)
    ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
    penalty = (
        l2_penalty(s.d_penalty_params, cfg.d_weight_penalty)
        if cfg.d_weight_penalty > 0
        else loss.new_zeros(())
    )
    total = loss + penalty
    s.opt_D.zero_grad(set_to_none=True)
    accelerator.backward(total)
    grad_norm = _grad_norm(s.D.parameters())
    skipped = _apply_or_skip(s.opt_D, total, grad_norm, cfg.on_nonfinite, "D", step)
    stats = {
        "d_loss": total.detach(),
        "d_real": torch.sigmoid(d_real.detach()).mean(),
        "d_fake": torch.sigmoid(d_fake.detach()).mean(),
        "d_penalty": penalty.detach(),
        "d_grad_norm": grad_norm,
        "d_skipped": torch.tensor(float(skipped), device=total.device),
    }
    return fake, stats


def g_phase(
    s: GANState, accelerator, cfg: TrainConfig, fake: torch.Tensor, step: int
) -> dict[str, torch.Tensor]:
    """Update G through the freshly updated D, reusing the D phase's fake batch.

    D is frozen (no weight gradients) and outside DDP sync (nothing of D is all-reduced);
    G's gradients are all-reduced as usual.
    """
    std = instance_noise_std(cfg, step)
    with frozen(s.D), accelerator.no_sync(s.D), accelerator.autocast():
        logits = s.D(_add_noise(fake, std)).float()
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    s.opt_G.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    grad_norm = _grad_norm(s.G.parameters())
    skipped = _apply_or_skip(s.opt_G, loss, grad_norm, cfg.on_nonfinite, "G", step)
    return {
        "g_loss": loss.detach(),
        "g_grad_norm": grad_norm,
        "g_skipped": torch.tensor(float(skipped), device=loss.device),
    }


def train_step(
    s: GANState, accelerator, cfg: TrainConfig, real: torch.Tensor, z: torch.Tensor, step: int
) -> torch.Tensor:
    """D phase then G phase; returns this step's statistics as one device tensor (STAT_NAMES order)."""
    # G's BN running statistics move in G's forward, before the non-finite check can skip the
    # update; under on_nonfinite=skip they are put back when a phase was skipped.
    saved = [b.detach().clone() for b in s.G.buffers()] if cfg.on_nonfinite == "skip" else None
    fake, d_stats = d_phase(s, accelerator, cfg, real, z, step)
    g_stats = g_phase(s, accelerator, cfg, fake, step)
    if saved is not None and bool(d_stats["d_skipped"] + g_stats["g_skipped"]):
        with torch.no_grad():
            for buf, old in zip(s.G.buffers(), saved):
                buf.copy_(old)
    stats = {**d_stats, **g_stats}
    return torch.stack([stats[name].float().reshape(()) for name in STAT_NAMES])
