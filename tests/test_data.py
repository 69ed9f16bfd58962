"""Datasets as one tensor in [-1, 1]; disjoint, reshuffled per-rank shards; clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import DataError, ShardedBatches, load_dataset


def test_mnist5k_loads_offline_as_4000_train_and_1000_heldout_images_in_unit_range():
    train, heldout = (
        load_dataset(DataConfig(name="mnist5k"), "train"),
        load_dataset(DataConfig(name="mnist5k"), "heldout"),
    )
    assert train.images.shape == (4000, 784) and heldout.images.shape == (1000, 784)
    assert train.images.dtype == torch.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert train.fingerprint() != heldout.fingerprint()


def _write_idx(path, array: np.ndarray) -> None:
    """The MNIST idx format (big-endian dims after a type/rank magic), gzipped as torchvision ships it."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_datasets_load_from_root_without_network(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
        # torchvision reads the uncompressed files; the .gz copies stand in for a download.
        for kind in ("images-idx3", "labels-idx1"):
            src = raw / f"{prefix}-{kind}-ubyte.gz"
            (raw / src.name[:-3]).write_bytes(gzip.decompress(src.read_bytes()))
    cfg = DataConfig(name=name, root=str(tmp_path))
    train, heldout = load_dataset(cfg, "train"), load_dataset(cfg, "heldout")
    assert train.images.shape == (30, 784) and heldout.images.shape == (10, 784)
    assert -1.0 <= train.images.min() and train.images.max() <= 1.0
    assert train.labels.tolist() == [i % 10 for i in range(30)]


def test_missing_torchvision_dataset_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=rf"not found under {tmp_path}.*data.download=true"):
        load_dataset(DataConfig(name="mnist", root=str(tmp_path)), "train")


def test_rank_shards_are_disjoint_and_their_union_is_the_one_process_batch():
    n, batch, world = 100, 8, 2
    one = ShardedBatches(n, batch * world, 0, 1, seed=3)
    ranks = [ShardedBatches(n, batch, r, world, seed=3) for r in range(world)]
    for _ in range(one.batches_per_epoch * 2 + 1):  # across an epoch boundary
        parts = [r.next_indices() for r in ranks]
        assert not set(parts[0].tolist()) & set(parts[1].tolist())
        assert sorted(torch.cat(parts).tolist()) == sorted(one.next_indices().tolist())


def test_each_epoch_is_reshuffled_and_covers_each_image_at_most_once():
    batches = ShardedBatches(64, 8, 0, 1, seed=0)
    epochs = [torch.cat([batches.next_indices() for _ in range(8)]) for _ in range(2)]
    assert sorted(epochs[0].tolist()) == list(range(64))
    assert not torch.equal(epochs[0], epochs[1])


def test_batch_order_resumes_exactly_from_state_and_maps_across_world_sizes():
    a = ShardedBatches(100, 8, 0, 1, seed=5)
    for _ in range(17):
        a.next_indices()
    b = ShardedBatches(100, 8, 0, 1, seed=5)
    b.load_state(a.state())
    assert all(torch.equal(a.next_indices(), b.next_indices()) for _ in range(20))
    two = ShardedBatches(100, 4, 0, 2, seed=5)  # the same global batch on 2 ranks
    two.load_state(a.state())
    assert (two.epoch, two.position) == (a.epoch, a.position)


def test_dataset_too_small_for_the_batch_is_refused_with_the_fix():
    with pytest.raises(DataError, match="lower train.batch_size"):
        ShardedBatches(10, 8, 0, 2, seed=0)
