"""The trainer: builds a run from a RunConfig, runs the loop, closes it.

Every rank computes; rank 0 alone writes files and logs. A method every rank must enter (it
communicates) ends in ``_all_ranks``; main-only work is passed to
``distributed.run_on_main_all_ranks`` at the call site, so its failure reaches every rank
instead of leaving them waiting in a collective.
"""

from __future__ import annotations

import gc
import resource
import signal
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from pipeline.build import build_gan, make_accelerator
from pipeline.checkpoint.manager import CheckpointManager
from pipeline.config import RunConfig, to_yaml
from pipeline.data import ShardedBatches, load_dataset
from pipeline.distributed import (
    PER_REPLICA_BN,
    agree_all_ranks,
    average_buffers_all_ranks,
    broadcast_json_all_ranks,
    local_main_first_all_ranks,
    run_on_main_all_ranks,
    seed_rank_streams,
)
from pipeline.io import atomic_write_text
from pipeline.loop import StopRequest, TrainLoop
from pipeline.samples import fixed_latents, render, save_grid
from pipeline.stats import Stat, reduce_all_ranks
from pipeline.step import instance_noise_std

logger = get_logger(__name__)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        # First, so a preemption signal during start-up is not lost: the first step stops.
        self.stop = StopRequest()
        self.stop.install()
        try:
            self._build(cfg)
        except BaseException:
            self.stop.restore()
            raise

    def _build(self, cfg: RunConfig) -> None:
        from pipeline.tracking import Tracking, new_run_id, tracker_setup

        self.cfg, self.out = cfg, Path(cfg.output_dir)
        log_with, tracker_kwargs = tracker_setup(cfg, None)
        self.accelerator = acc = make_accelerator(cfg, log_with)
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        self.checkpoints = CheckpointManager(cfg, acc)
        self.resume_from = self.checkpoints.resolve_all_ranks()

        self.state, self.ema, self.bn_sync = build_gan(cfg, acc)
        train_set = local_main_first_all_ranks(lambda: load_dataset(cfg.data, "train"))
        batches = ShardedBatches(
            len(train_set), cfg.train.batch_size, self.rank, self.world, cfg.seed, self.device
        )
        self.loop = TrainLoop(
            cfg, acc, self.state, self.ema, train_set.images.to(self.device), batches, self.stop
        )
        self.step, run_id, partial_interval = 0, None, False
        if self.resume_from is not None:
            # Every rank reads the files itself: agree, so one rank's unreadable copy (a stale
            # network filesystem) fails the job on every rank instead of leaving peers waiting.
            resumed = agree_all_ranks(
                lambda: self.checkpoints.load(
                    self.resume_from, self.state, self.ema, batches, self.loop.stats
                )
            )
            self.step, run_id = resumed.step, resumed.tracker_run_id
            partial_interval = resumed.partial_interval
        else:
            seed_rank_streams(cfg.seed, self.rank)
        self.sample_z = fixed_latents(cfg.seed, cfg.sample.n, cfg.model.latent_dim, self.device)
        self.run_id: str = broadcast_json_all_ranks(run_id or new_run_id())

        def start_run_directory_main() -> Tracking:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", to_yaml(cfg))
            tracking = Tracking(acc, cfg, self.run_id, tracker_kwargs)
            # Rows past the starting step come from a run that died before checkpointing them
            # (step 0: a killed run with no checkpoint at all); they are redone, so drop them.
            # A row at the resume step that covered part of an interval is redone whole.
            tracking.truncate_after(self.step, partial_interval)
            return tracking

        self.tracking: Tracking | None = run_on_main_all_ranks(start_run_directory_main)
        self.evaluation = None
        if cfg.eval.enabled:
            from pipeline.evaluation.distributed import DistributedEvaluation

            self.evaluation = DistributedEvaluation(cfg, acc)
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        logger.info(
            f"{self.world} process(es) on {self.device}, BatchNorm sync: {self.bn_sync}, "
            f"gradient all-reduce: {cfg.train.grad_compression if self.world > 1 else 'none'}, "
            f"global batch {cfg.train.batch_size * self.world}, threads/process {torch.get_num_threads()}",
            main_process_only=True,
        )

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        total, start_step = cfg.train.steps, self.step
        t_start = t_interval = time.perf_counter()
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        try:
            s.G.train()
            s.D.train()
            while self.step < total:
                after = self.step + 1
                log = _due(after, cfg.log.every, total)
                sample = _due(after, cfg.sample.every, total)
                save = _due(after, cfg.checkpoint.every, total)
                # Gated on the config, which every rank holds (the evaluator is rank 0's alone).
                score = cfg.eval.enabled and _due(after, cfg.eval.every, total)
                # The ranks agree (stop signals, non-finite values) before anything is written.
                stop = self.loop.step_all_ranks(self.step, agree=log or sample or save or score)
                self.step = after
                bar.update(1)
                if log or stop:
                    self.last_metrics = self.log_train_all_ranks(time.perf_counter() - t_interval)
                    t_interval = time.perf_counter()
                    m = self.last_metrics
                    bar.set_postfix(
                        D=f"{m['train/d_loss']:.3f}",
                        G=f"{m['train/g_loss']:.3f}",
                        img_s=f"{m['perf/images_per_s']:.0f}",
                    )
                sample, save, score = sample or stop, save or stop, score and not stop
                if (sample or save or score) and self.bn_sync == PER_REPLICA_BN:
                    self._average_running_statistics_all_ranks()
                if self.ema is not None and (sample or save or score):
                    # Every rank: the same latents give the same statistics, no communication.
                    self.ema.recalibrate_bn(cfg.seed, self.step)
                if sample:
                    run_on_main_all_ranks(self._save_samples_main)
                if save:
                    self.checkpoints.save_all_ranks(
                        self.step, s, self.ema, self.loop.batches, self.run_id, self.loop.stats
                    )
                if score:  # after the checkpoint: a failing evaluation never costs this save
                    self.evaluate_all_ranks()
                if stop:
                    signum = self.loop.stop.signal  # the signal may have reached another rank only
                    name = signal.Signals(signum).name if signum else "a signal"
                    logger.info(
                        f"stopped by {name} at step {self.step}; checkpoint written, "
                        "run the same command again to resume",
                        main_process_only=True,
                    )
                    break
        finally:
            bar.close()
        wall = time.perf_counter() - t_start
        return self._finish_all_ranks(start_step, wall, preempted=self.loop.stopped)

    # --- logging, samples, evaluation ---------------------------------------------------------

    def log_train_all_ranks(self, elapsed: float) -> dict[str, float]:
        """Collective: this interval's statistics reduced across ranks (one all-gather), each by
        its declared reduction; rank 0 logs them. Resets the interval."""
        cfg, stats = self.cfg, self.loop.stats
        steps = max(stats.steps, 1)  # the interval's steps, carried across a resume
        timed = max(stats.timed_steps, 1)  # this process's steps since its last log
        values = {
            **stats.as_stats(),
            "perf/images_per_s": Stat(timed * cfg.train.batch_size / elapsed, "sum"),
            "perf/step_time_s": Stat(elapsed / timed, "mean"),
            "perf/peak_rss_mb": Stat(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "max"
            ),
        }
        if self.device.type == "cuda":
            values["perf/peak_cuda_mb"] = Stat(torch.cuda.max_memory_allocated() / 2**20, "max")
        reduced = reduce_all_ranks(values, self.device)
        # A row off the log.every grid (the last step, a stop) is the interval so far: the
        # interval goes on and is checkpointed, so a resumed run logs an uninterrupted run's rows.
        stats.reset(keep_interval=self.step % cfg.log.every != 0)
        # Skip decisions are global, so every rank skipped the same steps; a skipped step's
        # statistics were zeroed and are left out of the phase's mean.
        counted = {
            "d": max(steps - round(reduced["d_skipped"]), 1),
            "g": max(steps - round(reduced["g_skipped"]), 1),
        }
        metrics = {
            f"train/{name}": reduced[name] / counted[name[0]]
            for name in stats.names
            if not name.endswith("skipped")
        }
        metrics["train/skipped_updates"] = reduced["d_skipped"] + reduced["g_skipped"]
        metrics["train/noise_std"] = instance_noise_std(cfg.train, self.step - 1)
        metrics["train/lr_g"] = self.state.opt_G.param_groups[0]["lr"]
        metrics["train/lr_d"] = self.state.opt_D.param_groups[0]["lr"]
        metrics.update({k: v for k, v in reduced.items() if k.startswith("perf/")})
        if self.tracking is not None:
            self.tracking.log(metrics, self.step)
        return metrics

    def _average_running_statistics_all_ranks(self) -> None:
        """Collective: with per-replica BatchNorm each rank's running statistics are its own;
        what is sampled, scored and saved gets their mean (training, in train mode, uses batch
        statistics and is unaffected)."""
        average_buffers_all_ranks(self.state.G)
        if self.ema is not None and self.ema.bn_batches == 0:  # it copies G's live statistics
            average_buffers_all_ranks(self.ema.module)

    def _generator_for_eval(self) -> torch.nn.Module:
        if self.ema is not None:
            return self.ema.module
        return self.accelerator.unwrap_model(self.state.G, keep_torch_compile=False)

    def _save_samples_main(self) -> None:
        images = render(self._generator_for_eval(), self.sample_z)
        array = save_grid(images, self.out / "samples" / f"step-{self.step:08d}.png")
        self.tracking.log_image("samples", array, self.step)

    def evaluate_all_ranks(self) -> None:
        """Collective: score the generator on samples sharded across ranks; rank 0 logs."""
        self.last_eval = self.evaluation.score_all_ranks(self._generator_for_eval())
        if self.tracking is not None:
            self.tracking.log(self.last_eval, self.step)

    # --- the end ------------------------------------------------------------------------------

    def _finish_all_ranks(self, start_step: int, wall: float, preempted: bool) -> dict[str, Any]:
        """Collective only in that rank 0 writes the reports and shares the outcome."""
        from pipeline.report import write_curves, write_summary

        summary = {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "wall_time_s": wall,
            "images_seen": self.step * self.cfg.train.batch_size * self.world,
            "world_size": self.world,
            "preempted": preempted,
            "resumed_from": str(self.resume_from.path) if self.resume_from else None,
            "final_metrics": {**self.last_metrics, **self.last_eval},
        }

        def write_reports_main() -> None:
            write_summary(self.out / "summary.json", summary)
            write_curves(self.out / "metrics.jsonl", self.out / "curves.png")

        if not preempted:
            run_on_main_all_ranks(write_reports_main)
        return summary

    def close(self) -> None:
        """Finish the trackers, end the process group, and free the DDP modules now: a gloo
        group they keep alive into interpreter shutdown can abort the process (SIGABRT)."""
        self.stop.restore()
        if self.tracking is not None:
            self.tracking.finish()
        self.accelerator.end_training()  # closes what trackers remain, then the process group
        self.accelerator.free_memory()
        self.state = self.loop = None
        gc.collect()
