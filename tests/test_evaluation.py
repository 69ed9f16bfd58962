"""The evaluator: its metrics separate real, noise and collapsed samples; its classifier cache
survives damage; its CLI prints one JSON object or one ``error:`` line.

The mnist5k classifier is trained once per module into a temporary cache; cache-damage tests use
the tiny synthetic dataset so that each rebuild costs about a second.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import evaluation
from pipeline.cli.evaluate import main
from pipeline.config import DataConfig
from pipeline.data import ImageSet, load_dataset
from pipeline.evaluation import EvalInputError, Evaluator
from pipeline.evaluation import classifier as classifier_module

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST = DataConfig(name="mnist5k")
SYNTHETIC = DataConfig(name="synthetic")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluator-cache")


@pytest.fixture(scope="module")
def evaluator(cache_dir: Path) -> Evaluator:
    return Evaluator.for_dataset(MNIST, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def heldout() -> ImageSet:
    """Real digits the classifier never trained on, disjoint from the train-split reference."""
    return load_dataset(MNIST, split="heldout")


@pytest.fixture(scope="module")
def real_metrics(evaluator: Evaluator, heldout: ImageSet) -> dict[str, float]:
    return evaluator.score(heldout.images)


@pytest.fixture(scope="module")
def noise_metrics(evaluator: Evaluator) -> dict[str, float]:
    noise = torch.rand(1000, 784, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return evaluator.score(noise)


@pytest.fixture(scope="module")
def one_class_metrics(evaluator: Evaluator, heldout: ImageSet) -> dict[str, float]:
    """A generator collapsed onto one mode: every sample is a '1'."""
    return evaluator.score(heldout.images[heldout.labels == 1])


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli.evaluate", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --------------------------------------------------------------------------- metrics


def test_classifier_heldout_accuracy_is_reported_and_high(
    evaluator: Evaluator, real_metrics: dict[str, float]
) -> None:
    assert evaluator.heldout_accuracy > 0.9
    assert real_metrics["classifier_heldout_accuracy"] == evaluator.heldout_accuracy


def test_real_vs_real_is_near_perfect(
    real_metrics: dict[str, float], noise_metrics: dict[str, float]
) -> None:
    assert real_metrics["n_samples"] == 1000
    assert real_metrics["fid"] < 0.05 * noise_metrics["fid"]
    assert real_metrics["kid"] < 0.05 * noise_metrics["kid"]
    assert real_metrics["classes_covered"] == 10 and real_metrics["coverage"] == 1.0
    assert real_metrics["precision"] > 0.8 and real_metrics["recall"] > 0.8
    assert real_metrics["class_kl"] < 0.05
    assert real_metrics["confidence"] > 0.9


def test_uniform_noise_is_far_from_real(noise_metrics: dict[str, float]) -> None:
    assert noise_metrics["fid"] > 100
    assert noise_metrics["precision"] < 0.1


def test_one_class_samples_cover_one_class_with_high_kl(
    one_class_metrics: dict[str, float],
) -> None:
    assert one_class_metrics["classes_covered"] == 1
    assert one_class_metrics["coverage"] == pytest.approx(0.1)
    assert one_class_metrics["class_kl"] > 1.5
    assert one_class_metrics["recall"] < 0.2
    assert one_class_metrics["precision"] > 0.8  # real '1's are realistic, just not diverse


def test_features_gathered_from_two_ranks_score_like_one_process(
    evaluator: Evaluator, heldout: ImageSet, real_metrics: dict[str, float]
) -> None:
    per_rank = [evaluator.features(shard) for shard in heldout.images.chunk(2)]
    feats = torch.cat([f for f, _ in per_rank])
    probs = torch.cat([p for _, p in per_rank])
    assert evaluator.score_features(feats, probs) == pytest.approx(real_metrics, rel=1e-6, abs=1e-9)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    var1, var2 = torch.tensor([1.0, 4.0, 0.0]), torch.tensor([9.0, 1.0, 2.0])
    mu1, mu2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    expected = 5.0 + float(((var1.sqrt() - var2.sqrt()) ** 2).sum())
    got = evaluation.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(expected, rel=1e-9)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_two() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    same, same_std = evaluation.kernel_distance(a, b, num_subsets=20, subset_size=300)
    shifted, _ = evaluation.kernel_distance(a, b + 0.5, num_subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * abs(same)


def test_precision_recall_of_a_set_with_itself_is_one() -> None:
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert evaluation.precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        (torch.zeros(50, 10), r"shape \(50, 10\); expected \(N, 784\) or \(N, 1, 28, 28\)"),
        (torch.zeros(50, 28, 28), r"shape \(50, 28, 28\); expected"),
        (torch.full((50, 784), 2.0), r"span \[2, 2\]; expected \[-1, 1\]"),
        (torch.full((50, 784), float("nan")), r"50 of 50 images contain NaN or Inf"),
        (torch.zeros(5, 784), r"got 5 images; at least 20"),
        (np.array([["a"] * 784] * 30), r"numeric array"),
    ],
)
def test_bad_images_raise_one_line_eval_input_error(
    evaluator: Evaluator, images: object, pattern: str
) -> None:
    with pytest.raises(EvalInputError, match=pattern) as info:
        evaluator.score(images)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_images_within_float_tolerance_of_the_range_are_accepted() -> None:
    images = torch.full((30, 1, 28, 28), 1.0 + 5e-4)
    assert evaluation.validate_images(images).shape == (30, 784)


def test_mismatched_gathered_features_raise(evaluator: Evaluator) -> None:
    feats, probs = torch.zeros(40, evaluator.feature_dim), torch.full((39, 10), 0.1)
    with pytest.raises(EvalInputError, match=r"40 feature rows but 39 probability rows"):
        evaluator.score_features(feats, probs)
    with pytest.raises(EvalInputError, match=r"features have shape \(40, 3\); expected \(N, 128\)"):
        evaluator.score_features(torch.zeros(40, 3), probs)


# --------------------------------------------------------------------------- the cache


def _only_cache_file(directory: Path) -> Path:
    files = sorted(directory.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors", files
    return files[0]


def _no_training(*_: object, **__: object) -> None:
    raise AssertionError("the classifier was retrained instead of loaded from the cache")


def test_cache_files_are_safetensors_with_provenance_and_no_pickle(
    evaluator: Evaluator, cache_dir: Path
) -> None:
    path = _only_cache_file(cache_dir)
    raw = path.read_bytes()
    assert raw[8:9] == b"{"  # safetensors: u64 header size, then JSON; not a pickle or a zip
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = header["__metadata__"]
    assert meta["data_fingerprint"] == evaluator.data_fingerprint != ""
    assert float(meta["heldout_accuracy"]) == evaluator.heldout_accuracy
    assert json.loads(meta["recipe"])["feature_dim"] == 128
    assert set(load_file(path)) == set(evaluator.classifier.state_dict())


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Evaluator]:
    """One trained synthetic-data cache file; each cache test works on its own copy."""
    directory = tmp_path_factory.mktemp("synthetic-cache")
    evaluator = Evaluator.for_dataset(SYNTHETIC, cache_dir=directory)
    return _only_cache_file(directory), evaluator


def _copy_cache(synthetic_cache: tuple[Path, Evaluator], directory: Path) -> Path:
    source, _ = synthetic_cache
    return Path(shutil.copy(source, directory / source.name))


def test_second_build_loads_the_cached_classifier(
    synthetic_cache: tuple[Path, Evaluator], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _copy_cache(synthetic_cache, tmp_path)
    monkeypatch.setattr(classifier_module, "train_classifier", _no_training)
    loaded = Evaluator.for_dataset(SYNTHETIC, cache_dir=tmp_path)
    assert loaded.heldout_accuracy == synthetic_cache[1].heldout_accuracy
    _assert_same_weights(loaded, synthetic_cache[1])


def _assert_same_weights(a: Evaluator, b: Evaluator) -> None:
    expected = b.classifier.state_dict()
    for name, value in a.classifier.state_dict().items():
        assert torch.equal(value, expected[name]), name


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _alter_metadata(path: Path) -> None:
    tensors = load_file(path)
    with open(path, "rb") as fh:
        meta = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))["__metadata__"]
    save_file(tensors, path, metadata={**meta, "heldout_accuracy": "0.999"})


def _flip_last_weight_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", [_truncate, _alter_metadata, _flip_last_weight_byte])
def test_damaged_cache_is_rebuilt_with_a_warning(
    synthetic_cache: tuple[Path, Evaluator],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    damage,
) -> None:
    path = _copy_cache(synthetic_cache, tmp_path)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="pipeline.evaluation.classifier"):
        rebuilt = Evaluator.for_dataset(SYNTHETIC, cache_dir=tmp_path)
    assert any("rebuilding stale cache" in r.getMessage() for r in caplog.records)
    # Training is deterministic, so the rebuilt classifier is the one first cached.
    assert rebuilt.heldout_accuracy == synthetic_cache[1].heldout_accuracy
    _assert_same_weights(rebuilt, synthetic_cache[1])
    assert _only_cache_file(tmp_path) == path  # rewritten in place, no temp files left behind
    monkeypatch.setattr(classifier_module, "train_classifier", _no_training)
    Evaluator.for_dataset(SYNTHETIC, cache_dir=tmp_path)  # the rewritten file is valid again


def test_building_the_evaluator_leaves_the_global_rng_untouched(tmp_path: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    Evaluator.for_dataset(SYNTHETIC, cache_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- the CLI


def test_cli_scores_npy_samples_like_the_library(
    evaluator: Evaluator, cache_dir: Path, heldout: ImageSet, tmp_path: Path
) -> None:
    images = heldout.images[::5]  # the split is sorted by label: a stride keeps every class
    np.save(tmp_path / "fakes.npy", images.numpy())
    result = _run_cli("--samples", str(tmp_path / "fakes.npy"), "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    metrics = json.loads(result.stdout)
    assert metrics == pytest.approx(evaluator.score(images), rel=1e-6, abs=1e-9)


def test_cli_scores_a_safetensors_tensor_named_images(
    synthetic_cache: tuple[Path, Evaluator], tmp_path: Path
) -> None:
    real = load_dataset(SYNTHETIC, split="heldout")
    save_file(
        {"images": real.images.reshape(-1, 1, 28, 28).contiguous(), "labels": real.labels},
        tmp_path / "fakes.safetensors",
    )
    cache = synthetic_cache[0].parent
    result = _run_cli(
        "--samples",
        str(tmp_path / "fakes.safetensors"),
        "--data",
        "synthetic",
        "--cache-dir",
        str(cache),
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n_samples"] == len(real) and metrics["classes_covered"] == 10
    assert metrics["classifier_heldout_accuracy"] == synthetic_cache[1].heldout_accuracy


def test_cli_values_out_of_range_exit_2_with_one_error_line(tmp_path: Path) -> None:
    np.save(tmp_path / "fakes.npy", np.full((50, 784), 255.0, np.float32))
    result = _run_cli("--samples", str(tmp_path / "fakes.npy"), "--cache-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert re.search(
        r"fakes\.npy: image values span \[255, 255\]; expected \[-1, 1\]",
        _one_error_line(result.stderr),
    )


def _write_text(path: Path) -> None:
    path.write_text("0")


def _write_garbage(path: Path) -> None:
    path.write_bytes(b"not an array file")


def _write_two_tensors(path: Path) -> None:
    save_file({"a": torch.zeros(30, 784), "b": torch.zeros(30, 784)}, path)


def _write_valid_npy(path: Path) -> None:
    np.save(path, np.zeros((30, 784), np.float32))


def _write_wrong_shape_npy(path: Path) -> None:
    np.save(path, np.zeros((50, 10), np.float32))


def _write_nothing(path: Path) -> None:
    pass


@pytest.mark.parametrize(
    ("file_name", "write", "args", "pattern"),
    [
        ("f.npy", _write_wrong_shape_npy, [], r"f\.npy: images have shape \(50, 10\); expected"),
        ("f.npy", _write_nothing, [], r"samples file .*f\.npy does not exist"),
        ("f.txt", _write_text, [], r"extension '\.txt'; expected \.npy or \.safetensors"),
        ("f.npy", _write_garbage, [], r"cannot read .*f\.npy as \.npy"),
        ("f.safetensors", _write_garbage, [], r"cannot read .*f\.safetensors as \.safetensors"),
        ("f.safetensors", _write_two_tensors, [], r"tensors \['a', 'b'\]; expected one tensor"),
        ("f.npy", _write_valid_npy, ["--data", "cifar"], r"--data: invalid choice: 'cifar'"),
        ("f.npy", _write_valid_npy, ["--checkpoint", "x"], r"not allowed with argument"),
    ],
    ids=[
        "wrong-shape",
        "missing",
        "extension",
        "garbage-npy",
        "garbage-safetensors",
        "two-tensors",
        "data",
        "two-sources",
    ],
)
def test_cli_bad_samples_exit_2_with_one_error_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    file_name: str,
    write,
    args: list[str],
    pattern: str,
) -> None:
    write(tmp_path / file_name)
    assert main(["--samples", str(tmp_path / file_name), *args, "--cache-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.search(pattern, _one_error_line(err))


def test_cli_rejects_a_missing_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--checkpoint", str(tmp_path / "nope"), "--cache-dir", str(tmp_path)]) == 2
    assert re.search(r"checkpoint .*nope does not exist", _one_error_line(capsys.readouterr().err))


def test_cli_scores_a_generator_from_a_checkpoint_export(
    synthetic_cache: tuple[Path, Evaluator], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--checkpoint takes a pipeline.cli.export file (or a checkpoint directory): the generator is
    rebuilt from the stored config, sampled, and scored on the run's dataset family."""
    from pipeline.config import load_config, to_dict
    from pipeline.models import Generator

    cfg = load_config(None, ["data.name=synthetic", "model.g_hidden=[16,32]", "model.latent_dim=8"])
    torch.manual_seed(0)
    G = Generator(cfg.model)
    save_file(
        {k: v.contiguous() for k, v in G.state_dict().items()},
        tmp_path / "g.safetensors",
        metadata={"config": json.dumps(to_dict(cfg))},
    )
    code = main(
        [
            "--checkpoint",
            str(tmp_path / "g.safetensors"),
            "--n",
            "200",
            "--cache-dir",
            str(synthetic_cache[0].parent),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    metrics = json.loads(out)
    assert metrics["n_samples"] == 200 and np.isfinite(metrics["fid"])
    assert metrics["classifier_heldout_accuracy"] == synthetic_cache[1].heldout_accuracy
