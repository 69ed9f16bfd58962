"""Building the distributed objects of a run: the Accelerator, G and D with their optimizers
(prepared, so DDP across ranks), the EMA generator. The trainer and ``make bench`` both build
through here, so the benchmark times the product's own objects.
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
)

from pipeline.config import RunConfig
from pipeline.distributed import cpu_threads_per_process, sync_batchnorm
from pipeline.ema import EMA
from pipeline.errors import ConfigError
from pipeline.models import build_models
from pipeline.step import GANState, NonFiniteRecord, penalty_params

DDP_BUCKET_CAP_MB = 64
"""Larger than either network's gradients at the default widths (G 5.9 MB, D 5.3 MB)."""


def make_accelerator(cfg: RunConfig, log_with: list[str] | None = None) -> Accelerator:
    """The one Accelerator of a run: gloo on CPU (also for several processes), NCCL on GPUs."""
    from accelerate.utils import parse_flag_from_env

    cpu = not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU")
    if cpu and cfg.train.mixed_precision == "fp16":
        # Accelerate has no fp16 autocast or loss scaler on the CPU: it would train in fp32.
        raise ConfigError(
            "config error: train.mixed_precision=fp16 needs a GPU (Accelerate has no fp16 on the "
            "CPU); use train.mixed_precision=bf16 on the CPU"
        )
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not cpu and several and parse_flag_from_env("TORCH_NCCL_NAN_CHECK"):
        # A non-finite loss reaches every rank as NaN in the gradient all-reduce (step.py):
        # NCCL's NaN check would abort the job there instead of skipping or stopping cleanly.
        raise ConfigError(
            "config error: TORCH_NCCL_NAN_CHECK=1 aborts the job on the NaN gradients that carry "
            "a non-finite loss to every rank (train.on_nonfinite); unset TORCH_NCCL_NAN_CHECK"
        )
    threads = cpu_threads_per_process(cfg.train.cpu_threads)
    if cpu:
        # Processes x threads = cores, whatever OMP_NUM_THREADS said; set before the Accelerator
        # too, which otherwise picks its own count (and warns) for several CPU processes.
        os.environ["OMP_NUM_THREADS"] = str(threads)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=log_with or None,
        project_dir=cfg.output_dir,
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                # G's synchronized BN keeps buffers equal: no broadcast of them every step.
                broadcast_buffers=False,
                gradient_as_bucket_view=True,
                # One gradient all-reduce per network and phase (G and D are a few MB): DDP's
                # default 1 MB first bucket adds a second, latency-bound one to each.
                bucket_cap_mb=DDP_BUCKET_CAP_MB,
                comm_hook=DDPCommunicationHookType(
                    "no" if cfg.train.grad_compression == "none" else cfg.train.grad_compression
                ),
            ),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s)),
        ],
    )
    if cpu:
        torch.set_num_threads(threads)
    return accelerator


def _adam(
    params, lr: float, betas: tuple[float, ...], device: torch.device
) -> torch.optim.Optimizer:
    """Fused Adam (one kernel for all parameters; measured 4-9% faster per step on a 2-core CPU
    than foreach), falling back to foreach where this build or device has no fused kernel."""
    params = list(params)
    fused = device.type in ("cpu", "cuda")
    try:
        return torch.optim.Adam(
            params, lr=lr, betas=betas, fused=fused, foreach=None if fused else True
        )
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def build_gan(cfg: RunConfig, accelerator: Accelerator) -> tuple[GANState, EMA | None, str]:
    """G, D, their optimizers (prepared: DDP across ranks) and the EMA generator; returns them
    with the name of the BatchNorm synchronization used."""
    # Identical initial weights on every rank: one global seed before the models are built.
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model)
    ema = EMA(G, cfg.model.ema_decay, cfg.model.ema_bn_batches) if cfg.model.ema_decay > 0 else None
    if ema is not None:
        ema.module.to(accelerator.device)
    G, bn_sync = sync_batchnorm(
        G, accelerator.device, accelerator.num_processes, enabled=cfg.model.g_batchnorm_sync
    )
    betas = tuple(cfg.train.betas)
    opt_G = _adam(G.parameters(), cfg.train.g_lr, betas, accelerator.device)
    opt_D = _adam(D.parameters(), cfg.train.d_lr, betas, accelerator.device)
    with warnings.catch_warnings():
        # torch >= 2.12 renamed broadcast_buffers; Accelerate still passes it, and False keeps
        # exactly the behaviour wanted here (no buffer broadcast, at init or in forward).
        warnings.filterwarnings(
            "ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning
        )
        G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
    if cfg.train.compile:
        G, D = (torch.compile(net, mode=cfg.train.compile_mode) for net in (G, D))
    penalized = penalty_params(
        accelerator.unwrap_model(D, keep_torch_compile=False), cfg.train.penalty_include_biases
    )
    # fp16 on a GPU: Accelerate's GradScaler, driven by the step itself (step.py), so both
    # optimizers share it and the scale moves once per step.
    state = GANState(
        G,
        D,
        opt_G,
        opt_D,
        penalized,
        scaler=accelerator.scaler,
        record=NonFiniteRecord.empty(accelerator.device),
    )
    return state, ema, bn_sync
