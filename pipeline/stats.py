"""Metrics reduced across ranks, each by the reduction it declares where it is recorded
(as StyleGAN2-ADA's ``training_stats``): losses are means over replicas, throughput is a global
sum, peak memory is the max over ranks.

Per-step values are summed on the device between log intervals (no host sync in the step);
``reduce_all_ranks`` then moves everything across ranks in one collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.distributed import is_distributed

REDUCTIONS = ("mean", "sum", "max")


@dataclass(frozen=True)
class Stat:
    """One rank's value of a metric and how ranks combine it."""

    value: float | torch.Tensor
    reduce: str

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduce!r}")


def reduce_all_ranks(stats: dict[str, Stat], device: torch.device | str) -> dict[str, float]:
    """Collective: every rank passes the same names; every rank gets each metric reduced by its
    declared reduction, from one all-gather of one small float64 vector."""
    names = list(stats)
    local = torch.stack(
        [
            torch.as_tensor(stats[n].value, dtype=torch.float64, device=device).reshape(())
            for n in names
        ]
    )
    if is_distributed():
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        table = torch.stack(gathered)
    else:
        table = local.unsqueeze(0)
    reduced = {
        "mean": table.mean(0),
        "sum": table.sum(0),
        "max": table.max(0).values,
    }
    values = {r: v.tolist() for r, v in reduced.items()}
    return {n: values[stats[n].reduce][i] for i, n in enumerate(names)}


class StepStats:
    """Per-step statistics (``names`` order) summed on the device over a log interval.

    The interval in progress (``sums``, ``steps``) is part of a checkpoint (``state`` /
    ``load_state``), so a resumed run logs the same interval means as an uninterrupted one;
    ``timed_steps`` counts only this process's steps since the last log, for throughput.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device | str) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), device=device)
        self.steps = 0
        self.timed_steps = 0

    def add(self, values: torch.Tensor) -> None:
        # A non-finite value was already acted on (skip or stop); keep the interval's sums usable.
        self.sums += torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        self.steps += 1
        self.timed_steps += 1

    def as_stats(self) -> dict[str, Stat]:
        """This interval's sums, each a per-replica value averaged over ranks."""
        return {n: Stat(self.sums[i], "mean") for i, n in enumerate(self.names)}

    def reset(self, keep_interval: bool = False) -> None:
        """Start a new interval; with ``keep_interval`` (a row logged mid-interval, at the last
        step or a stop) only the timing restarts and the interval goes on."""
        self.timed_steps = 0
        if not keep_interval:
            self.sums.zero_()
            self.steps = 0

    def state(self) -> dict[str, Any]:
        """This rank's interval in progress, as JSON (float32 sums round-trip exactly)."""
        return {"names": list(self.names), "steps": self.steps, "sums": self.sums.tolist()}

    def load_state(self, state: dict[str, Any]) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(f"statistics {state['names']} differ from {list(self.names)}")
        sums = torch.tensor(state["sums"], dtype=self.sums.dtype)
        self.sums.copy_(sums.to(self.sums.device))
        self.steps = int(state["steps"])
        self.timed_steps = 0
