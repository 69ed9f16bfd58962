"""A job whose rank fails, dies or freezes ends on its own, and a preempted job stops cleanly.

Each test runs 2 CPU processes through the real launcher (``accelerate launch``, torchrun's agent
inside), injects one fault and times how long the launcher and both workers take to be gone; the
seconds are printed as ``fault-exit:`` lines (``pytest -s``). The launcher is started in a session
of its own; torchrun starts each worker in its own session too, so the cleanup kills the workers
by pid (remembered as soon as they appear) as well as the launcher's group.

Preemption as Slurm delivers it (launch/slurm.sbatch): SIGTERM reaches every process of the job
step, more than once. The launcher runs with SIGTERM ignored (``trap '' TERM``) and torchrun's
agent told to handle the other signals only (``PET_SIGNALS_TO_HANDLE``), so only the workers act
on it: they finish the step, checkpoint, exit 0, and the launcher then exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # installed with accelerate, which requires it
import pytest

from tests.dist_utils import accelerate_launch_cmd
from tests.test_checkpoint import error_lines

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"
TRAIN = str(ROOT / "pipeline" / "train.py")
TINY = [
    "--config",
    "configs/smoke.yaml",
    "model.g_hidden=[32,64]",
    "model.d_hidden=[64,32]",
    "model.latent_dim=16",
    "train.batch_size=8",
    "log.trackers=[none]",
    "eval.enabled=false",
    "log.every=2",
]
LONG = "train.steps=100000"
"""Long enough to be still training when the fault comes (each step takes milliseconds)."""
GONE_WITHIN_S = 60.0
START_TIMEOUT_S = 120.0
SLURM_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT"}
"""The signals torchrun's agent handles (torch >= 2.9: torchrun's ``--signals-to-handle``, which
``accelerate launch`` takes from this variable only). By default it handles SIGTERM too: it
forwards it, then exits 1 with a traceback. Setting ``TORCHELASTIC_SIGNALS_TO_HANDLE`` has no
effect: the agent overwrites it with this option's value before reading it."""


@dataclass
class Job:
    """One ``accelerate launch`` of 2 CPU processes, its output in files."""

    proc: subprocess.Popen
    run: Path
    stdout: Path
    stderr: Path
    script: str
    worker_pids: set[int] = field(default_factory=set)

    def workers(self) -> dict[int, psutil.Process]:
        """The launcher's worker processes by rank (remembered for the cleanup)."""
        found = {}
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                if self.script not in " ".join(child.cmdline()):
                    continue
                found[int(child.environ()["RANK"])] = child
            except (psutil.Error, KeyError):
                continue
            self.worker_pids.add(child.pid)
        return found

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT_S):
        end = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None and not ready():
                pytest.fail(
                    f"the launcher exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
                )
            if time.monotonic() > end:
                pytest.fail(f"no {what} after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.05)

    def both_workers(self) -> dict[int, psutil.Process]:
        self.wait_for("2 workers", lambda: len(self.workers()) == 2)
        return self.workers()

    def train_rows(self) -> int:
        path = self.run / "metrics.jsonl"
        if not path.exists():
            return 0
        return sum('"train/d_loss"' in line for line in path.read_text().splitlines())

    def wait_for_rows(self, n: int) -> None:
        self.wait_for(f"{n} metrics row(s)", lambda: self.train_rows() >= n)

    def gone_after(self, fault_at: float, limit: float = GONE_WITHIN_S) -> tuple[int, float]:
        """Wait until the launcher and both workers are gone; return the launcher's status and
        the seconds since ``fault_at`` (time.time()). Fails past ``limit``."""
        assert len(self.worker_pids) == 2, "both_workers() first: their pids are checked"
        try:
            status = self.proc.wait(timeout=max(0.0, fault_at + limit - time.time()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher still runs {limit:.0f} s after the fault:\n{self.tail()}")
        while any(_alive(pid) for pid in self.worker_pids):
            if time.time() > fault_at + limit:
                pytest.fail(f"a worker still runs {limit:.0f} s after the fault:\n{self.tail()}")
            time.sleep(0.05)
        return status, time.time() - fault_at

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def tail(self) -> str:
        return (self.out()[-1500:] + "\n--- stderr ---\n" + self.err()[-4000:]).strip()

    def kill_all(self) -> None:
        """Kill whatever the test left running: the workers by pid (a stopped one is continued
        too) and the launcher's process group."""
        self.workers()
        for pid in self.worker_pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextlib.contextmanager
def launched(
    run: Path, *overrides: str, script: list[str] | None = None, slurm: bool = False, tag: str = ""
) -> Iterator[Job]:
    """``accelerate launch`` of ``script`` (pipeline/train.py by default) on 2 CPU processes.
    ``slurm``: the launch of launch/slurm.sbatch, i.e. SLURM_ENV and ``trap '' TERM`` in bash,
    then exec (an ignored signal stays ignored across exec, and the launcher's children inherit
    it)."""
    script = script or [TRAIN]
    cmd = accelerate_launch_cmd(
        *script,
        *TINY,
        f"output_dir={run}",
        *overrides,
    )
    if slurm:
        cmd = ["bash", "-c", "trap '' TERM; exec \"$@\"", "bash", *cmd]
    logs = run.parent / f"{run.name}{tag}"
    stdout, stderr = Path(f"{logs}.stdout"), Path(f"{logs}.stderr")
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "1", **(SLURM_ENV if slurm else {})}
    full_env.pop("WANDB_MODE", None)
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=out, stderr=err, start_new_session=True
        )
    job = Job(proc, run, stdout, stderr, Path(script[0]).name)
    try:
        yield job
    finally:
        job.kill_all()


def report(case: str, status: int, seconds: float, **more) -> None:
    extra = "".join(f" {k}={v}" for k, v in more.items())
    print(f"\nfault-exit: {case}: launcher status {status} after {seconds:.1f} s{extra}")


def latest_step(run: Path) -> int:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / latest / "manifest.json").read_text())["step"]


def stop_step(stderr: str) -> int:
    found = re.findall(r"stopped by SIGTERM at step (\d+)", stderr)
    assert len(found) == 1, stderr[-3000:]
    return int(found[0])


def root_cause(stderr: str) -> str:
    """The launcher's "Root Cause (first observed failure)" block: the rank, its exit code and
    its error file (our ``error:`` line for a user's error, else the traceback or the signal)."""
    _, found, block = stderr.partition("Root Cause (first observed failure):")
    assert found, stderr[-3000:]
    return block


def worker_tracebacks(stderr: str) -> list[str]:
    """Tracebacks of the workers, printed by them or quoted in the launcher's failure report.
    (The launcher itself always ends a failed run with its own ChildFailedError traceback.)"""
    return re.findall(r"^\[rank\d+\]: Traceback.*$|traceback : Traceback.*$", stderr, re.M)


def first_seen(job: Job, needles: tuple[str, ...], timeout: float = START_TIMEOUT_S) -> float:
    """time.time() at which one of ``needles`` first shows in the launcher's stderr."""
    job.wait_for(" or ".join(needles), lambda: any(n in job.err() for n in needles), timeout)
    return time.time()


# --- one rank fails, dies or freezes: the whole job ends, non-zero ------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("slurm", [False, True], ids=["torchrun", "slurm"])
def test_main_only_failure_ends_every_rank_and_the_launcher(tmp_path, slurm):
    # The first sample grid (step 2) is written by rank 0 alone; rank 1 must not wait for it.
    run = tmp_path / "run"
    (run / "samples").parent.mkdir()
    (run / "samples").write_text("a file where the samples folder should be")
    with launched(run, LONG, "sample.every=2", slurm=slurm) as job:
        job.both_workers()
        fault_at = first_seen(job, ("error:", "Traceback"))
        status, seconds = job.gone_after(fault_at)
    report(f"(a) main-only work fails ({'slurm' if slurm else 'torchrun'} launch)", status, seconds)
    assert status != 0
    err = job.err()
    errors = error_lines(err)
    assert len(errors) == 1 and "samples" in errors[0], err[-3000:]
    # A disk error: rank 0, where it happened, exits 4, and the launcher's root cause is our line
    # (rank 1 raised the same error in the same second; either may be named). No tracebacks.
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: 4 ", err), err[-3000:]
    assert re.search(r"traceback : error: .*samples.*\(exit status 4\)", root_cause(err)), err
    assert worker_tracebacks(err) == [], err[-3000:]


@pytest.mark.slow
def test_one_rank_raising_in_a_step_ends_the_job(tmp_path):
    run, raised_at = tmp_path / "run", tmp_path / "raised_at"
    script = [str(SCRIPTS / "raise_on_rank1_at_step3.py"), str(raised_at)]
    with launched(run, LONG, script=script) as job:
        job.both_workers()
        job.wait_for(
            "rank 1's planted failure", lambda: raised_at.exists() and raised_at.read_text()
        )
        status, seconds = job.gone_after(float(raised_at.read_text()))
    report("(b) rank 1 raises in step 3", status, seconds)
    assert status != 0
    # A bug, not a user's error: rank 1's traceback, which the launcher names as the root cause.
    cause = root_cause(job.err())
    assert "rank      : 1 " in cause and "planted failure on rank 1 at step 3" in cause


@pytest.mark.slow
def test_one_rank_killed_ends_the_job(tmp_path):
    run = tmp_path / "run"
    with launched(run, LONG) as job:
        rank1 = job.both_workers()[1]
        job.wait_for_rows(1)
        fault_at = time.time()
        rank1.send_signal(signal.SIGKILL)
        status, seconds = job.gone_after(fault_at)
    report("(c) rank 1 SIGKILLed", status, seconds)
    assert status != 0
    cause = root_cause(job.err())
    assert "rank      : 1 " in cause and "Signal 9 (SIGKILL)" in cause, job.err()[-3000:]


@pytest.mark.slow
def test_frozen_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    run = tmp_path / "run"
    with launched(run, LONG, "train.collective_timeout_s=10") as job:
        rank1 = job.both_workers()[1]
        job.wait_for_rows(1)
        fault_at = time.time()
        rank1.send_signal(signal.SIGSTOP)
        status, seconds = job.gone_after(fault_at)
    report("(d) rank 1 SIGSTOPped, collective_timeout_s=10", status, seconds)
    assert status != 0
    # Rank 0 gave up after the timeout; the launcher then waits its shutdown timeout (30 s) for
    # the stopped rank to act on SIGTERM before it sends SIGKILL.
    cause = root_cause(job.err())
    assert "rank      : 0 " in cause and "Timed out waiting 10000ms" in cause, job.err()[-3000:]
    assert seconds >= 10


# --- preemption ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_preemption_as_slurm_delivers_it_checkpoints_exits_0_and_resumes(tmp_path):
    # Slurm signals every process of the step; srun forwards one more: two SIGTERMs, 0.2 s apart.
    run = tmp_path / "run"
    with launched(run, LONG, "checkpoint.every=0", slurm=True) as job:
        workers = job.both_workers()
        job.wait_for_rows(2)
        everyone = [job.proc.pid, *(w.pid for w in workers.values())]
        fault_at = time.time()
        for _ in range(2):
            for pid in everyone:
                with contextlib.suppress(ProcessLookupError):  # a worker may be done already
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.2)
        status, seconds = job.gone_after(fault_at)
    report("(e) SIGTERM x2 to every process, Slurm launch", status, seconds)
    assert status == 0, job.tail()
    assert "Traceback" not in job.err(), job.err()[-3000:]
    n = stop_step(job.err())
    assert latest_step(run) == n
    summary = run / "summary.json"  # the final report: not for a stopped run
    assert not summary.exists() or json.loads(summary.read_text())["preempted"] is True

    with launched(run, f"train.steps={n + 4}", "checkpoint.every=0", slurm=True, tag="-2") as job:
        status = job.proc.wait(timeout=START_TIMEOUT_S)
    assert status == 0, job.tail()
    assert f"resumed from {run}/checkpoints/step-{n:08d} at step {n}" in job.err(), job.tail()
    assert latest_step(run) == n + 4
    assert json.loads((run / "summary.json").read_text())["steps"] == n + 4


@pytest.mark.slow
def test_sigterm_to_the_default_launcher_reaches_the_workers_checkpoint(tmp_path):
    # torchrun's default: the agent turns SIGTERM into a SignalException, forwards SIGTERM to the
    # workers and waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s), then exits 1.
    run = tmp_path / "run"
    with launched(run, LONG, "checkpoint.every=0") as job:
        job.both_workers()
        job.wait_for_rows(2)
        fault_at = time.time()
        job.proc.send_signal(signal.SIGTERM)
        status, seconds = job.gone_after(fault_at)
    err = job.err()
    report(
        "(f) one SIGTERM to the default launcher",
        status,
        seconds,
        traceback="Traceback" in err,
        SignalException="SignalException" in err,
    )
    n = stop_step(err)
    assert latest_step(run) == n
