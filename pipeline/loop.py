"""The body of the training loop: what every rank does once per iteration.

``TrainLoop.step_all_ranks`` is the one definition of an iteration: the trainer calls it, and
``make bench`` times exactly it, so the benchmark never measures a copy.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import torch

from pipeline.config import RunConfig
from pipeline.data import ShardedBatches
from pipeline.distributed import all_reduce_max
from pipeline.ema import EMA
from pipeline.io import draw_latents
from pipeline.stats import StepStats
from pipeline.step import STAT_NAMES, GANState, train_step

log = logging.getLogger(__name__)


class StopRequest:
    """Preemption as Slurm and torchrun deliver it: SIGTERM, any number of times (Slurm signals
    every process of the job, torchrun's agent forwards one more), asks for a checkpoint at the
    end of the current step and a clean exit; so does a first SIGINT. A second SIGINT (Ctrl-C
    twice) stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM/SIGINT will not stop training cleanly")
            return
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: die now, as Ctrl-C does
            return
        if self.signal is None:
            self.signal = signum


class TrainLoop:
    """One iteration, per replica and global at a glance:

    - per replica: this rank's shard of the batch, its latents z (its own random stream), D's
      dropout masks and instance noise, the L2 penalty on D;
    - global: G's BatchNorm statistics (synchronized BN) and both networks' gradients (DDP),
      the EMA (identical weights on every rank), and the stop agreement.
    """

    def __init__(
        self,
        cfg: RunConfig,
        accelerator,
        state: GANState,
        ema: EMA | None,
        images: torch.Tensor,
        batches: ShardedBatches,
        stop: StopRequest | None = None,
    ) -> None:
        self.cfg, self.accelerator, self.state, self.ema = cfg, accelerator, state, ema
        self.images, self.batches = images, batches
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.stats = StepStats(STAT_NAMES, self.device)
        self.stop = stop or StopRequest()
        """Set by a signal on this rank; the ranks agree on it in ``step_all_ranks``."""
        self.stopped = False
        """True on every rank once they agreed to stop (whichever rank got the signal)."""

    def step_all_ranks(self, step: int) -> bool:
        """Collective (DDP and BN all-reduces, the stop agreement): train step ``step`` on this
        rank's shard; returns True when any rank asked to stop."""
        real = self.images[self.batches.next_indices()]
        z = draw_latents(real.shape[0], self.cfg.model.latent_dim, self.device)
        self.stats.add(train_step(self.state, self.accelerator, self.cfg.train, real, z, step))
        if self.ema is not None:
            self.ema.update(self.state.G)
        self.stopped = self.stop_agreed_all_ranks()
        return self.stopped

    def stop_agreed_all_ranks(self) -> bool:
        """Collective: True when a stop signal reached any rank (it may have reached one only)."""
        if self.world == 1:
            return self.stop.signal is not None
        flag = torch.tensor([float(self.stop.signal is not None)], device=self.device)
        return bool(all_reduce_max(flag).item())
