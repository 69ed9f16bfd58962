"""Specifications of ``tests/gpu/check_gpu.py`` (``make check-gpu``), on the CPU: without CUDA it
skips in one line with status 0; its subprocess, timeout and table machinery gives PASS, SKIP
and FAIL (an exception, a crash by signal, a hang killed with its own child) and the exit
status that goes with them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.gpu.check_gpu import Outcome, table

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "gpu" / "check_gpu.py"


def run_runner(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(stdout: str) -> dict[str, tuple[str, str]]:
    """check name -> (result, detail) from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] in ("PASS", "FAIL", "SKIP"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the runner runs the checks")
def test_without_cuda_it_prints_one_skip_line_and_exits_0():
    done = run_runner()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and "skipped (no CUDA)" in lines[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_self_test_gives_pass_skip_and_fail_for_an_error_a_crash_and_a_hang(tmp_path):
    start = time.monotonic()
    done = run_runner("--self-test", "--log-dir", str(tmp_path))
    elapsed = time.monotonic() - start
    assert done.returncode == 1, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert list(rows) == ["self-pass", "self-skip", "self-fail", "self-crash", "self-hang"]
    assert rows["self-pass"][0] == "PASS" and "own process" in rows["self-pass"][1]
    assert rows["self-skip"][0] == "SKIP"
    assert rows["self-fail"] == ("FAIL", "AssertionError: a deliberate failure")
    assert rows["self-crash"][0] == "FAIL" and "died of SIGABRT" in rows["self-crash"][1]
    assert rows["self-hang"] == ("FAIL", "timed out after 3s; killed")
    assert "1 passed, 3 failed, 1 skipped" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr  # tracebacks go to the check's log
    assert "Traceback" in (tmp_path / "self-fail.log").read_text()
    assert elapsed < 15, f"self-test took {elapsed:.1f}s"

    # The hung check's own child was killed with it (its process group), not left behind.
    pid = int(re.search(r"grandchild pid (\d+)", (tmp_path / "self-hang.log").read_text())[1])
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"the hung check's child {pid} outlived the timeout"


def test_self_test_with_only_passing_checks_exits_0(tmp_path):
    done = run_runner("--self-test", "--only", "self-pass,self-skip", "--log-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert {name: result for name, (result, _) in table_rows(done.stdout).items()} == {
        "self-pass": "PASS",
        "self-skip": "SKIP",
    }


def test_an_unknown_check_name_is_a_usage_error_naming_it():
    done = run_runner("--only", "no-such-check")
    assert done.returncode == 2
    assert "unknown check 'no-such-check'" in done.stderr
    assert "Traceback" not in done.stderr


def test_table_aligns_columns_and_keeps_each_detail_on_one_line():
    text = table(
        [
            Outcome("bf16", "PASS", 12.345, "4 + 4 steps"),
            Outcome("sync-bn-shared-gpu", "FAIL", 0.5, "AssertionError: x\n  more"),
        ]
    )
    lines = text.splitlines()
    assert lines[0].startswith("| check ") and lines[0].endswith("| detail |")
    assert len(lines) == 4
    assert lines[2] == "| bf16               | PASS   |    12.3 | 4 + 4 steps |"
    assert lines[3] == "| sync-bn-shared-gpu | FAIL   |     0.5 | AssertionError: x more |"
    # every row has its bars in the same columns up to the detail
    assert len({tuple(i for i, c in enumerate(line[:40]) if c == "|") for line in lines}) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers; it is dead for this purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
