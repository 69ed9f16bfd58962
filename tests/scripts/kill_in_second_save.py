"""Train, and SIGKILL this process once the first file of the second checkpoint is on disk.

python tests/scripts/kill_in_second_save.py KEY=VALUE...   (the arguments of pipeline/train.py)
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.checkpoint import format as checkpoint_format  # noqa: E402
from pipeline.train import main  # noqa: E402

write_file = checkpoint_format._write_file
save_dirs = []


def write_then_die_in_second_save(directory, name, tensors):
    write_file(directory, name, tensors)
    if directory not in save_dirs:
        save_dirs.append(directory)
    if len(save_dirs) == 2:
        os.kill(os.getpid(), signal.SIGKILL)


checkpoint_format._write_file = write_then_die_in_second_save
sys.exit(main(sys.argv[1:]))
