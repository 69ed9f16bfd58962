"""Run what only a GPU can check, each check in its own process, and print one table.

    .venv/bin/python tests/gpu/check_gpu.py                  # every GPU check (make check-gpu)
    .venv/bin/python tests/gpu/check_gpu.py --only bf16,resume-fp32
    .venv/bin/python tests/gpu/check_gpu.py --self-test      # the runner itself, on the CPU
    .venv/bin/python tests/gpu/check_gpu.py --list

Without CUDA it prints one line saying it skipped and exits 0. Otherwise each check runs as
``python tests/gpu/check_gpu.py --child NAME`` in a new process group, so a CUDA crash or a hang
(killed at the check's timeout, its spawned ranks with it) costs that check only. A check's
output goes to ``<log-dir>/<name>.log``; the table shows PASS, FAIL or SKIP, the seconds and
one line of detail. Exit status: 1 if any check failed, else 0 (2 for a usage error).

``--self-test`` runs five CPU-only checks through the same machinery: one passes, one skips,
and three fail on purpose (an exception, a SIGABRT, a hang past its 3 s timeout), so it exits 1;
``--self-test --only self-pass,self-skip`` exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KILL_GRACE_S = 5.0  # after SIGTERM (Python stacks dumped to the log), before SIGKILL


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    """``module:function`` under tests/gpu; the function returns a detail line or raises."""
    timeout_s: float
    needs_cuda: bool = True


GPU_CHECKS = (
    Check("sync-bn-nccl", "tests.gpu.sync_bn:check_nccl", 150),
    Check("sync-bn-shared-gpu", "tests.gpu.sync_bn:check_gloo_shared_gpu", 150),
    Check("bf16", "tests.gpu.precision:check_bf16", 180),
    Check("fp16-overflow", "tests.gpu.precision:check_fp16_overflow", 240),
    Check("compile", "tests.gpu.compiled:check_compile", 420),
    Check("resume-fp32", "tests.gpu.resume:check_exact_resume", 240),
)
SELF_TEST_CHECKS = (
    Check("self-pass", "tests.gpu.selftest:check_passes", 60, needs_cuda=False),
    Check("self-skip", "tests.gpu.selftest:check_skips", 60, needs_cuda=False),
    Check("self-fail", "tests.gpu.selftest:check_fails", 60, needs_cuda=False),
    Check("self-crash", "tests.gpu.selftest:check_crashes", 60, needs_cuda=False),
    Check("self-hang", "tests.gpu.selftest:check_hangs", 3, needs_cuda=False),
)
CHILD_ENV = {
    # cuBLAS reads this when its first handle is created: set before the check imports torch,
    # for torch.use_deterministic_algorithms(True) (the exact-resume checks).
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


@dataclass
class Outcome:
    name: str
    result: str  # PASS, FAIL or SKIP
    seconds: float
    detail: str


# --- the child: one check ---------------------------------------------------------------------


def run_child(target: str, result_file: Path) -> int:
    """Run one check function in this process and write its outcome as JSON."""
    import faulthandler

    # A crash (SIGSEGV, SIGABRT from a CUDA fault) leaves its Python stack in the log, and so
    # does the runner's SIGTERM to a check that outlived its timeout.
    faulthandler.enable(all_threads=True)
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.gpu import SkipCheck

    module, function = target.split(":")
    try:
        detail = getattr(importlib.import_module(module), function)()
        outcome = {"result": "PASS", "detail": str(detail or "")}
    except SkipCheck as exc:
        outcome = {"result": "SKIP", "detail": str(exc)}
    except Exception as exc:
        traceback.print_exc()  # into the check's log; the table gets one line
        outcome = {"result": "FAIL", "detail": _one_line(exc)}
    result_file.write_text(json.dumps(outcome))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a CUDA or NCCL shutdown problem after the verdict is not the
    # check's result (and must not hang the runner).
    os._exit(0 if outcome["result"] != "FAIL" else 1)


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``; a bare ``assert`` gets the line that failed."""
    first = (str(exc).strip().splitlines() or [""])[0]
    if not first:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        first = f"{Path(frame.filename).name}:{frame.lineno}: {frame.line}"
    return f"{type(exc).__name__}: {first}"


# --- the runner -------------------------------------------------------------------------------


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _last_words(log: Path) -> str:
    """The line of a log that best says why a check died: Python's fatal-error line, else the
    last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    fatal = [line for line in lines if line.startswith("Fatal Python error")]
    return fatal[-1] if fatal else next((line for line in reversed(lines) if line), "")


def run_check(check: Check, log_dir: Path, timeout_s: float | None) -> Outcome:
    """Run ``check`` in a new process group; kill the group at the timeout."""
    timeout = timeout_s if timeout_s is not None else check.timeout_s
    log = log_dir / f"{check.name}.log"
    env = {**os.environ, **CHILD_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("ACCELERATE_USE_CPU", None)  # the checks are about the GPU
    with tempfile.TemporaryDirectory(prefix="check-gpu-") as tmp, log.open("w") as out:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", check.target]
        command += ["--result-file", str(result_file)]
        start = time.monotonic()
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        finally:
            # Whatever the check left behind in its group (spawned ranks, a hung child) goes too.
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - start
        if timed_out:
            return Outcome(check.name, "FAIL", seconds, f"timed out after {timeout:g}s; killed")
        if result_file.is_file():
            outcome = json.loads(result_file.read_text())
            return Outcome(check.name, outcome["result"], seconds, outcome["detail"])
    code = proc.returncode
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        how = f"died of {name}"
    else:
        how = f"exited with status {code}"
    last = _last_words(log)
    return Outcome(
        check.name, "FAIL", seconds, f"{how} without a result" + (f": {last}" if last else "")
    )


def table(outcomes: list[Outcome]) -> str:
    rows = [("check", "result", "seconds", "detail")]
    rows += [(o.name, o.result, f"{o.seconds:.1f}", " ".join(o.detail.split())) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]

    def line(row: tuple[str, ...]) -> str:
        name, result, seconds, detail = row
        return (
            f"| {name:<{widths[0]}} | {result:<{widths[1]}} | {seconds:>{widths[2]}} | {detail} |"
        )

    rule = f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 1)}:|--------|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def cuda_summary() -> str | None:
    """'torch X, CUDA Y, N GPU (names)', or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return (
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{torch.cuda.device_count()} GPU ({', '.join(names)})"
    )


def select(only: list[str], self_test: bool) -> list[Check]:
    """The checks to run: ``only`` (any names, in that order), else the GPU or self-test set."""
    if not only:
        return list(SELF_TEST_CHECKS if self_test else GPU_CHECKS)
    known = {c.name: c for c in (*GPU_CHECKS, *SELF_TEST_CHECKS)}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"unknown check {unknown[0]!r} in --only; --list shows the names")
    return [known[name] for name in only]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="checks to run (a,b or repeat)")
    parser.add_argument("--self-test", action="store_true", help="the runner's own CPU checks")
    parser.add_argument("--timeout", type=float, help="seconds per check (default: each its own)")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "runs" / "check-gpu")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args.child, args.result_file)
    if args.list:
        for check in (*GPU_CHECKS, *SELF_TEST_CHECKS):
            print(f"{check.name:<20} {check.target}  (timeout {check.timeout_s:g}s)")
        return 0
    only = [name for item in args.only for name in item.split(",") if name]
    try:
        checks = select(only, args.self_test)
    except ValueError as exc:
        parser.error(str(exc))  # exits 2
    where = None
    if any(c.needs_cuda for c in checks):
        where = cuda_summary()
        if where is None:
            print(
                "check-gpu: skipped (no CUDA): torch sees no GPU here, so there is nothing to check"
            )
            return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(f"check-gpu: {where or 'CPU self-test'}; logs in {args.log_dir}", flush=True)
    try:
        outcomes = [run_check(check, args.log_dir, args.timeout) for check in checks]
    except KeyboardInterrupt:  # the running check's process group is already killed
        print("check-gpu: interrupted", file=sys.stderr)
        return 130
    print(table(outcomes))
    counts = {r: sum(o.result == r for o in outcomes) for r in ("PASS", "FAIL", "SKIP")}
    print(f"check-gpu: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
