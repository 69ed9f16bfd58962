"""The command-line tools beside training, each a thin ``main(argv) -> exit status``:

    python -m pipeline.cli.evaluate   score samples or a checkpoint (gan-evaluate)
    python -m pipeline.cli.sample     write a PNG grid from a generator (gan-sample)
    python -m pipeline.cli.export     write a checkpoint's generator to safetensors (gan-export)

Training itself is ``pipeline/train.py`` (gan-train). A user's mistake is one ``error:`` line on
stderr and the status of ``pipeline.errors``: 2 for usage, 4 for a checkpoint that cannot be
used or a file that cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from pipeline.errors import ConfigError, UserError


class CliError(ConfigError):
    """Bad command-line input, reported as one ``error:`` line with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block; the CLI contract is one error line.
        raise CliError(f"{message} (see {self.prog} --help)")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def require_existing(path: str | Path, flag: str = "--checkpoint") -> Path:
    """A path the user named must exist: a missing one is a usage error (2), not a bad file."""
    path = Path(path)
    if not path.exists():
        raise CliError(f"{flag} {path} does not exist")
    return path


def report(exc: UserError) -> int:
    """Print ``exc`` as the one ``error:`` line; return its exit status."""
    print(f"error: {first_line(exc)}", file=sys.stderr)
    return exc.exit_status


def parse_device(name: str):
    """``--device`` as a torch device that this machine has."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CliError(f"--device {name!r} is not a torch device: {first_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(
            f"--device {name} asked for CUDA, which this machine lacks; use --device cpu"
        )
    return device
