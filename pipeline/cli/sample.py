"""Write a PNG grid of samples from a checkpoint or an exported generator.

python -m pipeline.cli.sample --checkpoint runs/mnist5k --n 64 --out grid.png [--device cuda]

The checkpoint is verified first (``pipeline.checkpoint.verify``); exit status 2 for usage, 4 for
a checkpoint that cannot be used or an output that cannot be written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from pipeline.checkpoint import load_generator
from pipeline.cli import CliError, OneLineParser, parse_device, report, require_existing
from pipeline.errors import UserError, disk_error
from pipeline.io import draw_latents, seeded_generator
from pipeline.samples import render, save_grid

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pipeline.cli.sample", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint or run directory, or an exported .safetensors",
    )
    parser.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    try:
        args = parser.parse_args(argv)
        if not 1 <= args.n <= 4096:
            raise CliError(f"--n {args.n} is out of range; use 1..4096")
        if args.seed < 0:
            raise CliError(f"--seed {args.seed} is negative; use a seed >= 0")
        device = parse_device(args.device)
        G, cfg = load_generator(require_existing(args.checkpoint), device)
        latents = seeded_generator(args.seed, "sample-latents")
        z = draw_latents(args.n, cfg.model.latent_dim, device, latents)
        try:
            save_grid(render(G, z), Path(args.out))
        except OSError as exc:
            raise disk_error(exc, f"sample grid {args.out}") from None
    except UserError as exc:
        return report(exc)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
