"""Small in-process training runs for the GPU checks, through the project's own Trainer.

Copied in spirit from tests/test_precision.py and tests/test_checkpoint.py (which the GPU checks
do not import: they are pytest modules with fixtures); the state is read with the checkpoint
manager's own ``named_state`` and ``optimizer_to_tensors``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState

import pipeline.step
from pipeline.checkpoint import format as checkpoint_format
from pipeline.checkpoint import schema
from pipeline.checkpoint.manager import named_state
from pipeline.config import load_config
from pipeline.trainer import Trainer
from tests.gpu import SkipCheck

TINY = [
    "data.name=synthetic",
    "model.g_hidden=[32,64]",
    "model.d_hidden=[64,32]",
    "model.latent_dim=16",
    "model.ema_decay=0.9",  # the EMA is part of what must resume exactly
    "train.batch_size=16",
    "log.trackers=[none]",
    "eval.enabled=false",
    "log.every=1",
    "sample.every=0",
    "checkpoint.every=4",
]
"""Tiny widths on the synthetic dataset; dropout and instance noise keep their defaults (on),
so every random stream (CPU and CUDA) matters for an exact resume."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SkipCheck("no CUDA")


def deterministic() -> None:
    """Bitwise-reproducible CUDA kernels; the runner sets CUBLAS_WORKSPACE_CONFIG=:4096:8 in the
    environment before any cuBLAS handle exists, as cuBLAS requires."""
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


@dataclass
class Run:
    summary: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    """G, D, G_ema and both optimizers' tensors after the run, on the CPU."""
    before: dict[str, Any]
    """What ``inspect_before`` returned (read from the built trainer before its first step)."""
    seen: dict[str, Any]
    """What ``inspect`` returned (read from the live trainer after fit, before close)."""


def reset_accelerate() -> None:
    """Forget Accelerate's singletons, so the next Trainer builds its own Accelerator."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def scramble_global_streams() -> None:
    """Global streams unlike any a run leaves behind (CUDA too): a resume must restore its own."""
    torch.manual_seed(987_654_321)  # also every CUDA device
    random.seed(987_654_321)
    np.random.seed(98_765)


def final_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = named_state(trainer.accelerator, trainer.state, trainer.ema)
    for name, opt in (("opt_G", trainer.state.opt_G), ("opt_D", trainer.state.opt_D)):
        state.update(
            checkpoint_format.optimizer_to_tensors(getattr(opt, "optimizer", opt), name)[0]
        )
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def train(
    run_dir: Path,
    *overrides: str,
    inspect: Callable[[Trainer], dict[str, Any]] | None = None,
    inspect_before: Callable[[Trainer], dict[str, Any]] | None = None,
) -> Run:
    """One run of ``TINY`` + ``overrides`` in this process (resume=auto continues ``run_dir``)."""
    reset_accelerate()
    scramble_global_streams()
    trainer = Trainer(load_config(None, [f"output_dir={run_dir}", *TINY, *overrides]))
    try:
        before = inspect_before(trainer) if inspect_before is not None else {}
        summary = trainer.fit()
        tensors = final_tensors(trainer)
        seen = inspect(trainer) if inspect is not None else {}
    finally:
        trainer.close()
        reset_accelerate()
    return Run(summary, tensors, before, seen)


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl reduced to step and train/* (perf/* is timing, never reproducible)."""
    return [
        {k: v for k, v in row.items() if k == "step" or k.startswith("train/")}
        for row in rows(run_dir)
    ]


def assert_finite_losses(run_dir: Path) -> None:
    for row in rows(run_dir):
        for key in ("train/d_loss", "train/g_loss", "train/d_grad_norm", "train/g_grad_norm"):
            assert math.isfinite(row[key]), f"{key} is {row[key]} at step {row['step']}"


def assert_bitwise_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
) -> None:
    assert sorted(got) == sorted(want), f"{what}: different tensor names"
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"{what}: {len(differ)} of {len(want)} tensors differ, e.g. {differ[:3]}"


def checkpoint(run_dir: Path, step: int) -> checkpoint_format.Checkpoint:
    """The run's checkpoint at ``step``, through the same ``verify`` every reader runs."""
    return checkpoint_format.verify(run_dir / "checkpoints" / checkpoint_format.step_dir_name(step))


def model_keys(run_dir: Path, step: int) -> list[str]:
    return sorted(checkpoint(run_dir, step).tensors(schema.MODEL_FILE))


def rng_state(run_dir: Path, step: int, rank: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s random state as stored in the checkpoint (JSON)."""
    blob = checkpoint(run_dir, step).tensors(schema.RNG_FILE)[f"rank{rank}"]
    return json.loads(bytes(blob.numpy().tobytes()).decode())


class OverflowAt:
    """Patch for ``pipeline.step.l2_penalty``: the penalty plus, at global step ``step`` only, a
    term whose scaled gradient (1e34 x 2^16) overflows while the loss itself stays finite: an
    fp16 overflow, not a NaN. ``start_step`` is the step the run starts at (a resume), so the
    overflow hits the same global step in a resumed and an uninterrupted run."""

    def __init__(self, step: int, start_step: int = 0) -> None:
        self.step, self.calls, self.real = step, start_step, pipeline.step.l2_penalty

    def __call__(self, params, weight):
        value = self.real(params, weight)
        self.calls += 1
        if self.calls - 1 == self.step:
            value = value + 1e34 * torch.stack([p.sum() for p in params]).sum().tanh()
        return value
