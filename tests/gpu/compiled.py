"""torch.compile on CUDA (inductor, Triton kernels) through the Trainer: a compiled run writes the
same checkpoint keys as a plain one, resumes with compile off, and exports."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from pipeline.cli import export as export_cli
from tests.gpu.runs import assert_finite_losses, model_keys, require_cuda, rows, train


def _compiled(trainer) -> dict:
    compiled = torch._dynamo.eval_frame.OptimizedModule
    return {
        "device": trainer.accelerator.device.type,
        "G_compiled": isinstance(trainer.state.G, compiled),
        "D_compiled": isinstance(trainer.state.D, compiled),
    }


def check_compile() -> str:
    """train.compile=true on CUDA: 4 steps; checkpoint keys equal a plain run's (no _orig_mod);
    the compiled run resumes with compile off to 6 steps and exports its generator."""
    require_cuda()
    with tempfile.TemporaryDirectory(prefix="check-gpu-compile-") as tmp:
        run, plain = Path(tmp) / "compiled", Path(tmp) / "plain"
        compiled = train(run, "train.steps=4", "train.compile=true", inspect=_compiled)
        assert compiled.seen == {"device": "cuda", "G_compiled": True, "D_compiled": True}, (
            compiled.seen
        )
        assert_finite_losses(run)
        train(plain, "train.steps=4")
        keys = model_keys(run, 4)
        assert keys == model_keys(plain, 4), "compiled and plain checkpoints hold different keys"
        assert not any("_orig_mod" in k for k in keys), [k for k in keys if "_orig_mod" in k][:3]

        resumed = train(run, "train.steps=6", inspect=_compiled)  # compile off
        assert not resumed.seen["G_compiled"] and not resumed.seen["D_compiled"], resumed.seen
        assert resumed.summary["resumed_from"].endswith("step-00000004"), resumed.summary
        assert resumed.summary["steps"] == 6
        assert all(math.isfinite(r["train/d_loss"]) for r in rows(run))

        out = Path(tmp) / "G.safetensors"
        assert export_cli.main(["--checkpoint", str(run), "--out", str(out)]) == 0
        assert out.is_file()
    return f"{len(keys)} model keys as plain, none _orig_mod; resumed 4 -> 6 uncompiled; exported"
