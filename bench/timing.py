"""Time-bounded repeats of a step function: warm-up, then the median of several timed repeats.

    result = measure(step, images_per_step=64, device=torch.device("cpu"), plan=Plan())

The warm-up doubles the number of steps (1, 2, 4, ...) until one round lasts ``warmup_s``; that
round gives the step time, from which each repeat gets ``ceil(repeat_s / step time)`` steps.
``measure_interleaved`` times several step functions with their repeats taking turns.
Several processes stay in lockstep when ``agree`` maps each rank's round time to the same value
(an all-reduce of the maximum), so every rank runs the same number of steps.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Plan:
    """How long to warm up and how many repeats to time."""

    warmup_s: float = 1.0
    """The warm-up stops after a doubling round that lasted at least this long."""
    repeats: int = 7
    """Timed repeats; the reported throughput is their median."""
    repeat_s: float = 0.6
    """Target duration of one repeat (at least one step)."""
    first_steps: int = 2
    """Untimed steps before the warm-up rounds (allocation, autotuning, compilation)."""


@dataclass
class Timing:
    images_per_s: float
    """Median over repeats."""
    images_per_s_min: float
    images_per_s_max: float
    step_ms: float
    """Median step time."""
    steps_per_repeat: int
    repeats: int
    peak_rss_mb: float
    """Peak resident memory of this process during the timed repeats (since start where it cannot
    be reset); everything alive in the process counts, the other interleaved workloads too."""
    peak_cuda_mb: float | None
    """torch.cuda.max_memory_allocated during the measurement, on a CUDA device."""
    other_cores: float | None
    """Mean number of cores other processes kept busy during the measurement (Linux): a
    contended measurement shows well above 0 (in a multi-process run, the other ranks count)."""

    def to_dict(self) -> dict:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak-RSS high-water mark (Linux) and CUDA's peak; True when RSS could be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process), from /proc."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_interleaved(
    steps: dict[str, Callable[[], object]],
    images_per_step: int,
    device: torch.device,
    plan: Plan,
    agree: Callable[[float], float] = lambda seconds: seconds,
) -> dict[str, Timing]:
    """Throughput of each step function, each processing ``images_per_step`` images (across all
    ranks) per call. After each one's warm-up, the repeats take turns (A, B, C, A, B, C, ...) so
    that a slow spell of the machine hits all of them alike and their ratios stay fair."""

    def timed(step: Callable[[], object], count: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            step()
        synchronize(device)
        return agree(time.perf_counter() - start)

    per_repeat = {}
    for name, step in steps.items():
        for _ in range(plan.first_steps):
            step()
        n = 1
        while (seconds := timed(step, n)) < plan.warmup_s and n < 4096:
            n *= 2
        per_repeat[name] = max(1, math.ceil(plan.repeat_s / (seconds / n)))

    rates: dict[str, list[float]] = {name: [] for name in steps}
    rss = dict.fromkeys(steps, 0.0)
    cuda = dict.fromkeys(steps, 0.0)
    other_s = dict.fromkeys(steps, 0.0)
    wall_s = dict.fromkeys(steps, 0.0)
    for _ in range(plan.repeats):
        for name, step in steps.items():
            reset_peak_memory(device)
            ticks_before, started = _cpu_ticks(), time.perf_counter()
            rates[name].append(images_per_step * per_repeat[name] / timed(step, per_repeat[name]))
            ticks_after = _cpu_ticks()
            wall_s[name] += time.perf_counter() - started
            if ticks_before and ticks_after:
                busy, own = (after - before for after, before in zip(ticks_after, ticks_before))
                other_s[name] += max(0, busy - own) / os.sysconf("SC_CLK_TCK")
            rss[name] = max(rss[name], peak_rss_mb())
            if device.type == "cuda":
                cuda[name] = max(cuda[name], torch.cuda.max_memory_allocated(device) / 2**20)

    out = {}
    for name in steps:
        median = statistics.median(rates[name])
        out[name] = Timing(
            images_per_s=median,
            images_per_s_min=min(rates[name]),
            images_per_s_max=max(rates[name]),
            step_ms=1e3 * images_per_step / median,
            steps_per_repeat=per_repeat[name],
            repeats=plan.repeats,
            peak_rss_mb=rss[name],
            peak_cuda_mb=cuda[name] if device.type == "cuda" else None,
            other_cores=other_s[name] / wall_s[name] if _cpu_ticks() else None,
        )
    return out


def measure(
    step: Callable[[], object],
    images_per_step: int,
    device: torch.device,
    plan: Plan,
    agree: Callable[[float], float] = lambda seconds: seconds,
) -> Timing:
    """Throughput of one step function (see ``measure_interleaved``)."""
    return measure_interleaved({"step": step}, images_per_step, device, plan, agree)["step"]
