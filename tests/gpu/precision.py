"""Mixed precision on CUDA through the Trainer: bf16 autocast, and fp16 with Accelerate's
GradScaler (``accelerator.scaler``, which ``build_gan`` puts on ``GANState.scaler``) and one
forced overflow. The CPU suite runs the same paths with a CPU GradScaler (tests/test_precision.py);
here the scaler, autocast and kernels are CUDA's own."""

from __future__ import annotations

import tempfile
from pathlib import Path
from unittest import mock

import pipeline.step
from tests.gpu.runs import (
    OverflowAt,
    assert_bitwise_equal,
    assert_finite_losses,
    checkpoint,
    deterministic,
    require_cuda,
    rows,
    train,
    train_rows,
)

OVERFLOW_STEP = 2  # 0-based: the D phase of this step overflows once scaled (logged at step 3)
HALF, TOTAL = 8, 16
FP16 = "train.mixed_precision=fp16"


def _amp(trainer) -> dict:
    acc, scaler = trainer.accelerator, trainer.state.scaler
    return {
        "device": acc.device.type,
        "mixed_precision": acc.mixed_precision,
        "scaler": type(scaler).__name__ if scaler is not None else None,
        "scaler_enabled": scaler is not None and scaler.is_enabled(),
        "scale": scaler.get_scale() if scaler is not None else None,
        "backoff": scaler.get_backoff_factor() if scaler is not None else None,
        "growth_interval": scaler.get_growth_interval() if scaler is not None else None,
    }


def check_bf16() -> str:
    """train.mixed_precision=bf16 on CUDA: 4 steps, finite metrics, checkpoint, resume to 8."""
    require_cuda()
    with tempfile.TemporaryDirectory(prefix="check-gpu-bf16-") as tmp:
        run_dir = Path(tmp) / "run"
        first = train(run_dir, "train.steps=4", "train.mixed_precision=bf16", inspect=_amp)
        assert first.seen["device"] == "cuda", first.seen
        assert first.seen["mixed_precision"] == "bf16", first.seen
        assert first.seen["scaler"] is None, "bf16 needs no loss scaler"
        assert first.summary["steps"] == 4
        assert_finite_losses(run_dir)
        second = train(run_dir, "train.steps=8", "train.mixed_precision=bf16")
        assert second.summary["resumed_from"].endswith("step-00000004"), second.summary
        assert second.summary["steps"] == 8
        assert_finite_losses(run_dir)
        losses = [r["train/d_loss"] for r in rows(run_dir)]
    return f"4 + 4 steps resumed, finite; d_loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def _fp16_run(run_dir: Path, steps: int, start_step: int, **inspectors):
    with mock.patch.object(pipeline.step, "l2_penalty", OverflowAt(OVERFLOW_STEP, start_step)):
        return train(
            run_dir,
            f"train.steps={steps}",
            FP16,
            "train.on_nonfinite=stop",  # an overflow must not stop the run: it is no NaN
            **inspectors,
        )


def check_fp16_overflow() -> str:
    """fp16 on CUDA with one forced overflow: the run goes on, train/skipped_updates counts it,
    the loss scale backs off, and 8 steps + resume to 16 equals 16 uninterrupted, bitwise."""
    require_cuda()
    deterministic()
    with tempfile.TemporaryDirectory(prefix="check-gpu-fp16-") as tmp:
        whole, split = Path(tmp) / "uninterrupted", Path(tmp) / "resumed"
        uninterrupted = _fp16_run(whole, TOTAL, 0, inspect=_amp, inspect_before=_amp)
        amp, initial = uninterrupted.seen, uninterrupted.before["scale"]
        assert amp["device"] == "cuda" and amp["mixed_precision"] == "fp16", amp
        assert amp["scaler"] == "GradScaler" and amp["scaler_enabled"], amp
        assert uninterrupted.summary["steps"] == TOTAL  # the overflow did not stop the run

        logged = {r["step"]: r for r in rows(whole)}
        assert_finite_losses(whole)
        overflow_row = logged[OVERFLOW_STEP + 1]
        assert overflow_row["train/skipped_updates"] >= 1.0, overflow_row
        # Any other skip would be a natural overflow (possible at the first scale). Each step
        # with a skip backs the scale off once; no growth happens within growth_interval steps.
        skip_steps = [s for s, r in sorted(logged.items()) if r["train/skipped_updates"] > 0]
        assert amp["growth_interval"] > TOTAL, amp
        expected = initial * amp["backoff"] ** len(skip_steps)
        assert amp["scale"] == expected, (
            f"scale {amp['scale']} after skips at steps {skip_steps}, expected {expected} "
            f"(initial {initial}, backoff {amp['backoff']})"
        )
        stored = checkpoint(whole, TOTAL).manifest.get("scaler")
        assert stored is not None and stored["scale"] == amp["scale"], stored

        _fp16_run(split, HALF, 0)
        resumed = _fp16_run(split, TOTAL, HALF, inspect=_amp)
        assert resumed.summary["resumed_from"].endswith(f"step-{HALF:08d}"), resumed.summary
        assert resumed.seen["scale"] == amp["scale"], (resumed.seen["scale"], amp["scale"])
        assert_bitwise_equal(resumed.tensors, uninterrupted.tensors, f"{HALF} + resume vs {TOTAL}")
        assert train_rows(split) == train_rows(whole), "metrics rows differ across the resume"
    return (
        f"overflow at step {OVERFLOW_STEP + 1} skipped (skipped_updates "
        f"{overflow_row['train/skipped_updates']:g}), skips at steps {skip_steps}, scale "
        f"{initial:g} -> {amp['scale']:g}; {HALF} + {HALF} == {TOTAL} bitwise"
    )
