"""Everything that knows about more than one process: synchronized BatchNorm, per-rank seeds,
cross-rank reductions and the replica consistency check.

Model code never imports this module; ``sync_batchnorm`` converts a plain model before
``accelerator.prepare``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import USER_ERRORS, UserError, disk_error, is_disk_error
from pipeline.io import derive_seed

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_rank() -> bool:
    """Global rank 0 (or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def _comm_device() -> torch.device:
    """Where the process group's tensors must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Objects cross ranks as JSON bytes in a uint8 tensor: Accelerate's broadcast_object_list and
# gather_object pickle, and nothing this project reads is ever unpickled, on disk or on the wire.


def broadcast_json_all_ranks(obj: Any) -> Any:
    """Collective: every rank returns rank 0's ``obj`` (JSON-able); other ranks' ``obj`` is ignored."""
    if not is_distributed():
        return obj
    device = _comm_device()
    payload = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().numpy().tobytes()).decode())


def broadcast_module_all_ranks(module: nn.Module) -> None:
    """Collective: rank 0's parameters and buffers, copied into ``module`` on every rank."""
    if not is_distributed():
        return
    device = _comm_device()
    with torch.no_grad():
        for tensor in module.state_dict().values():
            buffer = tensor.detach().to(device).contiguous()
            dist.broadcast(buffer, src=0)
            tensor.copy_(buffer)


def gather_bytes_all_ranks(blob: bytes) -> list[bytes]:
    """Collective: every rank's ``blob``, in rank order, on every rank (two all-gathers)."""
    if not is_distributed():
        return [blob]
    device, world = _comm_device(), dist.get_world_size()
    length = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    if blob:
        padded[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return [bytes(t[:n].cpu().numpy().tobytes()) for t, n in zip(gathered, sizes)]


def _failure_report(exc: BaseException) -> dict[str, str]:
    """What other ranks learn of a failure: a user error by its type, anything else as a bug."""
    kind = type(exc).__name__ if isinstance(exc, UserError) else "RuntimeError"
    return {"type": kind, "message": str(exc) or type(exc).__name__}


def _raise_reported(report: dict[str, str], rank: int) -> None:
    """Raise, on a rank that did not fail, the error ``rank`` reported."""
    cls = USER_ERRORS.get(report["type"], RuntimeError)
    message = (
        report["message"] if cls is not RuntimeError else f"on rank {rank}: {report['message']}"
    )
    raise cls(message)


def agree_all_ranks(work: Callable[[], T] | None) -> T | None:
    """Collective: every rank given a ``work`` runs it; then the ranks agree on the outcome, so a
    failure on any rank is raised on every rank (rank by rank order: the first failure's type
    and message). Returns this rank's result (None where it had no work)."""
    result: T | None = None
    failure: dict[str, str] | None = None
    original: BaseException | None = None
    if work is not None:
        try:
            result = work()
        except Exception as exc:
            original, failure = exc, _failure_report(exc)
    outcomes = [json.loads(b) for b in gather_bytes_all_ranks(json.dumps(failure).encode())]
    if original is not None:
        raise original
    for rank, report in enumerate(outcomes):
        if report is not None:
            _raise_reported(report, rank)
    return result


def local_main_first_all_ranks(work: Callable[[], T]) -> T:
    """Collective: ``work`` (loading a dataset that may be downloaded) runs on global rank 0
    first, then on the first process of every other node, then everywhere else, each stage
    agreeing on its outcome before the next: a download happens once per filesystem, and a
    failure anywhere is raised on every rank instead of leaving a peer waiting."""
    rank = dist.get_rank() if is_distributed() else 0
    local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    stages = (rank == 0, local_main and rank != 0, not local_main)
    result: T | None = None
    for in_stage in stages:
        outcome = agree_all_ranks(work if in_stage else None)
        if in_stage:
            result = outcome
    return result  # type: ignore[return-value]


def run_on_main_all_ranks(work: Callable[[], T], share_result: bool = False) -> T | None:
    """Collective: rank 0 runs ``work``; its success or failure reaches every rank, and on a
    failure every rank raises (a user error as its own type, anything else as RuntimeError).

    Returns ``work()``'s result on rank 0, and elsewhere None, or with ``share_result`` the same
    (JSON-able) result. This is how main-only work (files, trackers, choosing a checkpoint)
    fails without leaving the other ranks waiting in a collective.
    """
    result: T | None = None
    failure: dict[str, str] | None = None
    original: BaseException | None = None
    if is_main_rank():
        try:
            result = work()
        except Exception as exc:
            # A full disk, a quota, a read-only or forbidden output_dir: the user's (status 4).
            original = (
                disk_error(exc, exc.filename or "a file of the run") if is_disk_error(exc) else exc
            )
            failure = _failure_report(original)
    outcome = broadcast_json_all_ranks(
        {"failure": failure, "result": result if share_result and failure is None else None}
    )
    if original is not None:
        raise original
    if outcome["failure"] is not None:
        _raise_reported(outcome["failure"], 0)
    return outcome["result"] if share_result else result


class _CrossReplicaBatchNorm(torch.autograd.Function):
    """BatchNorm over the union of every rank's rows, with one all-reduce in the forward and one
    in the backward, each of a few per-feature vectors.

    Forward: each rank computes its rows' count, mean and centred sum of squares (two-pass, so
    float32 stays accurate when |mean| >> std); one float64 all-reduce of (n_r, n_r m_r,
    M2_r + n_r m_r^2) gives the global mean and biased variance (Chan et al.'s combination).
    Backward: one all-reduce of (sum dy, sum dy * x_hat) gives the global terms of BatchNorm's
    input gradient; weight and bias gradients stay local sums, as DDP expects.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(dtype)
        n_local = xf.shape[0]
        c = xf.shape[1]
        if n_local > 0:
            local_mean = xf.mean(0)
            centred = xf - local_mean
            m2 = (centred * centred).sum(0)
        else:  # a rank may hold no rows of this batch
            local_mean = m2 = xf.new_zeros(c)
        mean_r, m2_r = local_mean.to(torch.float64), m2.to(torch.float64)
        stats = torch.cat(
            [
                mean_r.new_full((1,), float(n_local)),
                n_local * mean_r,
                m2_r + n_local * mean_r * mean_r,
            ]
        )
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        n = stats[0]
        mean64 = stats[1 : c + 1] / n
        var64 = (stats[c + 1 :] / n - mean64 * mean64).clamp_min(0.0)
        invstd = torch.rsqrt(var64 + eps).to(dtype)
        x_hat = (xf - mean64.to(dtype)) * invstd
        y = x_hat if weight is None else x_hat * weight.to(dtype) + bias.to(dtype)
        ctx.save_for_backward(x_hat, invstd, weight)
        ctx.n = n  # a tensor: reading it on the host would be a sync
        count = stats[:1]
        ctx.mark_non_differentiable(mean64, var64, count)
        return y.to(x.dtype), mean64, var64, count

    @staticmethod
    def backward(ctx, dy, _mean_grad, _var_grad, _count_grad):
        x_hat, invstd, weight = ctx.saved_tensors
        dyf = dy.to(x_hat.dtype)
        sum_dy = dyf.sum(0)
        sum_dy_xhat = (dyf * x_hat).sum(0)
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        g_dy, g_dy_xhat = total.chunk(2)
        scale = invstd if weight is None else invstd * weight.to(x_hat.dtype)
        dx = scale * (dyf - (g_dy + x_hat * g_dy_xhat) / ctx.n)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight, grad_bias = sum_dy_xhat.to(weight.dtype), sum_dy.to(weight.dtype)
        return dx.to(dy.dtype), grad_weight, grad_bias, None


class CrossReplicaBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch across all ranks.

    ``_CrossReplicaBatchNorm`` does one all-reduce forward and one backward, so ranks may hold
    different batch sizes. Forward, backward and the running-statistics update (unbiased
    variance, momentum) equal ``nn.BatchNorm1d`` on the concatenated batch. Used on gloo/CPU,
    where ``nn.SyncBatchNorm`` refuses to run; on one process it is plain BN.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        if x.dim() != 2:
            raise ValueError(
                f"CrossReplicaBatchNorm1d expects (N, C) input, got shape {tuple(x.shape)}"
            )
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        y, mean, var, count = _CrossReplicaBatchNorm.apply(x, weight, bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                unbiased = var * (count / (count - 1.0).clamp_min(1.0))  # no host read
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y


def _convert(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm1d) and type(module) is not cls:
        out = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        state = module.state_dict()
        reference = next((t for t in state.values() if t.is_floating_point()), None)
        if reference is not None:  # keep the layer's device and dtype
            out.to(device=reference.device, dtype=reference.dtype)
        out.load_state_dict(state)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, cls))
    return out


PER_REPLICA_BN = "off (per-replica BatchNorm, running statistics averaged before use)"


def sync_batchnorm(
    model: nn.Module, device: torch.device, world_size: int, enabled: bool = True
) -> tuple[nn.Module, str]:
    """The one place that decides how G's BatchNorm is synchronized.

    Returns the converted model and the name of the choice: ``none`` on one process,
    ``torch.nn.SyncBatchNorm`` on CUDA, ``CrossReplicaBatchNorm1d`` elsewhere (gloo/CPU), or
    with ``enabled=False`` the model unchanged and ``PER_REPLICA_BN`` (each replica's own batch
    statistics; see ``average_buffers_all_ranks``).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if world_size <= 1 or not norms:
        return model, "none"
    if not enabled:
        return model, PER_REPLICA_BN
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model), "torch.nn.SyncBatchNorm"
    other = [type(m).__name__ for m in norms if not isinstance(m, nn.BatchNorm1d)]
    if other:
        raise NotImplementedError(
            f"cross-replica BatchNorm off the GPU supports BatchNorm1d only, found {other[0]}"
        )
    return _convert(model, CrossReplicaBatchNorm1d), "CrossReplicaBatchNorm1d"


def average_buffers_all_ranks(module: nn.Module) -> None:
    """Collective: every floating-point buffer (BatchNorm running statistics) replaced by its
    mean over ranks. Per-replica BatchNorm leaves each rank its own running statistics; the
    model that is sampled, scored and saved is then the same on every rank (and passes
    ``check_replicas_consistent``). Identity on one process."""
    if not is_distributed():
        return
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                total = buf.to(_comm_device(), torch.float64)
                dist.all_reduce(total, op=dist.ReduceOp.SUM)
                buf.copy_(total / dist.get_world_size())


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s own streams, re-derivable at any ``step`` (a resume on another
    world size); ``io.derive_seed`` makes it collide with no other seed, rank or purpose."""
    return derive_seed(seed, "rank-streams", step, rank)


def seed_rank_streams(seed: int, rank: int, step: int = 0) -> int:
    """Give this rank its own torch (CPU and CUDA), Python and NumPy streams; returns the seed."""
    s = rank_seed(seed, rank, step)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return s


def cpu_threads_per_process(requested: int) -> int:
    """Threads so that local processes x threads = cores, whatever OMP_NUM_THREADS says
    (oversubscribed gloo ranks run 3-4x slower)."""
    if requested > 0:
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, non-differentiable); identity on one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Max over ranks (in place, non-differentiable); identity on one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Min over ranks (in place, non-differentiable); identity on one process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def tensor_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """An exact int64 checksum of a tensor's bits: any differing element changes it (almost surely)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype.is_floating_point:
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()]
        bits = flat.view(width).to(torch.int64)
    else:
        bits = flat.to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521 + 1
    return (bits * weights).sum()


def check_replicas_consistent(named_tensors: dict[str, torch.Tensor]) -> None:
    """Raise RuntimeError naming the first tensor that differs between ranks.

    One all-gather of one int64 checksum per tensor (parameters and buffers, BN running
    statistics included), so it is cheap enough to run before every checkpoint.
    """
    if not is_distributed():
        return
    names = sorted(named_tensors)
    if not names:
        return
    local = torch.stack([tensor_fingerprint(named_tensors[n]) for n in names])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)
    differs = (stacked != stacked[0]).any(0)
    if bool(differs.any()):
        bad = names[int(differs.nonzero()[0])]
        raise RuntimeError(
            f"replica divergence: tensor '{bad}' differs between ranks; the ranks are no longer "
            "training the same model (check for rank-dependent code or non-deterministic kernels)"
        )
