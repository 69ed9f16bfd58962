"""Experiment tracking: ``metrics.jsonl`` always, plus wandb and/or TensorBoard through Accelerate.

The trainer builds the Accelerator with the trackers chosen here, then creates a
:class:`Tracking` on every rank; only the main process logs or writes anything::

    log_with, init_kwargs = tracker_setup(cfg, run_id)
    accelerator = Accelerator(log_with=log_with, project_dir=cfg.output_dir)
    tracking = Tracking(accelerator, cfg, run_id, init_kwargs)  # on the main process
    tracking.truncate_after(resume_step)            # on resume: drop rows the checkpoint never saw
    tracking.log({"train/d_loss": 0.7}, step=100)
    tracking.finish()

wandb never prompts and never needs the network: without an API key it runs offline (files under
``output_dir/wandb``; upload later with ``wandb sync``), and an online start that fails falls back
to offline with a warning. The wandb run id is stored in checkpoints so a resumed run continues
the same wandb run.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import string
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.config import RunConfig, to_dict
from pipeline.errors import ConfigError
from pipeline.io import atomic_write_text
from pipeline.report import read_metrics

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_MODES = ("online", "offline", "disabled", "shared")
# Legacy spellings wandb still accepts.
_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
# wandb >= 0.31 defaults to the CoreWeave Forge proxy; a key stored for either host works.
_DEFAULT_WANDB_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")
# An online start that cannot reach the server gives up after this long and falls back offline.
ONLINE_INIT_TIMEOUT_S = 30.0


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _netrc_has_key(hosts: tuple[str, ...]) -> bool:
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    return any((auth := entries.authenticators(host)) and auth[2] for host in hosts)


def wandb_api_key_available() -> bool:
    """True if wandb can authenticate without prompting: WANDB_API_KEY, an identity token
    file, or a netrc entry for the host in WANDB_BASE_URL (default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL")
    if base_url:
        host = urlsplit(base_url).hostname or ""
        hosts = _DEFAULT_WANDB_HOSTS if host in _DEFAULT_WANDB_HOSTS else (host,)
    else:
        hosts = _DEFAULT_WANDB_HOSTS
    return _netrc_has_key(hosts)


def wandb_mode() -> str:
    """The wandb mode to run in: WANDB_DISABLED / WANDB_MODE when set, else online only if an
    API key is available without prompting, else offline. Reads no network, never prompts.
    An unknown WANDB_MODE is a ConfigError (exit status 2), on every rank alike."""
    if _truthy(os.environ.get("WANDB_DISABLED", "")):
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        mode = _MODE_ALIASES.get(mode, mode)
        if mode not in WANDB_MODES:
            raise ConfigError(
                f"config error: WANDB_MODE={os.environ['WANDB_MODE']!r} is not a wandb mode; "
                f"set it to one of {', '.join(WANDB_MODES)} or unset it"
            )
        return mode
    return "online" if wandb_api_key_available() else "offline"


def new_run_id() -> str:
    """A fresh run's id: under a wandb sweep agent (WANDB_SWEEP_ID set) the WANDB_RUN_ID it
    assigned, so the run joins its sweep; else 8 random base-36 characters, wandb's format (a
    WANDB_RUN_ID left in a shell must not make unrelated runs share one id)."""
    run_id = os.environ.get("WANDB_RUN_ID", "").strip()
    if run_id and os.environ.get("WANDB_SWEEP_ID", "").strip():
        return run_id
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _wandb_init_kwargs(cfg: RunConfig, run_id: str, mode: str) -> dict[str, Any]:
    import wandb

    settings: dict[str, Any] = {"silent": True, "console": "off"}
    if mode == "online":
        settings["init_timeout"] = ONLINE_INIT_TIMEOUT_S
    kwargs: dict[str, Any] = {
        "dir": str(cfg.output_dir),
        "mode": mode,
        "id": run_id,
        "resume": "allow",
        "name": cfg.log.run_name or Path(cfg.output_dir).resolve().name,
        "settings": wandb.Settings(**settings),
    }
    if cfg.log.group:
        kwargs["group"] = cfg.log.group
    if cfg.log.tags:
        kwargs["tags"] = list(cfg.log.tags)
    return kwargs


def tracker_setup(cfg: RunConfig, run_id: str | None) -> tuple[list[str], dict]:
    """``log_with`` for the Accelerator and the matching ``init_trackers`` init_kwargs.

    wandb comes first (a failed wandb start is retried offline before anything else started)
    and is left out when WANDB_DISABLED / WANDB_MODE=disabled; ["none"] gives [].
    """
    log_with = [name for name in ("wandb", "tensorboard") if name in cfg.log.trackers]
    init_kwargs: dict[str, Any] = {}
    if "wandb" in log_with:
        mode = wandb_mode()
        if mode == "disabled":
            log_with.remove("wandb")
        else:
            init_kwargs["wandb"] = _wandb_init_kwargs(cfg, run_id or new_run_id(), mode)
    return log_with, init_kwargs


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a.b": scalar}; TensorBoard hparams accept only scalars."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _scalar(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    return float(value)  # numpy / 0-d torch values; Accelerate's TensorBoard drops them otherwise


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _drop_torn_tail(path: Path) -> None:
    """Cut an unterminated last line (a killed write) so the next row starts on its own line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


class Tracking:
    """Logs metrics and images; made on the main process after the Accelerator (the trainer
    agrees on ``run_id`` across ranks first). Never communicates; on another rank it is a no-op.

    ``init_kwargs`` are ``tracker_setup``'s, so the wandb settings are built once; the run id in
    them is replaced by ``run_id`` (a resumed run continues the checkpoint's wandb run).
    """

    def __init__(
        self,
        accelerator: Any,
        cfg: RunConfig,
        run_id: str | None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.is_main = accelerator.is_main_process
        self.wandb_mode: str | None = None
        self._finished = False

        self._run_id: str = run_id or new_run_id()
        self._init_kwargs = init_kwargs

        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.metrics_path)
        self._start_trackers()

    @property
    def run_id(self) -> str:
        """The wandb run id (also generated when wandb is off); store it in checkpoints."""
        return self._run_id

    def _tracker_names(self) -> list[str]:
        return [str(t) for t in self.accelerator.log_with]

    def _start_trackers(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        names = self._tracker_names()
        if not names:
            return
        if "tensorboard" in names:
            # Accelerate writes to <logging_dir>/<project>; keep it beside wandb/ in output_dir.
            acc.project_configuration.logging_dir = str(self.output_dir / TENSORBOARD_DIR)
        if self._init_kwargs is None:
            _, self._init_kwargs = tracker_setup(cfg, self._run_id)
        init_kwargs = {name: dict(kwargs) for name, kwargs in self._init_kwargs.items()}
        if "wandb" in names:
            init_kwargs["wandb"]["id"] = self._run_id
            self.wandb_mode = init_kwargs["wandb"]["mode"]
            if self.wandb_mode == "online" and not wandb_api_key_available():
                warnings.warn(
                    "WANDB_MODE=online but no wandb API key (WANDB_API_KEY or netrc); "
                    "logging offline instead of prompting for one",
                    stacklevel=3,
                )
                self.wandb_mode = "offline"
                init_kwargs["wandb"] = _wandb_init_kwargs(cfg, self._run_id, self.wandb_mode)
        try:
            acc.init_trackers(cfg.log.project, config=None, init_kwargs=init_kwargs)
        except Exception as exc:
            if "wandb" not in names:
                raise
            self._restart_without_failed_wandb(exc, init_kwargs)
        self._store_config()

    def _restart_without_failed_wandb(self, exc: Exception, init_kwargs: dict[str, Any]) -> None:
        """wandb failed to start (it is started first, so nothing else has): retry offline, and
        if even that fails go on without wandb rather than lose the training run."""
        import wandb

        acc = self.accelerator
        error = _one_line(exc)
        self._discard_started_trackers()
        # The failed run keeps its id registered in wandb's service process ("run ID is in
        # use"); tearing the service down lets the offline retry reuse the id.
        wandb.teardown()
        if self.wandb_mode != "offline":
            warnings.warn(
                f"wandb could not start {self.wandb_mode} ({error}); logging offline to "
                f"{self.output_dir / 'wandb'} instead (upload later with `wandb sync`)",
                stacklevel=4,
            )
            self.wandb_mode = "offline"
            init_kwargs["wandb"] = _wandb_init_kwargs(self.cfg, self._run_id, "offline")
            try:
                acc.init_trackers(self.cfg.log.project, config=None, init_kwargs=init_kwargs)
                return
            except Exception as offline_exc:
                error = _one_line(offline_exc)
                self._discard_started_trackers()
                wandb.teardown()
        warnings.warn(
            f"wandb could not start offline ({error}); continuing without wandb "
            f"(metrics.jsonl and any other tracker still record the run)",
            stacklevel=4,
        )
        self.wandb_mode = None
        acc.log_with = [t for t in acc.log_with if str(t) != "wandb"]
        init_kwargs.pop("wandb", None)
        if acc.log_with:
            acc.init_trackers(self.cfg.log.project, config=None, init_kwargs=init_kwargs)

    def _discard_started_trackers(self) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name != "wandb":
                try:
                    tracker.finish()
                except Exception:  # never started (it came after wandb): nothing to close
                    pass
        self.accelerator.trackers.clear()

    def _store_config(self) -> None:
        config = to_dict(self.cfg)
        for tracker in self.accelerator.trackers:
            tracker.store_init_configuration(
                config if tracker.name == "wandb" else _flatten(config)
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl and log to every tracker."""
        if not self.is_main:
            return
        values = {name: _scalar(v) for name, v in metrics.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")
            f.flush()
        if not self._finished:
            self.accelerator.log(values, step=int(step))

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """Log an HxWxC (C in 1, 3, 4) or HxW uint8 image to every tracker (not to jsonl)."""
        if not self.is_main or self._finished:
            return
        image = np.asarray(image)
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (1, 3, 4))
        ):
            raise ValueError(
                f"log_image({name!r}) needs a uint8 HxW or HxWxC array with C in 1, 3, 4; "
                f"got dtype {image.dtype} and shape {image.shape}"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        for tracker in self.accelerator.trackers:  # Accelerate's own image logging
            if tracker.name == "tensorboard":
                batch = image[None] if image.ndim == 3 else image[None, :, :, None]
                tracker.log_images({name: batch}, step=int(step), dataformats="NHWC")
                tracker.writer.flush()
            else:
                tracker.log_images({name: [image]}, step=int(step))

    def truncate_after(self, step: int, partial_interval: bool = False) -> int:
        """Keep only metrics.jsonl rows with step <= ``step`` (atomic rewrite); return how many
        rows were dropped. Call on resume so steps redone after the checkpoint are not doubled.

        With ``partial_interval`` (the checkpoint carried a log interval in progress) the
        training row at ``step`` goes too: it covered part of an interval this run completes,
        and an uninterrupted run has no such row. Evaluation rows at ``step`` stay."""
        if not self.is_main or not self.metrics_path.exists():
            return 0
        rows = read_metrics(self.metrics_path)
        kept = [
            row
            for row in rows
            if row["step"] < step
            or (
                row["step"] == step
                and not (partial_interval and any(k.startswith("train/") for k in row))
            )
        ]
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
        return len(rows) - len(kept)

    def finish(self) -> None:
        """Close every tracker (idempotent).

        Unlike ``accelerator.end_training()`` this leaves the process group alone: tearing it
        down on the main process only would hang the other ranks' next collective.
        """
        if not self.is_main or self._finished:
            return
        self._finished = True
        trackers = list(self.accelerator.trackers)
        # Removed before closing so a later accelerator.log / end_training cannot reach a
        # closed tracker.
        self.accelerator.trackers.clear()
        for tracker in trackers:
            tracker.finish()
