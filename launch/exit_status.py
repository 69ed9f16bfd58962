"""Print the exit status that the workers of a failed `accelerate launch` / torchrun gave.

The launcher itself exits 1 whatever its workers' status (accelerate re-raises torch elastic's
ChildFailedError), so a scheduler cannot tell a bad config (2) from a non-finite stop (3), a bad
checkpoint or full disk (4), or a bug (1). pipeline/train.py writes its status into torch
elastic's per-worker error file (``errorCode``); launch with ``--log_dir DIR`` and read it back:

    accelerate launch --log_dir "$DIR" ... pipeline/train.py ... || exit "$(python launch/exit_status.py "$DIR")"

Prints the status of the root cause (the earliest error of the newest launch under DIR), or 1
when no worker left one (a crash, a signal). Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def worker_status(log_dir: Path) -> int:
    files = sorted(log_dir.glob("*/attempt_*/*/error.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return 1
    attempt = files[-1].parent.parent  # the newest launch's last attempt
    failures = []
    for path in attempt.glob("*/error.json"):
        try:
            message = json.loads(path.read_text())["message"]
            failures.append((int(message["extraInfo"]["timestamp"]), int(message["errorCode"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not written by pipeline/train.py (a bug's traceback): no status in it
    return min(failures)[1] if failures else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python launch/exit_status.py LOG_DIR")
    print(worker_status(Path(sys.argv[1])))
