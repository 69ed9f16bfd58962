"""What a valid checkpoint is: the one schema check every reader runs before any tensor is used.

``format.verify`` (resume, evaluate, sample, export) calls these checks in order:

1. the manifest is a JSON mapping with every key the loader reads, of the right type and range
   (``check_manifest``), its config one that ``pipeline.config.from_dict`` accepts;
2. every file the loader needs is listed, under a plain name (no ``/``, no ``..``, no absolute
   path, no hidden name: ``check_file_name``), and is a regular file inside the directory, not a
   symbolic link (``format.verify`` checks size and sha256 too);
3. every tensor has the name, shape and dtype that the stored config implies
   (``expected_tensors``: G, D and G_ema from ``pipeline.models.build_models`` on the meta
   device; each Adam state tensor like its parameter, ``step`` a float32 scalar), read from the
   safetensors header alone (``check_header``); model and optimizer tensors are finite;
4. every rank's random state is UTF-8 JSON of the expected structure (``check_rng_blob``).

A failure is a ``CheckpointError`` naming the file and the key. Nothing here opens a file by a
name taken from the manifest before ``check_file_name`` has accepted it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CheckpointError, ConfigError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
RNG_FILE = "rng.safetensors"
REQUIRED_FILES = (MODEL_FILE, OPTIM_FILE, RNG_FILE)
OPTIMIZERS = ("opt_G", "opt_D")
STEP_DIR = re.compile(r"step-\d{8}")
MAX_MANIFEST_BYTES = 1 << 20
MAX_LATEST_BYTES = 64
MAX_WORLD_SIZE = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
_RNG_PYTHON_WORDS = 625  # random.getstate(): 624 Mersenne Twister words + the index
_RNG_NUMPY_WORDS = 624

Spec = tuple[tuple[int, ...], str]
"""A tensor's expected (shape, safetensors dtype)."""


def fail(
    file: Path, key: str, problem: str, fix: str = "use another checkpoint"
) -> CheckpointError:
    """The one-line error: the file, the key, what is wrong, the fix."""
    return CheckpointError(f"checkpoint file {file}: {key} {problem}; {fix}")


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, str)) or _is_number(value)


class _Reader:
    """Typed access to a JSON tree, failing with the file and the dotted key."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, key: str, problem: str) -> CheckpointError:
        return fail(self.file, f"'{key}'", problem)

    def get(self, tree: Mapping, parent: str, name: str) -> Any:
        key = f"{parent}.{name}" if parent else name
        if name not in tree:
            raise self.fail(key, "is missing")
        return tree[name]

    def mapping(self, tree: Mapping, parent: str, name: str) -> Mapping:
        value = self.get(tree, parent, name)
        if not isinstance(value, Mapping):
            raise self.fail(_join(parent, name), f"must be a mapping, got {_kind(value)}")
        return value

    def integer(self, tree: Mapping, parent: str, name: str, low: int, high: int) -> int:
        value = self.get(tree, parent, name)
        if not _is_int(value) or not low <= value <= high:
            raise self.fail(
                _join(parent, name), f"must be an integer in [{low}, {high}], got {_kind(value)}"
            )
        return value


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


# --- 1. the manifest ---------------------------------------------------------------------------


def check_manifest(manifest: Any, file: Path):
    """Every key the loaders read, with its type and range; returns the stored RunConfig."""
    from pipeline.config import from_dict

    r = _Reader(file)
    if not isinstance(manifest, Mapping):
        raise fail(file, "the manifest", f"must be a JSON mapping, got {_kind(manifest)}")
    r.integer(manifest, "", "step", 0, 2**63 - 1)
    world = r.integer(manifest, "", "world_size", 1, MAX_WORLD_SIZE)
    stored = r.mapping(manifest, "", "config")
    try:
        cfg = from_dict(dict(stored))
    except ConfigError as exc:
        raise r.fail("config", f"is not a valid run config ({exc})") from None
    _check_files_map(r, manifest)
    _check_optimizers(r, manifest)
    data = r.mapping(manifest, "", "data")
    for name in ("epoch", "position"):
        r.integer(data, "data", name, 0, 2**63 - 1)
    for name in ("num_items", "global_batch"):
        r.integer(data, "data", name, 1, 2**63 - 1)
    run_id = r.get(manifest, "", "tracker_run_id")
    if run_id is not None and not (isinstance(run_id, str) and 0 < len(run_id) <= 128):
        raise r.fail("tracker_run_id", f"must be a short string or null, got {_kind(run_id)}")
    if not isinstance(r.get(manifest, "", "ema"), bool):
        raise r.fail("ema", f"must be true or false, got {_kind(manifest['ema'])}")
    if manifest.get("scaler") is not None:
        check_scaler(r, manifest["scaler"])
    if manifest.get("stats") is not None:
        _check_stats(r, manifest["stats"], world)
    return cfg


def check_file_name(name: Any, file: Path) -> str:
    """A file name listed in a manifest: a plain name inside the checkpoint directory."""
    if not isinstance(name, str) or not name:
        raise fail(file, f"files key {_kind(name)}", "is not a file name")
    plain = (
        "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
        and len(name) <= 255
    )
    if not plain:
        raise fail(
            file,
            f"'files' entry {name!r}",
            "is not a plain file name inside the checkpoint directory "
            "(no '/', '..', absolute path or hidden name)",
        )
    return name


def _check_files_map(r: _Reader, manifest: Mapping) -> None:
    files = r.mapping(manifest, "", "files")
    for name, record in files.items():
        check_file_name(name, r.file)
        key = f"files.{name}"
        if not isinstance(record, Mapping):
            raise r.fail(key, f"must be a mapping of sha256 and bytes, got {_kind(record)}")
        digest = r.get(record, key, "sha256")
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise r.fail(f"{key}.sha256", f"must be 64 lowercase hex digits, got {_kind(digest)}")
        r.integer(record, key, "bytes", 0, 2**63 - 1)
    for name in REQUIRED_FILES:
        if name not in files:
            raise r.fail(f"files.{name}", "is missing: the loader needs this file listed")


_GROUP_BOOLS = ("amsgrad", "maximize", "capturable", "differentiable", "decoupled_weight_decay")


def _check_optimizers(r: _Reader, manifest: Mapping) -> None:
    optimizers = r.mapping(manifest, "", "optimizers")
    for name in OPTIMIZERS:
        meta = r.mapping(optimizers, "optimizers", name)
        key = f"optimizers.{name}"
        groups = r.get(meta, key, "param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise r.fail(f"{key}.param_groups", f"must be a list of one group, got {_kind(groups)}")
        group, gkey = groups[0], f"{key}.param_groups[0]"
        if not isinstance(group, Mapping):
            raise r.fail(gkey, f"must be a mapping, got {_kind(group)}")
        params = r.get(group, gkey, "params")
        if not (isinstance(params, list) and all(_is_int(i) for i in params)):
            raise r.fail(f"{gkey}.params", f"must be a list of integers, got {_kind(params)}")
        for field in ("lr", "eps", "weight_decay"):
            value = r.get(group, gkey, field)
            if not (_is_number(value) and value >= 0):
                raise r.fail(f"{gkey}.{field}", f"must be a finite number >= 0, got {_kind(value)}")
        betas = r.get(group, gkey, "betas")
        if not (
            isinstance(betas, list)
            and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas)
        ):
            raise r.fail(f"{gkey}.betas", f"must be two numbers in [0, 1), got {_kind(betas)}")
        for field, value in group.items():
            if field in _GROUP_BOOLS and not isinstance(value, bool):
                raise r.fail(f"{gkey}.{field}", f"must be true or false, got {_kind(value)}")
            if field in ("foreach", "fused") and not (value is None or isinstance(value, bool)):
                raise r.fail(f"{gkey}.{field}", f"must be true, false or null, got {_kind(value)}")
            if field not in ("params", "betas") and not _is_scalar(value):
                raise r.fail(
                    f"{gkey}.{field}", f"must be a number, string or boolean, got {_kind(value)}"
                )
        scalars = meta.get("scalars", {})
        if not isinstance(scalars, Mapping) or not all(
            isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values())
            for v in scalars.values()
        ):
            raise r.fail(f"{key}.scalars", "must map parameter indices to mappings of numbers")
        for idx in scalars:
            if not (isinstance(idx, str) and idx.isdigit() and int(idx) in params):
                raise r.fail(f"{key}.scalars", f"names parameter {idx!r}, which is not in params")


SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "growth_tracker")


def check_scaler(r: _Reader, scaler: Any) -> None:
    """The fp16 loss scaler's state: enabled, scale, growth/backoff factors, interval, tracker."""
    if not isinstance(scaler, Mapping):
        raise r.fail("scaler", f"must be a mapping or null, got {_kind(scaler)}")
    if not isinstance(r.get(scaler, "scaler", "enabled"), bool):
        raise r.fail("scaler.enabled", f"must be true or false, got {_kind(scaler['enabled'])}")
    if not scaler["enabled"]:
        return
    for name in ("scale", "growth_factor", "backoff_factor"):
        value = r.get(scaler, "scaler", name)
        if not (_is_number(value) and value > 0):
            raise r.fail(f"scaler.{name}", f"must be a finite number > 0, got {_kind(value)}")
    r.integer(scaler, "scaler", "growth_interval", 1, 2**62)
    r.integer(scaler, "scaler", "growth_tracker", 0, 2**62)


def _check_stats(r: _Reader, stats: Any, world: int) -> None:
    """The log interval in progress: its step count and every rank's sums."""
    if not isinstance(stats, Mapping):
        raise r.fail("stats", f"must be a mapping or null, got {_kind(stats)}")
    names = r.get(stats, "stats", "names")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise r.fail("stats.names", f"must be a list of statistic names, got {_kind(names)}")
    r.integer(stats, "stats", "steps", 0, 2**62)
    sums = r.get(stats, "stats", "sums")
    if not (
        isinstance(sums, list)
        and len(sums) == world
        and all(
            isinstance(row, list) and len(row) == len(names) and all(_is_number(v) for v in row)
            for row in sums
        )
    ):
        raise r.fail(
            "stats.sums", f"must hold {world} list(s) of {len(names)} finite numbers (one per rank)"
        )


# --- 3. tensors ----------------------------------------------------------------------------------


def _specs(module: torch.nn.Module, prefix: str) -> dict[str, Spec]:
    return {
        f"{prefix}{k}": (tuple(v.shape), _SAFETENSORS_DTYPES[v.dtype])
        for k, v in module.state_dict().items()
    }


def reference_models(model_cfg) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G and D as the config builds them, on the meta device (shapes and dtypes, no memory)."""
    from pipeline.models import build_models

    with torch.device("meta"):
        return build_models(model_cfg)


def generator_specs(model_cfg, prefix: str = "") -> dict[str, Spec]:
    """Every tensor of G's state dict (parameters and BatchNorm buffers): name -> spec."""
    G, _ = reference_models(model_cfg)
    return _specs(G, prefix)


def expected_tensors(cfg, manifest: Mapping) -> dict[str, dict[str, Spec]]:
    """File -> tensor name -> (shape, dtype) that the stored config implies. Adam's state per
    parameter is optional (a parameter whose every update was skipped has none) but complete."""
    G, D = reference_models(cfg.model)
    model = {**_specs(G, "G."), **_specs(D, "D.")}
    if manifest["ema"]:
        model.update(_specs(G, "G_ema."))
    optim: dict[str, Spec] = {}
    for name, net in (("opt_G", G), ("opt_D", D)):
        for idx, p in enumerate(net.parameters()):
            spec = (tuple(p.shape), _SAFETENSORS_DTYPES[p.dtype])
            optim[f"{name}.{idx}.exp_avg"] = spec
            optim[f"{name}.{idx}.exp_avg_sq"] = spec
            optim[f"{name}.{idx}.step"] = ((), "F32")
            if manifest["optimizers"][name]["param_groups"][0].get("amsgrad"):
                optim[f"{name}.{idx}.max_exp_avg_sq"] = spec
    rng = {f"rank{r}": None for r in range(manifest["world_size"])}
    return {MODEL_FILE: model, OPTIM_FILE: optim, RNG_FILE: rng}  # type: ignore[dict-item]


def parameter_counts(cfg) -> dict[str, int]:
    G, D = reference_models(cfg.model)
    return {"opt_G": len(list(G.parameters())), "opt_D": len(list(D.parameters()))}


def check_param_groups(manifest: Mapping, cfg, file: Path) -> None:
    """Each optimizer's one group lists exactly its network's parameters, in order."""
    for name, count in parameter_counts(cfg).items():
        params = manifest["optimizers"][name]["param_groups"][0]["params"]
        if params != list(range(count)):
            raise fail(
                file,
                f"'optimizers.{name}.param_groups[0].params'",
                f"must be the {count} parameter indices 0..{count - 1} of the config's network, "
                f"got {len(params)} indices",
            )


def read_header(file: Path) -> dict[str, Spec]:
    """Tensor name -> (shape, dtype) from a safetensors header, without reading the data."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
            return out
    except Exception as exc:  # safetensors raises its own error types for malformed files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise fail(file, "the safetensors header", f"is unreadable ({first})") from None


def check_header(file: Path, expected: Mapping[str, Spec | None]) -> dict[str, Spec]:
    """Names, shapes and dtypes of ``file`` against ``expected`` (None: 1-D uint8 of any length).
    Optimizer files may omit a parameter's whole state, never part of it."""
    found = read_header(file)
    for key in sorted(found):
        if key not in expected:
            raise fail(file, f"tensor '{key}'", "is not one the config implies (unexpected name)")
    optional = file.name == OPTIM_FILE
    for key, spec in expected.items():
        if key not in found:
            if optional and not any(k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0] for k in found):
                continue
            raise fail(file, f"tensor '{key}'", "is missing")
        shape, dtype = found[key]
        want_shape, want_dtype = spec if spec is not None else (None, "U8")
        if dtype != want_dtype:
            raise fail(
                file, f"tensor '{key}'", f"has dtype {dtype}, the config implies {want_dtype}"
            )
        if want_shape is None and len(shape) != 1:
            raise fail(
                file, f"tensor '{key}'", f"has shape {list(shape)}, expected a 1-D byte array"
            )
        if want_shape is not None and shape != want_shape:
            raise fail(
                file,
                f"tensor '{key}'",
                f"has shape {list(shape)}, the config implies {list(want_shape)}",
            )
    return found


def check_finite(file: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    if not floats:
        return
    flat = torch.cat([v.reshape(-1).float() for v in floats.values()])
    if bool(torch.isfinite(flat).all()):  # one pass; the culprit is looked up only on failure
        return
    key = next(k for k, v in floats.items() if not bool(torch.isfinite(v).all()))
    raise fail(file, f"tensor '{key}'", "holds non-finite values (NaN or Inf)")


# --- 4. random states ----------------------------------------------------------------------------


def _words(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(_is_int(v) and 0 <= v < 2**32 for v in value)
    )


def _b64(value: Any, n: int | None = None) -> bool:
    if not isinstance(value, str):
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return n is None or len(raw) == n


def check_rng_blob(blob: bytes, file: Path, key: str) -> dict[str, Any]:
    """One rank's random state: UTF-8 JSON that ``format.restore_rng_state`` can apply."""
    where = f"tensor '{key}'"
    try:
        state = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(file, where, f"is not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(state, Mapping):
        raise fail(file, where, f"must hold a JSON mapping, got {_kind(state)}")
    cpu_bytes = torch.get_rng_state().numel()
    if not _b64(state.get("torch_cpu"), cpu_bytes):
        raise fail(file, f"{where} key 'torch_cpu'", f"must be {cpu_bytes} base64-encoded bytes")
    cuda = state.get("torch_cuda")
    if cuda is not None and not (
        isinstance(cuda, Mapping)
        and _is_int(cuda.get("device"))
        and cuda["device"] >= 0
        and _b64(cuda.get("state"))
    ):
        raise fail(file, f"{where} key 'torch_cuda'", "must be null or {device, base64 state}")
    py = state.get("python")
    if not (
        isinstance(py, list)
        and len(py) == 3
        and py[0] == 3  # random.VERSION
        and _words(py[1], _RNG_PYTHON_WORDS)
        and py[1][-1] <= _RNG_NUMPY_WORDS
        and (py[2] is None or _is_number(py[2]))
    ):
        raise fail(file, f"{where} key 'python'", "must be random.getstate() as a JSON list")
    np_state = state.get("numpy")
    if not (
        isinstance(np_state, list)
        and len(np_state) == 5
        and np_state[0] == "MT19937"
        and _words(np_state[1], _RNG_NUMPY_WORDS)
        and _is_int(np_state[2])
        and 0 <= np_state[2] <= _RNG_NUMPY_WORDS
        and _is_int(np_state[3])
        and _is_number(np_state[4])
    ):
        raise fail(file, f"{where} key 'numpy'", "must be numpy.random.get_state() as a JSON list")
    return dict(state)
