"""Tracking and report: wandb never prompts or needs the network, metrics.jsonl is the record,
a resumed run continues the same wandb run, and the report files are written atomically.

CPU only, no network: wandb runs offline against a temporary HOME/NETRC.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from pipeline import tracking as tracking_module
from pipeline.config import LogConfig, RunConfig
from pipeline.errors import ConfigError
from pipeline.report import read_metrics, write_curves, write_summary
from pipeline.tracking import Tracking, tracker_setup, wandb_mode

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAKE_KEY = "k" * 40


@pytest.fixture(autouse=True)
def clean_env(tmp_path, monkeypatch):
    """No wandb login, WANDB_* variable or Accelerator state of this machine leaks in."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(tmp_path: Path, trackers: list[str], **log: object) -> RunConfig:
    return RunConfig(output_dir=str(tmp_path / "run"), log=LogConfig(trackers=trackers, **log))


def start(cfg: RunConfig, run_id: str | None = None) -> Tracking:
    log_with, _ = tracker_setup(cfg, run_id)
    # None rather than [] keeps Accelerate from warning that no tracker is installed.
    accelerator = Accelerator(cpu=True, log_with=log_with or None, project_dir=cfg.output_dir)
    return Tracking(accelerator, cfg, run_id)


def log_rows(tracking: Tracking, steps: range) -> None:
    for step in steps:
        metrics = {"train/d_loss": 1.0 / (step + 1), "train/g_loss": np.float32(0.5)}
        tracking.log(metrics, step=step)


def offline_run_dirs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


# --- wandb_mode ---------------------------------------------------------------------------


def test_wandb_mode_is_offline_without_an_api_key():
    assert wandb_mode() == "offline"


@pytest.mark.parametrize(
    ("value", "mode"),
    [("disabled", "disabled"), ("offline", "offline"), ("online", "online"), ("dryrun", "offline")],
)
def test_wandb_mode_honours_wandb_mode(monkeypatch, value, mode):
    monkeypatch.setenv("WANDB_MODE", value)
    assert wandb_mode() == mode


def test_wandb_disabled_wins_over_wandb_mode(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode() == "disabled"


def test_wandb_mode_rejects_an_unknown_wandb_mode(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'.*one of online, offline"):
        wandb_mode()


def test_an_unknown_wandb_mode_is_a_config_error_exit_status_2(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ConfigError, match=r"^config error: WANDB_MODE='bogus'") as refused:
        wandb_mode()
    assert refused.value.exit_status == 2


def test_wandb_mode_is_online_with_wandb_api_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode() == "online"


def test_wandb_mode_is_online_only_with_a_netrc_entry_for_the_wandb_host(monkeypatch):
    netrc = Path(os.environ["NETRC"])
    netrc.write_text(f"machine wandb.example.com\n  login user\n  password {FAKE_KEY}\n")
    assert wandb_mode() == "offline"  # a key for another host does not count
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_BASE_URL")
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    assert wandb_mode() == "online"


# --- tracker_setup ------------------------------------------------------------------------


def test_tracker_setup_builds_log_with_and_wandb_init_kwargs(tmp_path):
    cfg = make_cfg(tmp_path, ["tensorboard", "wandb"], group="sweep", tags=["a", "b"])
    log_with, init_kwargs = tracker_setup(cfg, "abc12345")
    assert log_with == ["wandb", "tensorboard"]  # wandb first: it is the one that may fail
    wandb_kwargs = init_kwargs["wandb"]
    assert wandb_kwargs["dir"] == cfg.output_dir
    assert (wandb_kwargs["mode"], wandb_kwargs["id"], wandb_kwargs["resume"]) == (
        "offline",
        "abc12345",
        "allow",
    )
    assert wandb_kwargs["name"] == "run"  # the output directory's name
    assert (wandb_kwargs["group"], wandb_kwargs["tags"]) == ("sweep", ["a", "b"])
    assert wandb_kwargs["settings"].silent


def test_tracker_setup_is_empty_for_none_and_drops_disabled_wandb(tmp_path, monkeypatch):
    assert tracker_setup(make_cfg(tmp_path, ["none"]), None) == ([], {})
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracker_setup(make_cfg(tmp_path, ["wandb", "tensorboard"]), None) == (
        ["tensorboard"],
        {},
    )


# --- Tracking -----------------------------------------------------------------------------


def test_offline_wandb_run_writes_run_files_and_metrics_jsonl(tmp_path):
    cfg = make_cfg(tmp_path, ["wandb"], run_name="probe")
    tracking = start(cfg)
    assert tracking.wandb_mode == "offline"
    log_rows(tracking, range(0, 30, 10))
    tracking.log_image("samples", np.zeros((28, 28, 1), np.uint8), step=20)
    tracking.finish()
    tracking.finish()  # idempotent

    output_dir = Path(cfg.output_dir)
    (run_dir,) = offline_run_dirs(output_dir)
    assert run_dir.name.endswith(f"-{tracking.run_id}")
    assert (run_dir / f"run-{tracking.run_id}.wandb").stat().st_size > 0
    assert list((run_dir / "files" / "media" / "images").glob("samples_*.png"))
    rows = read_metrics(output_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 10, 20]
    assert rows[1] == {"step": 10, "train/d_loss": pytest.approx(1 / 11), "train/g_loss": 0.5}


def test_resume_with_the_same_run_id_continues_the_same_wandb_run(tmp_path):
    cfg = make_cfg(tmp_path, ["wandb"])
    first = start(cfg)
    log_rows(first, range(0, 40, 10))
    first.finish()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    resumed = start(cfg, run_id=first.run_id)  # the id the checkpoint stored
    assert resumed.run_id == first.run_id
    assert resumed.truncate_after(20) == 1  # step 30 came after the checkpoint
    log_rows(resumed, range(30, 50, 10))
    resumed.finish()

    # One offline run directory per start, all of the same run; wandb suffixes "-1" to the
    # directory name when both starts fall in the same second.
    run_dirs = offline_run_dirs(Path(cfg.output_dir))
    assert len(run_dirs) == 2
    assert all((d / f"run-{first.run_id}.wandb").exists() for d in run_dirs)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 10, 20, 30, 40]


def test_online_start_without_a_server_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(tracking_module, "ONLINE_INIT_TIMEOUT_S", 2.0)
    cfg = make_cfg(tmp_path, ["wandb"])
    with pytest.warns(UserWarning, match="could not start online.*logging offline"):
        tracking = start(cfg, run_id="fallback1")
    assert tracking.wandb_mode == "offline"
    log_rows(tracking, range(2))
    tracking.finish()
    assert (offline_run_dirs(Path(cfg.output_dir))[-1] / "run-fallback1.wandb").exists()


def test_online_mode_without_a_key_logs_offline_instead_of_prompting(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    cfg = make_cfg(tmp_path, ["wandb"])
    with pytest.warns(UserWarning, match="no wandb API key"):
        tracking = start(cfg)
    assert tracking.wandb_mode == "offline"
    tracking.finish()


def test_no_tracker_writes_only_metrics_jsonl(tmp_path):
    cfg = make_cfg(tmp_path, ["none"])
    tracking = start(cfg)
    log_rows(tracking, range(3))
    tracking.log_image("samples", np.zeros((4, 4, 3), np.uint8), step=2)
    tracking.finish()
    assert [p.name for p in Path(cfg.output_dir).iterdir()] == ["metrics.jsonl"]
    assert len(tracking.run_id) == 8  # still an id to store in checkpoints


def test_tensorboard_writes_scalars_and_images_under_output_dir_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, ["tensorboard"])
    tracking = start(cfg)
    log_rows(tracking, range(0, 30, 10))
    tracking.log_image("samples", np.full((8, 8, 3), 255, np.uint8), step=20)
    tracking.finish()

    tensorboard_dir = Path(cfg.output_dir) / "tensorboard"
    event_file = min(tensorboard_dir.rglob("events.out.tfevents.*"), key=lambda p: len(p.parts))
    events = EventAccumulator(str(event_file.parent)).Reload()
    assert [e.step for e in events.Scalars("train/d_loss")] == [0, 10, 20]
    assert [e.step for e in events.Images("samples")] == [20]


def test_log_image_rejects_a_non_uint8_image(tmp_path):
    tracking = start(make_cfg(tmp_path, ["none"]))
    with pytest.raises(ValueError, match="uint8 HxW or HxWxC"):
        tracking.log_image("samples", np.zeros((4, 4, 3), np.float32), step=0)


def test_tracking_is_a_no_op_off_the_main_process(tmp_path):
    cfg = make_cfg(tmp_path, ["wandb"])
    not_main = types.SimpleNamespace(is_main_process=False, num_processes=1, log_with=[])
    tracking = Tracking(not_main, cfg, run_id="abc12345")
    log_rows(tracking, range(3))
    assert tracking.truncate_after(0) == 0
    tracking.finish()
    assert tracking.run_id == "abc12345"
    assert not Path(cfg.output_dir).exists()


def test_truncate_after_keeps_only_rows_up_to_the_step(tmp_path):
    tracking = start(make_cfg(tmp_path, ["none"]))
    log_rows(tracking, range(6))
    assert tracking.truncate_after(3) == 2
    assert [row["step"] for row in read_metrics(tracking.metrics_path)] == [0, 1, 2, 3]
    assert [p.name for p in tracking.metrics_path.parent.iterdir()] == ["metrics.jsonl"]


def test_truncate_after_a_partial_interval_drops_its_train_row_and_keeps_evaluation_rows(tmp_path):
    """On resume from a checkpoint that carried a log interval in progress, the training row
    logged at the resume step covered part of that interval; the resumed run logs it whole."""
    tracking = start(make_cfg(tmp_path, ["none"]))
    tracking.log({"train/d_loss": 1.0}, step=10)
    tracking.log({"train/d_loss": 2.0}, step=12)
    tracking.log({"eval/fid": 3.0}, step=12)
    tracking.log({"train/d_loss": 4.0}, step=14)
    assert tracking.truncate_after(12, partial_interval=True) == 2
    assert read_metrics(tracking.metrics_path) == [
        {"step": 10, "train/d_loss": 1.0},
        {"step": 12, "eval/fid": 3.0},
    ]


def test_a_torn_last_row_is_cut_before_new_rows_are_appended(tmp_path):
    cfg = make_cfg(tmp_path, ["none"])
    metrics = Path(cfg.output_dir) / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"step": 0, "train/d_loss": 1.0}\n{"step": 1, "train/d_lo')
    tracking = start(cfg, run_id="abc12345")
    log_rows(tracking, range(1, 3))
    assert [row["step"] for row in read_metrics(metrics)] == [0, 1, 2]


# --- report -------------------------------------------------------------------------------


def test_read_metrics_ignores_a_torn_final_line_but_not_a_corrupt_middle_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a": 2}\n{"step": 2, "a"')
    assert [row["step"] for row in read_metrics(path)] == [0, 1]
    path.write_text('{"step": 0, "a": 1}\n{"step": 1, "a"\n{"step": 2, "a": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a JSON row"):
        read_metrics(path)
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_write_curves_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": s,
            "train/d_loss": 1.0,
            "train/g_loss": 2.0,
            "train/d_real": 0.7,
            "train/d_fake": 0.3,
        }
        for s in range(0, 100, 10)
    ]
    rows.append({"step": 100, "eval/fid": 42.0})
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "plots" / "curves.png"
    write_curves(metrics, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temp file left


def test_write_summary_writes_indented_json(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(path, {"final_step": 10, "fid": np.float32(3.5), "dir": tmp_path})
    assert json.loads(path.read_text()) == {"final_step": 10, "fid": 3.5, "dir": str(tmp_path)}
    assert path.read_text().startswith('{\n  "final_step"')
