"""Checkpoint policy, as one object the trainer calls: what to resume from, how to restore a
run, when a save is allowed and what it holds. ``format.py`` does the file work.

    manager = CheckpointManager(cfg, accelerator)
    found = manager.resolve_all_ranks()        # before building: output_dir, resume rules, fallback
    ...build state, ema, batches, the loop's stats...
    resumed = manager.load(found, state, ema, batches, stats)   # every rank, no communication
    manager.save_all_ranks(step, state, ema, batches, run_id, stats)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import format as fmt
from pipeline.checkpoint import schema
from pipeline.config import RunConfig, to_dict
from pipeline.data import ShardedBatches
from pipeline.distributed import (
    check_replicas_consistent,
    gather_bytes_all_ranks,
    run_on_main_all_ranks,
    seed_rank_streams,
)
from pipeline.ema import EMA
from pipeline.errors import CheckpointError, ConfigError, NonFiniteError, disk_error
from pipeline.stats import StepStats
from pipeline.step import GANState

log = logging.getLogger(__name__)

RUN_ARTIFACTS = (
    "checkpoints",
    "samples",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "config.yaml",
    "tensorboard",
)
"""What a run writes into output_dir; resume=none overwrite=true removes exactly these."""
RUN_MARKERS = (*RUN_ARTIFACTS, "wandb")
"""Entries that show output_dir holds a run (wandb/ is kept even by overwrite=true)."""


@dataclass
class Resumed:
    step: int
    tracker_run_id: str | None
    partial_interval: bool = False
    """The checkpoint carried a log interval in progress: the metrics row its run logged at
    ``step`` covered part of an interval that this run completes, so that row is dropped."""


def scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, Any] | None:
    """The fp16 loss scaler as JSON: current scale, growth tracker, constructor settings."""
    if scaler is None:
        return None
    if not scaler.is_enabled():
        return {"enabled": False}
    sd = scaler.state_dict()
    return {
        "enabled": True,
        "scale": float(sd["scale"]),
        "growth_factor": float(sd["growth_factor"]),
        "backoff_factor": float(sd["backoff_factor"]),
        "growth_interval": int(sd["growth_interval"]),
        "growth_tracker": int(sd["_growth_tracker"]),
    }


def restore_scaler(scaler: torch.amp.GradScaler | None, saved: dict[str, Any] | None) -> None:
    """Put ``scaler_state``'s values back exactly; a scaler only one side has is left alone."""
    if scaler is None or saved is None or not saved["enabled"] or not scaler.is_enabled():
        if (saved is not None and saved["enabled"]) != (scaler is not None and scaler.is_enabled()):
            log.info("the checkpoint and this run differ in fp16 loss scaling; scaler not restored")
        return
    scaler.load_state_dict(
        {
            "scale": saved["scale"],
            "growth_factor": saved["growth_factor"],
            "backoff_factor": saved["backoff_factor"],
            "growth_interval": saved["growth_interval"],
            "_growth_tracker": saved["growth_tracker"],
        }
    )


def named_state(accelerator, state: GANState, ema: EMA | None) -> dict[str, torch.Tensor]:
    """Every model tensor under its checkpoint name: ``G.``, ``D.``, ``G_ema.`` + state-dict key
    of the plain (unwrapped) modules."""
    named = {
        f"G.{k}": v
        for k, v in accelerator.unwrap_model(state.G, keep_torch_compile=False).state_dict().items()
    }
    named.update(
        {
            f"D.{k}": v
            for k, v in accelerator.unwrap_model(state.D, keep_torch_compile=False)
            .state_dict()
            .items()
        }
    )
    if ema is not None:
        named.update({f"G_ema.{k}": v for k, v in ema.module.state_dict().items()})
    return named


class CheckpointManager:
    def __init__(self, cfg: RunConfig, accelerator) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.out = Path(cfg.output_dir)
        self.directory = self.out / "checkpoints"

    # --- resolve --------------------------------------------------------------------------

    def resolve_all_ranks(self) -> fmt.Checkpoint | None:
        """Collective: rank 0 checks output_dir, applies the resume rules and verifies the
        checkpoint (the full schema); every rank gets the same answer, the same manifest (no
        rank re-reads it), or the same error."""
        found = run_on_main_all_ranks(self._resolve_main, share_result=True)
        if found is None:
            return None
        return fmt.Checkpoint(Path(found["path"]), found["manifest"])

    def _resolve_main(self) -> dict[str, Any] | None:
        """resume=none: refuse (or with overwrite clear) an existing run or foreign files; auto:
        the newest checkpoint that verifies, falling back past bad ones; else the given path."""
        cfg = self.cfg
        self._check_output_dir_main()
        if cfg.resume == "none":
            self._clear_for_fresh_run_main()
            return None
        fmt.check_latest_replaceable(self.directory)
        if cfg.resume == "auto":
            found = fmt.find_resumable(self.directory)
            if found is None and fmt.complete_checkpoints(self.directory):
                raise CheckpointError(
                    f"every checkpoint under {self.directory} is corrupt; "
                    "set resume=none overwrite=true to start over"
                )
        else:
            if not os.path.lexists(cfg.resume):
                raise ConfigError(
                    f"config error: resume={cfg.resume} does not exist; set resume to a "
                    "checkpoint (step-NNNNNNNN) or run directory, or to auto or none"
                )
            found = fmt.resolve_checkpoint(cfg.resume)
        if found is None:
            return None
        fmt.check_compatible(found.manifest, to_dict(cfg)["model"], found.path)
        return {"path": str(found.path), "manifest": found.manifest}

    def _check_output_dir_main(self) -> None:
        """output_dir is, or can become, a directory this process writes; checked before anything
        is written, so a wrong path costs one line, not a traceback halfway through."""
        out, probe = self.out, self.out
        while not os.path.lexists(probe) and probe.parent != probe:
            probe = probe.parent
        if probe.is_symlink() and not probe.exists():
            raise ConfigError(
                f"config error: output_dir {out}: {probe} is a broken symbolic link; "
                "set output_dir elsewhere"
            )
        if probe.exists() and not probe.is_dir():
            where = "is a file" if probe == out else f"lies under {probe}, which is a file"
            raise ConfigError(
                f"config error: output_dir {out} {where}; set output_dir to a directory"
            )
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(
                f"config error: output_dir {out} is not writable ({probe}: permission denied or "
                "read-only filesystem); set output_dir to a directory you can write"
            )

    def _clear_for_fresh_run_main(self) -> None:
        """resume=none: an empty or new output_dir, or overwrite=true, which removes the run's
        own files (``RUN_ARTIFACTS``) and never anything else."""
        if not self.out.is_dir():
            return
        entries = sorted(p.name for p in self.out.iterdir())
        run = [name for name in entries if name in RUN_MARKERS]
        foreign = [name for name in entries if name not in RUN_MARKERS]
        if not self.cfg.overwrite:
            if run:
                raise ConfigError(
                    f"config error: output_dir {self.out} already holds a run ({', '.join(run)}); "
                    "set resume=auto to continue it, overwrite=true to replace it, or another output_dir"
                )
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise ConfigError(
                    f"config error: output_dir {self.out} is not empty and holds no run ({shown}); "
                    "set output_dir to a new or empty directory, or overwrite=true to write the "
                    "run beside these files (they are kept)"
                )
        for name in run:
            if name not in RUN_ARTIFACTS:
                continue
            target = self.out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()

    # --- load -----------------------------------------------------------------------------

    def load(
        self,
        c: fmt.Checkpoint,
        state: GANState,
        ema: EMA | None,
        batches: ShardedBatches,
        stats: StepStats | None = None,
    ) -> Resumed:
        """Every rank, no communication: models, optimizers (this run's learning rates win), the
        fp16 loss scaler, data position, the log interval in progress and this rank's random
        streams. ``c`` passed ``verify`` on rank 0, so every tensor fits."""
        acc, cfg = self.accelerator, self.cfg
        model = c.tensors(schema.MODEL_FILE)
        acc.unwrap_model(state.G, keep_torch_compile=False).load_state_dict(
            fmt.split_prefixed(model, "G")
        )
        acc.unwrap_model(state.D, keep_torch_compile=False).load_state_dict(
            fmt.split_prefixed(model, "D")
        )
        if ema is not None:
            ema.module.load_state_dict(
                fmt.split_prefixed(model, "G_ema") or fmt.split_prefixed(model, "G")
            )
        optim = c.tensors(schema.OPTIM_FILE)
        for name, opt, lr in (
            ("opt_G", state.opt_G, cfg.train.g_lr),
            ("opt_D", state.opt_D, cfg.train.d_lr),
        ):
            fmt.optimizer_from_tensors(opt.optimizer, name, optim, c.manifest["optimizers"][name])
            for group in opt.param_groups:
                group["lr"] = lr  # the config of this run wins for hyperparameters
        restore_scaler(state.scaler, c.manifest.get("scaler"))
        batches.load_state(c.manifest["data"])
        carried = self._restore_stats(c, stats) if stats is not None else 0
        self._restore_rank_streams(c)
        log.info(f"resumed from {c.path} at step {c.step}")
        return Resumed(c.step, c.manifest.get("tracker_run_id"), partial_interval=carried > 0)

    def _restore_stats(self, c: fmt.Checkpoint, stats: StepStats) -> int:
        """This rank's sums of the log interval in progress (the mean over ranks on another
        world size: only their mean is ever logged); returns the interval's step count."""
        saved = c.manifest.get("stats")
        if not saved or saved["steps"] == 0:
            return 0
        if list(saved["names"]) != list(stats.names):
            log.warning("the checkpoint's statistics differ from this version's; interval restarts")
            return 0
        rows = saved["sums"]
        if len(rows) == self.accelerator.num_processes:
            sums = rows[self.accelerator.process_index]
        else:
            sums = [sum(col) / len(rows) for col in zip(*rows)]
        stats.load_state({"names": saved["names"], "steps": saved["steps"], "sums": sums})
        return saved["steps"]

    def _restore_rank_streams(self, c: fmt.Checkpoint) -> None:
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        saved_world = int(c.manifest["world_size"])
        blob = None
        if saved_world == world:
            blob = bytes(c.tensors(schema.RNG_FILE)[f"rank{rank}"].numpy().tobytes())
        if blob is not None and fmt.rng_blob_covers_this_process(blob):
            fmt.restore_rng_state(blob)
            return
        # Identical streams on every rank would undo per-replica dropout and noise: derive fresh,
        # distinct ones instead.
        seed_rank_streams(self.cfg.seed, rank, c.step)
        reason = (
            f"resuming a {saved_world}-process checkpoint on {world} processes"
            if saved_world != world
            else f"the checkpoint holds no random state for this rank's device ({self.accelerator.device})"
        )
        if self.accelerator.is_main_process:
            log.warning(
                f"{reason}: the per-rank random streams (latents, dropout, noise) are re-derived "
                "from (seed, step, rank), so the run continues correctly but not bit-identically"
            )

    # --- save -----------------------------------------------------------------------------

    def save_all_ranks(
        self,
        step: int,
        state: GANState,
        ema: EMA | None,
        batches: ShardedBatches,
        tracker_run_id: str | None,
        stats: StepStats | None = None,
    ) -> None:
        """Collective: refuse non-finite or diverged replicas, gather every rank's random state
        (and its log interval in progress), then rank 0 writes; a failure there, a full disk
        included, is raised on every rank."""
        named = named_state(self.accelerator, state, ema)
        # Replicas first (a collective every rank enters): once they are proven identical, the
        # finiteness check below gives the same answer on every rank.
        check_replicas_consistent(named)
        bad = [
            k
            for k, v in named.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise NonFiniteError(
                f"refusing to write a checkpoint at step {step}: tensor '{bad[0]}' is not finite"
            )
        blobs = gather_bytes_all_ranks(fmt.capture_rng_state())
        intervals = (
            [json.loads(b) for b in gather_bytes_all_ranks(json.dumps(stats.state()).encode())]
            if stats is not None
            else None
        )

        def write_main() -> None:
            opt_g, meta_g = fmt.optimizer_to_tensors(state.opt_G.optimizer, "opt_G")
            opt_d, meta_d = fmt.optimizer_to_tensors(state.opt_D.optimizer, "opt_D")
            rng = {
                f"rank{r}": torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()
                for r, b in enumerate(blobs)
            }
            manifest = {
                "config": to_dict(self.cfg),
                "data": batches.state(),
                "world_size": self.accelerator.num_processes,
                "tracker_run_id": tracker_run_id,
                "optimizers": {"opt_G": meta_g, "opt_D": meta_d},
                "ema": ema is not None,
                "scaler": scaler_state(state.scaler),
                "stats": _interval_record(intervals),
            }
            files = {
                schema.MODEL_FILE: named,
                schema.OPTIM_FILE: {**opt_g, **opt_d},
                schema.RNG_FILE: rng,
            }
            try:
                path = fmt.save_checkpoint(
                    self.directory, step, files, manifest, self.cfg.checkpoint.keep_last
                )
            except OSError as exc:  # a full disk, a quota, a read-only or vanished directory
                target = self.directory / fmt.step_dir_name(step)
                raise disk_error(exc, f"checkpoint {target}") from None
            log.info(f"checkpoint {path}")

        run_on_main_all_ranks(write_main)


def _interval_record(intervals: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Every rank's log interval in progress, for the manifest (None when empty or unusable)."""
    if not intervals or intervals[0]["steps"] == 0:
        return None
    sums = [row["sums"] for row in intervals]
    if not all(math.isfinite(v) for row in sums for v in row):
        return None  # an overflowed sum: the resumed interval restarts rather than poison JSON
    return {"names": intervals[0]["names"], "steps": intervals[0]["steps"], "sums": sums}
