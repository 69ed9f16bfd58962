"""Scoring generated images in the feature space of a small classifier trained on the real data.

Inception features (the usual FID) are a poor yardstick for 28x28 digits, so the evaluator
trains a small CNN on the dataset's *train* split once, reports its accuracy on the *heldout*
split, caches its weights as safetensors, and measures everything in its 128-d penultimate
features ("classifier FID")::

    from pipeline.config import DataConfig
    from pipeline.evaluation import Evaluator

    evaluator = Evaluator.for_dataset(DataConfig(name="mnist5k"))  # trains once, then cached
    metrics = evaluator.score(fake_images)  # (N, 784) or (N, 1, 28, 28), values in [-1, 1]

Distributed: every rank calls ``evaluator.features(local_fakes)``, the trainer gathers the
``(feats, probs)`` pairs, and the main process calls ``evaluator.score_features(feats, probs)``.

- ``classifier``: the feature classifier, its training and its integrity-checked cache
  (``train_classifier`` and ``load_or_train`` are used from there, so patch them there).
- ``metrics``: FID, KID, k-NN precision/recall and class coverage; pure math.
- ``evaluator``: input validation, the real reference statistics and the ``Evaluator``.
"""

from __future__ import annotations

import logging

from pipeline.evaluation.classifier import (
    DEFAULT_CACHE_DIR,
    ClassifierRecipe,
    FeatureClassifier,
    cache_file,
    family,
    heldout_accuracy,
)
from pipeline.evaluation.evaluator import (
    MIN_SAMPLES,
    RANGE_TOLERANCE,
    EvalInputError,
    Evaluator,
    ReferenceStats,
    validate_images,
)
from pipeline.evaluation.metrics import (
    class_histogram,
    class_kl,
    classes_covered,
    equal_size_subsets,
    frechet_distance,
    kernel_distance,
    knn_radii,
    precision_recall,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "MIN_SAMPLES",
    "RANGE_TOLERANCE",
    "ClassifierRecipe",
    "EvalInputError",
    "Evaluator",
    "FeatureClassifier",
    "ReferenceStats",
    "cache_file",
    "class_histogram",
    "class_kl",
    "classes_covered",
    "equal_size_subsets",
    "family",
    "frechet_distance",
    "heldout_accuracy",
    "kernel_distance",
    "knn_radii",
    "precision_recall",
    "validate_images",
]
