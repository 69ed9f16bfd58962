"""Checkpoints, specified: a resumed run is bit for bit the uninterrupted run (1 and 2 processes);
a run resumes on another world size; a process killed mid-save, a SIGTERM, a corrupt file, an
incompatible config, a non-empty run directory and a NaN each end in a known, tested state; a
checkpoint holds safetensors and JSON only; export and sample read it; torchrun's restart resumes.

Cost is process start-up (torch + accelerate imports take seconds), so:
- 1-process runs are played in the pytest process (``train_in_process``), Accelerate's singleton
  state reset and the global random streams scrambled before each run, so a resume can only be
  exact if it restores the streams from the checkpoint;
- every 2-process scenario is one ``run_on_ranks`` launch; within it a resume rebuilds the
  Trainer (fresh Accelerator state, scrambled streams) on the still-open process group;
- subprocesses only where the process boundary is the point: SIGKILL, SIGTERM, torchrun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from safetensors.torch import load_file

import pipeline.step
from pipeline import checkpoint as ckpt
from pipeline import train as train_cli
from pipeline.checkpoint import CheckpointError
from pipeline.checkpoint.manager import CheckpointManager, named_state
from pipeline.cli import export as export_cli
from pipeline.cli import sample as sample_cli
from pipeline.config import ConfigError, load_config
from pipeline.loop import TrainLoop
from pipeline.report import read_metrics
from pipeline.trainer import Trainer
from tests.dist_utils import run_on_ranks

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tests" / "scripts"  # run in processes of their own
TINY = [
    "data.name=synthetic",
    "model.g_hidden=[32,64]",
    "model.d_hidden=[64,32]",
    "model.latent_dim=16",
    "train.batch_size=16",
    "log.trackers=[none]",
    "eval.enabled=false",
    "log.every=2",
    "sample.every=0",
    "checkpoint.every=4",
    "train.cpu_threads=1",  # a 2-thread pool on tiny matrices only waits for busy cores
]
EMA_ON = "model.ema_decay=0.9"
SIGNAL_STEP = 5  # a SIGTERM reaches rank 1 alone during this step (0-based)
CHECK_EVERY = 4  # ...and the ranks agree after steps 4, 8, ...: every rank stops at step 8
NAN_STEP = 5  # the planted NaN hits the D phase of this step (0-based), logged in the row of step 6
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUBPROCESS_TIMEOUT_S = 180


# --- helpers ----------------------------------------------------------------------------------


def overrides(run_dir: Path, *extra: str) -> list[str]:
    return [f"output_dir={run_dir}", *TINY, *extra]


def reset_accelerate(partial_state: bool = True) -> None:
    """Forget the Accelerator singletons, so the next Trainer builds its own."""
    AcceleratorState._reset_state(partial_state)
    GradientState._reset_state()


def scramble_global_streams() -> None:
    """Global random streams unlike any a run leaves behind: a resume must restore its own."""
    torch.manual_seed(987_654_321)
    random.seed(987_654_321)
    np.random.seed(98_765)


@contextlib.contextmanager
def isolated_process_state():
    """Accelerate state reset around the block; global streams and thread count restored after."""
    threads = torch.get_num_threads()
    py_state, np_state = random.getstate(), np.random.get_state()
    reset_accelerate()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        reset_accelerate()
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads(threads)


def final_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """G, D, G_ema (under their checkpoint names) and both optimizers' tensors (Adam moments and
    step counts), cloned."""
    s = trainer.state
    state = named_state(trainer.accelerator, s, trainer.ema)
    for name, opt in (("opt_G", s.opt_G.optimizer), ("opt_D", s.opt_D.optimizer)):
        state.update(ckpt.optimizer_to_tensors(opt, name)[0])
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def train_in_process(run_dir: Path, *extra: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """One run on 1 process in this process; returns (summary, final state)."""
    with isolated_process_state():
        scramble_global_streams()
        trainer = Trainer(load_config(None, overrides(run_dir, *extra)))
        try:
            summary = trainer.fit()
            state = final_state(trainer)
        finally:
            trainer.close()
    return summary, state


def assert_bitwise_equal(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
) -> None:
    assert sorted(got) == sorted(want), f"{what}: different tensor names"
    differ = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:4]}"


def train_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows reduced to step and train/* (perf/* is timing, never reproducible)."""
    return [
        {k: v for k, v in row.items() if k == "step" or k.startswith("train/")}
        for row in read_metrics(run_dir / "metrics.jsonl")
    ]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / ckpt.step_dir_name(step)


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / ckpt.LATEST).read_text().strip()


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def leftovers(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob(".tmp-step-*"))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: Path, offset_from_end: int = 64) -> None:
    """Change one byte inside the tensor data (the size stays, the sha256 does not)."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, n_bytes: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n_bytes])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


class NaNPenaltyAt:
    """Stands in for ``pipeline.step.l2_penalty``: the real penalty, except NaN on the call of
    step ``step`` (D's penalty is computed once per step, from step 0 of the run)."""

    def __init__(self, step: int) -> None:
        self.step, self.calls, self.real = step, 0, pipeline.step.l2_penalty

    def __call__(self, params, weight):
        value = self.real(params, weight)
        self.calls += 1
        return value * float("nan") if self.calls - 1 == self.step else value


def subprocess_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "TQDM_DISABLE": "1", "PYTHONPATH": path}


# --- runs in a process of their own, started in the background ----------------------------------
#
# SIGKILL, SIGTERM and torchrun need a real process boundary, and every process spends seconds
# importing torch. So the module starts them together, before its first test, and they run while
# the in-process tests do; each test waits for its own run (only the runs of selected tests start).


class BackgroundRun:
    """A command in its own session (a timeout kills its whole process tree), output in files."""

    def __init__(self, name: str, cmd: list[str], run_dir: Path, log_dir: Path) -> None:
        self.name, self.run_dir = name, run_dir
        self.stderr_path = log_dir / f"{name}.err"
        with open(log_dir / f"{name}.out", "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=err, start_new_session=True
            )
        self.deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"{self.name} did not finish within {SUBPROCESS_TIMEOUT_S}s:\n{self.stderr[-3000:]}"
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def sigterm_after_two_log_rows(run: BackgroundRun) -> None:
    """Send SIGTERM once the run has logged twice (so fit is running and has its handler)."""
    while run.proc.poll() is None and time.monotonic() < run.deadline:
        if len(read_metrics(run.run_dir / "metrics.jsonl")) >= 2:
            run.proc.send_signal(signal.SIGTERM)
            return
        time.sleep(0.05)


def background_commands(root: Path) -> dict[str, tuple[list[str], Path]]:
    python = sys.executable
    return {
        # Checkpoints at 4, 8 (killed after its first file), 12.
        "killed_mid_save": (
            [
                python,
                str(SCRIPTS / "kill_in_second_save.py"),
                *overrides(root / "killed_mid_save", "train.steps=12"),
            ],
            root / "killed_mid_save",
        ),
        "terminated": (
            [
                python,
                "pipeline/train.py",
                *overrides(root / "terminated", "train.steps=100000", "checkpoint.every=0"),
            ],
            root / "terminated",
        ),
        # The first worker dies right after its step-4 checkpoint; torchrun starts a second one.
        "torchrun_restart": (
            [
                python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "1",
                "--max-restarts",
                "1",
                "--monitor-interval",
                "0.1",
                str(SCRIPTS / "kill_after_first_save_once.py"),
                str(root / "killed-at-step"),
                *overrides(root / "torchrun_restart", "train.steps=8"),
            ],
            root / "torchrun_restart",
        ),
    }


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Start the background run of every selected test of this module that needs one."""
    needed = {
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        for name in getattr(item, "fixturenames", ())
        if name in ("killed_mid_save", "terminated", "torchrun_restart")
    }
    root = tmp_path_factory.mktemp("background")
    runs = {
        name: BackgroundRun(name, cmd, run_dir, root)
        for name, (cmd, run_dir) in background_commands(root).items()
        if name in needed
    }
    driver = None
    if "terminated" in runs:
        driver = threading.Thread(
            target=sigterm_after_two_log_rows, args=(runs["terminated"],), daemon=True
        )
        driver.start()
    yield {"runs": runs, "root": root, "sigterm_driver": driver}
    for run in runs.values():
        run.kill()


# --- 1 process: N steps + resume + N steps == 2N steps ----------------------------------------


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Run A: 8 steps, then resumed (rebuilt Trainer, scrambled streams) to 16. Run B: 16 steps.
    EMA on, dropout and instance noise on (defaults), so every random stream matters."""
    root = tmp_path_factory.mktemp("one_process")
    train_in_process(root / "a", "train.steps=8", EMA_ON)
    resumed_summary, resumed = train_in_process(root / "a", "train.steps=16", EMA_ON)
    _, uninterrupted = train_in_process(root / "b", "train.steps=16", EMA_ON)
    return {
        "a": root / "a",
        "b": root / "b",
        "resumed": resumed,
        "uninterrupted": uninterrupted,
        "resumed_summary": resumed_summary,
    }


def test_one_process_resume_gives_bitwise_identical_parameters_ema_and_optimizer_state(one_process):
    assert one_process["resumed_summary"]["resumed_from"].endswith("step-00000008")
    assert one_process["resumed_summary"]["steps_this_run"] == 8
    assert any(k.startswith("G_ema.") for k in one_process["uninterrupted"])
    assert any(
        k.startswith("opt_D.") and k.endswith(".exp_avg_sq") for k in one_process["uninterrupted"]
    )
    assert_bitwise_equal(
        one_process["resumed"], one_process["uninterrupted"], "8 + resume + 8 vs 16 steps"
    )


def test_one_process_resume_gives_identical_train_metrics_history(one_process):
    resumed, uninterrupted = train_rows(one_process["a"]), train_rows(one_process["b"])
    assert [row["step"] for row in uninterrupted] == list(range(2, 17, 2))
    assert resumed == uninterrupted


def test_sample_grid_is_identical_across_a_resume(one_process):
    """The grid's latents are fixed by the seed: the resumed run renders the same images at step
    16 as the uninterrupted one (sample.every=0: grids at each run's last step only)."""
    resumed = one_process["a"] / "samples" / "step-00000016.png"
    uninterrupted = one_process["b"] / "samples" / "step-00000016.png"
    assert (one_process["a"] / "samples" / "step-00000008.png").is_file()
    assert resumed.read_bytes() == uninterrupted.read_bytes()


def test_one_process_resume_writes_an_identical_final_checkpoint(one_process):
    for name in ("model.safetensors", "optim.safetensors", "rng.safetensors"):
        assert_bitwise_equal(
            load_file(checkpoint_dir(one_process["a"], 16) / name),
            load_file(checkpoint_dir(one_process["b"], 16) / name),
            name,
        )


# --- 2 processes ------------------------------------------------------------------------------


def _rank_run(run_dir: Path, *extra: str) -> dict:
    """One Trainer on this rank; the process group stays open for the next one."""
    reset_accelerate(partial_state=False)  # keep PartialState: it holds the open gloo group
    scramble_global_streams()
    trainer = Trainer(load_config(None, overrides(run_dir, *extra)))
    summary = trainer.fit()
    state = final_state(trainer)
    if trainer.tracking is not None:  # rank 0
        trainer.tracking.finish()
    return {"summary": summary, "state": state, "trainer": trainer}


def _two_process_scenarios(rank: int, world: int, root: Path) -> dict:
    """Every 2-process scenario of this file in one launch: B = 16 steps; A = 8 steps, then a
    rebuilt Trainer resumes it to 16; a SIGTERM that reaches rank 1 only; a skip run with a NaN
    planted on rank 1 only (last: its close() ends the process group)."""
    results = {"uninterrupted": _rank_run(root / "b", "train.steps=16")}
    _rank_run(root / "a", "train.steps=8")
    results["resumed"] = _rank_run(root / "a", "train.steps=16")
    real_step = TrainLoop.step_all_ranks

    def sigterm_on_rank_1_only(loop, step, agree=False):
        if rank == 1 and step == SIGNAL_STEP:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler fit() installed sees it
        return real_step(loop, step, agree)

    TrainLoop.step_all_ranks = sigterm_on_rank_1_only
    try:
        # Nothing else due before step 8 (no log, sample or checkpoint): only check_every agrees.
        results["one_rank_signal"] = _rank_run(
            root / "signal",
            "train.steps=100",
            f"train.check_every={CHECK_EVERY}",
            "log.every=50",
            "checkpoint.every=50",
        )
    finally:
        TrainLoop.step_all_ranks = real_step
    real_penalty = pipeline.step.l2_penalty
    if rank == 1:
        pipeline.step.l2_penalty = NaNPenaltyAt(NAN_STEP)
    try:
        results["skip"] = _rank_run(root / "nan", "train.steps=8", "train.on_nonfinite=skip")
    finally:
        pipeline.step.l2_penalty = real_penalty
    real_average, before = Trainer._average_running_statistics_all_ranks, []

    def recording_average(trainer):
        G = trainer.accelerator.unwrap_model(trainer.state.G)
        before.append([b.clone() for n, b in G.named_buffers() if "running_" in n])
        return real_average(trainer)

    Trainer._average_running_statistics_all_ranks = recording_average
    try:
        results["per_replica_bn"] = _rank_run(
            root / "pbn", "train.steps=4", "model.g_batchnorm_sync=false"
        )
    finally:
        Trainer._average_running_statistics_all_ranks = real_average
    results["per_replica_bn"]["bn_sync"] = results["per_replica_bn"]["trainer"].bn_sync
    results["bf16_grads"] = _rank_run(root / "bf16", "train.steps=4", "train.grad_compression=bf16")
    results["bf16_grads"]["hooks"] = [
        net._get_ddp_logging_data().get("comm_hook")
        for net in (
            results["bf16_grads"]["trainer"].state.G,
            results["bf16_grads"]["trainer"].state.D,
        )
    ]
    results["per_replica_bn"]["before_average"] = before
    results["skip"]["trainer"].close()
    for run in results.values():
        del run["trainer"]
    return results


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_processes")
    ranks = run_on_ranks(
        _two_process_scenarios,
        2,
        root,
        init_process_group=False,
        env={"ACCELERATE_USE_CPU": "1"},
        timeout=300,
    )
    return {"root": root, "ranks": ranks}


def test_two_process_resume_gives_bitwise_identical_parameters_and_optimizer_state(two_processes):
    for rank, result in enumerate(two_processes["ranks"]):
        assert result["resumed"]["summary"]["resumed_from"].endswith("step-00000008")
        assert result["uninterrupted"]["summary"]["world_size"] == 2
        assert_bitwise_equal(
            result["resumed"]["state"],
            result["uninterrupted"]["state"],
            f"rank {rank}: 8 + resume + 8 vs 16 steps",
        )
    assert_bitwise_equal(
        two_processes["ranks"][1]["resumed"]["state"],
        two_processes["ranks"][0]["resumed"]["state"],
        "rank 1 vs rank 0",
    )


def test_two_process_resume_gives_identical_train_metrics_history(two_processes):
    root = two_processes["root"]
    assert [row["step"] for row in train_rows(root / "b")] == list(range(2, 17, 2))
    assert train_rows(root / "a") == train_rows(root / "b")


def test_resume_on_another_world_size_continues_step_and_data_position_and_warns(
    two_processes, tmp_path, caplog
):
    run_dir = copy_run(two_processes["root"] / "b", tmp_path / "run")
    saved = ckpt.verify(checkpoint_dir(run_dir, 16)).manifest
    assert saved["world_size"] == 2

    summary, state = train_in_process(run_dir, "train.steps=20")

    assert "resuming a 2-process checkpoint on 1 process" in caplog.text
    assert "random streams" in caplog.text
    assert summary["resumed_from"].endswith("step-00000016")
    assert (summary["steps"], summary["steps_this_run"]) == (20, 4)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(2, 21, 2))
    resumed = ckpt.verify(checkpoint_dir(run_dir, 20)).manifest
    assert resumed["world_size"] == 1
    # The epoch's images already seen (2 ranks x 16 per step) plus 4 steps of 16, none twice.
    seen_before = saved["data"]["position"] * saved["data"]["global_batch"]
    assert resumed["data"]["epoch"] == saved["data"]["epoch"] >= 1
    assert resumed["data"]["position"] * resumed["data"]["global_batch"] == seen_before + 4 * 16
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_stop_signal_reaching_one_rank_only_stops_every_rank_at_the_same_step(two_processes):
    ranks, root = two_processes["ranks"], two_processes["root"]
    for result in ranks:
        summary = result["one_rank_signal"]["summary"]
        assert summary["preempted"] is True
        # At the first agreement after the signal (train.check_every), on both ranks alike.
        assert summary["steps"] == 2 * CHECK_EVERY
    assert latest(root / "signal") == ckpt.step_dir_name(2 * CHECK_EVERY)
    ckpt.verify(checkpoint_dir(root / "signal", 2 * CHECK_EVERY))


def test_bf16_gradient_compression_trains_two_ranks_alike_and_checkpoints(two_processes):
    ranks = [r["bf16_grads"] for r in two_processes["ranks"]]
    for r in ranks:
        assert r["summary"]["steps"] == 4
        assert all("bf16" in str(hook).lower() for hook in r["hooks"]), r["hooks"]
    # The compressed all-reduce gives every rank the same averaged gradient.
    assert_bitwise_equal(ranks[1]["state"], ranks[0]["state"], "rank 1 vs rank 0, bf16 grads")
    ckpt.verify(checkpoint_dir(two_processes["root"] / "bf16", 4))


def test_per_replica_batchnorm_trains_and_saves_the_mean_of_the_ranks_running_statistics(
    two_processes,
):
    from pipeline.distributed import PER_REPLICA_BN

    ranks = [r["per_replica_bn"] for r in two_processes["ranks"]]
    assert all(r["bn_sync"] == PER_REPLICA_BN for r in ranks)
    # Each rank normalized with its own batch, yet the replica check before the save passed and
    # the saved statistics are the same on both ranks: their mean.
    saved = ckpt.verify(checkpoint_dir(two_processes["root"] / "pbn", 4)).tensors(
        "model.safetensors"
    )
    for name in (n for n in saved if "running_" in n):
        for r in ranks:
            assert torch.equal(r["state"][name], saved[name]), name
    (before_0,), (before_1,) = (r["before_average"] for r in ranks)  # one save, at step 4
    assert not any(torch.equal(a, b) for a, b in zip(before_0, before_1))


def test_two_process_skip_drops_the_same_update_on_both_ranks_when_one_rank_sees_nan(two_processes):
    rank0, rank1 = (r["skip"] for r in two_processes["ranks"])
    assert_bitwise_equal(rank1["state"], rank0["state"], "rank 1 vs rank 0 after a skipped update")
    for result in (rank0, rank1):
        assert result["summary"]["steps"] == 8
        assert result["state"]["opt_D.0.step"].item() == 8 - 1, "D skipped exactly one update"
        assert result["state"]["opt_G.0.step"].item() == 8
        assert all(
            torch.isfinite(v).all() for v in result["state"].values() if v.is_floating_point()
        )
    skipped = {
        row["step"]: row["train/skipped_updates"]
        for row in read_metrics(two_processes["root"] / "nan" / "metrics.jsonl")
    }
    assert skipped == {2: 0.0, 4: 0.0, 6: 1.0, 8: 0.0}


# --- corrupt checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", [flip_byte, truncate], ids=["flipped_byte", "truncated"])
def test_verify_refuses_a_damaged_file_naming_it(one_process, tmp_path, damage):
    step_dir = copy_run(checkpoint_dir(one_process["b"], 16), tmp_path / "step-00000016")
    damage(step_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step-00000016/model\.safetensors is corrupt"):
        ckpt.verify(step_dir)


def test_resume_auto_falls_back_past_a_corrupt_checkpoint_and_says_so(
    one_process, tmp_path, caplog
):
    run_dir = copy_run(one_process["b"], tmp_path / "run")
    flip_byte(checkpoint_dir(run_dir, 16) / "model.safetensors")

    summary, state = train_in_process(run_dir, "train.steps=16", EMA_ON)

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "step-00000016/model.safetensors is corrupt" in w and "falling back" in w for w in warnings
    )
    assert summary["resumed_from"].endswith("step-00000012")
    assert summary["steps_this_run"] == 4
    ckpt.verify(checkpoint_dir(run_dir, 16))  # rewritten whole
    assert_bitwise_equal(
        state, one_process["uninterrupted"], "fallback resume vs uninterrupted run"
    )


def test_resume_auto_refuses_when_every_checkpoint_is_corrupt(one_process, tmp_path):
    run_dir = copy_run(one_process["b"], tmp_path / "run")
    for step in (8, 12, 16):
        truncate(checkpoint_dir(run_dir, step) / "optim.safetensors")
    with (
        isolated_process_state(),
        pytest.raises(CheckpointError, match="every checkpoint under .* is corrupt"),
    ):
        Trainer(load_config(None, overrides(run_dir, "train.steps=20", EMA_ON)))


def test_cli_resume_from_a_corrupt_checkpoint_exits_4_with_one_error_line_naming_the_file(
    one_process, tmp_path, capsys
):
    step_dir = copy_run(checkpoint_dir(one_process["b"], 16), tmp_path / "step-00000016")
    flip_byte(step_dir / "model.safetensors")
    with isolated_process_state():
        code = train_cli.main(
            overrides(tmp_path / "run", "train.steps=20", EMA_ON, f"resume={step_dir}")
        )
    err = capsys.readouterr().err
    assert code == 4  # pipeline.errors: 4 is a checkpoint that cannot be used
    assert len(error_lines(err)) == 1, err
    assert "model.safetensors" in error_lines(err)[0]
    assert "Traceback" not in err


# --- refused configurations -------------------------------------------------------------------


def test_resume_with_other_widths_is_refused_naming_the_key(one_process, tmp_path):
    run_dir = copy_run(one_process["b"], tmp_path / "run")
    with (
        isolated_process_state(),
        pytest.raises(
            CheckpointError,
            match=r"model\.g_hidden=\[32, 64\] but this run has model\.g_hidden=\[32, 48\]",
        ),
    ):
        Trainer(load_config(None, overrides(run_dir, "train.steps=20", "model.g_hidden=[32,48]")))


def test_resume_with_another_dropout_warns_naming_the_value_that_trains(
    one_process, tmp_path, caplog
):
    run_dir = copy_run(one_process["b"], tmp_path / "run")
    with isolated_process_state(), caplog.at_level(logging.WARNING):
        trainer = Trainer(
            load_config(None, overrides(run_dir, "train.steps=20", "model.d_dropout=0.25"))
        )
        trainer.close()
    warned = [r.getMessage() for r in caplog.records if "resuming with" in r.getMessage()]
    # One line per changed key: this run's Dropout, and the EMA the fixture's run (b) had.
    assert [w.split("resuming with this run's ")[1] for w in warned] == [
        "model.d_dropout=0.25",
        "model.ema_decay=0.0",
    ], warned


def test_resume_none_refuses_a_non_empty_run_directory_naming_overwrite(one_process, tmp_path):
    run_dir = copy_run(one_process["b"], tmp_path / "run")
    with isolated_process_state(), pytest.raises(ConfigError, match="overwrite=true"):
        Trainer(load_config(None, overrides(run_dir, "resume=none")))
    assert step_dirs(run_dir) == ["step-00000008", "step-00000012", "step-00000016"], (
        "nothing deleted"
    )


def test_resume_none_with_overwrite_starts_fresh_at_step_0(one_process, tmp_path):
    run_dir = copy_run(one_process["b"], tmp_path / "run")
    summary, _ = train_in_process(run_dir, "resume=none", "overwrite=true", "train.steps=2")
    assert summary["resumed_from"] is None
    assert (summary["steps"], summary["steps_this_run"]) == (2, 2)
    assert step_dirs(run_dir) == ["step-00000002"]
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [2]


# --- non-finite values, 1 process -------------------------------------------------------------


def test_nan_under_stop_exits_3_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline.step, "l2_penalty", NaNPenaltyAt(NAN_STEP))
    run_dir = tmp_path / "run"
    with isolated_process_state():
        code = train_cli.main(overrides(run_dir, "train.steps=8", "train.on_nonfinite=stop"))
    err = capsys.readouterr().err
    assert code == 3
    assert len(error_lines(err)) == 1, err
    assert f"non-finite D loss or gradient at step {NAN_STEP}" in error_lines(err)[0]
    assert step_dirs(run_dir) == ["step-00000004"] and latest(run_dir) == "step-00000004"
    assert leftovers(run_dir) == []
    tensors = ckpt.verify(checkpoint_dir(run_dir, 4)).tensors("model.safetensors")
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_a_nan_found_at_a_later_agreement_is_reported_at_its_step_and_saves_nothing_after_it(
    tmp_path, monkeypatch, capsys
):
    """No host sync per step: the NaN of step 5 is read when the ranks next agree, before the
    checkpoint of step 8, which is not written; the error names step 5."""
    monkeypatch.setattr(pipeline.step, "l2_penalty", NaNPenaltyAt(NAN_STEP))
    run_dir = tmp_path / "run"
    with isolated_process_state():
        code = train_cli.main(
            overrides(run_dir, "train.steps=12", "train.check_every=100", "log.every=100")
        )
    err = error_lines(capsys.readouterr().err)
    assert code == 3 and len(err) == 1, err
    assert f"non-finite D loss or gradient at step {NAN_STEP}" in err[0]
    assert step_dirs(run_dir) == ["step-00000004"] and leftovers(run_dir) == []


def test_nan_under_skip_completes_counts_the_skipped_update_and_stays_finite(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.step, "l2_penalty", NaNPenaltyAt(NAN_STEP))
    run_dir = tmp_path / "run"
    summary, state = train_in_process(run_dir, "train.steps=8", "train.on_nonfinite=skip")
    assert summary["steps"] == 8
    skipped = {
        row["step"]: row["train/skipped_updates"] for row in read_metrics(run_dir / "metrics.jsonl")
    }
    assert skipped == {2: 0.0, 4: 0.0, 6: 1.0, 8: 0.0}
    assert state["opt_D.0.step"].item() == 8 - 1 and state["opt_G.0.step"].item() == 8
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    ckpt.verify(checkpoint_dir(run_dir, 8))


# --- what a checkpoint holds ------------------------------------------------------------------


def safetensors_header(path: Path) -> dict:
    """The JSON header that a safetensors file starts with (an 8-byte little-endian length)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    assert 8 + length <= len(data), f"{path} does not start with a safetensors header"
    return json.loads(data[8 : 8 + length])


def test_checkpoint_directory_holds_only_safetensors_and_json(one_process, two_processes):
    for run_dir in (one_process["b"], two_processes["root"] / "b"):
        checkpoints = run_dir / "checkpoints"
        top_files = sorted(p.name for p in checkpoints.iterdir() if p.is_file())
        assert top_files == [ckpt.LATEST]
        assert latest(run_dir) == "step-00000016"
        files = [p for p in checkpoints.rglob("*") if p.is_file() and p.parent != checkpoints]
        assert {p.name for p in files} == {
            "model.safetensors",
            "optim.safetensors",
            "rng.safetensors",
            "manifest.json",
        }
        for path in files:
            if path.suffix == ".safetensors":
                # Its first 8 bytes are a length (which may start with 0x80): check the layout.
                assert safetensors_header(path), f"{path} has an empty header"
                with safe_open(str(path), framework="pt") as f:
                    assert list(f.keys()), f"{path} holds no tensor"
            else:
                head = path.read_bytes()[:2]
                assert head[:1] != b"\x80", f"{path} starts with a pickle protocol header"
                json.loads(path.read_text())
        assert (checkpoints / ckpt.LATEST).read_text().isascii()
        assert all(not p.read_bytes().startswith(b"PK\x03\x04") for p in files), "a torch.save zip"


# --- export and sample ------------------------------------------------------------------------


def test_export_writes_the_ema_generator_with_the_config_in_its_metadata(
    one_process, tmp_path, capsys
):
    out = tmp_path / "g.safetensors"
    assert (
        export_cli.main(
            ["--checkpoint", str(checkpoint_dir(one_process["b"], 16)), "--out", str(out)]
        )
        == 0
    )
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    assert config["model"]["g_hidden"] == [32, 64] and config["model"]["latent_dim"] == 16
    stored = ckpt.split_prefixed(
        load_file(checkpoint_dir(one_process["b"], 16) / "model.safetensors"), "G_ema"
    )
    assert_bitwise_equal(load_file(out), stored, "exported generator vs the checkpoint's G_ema")


def test_sample_from_an_export_writes_a_png(one_process, tmp_path, capsys):
    exported = tmp_path / "g.safetensors"
    assert (
        export_cli.main(
            ["--checkpoint", str(checkpoint_dir(one_process["b"], 16)), "--out", str(exported)]
        )
        == 0
    )
    grid = tmp_path / "grid.png"
    assert sample_cli.main(["--checkpoint", str(exported), "--n", "16", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("cli", [export_cli, sample_cli], ids=["export", "sample"])
def test_export_and_sample_exit_2_naming_a_missing_checkpoint(cli, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    out = tmp_path / ("out.safetensors" if cli is export_cli else "out.png")
    assert cli.main(["--checkpoint", str(missing), "--out", str(out)]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(missing) in lines[0]
    assert not out.exists()


# --- SIGKILL in the middle of a save ----------------------------------------------------------


@pytest.fixture(scope="module")
def killed_mid_save(background):
    """What the run directory held right after the kill."""
    run = background["runs"]["killed_mid_save"]
    returncode = run.wait()
    return {
        "run_dir": run.run_dir,
        "returncode": returncode,
        "stderr": run.stderr,
        "step_dirs": step_dirs(run.run_dir),
        "latest": latest(run.run_dir),
        "leftovers": {p.name: sorted(f.name for f in p.iterdir()) for p in leftovers(run.run_dir)},
    }


def test_sigkill_mid_save_leaves_the_previous_checkpoint_complete_and_latest(killed_mid_save):
    assert killed_mid_save["returncode"] == -signal.SIGKILL, killed_mid_save["stderr"][-3000:]
    assert killed_mid_save["step_dirs"] == ["step-00000004"]
    assert killed_mid_save["latest"] == "step-00000004"
    # The interrupted write is only a temp directory: one file, no manifest.
    assert list(killed_mid_save["leftovers"].values()) == [["model.safetensors"]]
    assert next(iter(killed_mid_save["leftovers"])).startswith(".tmp-step-00000008")


@pytest.fixture(scope="module")
def resumed_after_kill(killed_mid_save):
    run_dir = killed_mid_save["run_dir"]
    ckpt.verify(checkpoint_dir(run_dir, 4))  # intact before the resume touches anything
    summary, _ = train_in_process(run_dir, "train.steps=12")
    return {"run_dir": run_dir, "summary": summary}


def test_resume_after_sigkill_mid_save_starts_from_the_complete_checkpoint_and_removes_the_leftover(
    resumed_after_kill,
):
    run_dir, summary = resumed_after_kill["run_dir"], resumed_after_kill["summary"]
    assert summary["resumed_from"].endswith("step-00000004")
    assert (summary["steps"], summary["steps_this_run"]) == (12, 8)
    assert leftovers(run_dir) == []
    assert latest(run_dir) == "step-00000012"
    ckpt.verify(checkpoint_dir(run_dir, 12))
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == list(range(2, 13, 2))


class KilledAtFirstSave(BaseException):
    """Stands in for a SIGKILL at the first checkpoint: nothing of the run after it happens."""


def test_restart_before_the_first_checkpoint_starts_over_without_doubling_metrics_rows(
    tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"

    def killed(manager, *args, **kwargs):
        raise KilledAtFirstSave

    monkeypatch.setattr(CheckpointManager, "save_all_ranks", killed)
    with pytest.raises(KilledAtFirstSave):
        train_in_process(run_dir, "train.steps=4")
    monkeypatch.undo()
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [2, 4]
    assert not (run_dir / "checkpoints").exists()

    summary, _ = train_in_process(run_dir, "train.steps=4")  # what torchrun's restart does
    assert summary["resumed_from"] is None
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [2, 4]


# --- SIGTERM ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def terminated(background):
    """A run of 100000 steps sent SIGTERM once it had logged twice."""
    run = background["runs"]["terminated"]
    returncode = run.wait()
    background["sigterm_driver"].join()
    return {"run_dir": run.run_dir, "returncode": returncode, "stderr": run.stderr}


def test_sigterm_writes_a_checkpoint_at_the_current_step_and_exits_cleanly(terminated):
    run_dir = terminated["run_dir"]
    assert terminated["returncode"] == 0, terminated["stderr"][-3000:]
    stopped_at = read_metrics(run_dir / "metrics.jsonl")[-1]["step"]
    assert stopped_at >= 4
    assert f"stopped by SIGTERM at step {stopped_at}" in terminated["stderr"]
    assert latest(run_dir) == ckpt.step_dir_name(stopped_at)
    assert ckpt.verify(checkpoint_dir(run_dir, stopped_at)).step == stopped_at
    assert not (run_dir / "summary.json").exists(), "a preempted run writes no final summary"


def test_resume_after_sigterm_continues_from_the_step_it_stopped_at(terminated):
    run_dir = terminated["run_dir"]
    stopped_at = int(latest(run_dir).removeprefix("step-"))
    summary, _ = train_in_process(run_dir, f"train.steps={stopped_at + 2}", "checkpoint.every=0")
    assert summary["resumed_from"].endswith(ckpt.step_dir_name(stopped_at))
    assert (summary["steps"], summary["steps_this_run"]) == (stopped_at + 2, 2)


# --- torchrun --max-restarts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_restart(background):
    run = background["runs"]["torchrun_restart"]
    returncode = run.wait()
    marker = background["root"] / "killed-at-step"
    return {
        "run_dir": run.run_dir,
        "returncode": returncode,
        "stderr": run.stderr,
        "killed_at": marker.read_text() if marker.exists() else None,
    }


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_which_resumes_and_finishes(torchrun_restart):
    run_dir = torchrun_restart["run_dir"]
    assert torchrun_restart["returncode"] == 0, torchrun_restart["stderr"][-3000:]
    assert torchrun_restart["killed_at"] == "4", (
        "the first worker was killed after its step-4 checkpoint"
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000004")
    assert (summary["steps"], summary["steps_this_run"]) == (8, 4)
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [2, 4, 6, 8]


def test_nan_in_g_forward_under_skip_leaves_bn_running_statistics_finite(tmp_path, monkeypatch):
    """G's BN buffers move in G's forward, before the skip decision: a skipped step restores them."""
    from pipeline.models import Generator

    real_forward, calls = Generator.forward, {"n": 0}

    def nan_once(self, z):
        out = real_forward(
            self, z * float("nan") if calls["n"] == NAN_STEP and self.training else z
        )
        calls["n"] += self.training
        return out

    monkeypatch.setattr(Generator, "forward", nan_once)
    run_dir = tmp_path / "run"
    summary, state = train_in_process(run_dir, "train.steps=8", "train.on_nonfinite=skip")
    assert summary["steps"] == 8
    running = {k: v for k, v in state.items() if "running_" in k}
    assert running and all(torch.isfinite(v).all() for v in running.values())
    assert sum(row["train/skipped_updates"] for row in read_metrics(run_dir / "metrics.jsonl")) >= 1
