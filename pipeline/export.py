"""Export a checkpoint's generator (the EMA one when present) to one safetensors file.

    python -m pipeline.export --checkpoint runs/mnist5k/checkpoints/step-00003000 --out generator.safetensors

The file's metadata holds the run config (architecture included), so ``pipeline.sample`` and
``pipeline.evaluate`` rebuild the generator from the file alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from pipeline.checkpoint import CheckpointError, load_generator
from pipeline.config import ConfigError, to_dict


def export(checkpoint: str | Path, out: str | Path) -> Path:
    G, cfg = load_generator(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    state = {k: v.contiguous() for k, v in G.state_dict().items()}
    metadata = {
        "format": "gan-pipeline-generator/1",
        "config": json.dumps(to_dict(cfg)),
        "source": str(Path(checkpoint).resolve()),
    }
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint directory (step-NNNNNNNN) or run directory"
    )
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
