"""The feature classifier: a small CNN trained once per dataset, whose penultimate activations
are the space every metric is computed in, and its integrity-checked safetensors cache.

``load_or_train`` is the one entry point: it returns the cached classifier when the file is
intact and matches the data and the recipe, else trains one, measures it on the heldout split
and (re)writes the cache. A bad cache is rebuilt, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import nn

from pipeline.config import DataConfig
from pipeline.data import ImageSet, load_dataset
from pipeline.io import atomic_write_bytes, derive_seed, seeded_generator

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/gan-pipeline/evaluator")
_CACHE_FORMAT = "gan-pipeline-evaluator"
_FAMILIES = {"mnist5k": "mnist", "mnist": "mnist", "fashion_mnist": "fashion_mnist"}


def family(name: str) -> str:
    """The dataset family a classifier is trained for and named after: mnist5k is MNIST."""
    return _FAMILIES.get(name, name)


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


# --------------------------------------------------------------------------- training


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
        torch.manual_seed(derive_seed(recipe.seed, "classifier-init"))
        model = FeatureClassifier(recipe, train.num_classes).to(device)
    shuffle = seeded_generator(recipe.seed, "classifier-shuffle")
    shift = seeded_generator(recipe.seed, "classifier-shift")
    images = train.images.to(device).reshape(-1, 1, 28, 28)
    labels = train.labels.to(device)
    steps_per_epoch = -(-len(train) // recipe.batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.max_lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, recipe.max_lr, total_steps=recipe.epochs * steps_per_epoch
    )
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(train), generator=shuffle).to(device)
        for start in range(0, len(train), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            batch = _random_shift(images[idx], recipe.max_shift, shift)
            loss = F.cross_entropy(model(batch), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict_in_batches(
    model: FeatureClassifier, images: torch.Tensor, device: torch.device, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, class probabilities) of ``images`` on ``device``."""
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
    _, probs = predict_in_batches(model, heldout.images, torch.device(device))
    return float((probs.argmax(1).cpu() == heldout.labels).float().mean())


# --------------------------------------------------------------------------- the weight cache


class _StaleCache(Exception):
    """A cache file that must be rebuilt; the message says why."""


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
    """Atomically, so a crash or a concurrent rank never leaves a half-written file under the
    final name."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {**metadata, "integrity_sha256": _integrity_digest(state, metadata)}
    atomic_write_bytes(path, save_safetensors(state, metadata=metadata))


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


def load_or_train(
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
