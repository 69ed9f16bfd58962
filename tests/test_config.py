"""The config tree: defaults < preset < CLI; every mistake stops the run with one line naming the key."""

from __future__ import annotations

import dataclasses
import re
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
    assert cfg.model.leaky_slope == 0.2
    # All four of the design's techniques stay on; their strengths come from the ablation.
    assert cfg.model.g_batchnorm and 0 < cfg.model.d_dropout < 1
    assert cfg.train.instance_noise_std > 0 and cfg.train.d_weight_penalty > 0
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
        (["train.check_every=0"], "train.check_every"),
        (["train.compile_mode=fastest"], "train.compile_mode"),
        (["train.grad_compression=int8"], "train.grad_compression"),
        (["train.grad_compression=fp16"], "train.grad_compression"),
    ],
)
def test_each_config_error_names_its_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert key in message and "\n" not in message


def _leaf_keys(node, prefix=""):
    """(dotted key, default) of every leaf of the config tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


FLOAT_KEYS = [k for k, v in _leaf_keys(RunConfig()) if isinstance(v, float)]
INT_KEYS = [k for k, v in _leaf_keys(RunConfig()) if type(v) is int]


def _one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and message.startswith("config error"), message
    return message


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_must_be_finite(key, value):
    k = re.escape(key)
    with pytest.raises(
        ConfigError, match=rf"{k}=-?(inf|nan) is not allowed; {k} must be a finite"
    ) as info:
        load_config(None, [f"{key}={value}"])
    _one_line(info)


@pytest.mark.parametrize("key", INT_KEYS)
def test_every_integer_key_must_fit_in_64_bits(key):
    k = re.escape(key)
    with pytest.raises(ConfigError, match=rf"{k}=99999999999999999999 is not allowed; {k}") as info:
        load_config(None, [f"{key}=99999999999999999999"])
    _one_line(info)


def test_seed_may_be_any_integer_from_0_to_2_pow_63_minus_1():
    assert load_config(None, ["seed=0"]).seed == 0
    assert load_config(None, [f"seed={2**63 - 1}"]).seed == 2**63 - 1


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.betas=[0.5,nan]", r"train\.betas=\[0\.5, nan\] is not allowed; .* finite numbers"),
        ("seed=-1", r"seed=-1 is not allowed; seed must be an integer in \[0, 2\*\*63 - 1\]"),
        (f"seed={2**63}", rf"seed={2**63} is not allowed; seed must be an integer in \[0, 2"),
        ("seed=99999999999999999999", r"seed=99999999999999999999 is not allowed; seed must be"),
        (
            "train=5",
            r"\(command line\): 'train' is a section, not a value; set its keys, e\.g\. train\.steps=",
        ),
        (
            "model=[1]",
            r"'model' is a section, not a value; set its keys, e\.g\. model\.latent_dim=",
        ),
        ("train=null", r"'train' is a section, not a value"),
        ("seed.x=1", r"'seed' takes a single value, not a section; e\.g\. seed=0"),
        ("train.steps=[1]", r"'train\.steps' takes a single value, not a list"),
        ("train.steps=1.5", r"bad value for 'train\.steps'"),
        ("train.steps=abc", r"bad value for 'train\.steps'"),
        (
            "log.trackers=wandb",
            r"'log\.trackers' must be a list, got a string; e\.g\. log\.trackers=\[wandb\]",
        ),
        ("log.trackers={a:1}", r"'log\.trackers' must be a list, got a section"),
        ("model.g_hidden=[{a:1}]", r"'model\.g_hidden' must be a list of single values"),
        ("model.g_hidden[0]=5", r"'model\.g_hidden' must be a list"),
        ("train.betas=0.5", r"'train\.betas' must be a list, got a number"),
        (
            "train.betas=[0.5]",
            r"train\.betas=\[0\.5\] is not allowed; train\.betas must be two numbers",
        ),
        ("train.=5", r"override 'train\.=5' is not of the form key=value with a dotted key"),
    ],
)
def test_each_bad_override_is_one_config_error_line_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    _one_line(info)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"- 1\n- 2\n", r"bad\.yaml must be a mapping of keys to values, got a list"),
        (b"5\n", r"bad\.yaml must be a mapping of keys to values, got a number"),
        (b"hello\n", r"bad\.yaml must be a mapping of keys to values, got a string"),
        (b"train: 5\n", r"\(.*bad\.yaml\): 'train' is a section, not a value; set its keys"),
        (b"model: [1]\n", r"\(.*bad\.yaml\): 'model' is a section, not a value"),
        (b"train:\n  betas: 0.5\n", r"'train\.betas' must be a list, got a number"),
        (b"seed: 99999999999999999999\n", r"seed=99999999999999999999 is not allowed; seed must"),
        (
            b"train:\n  g_lr: .inf\n",
            r"train\.g_lr=inf is not allowed; train\.g_lr must be a finite",
        ),
        (b"seed: \xff\xfe\n", r"bad\.yaml is not UTF-8 text"),
        (b"seed: 1\nseed: 2\n", r"bad\.yaml is not valid YAML: .*duplicate key seed \(line 2"),
        (b"train: {steps: 1\n", r"bad\.yaml is not valid YAML: .*\(line 2, column 1\)"),
        (None, r"preset .*bad\.yaml is a directory; pass a YAML file"),
    ],
)
def test_each_bad_preset_is_one_config_error_line_naming_the_file_or_key(tmp_path, content, match):
    preset = tmp_path / "bad.yaml"
    if content is None:
        preset.mkdir()
    else:
        preset.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(preset)
    _one_line(info)


@pytest.mark.parametrize("content", ["", "# nothing set\n", "---\n", "null\n"])
def test_an_empty_preset_means_the_defaults(tmp_path, content):
    preset = tmp_path / "empty.yaml"
    preset.write_text(content)
    assert load_config(preset) == load_config()


@pytest.mark.parametrize(
    "data, match",
    [
        ([1], r"a stored config must be a mapping of keys to values, got a list"),
        (None, r"a stored config must be a mapping of keys to values, got nothing"),
        ({"train": 5}, r"\(stored config\): 'train' is a section, not a value"),
        ({"seed": -1}, r"seed=-1 is not allowed"),
        ({"train": {"g_lr": float("inf")}}, r"train\.g_lr=inf is not allowed"),
        ({"train": {"steps": "x"}}, r"bad value for 'train\.steps'"),
        ({"log": {"trackers": {"a": 1}}}, r"'log\.trackers' must be a list, got a section"),
    ],
)
def test_a_bad_stored_config_is_one_config_error_line(data, match):
    with pytest.raises(ConfigError, match=match) as info:
        from_dict(data)
    _one_line(info)


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


@pytest.mark.parametrize(
    "args, key",
    [
        (["train=5"], "'train' is a section"),
        (["model=[1]"], "'model' is a section"),
        (["seed=-1"], "seed=-1"),
        (["seed=99999999999999999999"], "seed=99999999999999999999"),
        (["train.g_lr=inf"], "train.g_lr=inf"),
        (["log.trackers=wandb"], "'log.trackers'"),
        (["train.steps=1.5"], "'train.steps'"),
        (["--config", "{tmp}/list.yaml"], "list.yaml must be a mapping of keys to values"),
        (["--config", "{tmp}/section.yaml"], "'train' is a section"),
        (["--config", "{tmp}"], "is a directory"),
    ],
)
def test_dry_run_with_a_bad_config_exits_2_with_one_error_line(tmp_path, args, key):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "section.yaml").write_text("train: 5\n")
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    bad = subprocess.run(
        [sys.executable, "pipeline/train.py", "--dry-run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stdout == ""
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: config error"), bad.stderr
    assert key in lines[0] and "Traceback" not in bad.stderr


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


def test_fp16_gradient_compression_is_refused_saying_why_and_what_to_use():
    with pytest.raises(ConfigError, match="overflow; use train.grad_compression=bf16"):
        load_config(None, ["train.grad_compression=fp16"])


def test_nccl_nan_check_is_refused_before_start_on_several_gpus(monkeypatch):
    """A non-finite loss reaches the other ranks as NaN gradients; NCCL's NaN check would abort
    the job on them, so it is refused in one line before anything starts."""
    import torch

    from pipeline.build import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("TORCH_NCCL_NAN_CHECK", "1")
    with pytest.raises(ConfigError, match="unset TORCH_NCCL_NAN_CHECK") as info:
        make_accelerator(load_config(None, []))
    assert "\n" not in str(info.value)
