"""The Evaluator: checks the input, embeds it with the feature classifier and scores it against
the real train split's reference statistics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data import load_dataset
from pipeline.evaluation.classifier import (
    ClassifierRecipe,
    FeatureClassifier,
    load_or_train,
    predict_in_batches,
)
from pipeline.evaluation.metrics import (
    class_histogram,
    class_kl,
    classes_covered,
    equal_size_subsets,
    frechet_distance,
    kernel_distance,
    mean_and_covariance,
    precision_recall,
    psd_sqrt,
)

log = logging.getLogger(__name__)

MIN_SAMPLES = 20
"""Fewest images scored at once: below this the covariance and k-NN estimates are noise."""
RANGE_TOLERANCE = 1e-3
"""Slack on the [-1, 1] pixel range, for float round-off in generators and file formats."""


class EvalInputError(ValueError):
    """Images or features that cannot be scored; the message says what is wrong and what is expected."""


# --------------------------------------------------------------------------- input validation


def validate_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Return ``images`` as a (N, 784) float32 tensor, or raise EvalInputError naming the problem.

    Checked before any compute so a bad sample file fails in one line, not deep inside a conv.
    """
    if isinstance(images, np.ndarray):
        if images.dtype == object or not np.issubdtype(images.dtype, np.number):
            raise EvalInputError(f"images must be a numeric array, got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise EvalInputError(
            f"images must be a torch.Tensor or numpy array, got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if not (len(shape) == 2 and shape[1] == 784) and not (
        len(shape) == 4 and shape[1:] == (1, 28, 28)
    ):
        raise EvalInputError(f"images have shape {shape}; expected (N, 784) or (N, 1, 28, 28)")
    if shape[0] < MIN_SAMPLES:
        raise EvalInputError(f"got {shape[0]} images; at least {MIN_SAMPLES} are needed to score")
    if images.dtype == torch.bool or images.is_complex():
        raise EvalInputError(f"images must be real numbers, got dtype {images.dtype}")
    flat = images.reshape(shape[0], 784).to(torch.float32)
    if not torch.isfinite(flat).all():
        bad = int((~torch.isfinite(flat)).any(1).sum())
        raise EvalInputError(
            f"{bad} of {shape[0]} images contain NaN or Inf; expected finite values in [-1, 1]"
        )
    lo, hi = float(flat.min()), float(flat.max())
    if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise EvalInputError(
            f"image values span [{lo:.4g}, {hi:.4g}]; expected [-1, 1] "
            f"(rescale 0..255 pixels with x / 127.5 - 1)"
        )
    return flat


def _validate_features(
    feats: torch.Tensor, probs: torch.Tensor, feature_dim: int, num_classes: int
) -> None:
    """Gathered features must look like ``Evaluator.features`` output (a wrong gather shows here)."""
    if feats.dim() != 2 or feats.shape[1] != feature_dim:
        raise EvalInputError(
            f"features have shape {tuple(feats.shape)}; expected (N, {feature_dim})"
        )
    if probs.dim() != 2 or probs.shape[1] != num_classes:
        raise EvalInputError(
            f"class probabilities have shape {tuple(probs.shape)}; expected (N, {num_classes})"
        )
    if feats.shape[0] != probs.shape[0]:
        raise EvalInputError(
            f"{feats.shape[0]} feature rows but {probs.shape[0]} probability rows; "
            f"gather both from the same images"
        )
    if feats.shape[0] < MIN_SAMPLES:
        raise EvalInputError(
            f"got {feats.shape[0]} samples; at least {MIN_SAMPLES} are needed to score"
        )
    if not (torch.isfinite(feats).all() and torch.isfinite(probs).all()):
        raise EvalInputError("features or probabilities contain NaN or Inf; expected finite values")


# --------------------------------------------------------------------------- the evaluator


@dataclass
class ReferenceStats:
    """The real train split in feature space, computed once per Evaluator."""

    feats: torch.Tensor
    """(N, feature_dim) float64 features on CPU."""
    mu: torch.Tensor
    """Feature mean, float64."""
    sigma: torch.Tensor
    """Feature covariance (unbiased), float64."""
    sqrt_sigma: torch.Tensor
    """sigma^1/2, cached so each FID needs one eigendecomposition instead of two."""
    class_hist: torch.Tensor
    """Predicted-class fractions of the real images. Predictions, not labels, so the
    classifier's own confusions cancel when compared with the samples' predictions."""

    @classmethod
    def from_outputs(
        cls, feats: torch.Tensor, probs: torch.Tensor, num_classes: int
    ) -> ReferenceStats:
        feats = feats.double().cpu()
        mu, sigma = mean_and_covariance(feats)
        return cls(feats, mu, sigma, psd_sqrt(sigma), class_histogram(probs, num_classes))


class Evaluator:
    """A trained feature classifier plus the real reference statistics; scores generated images."""

    def __init__(
        self,
        classifier: FeatureClassifier,
        reference: ReferenceStats,
        num_classes: int,
        heldout_accuracy: float,
        device: torch.device | str = "cpu",
        seed: int = 0,
        data_fingerprint: str = "",
    ) -> None:
        self.classifier = classifier.to(device).eval()
        self.reference = reference
        self.num_classes = num_classes
        self.feature_dim = reference.feats.shape[1]
        self.heldout_accuracy = heldout_accuracy
        self.data_fingerprint = data_fingerprint  # of the train split: logged next to the scores
        self.device = torch.device(device)
        self.seed = seed  # of the KID and precision/recall subsets, so a score is reproducible

    @classmethod
    def for_dataset(
        cls,
        data_cfg: DataConfig,
        cache_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        recipe: ClassifierRecipe | None = None,
    ) -> Evaluator:
        """Load the classifier for ``data_cfg`` from the cache, or train and cache it, then embed
        the real train split as the reference."""
        recipe = recipe or ClassifierRecipe()
        device = torch.device(device)
        train = load_dataset(data_cfg, split="train")
        fingerprint = train.fingerprint()
        classifier, accuracy = load_or_train(
            data_cfg, train, fingerprint, recipe, device, cache_dir
        )
        feats, probs = predict_in_batches(classifier, train.images, device)
        reference = ReferenceStats.from_outputs(feats, probs, train.num_classes)
        return cls(
            classifier, reference, train.num_classes, accuracy, device, data_fingerprint=fingerprint
        )

    def features(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, class probabilities) on this evaluator's device; per rank, so a
        distributed trainer can gather them before ``score_features``."""
        return predict_in_batches(self.classifier, validate_images(images), self.device)

    def score_features(self, feats: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        """All metrics of the samples whose features and probabilities are given."""
        _validate_features(feats, probs, self.feature_dim, self.num_classes)
        feats, probs = feats.detach().double().cpu(), probs.detach().double().cpu()
        ref = self.reference
        mu, sigma = mean_and_covariance(feats)
        kid, kid_std = kernel_distance(ref.feats, feats, seed=self.seed)
        real_pr, fake_pr = equal_size_subsets(ref.feats, feats, seed=self.seed)
        precision, recall = precision_recall(real_pr, fake_pr, k=3)
        hist = class_histogram(probs, self.num_classes)
        covered = classes_covered(hist, ref.class_hist)
        return {
            "fid": frechet_distance(ref.mu, ref.sigma, mu, sigma, sqrt_sigma1=ref.sqrt_sigma),
            "kid": kid,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
            "classes_covered": covered,
            "coverage": covered / self.num_classes,
            "class_kl": class_kl(hist, ref.class_hist),
            "confidence": float(probs.max(dim=1).values.mean()),
            "classifier_heldout_accuracy": self.heldout_accuracy,
            "n_samples": int(feats.shape[0]),
        }

    def score(self, images: torch.Tensor | np.ndarray) -> dict[str, float]:
        """``score_features(*features(images))`` for a single process."""
        return self.score_features(*self.features(images))
