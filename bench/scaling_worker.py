"""The weak-scaling worker: every rank times the trainer step, its plain-DDP peer and the matmul
limit, interleaved; rank 0 writes the global throughput. ``launch`` (called by bench/bench.py)
starts it as

    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --config_file launch/cpu_2proc.yaml \\
        --num_processes {1,2} --main_process_port PORT \\
        bench/scaling_worker.py --batch 64 256 --result-file F --plan JSON

with one thread per process (``train.cpu_threads=1``), float32, no compile. Not meant to be run
by hand: ``python bench/bench.py --only scaling`` launches it, 1 and 2 processes in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root must win over bench/ itself
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils.other import get_free_port
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from bench.timing import Plan, measure_interleaved
from bench.workloads import bench_config, ddp_peer_step, limit_step_for, trainer_step
from pipeline.data import load_dataset
from pipeline.distributed import all_reduce_max
from pipeline.io import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_CONFIG = ROOT / "launch/cpu_2proc.yaml"


def launch(processes: int, batches: tuple[int, ...], plan: Plan) -> dict:
    """Run this file under ``accelerate launch`` on ``processes`` CPU processes; returns rank 0's
    result and the command line used."""
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
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(
                f"scaling worker ({processes} processes) failed with status {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return {**json.loads(result.read_text()), "command": " ".join(cmd)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", required=True, help="per-process batches")
    p.add_argument("--result-file", required=True, help="rank 0 writes the result JSON here")
    p.add_argument("--plan", default="{}", help="bench.timing.Plan fields as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Every rank: the trainer step (collective: DDP, BN, stop agreement), the plain-DDP peer
    (collective: DDP's gradient all-reduces and buffer broadcasts) and the limit (no
    communication), their repeats taking turns; the round times are all-reduced (max) so every
    rank runs the same number of steps. Rank 0 writes the result."""
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

    results, peers, limits = [], [], []
    for b in args.batch:
        cfg = config(b)
        trainer, bn_sync = trainer_step(cfg, accelerator, images)
        peer, peer_G, _ = ddp_peer_step(cfg, device, images)
        peer_bn = sorted({type(m).__name__ for m in peer_G.modules() if "Norm" in type(m).__name__})
        steps = {"trainer": trainer, "peer": peer, "limit": limit_step_for(cfg, device)}
        if world > 1:  # train.grad_compression=bf16, as Accelerate registers it, for its speed
            compressed, _ = trainer_step(cfg, accelerator, images)
            for net in (compressed.loop.state.G, compressed.loop.state.D):
                net.register_comm_hook(None, default_hooks.bf16_compress_hook)
            steps["trainer_bf16_allreduce"] = compressed
        timings = measure_interleaved(steps, b * world, device, plan, agree)
        results.append({"batch": b, "batchnorm_sync": bn_sync, **timings["trainer"].to_dict()})
        if "trainer_bf16_allreduce" in timings:
            results[-1]["bf16_allreduce"] = timings["trainer_bf16_allreduce"].to_dict()
        peers.append(
            {
                "batch": b,
                "wrapper": type(peer_G).__name__,
                "batchnorm": ", ".join(peer_bn),
                **timings["peer"].to_dict(),
            }
        )
        limits.append({"batch": b, **timings["limit"].to_dict()})
        del steps, trainer, peer, peer_G, timings
        accelerator.free_memory()
    if accelerator.is_main_process:
        atomic_write_text(
            args.result_file,
            json.dumps(
                {
                    "processes": world,
                    "threads_per_process": torch.get_num_threads(),
                    "backend": str(torch.distributed.get_backend()) if world > 1 else "none",
                    "results": results,
                    "peer_results": peers,
                    "limit_results": limits,
                }
            ),
        )
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
