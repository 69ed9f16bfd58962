"""Write a PNG grid of samples from a checkpoint or an exported generator.

python -m pipeline.sample --checkpoint runs/mnist5k --n 64 --out grid.png [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError, load_generator
from pipeline.config import ConfigError
from pipeline.samples import render, save_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run directory, or an exported .safetensors",
    )
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= 4096:
        print(f"error: --n {args.n} is out of range; use 1..4096", file=sys.stderr)
        return 2
    try:
        G, cfg = load_generator(args.checkpoint, args.device)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(args.n, cfg.model.latent_dim, generator=g).to(args.device)
    save_grid(render(G, z), Path(args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
