"""Exact resume on CUDA in fp32: 4 steps + resume to 8 equals 8 uninterrupted, bitwise, with
deterministic kernels. Latents, dropout masks and instance noise are drawn on the GPU, so this
holds only if the rank's own CUDA random state is saved and restored; a control resume that
skips restoring it must differ."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from unittest import mock

import torch

from tests.gpu.runs import (
    assert_bitwise_equal,
    deterministic,
    require_cuda,
    rng_state,
    train,
    train_rows,
)

HALF, TOTAL = 4, 8
DEVICE_RNG_SETTER = "torch.cuda.set_rng_state"  # what the control resume leaves out


def check_exact_resume() -> str:
    require_cuda()
    deterministic()
    with tempfile.TemporaryDirectory(prefix="check-gpu-resume-") as tmp:
        split, whole, control = Path(tmp) / "resumed", Path(tmp) / "whole", Path(tmp) / "control"
        train(split, f"train.steps={HALF}")
        shutil.copytree(split, control)
        cuda_state = rng_state(split, HALF)["torch_cuda"]
        assert isinstance(cuda_state, dict), "the checkpoint holds no CUDA random state"
        assert cuda_state["device"] == torch.cuda.current_device(), cuda_state

        resumed = train(split, f"train.steps={TOTAL}")
        assert resumed.summary["resumed_from"].endswith(f"step-{HALF:08d}"), resumed.summary
        uninterrupted = train(whole, f"train.steps={TOTAL}")
        assert_bitwise_equal(resumed.tensors, uninterrupted.tensors, f"{HALF} + resume vs {TOTAL}")
        assert train_rows(split) == train_rows(whole), "metrics rows differ across the resume"

        # Control: the same resume with the CUDA state not restored must not match, or the
        # comparison above could not see a lost CUDA stream.
        with mock.patch(DEVICE_RNG_SETTER, lambda *args, **kwargs: None):
            unrestored = train(control, f"train.steps={TOTAL}")
        differ = [
            k
            for k in uninterrupted.tensors
            if not torch.equal(unrestored.tensors[k], uninterrupted.tensors[k])
        ]
        assert differ, "a resume without the CUDA random state still matched: the check is blind"
    return (
        f"{HALF} + {HALF} == {TOTAL} steps bitwise ({len(uninterrupted.tensors)} tensors, metrics "
        f"rows equal); CUDA RNG of device {cuda_state['device']} in the checkpoint; without "
        f"restoring it {len(differ)} tensors differ"
    )
