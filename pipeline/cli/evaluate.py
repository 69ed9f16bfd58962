"""Score generated images against the real data and print one JSON object of metrics.

    python -m pipeline.cli.evaluate --samples fakes.npy          # (N, 784) or (N, 1, 28, 28) in [-1, 1]
    python -m pipeline.cli.evaluate --samples fakes.safetensors  # one tensor, or one named "images"
    python -m pipeline.cli.evaluate --checkpoint runs/default/checkpoints/<step> --n 2000 --seed 0

The first run per dataset trains the evaluator's classifier (seconds) and caches it; see
``pipeline.evaluation``. Bad input exits with status 2, a checkpoint that cannot be used
(``pipeline.checkpoint.verify``) with status 4, each with one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.cli import CliError, OneLineParser, first_line, parse_device, report
from pipeline.config import DATASETS, DataConfig
from pipeline.errors import UserError
from pipeline.evaluation import MIN_SAMPLES, EvalInputError, Evaluator, validate_images
from pipeline.io import draw_latents, seeded_generator

log = logging.getLogger(__name__)

SAMPLE_SUFFIXES = (".npy", ".safetensors")
GENERATE_BATCH = 500


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pipeline.cli.evaluate", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--samples", type=Path, help="a .npy or .safetensors array of images in [-1, 1]"
    )
    source.add_argument("--checkpoint", type=Path, help="a checkpoint whose generator is sampled")
    p.add_argument("--n", type=int, default=2000, help="images generated from --checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents for --checkpoint")
    p.add_argument(
        "--data",
        choices=DATASETS,
        default=None,
        help="real dataset to compare with (default: mnist5k, or the checkpoint's run config)",
    )
    p.add_argument("--data-root", default=None, help="directory of the torchvision datasets")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="evaluator cache (default ~/.cache/gan-pipeline/evaluator)",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device for the classifier and the generator"
    )
    return p


def _read_npy(path: Path) -> np.ndarray:
    try:
        # allow_pickle=False: a sample file must never be able to run code.
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CliError(f"cannot read {path} as .npy: {first_line(exc)}") from None


def _read_safetensors(path: Path) -> torch.Tensor:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            names = list(fh.keys())
            if "images" in names:
                return fh.get_tensor("images")
            if len(names) == 1:
                return fh.get_tensor(names[0])
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CliError(f"cannot read {path} as .safetensors: {first_line(exc)}") from None
    raise CliError(
        f"{path} holds tensors {names or 'none'}; expected one tensor, or one named 'images'"
    )


def load_samples(path: Path) -> torch.Tensor | np.ndarray:
    """The raw image array stored at ``path``; shape and range are checked by the evaluator."""
    if not path.is_file():
        raise CliError(f"samples file {path} does not exist")
    if path.suffix not in SAMPLE_SUFFIXES:
        raise CliError(
            f"samples file {path} has extension {path.suffix!r}; expected .npy or .safetensors"
        )
    return _read_npy(path) if path.suffix == ".npy" else _read_safetensors(path)


@torch.no_grad()
def generate_samples(
    G: torch.nn.Module, latent_dim: int, n: int, seed: int, device: torch.device
) -> torch.Tensor:
    """``n`` images from G in eval mode. Latents are drawn on the CPU, so a seed names the same
    images on every device."""
    from pipeline.samples import generate

    z = draw_latents(n, latent_dim, device, seeded_generator(seed, "evaluate-latents"))
    return generate(G.to(device), z, chunk=GENERATE_BATCH).cpu()


def sample_checkpoint(
    path: Path, n: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, DataConfig]:
    """Images from the checkpoint's generator, and the data config it was trained on."""
    if not path.exists():
        raise CliError(f"checkpoint {path} does not exist")
    if n < MIN_SAMPLES:
        raise CliError(f"--n {n} is too small; at least {MIN_SAMPLES} images are needed to score")
    if seed < 0:
        raise CliError(f"--seed {seed} is negative; use a seed >= 0")
    from pipeline.checkpoint import load_generator  # lazily: only this mode needs it

    G, run_cfg = load_generator(path)  # verified; CheckpointError (status 4) names file and key
    return generate_samples(G, run_cfg.model.latent_dim, n, seed, device), run_cfg.data


def _data_config(base: DataConfig, name: str | None, root: str | None) -> DataConfig:
    changes = {k: v for k, v in (("name", name), ("root", root)) if v is not None}
    return dataclasses.replace(base, **changes)


def run(argv: list[str] | None = None) -> dict[str, float]:
    """Parse, load or generate the images, score them; raises CliError/EvalInputError/DataError."""
    args = build_parser().parse_args(argv)
    device = parse_device(args.device)
    if args.samples is not None:
        images, data_cfg = load_samples(args.samples), DataConfig()
    else:
        images, data_cfg = sample_checkpoint(args.checkpoint, args.n, args.seed, device)
    try:
        images = validate_images(images)  # before the data and classifier: bad input fails fast
    except EvalInputError as exc:
        raise CliError(f"{args.samples or args.checkpoint}: {exc}") from None
    data_cfg = _data_config(data_cfg, args.data, args.data_root)
    evaluator = Evaluator.for_dataset(data_cfg, cache_dir=args.cache_dir, device=device)
    return evaluator.score(images)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        metrics = run(argv)
    except EvalInputError as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    except UserError as exc:  # usage, data: 2; checkpoint: 4
        return report(exc)
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
