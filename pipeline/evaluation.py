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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.config import DataConfig
from pipeline.data import ImageSet, family, load_dataset

log = logging.getLogger(__name__)

MIN_SAMPLES = 20
"""Fewest images scored at once: below this the covariance and k-NN estimates are noise."""
RANGE_TOLERANCE = 1e-3
"""Slack on the [-1, 1] pixel range, for float round-off in generators and file formats."""
DEFAULT_CACHE_DIR = Path("~/.cache/gan-pipeline/evaluator")
_CACHE_FORMAT = "gan-pipeline-evaluator"


class EvalInputError(ValueError):
    """Images or features that cannot be scored; the message says what is wrong and what is expected."""


class _StaleCache(Exception):
    """A cache file that must be rebuilt; the message says why."""


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


# --------------------------------------------------------------------------- the classifier


@dataclass(frozen=True)
class ClassifierRecipe:
    """Architecture and training of the feature classifier. Any change here changes the cache
    key, so stale weights are never reused; bump ``version`` when the code changes behaviour."""

    version: int = 1
    """Revision of the classifier code and training loop."""
    conv_channels: tuple[int, int] = (16, 32)
    """Channels of the two 3x3 conv layers: small enough to train in seconds on 2 CPU cores."""
    feature_dim: int = 128
    """Width of the penultimate layer whose activations all metrics are computed in."""
    epochs: int = 6
    """Passes over the train split."""
    batch_size: int = 64
    """Images per Adam step."""
    max_lr: float = 3e-3
    """Peak learning rate of the one-cycle schedule."""
    max_shift: int = 2
    """Random translation of each training image by up to this many pixels (augmentation)."""
    seed: int = 0
    """Seed of the initialisation, the shuffling and the augmentation."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class FeatureClassifier(nn.Module):
    """conv3x3-ReLU-pool, conv3x3-ReLU-pool, Linear-ReLU (features), Linear (logits)."""

    def __init__(self, recipe: ClassifierRecipe, num_classes: int) -> None:
        super().__init__()
        c1, c2 = recipe.conv_channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, recipe.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(recipe.feature_dim, num_classes)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 784) images -> (penultimate features, logits)."""
        feats = self.body(images.reshape(-1, 1, 28, 28))
        return feats, self.head(feats)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)[1]


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each (1, 28, 28) image by whole pixels, filling with background (-1)."""
    n = images.shape[0]
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shifts * (2.0 / 28.0)  # affine_grid works in [-1, 1] coordinates
    grid = F.affine_grid(theta, [n, 1, 28, 28], align_corners=False).to(images.device)
    # grid_sample pads with 0, so sample the image shifted to [0, 2] where background is 0.
    moved = F.grid_sample(
        images + 1.0, grid, mode="nearest", padding_mode="zeros", align_corners=False
    )
    return moved - 1.0


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """Batch-64 convs on 28x28 are too small to gain from threads (and oversubscribed OpenMP is
    many times slower); one thread also makes the CPU weights independent of the core count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(
    train: ImageSet, recipe: ClassifierRecipe, device: torch.device | str = "cpu"
) -> FeatureClassifier:
    """Train the classifier on ``train`` deterministically (fixed seed, CPU-side randomness)."""
    device = torch.device(device)
    with _one_cpu_thread():
        return _train(train, recipe, device)


def _train(train: ImageSet, recipe: ClassifierRecipe, device: torch.device) -> FeatureClassifier:
    # fork_rng: seeding here must not move the caller's global RNG (the trainer's seeds).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = FeatureClassifier(recipe, train.num_classes).to(device)
    generator = torch.Generator().manual_seed(recipe.seed)
    images = train.images.to(device).reshape(-1, 1, 28, 28)
    labels = train.labels.to(device)
    steps_per_epoch = -(-len(train) // recipe.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe.max_lr, total_steps=recipe.epochs * steps_per_epoch
    )
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(train), generator=generator).to(device)
        for start in range(0, len(train), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            batch = _random_shift(images[idx], recipe.max_shift, generator)
            loss = F.cross_entropy(model(batch), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _predict_in_batches(
    model: FeatureClassifier, images: torch.Tensor, device: torch.device, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    feats, probs = [], []
    for start in range(0, images.shape[0], batch_size):
        f, logits = model.embed(images[start : start + batch_size].to(device, torch.float32))
        feats.append(f)
        probs.append(logits.softmax(dim=1))
    return torch.cat(feats), torch.cat(probs)


def heldout_accuracy(
    model: FeatureClassifier, heldout: ImageSet, device: torch.device | str = "cpu"
) -> float:
    """Top-1 accuracy on images the classifier never trained on: how far its features can be trusted."""
    _, probs = _predict_in_batches(model, heldout.images, torch.device(device))
    return float((probs.argmax(1).cpu() == heldout.labels).float().mean())


# --------------------------------------------------------------------------- the weight cache


def cache_file(cache_dir: Path, dataset: str, fingerprint: str, recipe: ClassifierRecipe) -> Path:
    """Name keyed by the data and the recipe: new data or a new recipe never reuses old weights."""
    key = hashlib.sha256(f"{fingerprint}\n{recipe.to_json()}".encode()).hexdigest()[:20]
    return cache_dir / f"{family(dataset)}-classifier-{key}.safetensors"


def _integrity_digest(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the weights and the other metadata: safetensors checks the layout, not the
    values, so a flipped weight byte or an edited accuracy would otherwise load silently."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != "integrity_sha256"):
        h.update(f"{key}={metadata[key]}\n".encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_cache(path: Path, model: FeatureClassifier, metadata: dict[str, str]) -> None:
    """Write via a temp file and ``os.replace`` so a crash or a concurrent rank never leaves a
    half-written file under the final name."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {**metadata, "integrity_sha256": _integrity_digest(state, metadata)}
    payload = save_safetensors(state, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, expected: dict[str, str], model: FeatureClassifier) -> float:
    """Load weights into ``model`` and return the stored held-out accuracy, or raise _StaleCache."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            state = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # truncated or garbled files raise several error types
        raise _StaleCache(f"unreadable ({type(exc).__name__}: {exc})") from None
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise _StaleCache(f"metadata {key!r} is {metadata.get(key)!r}, expected {value!r}")
    if metadata.get("integrity_sha256") != _integrity_digest(state, metadata):
        raise _StaleCache("weights or metadata do not match their stored checksum")
    try:
        accuracy = float(metadata["heldout_accuracy"])
    except (KeyError, ValueError):
        raise _StaleCache("metadata 'heldout_accuracy' is missing or not a number") from None
    if not 0.0 <= accuracy <= 1.0:
        raise _StaleCache(f"metadata 'heldout_accuracy' is {accuracy}, outside [0, 1]")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise _StaleCache(f"weights do not fit the classifier ({first_line})") from None
    return accuracy


# --------------------------------------------------------------------------- metrics


def _covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root by eigendecomposition; round-off negatives clamped to 0."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance(
    mu1: torch.Tensor,
    sigma1: torch.Tensor,
    mu2: torch.Tensor,
    sigma2: torch.Tensor,
    sqrt_sigma1: torch.Tensor | None = None,
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017), in float64.

    tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), whose argument is symmetric PSD, so eigh
    applies; this avoids the complex round-off of a general matrix sqrt on singular covariances.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1.double()
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(float(value), 0.0)


def _poly_kernel_sum(a: torch.Tensor, b: torch.Tensor, skip_diagonal: bool) -> torch.Tensor:
    """Sum of k(a_i, b_j) = (a_i.b_j / d + 1)^3, accumulated in float64 because MMD^2 is a small
    difference of large kernel sums."""
    kernel = (a @ b.T).div_(a.shape[1]).add_(1).pow_(3)
    total = kernel.sum(dtype=torch.float64)
    return total - kernel.diagonal().sum(dtype=torch.float64) if skip_diagonal else total


def kernel_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    num_subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), as mean and
    std over random subsets of equal size m, which keeps it unbiased at any sample count."""
    real, fake = real.float().cpu(), fake.float().cpu()
    m = min(subset_size, real.shape[0], fake.shape[0])
    generator = torch.Generator().manual_seed(seed)
    # A subset that is the whole fake set is the same set every time: one k(y, y') sum suffices.
    fake_whole = fake.shape[0] == m
    yy_whole = _poly_kernel_sum(fake, fake, skip_diagonal=True) if fake_whole else None
    estimates = []
    for _ in range(num_subsets):
        x = real[torch.randperm(real.shape[0], generator=generator)[:m]]
        y = fake if fake_whole else fake[torch.randperm(fake.shape[0], generator=generator)[:m]]
        yy = yy_whole if yy_whole is not None else _poly_kernel_sum(y, y, skip_diagonal=True)
        xx = _poly_kernel_sum(x, x, skip_diagonal=True)
        xy = _poly_kernel_sum(x, y, skip_diagonal=False)
        estimates.append((xx + yy) / (m * (m - 1)) - 2 * xy / (m * m))
    values = torch.stack(estimates)
    return float(values.mean()), float(values.std()) if num_subsets > 1 else 0.0


def _row_chunk(num_columns: int, budget_bytes: int = 64 * 2**20) -> int:
    """Rows per distance block so that one float64 block stays under ``budget_bytes``."""
    return max(1, budget_bytes // (8 * max(num_columns, 1)))


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point, in row blocks."""
    points = points.double()
    radii = []
    chunk = _row_chunk(points.shape[0])
    for start in range(0, points.shape[0], chunk):
        dist = torch.cdist(points[start : start + chunk], points)
        # k + 1 nearest because the nearest is the point itself, at distance 0.
        radii.append(dist.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor
) -> torch.Tensor:
    """Whether each query lies in some support point's k-NN ball, in row blocks."""
    queries, support = queries.double(), support.double()
    inside = []
    chunk = _row_chunk(support.shape[0])
    for start in range(0, queries.shape[0], chunk):
        dist = torch.cdist(queries[start : start + chunk], support)
        inside.append((dist <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of fakes
    inside the real k-NN manifold, recall the fraction of reals inside the fake one."""
    real, fake = real.double().cpu(), fake.double().cpu()
    precision = _inside_manifold(fake, real, knn_radii(real, k)).double().mean()
    recall = _inside_manifold(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def class_histogram(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of samples whose predicted (argmax) class is each class."""
    counts = torch.bincount(probs.argmax(dim=1).cpu(), minlength=num_classes).double()
    return counts / counts.sum()


def class_kl(sample_hist: torch.Tensor, real_hist: torch.Tensor, eps: float = 1e-6) -> float:
    """KL(samples || real) of the class histograms; eps keeps empty classes finite. A generator
    that collapses to one of 10 balanced classes scores log(10) ~ 2.3."""
    p = (sample_hist.double() + eps) / (1 + eps * sample_hist.numel())
    q = (real_hist.double() + eps) / (1 + eps * real_hist.numel())
    return float((p * (p / q).log()).sum())


def classes_covered(sample_hist: torch.Tensor, real_hist: torch.Tensor) -> int:
    """Classes predicted for at least half their real share of the samples (mode coverage)."""
    return int((sample_hist >= 0.5 * real_hist).sum())


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
        mu, sigma = _covariance(feats)
        return cls(feats, mu, sigma, _psd_sqrt(sigma), class_histogram(probs, num_classes))


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
        classifier, accuracy = _cached_classifier(
            data_cfg, train, fingerprint, recipe, device, cache_dir
        )
        feats, probs = _predict_in_batches(classifier, train.images, device)
        reference = ReferenceStats.from_outputs(feats, probs, train.num_classes)
        return cls(
            classifier, reference, train.num_classes, accuracy, device, data_fingerprint=fingerprint
        )

    def features(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features, class probabilities) on this evaluator's device; per rank, so a
        distributed trainer can gather them before ``score_features``."""
        return _predict_in_batches(self.classifier, validate_images(images), self.device)

    def score_features(self, feats: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        """All metrics of the samples whose features and probabilities are given."""
        _validate_features(feats, probs, self.feature_dim, self.num_classes)
        feats, probs = feats.detach().double().cpu(), probs.detach().double().cpu()
        ref = self.reference
        mu, sigma = _covariance(feats)
        kid, kid_std = kernel_distance(ref.feats, feats, seed=self.seed)
        real_pr, fake_pr = self._equal_size_sets(ref.feats, feats)
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

    def _equal_size_sets(
        self, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Subsample the larger set: k-NN radii shrink with set size, and Kynkaanniemi et al. compare
        equal-sized sets, so unequal sizes would bias precision against recall."""
        m = min(real.shape[0], fake.shape[0])
        generator = torch.Generator().manual_seed(self.seed)

        def subsample(x: torch.Tensor) -> torch.Tensor:
            return x[torch.randperm(x.shape[0], generator=generator)[:m]] if x.shape[0] > m else x

        return subsample(real), subsample(fake)


def _cached_classifier(
    data_cfg: DataConfig,
    train: ImageSet,
    fingerprint: str,
    recipe: ClassifierRecipe,
    device: torch.device,
    cache_dir: str | Path | None,
) -> tuple[FeatureClassifier, float]:
    """The cached classifier if its file is intact and matches data and recipe; else train, measure
    on the heldout split and (re)write the cache. A bad cache is rebuilt, never fatal."""
    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    path = cache_file(cache_dir, data_cfg.name, fingerprint, recipe)
    expected = {
        "format": _CACHE_FORMAT,
        "dataset": train.name,
        "data_fingerprint": fingerprint,
        "recipe": recipe.to_json(),
        "num_classes": str(train.num_classes),
    }
    if path.is_file():
        model = FeatureClassifier(recipe, train.num_classes)
        try:
            accuracy = _read_cache(path, expected, model)
            log.info("evaluator: loaded classifier from %s (heldout accuracy %.4f)", path, accuracy)
            return model.to(device).eval(), accuracy
        except _StaleCache as exc:
            log.warning(
                "evaluator: rebuilding stale cache %s: %s", path, str(exc).replace("\n", " ")
            )
    log.info("evaluator: training the %s classifier on %d images", family(train.name), len(train))
    model = train_classifier(train, recipe, device)
    heldout = load_dataset(data_cfg, split="heldout")
    accuracy = heldout_accuracy(model, heldout, device)
    log.info(
        "evaluator: heldout accuracy %.4f on %d images; caching to %s", accuracy, len(heldout), path
    )
    try:
        _write_cache(
            path,
            model,
            {
                **expected,
                "heldout_accuracy": repr(accuracy),
                "heldout_fingerprint": heldout.fingerprint(),
            },
        )
    except OSError as exc:  # a read-only cache dir costs a retrain next time, not the run
        log.warning("evaluator: could not write cache %s: %s", path, exc)
    return model, accuracy
