"""Checkpoints in safetensors and JSON only: atomic, verified, rotating.

Layout of ``output_dir/checkpoints/``::

    step-00001000/
        model.safetensors      G, D and (when on) G_ema state dicts, prefixed "G." "D." "G_ema."
        optim.safetensors      both Adam states, "opt_G.<param index>.<key>"
        rng.safetensors        every rank's random state, one uint8 tensor per rank
        manifest.json          step, data order, config, tracker run id, optimizer hyper-
                               parameters, sha256 and size of every file; written last
    latest                     name of the newest complete checkpoint, replaced atomically

A checkpoint is written to ``.tmp-step-…``, every file fsynced, then renamed into place; the
``latest`` pointer moves after that and old checkpoints are deleted only then. A process killed
at any moment leaves the previous checkpoint complete. Nothing is pickled: loading reads
safetensors and JSON only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
# Model keys whose change makes a checkpoint's tensors unusable.
ARCHITECTURE_KEYS = ("latent_dim", "g_hidden", "d_hidden", "image_size", "g_batchnorm")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file or key and the fix."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- state <-> tensors ------------------------------------------------------------------------


def optimizer_to_tensors(
    opt: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam-style state as flat tensors plus JSON-able hyperparameters (no pickle)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        idx, key = name[len(prefix) + 1 :].split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def capture_rng_state() -> torch.Tensor:
    """This process's torch (CPU, CUDA), Python and NumPy random states as one uint8 tensor (JSON)."""
    np_state = np.random.get_state()
    state = {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "torch_cuda": [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
        if torch.cuda.is_available()
        else [],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    return torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8).clone()


def restore_rng_state(blob: torch.Tensor) -> None:
    state = json.loads(bytes(blob.numpy().tobytes()).decode())
    torch.set_rng_state(
        torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8).clone()
    )
    if torch.cuda.is_available() and state["torch_cuda"]:
        cuda = [
            torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()
            for s in state["torch_cuda"]
        ]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- writing ----------------------------------------------------------------------------------


def _write_file(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    path = directory / name
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    _fsync_file(path)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    manifest: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``files`` (name -> tensors) and the manifest atomically as ``step-NNNNNNNN``.

    Called on the main process only. Returns the final directory.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    records = {}
    for name, tensors in files.items():
        _write_file(tmp, name, tensors)
        records[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    manifest = {
        **manifest,
        "format": FORMAT_VERSION,
        "step": step,
        "files": records,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    if (
        final.exists()
    ):  # re-saving a step (e.g. after a resume): move the old one out of the way first
        trash = checkpoints_dir / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(checkpoints_dir)
    pointer = checkpoints_dir / LATEST
    pointer_tmp = checkpoints_dir / f".{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(final.name + "\n")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, pointer)
    _fsync_dir(checkpoints_dir)
    _rotate(checkpoints_dir, keep_last)
    return final


def _rotate(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, and leftovers of killed writes."""
    complete = sorted(p for p in checkpoints_dir.glob("step-*") if (p / MANIFEST).is_file())
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in list(checkpoints_dir.glob(".tmp-step-*")) + list(
        checkpoints_dir.glob(".trash-step-*")
    ):
        shutil.rmtree(leftover, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self.path / name), device=str(device))


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint directory's manifest, without checking its files; CheckpointError names it."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {MANIFEST} is missing; "
            "point resume= at a complete step-NNNNNNNN directory"
        )
    try:
        return json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint file {manifest_path} is corrupt ({exc}); use another checkpoint"
        ) from None


def verify(path: Path) -> Checkpoint:
    """Read the manifest and check every file's size and sha256; CheckpointError names the file."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {manifest.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}; use the gan-pipeline version that wrote it"
        )
    for name, record in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing; use another checkpoint")
        if file.stat().st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} is corrupt (size or sha256 differs from "
                f"{MANIFEST}); use another checkpoint"
            )
    return Checkpoint(path, manifest)


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoint directories, newest first (the ``latest`` pointer's target first)."""
    if not checkpoints_dir.is_dir():
        return []
    found = sorted(
        (p for p in checkpoints_dir.glob("step-*") if (p / MANIFEST).is_file()), reverse=True
    )
    pointer = checkpoints_dir / LATEST
    if pointer.is_file():
        target = checkpoints_dir / pointer.read_text().strip()
        if target in found:
            found.remove(target)
            found.insert(0, target)
    return found


def find_resumable(checkpoints_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; corrupt ones are skipped with a warning naming them."""
    for path in complete_checkpoints(checkpoints_dir):
        try:
            return verify(path)
        except CheckpointError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
    return None


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint from a user-given path: a step directory, or a run / checkpoints directory
    (then its newest complete checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return verify(path)
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and complete_checkpoints(candidate):
            return verify(complete_checkpoints(candidate)[0])
    raise CheckpointError(
        f"no checkpoint at {path}: expected a step-NNNNNNNN directory holding {MANIFEST}, "
        "or a run directory with checkpoints/"
    )


def check_compatible(manifest: dict[str, Any], model_cfg: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose architecture differs from this run's, naming the key."""
    stored = manifest["config"]["model"]
    for key in ARCHITECTURE_KEYS:
        if stored.get(key) != model_cfg.get(key):
            raise CheckpointError(
                f"checkpoint {path} was written with model.{key}={stored.get(key)!r} but this run has "
                f"model.{key}={model_cfg.get(key)!r}; use the same value or a new output_dir"
            )


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def load_generator(path: str | Path, device: str | torch.device = "cpu"):
    """The generator of a checkpoint (EMA weights when present) or of an export, in eval mode.

    Returns ``(G, cfg)`` with ``cfg`` the run's :class:`~pipeline.config.RunConfig`.
    """
    from pipeline.config import from_dict
    from pipeline.models import Generator

    path = Path(path)
    if path.is_file():  # an export written by pipeline.export
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}); "
                "pass a checkpoint directory or a pipeline.export file"
            ) from None
        if "config" not in meta:
            raise CheckpointError(
                f"{path} has no 'config' metadata; it was not written by pipeline.export"
            )
        cfg = from_dict(json.loads(meta["config"]))
        state = load_file(str(path), device=str(device))
    else:
        ckpt = resolve_checkpoint(path)
        cfg = from_dict(ckpt.manifest["config"])
        tensors = ckpt.tensors("model.safetensors", device)
        state = split_prefixed(tensors, "G_ema") or split_prefixed(tensors, "G")
    G = Generator(cfg.model).to(device)
    G.load_state_dict(state)
    return G.eval(), cfg
