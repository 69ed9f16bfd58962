"""The trainer: builds everything from a RunConfig, runs the loop, writes the run directory.

Every rank computes; the main process prints, logs and writes files. Metrics are reduced across
ranks (one all-reduce per log interval) before they are logged.
"""

from __future__ import annotations

import math
import os
import random
import resource
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list
from tqdm.auto import tqdm

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, RunConfig, to_dict, to_yaml
from pipeline.data import ShardedBatches, load_dataset
from pipeline.distributed import (
    all_reduce_max,
    all_reduce_sum,
    check_replicas_consistent,
    cpu_threads_per_process,
    rank_seed,
    seed_rank_streams,
    sync_batchnorm,
)
from pipeline.ema import EMA
from pipeline.models import build_models
from pipeline.samples import fixed_latents, generate, render, save_grid
from pipeline.step import (
    STAT_NAMES,
    GANState,
    NonFiniteError,
    instance_noise_std,
    penalty_params,
    train_step,
)

logger = get_logger(__name__)

RUN_ARTIFACTS = (
    "checkpoints",
    "samples",
    "metrics.jsonl",
    "summary.json",
    "curves.png",
    "config.yaml",
    "tensorboard",
)


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _use_cpu() -> bool:
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in (
        "1",
        "true",
        "yes",
    )


def make_accelerator(cfg: RunConfig, log_with: list[str] | None = None) -> Accelerator:
    """The one Accelerator of a run: gloo on CPU (also for several processes), NCCL on GPUs."""
    cpu = _use_cpu()
    threads = cpu_threads_per_process(cfg.train.cpu_threads)
    if cpu:
        # Processes x threads = cores, whatever OMP_NUM_THREADS said; set before the Accelerator
        # too, which otherwise picks its own count (and warns) for several CPU processes.
        os.environ["OMP_NUM_THREADS"] = str(threads)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=log_with or None,
        project_dir=cfg.output_dir,
        # G's synchronized BN keeps buffers equal, so DDP need not broadcast them every step.
        kwargs_handlers=[
            DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)
        ],
    )
    if cpu:
        torch.set_num_threads(threads)
    return accelerator


def _adam(
    params, lr: float, betas: tuple[float, ...], device: torch.device
) -> torch.optim.Optimizer:
    """Fused Adam (one kernel for all parameters; measured 4-9% faster per step on a 2-core CPU
    than foreach), falling back to foreach where this build or device has no fused kernel."""
    params = list(params)
    try:
        return torch.optim.Adam(
            params,
            lr=lr,
            betas=betas,
            fused=device.type in ("cpu", "cuda"),
            foreach=None if device.type in ("cpu", "cuda") else True,
        )
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def build_gan(cfg: RunConfig, accelerator: Accelerator) -> tuple[GANState, EMA | None, str]:
    """G, D, their optimizers (prepared: DDP across ranks) and the EMA generator.

    Returns the state, the EMA (or None) and the name of the BatchNorm synchronization used.
    """
    # Identical initial weights on every rank: one global seed before the models are built.
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model)
    ema = EMA(G, cfg.model.ema_decay) if cfg.model.ema_decay > 0 else None
    if ema is not None:
        ema.module.to(accelerator.device)
    G, bn_sync = sync_batchnorm(G, accelerator.device, accelerator.num_processes)
    betas = tuple(cfg.train.betas)
    opt_G = _adam(G.parameters(), cfg.train.g_lr, betas, accelerator.device)
    opt_D = _adam(D.parameters(), cfg.train.d_lr, betas, accelerator.device)
    with warnings.catch_warnings():
        # torch >= 2.12 renamed broadcast_buffers; Accelerate still passes it, and False keeps
        # exactly the behaviour wanted here (no buffer broadcast, at init or in forward).
        warnings.filterwarnings(
            "ignore", message=".*broadcast_buffers.*deprecated", category=FutureWarning
        )
        G, D, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
    if cfg.train.compile:
        G, D = torch.compile(G), torch.compile(D)
    return (
        GANState(G, D, opt_G, opt_D, penalty_params(D, cfg.train.penalty_include_biases)),
        ema,
        bn_sync,
    )


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        from pipeline.tracking import Tracking, tracker_setup

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        log_with, _ = tracker_setup(cfg, None)
        self.accelerator = make_accelerator(cfg, log_with)
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.resume_from = self._choose_checkpoint()

        self.state, self.ema, self.bn_sync = build_gan(cfg, acc)
        train_set = load_dataset(cfg.data, "train")
        self.images = train_set.images.to(self.device)
        self.batches = ShardedBatches(
            len(train_set), cfg.train.batch_size, self.rank, self.world, cfg.seed, self.device
        )
        self.step = 0
        run_id = None
        if self.resume_from is not None:
            run_id = self._restore(self.resume_from)
        else:
            seed_rank_streams(cfg.seed, self.rank)

        self.sample_z = fixed_latents(cfg.seed, cfg.sample.n, cfg.model.latent_dim, self.device)
        self.tracking = Tracking(acc, cfg, run_id)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))
            # Rows past the starting step come from a run that died before checkpointing them
            # (step 0: a killed run with no checkpoint at all); they are redone, so drop them.
            self.tracking.truncate_after(self.step)
        self.evaluator = self._build_evaluator() if cfg.eval.enabled else None
        self._stop_signal: int | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        logger.info(
            f"{self.world} process(es) on {self.device}, BatchNorm sync: {self.bn_sync}, "
            f"global batch {cfg.train.batch_size * self.world}, threads/process {torch.get_num_threads()}",
            main_process_only=True,
        )

    # --- set-up -------------------------------------------------------------------------------

    def _choose_checkpoint(self) -> ckpt.Checkpoint | None:
        """Decide on the main process where to resume from; every rank gets the same answer."""
        acc = self.accelerator
        choice: list[Any] = [None, None]
        if acc.is_main_process:
            try:
                choice[0] = self._find_checkpoint_main()
            except (ConfigError, ckpt.CheckpointError) as exc:
                choice[1] = f"{type(exc).__name__}:{exc}"
        if self.world > 1:
            choice = broadcast_object_list(choice)
        if choice[1]:
            kind, _, msg = choice[1].partition(":")
            raise (ConfigError if kind == "ConfigError" else ckpt.CheckpointError)(msg)
        if choice[0] is None:
            return None
        path = Path(choice[0])
        # The main process verified every file's checksum; the others only need the manifest.
        return (
            ckpt.verify(path)
            if acc.is_main_process
            else ckpt.Checkpoint(path, ckpt.read_manifest(path))
        )

    def _find_checkpoint_main(self) -> str | None:
        cfg = self.cfg
        resume = cfg.resume
        if resume == "none":
            existing = [p for p in RUN_ARTIFACTS if (self.out / p).exists()]
            if existing and not cfg.overwrite:
                raise ConfigError(
                    f"config error: output_dir {self.out} already holds a run ({', '.join(existing)}); "
                    "set resume=auto to continue it, overwrite=true to replace it, or another output_dir"
                )
            for name in existing:
                target = self.out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            return None
        if resume == "auto":
            found = ckpt.find_resumable(self.out / "checkpoints")
            if (
                found is None
                and (self.out / "checkpoints").is_dir()
                and ckpt.complete_checkpoints(self.out / "checkpoints")
            ):
                raise ckpt.CheckpointError(
                    f"every checkpoint under {self.out / 'checkpoints'} is corrupt; "
                    "set resume=none overwrite=true to start over"
                )
        else:
            found = ckpt.resolve_checkpoint(resume)
        if found is not None:
            ckpt.check_compatible(found.manifest, to_dict(self.cfg)["model"], found.path)
            return str(found.path)
        return None

    def _restore(self, c: ckpt.Checkpoint) -> str | None:
        """Load everything a checkpoint holds; returns the tracker run id to continue."""
        acc, s = self.accelerator, self.state
        model = c.tensors("model.safetensors")
        acc.unwrap_model(s.G).load_state_dict(ckpt.split_prefixed(model, "G"))
        acc.unwrap_model(s.D).load_state_dict(ckpt.split_prefixed(model, "D"))
        if self.ema is not None:
            self.ema.module.load_state_dict(
                ckpt.split_prefixed(model, "G_ema") or ckpt.split_prefixed(model, "G")
            )
        optim = c.tensors("optim.safetensors")
        ckpt.optimizer_from_tensors(
            s.opt_G.optimizer, "opt_G", optim, c.manifest["optimizers"]["opt_G"]
        )
        ckpt.optimizer_from_tensors(
            s.opt_D.optimizer, "opt_D", optim, c.manifest["optimizers"]["opt_D"]
        )
        for opt, lr in ((s.opt_G, self.cfg.train.g_lr), (s.opt_D, self.cfg.train.d_lr)):
            for group in opt.param_groups:
                group["lr"] = lr  # the config of this run wins for hyperparameters
        self.step = c.step
        self.batches.load_state(c.manifest["data"])
        saved_world = int(c.manifest["world_size"])
        if saved_world == self.world:
            ckpt.restore_rng_state(c.tensors("rng.safetensors")[f"rank{self.rank}"])
        else:
            seed_rank_streams(rank_seed(self.cfg.seed, self.step), self.rank)
            logger.warning(
                f"resuming a {saved_world}-process checkpoint on {self.world} processes: the per-rank "
                "random streams (latents, dropout, noise) are re-derived from (seed, step, rank), "
                "so the run continues correctly but not bit-identically",
                main_process_only=True,
            )
        logger.info(f"resumed from {c.path} at step {self.step}", main_process_only=True)
        return c.manifest.get("tracker_run_id")

    def _build_evaluator(self):
        from pipeline.evaluation import Evaluator

        # The evaluator trains or loads its classifier with its own seed: keep the ranks' streams intact.
        with torch.random.fork_rng(devices=[]), self.accelerator.main_process_first():
            py_state, np_state = random.getstate(), np.random.get_state()
            evaluator = Evaluator.for_dataset(self.cfg.data, device=self.device)
            random.setstate(py_state)
            np.random.set_state(np_state)
        return evaluator

    # --- the loop -----------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal stops at once

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0], device=self.device)
        return (
            bool(all_reduce_max(flag).item()) if self.world > 1 else self._stop_signal is not None
        )

    def fit(self) -> dict[str, Any]:
        cfg, acc, s = self.cfg, self.accelerator, self.state
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        total = cfg.train.steps
        stats_sum = torch.zeros(len(STAT_NAMES), device=self.device)
        steps_in_interval, t_interval = 0, time.perf_counter()
        t_start = time.perf_counter()
        start_step = self.step
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not acc.is_main_process,
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        try:
            s.G.train()
            s.D.train()
            while self.step < total:
                real = self.images[self.batches.next_indices()]
                z = torch.randn(real.shape[0], cfg.model.latent_dim, device=self.device)
                stats = train_step(s, acc, cfg.train, real, z, self.step)
                self.step += 1
                if self.ema is not None:
                    self.ema.update(s.G)
                stats_sum += torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0)
                steps_in_interval += 1
                stop = self._stop_agreed()
                last = self.step == total or stop
                if _due(self.step, cfg.log.every, total) or stop:
                    elapsed = time.perf_counter() - t_interval
                    self.last_metrics = self._log_train(stats_sum, steps_in_interval, elapsed)
                    bar.set_postfix(
                        {
                            "D": f"{self.last_metrics['train/d_loss']:.3f}",
                            "G": f"{self.last_metrics['train/g_loss']:.3f}",
                            "img/s": f"{self.last_metrics['perf/images_per_s']:.0f}",
                        }
                    )
                    stats_sum.zero_()
                    steps_in_interval, t_interval = 0, time.perf_counter()
                bar.update(1)
                if _due(self.step, cfg.sample.every, total) or stop:
                    self._save_samples()
                if self.evaluator is not None and (
                    _due(self.step, cfg.eval.every, total) and not stop
                ):
                    self._evaluate()
                if _due(self.step, cfg.checkpoint.every, total) or last:
                    self._save_checkpoint()
                if stop:
                    # The signal may have reached another rank only.
                    name = (
                        signal.Signals(self._stop_signal).name if self._stop_signal else "a signal"
                    )
                    logger.info(
                        f"stopped by {name} at step {self.step}; checkpoint written, "
                        "run the same command again to resume",
                        main_process_only=True,
                    )
                    break
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        wall = time.perf_counter() - t_start
        return self._finish(start_step, wall, preempted=self._stop_signal is not None)

    # --- logging, samples, evaluation ---------------------------------------------------------

    def _log_train(self, stats_sum: torch.Tensor, steps: int, elapsed: float) -> dict[str, float]:
        cfg = self.cfg
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else 0.0
        perf = torch.tensor(
            [steps * cfg.train.batch_size / elapsed, elapsed / steps, rss_mb, cuda_mb],
            device=self.device,
            dtype=torch.float32,
        )
        packed = torch.cat([stats_sum.float(), perf])
        packed = (all_reduce_sum(packed) / self.world).tolist()  # the one reduction of the interval
        sums = dict(zip(STAT_NAMES, packed))
        images_per_s, step_time, rss, cuda = packed[len(STAT_NAMES) :]
        # Skip decisions are global, so every rank skipped the same steps; a skipped step's
        # statistics were zeroed and are left out of the phase's mean.
        counted = {
            "d": max(steps - round(sums["d_skipped"]), 1),
            "g": max(steps - round(sums["g_skipped"]), 1),
        }
        metrics = {
            f"train/{k}": v / counted[k[0]] for k, v in sums.items() if not k.endswith("skipped")
        }
        metrics["train/skipped_updates"] = sums["d_skipped"] + sums["g_skipped"]
        metrics["train/noise_std"] = instance_noise_std(cfg.train, self.step - 1)
        metrics["train/lr_g"] = self.state.opt_G.param_groups[0]["lr"]
        metrics["train/lr_d"] = self.state.opt_D.param_groups[0]["lr"]
        metrics["perf/images_per_s"] = images_per_s * self.world  # global throughput
        metrics["perf/step_time_s"] = step_time
        metrics["perf/peak_rss_mb"] = rss
        if self.device.type == "cuda":
            metrics["perf/peak_cuda_mb"] = cuda
        self.tracking.log(metrics, self.step)
        return metrics

    def _generator_for_eval(self) -> torch.nn.Module:
        return (
            self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.state.G)
        )

    def _save_samples(self) -> None:
        if not self.accelerator.is_main_process:
            return
        images = render(self._generator_for_eval(), self.sample_z)
        array = save_grid(images, self.out / "samples" / f"step-{self.step:08d}.png")
        self.tracking.log_image("samples", array, self.step)

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Each rank generates its share of the samples; features are gathered; main scores them."""
        cfg = self.cfg
        n_local = math.ceil(cfg.eval.n_samples / self.world)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 104_729 * (self.rank + 1))
        z = torch.randn(n_local, cfg.model.latent_dim, generator=g).to(self.device)
        images = generate(self._generator_for_eval(), z)
        feats, probs = self.evaluator.features(images)
        feats = self.accelerator.gather(feats.contiguous())[: cfg.eval.n_samples]
        probs = self.accelerator.gather(probs.contiguous())[: cfg.eval.n_samples]
        if self.accelerator.is_main_process:
            scores = self.evaluator.score_features(feats, probs)
            self.last_eval = {f"eval/{k}": float(v) for k, v in scores.items()}
            self.tracking.log(self.last_eval, self.step)

    # --- checkpoints --------------------------------------------------------------------------

    def _named_state(self) -> dict[str, torch.Tensor]:
        acc, s = self.accelerator, self.state
        named = {f"G.{k}": v for k, v in acc.unwrap_model(s.G).state_dict().items()}
        named.update({f"D.{k}": v for k, v in acc.unwrap_model(s.D).state_dict().items()})
        if self.ema is not None:
            named.update({f"G_ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        return named

    def _gather_rng(self) -> dict[str, torch.Tensor]:
        blob = ckpt.capture_rng_state()
        if self.world == 1:
            return {"rank0": blob}
        length = torch.tensor([blob.numel()], device=self.device, dtype=torch.int64)
        lengths = [torch.zeros_like(length) for _ in range(self.world)]
        dist.all_gather(lengths, length)
        longest = int(max(x.item() for x in lengths))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[: blob.numel()] = blob.to(self.device)
        gathered = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded)
        return {
            f"rank{r}": t[: int(n.item())].cpu() for r, (t, n) in enumerate(zip(gathered, lengths))
        }

    def _save_checkpoint(self) -> None:
        acc, s = self.accelerator, self.state
        named = self._named_state()
        bad = [
            k
            for k, v in named.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:
            raise NonFiniteError(
                f"refusing to write a checkpoint at step {self.step}: tensor '{bad[0]}' is not finite"
            )
        check_replicas_consistent(named)
        rng = self._gather_rng()
        if acc.is_main_process:
            opt_g, meta_g = ckpt.optimizer_to_tensors(s.opt_G.optimizer, "opt_G")
            opt_d, meta_d = ckpt.optimizer_to_tensors(s.opt_D.optimizer, "opt_D")
            manifest = {
                "config": to_dict(self.cfg),
                "data": self.batches.state(),
                "world_size": self.world,
                "tracker_run_id": self.tracking.run_id,
                "optimizers": {"opt_G": meta_g, "opt_D": meta_d},
                "ema": self.ema is not None,
            }
            files = {
                "model.safetensors": named,
                "optim.safetensors": {**opt_g, **opt_d},
                "rng.safetensors": rng,
            }
            path = ckpt.save_checkpoint(
                self.out / "checkpoints", self.step, files, manifest, self.cfg.checkpoint.keep_last
            )
            logger.info(f"checkpoint {path}", main_process_only=True)
        acc.wait_for_everyone()

    # --- the end ------------------------------------------------------------------------------

    def _finish(self, start_step: int, wall: float, preempted: bool) -> dict[str, Any]:
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
        if self.accelerator.is_main_process and not preempted:
            write_summary(self.out / "summary.json", summary)
            write_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        return summary

    def close(self) -> None:
        self.tracking.finish()
        self.accelerator.end_training()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
