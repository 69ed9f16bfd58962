"""Train the MLP GAN.

One process (CPU or one GPU):
    python pipeline/train.py --config configs/mnist5k.yaml train.steps=500
Data-parallel on every GPU of a host, or on 2 CPU processes over gloo:
    accelerate launch --config_file launch/gpus_1host.yaml pipeline/train.py --config configs/mnist5k.yaml
    accelerate launch --config_file launch/cpu_2proc.yaml pipeline/train.py --config configs/mnist5k.yaml
Overrides are dotted key=value pairs; --dry-run prints the resolved config and exits.

Exit status: 0 done (or stopped by a signal after its checkpoint), 2 config or usage, 3 non-finite
loss or gradient, 4 checkpoint or disk, 1 a bug (pipeline.errors). A user's error is one
``error:`` line on stderr, from the main process, and the same status on every rank; under
torchrun / accelerate launch it is also written to the worker's torch elastic error file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch pipeline/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import OneLineParser, first_line
from pipeline.config import load_config, to_yaml
from pipeline.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="pipeline/train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML preset from configs/ (defaults apply when omitted)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # launch/slurm.sbatch starts the launcher with SIGTERM ignored and the workers inherit that:
    # a worker must still end on its launcher's SIGTERM whenever the trainer is not handling it.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Rank-aware output: every rank computes, the main process reports (warnings still show).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    trainer, failure = None, None
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from pipeline.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.fit()
    except UserError as exc:  # config 2, non-finite 3, checkpoint/disk 4 (pipeline.errors)
        _record_for_launcher(exc)
        failure = exc
    except Exception as exc:  # a bug: the traceback follows, and goes to the launcher too
        _record_bug_for_launcher(exc)
        raise
    finally:
        if trainer is not None:
            trainer.close()
    if failure is None:
        return 0
    _error(trainer, failure)  # after close: every rank has left the process group
    return failure.exit_status


LAUNCHER_GRACE_S = 5.0
"""How long a rank other than 0 waits, under torch elastic, before reporting a user error."""


def _error(trainer, exc: Exception) -> None:
    """One line on stderr, from the main process (every rank raises the same error)."""
    rank = trainer.rank if trainer is not None else _env_rank()
    if rank == 0:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # The first worker to exit makes torch elastic stop the others at once: give rank 0,
        # which raised the same error, the time to print it and be the launcher's root cause.
        # Still alive after that, this rank is the only one that failed and says so itself.
        time.sleep(LAUNCHER_GRACE_S)
        print(f"error: {first_line(exc)} (on rank {rank})", file=sys.stderr)


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _record_for_launcher(exc: UserError) -> None:
    """Under torch elastic (torchrun, accelerate launch) write this worker's error file in the
    format of ``torch.distributed.elastic.multiprocessing.errors.ErrorHandler``: the launcher's
    failure report then shows the ``error:`` line and the status where it would say "To enable
    traceback see …". The launcher's own exit status stays 1 (see the README)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    line = f"error: {first_line(exc)} (exit status {exc.exit_status})"
    record = {
        "message": {
            "message": f"{type(exc).__name__}: {first_line(exc)}",
            "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))},
            "errorCode": exc.exit_status,
        }
    }
    try:  # the launcher reads it after this process exits; torch's own handler writes it so too
        Path(path).write_text(json.dumps(record))
    except OSError:
        pass  # the error line on stderr and the exit status already tell the story


def _record_bug_for_launcher(exc: Exception) -> None:
    """A bug under torch elastic: its traceback into the error file, as ``@record`` would."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)


if __name__ == "__main__":
    sys.exit(main())
