"""Evaluation during distributed training: the latents are drawn once and sharded, every rank
embeds with rank 0's classifier, and rank 0 validates and scores the gathered features. So the
scores of given generator weights do not depend on the number of processes."""

from __future__ import annotations

import math

import pytest

from tests.dist_utils import run_on_ranks

OVERRIDES = [
    "data.name=synthetic",
    "model.g_hidden=[32,64]",
    "model.d_hidden=[64,32]",
    "model.latent_dim=16",
    "log.trackers=[none]",
    "eval.enabled=true",
    "eval.n_samples=41",  # odd: 2 ranks hold 21 + 20 real rows (one padding row is dropped)
    "train.cpu_threads=1",
]


def _scores_of_initial_weights(rank: int, world: int, out_dir: str) -> dict:
    from pipeline.config import load_config
    from pipeline.trainer import Trainer

    trainer = Trainer(load_config(None, [f"output_dir={out_dir}/w{world}", *OVERRIDES]))
    try:
        trainer.evaluate_all_ranks()  # G as built from the seed: the same weights at any world size
        return trainer.last_eval
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    env = {"ACCELERATE_USE_CPU": "1", "HOME": str(root / "home")}  # a private evaluator cache
    one = run_on_ranks(_scores_of_initial_weights, 1, str(root), init_process_group=False, env=env)
    two = run_on_ranks(
        _scores_of_initial_weights, 2, str(root), init_process_group=False, env=env, timeout=300
    )
    return one, two


def test_the_same_generator_scores_the_same_on_one_and_two_processes(scores):
    one, two = scores
    assert one[0]["eval/n_samples"] == 41.0
    assert two[0] == two[1]  # every rank reports rank 0's scores
    for key, value in one[0].items():
        assert math.isclose(two[0][key], value, rel_tol=1e-6, abs_tol=1e-6), (
            key,
            value,
            two[0][key],
        )


def _fit_with_evaluation(rank: int, world: int, out_dir: str) -> list[int]:
    from pipeline.config import load_config
    from pipeline.report import read_metrics
    from pipeline.trainer import Trainer

    overrides = [*OVERRIDES, "train.steps=4", "eval.every=2", "train.collective_timeout_s=30"]
    trainer = Trainer(load_config(None, [f"output_dir={out_dir}/fit", *overrides]))
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = read_metrics(f"{out_dir}/fit/metrics.jsonl")
    return [row["step"] for row in rows if "eval/fid" in row]


def test_two_processes_evaluate_inside_fit_without_waiting_on_each_other(tmp_path):
    """Every rank enters the evaluation's gather (a rank-0-only gate would deadlock the run)."""
    env = {"ACCELERATE_USE_CPU": "1", "HOME": str(tmp_path / "home")}
    ranks = run_on_ranks(
        _fit_with_evaluation, 2, str(tmp_path), init_process_group=False, env=env, timeout=240
    )
    assert ranks[0] == [2, 4]
