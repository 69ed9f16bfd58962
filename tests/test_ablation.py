"""`make ablation` and its wandb sweep, specified: the verdict rule, a real (tiny) run of the
default and the tutorial anchor end to end, and a sweep whose every parameter the trainer takes."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from bench import ablation
from pipeline.config import load_config
from pipeline.tracking import new_run_id

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "configs" / "sweeps" / "ablation.yaml"


def _cell(mean: float, std: float, n: int = 3) -> list[float]:
    return [mean, std, n]


def _settings(tmp_path: Path, **changes) -> ablation.Settings:
    """Tiny ablation settings with runs and report under ``tmp_path``."""
    values = {
        "steps": 30,
        "multi_steps": 30,
        "seeds": [0],
        "samples": 500,
        "jobs": 1,
        "trackers": "none",
        "out_dir": tmp_path,
        "runs_dir": tmp_path,
        "reuse": False,
    }
    return ablation.Settings(**(values | changes))


@pytest.mark.parametrize(
    ("on", "off", "better", "expected"),
    [
        (_cell(50, 2), _cell(60, 2), "lower", "confirmed"),  # off is worse by 10 > 2 SE (3.3)
        (_cell(60, 2), _cell(50, 2), "lower", "refuted"),
        (_cell(50, 5), _cell(54, 5), "lower", "not distinguishable"),  # 4 < 2 SE (8.2)
        (_cell(0.6, 0.01), _cell(0.5, 0.01), "higher", "confirmed"),
        (_cell(math.nan, 0), _cell(1, 0), "lower", "not measured"),
        (_cell(50.0, math.nan, 1), _cell(50.5, math.nan, 1), "lower", "not measured"),  # 1 seed
    ],
)
def test_a_claim_is_decided_by_two_standard_errors_of_the_difference(on, off, better, expected):
    assert ablation.verdict(on, off, better)[0] == expected


def test_aggregate_gives_mean_and_sample_std_over_the_seeds_where_a_metric_is_finite():
    rows = [{"variant": "a", "fid": v} for v in (10.0, 12.0, 14.0, math.nan)]
    mean, std, n = ablation.aggregate(rows)["a"]["fid"]
    assert (mean, n) == (12.0, 3) and std == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("ema_fids", "ema_on_by_default", "expected"),
    [
        ((70.0, 72.0, 74.0), False, "PASS"),  # the EMA run (ema) is better than the live (a)
        ((80.0, 81.0, 82.0), False, "PASS"),  # worse by 9, within two standard errors (9.3)
        ((99.0, 100.0, 101.0), False, "MISS"),  # worse by more than two standard errors
        ((99.0, 100.0, 101.0), True, "PASS"),  # (ema) is then the EMA-off run, and worse
    ],
)
def test_targets_judge_the_default_and_the_ema_against_the_live_generator(
    ema_fids, ema_on_by_default, expected
):
    default = [(72.0, 0.55, 10, 0.03), (80.0, 0.5, 10, 0.04), (64.0, 0.6, 10, 0.02)]
    rows = [
        {"variant": "a", "fid": f, "recall": r, "classes_covered": c, "class_kl": kl}
        for f, r, c, kl in default
    ] + [{"variant": "ema", "fid": f} for f in ema_fids]
    settings = SimpleNamespace(ema_on_by_default=ema_on_by_default)
    lines = ablation.targets(settings, rows, ablation.aggregate(rows))
    assert "10/10 classes on every seed: [10, 10, 10]: **PASS**" in lines[0]
    assert lines[1].endswith("0.030: **PASS**")
    assert "FID <= 45" in lines[2] and lines[2].endswith("**MISS**")  # FID 72.0
    assert "EMA is no worse" in lines[3] and lines[3].endswith(f"**{expected}**")


def test_every_claim_compares_variants_that_exist_on_a_declared_metric():
    metrics = {m for m, _, _ in ablation.METRICS}
    for claim in ablation.CLAIMS:
        assert claim.on in ablation.BY_KEY and claim.off in ablation.BY_KEY, claim
        assert claim.metric in metrics, claim


def test_every_variant_is_a_config_the_trainer_accepts(tmp_path):
    s = _settings(tmp_path, steps=10, multi_steps=8, samples=100)
    preset = ROOT / "configs" / "mnist5k.yaml"
    for variant in ablation.VARIANTS:
        cfg = load_config(preset, ablation._trainer_overrides(s, variant, 0))
        assert cfg.log.group == variant.key
        assert cfg.train.steps == (10 if variant.processes == 1 else 8)
        if variant.batch_size:
            assert cfg.train.batch_size == variant.batch_size


@pytest.mark.slow
def test_a_tiny_ablation_of_the_default_and_the_tutorial_loop_writes_its_report(tmp_path):
    code = ablation.main(
        [
            "--only",
            "a,h",
            "--seeds",
            "3",
            "--steps",
            "6",
            "--samples",
            "100",
            "--trackers",
            "none",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--out-dir",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("a", 3), ("h", 3)]
    for run in result["runs"]:
        assert run["n_samples"] == 100 and math.isfinite(run["fid"])
        assert -1 <= run["d_gap"] <= 1 and 0 <= run["d_sensitivity"] <= 1
    report = (tmp_path / "out" / "ablation.md").read_text()
    assert "| (a) default |" in report and "| (h) tutorial loop" in report
    assert "the default beats the tutorial loop (h)" in report
    assert (tmp_path / "out" / "ablation-grids.png").read_bytes().startswith(b"\x89PNG")


def test_ablation_refuses_an_unknown_variant_in_one_line(capsys):
    assert ablation.main(["--only", "a,zz"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown variant 'zz'" in err[0]


# --- the wandb sweep ----------------------------------------------------------------------------


def _sweep() -> dict:
    return yaml.safe_load(SWEEP.read_text())


def test_the_sweep_launches_the_trainer_through_accelerate():
    sweep = _sweep()
    command = sweep["command"]
    assert sweep["program"] == "pipeline/train.py" and "${program}" in command
    assert command[1:3] == ["accelerate", "launch"]
    assert command[-1] == "${args_no_hyphens}"  # key=value: the trainer's override form


def test_every_sweep_parameter_is_a_config_key_with_valid_values(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "abc12345")
    sweep = _sweep()
    fixed = [a for a in sweep["command"] if "=" in a]  # resume=none, overwrite=true
    grid = {
        key: spec["values"] if "values" in spec else [spec["value"]]
        for key, spec in sweep["parameters"].items()
    }
    preset = ROOT / "configs" / "mnist5k.yaml"
    for values in itertools.product(*grid.values()):
        # The agent renders each as key=value with Python's str (True, not true).
        args = [f"{key}={value}" for key, value in zip(grid, values)]
        cfg = load_config(preset, [*fixed, *args])
        assert cfg.output_dir == "runs/sweep/abc12345"  # one directory per sweep run
    assert len(list(itertools.product(*grid.values()))) >= 3 * 2**4


def test_a_sweep_run_takes_the_run_id_its_agent_assigned(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "sweep001")
    monkeypatch.setenv("WANDB_SWEEP_ID", "abcd1234")
    assert new_run_id() == "sweep001"
    monkeypatch.delenv("WANDB_SWEEP_ID")  # a WANDB_RUN_ID left in a shell is not a sweep's
    assert new_run_id() != "sweep001"
    monkeypatch.delenv("WANDB_RUN_ID")
    assert new_run_id() != new_run_id() and len(new_run_id()) == 8


def test_the_sweep_switches_each_technique_between_its_default_strength_and_off():
    params = _sweep()["parameters"]
    default = load_config(ROOT / "configs" / "mnist5k.yaml")
    for key, on in (
        ("model.g_batchnorm", default.model.g_batchnorm),
        ("model.d_dropout", default.model.d_dropout),
        ("train.instance_noise_std", default.train.instance_noise_std),
        ("train.d_weight_penalty", default.train.d_weight_penalty),
    ):
        assert params[key]["values"] == [on, type(on)(0)], key


def test_reuse_keeps_a_tutorial_run_only_if_it_was_trained_with_todays_values(tmp_path):
    s = _settings(tmp_path, reuse=True)
    h = ablation.BY_KEY["h"]
    out = tmp_path / "h" / "seed-0"
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"steps": 30}))
    row = {"n_samples": 500}
    assert not ablation._reusable(s, h, 0, out, row)  # no record of its values: retrain
    stored = ablation._training_values(ablation._tutorial_config(0))
    assert stored["model"]["d_dropout"] == 0.5  # the reference design's, not today's default
    (out / "tutorial-config.json").write_text(json.dumps(stored))
    assert ablation._reusable(s, h, 0, out, row)
    stored["model"]["d_dropout"] = 0.1
    (out / "tutorial-config.json").write_text(json.dumps(stored))
    assert not ablation._reusable(s, h, 0, out, row)
    assert not ablation._reusable(s, h, 0, out, {"n_samples": 5000})  # other sample count


def test_a_child_run_does_not_inherit_a_launchers_rank_variables(tmp_path, monkeypatch):
    """`make ablation` started under torchrun or srun: each run must still be its own job."""
    for name, value in (
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("MASTER_ADDR", "n1"),
        ("PMI_SIZE", "8"),
    ):
        monkeypatch.setenv(name, value)
    seen = {}

    def call(cmd, env, **_):
        seen.update(env)
        return 1  # stop there: a failed run

    monkeypatch.setattr(ablation.subprocess, "call", call)
    s = _settings(tmp_path)
    with pytest.raises(RuntimeError, match="run a seed 0 failed"):
        ablation.train_one(s, ablation.BY_KEY["a"], 0)
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "PMI_SIZE"} & set(seen)
    assert seen["OMP_NUM_THREADS"] == "1" and "PATH" in seen
