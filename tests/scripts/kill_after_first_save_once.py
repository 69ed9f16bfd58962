"""Train, and SIGKILL this process right after its first checkpoint, once: MARKER records the
step, so the worker torchrun restarts trains on.

    python tests/scripts/kill_after_first_save_once.py MARKER KEY=VALUE...
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.checkpoint.manager import CheckpointManager  # noqa: E402
from pipeline.train import main  # noqa: E402

marker = Path(sys.argv[1])
save_all_ranks = CheckpointManager.save_all_ranks


def save_then_die_once(self, step, *args, **kwargs):
    save_all_ranks(self, step, *args, **kwargs)
    if not marker.exists():
        marker.write_text(str(step))
        os.kill(os.getpid(), signal.SIGKILL)


CheckpointManager.save_all_ranks = save_then_die_once
sys.exit(main(sys.argv[2:]))
