"""The three utilities every module shares, each written once: atomic file writes, derived
seeds and latent draws. A second copy of any of them is the first bug.

- ``atomic_write(path, fill)``: a temp file beside ``path`` is filled, fsynced, given the
  permissions a plain ``open()`` would under the user's umask, renamed over ``path``, and the
  directory fsynced. A crash at any moment leaves either the old file or the new one; a failed
  write removes its temp file. Checkpoints, exports, the evaluator cache, reports, sample grids
  and metrics all go through it.
- ``derive_seed(seed, purpose, *indices)``: every derived random stream (per-rank streams, data
  order, sample grids, evaluation latents, subsampling) comes from one collision-free function
  with a purpose tag, instead of ``seed * K + rank`` arithmetic, which collides.
- ``draw_latents(n, dim, ...)``: the one way to draw z, from a device's current stream or from a
  CPU generator (the same latents on every device).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# --- atomic writes -----------------------------------------------------------------------------


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def temp_path(path: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``path`` unique to this process (``.NAME.tmp-PID``)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def atomic_write(path: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Write ``path`` all or nothing: ``fill(tmp)`` writes a temp file beside it, which is then
    fsynced, given umask permissions (0666 & ~umask, as ``open()`` would) and renamed over
    ``path``. On any failure the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        fill(tmp)
        fsync_file(tmp)
        # Writers such as safetensors create their files 0600; a teammate's evaluation job in
        # the same group should read the weights as it reads the JSON beside them.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any, **dumps_kwargs: Any) -> Path:
    options = {"indent": 2, "sort_keys": True, **dumps_kwargs}
    return atomic_write_text(path, json.dumps(data, **options) + "\n")


# --- derived seeds -----------------------------------------------------------------------------


def _purpose_words(purpose: str) -> list[int]:
    digest = hashlib.sha256(purpose.encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed for (seed, purpose, *indices), distinct for any two distinct arguments
    (numpy's SeedSequence hashes its whole entropy), unlike ``seed * world + rank``, which
    collides across world sizes and purposes."""
    if seed < 0 or any(i < 0 for i in indices):
        raise ValueError(f"seeds and indices must be >= 0, got seed={seed}, indices={indices}")
    entropy = [seed, *_purpose_words(purpose), len(indices), *indices]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def seeded_generator(seed: int, purpose: str, *indices: int) -> torch.Generator:
    """A CPU ``torch.Generator`` on the derived stream (CPU, so the draws are device-independent)."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *indices))


# --- latents -----------------------------------------------------------------------------------


def draw_latents(
    n: int,
    latent_dim: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` standard-normal latent vectors on ``device``. Without a generator they come from the
    device's current stream (training: each rank's own); with a CPU generator they are drawn on
    the CPU and moved, so a seed names the same latents on every device."""
    if generator is None:
        return torch.randn(n, latent_dim, device=device)
    return torch.randn(n, latent_dim, generator=generator).to(device)
