"""Evaluation during distributed training: one classifier on every rank, the samples of a fixed
latent set sharded across ranks, the features gathered and scored on rank 0. The scores of given
generator weights do not depend on the number of processes."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from pipeline.config import RunConfig
from pipeline.distributed import broadcast_module_all_ranks, run_on_main_all_ranks
from pipeline.evaluation.classifier import ClassifierRecipe, FeatureClassifier, predict_in_batches
from pipeline.evaluation.evaluator import Evaluator
from pipeline.io import draw_latents, seeded_generator
from pipeline.samples import generate


class DistributedEvaluation:
    def __init__(self, cfg: RunConfig, accelerator) -> None:
        """Collective: rank 0 loads (or trains and caches) the evaluator; its classifier's
        weights are broadcast, so every rank embeds its share with the same classifier."""
        self.cfg, self.accelerator, self.device = cfg, accelerator, accelerator.device
        self.evaluator: Evaluator | None = None  # rank 0's: the reference statistics, the scoring

        def build_main() -> int:
            # Its own seeds: keep this rank's training streams intact.
            with torch.random.fork_rng(devices=[]):
                py_state, np_state = random.getstate(), np.random.get_state()
                self.evaluator = Evaluator.for_dataset(cfg.data, device=self.device)
                random.setstate(py_state)
                np.random.set_state(np_state)
            return self.evaluator.num_classes

        num_classes = run_on_main_all_ranks(build_main, share_result=True)
        if self.evaluator is not None:
            self.classifier = self.evaluator.classifier
        else:
            with torch.random.fork_rng(devices=[]):
                self.classifier = FeatureClassifier(ClassifierRecipe(), num_classes)
            self.classifier = self.classifier.to(self.device).eval()
        broadcast_module_all_ranks(self.classifier)

    @torch.no_grad()
    def score_all_ranks(self, G: nn.Module) -> dict[str, float]:
        """Collective: the latents are drawn once from the seed and sharded; each rank embeds its
        share; the features are gathered, and rank 0 validates and scores them. Every rank
        returns rank 0's scores (``eval/…``)."""
        n, dim = self.cfg.eval.n_samples, self.cfg.model.latent_dim
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_rank = math.ceil(n / world)
        z = draw_latents(n, dim, "cpu", seeded_generator(self.cfg.seed, "eval-latents"))
        z = torch.cat([z, z.new_zeros(per_rank * world - n, dim)])  # padding, dropped below
        z = z[rank * per_rank : (rank + 1) * per_rank].to(self.device)
        feats, probs = predict_in_batches(self.classifier, generate(G, z), self.device)
        feats = self.accelerator.gather(feats.contiguous())[:n]
        probs = self.accelerator.gather(probs.contiguous())[:n]

        def score_main() -> dict[str, float]:
            scores = self.evaluator.score_features(feats, probs)
            return {f"eval/{k}": float(v) for k, v in scores.items()}

        return run_on_main_all_ranks(score_main, share_result=True)
