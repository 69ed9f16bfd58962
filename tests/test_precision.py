"""The paths GPU users take, run on the CPU through the same code: bf16 autocast, an fp16 loss
scaler (a CPU GradScaler with a forced overflow), torch.compile, and a resume whose checkpoint
lacks this rank's device random state. fp16 itself, which Accelerate cannot run on a CPU, is
refused before start."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import pipeline.step
import pipeline.trainer
from pipeline import train as train_cli
from pipeline.checkpoint import format as checkpoint_format
from pipeline.config import load_config
from pipeline.distributed import rank_seed
from pipeline.trainer import Trainer
from tests.test_checkpoint import TINY as CHECKPOINT_TINY
from tests.test_checkpoint import final_state

TINY = [*CHECKPOINT_TINY, "log.every=1"]  # a metrics row every step


def _train(run_dir: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor], Trainer]:
    """One in-process run; returns the summary, the final model/optimizer tensors, the trainer."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(987)  # a resume must restore its own streams
        trainer = Trainer(load_config(None, [f"output_dir={run_dir}", *TINY, *extra]))
        try:
            summary = trainer.fit()
            named = final_state(trainer)
        finally:
            trainer.close()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return summary, named, trainer


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _model_keys(run_dir: Path, step: int) -> list[str]:
    c = checkpoint_format.verify(run_dir / "checkpoints" / checkpoint_format.step_dir_name(step))
    return sorted(c.tensors("model.safetensors"))


# --- bf16 ----------------------------------------------------------------------------------------


def test_bf16_autocast_trains_checkpoints_and_resumes_on_cpu(tmp_path):
    summary, _, _ = _train(tmp_path / "run", "train.steps=4", "train.mixed_precision=bf16")
    assert summary["steps"] == 4
    rows = _rows(tmp_path / "run")
    for row in rows:
        for key in ("train/d_loss", "train/g_loss", "train/d_grad_norm", "train/g_grad_norm"):
            assert math.isfinite(row[key]), (key, row)
    summary, _, _ = _train(tmp_path / "run", "train.steps=8", "train.mixed_precision=bf16")
    assert summary["resumed_from"].endswith("step-00000004") and summary["steps"] == 8
    assert all(math.isfinite(r["train/d_loss"]) for r in _rows(tmp_path / "run"))


def test_fp16_on_cpu_is_refused_before_start_with_one_line_naming_bf16(tmp_path, capsys):
    code = train_cli.main(
        [f"output_dir={tmp_path / 'run'}", *TINY, "train.mixed_precision=fp16", "train.steps=2"]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(err) == 1 and "train.mixed_precision=fp16" in err[0] and "bf16" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- fp16 loss scaling, with a CPU GradScaler --------------------------------------------------

INIT_SCALE = 2.0**16
OVERFLOW_STEP = 2  # 0-based: the D phase of this step overflows once scaled


class OverflowAt:
    """The L2 penalty plus, at one step, a term whose scaled gradient (1e34 x 2^16) overflows
    float32 while the loss itself stays finite: an fp16-style overflow, not a NaN."""

    def __init__(self, step: int) -> None:
        self.step, self.calls, self.real = step, 0, pipeline.step.l2_penalty

    def __call__(self, params, weight):
        value = self.real(params, weight)
        self.calls += 1
        if self.calls - 1 == self.step:
            value = value + 1e34 * torch.stack([p.sum() for p in params]).sum().tanh()
        return value


@pytest.fixture
def cpu_loss_scaler(monkeypatch):
    """Every state the trainer builds gets a CPU GradScaler, as Accelerate gives fp16 on GPUs."""
    real_build = pipeline.trainer.build_gan

    def build_with_scaler(cfg, accelerator):
        state, ema, bn_sync = real_build(cfg, accelerator)
        # growth_interval large: the scale only moves by the overflow's backoff
        state.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10_000)
        return state, ema, bn_sync

    monkeypatch.setattr(pipeline.trainer, "build_gan", build_with_scaler)


def test_an_fp16_overflow_skips_the_update_halves_the_scale_and_the_run_goes_on(
    tmp_path, monkeypatch, cpu_loss_scaler
):
    monkeypatch.setattr(pipeline.step, "l2_penalty", OverflowAt(OVERFLOW_STEP))
    summary, _, trainer = _train(tmp_path / "run", "train.steps=6", "train.on_nonfinite=stop")
    assert summary["steps"] == 6  # on_nonfinite=stop did not stop it: an overflow is no NaN
    rows = {r["step"]: r for r in _rows(tmp_path / "run")}
    assert rows[OVERFLOW_STEP + 1]["train/skipped_updates"] == 1.0
    assert all(rows[s]["train/skipped_updates"] == 0.0 for s in rows if s != OVERFLOW_STEP + 1)
    assert math.isfinite(rows[OVERFLOW_STEP + 1]["train/g_grad_norm"])


def _scaler_manifest(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / checkpoint_format.step_dir_name(step) / "manifest.json"
    return json.loads(path.read_text())["scaler"]


def test_an_fp16_run_with_an_overflow_resumes_exactly_with_its_loss_scale(
    tmp_path, monkeypatch, cpu_loss_scaler
):
    """8 steps (one overflow at step 2) + resume to 16 == 16 uninterrupted, bitwise, and the
    checkpoint carries the halved scale, so the resumed run scales as the uninterrupted one."""
    monkeypatch.setattr(pipeline.step, "l2_penalty", OverflowAt(OVERFLOW_STEP))
    _, uninterrupted, _ = _train(tmp_path / "b", "train.steps=16")
    monkeypatch.setattr(pipeline.step, "l2_penalty", OverflowAt(OVERFLOW_STEP))
    _train(tmp_path / "a", "train.steps=8")
    assert _scaler_manifest(tmp_path / "a", 8)["scale"] == INIT_SCALE / 2
    monkeypatch.setattr(pipeline.step, "l2_penalty", OverflowAt(-1))  # steps 8.. never overflow
    summary, resumed, _ = _train(tmp_path / "a", "train.steps=16")
    assert summary["resumed_from"].endswith("step-00000008")
    assert _scaler_manifest(tmp_path / "a", 16) == _scaler_manifest(tmp_path / "b", 16)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_consecutive_fp16_overflows_beyond_the_limit_stop_with_status_3(
    tmp_path, monkeypatch, capsys, cpu_loss_scaler
):
    def always_overflow(params, weight):
        return 1e34 * torch.stack([p.sum() for p in params]).sum().tanh()

    monkeypatch.setattr(pipeline.step, "l2_penalty", always_overflow)
    AcceleratorState._reset_state(True)
    code = train_cli.main(
        [f"output_dir={tmp_path / 'run'}", *TINY, "train.steps=20", "train.max_overflow_skips=3"]
    )
    AcceleratorState._reset_state(True)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 3
    assert len(err) == 1 and "4 fp16 overflows in a row" in err[0]


# --- torch.compile -------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_run_writes_plain_keys_and_resumes_with_compile_off(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.steps=4", "train.compile=true")
    _train(tmp_path / "plain", "train.steps=4")
    keys = _model_keys(run, 4)
    assert keys == _model_keys(tmp_path / "plain", 4)
    assert not any("_orig_mod" in k for k in keys)
    summary, _, _ = _train(run, "train.steps=6")  # resume the compiled run without compile
    assert summary["resumed_from"].endswith("step-00000004") and summary["steps"] == 6

    from pipeline.cli import export as export_cli

    assert (
        export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "g.safetensors")]) == 0
    )


# --- random streams on resume --------------------------------------------------------------------


def test_resume_without_this_ranks_device_state_rederives_distinct_streams(
    tmp_path, monkeypatch, caplog
):
    """A checkpoint written on the CPU, resumed where this rank has a GPU: the blob has no CUDA
    state for it, so the rank's streams come from (seed, step, rank), never from another rank's
    or a shared state."""
    _train(tmp_path / "run", "train.steps=4")
    monkeypatch.setattr(checkpoint_format, "rng_blob_covers_this_process", lambda blob: False)
    AcceleratorState._reset_state(True)
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(
            load_config(None, [f"output_dir={tmp_path / 'run'}", *TINY, "train.steps=8"])
        )
    try:
        state_after_resume = torch.get_rng_state()
    finally:
        trainer.close()
        AcceleratorState._reset_state(True)
    assert any("re-derived from (seed, step, rank)" in r.getMessage() for r in caplog.records)
    torch.manual_seed(rank_seed(0, 0, 4))
    assert torch.equal(state_after_resume, torch.get_rng_state())
    torch.manual_seed(rank_seed(0, 1, 4))
    assert not torch.equal(state_after_resume, torch.get_rng_state())  # rank 1's differs


def test_a_run_with_recalibrated_ema_batchnorm_resumes_bitwise(tmp_path):
    """The EMA generator's statistics are recomputed before every save from (seed, step): the
    resumed run's checkpoint equals the uninterrupted run's, G_ema included."""
    ema = ["model.ema_decay=0.9", "model.ema_bn_batches=2"]
    _train(tmp_path / "b", "train.steps=8", *ema)
    _train(tmp_path / "a", "train.steps=4", *ema)
    _train(tmp_path / "a", "train.steps=8", *ema)
    step8 = checkpoint_format.step_dir_name(8)
    resumed = checkpoint_format.verify(tmp_path / "a" / "checkpoints" / step8)
    uninterrupted = checkpoint_format.verify(tmp_path / "b" / "checkpoints" / step8)
    a, b = resumed.tensors("model.safetensors"), uninterrupted.tensors("model.safetensors")
    assert any(k.startswith("G_ema.") and "running_var" in k for k in a)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
