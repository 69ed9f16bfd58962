"""CPU-only checks that prove the runner itself (``check_gpu.py --self-test``): each outcome a real
check can have, through the same subprocess, timeout and table. No torch import: they start fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.gpu import SkipCheck


def check_passes() -> str:
    return f"ran in its own process (pid {os.getpid()}, runner pid {os.getppid()})"


def check_skips() -> str:
    raise SkipCheck("a check that does not apply here says why in one line")


def check_fails() -> str:
    raise AssertionError("a deliberate failure")


def check_crashes() -> str:
    """Dies the way a CUDA fault can: by a signal, with no result written."""
    print("about to abort", flush=True)
    os.abort()


def check_hangs() -> str:
    """Never returns, and leaves a process of its own, as a hung collective with its ranks does:
    the runner must kill both at the timeout."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"grandchild pid {child.pid}", flush=True)
    time.sleep(600)
    return "unreachable"
