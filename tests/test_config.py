"""The config tree: defaults < preset < CLI; every mistake stops the run with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, RunConfig, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_reference_design():
    cfg = load_config()
    assert (cfg.model.latent_dim, list(cfg.model.g_hidden), list(cfg.model.d_hidden)) == (
        100,
        [256, 512, 1024],
        [1024, 512],
    )
    assert (cfg.model.d_dropout, cfg.model.leaky_slope) == (0.5, 0.2)
    assert (cfg.train.g_lr, cfg.train.d_lr, list(cfg.train.betas)) == (2e-4, 2e-4, [0.5, 0.999])


def test_cli_overrides_beat_preset_which_beats_defaults(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("seed: 3\ntrain:\n  steps: 10\n  batch_size: 32\n")
    cfg = load_config(preset, ["train.steps=20", "model.g_hidden=[8,16]"])
    assert cfg.seed == 3 and cfg.train.batch_size == 32  # preset
    assert cfg.train.steps == 20 and list(cfg.model.g_hidden) == [8, 16]  # CLI
    assert cfg.train.g_lr == 2e-4  # default


def test_every_shipped_preset_loads():
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(preset), RunConfig), preset


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.stepz=5"], "train.stepz"),
        (["sead=1"], "sead"),
        (["model.width=3"], "model.width"),
        (["train.steps=many"], "train.steps"),
        (["train.batch_size=1.5"], "train.batch_size"),
        (["train.steps=0"], "train.steps"),
        (["train.batch_size=1"], "train.batch_size"),
        (["model.d_dropout=1.0"], "model.d_dropout"),
        (["train.instance_noise_std=-0.1"], "train.instance_noise_std"),
        (["train.d_weight_penalty=-1"], "train.d_weight_penalty"),
        (["data.name=cifar10"], "data.name"),
        (["log.trackers=[wandb,mlflow]"], "log.trackers"),
        (["train.mixed_precision=fp8"], "train.mixed_precision"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite"),
        (["train.betas=[0.5]"], "train.betas"),
        (["model.g_hidden=[]"], "model.g_hidden"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["model.ema_decay=1.0"], "model.ema_decay"),
    ],
)
def test_each_config_error_names_its_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_unknown_key_in_preset_names_key_and_allowed_keys(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lr'.*g_lr"):
        load_config(preset)


def test_override_without_equals_and_missing_preset_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_a_dict():
    cfg = load_config(None, ["train.steps=7", "log.tags=[a,b]"])
    assert from_dict(to_dict(cfg)) == cfg


def test_dry_run_prints_resolved_config_and_bad_key_exits_2_with_one_line():
    ok = subprocess.run(
        [
            sys.executable,
            "pipeline/train.py",
            "--config",
            "configs/smoke.yaml",
            "--dry-run",
            "train.steps=11",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["steps"] == 11
    bad = subprocess.run(
        [sys.executable, "pipeline/train.py", "--config", "configs/smoke.yaml", "train.stepz=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error:") and "train.stepz" in lines[0]


def test_readme_lists_every_config_key_with_its_default():
    import dataclasses
    import json

    readme = (ROOT / "README.md").read_text()

    def keys(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value

    for key, default in keys(RunConfig()):
        assert f"| `{key}` | `{json.dumps(default)}` |" in readme, (
            f"README's config table lacks {key}={default!r}"
        )


def test_mixed_precision_no_survives_yaml_reading_it_as_false(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("train:\n  mixed_precision: no\n")
    assert load_config(preset).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
