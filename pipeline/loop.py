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
from pipeline.distributed import all_reduce_min
from pipeline.ema import EMA
from pipeline.io import draw_latents
from pipeline.stats import StepStats
from pipeline.step import STAT_NAMES, GANState, raise_recorded, train_step

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

    def step_all_ranks(self, step: int, agree: bool = False) -> bool:
        """Collective (DDP and BN all-reduces): train step ``step`` on this rank's shard, with no
        host sync. After every ``train.check_every``-th step, and whenever ``agree`` is set (the
        trainer sets it before logging, sampling, saving or scoring), the ranks also agree on
        stopping (``agree_all_ranks``). Returns True when they agreed to stop."""
        real = self.images[self.batches.next_indices()]
        z = draw_latents(real.shape[0], self.cfg.model.latent_dim, self.device)
        self.stats.add(train_step(self.state, self.accelerator, self.cfg.train, real, z, step))
        if self.ema is not None:
            self.ema.update(self.state.G)
        if agree or (step + 1) % self.cfg.train.check_every == 0:
            self.stopped = self.agree_all_ranks()
        return self.stopped

    def agree_all_ranks(self) -> bool:
        """Collective, the loop's one host sync: one all-reduce of three numbers. Raises
        NonFiniteError on every rank when a step since the start saw what ``on_nonfinite=stop``
        (or ``max_overflow_skips``) forbids, on any rank; else returns True when a stop signal
        reached any rank (it may have reached one only)."""
        record = self.state.record
        no_signal = torch.full(
            (1,), float(self.stop.signal is None), dtype=torch.float64, device=self.device
        )
        values = torch.cat([no_signal, record.agreed_values()])
        no_signal_anywhere, *recorded = all_reduce_min(values).tolist()
        scaler = self.state.scaler
        raise_recorded(recorded, self.cfg.train, scaler.get_scale() if scaler else None)
        return not no_signal_anywhere
