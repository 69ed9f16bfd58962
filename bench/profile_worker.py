"""Where the distributed step's time goes: the trainer step and the same step with parts of its
communication taken away, timed in turns on every rank, plus the PyTorch profiler's compute
time and each thread's CPU time. ``launch`` (called by ``python bench/bench.py --only
profile``) starts it as

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file launch/cpu_2proc.yaml \\
        --num_processes {1,2} bench/profile_worker.py --batch 64 256 --result-file F

The variants, all the trainer's own step (``TrainLoop.step_all_ranks``):

- ``full``: as trained (BN statistics all-reduced, DDP gradient all-reduces, agreements);
- ``no_bn_sync``: G's BatchNorm per replica (no BN collectives);
- ``no_ddp``: every step inside DDP's ``no_sync`` for G and D (no gradient all-reduces);
- ``local``: both removed: what is left is the computation (and the agreement every
  ``train.check_every`` steps), on as many processes as the launch has.

Differences between them give each communication's cost on the step's critical path; the
profiler gives the time the main thread spends in operators (compute) and, with ``/proc``, how
much CPU the process's other threads (gloo's workers, DDP's) take from the compute threads.
Timings of variants whose replicas stop being identical (``no_ddp``) are timings only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root must win over bench/ itself
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils.other import get_free_port

from bench.timing import Plan, measure_interleaved
from bench.workloads import bench_config, trainer_step
from pipeline.data import load_dataset
from pipeline.distributed import all_reduce_max
from pipeline.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_CONFIG = ROOT / "launch/cpu_2proc.yaml"
PROFILED_STEPS = 40
COMM_OPS = ("c10d::", "gloo:", "nccl:")


def launch(processes: int, batches: tuple[int, ...], plan: Plan) -> dict:
    """This file under ``accelerate launch`` on ``processes`` CPU processes; rank 0's result."""
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
            str(LAUNCH_CONFIG),
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(get_free_port()),
            str(Path(__file__).resolve()),
            "--batch",
            *map(str, batches),
            "--result-file",
            str(result),
            "--plan",
            json.dumps(plan.__dict__),
        ]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(
                f"profile worker ({processes} processes) failed with status {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return {**json.loads(result.read_text()), "command": " ".join(cmd)}


def _thread_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by thread id (Linux)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


def _context_switches() -> int:
    """Involuntary context switches of the main thread so far (Linux)."""
    try:
        status = Path(f"/proc/self/task/{os.getpid()}/status").read_text()
        return int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def profile_full(step, steps: int) -> dict:
    """The PyTorch profiler over ``steps`` steps: the main thread's time in operators (compute,
    collectives' issue excluded) against the wall time; thread CPU times from /proc."""
    from torch.profiler import ProfilerActivity, profile

    main_tid = os.getpid()
    cpu_before, switches_before = _thread_cpu_s(), _context_switches()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - started
    cpu_after, switches = _thread_cpu_s(), _context_switches() - switches_before
    used = {t: cpu_after[t] - cpu_before.get(t, 0.0) for t in cpu_after}
    main_cpu = used.pop(main_tid, 0.0)
    # Self time of every operator: the kernels' own time, whatever wraps them.
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    compute_us = sum(e.self_cpu_time_total for e in events if e.name.startswith("aten::"))
    comm_us = sum(e.self_cpu_time_total for e in events if e.name.startswith(COMM_OPS))
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall / steps,
        "operator_ms_per_step": compute_us / 1e3 / steps,
        "collective_issue_ms_per_step": comm_us / 1e3 / steps,
        "main_thread_cpu_ms_per_step": 1e3 * main_cpu / steps,
        "other_threads_cpu_ms_per_step": 1e3 * sum(used.values()) / steps,
        "other_threads": len(used),
        "involuntary_switches_per_step": switches / steps,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", required=True, help="per-process batches")
    p.add_argument("--result-file", required=True, help="rank 0 writes the result JSON here")
    p.add_argument("--plan", default="{}", help="bench.timing.Plan fields as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Every rank: the four variants in turns (collective), then the profiler over ``full``."""
    import pipeline.build
    from pipeline.build import make_accelerator

    args = parse_args(argv)
    plan = Plan(**json.loads(args.plan))

    def config(batch: int):
        return bench_config(batch, precision="no", compile=False, threads=1)

    accelerator = make_accelerator(config(args.batch[0]))
    world, device = accelerator.num_processes, accelerator.device
    images = load_dataset(config(args.batch[0]).data, "train").images.to(device)

    def agree(seconds: float) -> float:
        return float(all_reduce_max(torch.tensor([seconds])).item())

    real_sync = pipeline.build.sync_batchnorm

    def build(cfg, bn_sync: bool):
        if bn_sync:
            return trainer_step(cfg, accelerator, images)
        pipeline.build.sync_batchnorm = lambda model, device, world_size, **_: (model, "off")
        try:
            return trainer_step(cfg, accelerator, images)
        finally:
            pipeline.build.sync_batchnorm = real_sync

    def without_ddp(step):
        G, D = step.loop.state.G, step.loop.state.D

        def run() -> None:
            with accelerator.no_sync(G), accelerator.no_sync(D):
                step()

        return run

    results = []
    for b in args.batch:
        cfg = config(b)
        (full, _), (no_bn, _) = build(cfg, True), build(cfg, False)
        (plain_comm, _), (local_base, _) = build(cfg, True), build(cfg, False)
        steps = {
            "full": full,
            "no_bn_sync": no_bn,
            "no_ddp": without_ddp(plain_comm),
            "local": without_ddp(local_base),
        }
        timings = measure_interleaved(steps, b * world, device, plan, agree)
        profiled = profile_full(full, PROFILED_STEPS)
        results.append(
            {
                "batch": b,
                "step_ms": {name: t.step_ms for name, t in timings.items()},
                "images_per_s": {name: t.images_per_s for name, t in timings.items()},
                "profile": profiled,
            }
        )
        del steps, full, no_bn, plain_comm, local_base
        accelerator.free_memory()
    if accelerator.is_main_process:
        atomic_write_text(
            args.result_file,
            json.dumps({"processes": world, "results": results}),
        )
    accelerator.end_training()
    with contextlib.suppress(Exception):
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
