"""Train the MLP GAN.

One process (CPU or one GPU):
    python pipeline/train.py --config configs/mnist5k.yaml train.steps=500
Data-parallel on every GPU of a host, or on 2 CPU processes over gloo:
    accelerate launch --config_file launch/gpus_1host.yaml pipeline/train.py --config configs/mnist5k.yaml
    accelerate launch --config_file launch/cpu_2proc.yaml pipeline/train.py --config configs/mnist5k.yaml
Overrides are dotted key=value pairs; --dry-run prints the resolved config and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file by `accelerate launch pipeline/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_config, to_yaml
from pipeline.data import DataError
from pipeline.step import NonFiniteError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML preset from configs/ (defaults apply when omitted)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Rank-aware output: every rank computes, the main process reports (warnings still show).
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end="")
            return 0
        from pipeline.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.fit()
        return 0
    except (ConfigError, DataError, CheckpointError) as exc:
        _error(trainer, exc)
        return 2
    except NonFiniteError as exc:
        _error(trainer, exc)
        return 3
    finally:
        if trainer is not None:
            trainer.close()


def _error(trainer, exc: Exception) -> None:
    """One line on stderr, from the main process only (every rank raises the same error)."""
    main = (
        trainer.accelerator.is_main_process
        if trainer is not None
        else os.environ.get("RANK", "0") == "0"
    )
    if main:
        print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
