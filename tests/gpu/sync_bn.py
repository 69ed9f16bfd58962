"""Native ``torch.nn.SyncBatchNorm`` on 2 processes equals ``nn.BatchNorm1d`` on the global batch:
forward output, input gradient, parameter gradients (summed over ranks, as DDP does) and running
statistics. The layers come from ``pipeline.distributed.sync_batchnorm``, which picks
``nn.SyncBatchNorm`` on CUDA; one case is the project's own generator.

Two ways to put 2 ranks on GPUs:
- ``check_nccl``: NCCL, one GPU per rank, as training runs (``all_gather_into_tensor`` forward,
  ``all_reduce`` backward). Needs 2 GPUs: NCCL (since 2.5) refuses two ranks on one device.
  NCCL 2.30 added an experimental ``NCCL_MULTI_RANK_GPU_ENABLE=1`` that lifts this; with one
  GPU, ``CHECK_GPU_NCCL_SHARED=1`` opts in to it (not by default: an experimental NCCL mode that
  hangs or fails would make every one-GPU run of ``make check-gpu`` fail).
- ``check_gloo_shared_gpu``: gloo with CUDA tensors, both ranks on cuda:0; runs on one GPU. This
  is supported: SyncBatchNorm (``torch/nn/modules/_functions.py``) switches to ``dist.all_gather``
  (a list of tensors) when the backend is gloo, which has no ``all_gather_into_tensor``; gloo
  registers for both ``cpu`` and ``cuda`` (``Backend.backend_capability``) and implements
  ``allgather`` and ``allreduce`` for CUDA tensors (``AsyncAllgatherCUDAWork``,
  ``AsyncAllreduceCUDA*Work`` in libtorch), staged through host memory. Those two are all that
  SyncBatchNorm's forward and backward call, so its CUDA kernels (``batch_norm_stats``,
  ``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``, ``batch_norm_backward_*``) run
  for real; only NCCL's transport is not exercised.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.config import load_config
from pipeline.distributed import sync_batchnorm
from pipeline.models import build_models
from tests.dist_utils import run_on_ranks
from tests.gpu import SkipCheck
from tests.gpu.runs import require_cuda

WORLD_SIZE = 2
STEPS = 3
RANK_TIMEOUT_S = 90.0  # spawn + CUDA init + NCCL init take seconds; a hang fails here
CASES = {
    # name: rows on rank 0, rows on rank 1
    "bn": (5, 27),  # one BatchNorm1d layer, uneven shards, feature means far from 0
    "G": (12, 20),  # the project's generator (Linear, BatchNorm1d, ReLU, ..., Tanh)
}


G_WIDTHS = ["model.g_hidden=[32,64]", "model.latent_dim=16"]


def build_case(name: str) -> nn.Module:
    """The case's model with plain ``nn.BatchNorm1d``, identical in every process."""
    torch.manual_seed(1234)
    if name == "bn":
        layer = nn.BatchNorm1d(8, momentum=0.3)
        with torch.no_grad():
            layer.weight.copy_(1 + 0.5 * torch.randn(8))
            layer.bias.copy_(torch.randn(8))
        return nn.Sequential(layer)
    return build_models(load_config(None, G_WIDTHS).model)[0]


def case_data(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(global input, loss weight) per step; float32 values, so both sides see the same inputs."""
    g = torch.Generator().manual_seed(99)
    n = sum(CASES[name])
    if name == "bn":
        width, out_width = 8, 8
        shift = torch.rand(width, generator=g) * 6 - 3
    else:
        cfg = load_config(None, G_WIDTHS).model
        width, out_width, shift = cfg.latent_dim, cfg.image_size, torch.zeros(cfg.latent_dim)
    return [
        (torch.randn(n, width, generator=g) + shift, torch.randn(n, out_width, generator=g))
        for _ in range(STEPS)
    ]


def play(model: nn.Module, data, rows: slice, device: torch.device) -> dict[str, Any]:
    """Train-mode forward/backward of every step on ``rows`` (no parameter update)."""
    steps = []
    for x_full, weight_full in data:
        x = x_full[rows].to(device=device, dtype=next(model.parameters()).dtype).requires_grad_()
        out = model(x)
        (out * weight_full[rows].to(out)).sum().backward()
        steps.append(
            {
                "out": out.detach().cpu(),
                "x_grad": x.grad.cpu(),
                "param_grads": {n: p.grad.detach().cpu() for n, p in model.named_parameters()},
            }
        )
        model.zero_grad(set_to_none=True)
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers()}
    return {"steps": steps, "buffers": buffers}


def rank_rows(name: str, rank: int) -> slice:
    counts = CASES[name]
    return slice(sum(counts[:rank]), sum(counts[: rank + 1]))


def play_rank(rank: int, world_size: int, backend: str, device_type: str) -> dict[str, Any]:
    """One rank: convert each case with ``sync_batchnorm`` and play it on this rank's rows."""
    if backend == "nccl":
        # One GPU per rank, or every rank on cuda:0 under NCCL_MULTI_RANK_GPU_ENABLE=1.
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=RANK_TIMEOUT_S),
            device_id=device,
        )
    elif device_type == "cuda":  # gloo, every rank on the one GPU
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    else:  # gloo on the CPU: only to try this check's logic without a GPU
        device = torch.device("cpu")
    # G's Linear layers in true float32 (no TF32), whatever the environment asks: the reference
    # is float64 and the tolerance 1e-4.
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    results: dict[str, Any] = {"backend": dist.get_backend(), "device": str(device)}
    for name in CASES:
        model = build_case(name)
        data = case_data(name)
        model, choice = sync_batchnorm(model, device, world_size)
        model.to(device).train()
        norms = [type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)]
        results[name] = {
            "choice": choice,
            "norms": norms,
            **play(model, data, rank_rows(name, rank), device),
        }
    return results


def reference(name: str) -> dict[str, Any]:
    """Plain ``nn.BatchNorm1d`` on the whole batch, one process, float64 on the CPU."""
    model = build_case(name).double().train()
    return play(model, case_data(name), slice(None), torch.device("cpu"))


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        got.double(), want.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{what}: {m}"
    )


def compare(ranks: list[dict[str, Any]], expected_choice: str) -> str:
    worst = 0.0
    for name in CASES:
        want = reference(name)
        got = [r[name] for r in ranks]
        for r in got:
            assert r["choice"] == expected_choice, f"{name}: sync_batchnorm chose {r['choice']}"
            layer = expected_choice.rsplit(".", 1)[-1]
            assert r["norms"] and set(r["norms"]) == {layer}, f"{name}: layers {r['norms']}"
        for step, want_step in enumerate(want["steps"]):
            where = f"{name} step {step}"
            out = torch.cat([r["steps"][step]["out"] for r in got])
            x_grad = torch.cat([r["steps"][step]["x_grad"] for r in got])
            close(out, want_step["out"], f"{where} forward output")
            close(x_grad, want_step["x_grad"], f"{where} input gradient")
            worst = max(worst, (out.double() - want_step["out"]).abs().max().item())
            worst = max(worst, (x_grad.double() - want_step["x_grad"]).abs().max().item())
            for param, grad in want_step["param_grads"].items():
                summed = sum(r["steps"][step]["param_grads"][param] for r in got)
                close(summed, grad, f"{where} gradient of {param} (summed over ranks)")
        for buffer, value in want["buffers"].items():
            for rank, r in enumerate(got):
                close(r["buffers"][buffer], value, f"{name} {buffer} on rank {rank}")
    return f"max |diff| {worst:.1e} vs float64 BatchNorm1d"


def _run(
    backend: str,
    device_type: str,
    expected_choice: str = "torch.nn.SyncBatchNorm",
    env: dict[str, str] | None = None,
) -> str:
    ranks = run_on_ranks(
        play_rank,
        WORLD_SIZE,
        backend,
        device_type,
        timeout=RANK_TIMEOUT_S,
        init_process_group=backend == "gloo",
        env=env,
    )
    devices = ", ".join(sorted({r["device"] for r in ranks}))
    cases = ", ".join(f"{n} {a}+{b} rows" for n, (a, b) in CASES.items())
    return (
        f"{ranks[0]['backend']} on {devices}; {cases}, {STEPS} steps; "
        f"{compare(ranks, expected_choice)}"
    )


def check_nccl() -> str:
    require_cuda()
    gpus = torch.cuda.device_count()
    if gpus >= WORLD_SIZE:
        return _run("nccl", "cuda")
    nccl = torch.cuda.nccl.version()
    if os.environ.get("CHECK_GPU_NCCL_SHARED") == "1":
        if nccl < (2, 30, 0):
            raise SkipCheck(f"NCCL {nccl} predates NCCL_MULTI_RANK_GPU_ENABLE (2.30)")
        detail = _run("nccl", "cuda", env={"NCCL_MULTI_RANK_GPU_ENABLE": "1"})
        return f"{detail} (experimental NCCL_MULTI_RANK_GPU_ENABLE=1)"
    raise SkipCheck(
        f"{gpus} GPU: NCCL refuses 2 ranks on one device (sync-bn-shared-gpu covers SyncBatchNorm "
        f"over gloo); CHECK_GPU_NCCL_SHARED=1 tries NCCL {'.'.join(map(str, nccl))}'s "
        "experimental multi-rank-per-GPU mode"
    )


def check_gloo_shared_gpu() -> str:
    require_cuda()
    return _run("gloo", "cuda")
