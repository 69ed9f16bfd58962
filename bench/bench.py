"""Benchmark of the trainer step against a tutorial-style loop and the matmul-only limit.

    make bench                                     # everything: throughput, then scaling
    python bench/bench.py --only throughput        # trainer vs plain loop vs matmul limit
    python bench/bench.py --only scaling           # 1 -> 2 processes, batch curve, width curve
    python bench/bench.py --quick                  # a smoke test: tiny repeat counts
    python bench/bench.py --device cuda --precision bf16 --compile
    BENCH_JSON=runs/bench-cpu.json make bench      # where the JSON goes (default bench.json)

The 2-process figures come from this file run as a worker under
    ACCELERATE_USE_CPU=1 accelerate launch --config_file launch/cpu_2proc.yaml --num_processes 2 \
        --main_process_port PORT bench/bench.py --worker scaling --batch 64 256 --result-file F
with one thread per process (``train.cpu_threads=1``); rank 0 writes the result. The method and
the FLOP count are in docs/performance.md. A benchmark, never a test: targets print PASS/MISS and
the exit status does not depend on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root must win over bench/ itself
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.flops import (
    plain_flops_per_image,
    plain_step_matmuls,
    step_flops,
    trainer_flops_per_image,
    trainer_step_matmuls,
)
from bench.timing import Plan, Timing, measure_interleaved
from bench.workloads import limit_step, plain_step, trainer_step
from pipeline.config import RunConfig, load_config
from pipeline.data import load_dataset
from pipeline.distributed import all_reduce_max
from pipeline.models import linear_shapes

ROOT = Path(__file__).resolve().parent.parent
THROUGHPUT_BATCHES = (64, 256, 1024)
SCALING_BATCHES = (64, 256)
SCALING_ROUNDS = 2
CURVE_BATCHES = (64, 128, 256, 512, 1024, 2048, 4096)
WIDTH_MULTIPLIERS = (1, 2)
WIDTH_BATCHES = (64, 256)
CONTENDED_CORES = 0.15  # other processes' mean CPU use above which a measurement is flagged
DATASET_SIZE = 10_240  # synthetic images; 80% (8192) train: one batch of 4096 on up to 2 ranks

# (name, measured key, batch, threshold): the targets for a 2-core CPU in float32.
TARGETS = (
    ("trainer/plain at batch 64", "trainer_over_plain", 64, 1.5),
    ("trainer/plain at batch 256", "trainer_over_plain", 256, 1.2),
    ("trainer/limit at batch 256", "trainer_over_limit", 256, 0.8),
    ("weak-scaling efficiency 1->2 processes at batch 256", "efficiency", 256, 0.9),
    ("weak-scaling efficiency 1->2 processes at batch 64", "efficiency", 64, 0.75),
)


def print0(*args, **kwargs) -> None:
    print(*args, **kwargs, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", choices=("throughput", "scaling", "all"), default="all")
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
    p.add_argument("--worker", choices=("scaling",), help=argparse.SUPPRESS)
    p.add_argument(
        "--batch", type=int, nargs="+", default=list(SCALING_BATCHES), help=argparse.SUPPRESS
    )
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan_for(args: argparse.Namespace) -> Plan:
    if args.plan:
        return Plan(**json.loads(args.plan))
    return Plan(warmup_s=0.05, repeats=2, repeat_s=0.05, first_steps=1) if args.quick else Plan()


def run_config(batch: int, args: argparse.Namespace, width: int = 1) -> RunConfig:
    """The project's defaults (dropout 0.5, instance noise, L2 penalty on), no trackers, no eval,
    synthetic data (the content does not change the cost of an MLP step)."""
    base = load_config(None)
    g = [w * width for w in base.model.g_hidden]
    d = [w * width for w in base.model.d_hidden]
    overrides = [
        f"train.batch_size={batch}",
        "log.trackers=[none]",
        "eval.enabled=false",
        "data.name=synthetic",
        f"data.synthetic_size={DATASET_SIZE}",
        f"model.g_hidden=[{','.join(map(str, g))}]",
        f"model.d_hidden=[{','.join(map(str, d))}]",
        # quoted: YAML reads a bare `no` as the boolean false
        f"train.mixed_precision='{args.precision}'",
        f"train.compile={str(args.compile).lower()}",
        f"train.cpu_threads={args.threads}",
    ]
    return load_config(None, overrides)


def has_bias(cfg: RunConfig) -> dict[str, list[bool]]:
    m = cfg.model
    return {
        "G": [not m.g_batchnorm] * len(m.g_hidden) + [True],
        "D": [True] * (len(m.d_hidden) + 1),
    }


def compute_dtype(precision: str) -> torch.dtype:
    return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def flop_check(args: argparse.Namespace, accelerator, images: torch.Tensor, batch: int = 8) -> dict:
    """Count the matmul FLOPs of one real step with torch's FlopCounterMode, against our list."""
    from torch.utils.flop_counter import FlopCounterMode

    small = run_config(batch, args)
    shapes = linear_shapes(small.model)
    out = {}
    for name, build, listed, closed_form in (
        (
            "trainer",
            lambda: trainer_step(small, accelerator, images)[0],
            trainer_step_matmuls(shapes, batch),
            trainer_flops_per_image(shapes) * batch,
        ),
        (
            "plain",
            lambda: plain_step(small, accelerator.device, images),
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
        accelerator.free_memory()
    return out


# --- the throughput section ---------------------------------------------------------------------


def make_accelerator_for(args: argparse.Namespace):
    from pipeline.trainer import make_accelerator

    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    return make_accelerator(run_config(64, args))


class Session:
    """One process's measurements, cached by (what, batch, width) so sections can share them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.plan = args, plan_for(args)
        self.accelerator = make_accelerator_for(args)
        self.device = self.accelerator.device
        cfg = run_config(64, args)
        self.images = load_dataset(cfg.data, "train").images.to(self.device)
        self.cache: dict[tuple[str, int, int], Timing] = {}

    def step(self, what: str, cfg: RunConfig):
        if what == "trainer":
            return trainer_step(cfg, self.accelerator, self.images)[0]
        if what == "plain":
            return plain_step(cfg, self.device, self.images)
        shapes = linear_shapes(cfg.model)
        matmuls = trainer_step_matmuls(shapes, cfg.train.batch_size)
        dtype = compute_dtype(self.args.precision)
        return limit_step(matmuls, shapes, has_bias(cfg), self.device, dtype)

    def times(self, batch: int, whats: tuple[str, ...], width: int = 1) -> list[Timing]:
        """Timings of ``whats`` (trainer, plain, limit) at one size; missing ones measured together."""
        missing = [w for w in whats if (w, batch, width) not in self.cache]
        if missing:
            cfg = run_config(batch, self.args, width)
            steps = {what: self.step(what, cfg) for what in missing}
            timings = measure_interleaved(steps, batch, self.device, self.plan)
            self.cache.update({(what, batch, width): t for what, t in timings.items()})
            del steps
            self.accelerator.free_memory()  # drop the prepared models and optimizers
        return [self.cache[(what, batch, width)] for what in whats]


def throughput_section(s: Session, batches: tuple[int, ...]) -> list[dict]:
    cfg = run_config(64, s.args)
    shapes = linear_shapes(cfg.model)
    t_fpi, p_fpi = trainer_flops_per_image(shapes), plain_flops_per_image(shapes)
    print0("\n== throughput: trainer step vs tutorial-style plain loop vs matmul-only limit ==")
    print0(
        f"model FLOPs per image: trainer step {t_fpi / 1e6:.3f} MFLOP, plain loop {p_fpi / 1e6:.3f} MFLOP "
        f"(matmuls only; formula in docs/performance.md)"
    )
    rows = []
    header = (
        f"{'batch':>6} {'trainer img/s':>14} {'plain img/s':>12} {'limit img/s':>12} {'trainer GF/s':>13} "
        f"{'plain GF/s':>11} {'limit GF/s':>11} {'tr/plain':>9} {'tr/limit':>9} {'peak RSS MB':>12}"
    )
    print0(header)
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
        rss = max(tr.peak_rss_mb, pl.peak_rss_mb, li.peak_rss_mb)
        print0(
            f"{b:>6} {tr.images_per_s:>14.0f} {pl.images_per_s:>12.0f} {li.images_per_s:>12.0f} "
            f"{row['trainer']['gflop_per_s']:>13.1f} {row['plain']['gflop_per_s']:>11.1f} "
            f"{row['limit']['gflop_per_s']:>11.1f} {row['trainer_over_plain']:>9.2f} "
            f"{row['trainer_over_limit']:>9.2f} {rss:>12.0f}"
        )
        if s.device.type == "cuda":
            print0(
                f"{'':>6} CUDA max allocated MB: trainer {tr.peak_cuda_mb:.0f}, plain {pl.peak_cuda_mb:.0f}, "
                f"limit {li.peak_cuda_mb:.0f}"
            )
    print0(
        "(img/s: median of repeats; GF/s: the FLOPs each one executes, per second; peak RSS: "
        "this process while the three of that batch ran, all three alive)"
    )
    return rows


def curve_section(
    s: Session, batches: tuple[int, ...], widths: tuple[int, ...], width_batches: tuple[int, ...]
) -> dict[str, list[dict]]:
    print0(f"\n== cost curve of the trainer ({torch.get_num_threads()} threads, {s.device}) ==")
    header = (
        f"{'width':>6} {'batch':>6} {'MFLOP/img':>10} {'trainer img/s':>14} {'step ms':>9} "
        f"{'trainer GF/s':>13} {'limit img/s':>12} {'tr/limit':>9}"
    )
    out: dict[str, list[dict]] = {"batch": [], "width": []}
    points = [("batch", 1, b) for b in batches] + [
        ("width", w, b) for w in widths for b in width_batches
    ]
    for curve, width, b in points:
        if not out[curve]:
            print0(
                f"-- as the {curve} grows --" if curve == "batch" else "-- as the widths grow --"
            )
            print0(header)
        fpi = trainer_flops_per_image(linear_shapes(run_config(b, s.args, width).model))
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
        print0(
            f"{'x' + str(width):>6} {b:>6} {fpi / 1e6:>10.2f} {tr.images_per_s:>14.0f} {tr.step_ms:>9.1f} "
            f"{point['trainer']['gflop_per_s']:>13.1f} {li.images_per_s:>12.0f} "
            f"{point['trainer_over_limit']:>9.2f}"
        )
    return out


# --- weak scaling: this file as an accelerate-launched worker ----------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_workers(processes: int, batches: tuple[int, ...], plan: Plan) -> dict:
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = (
        [str(accelerate), "launch"]
        if accelerate.exists()
        else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            *launcher,
            "--config_file",
            str(ROOT / "launch/cpu_2proc.yaml"),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            "scaling",
            "--batch",
            *map(str, batches),
            "--result-file",
            str(result),
            "--plan",
            json.dumps(plan.__dict__),
        ]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(
                f"scaling worker ({processes} processes) failed with status {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return {**json.loads(result.read_text()), "command": " ".join(cmd)}


def scaling_worker(args: argparse.Namespace) -> int:
    """Each rank times the real trainer step, then the matmul limit (no communication but the
    warm-up agreement); rank 0 writes the global throughput per batch."""
    from pipeline.trainer import make_accelerator

    args.threads, args.precision, args.compile = 1, "no", False
    plan = plan_for(args)
    accelerator = make_accelerator(run_config(args.batch[0], args))
    world = accelerator.num_processes
    images = load_dataset(run_config(args.batch[0], args).data, "train").images.to(
        accelerator.device
    )

    def agree(seconds: float) -> float:
        return float(all_reduce_max(torch.tensor([seconds])).item())

    results, limits = [], []
    for b in args.batch:
        cfg = run_config(b, args)
        trainer, bn_sync = trainer_step(cfg, accelerator, images)
        shapes = linear_shapes(cfg.model)
        matmuls = trainer_step_matmuls(shapes, b)
        limit = limit_step(matmuls, shapes, has_bias(cfg), accelerator.device, torch.float32)
        steps = {"trainer": trainer, "limit": limit}
        timings = measure_interleaved(steps, b * world, accelerator.device, plan, agree)
        results.append({"batch": b, "batchnorm_sync": bn_sync, **timings["trainer"].to_dict()})
        limits.append({"batch": b, **timings["limit"].to_dict()})
        del steps, trainer
        accelerator.free_memory()
    if accelerator.is_main_process:
        Path(args.result_file).write_text(
            json.dumps(
                {
                    "processes": world,
                    "threads_per_process": torch.get_num_threads(),
                    "backend": str(torch.distributed.get_backend()) if world > 1 else "none",
                    "results": results,
                    "limit_results": limits,
                }
            )
        )
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def weak_scaling_section(plan: Plan, batches: tuple[int, ...], rounds: int) -> dict:
    """Launches of 1 and 2 processes take turns ``rounds`` times; each figure is the mean over
    the rounds of the launches' medians, so a slow spell does not land on one side only."""
    print0(
        "\n== weak scaling on CPU: 1 -> 2 processes (gloo), 1 thread each, same per-process batch =="
    )
    launches: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(rounds):
        for processes in (1, 2):
            launches[processes].append(launch_workers(processes, batches, plan))

    def mean_rate(processes: int, key: str, index: int) -> float:
        runs = launches[processes]
        return sum(run[key][index]["images_per_s"] for run in runs) / len(runs)

    rows = []
    print0(
        f"{'batch/proc':>10} {'1 proc img/s':>13} {'2 procs img/s':>14} {'efficiency':>11} "
        f"{'limit 1 proc':>13} {'limit 2 procs':>14} {'ceiling':>8}   per round"
    )
    for index, batch in enumerate(batches):
        t1, t2 = mean_rate(1, "results", index), mean_rate(2, "results", index)
        l1, l2 = mean_rate(1, "limit_results", index), mean_rate(2, "limit_results", index)
        per_round = [
            two["results"][index]["images_per_s"] / (2 * one["results"][index]["images_per_s"])
            for one, two in zip(launches[1], launches[2])
        ]
        row = {
            "batch": batch,
            "one_process_images_per_s": t1,
            "two_processes_images_per_s": t2,
            "efficiency": t2 / (2 * t1),
            "efficiency_per_round": per_round,
            "limit_one_process_images_per_s": l1,
            "limit_two_processes_images_per_s": l2,
            "hardware_ceiling": l2 / (2 * l1),
            "one_process": [run["results"][index] for run in launches[1]],
            "two_processes": [run["results"][index] for run in launches[2]],
            "limit_one_process": [run["limit_results"][index] for run in launches[1]],
            "limit_two_processes": [run["limit_results"][index] for run in launches[2]],
        }
        rows.append(row)
        print0(
            f"{batch:>10} {t1:>13.0f} {t2:>14.0f} {row['efficiency']:>11.1%} {l1:>13.0f} {l2:>14.0f} "
            f"{row['hardware_ceiling']:>8.1%}   " + ", ".join(f"{e:.0%}" for e in per_round)
        )
    two = launches[2][-1]
    print0(
        "(efficiency = images/s of 2 processes / (2 x images/s of 1 process), the trainer step; "
        "ceiling = the same ratio for the step's matmuls alone, in 2 processes that never "
        f"communicate: what this machine allows; {rounds} round(s) of launches, 1 and 2 in turn)"
    )
    print0(
        f"(2-process BatchNorm: {two['results'][0]['batchnorm_sync']}, backend {two['backend']}; "
        f"launched as: {two['command']})"
    )
    return {
        "command_2_processes": two["command"],
        "command_1_process": launches[1][-1]["command"],
        "threads_per_process": two["threads_per_process"],
        "backend": two["backend"],
        "rounds": rounds,
        "rows": rows,
    }


# --- targets, metadata, main -------------------------------------------------------------------


def check_targets(report: dict) -> list[dict]:
    rows = {("throughput", r["batch"]): r for r in report.get("throughput", [])}
    rows.update(
        {("scaling", r["batch"]): r for r in report.get("weak_scaling", {}).get("rows", [])}
    )
    out = []
    meta = report["meta"]
    print0("\n== targets (defined for a 2-core CPU, float32) ==")
    if meta["precision"] != "no" or meta["device"] != "cpu" or meta["nproc"] != 2:
        print0(
            f"(this run: {meta['device']}, {meta['nproc']} cores, precision {meta['precision']}: "
            "the thresholds were set for another setting; read PASS/MISS as indicative only)"
        )
    for name, key, batch, threshold in TARGETS:
        row = rows.get(("scaling" if key == "efficiency" else "throughput", batch))
        if row is None:
            continue
        value = row[key]
        status = "PASS" if value >= threshold else "MISS"
        out.append({"target": name, "threshold": threshold, "measured": value, "status": status})
        print0(f"{status}  {name}: {value:.3f} (target >= {threshold:.2f})")
    return out


def contention(s: Session, report: dict) -> list[str]:
    """The measurements during which other processes kept a noticeable share of a core busy."""
    busy = [
        f"{what} batch {b} width x{w}: {t.other_cores:.2f}"
        for (what, b, w), t in s.cache.items()
        if t.other_cores is not None and t.other_cores > CONTENDED_CORES
    ]
    for row in report.get("weak_scaling", {}).get("rows", []):
        for key in ("one_process", "limit_one_process"):  # with 2 processes, the other rank counts
            for n, run in enumerate(row[key]):
                other = run.get("other_cores")
                if other is not None and other > CONTENDED_CORES:
                    busy.append(f"scaling {key} batch {row['batch']} round {n + 1}: {other:.2f}")
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
    if args.worker == "scaling":
        return scaling_worker(args)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    s = Session(args)
    report: dict = {"meta": metadata(args, s.device), "plan": s.plan.__dict__}
    print0(
        f"gan-pipeline bench: device {s.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{cpu_model()}, precision {args.precision}, compile {args.compile}"
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print0(
            f"WARNING: 1-minute load average is {load:.2f} on {os.cpu_count()} cores: other work is running, "
            "so these timings are contended; re-run on a quiet machine for final numbers"
        )
    if args.only in ("throughput", "all"):
        if not args.compile:
            report["flop_check"] = flop_check(args, s.accelerator, s.images)
            for name, c in report["flop_check"].items():
                same = (
                    "matches"
                    if c["counted_by_torch"] == c["listed"] == c["closed_form"]
                    else "DIFFERS FROM"
                )
                print0(
                    f"FLOP check ({name}, batch 8): torch FlopCounterMode {c['counted_by_torch']:,} "
                    f"{same} the listed matmuls {c['listed']:,} and the formula {c['closed_form']:,}"
                )
        report["throughput"] = throughput_section(
            s, (64, 256) if args.quick else THROUGHPUT_BATCHES
        )
    if args.only in ("scaling", "all"):
        if s.device.type == "cpu" or args.device == "cpu":
            report["weak_scaling"] = weak_scaling_section(
                s.plan, SCALING_BATCHES, rounds=1 if args.quick else SCALING_ROUNDS
            )
        else:
            print0(
                "\n(weak scaling is measured on CPU processes; skipped on a CUDA device: use --device cpu)"
            )
        report["curves"] = curve_section(
            s,
            (64, 256, 1024) if args.quick else CURVE_BATCHES,
            WIDTH_MULTIPLIERS,
            (64,) if args.quick else WIDTH_BATCHES,
        )
    report["contended"] = contention(s, report)
    report["targets"] = check_targets(report)
    report["meta"]["loadavg_at_end"] = os.getloadavg()
    report["meta"]["wall_s"] = time.perf_counter() - started
    path = Path(os.environ.get("BENCH_JSON", "bench.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print0(f"\nwrote {path} in {report['meta']['wall_s']:.0f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
