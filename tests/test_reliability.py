"""Reliability, specified as tables: every tampered checkpoint, bad config or output directory and
disk fault ends in one ``error:`` line naming the culprit (file and key), the documented exit
status (2 config/usage, 3 non-finite, 4 checkpoint or disk), no traceback, and nothing written
or lost; ``resume=auto`` falls back past a bad checkpoint, saying so.

One small real run (8 steps, checkpoints at 4 and 8, EMA on) is trained once per module; each
case tampers a copy of it the way an attacker would (rewriting the manifest's sha256 too, so the
schema check, not the checksum, must catch it) and runs every reader in this process: train with
``resume=RUN``, ``resume=auto``'s choice, export, sample and evaluate.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import checkpoint as ckpt
from pipeline import train as train_cli
from pipeline.checkpoint import format as fmt
from pipeline.checkpoint import schema
from pipeline.checkpoint.manager import CheckpointManager, restore_scaler, scaler_state
from pipeline.cli import export as export_cli
from pipeline.cli import sample as sample_cli
from pipeline.cli.evaluate import main as evaluate_main
from pipeline.config import load_config
from pipeline.report import read_metrics
from pipeline.stats import StepStats
from pipeline.trainer import Trainer
from tests.dist_utils import accelerate_launch_cmd
from tests.test_checkpoint import (
    EMA_ON,
    error_lines,
    isolated_process_state,
    overrides,
    train_in_process,
)

REPO = Path(__file__).resolve().parent.parent
S4, S8 = "checkpoints/step-00000004", "checkpoints/step-00000008"
MODEL, OPTIM, RNG = schema.MODEL_FILE, schema.OPTIM_FILE, schema.RNG_FILE
MANIFEST = ckpt.MANIFEST


# --- the run, and what "nothing written or lost" means ------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    train_in_process(run, "train.steps=8", EMA_ON)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest",
        "step-00000004",
        "step-00000008",
    ]
    return run


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (links not followed): its kind and content hash or target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(root))] = "link:" + os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path.relative_to(root))] = "dir"
    return out


def assert_one_line(code: int, err: str, status: int, *culprits: str) -> str:
    lines = error_lines(err)
    assert code == status, f"exit {code}, expected {status}:\n{err[-3000:]}"
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], f"{culprit!r} not named in: {lines[0]}"
    return lines[0]


# --- tampering helpers ---------------------------------------------------------------------------


def manifest_of(step_dir: Path) -> dict:
    return json.loads((step_dir / MANIFEST).read_text())


def write_manifest(step_dir: Path, manifest) -> None:
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


def rehash(step_dir: Path, name: str) -> None:
    """List ``name`` with its present sha256 and size, as an attacker rewriting both would."""
    manifest = manifest_of(step_dir)
    data = (step_dir / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(step_dir, manifest)


def edit_manifest(change: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        step_dir = run / S8
        manifest = manifest_of(step_dir)
        change(manifest, run)
        write_manifest(step_dir, manifest)

    return apply


def edit_tensors(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        step_dir = run / S8
        tensors = load_file(step_dir / name)
        change(tensors)
        save_file(tensors, step_dir / name)
        rehash(step_dir, name)

    return apply


def edit_bytes(name: str, change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        step_dir = run / S8
        (step_dir / name).write_bytes(change((step_dir / name).read_bytes()))
        rehash(step_dir, name)

    return apply


def outside_secret(run: Path) -> Path:
    secret = run.parent / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("not part of any checkpoint\n")
    return secret


def list_file(manifest: dict, name: str, target: Path) -> None:
    data = target.read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def traversal(manifest: dict, run: Path) -> None:
    secret = outside_secret(run)
    name = "../../../outside/secret.txt"
    assert (run / S8 / name).resolve() == secret.resolve()
    list_file(manifest, name, secret)


def absolute(manifest: dict, run: Path) -> None:
    secret = outside_secret(run)
    list_file(manifest, str(secret), secret)


def unlisted_loader_file(run: Path) -> None:
    edit_manifest(lambda m, _: m["files"].pop(MODEL))(run)
    (run / S8 / MODEL).write_bytes(b"")


def empty_files_map(run: Path) -> None:
    edit_manifest(lambda m, _: m.update(files={}))(run)
    (run / S8 / MODEL).unlink()


def header_too_large(data: bytes) -> bytes:
    return (2**40).to_bytes(8, "little") + data[8:]


def incomplete_metadata(data: bytes) -> bytes:
    header = int.from_bytes(data[:8], "little")
    return data[: 8 + header + 64]  # the header promises more tensor data than follows


def binary_latest(run: Path) -> None:
    (run / "checkpoints" / "latest").write_bytes(b"\x80\xfe\xff\x00step")


def latest_directory(run: Path) -> None:
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").mkdir()


def latest_text(text: str) -> Callable[[Path], None]:
    return lambda run: (run / "checkpoints" / "latest").write_text(text)


def set_rng_blob(blob: bytes) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors["rank0"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()

    return change


def moved_elsewhere_and_linked(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        elsewhere = run.parent / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        shutil.move(run / S8 / name, elsewhere / name)
        os.symlink(elsewhere / name, run / S8 / name)

    return apply


def symlinked_step_dir(run: Path) -> None:
    elsewhere = run.parent / "elsewhere-step"
    shutil.move(run / S8, elsewhere)
    os.symlink(elsewhere, run / S8, target_is_directory=True)


def replace(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[key] = make(tensors[key]).contiguous()

    return change


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


@dataclass(frozen=True)
class Tamper:
    id: str
    apply: Callable[[Path], None]
    culprits: tuple[str, ...]
    """What the one error line must name (the file, the key)."""
    auto_step: int | None = 4
    """The step resume=auto resumes from instead (None: it refuses with status 4)."""


TAMPERED = [
    # issue item 1: names outside the checkpoint directory
    Tamper("path-traversal", edit_manifest(traversal), (MANIFEST, "../../../outside/secret.txt")),
    Tamper("absolute-path", edit_manifest(absolute), (MANIFEST, "outside/secret.txt")),
    Tamper("hidden-name", edit_manifest(lambda m, r: list_file(m, ".x", r / S8 / MODEL)), (".x",)),
    # item 2: the loader's own files must be listed
    Tamper("unlisted-loader-file", unlisted_loader_file, (MANIFEST, f"files.{MODEL}", "missing")),
    Tamper("empty-files-map", empty_files_map, (MANIFEST, f"files.{MODEL}", "missing")),
    # item 3: what used to be tracebacks
    Tamper("header-too-large", edit_bytes(MODEL, header_too_large), (MODEL, "header")),
    Tamper("incomplete-metadata", edit_bytes(MODEL, incomplete_metadata), (MODEL, "header")),
    Tamper("manifest-a-list", lambda run: write_manifest(run / S8, []), (MANIFEST, "a list")),
    Tamper(
        "manifest-not-json",
        lambda run: (run / S8 / MANIFEST).write_bytes(b"\x00\xff{"),
        (MANIFEST, "corrupt"),
    ),
    Tamper("missing-config", edit_manifest(lambda m, _: m.pop("config")), (MANIFEST, "'config'")),
    Tamper(
        "missing-optimizers",
        edit_manifest(lambda m, _: m.pop("optimizers")),
        (MANIFEST, "'optimizers'"),
    ),
    Tamper("non-integer-step", edit_manifest(lambda m, _: m.update(step=8.5)), ("'step'",)),
    Tamper("step-not-the-dir", edit_manifest(lambda m, _: m.update(step=12)), ("'step'", "step-0")),
    Tamper("world-size-0", edit_manifest(lambda m, _: m.update(world_size=0)), ("'world_size'",)),
    Tamper("binary-latest", binary_latest, ("latest", "not text"), auto_step=8),
    Tamper("latest-a-directory", latest_directory, ("latest", "not a"), auto_step=None),
    Tamper("latest-names-nothing", latest_text("step-00000012\n"), ("latest",), auto_step=8),
    Tamper("latest-traversal", latest_text("../../etc\n"), ("latest",), auto_step=8),
    Tamper(
        "binary-rng-blob",
        edit_tensors(RNG, set_rng_blob(b"\x80\xff\xfe not utf-8")),
        (RNG, "rank0", "UTF-8"),
    ),
    Tamper(
        "rng-blob-wrong-structure",
        edit_tensors(RNG, set_rng_blob(json.dumps({"torch_cpu": "AAAA"}).encode())),
        (RNG, "rank0", "torch_cpu"),
    ),
    Tamper(
        "rng-blob-missing-for-a-rank",
        edit_manifest(lambda m, _: m.update(world_size=2)),
        (RNG, "rank1", "missing"),
    ),
    Tamper(
        "invalid-stored-config",
        edit_manifest(lambda m, _: m["config"]["train"].update(steps=-1)),
        (MANIFEST, "'config'", "train.steps"),
    ),
    Tamper(
        "sha256-not-hex",
        edit_manifest(lambda m, _: m["files"][MODEL].update(sha256="zz")),
        (MANIFEST, f"files.{MODEL}.sha256"),
    ),
    Tamper(
        "optimizer-lr-a-string",
        edit_manifest(lambda m, _: m["optimizers"]["opt_G"]["param_groups"][0].update(lr="fast")),
        ("optimizers.opt_G.param_groups[0].lr",),
    ),
    Tamper(
        "optimizer-wrong-parameter-count",
        edit_manifest(lambda m, _: m["optimizers"]["opt_D"]["param_groups"][0].update(params=[0])),
        ("optimizers.opt_D.param_groups[0].params",),
    ),
    Tamper(
        "bad-scaler-state",
        edit_manifest(
            lambda m, _: m.update(
                scaler={
                    "enabled": True,
                    "scale": -1.0,
                    "growth_factor": 2.0,
                    "backoff_factor": 0.5,
                    "growth_interval": 100,
                    "growth_tracker": 0,
                }
            )
        ),
        ("scaler.scale",),
    ),
    # item 3 and 4: shapes and dtypes the config does not imply
    Tamper(
        "wrong-shape",
        edit_tensors(MODEL, replace("G.net.0.weight", lambda t: t.t())),
        (MODEL, "G.net.0.weight", "shape"),
    ),
    Tamper(
        "wrong-dtype-float16",
        edit_tensors(MODEL, replace("G_ema.net.0.weight", lambda t: t.half())),
        (MODEL, "G_ema.net.0.weight", "F16"),
    ),
    Tamper(
        "wrong-dtype-int32",
        edit_tensors(MODEL, replace("D.net.0.weight", lambda t: t.to(torch.int32))),
        (MODEL, "D.net.0.weight", "I32"),
    ),
    Tamper(
        "missing-tensor",
        edit_tensors(MODEL, lambda t: t.pop("D.net.0.bias")),
        (MODEL, "D.net.0.bias", "missing"),
    ),
    Tamper(
        "unexpected-tensor",
        edit_tensors(MODEL, lambda t: t.update({"G.extra": torch.zeros(3)})),
        (MODEL, "G.extra"),
    ),
    Tamper(
        "non-finite-weights",
        edit_tensors(MODEL, replace("G.net.0.weight", with_nan)),
        (MODEL, "G.net.0.weight", "non-finite"),
    ),
    # item 5: an optimizer state that does not fit its parameter
    Tamper(
        "wrong-shape-optimizer-state",
        edit_tensors(OPTIM, replace("opt_G.0.exp_avg", lambda t: torch.zeros(3))),
        (OPTIM, "opt_G.0.exp_avg", "shape"),
    ),
    Tamper(
        "wrong-dtype-optimizer-step",
        edit_tensors(OPTIM, replace("opt_D.1.step", lambda t: t.double())),
        (OPTIM, "opt_D.1.step", "F64"),
    ),
    # item 12: symbolic links
    Tamper("symlinked-file", moved_elsewhere_and_linked(MODEL), (MODEL, "symbolic link")),
    Tamper("symlinked-manifest", moved_elsewhere_and_linked(MANIFEST), (MANIFEST, "symbolic")),
    Tamper("symlinked-step-dir", symlinked_step_dir, ("latest", "step-00000008")),
]


@pytest.fixture
def tampered(request, base_run, tmp_path) -> tuple[Tamper, Path]:
    case: Tamper = request.param
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    case.apply(run)
    return case, run


def run_readers(run: Path, tmp_path: Path, capsys) -> dict[str, tuple[int, str]]:
    """Every reader of a checkpoint, given the run directory: (exit status, stderr) each."""
    results = {}
    with isolated_process_state():
        code = train_cli.main(overrides(tmp_path / "new", "train.steps=12", f"resume={run}"))
    results["train resume=RUN"] = (code, capsys.readouterr().err)
    code = export_cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "g.safetensors")])
    results["export"] = (code, capsys.readouterr().err)
    code = sample_cli.main(
        ["--checkpoint", str(run), "--n", "4", "--out", str(tmp_path / "g.png"), "--device", "cpu"]
    )
    results["sample"] = (code, capsys.readouterr().err)
    code = evaluate_main(["--checkpoint", str(run), "--cache-dir", str(tmp_path / "cache")])
    results["evaluate"] = (code, capsys.readouterr().err)
    return results


@pytest.mark.parametrize("tampered", TAMPERED, ids=[c.id for c in TAMPERED], indirect=True)
def test_every_reader_refuses_a_tampered_checkpoint_in_one_line_with_status_4(
    tampered, tmp_path, capsys, caplog
):
    case, run = tampered
    before = snapshot(run.parent)
    for reader, (code, err) in run_readers(run, tmp_path, capsys).items():
        line = assert_one_line(code, err, 4, *case.culprits)
        assert "on rank" not in line, f"{reader}: {line}"
    # resume=auto: the previous checkpoint, saying which file and key it skipped and why.
    cfg = load_config(None, overrides(run, "train.steps=12", EMA_ON))
    caplog.clear()
    if case.auto_step is None:
        with pytest.raises(ckpt.CheckpointError) as refused:
            CheckpointManager(cfg, None).resolve_all_ranks()
        assert all(c in str(refused.value) for c in case.culprits), refused.value
    else:
        found = CheckpointManager(cfg, None).resolve_all_ranks()
        assert found is not None and found.step == case.auto_step
        warnings = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        assert all(c in warnings for c in case.culprits), warnings
    # Nothing was written or lost: the run, the outside files, no output of any reader.
    assert snapshot(run.parent) == before
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "g.safetensors").exists() and not (tmp_path / "g.png").exists()
    assert not list(run.glob("checkpoints/.tmp-*"))


def test_a_name_outside_the_checkpoint_is_refused_before_anything_is_opened(base_run, tmp_path):
    """No oracle: the error for a traversal name is the same whether the target exists or not."""
    messages = []
    for exists in (True, False):
        run = tmp_path / f"run-{exists}"
        shutil.copytree(base_run, run)
        edit_manifest(traversal)(run)
        if not exists:
            (run.parent / "outside" / "secret.txt").unlink()
        with pytest.raises(ckpt.CheckpointError) as refused:
            ckpt.verify(run / S8)
        messages.append(str(refused.value).replace(str(run), "RUN"))
    assert messages[0] == messages[1]


@pytest.mark.parametrize(
    "tamper",
    [t for t in TAMPERED if t.id in ("wrong-dtype-float16", "binary-rng-blob")],
    ids=lambda t: t.id,
)
def test_train_resume_auto_falls_back_past_a_tampered_checkpoint_and_finishes(
    tamper, base_run, tmp_path, capsys, caplog
):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    tamper.apply(run)
    with isolated_process_state():
        code = train_cli.main(overrides(run, "train.steps=8", EMA_ON))
    err = capsys.readouterr().err
    assert code == 0 and not error_lines(err), err[-3000:]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("falling back" in w and tamper.culprits[0] in w for w in warnings), warnings
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000004")
    ckpt.verify(run / S8)  # rewritten whole


# --- exported generator files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(base_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "g.safetensors"
    assert export_cli.main(["--checkpoint", str(base_run), "--out", str(out)]) == 0
    return out


def export_with(tensors_change=None, metadata_change=None) -> Callable[[Path, Path], None]:
    def apply(src: Path, dst: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(src), framework="pt") as f:
            metadata = dict(f.metadata())
        tensors = load_file(src)
        if tensors_change:
            tensors_change(tensors)
        if metadata_change:
            metadata_change(metadata)
        save_file(tensors, dst, metadata=metadata)

    return apply


TAMPERED_EXPORTS = [
    ("not-safetensors", lambda src, dst: dst.write_bytes(b"\x00" * 64), ("not a readable",)),
    (
        "wrong-dtype",
        export_with(replace("net.0.weight", lambda t: t.half())),
        ("net.0.weight", "F16"),
    ),
    (
        "wrong-shape",
        export_with(replace("net.0.weight", lambda t: t.t())),
        ("net.0.weight", "shape"),
    ),
    (
        "config-not-json",
        export_with(metadata_change=lambda m: m.update(config="{")),
        ("metadata 'config'", "JSON"),
    ),
    (
        "invalid-config",
        export_with(metadata_change=lambda m: m.update(config=json.dumps({"seed": -1}))),
        ("metadata 'config'", "seed"),
    ),
]


@pytest.mark.parametrize(
    ("change", "culprits"),
    [(c, k) for _, c, k in TAMPERED_EXPORTS],
    ids=[i for i, _, _ in TAMPERED_EXPORTS],
)
def test_sample_and_evaluate_refuse_a_tampered_export_in_one_line_with_status_4(
    exported, tmp_path, capsys, change, culprits
):
    bad = tmp_path / "bad.safetensors"
    change(exported, bad)
    code = sample_cli.main(
        ["--checkpoint", str(bad), "--n", "4", "--out", str(tmp_path / "g.png"), "--device", "cpu"]
    )
    assert_one_line(code, capsys.readouterr().err, 4, "bad.safetensors", *culprits)
    code = evaluate_main(["--checkpoint", str(bad), "--cache-dir", str(tmp_path / "cache")])
    assert_one_line(code, capsys.readouterr().err, 4, "bad.safetensors", *culprits)
    assert not (tmp_path / "g.png").exists()


# --- bad configs and output directories ----------------------------------------------------------


def file_at(path: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("a file\n")

    return make


def foreign_files(root: Path) -> None:
    (root / "out").mkdir()
    (root / "out" / "notes.txt").write_text("mine\n")


def yaml_list(root: Path) -> None:
    (root / "list.yaml").write_text("- a\n- b\n")


@dataclass(frozen=True)
class BadConfig:
    id: str
    args: tuple[str, ...]
    """train.py arguments; {root} is the test's directory, the run goes to {root}/out."""
    culprits: tuple[str, ...]
    prepare: Callable[[Path], None] | None = None
    env: tuple[tuple[str, str], ...] = ()
    status: int = 2


BAD_CONFIGS = [
    BadConfig("output-dir-a-file", (), ("output_dir", "is a file"), file_at("out")),
    BadConfig(
        "output-dir-under-a-file",
        ("output_dir={root}/blocker/out",),
        ("output_dir", "blocker", "which is a file"),
        file_at("blocker"),
    ),
    BadConfig(
        "resume-none-into-foreign-files",
        ("resume=none",),
        ("output_dir", "holds no run", "notes.txt", "overwrite=true"),
        foreign_files,
    ),
    BadConfig(
        "wandb-mode-bogus",
        ("log.trackers=[wandb]",),
        ("WANDB_MODE='bogus'",),
        env=(("WANDB_MODE", "bogus"),),
    ),
    BadConfig("resume-path-missing", ("resume={root}/nowhere",), ("resume", "nowhere")),
    BadConfig(
        "resume-path-a-file", ("resume={root}/afile",), ("afile",), file_at("afile"), status=4
    ),
    BadConfig("infinite-learning-rate", ("train.g_lr=inf",), ("train.g_lr",)),
    BadConfig("infinite-noise-std", ("train.instance_noise_std=inf",), ("instance_noise_std",)),
    BadConfig("negative-seed", ("seed=-1",), ("seed",)),
    BadConfig("huge-seed", ("seed=99999999999999999999",), ("seed",)),
    BadConfig("section-set-to-a-number", ("train=5",), ("train",)),
    BadConfig("yaml-file-a-list", ("--config", "{root}/list.yaml"), ("list.yaml",), yaml_list),
    BadConfig("unknown-flag", ("--bogus",), ("--bogus",)),
]


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.id for c in BAD_CONFIGS])
def test_train_refuses_a_bad_config_or_output_dir_in_one_line(case, tmp_path, capsys, monkeypatch):
    if case.prepare:
        case.prepare(tmp_path)
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    before = snapshot(tmp_path)
    args = [a.format(root=tmp_path) for a in case.args]
    flags = [a for a in args if a.startswith("--") or a.endswith(".yaml")]
    # The case's key=value pairs come last: the last value of a key wins.
    argv = [*flags, *overrides(tmp_path / "out", "train.steps=2"), *args[len(flags) :]]
    with isolated_process_state():
        code = train_cli.main(argv)
    assert_one_line(code, capsys.readouterr().err, case.status, *case.culprits)
    assert snapshot(tmp_path) == before, "nothing written, nothing removed"


def test_train_refuses_an_unwritable_output_dir_in_one_line(tmp_path, capsys, monkeypatch):
    """Root passes every permission check, so the refusal of the kernel is simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw)
    )
    with isolated_process_state():
        code = train_cli.main(overrides(locked / "run", "train.steps=2"))
    assert_one_line(code, capsys.readouterr().err, 2, "output_dir", "not writable", str(locked))
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_train_refuses_a_read_only_output_dir_in_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with isolated_process_state():
        code = train_cli.main(overrides(locked / "run", "train.steps=2"))
    assert_one_line(code, capsys.readouterr().err, 2, "output_dir", "not writable")


def test_resume_none_overwrite_removes_the_old_run_but_keeps_foreign_files(base_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    (run / "notes.txt").write_text("mine\n")
    (run / "data").mkdir()
    summary, _ = train_in_process(run, "resume=none", "overwrite=true", "train.steps=2")
    assert summary["resumed_from"] is None
    assert (run / "notes.txt").read_text() == "mine\n" and (run / "data").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]


# --- disk faults ---------------------------------------------------------------------------------


def test_a_full_disk_mid_save_exits_4_in_one_line_keeps_the_previous_checkpoint_then_resumes(
    tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    write_file, calls = fmt._write_file, []

    def enospc_in_second_save(directory, name, tensors):
        calls.append(directory)
        if len(set(calls)) == 2 and name == OPTIM:  # the model file is already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / name))
        return write_file(directory, name, tensors)

    monkeypatch.setattr(fmt, "_write_file", enospc_in_second_save)
    with isolated_process_state():
        code = train_cli.main(overrides(run, "train.steps=8"))
    line = assert_one_line(
        code, capsys.readouterr().err, 4, "no space left on device", "step-00000008", "free space"
    )
    assert "on rank" not in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    ckpt.verify(run / S4)
    monkeypatch.undo()  # space again
    summary, _ = train_in_process(run, "train.steps=8")
    assert summary["resumed_from"].endswith("step-00000004") and summary["steps"] == 8
    ckpt.verify(run / S8)


@pytest.fixture
def file_size_limit():
    """Set RLIMIT_FSIZE for this process (a real EFBIG from the kernel, no privileges needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill

    def limit(n_bytes: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_real_file_size_limit_mid_run_exits_4_and_leaves_no_temp_directory(
    tmp_path, capsys, file_size_limit
):
    run = tmp_path / "run"
    train_in_process(run, "train.steps=4", "sample.n=4")
    model_bytes = (run / S4 / MODEL).stat().st_size
    file_size_limit(model_bytes // 2)
    with isolated_process_state():
        code = train_cli.main(overrides(run, "train.steps=8", "sample.n=4"))
    file_size_limit(resource.RLIM_INFINITY)
    assert_one_line(code, capsys.readouterr().err, 4, "file too large", "step-00000008")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000004"]
    ckpt.verify(run / S4)


# --- file permissions (item 13) ------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoint_files_and_exports_get_the_mode_a_plain_open_gives(umask, base_run, tmp_path):
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
        plain = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
        step_dir = fmt.save_checkpoint(
            tmp_path / "checkpoints",
            1,
            {
                MODEL: {"w": torch.zeros(2)},
                OPTIM: {},
                RNG: {"rank0": torch.zeros(1, dtype=torch.uint8)},
            },
            {},
            keep_last=1,
        )
        out = tmp_path / "g.safetensors"
        assert export_cli.main(["--checkpoint", str(base_run), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    assert plain == 0o666 & ~umask
    written = [*step_dir.iterdir(), tmp_path / "checkpoints" / "latest", out]
    modes = {p.name: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written}
    assert set(modes.values()) == {oct(plain)}, modes


# --- fp16 loss scaler ----------------------------------------------------------------------------


def test_checkpoint_saves_and_restores_the_fp16_loss_scaler_exactly(tmp_path):
    with isolated_process_state():
        trainer = Trainer(load_config(None, overrides(tmp_path / "run", "train.steps=2")))
        try:
            saved = torch.amp.GradScaler(
                "cpu", init_scale=2.0**12, growth_factor=3.0, backoff_factor=0.25, growth_interval=7
            )
            saved.load_state_dict({**saved.state_dict(), "scale": 1536.0, "_growth_tracker": 5})
            trainer.state.scaler = saved
            trainer.checkpoints.save_all_ranks(
                2, trainer.state, trainer.ema, trainer.loop.batches, "abcd1234"
            )
            found = ckpt.verify(tmp_path / "run" / "checkpoints" / "step-00000002")
            assert found.manifest["scaler"] == scaler_state(saved)
            fresh = torch.amp.GradScaler("cpu")
            trainer.state.scaler = fresh
            trainer.checkpoints.load(found, trainer.state, trainer.ema, trainer.loop.batches)
        finally:
            trainer.close()
    assert fresh.get_scale() == 1536.0 and fresh._get_growth_tracker() == 5
    assert fresh.state_dict() == saved.state_dict()
    restore_scaler(None, scaler_state(saved))  # a run without fp16 ignores it


# --- item 10: the logged history across a resume -------------------------------------------------


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_run(tmp_path):
    """12 steps (the last-step row and checkpoint at 12, mid-interval) resumed to 20 logs exactly
    the rows of 20 uninterrupted steps: no row at 12, and the row at 15 averages steps 11-15."""
    common = ("log.every=5", "checkpoint.every=0")
    train_in_process(tmp_path / "a", "train.steps=12", *common)
    assert [r["step"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")] == [5, 10, 12]
    train_in_process(tmp_path / "a", "train.steps=20", *common)
    train_in_process(tmp_path / "b", "train.steps=20", *common)

    def rows(run: Path) -> list[dict]:
        return [
            {k: v for k, v in row.items() if k == "step" or k.startswith("train/")}
            for row in read_metrics(run / "metrics.jsonl")
        ]

    resumed, uninterrupted = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["step"] for r in uninterrupted] == [5, 10, 15, 20]
    assert [r["step"] for r in resumed] == [5, 10, 15, 20]
    for got, want in zip(resumed, uninterrupted):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), got["step"]


def test_step_stats_round_trip_their_interval_exactly():
    stats = StepStats(("a", "b"), "cpu")
    stats.add(torch.tensor([0.1, 1 / 3]))
    stats.add(torch.tensor([float("nan"), 2.0]))
    copy = StepStats(("a", "b"), "cpu")
    copy.load_state(json.loads(json.dumps(stats.state())))
    assert torch.equal(copy.sums, stats.sums) and copy.steps == 2 and copy.timed_steps == 0
    stats.reset(keep_interval=True)
    assert stats.steps == 2 and stats.timed_steps == 0
    with pytest.raises(ValueError, match="differ"):
        StepStats(("a",), "cpu").load_state(stats.state())


# --- item 11: nothing is unpickled between ranks -------------------------------------------------

PICKLING = {"broadcast_object_list", "gather_object", "all_gather_object", "scatter_object_list"}


def test_no_pipeline_code_pickles_between_ranks_or_unpickles_files():
    used = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if name in PICKLING:
                used.append(f"{path.name}: {name}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(m.split(".")[0] in ("pickle", "dill", "cloudpickle") for m in modules):
                    used.append(f"{path.name}: imports pickle")
            if isinstance(node, ast.Attribute) and node.attr == "load":
                if isinstance(node.value, ast.Name) and node.value.id == "torch":
                    used.append(f"{path.name}: torch.load")
    assert used == []


# --- under the real launcher (item 9) ------------------------------------------------------------


def launch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = accelerate_launch_cmd(
        "--log_dir",
        str(tmp_path / "launcher-logs"),
        "pipeline/train.py",
        *overrides(tmp_path / "run"),
        *args,
    )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "status", "culprit"),
    [
        (("train.steps=-1",), 2, "train.steps"),
        (("train.g_lr=1e9", "train.d_lr=1e9"), 3, "non-finite"),
    ],
    ids=["config-error", "non-finite"],
)
def test_under_accelerate_launch_the_error_line_and_status_reach_the_launcher_report(
    tmp_path, args, status, culprit
):
    """The one line (once, from rank 0) and, in torch elastic's failure report, the root cause's
    exit status and that line (our error file) instead of a pointer to the docs. The launcher
    itself exits 1 whatever the workers' status (accelerate re-raises torch's ChildFailedError);
    launch/exit_status.py reads the status back from the error files."""
    proc = launch(tmp_path, *args)
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0], out[-3000:]
    assert proc.returncode == 1, out[-3000:]
    root_cause = out[out.index("Root Cause") :]
    assert f"exitcode  : {status}" in root_cause, out[-3000:]
    assert f"traceback : {lines[0]} (exit status {status})" in root_cause, out[-3000:]
    assert "To enable traceback" not in out
    recovered = subprocess.run(
        [sys.executable, "launch/exit_status.py", str(tmp_path / "launcher-logs")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert recovered.stdout.strip() == str(status)
