"""Export a checkpoint's generator (the EMA one when present) to one safetensors file.

    python -m pipeline.cli.export --checkpoint runs/mnist5k/checkpoints/step-00003000 --out generator.safetensors

The file's metadata holds the run config (architecture included), so ``pipeline.cli.sample``
and ``pipeline.cli.evaluate`` rebuild the generator from the file alone. The checkpoint is
verified first (``pipeline.checkpoint.verify``); exit status 2 for usage, 4 for a checkpoint
that cannot be used or an output that cannot be written.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipeline.checkpoint import load_generator
from pipeline.checkpoint.format import EXPORT_FORMAT, serialize
from pipeline.cli import OneLineParser, report, require_existing
from pipeline.config import to_dict
from pipeline.errors import UserError, disk_error
from pipeline.io import atomic_write_bytes

log = logging.getLogger(__name__)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the generator of ``checkpoint`` (its EMA copy when present) to ``out``, atomically."""
    G, cfg = load_generator(checkpoint)
    state = {k: v.contiguous() for k, v in G.state_dict().items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "config": json.dumps(to_dict(cfg)),
        "source": str(Path(checkpoint).resolve()),
    }
    data = serialize(state, metadata)
    try:
        return atomic_write_bytes(out, data)
    except OSError as exc:
        raise disk_error(exc, f"export {out}") from None


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m pipeline.cli.export",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (step-NNNNNNNN) or run directory"
    )
    parser.add_argument("--out", required=True, help="output .safetensors file")
    try:
        args = parser.parse_args(argv)
        path = export(require_existing(args.checkpoint), args.out)
    except UserError as exc:
        return report(exc)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
