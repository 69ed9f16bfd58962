"""The checkpoint format and its file mechanics: safetensors and JSON only, atomic, verified.

Policy (what to resume from, when to save, what to keep) lives in ``manager.py``; this module
writes, reads and verifies files and knows nothing of the trainer. What a valid checkpoint is
(the schema every reader checks) lives in ``schema.py``.

Layout of ``output_dir/checkpoints/``::

    step-00001000/
        model.safetensors      G, D and (when on) G_ema state dicts, prefixed "G." "D." "G_ema."
        optim.safetensors      both Adam states, "opt_G.<param index>.<key>"
        rng.safetensors        every rank's random state, one uint8 tensor per rank
        manifest.json          step, data order, config, tracker run id, optimizer hyper-
                               parameters, fp16 loss scaler, the log interval in progress,
                               sha256 and size of every file; written last
    latest                     name of the newest complete checkpoint, replaced atomically

A checkpoint is written to ``.tmp-step-…``, every file fsynced, then renamed into place; the
``latest`` pointer moves after that and old checkpoints are deleted only then. A process killed
at any moment leaves the previous checkpoint complete; a failed save (a full disk) removes its
temp directory. Nothing is pickled: loading reads safetensors and JSON only, and ``verify``
checks the whole schema before any tensor is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save

from pipeline.checkpoint import schema
from pipeline.errors import CheckpointError, ConfigError
from pipeline.io import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
# Model keys whose change makes a checkpoint's tensors unusable.
ARCHITECTURE_KEYS = ("latent_dim", "g_hidden", "d_hidden", "image_size", "g_batchnorm")

log = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _cuda_device_index() -> int | None:
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def capture_rng_state() -> bytes:
    """This process's random states as JSON bytes: torch CPU, its *own* current CUDA device (not
    every visible one: ranks share a host's devices), Python and NumPy."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    device = _cuda_device_index()
    state = {
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "torch_cuda": None
        if device is None
        else {
            "device": device,
            "state": base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode(),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
    }
    return json.dumps(state).encode()


def rng_blob_covers_this_process(blob: bytes) -> bool:
    """Whether ``blob`` holds every stream this process draws from: on a GPU, its CUDA state (a
    checkpoint written on the CPU, or by an older version, has none)."""
    state = json.loads(blob.decode())
    device = _cuda_device_index()
    return device is None or isinstance(state.get("torch_cuda"), dict)


def restore_rng_state(blob: bytes) -> None:
    state = json.loads(blob.decode())
    torch.set_rng_state(
        torch.frombuffer(bytearray(base64.b64decode(state["torch_cpu"])), dtype=torch.uint8).clone()
    )
    cuda, device = state.get("torch_cuda"), _cuda_device_index()
    if device is not None and isinstance(cuda, dict):
        blob_cuda = base64.b64decode(cuda["state"])
        torch.cuda.set_rng_state(
            torch.frombuffer(bytearray(blob_cuda), dtype=torch.uint8).clone(), device
        )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- writing ----------------------------------------------------------------------------------


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's bytes. Written by Python afterwards, so a full disk is an OSError
    with its errno (safetensors' own writer reports it as a SafetensorError)."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return safetensors_save(cpu, metadata=metadata)


def _write_file(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(directory / name, serialize(tensors))


def remove_leftovers(checkpoints_dir: Path) -> None:
    """Delete temp and trash directories of interrupted saves (a kill leaves one behind)."""
    for leftover in list(checkpoints_dir.glob(".tmp-step-*")) + list(
        checkpoints_dir.glob(".trash-step-*")
    ):
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    files: dict[str, dict[str, torch.Tensor]],
    manifest: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``files`` (name -> tensors) and the manifest atomically as ``step-NNNNNNNN``.

    Called on the main process only. Returns the final directory. On any failure (a full disk
    included) the temp directory is removed and the previous checkpoints are left as they were.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(checkpoints_dir)  # killed saves of earlier processes: free their space first
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        records = {}
        for name, tensors in files.items():
            _write_file(tmp, name, tensors)
            records[name] = {
                "sha256": sha256_file(tmp / name),
                "bytes": (tmp / name).stat().st_size,
            }
        manifest = {
            **manifest,
            "format": FORMAT_VERSION,
            "step": step,
            "files": records,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        _move_into_place(tmp, final)
        fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(checkpoints_dir / LATEST, final.name + "\n")
    _rotate(checkpoints_dir, keep_last)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    # Re-saving a step (e.g. after a resume): move the old one out of the way first.
    trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
    os.rename(final, trash)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(trash, final)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _rotate(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, and leftovers of killed writes."""
    complete = sorted(p for p in step_dirs(checkpoints_dir) if os.path.lexists(p / MANIFEST))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(checkpoints_dir)


# --- reading ----------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checkpoint directory that ``verify`` accepted, with its (schema-checked) manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of one of the listed files (``model.safetensors``, ...)."""
        if name not in schema.REQUIRED_FILES or name not in self.manifest.get("files", {}):
            raise CheckpointError(f"checkpoint {self.path} does not list {name}")
        file = self.path / name
        _check_regular_file(file)
        try:
            return load_file(str(file), device=str(device))
        except Exception as exc:  # changed on disk since it was verified
            raise schema.fail(
                file, "the safetensors file", f"cannot be read ({_first(exc)})"
            ) from None


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_regular_file(file: Path, what: str = "checkpoint file") -> os.stat_result:
    """``file`` exists and is a regular file, not a symbolic link (which could lead anywhere)."""
    try:
        st = os.lstat(file)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {file} is missing; use another checkpoint") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {file} cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"{what} {file} is a symbolic link; a checkpoint holds regular files only, "
            "use another checkpoint"
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{what} {file} is not a regular file; use another checkpoint")
    return st


def read_manifest(path: Path) -> Any:
    """A checkpoint directory's manifest as parsed JSON, without checking its schema or files;
    CheckpointError names it."""
    manifest_path = Path(path) / MANIFEST
    if not os.path.lexists(manifest_path):
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {MANIFEST} is missing; "
            "point resume= at a complete step-NNNNNNNN directory"
        )
    st = _check_regular_file(manifest_path)
    if st.st_size > schema.MAX_MANIFEST_BYTES:
        raise schema.fail(
            manifest_path, "the manifest", f"is {st.st_size} bytes, more than a manifest holds"
        )
    try:
        return json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(
            f"checkpoint file {manifest_path} is corrupt ({type(exc).__name__}: {_first(exc)}); "
            "use another checkpoint"
        ) from None


def verify(path: Path) -> Checkpoint:
    """The schema check every reader runs before any tensor is used: the manifest's keys and
    types, every listed file's name, type, size and sha256, every tensor's name, shape and
    dtype against the stored config, finite weights, parseable random states. CheckpointError
    names the file and the key."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; use another checkpoint")
    manifest = read_manifest(path)
    manifest_path = path / MANIFEST
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {manifest.get('format')!r}, this version reads "
            f"{FORMAT_VERSION}; use the gan-pipeline version that wrote it"
        )
    cfg = schema.check_manifest(manifest, manifest_path)
    if schema.STEP_DIR.fullmatch(path.name) and int(path.name[5:]) != manifest["step"]:
        raise schema.fail(
            manifest_path, "'step'", f"is {manifest['step']} but the directory is {path.name}"
        )
    schema.check_param_groups(manifest, cfg, manifest_path)
    for name, record in manifest["files"].items():
        file = path / name
        st = _check_regular_file(file)
        if st.st_size != record["bytes"] or sha256_file(file) != record["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} is corrupt (size or sha256 differs from "
                f"{MANIFEST}); use another checkpoint"
            )
    for name, specs in schema.expected_tensors(cfg, manifest).items():
        schema.check_header(path / name, specs)
    for name in (schema.MODEL_FILE, schema.OPTIM_FILE):
        schema.check_finite(path / name, load_file(str(path / name)))
    for key, blob in load_file(str(path / schema.RNG_FILE)).items():
        schema.check_rng_blob(bytes(blob.numpy().tobytes()), path / schema.RNG_FILE, key)
    return Checkpoint(path, manifest)


def step_dirs(checkpoints_dir: Path) -> list[Path]:
    """``step-NNNNNNNN`` directories of their own (a symbolic link is never one)."""
    if not checkpoints_dir.is_dir():
        return []
    return [
        p
        for p in checkpoints_dir.iterdir()
        if schema.STEP_DIR.fullmatch(p.name) and not p.is_symlink() and p.is_dir()
    ]


def read_latest(checkpoints_dir: Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, or None without a pointer. CheckpointError
    unless it is a small regular text file naming a ``step-NNNNNNNN`` directory beside it."""
    pointer = checkpoints_dir / LATEST
    if not os.path.lexists(pointer):
        return None
    fix = "pass a step-NNNNNNNN directory instead, or write its name into the pointer"
    if pointer.is_symlink() or not pointer.is_file():
        kind = "a symbolic link" if pointer.is_symlink() else "not a regular file"
        raise CheckpointError(f"checkpoint pointer {pointer} is {kind}; {fix}")
    if pointer.stat().st_size > schema.MAX_LATEST_BYTES:
        raise CheckpointError(
            f"checkpoint pointer {pointer} is {pointer.stat().st_size} bytes, too large to hold "
            f"a checkpoint name; {fix}"
        )
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint pointer {pointer} is not text; {fix}") from None
    if not schema.STEP_DIR.fullmatch(name):
        raise CheckpointError(
            f"checkpoint pointer {pointer} holds {name[:40]!r}, not a step-NNNNNNNN name; {fix}"
        )
    target = checkpoints_dir / name
    if target.is_symlink():
        raise CheckpointError(
            f"checkpoint pointer {pointer} names {name}, which is a symbolic link, not a "
            f"checkpoint directory of this run; {fix}"
        )
    if target not in step_dirs(checkpoints_dir):
        raise CheckpointError(
            f"checkpoint pointer {pointer} names {name}, which does not exist there; {fix}"
        )
    return target


def check_latest_replaceable(checkpoints_dir: Path) -> None:
    """A run that will save here needs ``latest`` to be absent or a file it can replace."""
    pointer = checkpoints_dir / LATEST
    if os.path.lexists(pointer) and not pointer.is_symlink() and not pointer.is_file():
        raise CheckpointError(
            f"checkpoint pointer {pointer} is not a file, so no checkpoint could be recorded; "
            "remove it (it should hold the name of the newest step-NNNNNNNN)"
        )


def complete_checkpoints(checkpoints_dir: Path, strict: bool = False) -> list[Path]:
    """Complete checkpoint directories, newest first (the ``latest`` pointer's target first).

    A damaged ``latest`` raises CheckpointError with ``strict``; otherwise it is ignored with a
    warning and the directories are ordered by step."""
    found = sorted(
        (p for p in step_dirs(checkpoints_dir) if os.path.lexists(p / MANIFEST)), reverse=True
    )
    if checkpoints_dir.is_dir():
        for link in checkpoints_dir.glob("step-*"):
            if link.is_symlink():
                log.warning(
                    "%s is a symbolic link, not a checkpoint of this run; skipping it", link
                )
    try:
        target = read_latest(checkpoints_dir)
    except CheckpointError as exc:
        if strict:
            raise
        log.warning("%s; ignoring it and taking the newest checkpoint that verifies", exc)
        target = None
    if target in found:
        found.remove(target)
        found.insert(0, target)
    return found


def find_resumable(checkpoints_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes ``verify``; bad ones are skipped with a warning."""
    for path in complete_checkpoints(checkpoints_dir):
        try:
            return verify(path)
        except CheckpointError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
    return None


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint from a user-given path: a step directory, or a run / checkpoints directory
    (then the checkpoint its ``latest`` names). The path itself may be a symbolic link (the user
    chose it); nothing inside a checkpoint may be."""
    path = Path(path)
    if os.path.lexists(path / MANIFEST):
        return verify(path)
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file; expected a step-NNNNNNNN directory holding {MANIFEST}, "
            "or a run directory with checkpoints/"
        )
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir():
            found = complete_checkpoints(candidate, strict=True)
            if found:
                return verify(found[0])
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
    changed = [k for k in sorted(set(stored) | set(model_cfg)) if stored.get(k) != model_cfg.get(k)]
    for key in changed:  # e.g. a requeued run after a default changed: say which value trains
        log.warning(
            "checkpoint %s was written with model.%s=%r; resuming with this run's model.%s=%r",
            path,
            key,
            stored.get(key),
            key,
            model_cfg.get(key),
        )


def split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


EXPORT_FORMAT = "gan-pipeline-generator/1"


def read_export(path: Path, device: str | torch.device = "cpu"):
    """An exported generator file: ``(cfg, state)`` after the same checks as a checkpoint's
    (metadata config valid, every tensor of G with the shape and dtype the config implies)."""
    from pipeline.config import from_dict

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({_first(exc)}); "
            "pass a checkpoint directory or a pipeline.cli.export file"
        ) from None
    if "config" not in meta:
        raise CheckpointError(
            f"{path} has no 'config' metadata; it was not written by pipeline.cli.export"
        )
    if meta.get("format", EXPORT_FORMAT) != EXPORT_FORMAT:
        raise schema.fail(
            path, "metadata 'format'", f"is {meta['format'][:40]!r}, not {EXPORT_FORMAT}"
        )
    try:
        cfg = from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise schema.fail(path, "metadata 'config'", f"is not JSON ({_first(exc)})") from None
    except ConfigError as exc:
        raise schema.fail(path, "metadata 'config'", f"is not a valid run config ({exc})") from None
    schema.check_header(path, schema.generator_specs(cfg.model))
    state = load_file(str(path), device=str(device))
    schema.check_finite(path, state)
    return cfg, state


def load_generator(path: str | Path, device: str | torch.device = "cpu"):
    """The generator of a checkpoint (EMA weights when present) or of an export, in eval mode,
    after ``verify`` (or the export's checks) accepted it.

    Returns ``(G, cfg)`` with ``cfg`` the run's :class:`~pipeline.config.RunConfig`.
    """
    from pipeline.config import from_dict
    from pipeline.models import Generator

    path = Path(path)
    if path.is_file():  # an export written by pipeline.cli.export
        cfg, state = read_export(path, device)
    else:
        ckpt = resolve_checkpoint(path)
        cfg = from_dict(ckpt.manifest["config"])
        tensors = ckpt.tensors(schema.MODEL_FILE, device)
        state = split_prefixed(tensors, "G_ema") or split_prefixed(tensors, "G")
    G = Generator(cfg.model).to(device)
    G.load_state_dict(state)
    return G.eval(), cfg
