"""Train, but on rank 1 alone raise RuntimeError in step 3 (rank 0 goes on into the step's
collectives). Before raising, the time is written to RAISED_AT, so the test can measure how long
the job takes to end after the fault.

    python tests/scripts/raise_on_rank1_at_step3.py RAISED_AT ARGS...   (ARGS: those of pipeline/train.py)
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.loop import TrainLoop  # noqa: E402
from pipeline.train import main  # noqa: E402

raised_at = Path(sys.argv[1])
step_all_ranks = TrainLoop.step_all_ranks


def step_that_fails_on_rank_1(self, step: int, agree: bool = False) -> bool:
    if step == 3 and os.environ.get("RANK") == "1":
        raised_at.write_text(repr(time.time()))
        raise RuntimeError("planted failure on rank 1 at step 3")
    return step_all_ranks(self, step, agree)


TrainLoop.step_all_ranks = step_that_fails_on_rank_1
sys.exit(main(sys.argv[2:]))
