"""One GAN training step: a D phase, then a G phase, each a short function.

What is global and what is per replica, at a glance:
- global: G's BatchNorm statistics (synchronized BN), the gradients (DDP all-reduce), and so the
  skip decision, which is read off the all-reduced gradients;
- per replica: latents z, D's dropout masks, instance noise (each rank's own random stream)
  and the L2 penalty on D, added to D's loss on every replica.

No host sync: a non-finite loss on any rank reaches every rank through the gradients (the loss
is multiplied by NaN before backward), the update is skipped on the device (fused Adam's
``found_inf``), and what happened is recorded in device tensors (``NonFiniteRecord``) that the
ranks read together every ``train.check_every`` steps (``pipeline.loop``).

Losses are BCE-with-logits on D's logits: Sigmoid + BCELoss saturates to log(0) under mixed
precision, the logit form does not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainConfig
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

# What a non-finite value was found in, in the order a report prefers them within one step.
NONFINITE_KINDS = ("G BatchNorm running statistics", "D loss or gradient", "G loss or gradient")
_BN_STATS, _D, _G = range(len(NONFINITE_KINDS))


@dataclass
class NonFiniteRecord:
    """What the steps since the start saw, kept on the device and read only when the ranks
    agree (``pipeline.loop``). Codes are float64 so one all-reduce (MIN) combines them."""

    first_problem: torch.Tensor
    """``step * 3 + kind`` (``NONFINITE_KINDS``) of the first non-finite loss, gradient or BN
    statistic that ``on_nonfinite`` must act on; +inf when none."""
    overflow_streak: torch.Tensor
    """Consecutive steps with an fp16 overflow (finite losses, non-finite scaled gradients)."""
    first_overflow_limit: torch.Tensor
    """The step at which the streak first exceeded ``max_overflow_skips``; +inf when none."""

    @classmethod
    def empty(cls, device: torch.device | str) -> NonFiniteRecord:
        inf = torch.tensor(math.inf, dtype=torch.float64, device=device)
        return cls(inf.clone(), torch.zeros((), device=device), inf.clone())

    def agreed_values(self) -> torch.Tensor:
        """(first_problem, first_overflow_limit): the ranks combine them with a MIN."""
        return torch.stack([self.first_problem, self.first_overflow_limit])


def raise_recorded(values: list[float], cfg: TrainConfig, scale: float | None) -> None:
    """Act on the agreed ``NonFiniteRecord.agreed_values``: with ``on_nonfinite=stop`` a
    recorded problem stops the run; too many fp16 overflows in a row always do."""
    first_problem, first_overflow_limit = values
    if cfg.on_nonfinite == "stop" and math.isfinite(first_problem):
        step, kind = divmod(int(first_problem), len(NONFINITE_KINDS))
        raise NonFiniteError(
            f"non-finite {NONFINITE_KINDS[kind]} at step {step} (seen on at least one rank); "
            "lower the learning rates, or set train.on_nonfinite=skip to skip such updates"
        )
    if math.isfinite(first_overflow_limit):
        # An overflow here is a skip under finite losses on this rank; another rank's
        # non-finite loss skips the same update and counts here too.
        raise NonFiniteError(
            f"{cfg.max_overflow_skips + 1} fp16 overflows in a row at step "
            f"{int(first_overflow_limit)} (updates skipped by the loss scaler, loss scale now "
            f"{scale:.3g}); lower the learning rates, or use train.mixed_precision=bf16"
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
    record: NonFiniteRecord | None = None
    """Non-finite values and fp16 overflows seen so far, on the networks' device (made there
    when not given)."""

    def __post_init__(self) -> None:
        if self.record is None:
            device = next(iter(_inner(self.opt_D).param_groups[0]["params"])).device
            self.record = NonFiniteRecord.empty(device)


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
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _all_finite(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every tensor is finite (no host sync)."""
    return torch.stack([torch.isfinite(v).all() for v in values]).all()


def _poisoned_if_nonfinite(loss: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``loss`` times 1, or times NaN when ``finite`` is false. Bitwise the same loss and
    gradients when finite; otherwise every gradient of this rank is NaN, and DDP's all-reduce
    carries that to every rank, so the ranks skip together without a collective of their own."""
    return loss * torch.where(finite, 1.0, math.nan).to(loss.dtype)


@contextlib.contextmanager
def without_dropout(module: nn.Module):
    """``module``'s Dropout layers in eval mode (identity) inside the block; nothing else of it
    changes mode."""
    layers = [m for m in module.modules() if isinstance(m, nn.Dropout) and m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


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


def skips_on_device(opt) -> bool:
    """Whether ``opt`` can skip an update on the device: fused Adam reads ``found_inf``."""
    return bool(_inner(opt).defaults.get("fused"))


def _step_unless(opt, skip: torch.Tensor) -> None:
    """Step ``opt`` unless ``skip`` (a 0-dim bool tensor, the same on every rank). Fused Adam
    skips on the device (parameters, moments and step count untouched); other optimizers
    need the flag on the host."""
    inner = _inner(opt)
    if skips_on_device(opt):
        inner.found_inf = skip.to(torch.float32)
        try:
            inner.step()
        finally:
            del inner.found_inf
    elif not bool(skip):  # a host sync: only where the optimizer has no fused kernel
        inner.step()


def _step_and_record(
    s: GANState,
    opt,
    grad_norm: torch.Tensor,
    problem_here: torch.Tensor | None,
    kind: torch.Tensor | int,
    step: int,
) -> torch.Tensor:
    """Step the optimizer unless a gradient is non-finite on any rank (the all-reduced gradients
    say so on every rank alike); returns that skip flag (0-dim bool) and records what
    ``on_nonfinite`` must act on.

    Without a loss scaler every skip is such a problem. With one, a skip under finite losses is
    an fp16 overflow, the scaler's business (skip, halve the scale); then only
    ``problem_here``, a non-finite loss or BN statistic on this rank, is recorded.
    """
    skip = ~torch.isfinite(grad_norm)
    _step_unless(opt, skip)
    problem = skip if s.scaler is None else problem_here
    code = step * len(NONFINITE_KINDS) + kind
    r = s.record
    r.first_problem = torch.where(problem, r.first_problem.clamp(max=code), r.first_problem)
    return skip


def d_phase(
    s: GANState, accelerator, cfg: TrainConfig, real: torch.Tensor, z: torch.Tensor, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Update D on a real batch and G(z); returns the fake batch (with G's graph) for the G
    phase, the phase's statistics and whether this rank saw a non-finite loss or BN statistic."""
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
    # G's forward above moved its BatchNorm running statistics: they are checked with this phase.
    bn_finite = _all_finite((*s.G.buffers(), total.new_ones(())))
    finite_here = torch.isfinite(total) & bn_finite
    s.opt_D.zero_grad(set_to_none=True)
    _backward(s, accelerator, _poisoned_if_nonfinite(total, finite_here), s.opt_D)
    grad_norm = _grad_norm(s.D.parameters())
    kind = torch.where(bn_finite, _D, _BN_STATS)
    skip = _step_and_record(s, s.opt_D, grad_norm, ~finite_here, kind, step)
    kept = (~skip).float()  # a skipped phase's statistics are left out of the means
    stats = {
        "d_loss": total.detach() * kept,
        "d_real": torch.sigmoid(d_real.detach()).mean() * kept,
        "d_fake": torch.sigmoid(d_fake.detach()).mean() * kept,
        "d_penalty": penalty.detach() * kept,
        "d_grad_norm": grad_norm * kept,
        "d_skipped": skip.float(),
    }
    return fake, stats, ~finite_here


def g_phase(
    s: GANState, accelerator, cfg: TrainConfig, fake: torch.Tensor, step: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Update G through the freshly updated D, reusing the D phase's fake batch.

    D is frozen (no weight gradients) and outside DDP sync (nothing of D is all-reduced);
    G's gradients are all-reduced as usual. With ``g_step_dropout`` off, D's dropout is off
    here: G learns through the whole D, while D's own update keeps its dropout. Returns the
    statistics and whether this rank saw a non-finite loss.
    """
    std = instance_noise_std(cfg, step)
    dropout = contextlib.nullcontext() if cfg.g_step_dropout else without_dropout(s.D)
    with frozen(s.D), accelerator.no_sync(s.D), dropout, accelerator.autocast():
        logits = s.D(_add_noise(fake, std)).float()
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    finite_here = torch.isfinite(loss)
    s.opt_G.zero_grad(set_to_none=True)
    _backward(s, accelerator, _poisoned_if_nonfinite(loss, finite_here), s.opt_G)
    grad_norm = _grad_norm(s.G.parameters())
    skip = _step_and_record(s, s.opt_G, grad_norm, ~finite_here, _G, step)
    kept = (~skip).float()  # a skipped phase's statistics are left out of the means
    stats = {
        "g_loss": loss.detach() * kept,
        "g_grad_norm": grad_norm * kept,
        "g_skipped": skip.float(),
    }
    return stats, ~finite_here


def train_step(
    s: GANState, accelerator, cfg: TrainConfig, real: torch.Tensor, z: torch.Tensor, step: int
) -> torch.Tensor:
    """D phase then G phase; returns this step's statistics as one device tensor (STAT_NAMES
    order). No host sync: see the module docstring."""
    # G's BN running statistics move in G's forward, before the skip decision; under
    # on_nonfinite=skip they are put back when a phase was skipped.
    saved = [b.detach().clone() for b in s.G.buffers()] if cfg.on_nonfinite == "skip" else None
    fake, d_stats, d_problem = d_phase(s, accelerator, cfg, real, z, step)
    g_stats, g_problem = g_phase(s, accelerator, cfg, fake, step)
    skipped = d_stats["d_skipped"].bool() | g_stats["g_skipped"].bool()
    if s.scaler is not None:
        s.scaler.update()  # once per step, after both optimizers (PyTorch's AMP recipe)
        r = s.record
        overflow = skipped & ~(d_problem | g_problem)
        r.overflow_streak = (r.overflow_streak + 1) * overflow
        newly_over = (r.overflow_streak > cfg.max_overflow_skips) & r.first_overflow_limit.isinf()
        r.first_overflow_limit = torch.where(newly_over, step, r.first_overflow_limit)
    if saved is not None:
        with torch.no_grad():
            for buf, old in zip(s.G.buffers(), saved):
                buf.copy_(torch.where(skipped, old, buf))
    stats = {**d_stats, **g_stats}
    return torch.stack([stats[name].float().reshape(()) for name in STAT_NAMES])
