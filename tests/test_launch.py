"""End to end through the real launchers: `accelerate launch` on 2 CPU processes (gloo), and two
"hosts" (two launches, machine rank 0 and 1) meeting on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate.utils.other import get_free_port

from tests.dist_utils import accelerate_launch_cmd, run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TINY = [
    "--config",
    "configs/smoke.yaml",
    "model.g_hidden=[32,64]",
    "model.d_hidden=[64,32]",
    "model.latent_dim=16",
    "train.batch_size=8",
    "train.steps=4",
    "log.every=2",
    "checkpoint.every=2",
    "sample.every=2",
]


def _env():
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_MODE", None)
    return env


def _manifest(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / latest / "manifest.json").read_text())


def test_accelerate_launch_two_cpu_processes_trains_end_to_end(tmp_path):
    run = tmp_path / "run"
    cmd = accelerate_launch_cmd(
        "pipeline/train.py",
        *TINY,
        f"output_dir={run}",
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = _manifest(run)
    assert manifest["step"] == 4 and manifest["world_size"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/d_loss" in r] == [2, 4]
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    # Rank-aware output: the start-up line is printed by the main process only.
    assert (proc.stdout + proc.stderr).count("2 process(es)") == 1
    assert "CrossReplicaBatchNorm1d" in proc.stdout + proc.stderr


def test_two_host_launch_on_loopback_trains(tmp_path):
    run = tmp_path / "run"
    port = str(get_free_port())
    common = [
        ACCELERATE,
        "launch",
        "--config_file",
        "launch/multi_node.yaml",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        port,
    ]
    hosts = [
        subprocess.Popen(
            [*common, "--machine_rank", str(rank), "pipeline/train.py", *TINY, f"output_dir={run}"],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [h.communicate(timeout=300)[0] for h in hosts]
    finally:
        for h in hosts:
            h.kill()
    assert [h.returncode for h in hosts] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    manifest = _manifest(run)
    assert manifest["step"] == 4 and manifest["world_size"] == 2


def _planted_losses(rank, world, out_dir):
    """Each rank logs its own (different) statistics; the row written must hold their mean."""
    from pipeline.config import load_config
    from pipeline.step import STAT_NAMES
    from pipeline.trainer import Trainer

    cfg = load_config(
        "configs/smoke.yaml",
        [f"output_dir={out_dir}", "model.g_hidden=[16]", "model.d_hidden=[16]"],
    )
    trainer = Trainer(cfg)
    try:
        planted = torch.full((len(STAT_NAMES),), float(rank + 1)) * torch.arange(
            1, len(STAT_NAMES) + 1
        )
        planted[[STAT_NAMES.index("d_skipped"), STAT_NAMES.index("g_skipped")]] = (
            0.0  # no skipped steps
        )
        trainer.step = 5
        trainer.loop.stats.add(planted)  # two steps' sums
        trainer.loop.stats.add(planted)
        trainer.log_train_all_ranks(elapsed=1.0)
    finally:
        trainer.close()
    return None


def test_logged_metrics_are_the_mean_over_replicas(tmp_path):
    os.chdir(ROOT)
    run_on_ranks(
        _planted_losses, 2, str(tmp_path), init_process_group=False, env={"ACCELERATE_USE_CPU": "1"}
    )
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    # rank 0 planted k, rank 1 planted 2k for the k-th statistic: the mean is 1.5k.
    assert row["train/d_loss"] == 1.5 and row["train/g_loss"] == 3.0 and row["train/d_real"] == 4.5
