"""Benchmark of the trainer step against a tutorial-style loop and the matmul-only limit.

    make bench                                     # everything: throughput, then scaling
    python bench/bench.py --only throughput        # trainer vs plain loop vs matmul limit,
                                                   # batch curve, width curve
    python bench/bench.py --only scaling           # 1 -> 2 processes (trainer vs plain DDP
                                                   # peer)
    python bench/bench.py --only profile           # where the 2-process step's time goes
    python bench/bench.py --quick                  # a smoke test: tiny repeat counts
    python bench/bench.py --device cuda            # on a GPU, also: steps/s and MFU for each
                                                   # torch.compile mode x fp32/bf16 x batch
                                                   # 64..16384 (--only device for that alone)
    python bench/bench.py --device cuda --precision bf16 --compile
    BENCH_JSON=runs/bench-cpu.json make bench      # where the JSON goes (default bench.json)

The trainer step is the product's own loop body (``pipeline.loop.TrainLoop.step_all_ranks``);
the workloads are in bench/workloads.py, the 2-process figures (the trainer and its plain-DDP
peer, interleaved) come from bench/scaling_worker.py run under ``accelerate launch``, every table
is printed by bench/report.py. The method and the FLOP count are in docs/performance.md. A
benchmark, never a test: targets print PASS/MISS and the exit status does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root must win over bench/ itself
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import profile_worker, scaling_worker
from bench.flops import (
    plain_flops_per_image,
    plain_step_matmuls,
    step_flops,
    trainer_flops_per_image,
    trainer_step_matmuls,
)
from bench.report import Column, check_targets, format_table, print0
from bench.timing import Plan, Timing, measure_interleaved
from bench.workloads import Step, bench_config, limit_step_for, plain_step, trainer_step
from pipeline.config import RunConfig
from pipeline.data import load_dataset
from pipeline.io import atomic_write_text
from pipeline.models import linear_shapes

THROUGHPUT_BATCHES = (64, 256, 1024)
SCALING_BATCHES = (64, 256)
SCALING_ROUNDS = 2
CURVE_BATCHES = (64, 128, 256, 512, 1024, 2048, 4096)
WIDTH_MULTIPLIERS = (1, 2)
WIDTH_BATCHES = (64, 256)
CONTENDED_CORES = 0.15  # other processes' mean CPU use above which a measurement is flagged
QUICK_PLAN = Plan(warmup_s=0.05, repeats=2, repeat_s=0.05, first_steps=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only", choices=("throughput", "scaling", "profile", "device", "all"), default="all"
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak dense TFLOP/s for MFU (default: a table of known GPUs)",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny repeat counts and fewer sizes (smoke test)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda when available, else cpu",
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op CPU threads; 0: all cores")
    p.add_argument(
        "--precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="train.mixed_precision of the trainer (autocast in the plain loop)",
    )
    p.add_argument("--compile", action="store_true", help="train.compile=true for the trainer")
    return p.parse_args(argv)


def progress(message: str) -> None:
    """Where a long run stands, on stderr: the tables on stdout come whole, once measured."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Session:
    """One process's measurements, cached by (what, batch, width) so sections can share them."""

    def __init__(self, args: argparse.Namespace) -> None:
        from pipeline.build import make_accelerator

        if args.device == "cpu":
            os.environ["ACCELERATE_USE_CPU"] = "1"
        elif args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
        self.args = args
        self.plan = QUICK_PLAN if args.quick else Plan()
        self.accelerator = make_accelerator(self.config(64))
        self.device = self.accelerator.device
        self.images = load_dataset(self.config(64).data, "train").images.to(self.device)
        self.cache: dict[tuple[str, int, int], Timing] = {}

    def config(self, batch: int, width: int = 1) -> RunConfig:
        a = self.args
        return bench_config(batch, a.precision, a.compile, a.threads, width)

    def step(self, what: str, cfg: RunConfig) -> Step:
        if what == "trainer":
            return trainer_step(cfg, self.accelerator, self.images)[0]
        if what == "plain":
            return plain_step(cfg, self.device, self.images)
        return limit_step_for(cfg, self.device)

    def times(self, batch: int, whats: tuple[str, ...], width: int = 1) -> list[Timing]:
        """Timings of ``whats`` (trainer, plain, limit) at one size; missing ones measured together."""
        missing = [w for w in whats if (w, batch, width) not in self.cache]
        if missing:
            progress(f"timing {', '.join(missing)} at batch {batch}, widths x{width}")
            cfg = self.config(batch, width)
            steps = {what: self.step(what, cfg) for what in missing}
            timings = measure_interleaved(steps, batch, self.device, self.plan)
            self.cache.update({(what, batch, width): t for what, t in timings.items()})
            del steps
            self.accelerator.free_memory()  # drop the prepared models and optimizers
        return [self.cache[(what, batch, width)] for what in whats]


def flop_check(s: Session, batch: int = 8) -> dict:
    """Count the matmul FLOPs of one real step with torch's FlopCounterMode, against our list."""
    from torch.utils.flop_counter import FlopCounterMode

    small = s.config(batch)
    shapes = linear_shapes(small.model)
    out = {}
    for name, build, listed, closed_form in (
        (
            "trainer",
            lambda: trainer_step(small, s.accelerator, s.images)[0],
            trainer_step_matmuls(shapes, batch),
            trainer_flops_per_image(shapes) * batch,
        ),
        (
            "plain",
            lambda: plain_step(small, s.device, s.images),
            plain_step_matmuls(shapes, batch),
            plain_flops_per_image(shapes) * batch,
        ),
    ):
        step = build()
        with FlopCounterMode(display=False) as counter:
            step()
        out[name] = {
            "counted_by_torch": int(counter.get_total_flops()),
            "listed": step_flops(listed),
            "closed_form": closed_form,
        }
        s.accelerator.free_memory()
    print0(f"\n== FLOP check: one real step at batch {batch} ==")
    columns = [
        Column("loop"),
        Column("torch FlopCounterMode", ","),
        Column("listed matmuls", ","),
        Column("closed form", ","),
        Column("agree"),
    ]
    rows = [
        (name, c["counted_by_torch"], c["listed"], c["closed_form"], _agree(c))
        for name, c in out.items()
    ]
    print0(format_table(columns, rows))
    return out


def _agree(c: dict) -> str:
    return "yes" if c["counted_by_torch"] == c["listed"] == c["closed_form"] else "NO, DIFFERS"


# --- sections -----------------------------------------------------------------------------------


def throughput_section(s: Session, batches: tuple[int, ...]) -> list[dict]:
    shapes = linear_shapes(s.config(64).model)
    t_fpi, p_fpi = trainer_flops_per_image(shapes), plain_flops_per_image(shapes)
    cuda = s.device.type == "cuda"
    print0("\n== throughput: trainer step vs tutorial-style plain loop vs matmul-only limit ==")
    print0(
        f"model FLOPs per image: trainer step {t_fpi / 1e6:.3f} MFLOP, plain loop "
        f"{p_fpi / 1e6:.3f} MFLOP (matmuls only; formula in docs/performance.md)"
    )
    rows, table = [], []
    for b in batches:
        tr, pl, li = s.times(b, ("trainer", "plain", "limit"))
        row = {
            "batch": b,
            "trainer": {**tr.to_dict(), "gflop_per_s": tr.images_per_s * t_fpi / 1e9},
            "plain": {**pl.to_dict(), "gflop_per_s": pl.images_per_s * p_fpi / 1e9},
            "limit": {**li.to_dict(), "gflop_per_s": li.images_per_s * t_fpi / 1e9},
            "trainer_over_plain": tr.images_per_s / pl.images_per_s,
            "trainer_over_limit": tr.images_per_s / li.images_per_s,
        }
        rows.append(row)
        line = [b, *(t.images_per_s for t in (tr, pl, li))]
        line += [row[w]["gflop_per_s"] for w in ("trainer", "plain", "limit")]
        line += [row["trainer_over_plain"], row["trainer_over_limit"]]
        line += [max(tr.peak_rss_mb, pl.peak_rss_mb, li.peak_rss_mb)]
        table.append(line + ([tr.peak_cuda_mb, pl.peak_cuda_mb, li.peak_cuda_mb] if cuda else []))
    columns = [
        Column("batch"),
        *(Column(f"{w} img/s", ".0f") for w in ("trainer", "plain", "limit")),
        *(Column(f"{w} GF/s", ".1f") for w in ("trainer", "plain", "limit")),
        Column("tr/plain", ".2f"),
        Column("tr/limit", ".2f"),
        Column("peak RSS MB", ".0f"),
    ]
    if cuda:
        columns += [Column(f"{w} CUDA MB", ".0f") for w in ("trainer", "plain", "limit")]
    print0(format_table(columns, table))
    print0(
        "(img/s: median of repeats; GF/s: the FLOPs each one executes, per second; peak RSS: "
        "this process while the three of that batch ran, all three alive"
        + ("; CUDA MB: torch.cuda.max_memory_allocated" if cuda else "")
        + ")"
    )
    return rows


def curve_section(
    s: Session, batches: tuple[int, ...], widths: tuple[int, ...], width_batches: tuple[int, ...]
) -> dict[str, list[dict]]:
    print0(f"\n== cost curve of the trainer ({torch.get_num_threads()} threads, {s.device}) ==")
    columns = [
        Column("width", align=">"),
        Column("batch"),
        Column("MFLOP/img", ".2f"),
        Column("trainer img/s", ".0f"),
        Column("step ms", ".1f"),
        Column("trainer GF/s", ".1f"),
        Column("limit img/s", ".0f"),
        Column("tr/limit", ".2f"),
    ]
    out: dict[str, list[dict]] = {"batch": [], "width": []}
    points = {
        "batch": [(1, b) for b in batches],
        "width": [(w, b) for w in widths for b in width_batches],
    }
    for curve, title in (("batch", "as the batch grows"), ("width", "as the widths grow")):
        table = []
        for width, b in points[curve]:
            fpi = trainer_flops_per_image(linear_shapes(s.config(b, width).model))
            tr, li = s.times(b, ("trainer", "limit"), width)
            point = {
                "width_multiplier": width,
                "batch": b,
                "flop_per_image": fpi,
                "trainer": {**tr.to_dict(), "gflop_per_s": tr.images_per_s * fpi / 1e9},
                "limit": {**li.to_dict(), "gflop_per_s": li.images_per_s * fpi / 1e9},
                "trainer_over_limit": tr.images_per_s / li.images_per_s,
            }
            out[curve].append(point)
            table.append(
                [
                    f"x{width}",
                    b,
                    fpi / 1e6,
                    tr.images_per_s,
                    tr.step_ms,
                    point["trainer"]["gflop_per_s"],
                    li.images_per_s,
                    point["trainer_over_limit"],
                ]
            )
        print0(f"-- {title} --")
        print0(format_table(columns, table))
    return out


def _bf16_rate(two_process_launches: list[dict], index: int) -> float:
    """Mean images/s of the 2-process trainer with bf16 gradient all-reduces (lossy; off by
    default) over the launches; NaN where a launch did not time it."""
    rates = [
        run["results"][index].get("bf16_allreduce", {}).get("images_per_s", float("nan"))
        for run in two_process_launches
    ]
    return sum(rates) / len(rates)


def weak_scaling_section(plan: Plan, batches: tuple[int, ...], rounds: int) -> dict:
    """Launches of 1 and 2 processes take turns ``rounds`` times; each figure is the mean over
    the rounds of the launches' medians, so a slow spell does not land on one side only. Inside
    each launch the trainer, its plain-DDP peer and the limit take turns too."""
    print0(
        "\n== weak scaling on CPU: 1 -> 2 processes (gloo), 1 thread each, same per-process batch: "
        "trainer vs plain DDP peer =="
    )
    launches: dict[int, list[dict]] = {1: [], 2: []}
    for n in range(rounds):
        for processes in (1, 2):
            progress(f"scaling round {n + 1}/{rounds}: {processes} process(es)")
            launches[processes].append(scaling_worker.launch(processes, batches, plan))

    def mean_rate(processes: int, key: str, index: int) -> float:
        runs = launches[processes]
        return sum(run[key][index]["images_per_s"] for run in runs) / len(runs)

    def per_round(key: str, index: int) -> list[float]:
        return [
            two[key][index]["images_per_s"] / (2 * one[key][index]["images_per_s"])
            for one, two in zip(launches[1], launches[2])
        ]

    def runs(processes: int, key: str, index: int) -> list[dict]:
        return [run[key][index] for run in launches[processes]]

    rows, table = [], []
    for index, batch in enumerate(batches):
        t1, t2 = mean_rate(1, "results", index), mean_rate(2, "results", index)
        p1, p2 = mean_rate(1, "peer_results", index), mean_rate(2, "peer_results", index)
        l1, l2 = mean_rate(1, "limit_results", index), mean_rate(2, "limit_results", index)
        row = {
            "batch": batch,
            "one_process_images_per_s": t1,
            "two_processes_images_per_s": t2,
            "efficiency": t2 / (2 * t1),
            "efficiency_per_round": per_round("results", index),
            "peer_one_process_images_per_s": p1,
            "peer_two_processes_images_per_s": p2,
            "peer_efficiency": p2 / (2 * p1),
            "peer_efficiency_per_round": per_round("peer_results", index),
            "efficiency_over_peer": (t2 / (2 * t1)) / (p2 / (2 * p1)),
            "bf16_allreduce_efficiency": _bf16_rate(launches[2], index) / (2 * t1),
            "trainer_over_peer_one_process": t1 / p1,
            "trainer_over_peer_two_processes": t2 / p2,
            "limit_one_process_images_per_s": l1,
            "limit_two_processes_images_per_s": l2,
            "hardware_ceiling": l2 / (2 * l1),
            "one_process": runs(1, "results", index),
            "two_processes": runs(2, "results", index),
            "peer_one_process": runs(1, "peer_results", index),
            "peer_two_processes": runs(2, "peer_results", index),
            "limit_one_process": runs(1, "limit_results", index),
            "limit_two_processes": runs(2, "limit_results", index),
        }
        rows.append(row)
        rounds_text = " / ".join(
            ", ".join(f"{e:.0%}" for e in row[key])
            for key in ("efficiency_per_round", "peer_efficiency_per_round")
        )
        table.append(
            [
                batch,
                t1,
                t2,
                row["efficiency"],
                p1,
                p2,
                row["peer_efficiency"],
                row["hardware_ceiling"],
                row["bf16_allreduce_efficiency"],
                rounds_text,
            ]
        )
    columns = [
        Column("batch/proc"),
        Column("trainer 1p", ".0f"),
        Column("trainer 2p", ".0f"),
        Column("trainer eff", ".1%"),
        Column("peer 1p", ".0f"),
        Column("peer 2p", ".0f"),
        Column("peer eff", ".1%"),
        Column("ceiling", ".1%"),
        Column("bf16 grads eff", ".1%"),
        Column("per round (trainer / peer)"),
    ]
    print0(format_table(columns, table))
    two = launches[2][-1]
    print0(
        "(1p, 2p: images/s of all processes together; efficiency = images/s of 2 processes / "
        "(2 x images/s of 1 process); trainer: the "
        "trainer step; peer: the same GAN as a plain DDP loop (DDP-wrapped G and D, BatchNorm "
        "not synchronized, DistributedSampler DataLoader, tutorial step); ceiling = the same "
        "ratio for the trainer step's matmuls alone, in 2 processes that never communicate: what "
        "this machine allows; bf16 grads eff: the trainer with train.grad_compression=bf16 "
        "(lossy, off by default) over the 1-process trainer; "
        f"{rounds} round(s) of launches, 1 and 2 in turn)"
    )
    peer = two["peer_results"][0]
    print0(
        f"(2 processes: trainer BatchNorm {two['results'][0]['batchnorm_sync']}; peer "
        f"{peer['wrapper']} with {peer['batchnorm']}; backend {two['backend']}; "
        f"launched as: {two['command']})"
    )
    return {
        "command_2_processes": two["command"],
        "command_1_process": launches[1][-1]["command"],
        "threads_per_process": two["threads_per_process"],
        "backend": two["backend"],
        "peer": "bench.workloads.ddp_peer_step",
        "rounds": rounds,
        "rows": rows,
    }


def profile_section(plan: Plan, batches: tuple[int, ...]) -> dict:
    """Where the 2-process step's time goes (bench/profile_worker.py): the trainer step against
    itself without BN collectives, without DDP's all-reduces and without both, on 1 and 2
    processes, and the profiler's operator time and the threads' CPU time of the full step."""
    print0(
        "\n== profile of the distributed step: 1 and 2 processes (gloo), 1 thread each, ms per "
        "step =="
    )
    launches = {}
    for processes in (1, 2):
        progress(f"profile: {processes} process(es)")
        launches[processes] = profile_worker.launch(processes, batches, plan)
    rows, table = [], []
    for index, batch in enumerate(batches):
        one = launches[1]["results"][index]
        two = launches[2]["results"][index]
        t1, t2 = one["step_ms"], two["step_ms"]
        p1, p2 = one["profile"], two["profile"]
        row = {
            "batch": batch,
            "one_process": one,
            "two_processes": two,
            "added_by_distribution_ms": t2["full"] - t1["full"],
            "bn_collectives_ms": t2["full"] - t2["no_bn_sync"],
            "ddp_all_reduce_ms": t2["full"] - t2["no_ddp"],
            "sharing_the_cores_ms": t2["local"] - t1["full"],
            "operator_ms_1p": p1["operator_ms_per_step"],
            "operator_ms_2p": p2["operator_ms_per_step"],
            "other_threads_cpu_ms_2p": p2["other_threads_cpu_ms_per_step"],
            "switches_per_step_2p": p2["involuntary_switches_per_step"],
        }
        rows.append(row)
        table.append(
            [
                batch,
                t1["full"],
                t2["full"],
                row["added_by_distribution_ms"],
                row["bn_collectives_ms"],
                row["ddp_all_reduce_ms"],
                row["sharing_the_cores_ms"],
                row["operator_ms_1p"],
                row["operator_ms_2p"],
                row["other_threads_cpu_ms_2p"],
                row["switches_per_step_2p"],
            ]
        )
    columns = [
        Column("batch/proc"),
        Column("1p step", ".1f"),
        Column("2p step", ".1f"),
        Column("added", ".1f"),
        Column("BN colls", ".1f"),
        Column("DDP", ".1f"),
        Column("shared cores", ".1f"),
        Column("ops 1p", ".1f"),
        Column("ops 2p", ".1f"),
        Column("other thr CPU 2p", ".1f"),
        Column("preempt/step 2p", ".1f"),
    ]
    print0(format_table(columns, table))
    print0(
        "(ms per step; added = 2p step - 1p step; BN colls = full - no BN sync; DDP = full - "
        "no DDP all-reduce; shared cores = 2 processes without any collective - 1 process; ops: "
        "the profiler's operator self time on the main thread (compute); other thr CPU: CPU "
        "time of the process's other threads (gloo, DDP), taken from the compute threads' "
        "cores; preempt: involuntary context switches of the main thread)"
    )
    return {"rows": rows, "command_2_processes": launches[2]["command"]}


DEVICE_BATCHES = (64, 256, 1024, 4096, 16384)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")
# Peak dense TFLOP/s (no sparsity) by GPU name, for MFU: (float32 without TF32, bf16).
PEAK_TFLOPS = {
    "H200": (67.0, 989.0),
    "H100": (67.0, 989.0),
    "A100": (19.5, 312.0),
    "L40S": (91.6, 362.0),
    "A10": (31.2, 125.0),
}


def peak_flops(device: torch.device, precision: str, override_tflops: float | None) -> float | None:
    """The device's peak FLOP/s in ``precision``: ``--peak-tflops``, else the table; None
    where unknown (a CPU, an unlisted GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (fp32, bf16) in PEAK_TFLOPS.items():
        if key in name:
            return (bf16 if precision in ("bf16", "fp16") else fp32) * 1e12
    return None


def device_section(
    s: Session,
    batches: tuple[int, ...],
    modes: tuple[str | None, ...],
    precisions: tuple[str, ...] = ("no", "bf16"),
) -> list[dict]:
    """Steps/s and MFU of the trainer step for each torch.compile mode (None: eager), precision
    and per-device batch: what the host-sync-free step buys on a GPU (``reduce-overhead``
    captures it in CUDA graphs). MFU counts the step's matmul FLOPs (bench/flops.py)."""
    print0(f"\n== trainer step on {s.device}: compile modes x precision x batch ==")
    fpi = trainer_flops_per_image(linear_shapes(s.config(64).model))
    # Pixel values do not change an MLP's cost: enough images for one batch of the largest.
    images = torch.rand(max(batches), 784, device=s.device) * 2 - 1
    rows, table = [], []
    for precision in precisions:
        peak = peak_flops(s.device, precision, s.args.peak_tflops)
        for mode in modes:
            for b in batches:
                progress(f"device: {precision}, compile {mode or 'off'}, batch {b}")
                cfg = bench_config(
                    b, precision, mode is not None, s.args.threads, compile_mode=mode or "default"
                )
                # Every configuration compiles afresh: dynamo's per-function cache would hit
                # its recompile limit across modes, precisions and batches and fall back to eager.
                torch._dynamo.reset()
                step = trainer_step(cfg, s.accelerator, images)[0]
                t = measure_interleaved({"trainer": step}, b, s.device, s.plan)["trainer"]
                del step
                s.accelerator.free_memory()
                achieved = t.images_per_s * fpi
                row = {
                    "precision": precision,
                    "compile_mode": mode,
                    "batch": b,
                    "steps_per_s": t.images_per_s / b,
                    "images_per_s": t.images_per_s,
                    "tflop_per_s": achieved / 1e12,
                    "mfu": achieved / peak if peak else None,
                    "peak_tflops": peak / 1e12 if peak else None,
                    "timing": t.to_dict(),
                }
                rows.append(row)
                table.append(
                    [
                        precision,
                        mode or "eager",
                        b,
                        row["steps_per_s"],
                        row["images_per_s"],
                        row["tflop_per_s"],
                        row["mfu"],
                    ]
                )
    columns = [
        Column("precision"),
        Column("compile"),
        Column("batch"),
        Column("steps/s", ".1f"),
        Column("img/s", ".0f"),
        Column("TFLOP/s", ".3f"),
        Column("MFU", ".1%"),
    ]
    print0(format_table(columns, table))
    print0(
        "(MFU: the step's matmul FLOPs per second over the device's peak dense FLOP/s in that "
        "precision (float32 without TF32); '-' where the peak is unknown: pass --peak-tflops)"
    )
    return rows


# --- contention, metadata, main ----------------------------------------------------------------


def contention(s: Session, report: dict) -> list[str]:
    """The measurements during which other processes kept a noticeable share of a core busy."""
    busy = [
        f"{what} batch {b} width x{w}: {t.other_cores:.2f}"
        for (what, b, w), t in s.cache.items()
        if t.other_cores is not None and t.other_cores > CONTENDED_CORES
    ]
    for row in report.get("weak_scaling", {}).get("rows", []):
        # with 2 processes, the other rank counts
        for key in ("one_process", "peer_one_process", "limit_one_process"):
            for n, run in enumerate(row[key]):
                other = run.get("other_cores")
                if other is not None and other > CONTENDED_CORES:
                    busy.append(f"scaling {key} batch {row['batch']} round {n + 1}: {other:.2f}")
    for row in report.get("device", []):
        other = row["timing"].get("other_cores")
        if other is not None and other > CONTENDED_CORES:
            busy.append(
                f"device {row['precision']} compile {row['compile_mode']} batch {row['batch']}: "
                f"{other:.2f}"
            )
    if busy:
        print0(
            f"\nCONTENDED: other processes kept > {CONTENDED_CORES} core busy during "
            f"{len(busy)} measurement(s) (mean cores busy with other work): " + "; ".join(busy)
        )
    else:
        print0(f"\nno measurement saw other processes use more than {CONTENDED_CORES} core")
    return busy


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def metadata(args: argparse.Namespace, device: torch.device) -> dict:
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "compile": args.compile,
        "quick": args.quick,
        "loadavg_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    s = Session(args)
    report: dict = {"meta": metadata(args, s.device), "plan": s.plan.__dict__}
    print0(
        f"gan-pipeline bench: device {s.device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {cpu_model()}, precision {args.precision}, "
        f"compile {args.compile}"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print0(
            f"WARNING: 1-minute load average is {load:.2f} on {os.cpu_count()} cores: other work "
            "is running, so these timings are contended; re-run on a quiet machine for final numbers"
        )
    if args.only in ("throughput", "all"):
        if not args.compile:
            report["flop_check"] = flop_check(s)
        report["throughput"] = throughput_section(
            s, (64, 256) if args.quick else THROUGHPUT_BATCHES
        )
        # Single-process, all threads, like the throughput figures (whose timings it reuses).
        report["curves"] = curve_section(
            s,
            (64, 256) if args.quick else CURVE_BATCHES,
            WIDTH_MULTIPLIERS,
            (64,) if args.quick else WIDTH_BATCHES,
        )
    if args.only in ("scaling", "all"):
        if s.device.type == "cpu":
            report["weak_scaling"] = weak_scaling_section(
                s.plan, SCALING_BATCHES, rounds=1 if args.quick else SCALING_ROUNDS
            )
        else:
            print0(
                "\n(weak scaling is measured on CPU processes; skipped on a CUDA device: "
                "use --device cpu)"
            )
    if args.only in ("profile", "all") and s.device.type == "cpu":
        report["profile"] = profile_section(s.plan, SCALING_BATCHES)
    if args.only == "device" or (args.only == "all" and s.device.type == "cuda"):
        report["device"] = device_section(
            s,
            (64, 256) if args.quick else DEVICE_BATCHES,
            COMPILE_MODES if s.device.type == "cuda" else (None,),
        )
    report["contended"] = contention(s, report)
    report["targets"] = check_targets(report)
    report["meta"]["loadavg_at_end"] = os.getloadavg()
    report["meta"]["wall_s"] = time.perf_counter() - started
    path = Path(os.environ.get("BENCH_JSON", "bench.json"))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print0(f"\nwrote {path} in {report['meta']['wall_s']:.0f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
