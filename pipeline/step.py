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
from pipeline.errors import NonFiniteError

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


@dataclass
class GANState:
    """The prepared (possibly DDP-wrapped) networks and their optimizers."""

    G: nn.Module
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    d_penalty_params: list[nn.Parameter]
    """D's parameters under the L2 penalty (weights, and biases when configured)."""
    scaler: torch.amp.GradScaler | None = None
    """The fp16 loss scaler shared by both optimizers (None without fp16)."""
    overflow_streak: int = 0
    """Consecutive steps with an fp16 overflow skip."""
    overflowed: bool = False
    """Whether a phase of the current step overflowed."""


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


def _nonfinite_flags_everywhere(*groups: list[torch.Tensor]) -> list[bool]:
    """For each group of values: whether any value is non-finite on any rank. One tiny
    all-reduce of one flag per group, the phase's only host sync."""
    flags = torch.stack(
        [torch.stack([(~torch.isfinite(v)).any() for v in group]).any() for group in groups]
    ).to(torch.float32)
    return [bool(f) for f in all_reduce_max(flags).tolist()]


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


def _backward(s: GANState, accelerator, loss: torch.Tensor, opt) -> None:
    """Backward; with a loss scaler, of the scaled loss, then the gradients are unscaled in place
    so the grad-norm metric, the checks and any clipping see true values."""
    if s.scaler is None:
        accelerator.backward(loss)
        return
    s.scaler.scale(loss).backward()
    s.scaler.unscale_(_inner(opt))


def _inner(opt) -> torch.optim.Optimizer:
    """The torch optimizer under Accelerate's wrapper (its step would also step the scaler)."""
    return getattr(opt, "optimizer", opt)


def _apply_or_skip(
    s: GANState,
    opt,
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    cfg: TrainConfig,
    phase: str,
    step: int,
    extra_checks: tuple[torch.Tensor, ...] = (),
) -> bool:
    """Step the optimizer unless some rank saw a non-finite value; returns True when skipped.

    A non-finite loss (or ``extra_checks``, G's BatchNorm statistics) is the run's problem:
    ``on_nonfinite`` decides. With a loss scaler, non-finite gradients under a finite loss are
    an fp16 overflow, the scaler's business: it skips the update and halves the scale; only
    ``max_overflow_skips`` such steps in a row stop the run.
    """
    loss_bad, grad_bad, stats_bad = _nonfinite_flags_everywhere(
        [loss], [grad_norm], list(extra_checks) or [loss.new_zeros(())]
    )
    loss_bad = loss_bad or stats_bad
    if not (loss_bad or grad_bad):
        if s.scaler is not None:
            s.scaler.step(_inner(opt))
        else:
            opt.step()
        return False
    opt.zero_grad(set_to_none=True)
    if s.scaler is not None and not loss_bad:
        s.overflowed = True  # counted once per step in train_step
        return True
    if cfg.on_nonfinite == "stop":
        what = f"{phase} loss or gradient" if not stats_bad else "G BatchNorm running statistics"
        raise NonFiniteError(
            f"non-finite {what} at step {step} (seen on at least one rank); "
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
    _backward(s, accelerator, total, s.opt_D)
    grad_norm = _grad_norm(s.D.parameters())
    # G's forward above moved its BatchNorm running statistics: check them with this phase.
    skipped = _apply_or_skip(
        s, s.opt_D, total, grad_norm, cfg, "D", step, extra_checks=tuple(s.G.buffers())
    )
    kept = 0.0 if skipped else 1.0  # a skipped phase's statistics are left out of the means
    stats = {
        "d_loss": total.detach() * kept,
        "d_real": torch.sigmoid(d_real.detach()).mean() * kept,
        "d_fake": torch.sigmoid(d_fake.detach()).mean() * kept,
        "d_penalty": penalty.detach() * kept,
        "d_grad_norm": grad_norm * kept,
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
    _backward(s, accelerator, loss, s.opt_G)
    grad_norm = _grad_norm(s.G.parameters())
    skipped = _apply_or_skip(s, s.opt_G, loss, grad_norm, cfg, "G", step)
    kept = 0.0 if skipped else 1.0  # a skipped phase's statistics are left out of the means
    return {
        "g_loss": loss.detach() * kept,
        "g_grad_norm": grad_norm * kept,
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
    if s.scaler is not None:
        s.scaler.update()  # once per step, after both optimizers (PyTorch's AMP recipe)
        s.overflow_streak = s.overflow_streak + 1 if s.overflowed else 0
        s.overflowed = False
        if s.overflow_streak > cfg.max_overflow_skips:
            raise NonFiniteError(
                f"{s.overflow_streak} fp16 overflows in a row at step {step} (loss scale "
                f"{s.scaler.get_scale():.3g}); lower the learning rates, or use "
                "train.mixed_precision=bf16"
            )
    if saved is not None and bool(d_stats["d_skipped"] + g_stats["g_skipped"]):
        with torch.no_grad():
            for buf, old in zip(s.G.buffers(), saved):
                buf.copy_(old)
    stats = {**d_stats, **g_stats}
    return torch.stack([stats[name].float().reshape(()) for name in STAT_NAMES])
