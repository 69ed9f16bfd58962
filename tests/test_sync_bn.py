"""Specifications of ``pipeline.distributed``: cross-replica BatchNorm on 2 ranks equals
``nn.BatchNorm1d`` on the global batch in one process; ``sync_batchnorm`` picks and converts;
``check_replicas_consistent`` catches a divergent replica; ``rank_seed`` never collides.

Spawning 2 gloo processes costs seconds, so the ``two_ranks`` fixture plays every distributed
scenario in one spawned run and the tests assert on what each rank returned. The one-process
reference is float64 ``nn.BatchNorm1d`` on the same (float32-representable) values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from pipeline.distributed import (
    CrossReplicaBatchNorm1d,
    check_replicas_consistent,
    rank_seed,
    sync_batchnorm,
)
from tests.dist_utils import forbid_collectives, run_on_ranks

WORLD_SIZE = 2
FEATURES = 8


@dataclasses.dataclass(frozen=True)
class BNCase:
    """One BatchNorm scenario: the global batch is split between the ranks by ``rows``."""

    rows: tuple[int, int]  # rows on rank 0, rows on rank 1
    steps: int = 3
    momentum: float | None = 0.1
    mean: float | None = None  # None: a different mean per feature, in [-3, 3]
    std: float = 1.0
    affine: bool = True
    track_running_stats: bool = True
    dtype: torch.dtype = torch.float32  # what the cross-replica layer computes in

    def rank_rows(self, rank: int) -> slice:
        start = sum(self.rows[:rank])
        return slice(start, start + self.rows[rank])


CASES = {
    "16+16": BNCase(rows=(16, 16)),
    "5+27": BNCase(rows=(5, 27)),
    "0+32": BNCase(rows=(0, 32)),
    "momentum_none": BNCase(rows=(5, 27), steps=4, momentum=None),
    "no_affine_no_running_stats": BNCase(rows=(5, 27), affine=False, track_running_stats=False),
    "mean_1000_std_1": BNCase(rows=(16, 16), steps=60, mean=1e3, std=1.0),
    "float64": BNCase(rows=(5, 27), dtype=torch.float64),
}
SPLITS = ["16+16", "5+27", "0+32"]


def case_data(case: BNCase) -> dict[str, Any]:
    """Inputs, loss weights and affine parameters of a case, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    n = sum(case.rows)

    def randn(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        # Values the float32 layer can hold exactly, so both sides see the same inputs.
        return t if case.dtype == torch.float64 else t.float().double()

    if case.mean is None:
        mean = torch.rand(FEATURES, generator=g, dtype=torch.float64) * 6 - 3
    else:
        mean = torch.full((FEATURES,), case.mean, dtype=torch.float64)
    std = case.std * (0.5 + torch.rand(FEATURES, generator=g, dtype=torch.float64))
    return {
        "xs": [randn(n, FEATURES) * std + mean for _ in range(case.steps)],
        # (out * loss_weight).sum() gives every output its own non-trivial gradient.
        "loss_weights": [randn(n, FEATURES) for _ in range(case.steps)],
        "eval_x": randn(n, FEATURES) * std + mean,
        "weight": 1 + 0.5 * randn(FEATURES),
        "bias": randn(FEATURES),
    }


def play_bn_case(layer: nn.BatchNorm1d, case: BNCase, rows: slice, dtype: torch.dtype) -> dict:
    """Train-mode forward/backward for every step on ``rows``, then one eval-mode forward."""
    data = case_data(case)
    layer = layer.to(dtype)
    if case.affine:
        with torch.no_grad():
            layer.weight.copy_(data["weight"])
            layer.bias.copy_(data["bias"])
    steps = []
    for x_full, loss_weight in zip(data["xs"], data["loss_weights"]):
        x = x_full[rows].to(dtype).requires_grad_()
        out = layer(x)
        (out * loss_weight[rows].to(dtype)).sum().backward()
        step = {"out": out, "x_grad": x.grad}
        if case.affine:
            step |= {"weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad}
        steps.append(step)
        layer.zero_grad(set_to_none=True)
    state = {name: t.clone() for name, t in layer.state_dict().items()}
    layer.eval()
    try:
        with forbid_collectives():
            eval_out: Any = layer(data["eval_x"][rows].to(dtype))
    except AssertionError as error:
        eval_out = error
    return {"steps": steps, "state": state, "eval_out": eval_out}


def build_bn_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small MLP with nested BatchNorm1d layers whose parameters and buffers are not defaults."""
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.BatchNorm1d(8, eps=1e-3, momentum=0.3),
        nn.ReLU(),
        nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6, momentum=None)),
        nn.Linear(6, 2),
    )
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).abs() + 0.1)
            else:
                t.fill_(5)  # num_batches_tracked
    return model.to(dtype)


def _raised(fn: Any, *args: Any) -> Exception | None:
    try:
        fn(*args)
    except Exception as error:
        return error
    return None


def _play_all_scenarios(rank: int, world_size: int) -> dict:
    """Everything the distributed tests need, played once on each rank."""
    results: dict[str, Any] = {"rank_seeds": {seed: rank_seed(seed, rank) for seed in range(4)}}

    results["bn"] = {}
    for name, case in CASES.items():
        layer = CrossReplicaBatchNorm1d(
            FEATURES,
            momentum=case.momentum,
            affine=case.affine,
            track_running_stats=case.track_running_stats,
        )
        results["bn"][name] = play_bn_case(layer, case, case.rank_rows(rank), case.dtype)

    model, choice = sync_batchnorm(build_bn_model(), torch.device("cpu"), world_size)
    state_after_conversion = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3))
    outs = [model(x[16 * rank : 16 * (rank + 1)]) for _ in range(2)]
    results["sync_batchnorm"] = {
        "choice": choice,
        "modules": {name: m for name, m in model.named_modules() if name},
        "state_after_conversion": state_after_conversion,
        "outs": outs,
        "state_after_steps": model.state_dict(),
    }

    named = {
        "layer.weight": torch.linspace(-1, 1, 12).reshape(3, 4),
        "layer.bias": torch.zeros(3),
        "bn.running_var": torch.ones(3),
        "bn.num_batches_tracked": torch.tensor(5),
    }
    diverged = dict(named)
    if rank == 1:  # the smallest possible change to one element
        weight = named["layer.weight"].clone()
        weight[1, 2] = torch.nextafter(weight[1, 2], torch.tensor(2.0))
        diverged["layer.weight"] = weight
    results["consistency"] = {
        "identical": _raised(check_replicas_consistent, named),
        "one_element_differs": _raised(check_replicas_consistent, diverged),
    }
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_on_ranks(_play_all_scenarios, WORLD_SIZE, timeout=180)


@pytest.fixture(scope="module")
def one_rank() -> dict[str, dict]:
    """float64 nn.BatchNorm1d on the whole batch, for every case."""
    return {
        name: play_bn_case(
            nn.BatchNorm1d(
                FEATURES,
                momentum=case.momentum,
                affine=case.affine,
                track_running_stats=case.track_running_stats,
            ),
            case,
            slice(None),
            torch.float64,
        )
        for name, case in CASES.items()
    }


def assert_close_to(
    got: torch.Tensor, expected: torch.Tensor, what: str = "", **tolerances: float
) -> None:
    """``got`` equals the float64 reference at the precision of ``got``'s dtype."""
    torch.testing.assert_close(
        got, expected.to(got.dtype), msg=lambda mismatch: f"{what}: {mismatch}", **tolerances
    )


def assert_rows_match(name: str, two_ranks: list[dict], one_rank: dict, steps=None, **tol) -> None:
    case = CASES[name]
    want = one_rank[name]["steps"]
    for rank, result in enumerate(two_ranks):
        rows = case.rank_rows(rank)
        for step in steps or range(case.steps):
            got = result["bn"][name]["steps"][step]
            for key in ("out", "x_grad"):
                assert_close_to(
                    got[key],
                    want[step][key][rows],
                    **tol,
                    what=f"{key} rank {rank} step {step + 1}",
                )


# --- CrossReplicaBatchNorm1d ------------------------------------------------------------------


@pytest.mark.parametrize("name", SPLITS)
def test_cross_replica_bn_two_ranks_equal_one_rank_global_batch(name, two_ranks, one_rank):
    """Outputs and input gradients of every step equal the global-batch BatchNorm's rows."""
    assert_rows_match(name, two_ranks, one_rank)


@pytest.mark.parametrize("name", SPLITS)
def test_cross_replica_bn_parameter_gradients_summed_over_ranks_equal_one_rank(
    name, two_ranks, one_rank
):
    # What DDP's gradient all-reduce (sum) then sees is the global-batch gradient.
    for step in range(CASES[name].steps):
        for key in ("weight_grad", "bias_grad"):
            summed = sum(result["bn"][name]["steps"][step][key] for result in two_ranks)
            assert_close_to(
                summed, one_rank[name]["steps"][step][key], what=f"{key} step {step + 1}"
            )


@pytest.mark.parametrize("name", SPLITS)
def test_cross_replica_bn_running_statistics_equal_one_rank_global_batch(name, two_ranks, one_rank):
    """running_mean, unbiased running_var and num_batches_tracked after 3 steps, on every rank."""
    want = one_rank[name]["state"]
    for rank, result in enumerate(two_ranks):
        got = result["bn"][name]["state"]
        assert set(got) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
        for key in ("running_mean", "running_var"):
            assert_close_to(got[key], want[key], what=f"{key} rank {rank}")
        assert int(got["num_batches_tracked"]) == int(want["num_batches_tracked"]) == 3


def test_cross_replica_bn_with_momentum_none_keeps_cumulative_average(two_ranks, one_rank):
    name = "momentum_none"
    assert_rows_match(name, two_ranks, one_rank)
    want = one_rank[name]["state"]
    for result in two_ranks:
        got = result["bn"][name]["state"]
        for key in ("running_mean", "running_var"):
            assert_close_to(got[key], want[key], what=key)
        assert int(got["num_batches_tracked"]) == 4


def test_cross_replica_bn_without_affine_or_running_stats_equals_one_rank(two_ranks, one_rank):
    name = "no_affine_no_running_stats"
    assert_rows_match(name, two_ranks, one_rank)
    assert all(result["bn"][name]["state"] == {} for result in two_ranks)


@pytest.mark.parametrize("name", ["16+16", "5+27"])
def test_cross_replica_bn_eval_uses_running_statistics_without_communication(
    name, two_ranks, one_rank
):
    """Eval-mode forward ran with every collective made to raise, and equals the reference."""
    rows = [CASES[name].rank_rows(rank) for rank in range(WORLD_SIZE)]
    for result, rank_rows in zip(two_ranks, rows):
        got = result["bn"][name]["eval_out"]
        if isinstance(got, Exception):
            raise got
        assert_close_to(got, one_rank[name]["eval_out"][rank_rows])


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(1, id="first_step"),
        pytest.param(3, id="third_step"),
        pytest.param(60, id="running_mean_converged"),
    ],
)
def test_cross_replica_bn_large_mean_matches_one_rank_to_float32_precision(
    step, two_ranks, one_rank
):
    """|mean| = 1000 * std: float32 nn.BatchNorm1d is within ~1e-4 of float64 here; allow 1e-3."""
    assert_rows_match("mean_1000_std_1", two_ranks, one_rank, steps=[step - 1], atol=1e-3, rtol=0)


def test_cross_replica_bn_float64_input_matches_one_rank_to_float64_precision(two_ranks, one_rank):
    assert_rows_match("float64", two_ranks, one_rank)


# --- sync_batchnorm ---------------------------------------------------------------------------


def test_sync_batchnorm_on_one_process_leaves_model_unchanged():
    model = build_bn_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    converted, choice = sync_batchnorm(model, torch.device("cpu"), world_size=1)
    assert choice == "none"
    assert converted is model
    assert [type(m) for m in model.modules()].count(nn.BatchNorm1d) == 2
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_sync_batchnorm_on_cpu_group_converts_every_batchnorm1d_preserving_state(two_ranks):
    original = dict(build_bn_model().named_modules())
    for result in two_ranks:
        got = result["sync_batchnorm"]
        assert got["choice"] == "CrossReplicaBatchNorm1d"
        assert set(got["modules"]) == set(original) - {""}
        for name, module in got["modules"].items():
            before = original[name]
            if isinstance(before, nn.BatchNorm1d):
                assert type(module) is CrossReplicaBatchNorm1d, name
                for attr in (
                    "num_features",
                    "eps",
                    "momentum",
                    "affine",
                    "track_running_stats",
                    "training",
                ):
                    assert getattr(module, attr) == getattr(before, attr), f"{name}.{attr}"
            else:
                assert type(module) is type(before), name
        for name, t in build_bn_model().state_dict().items():
            assert torch.equal(got["state_after_conversion"][name], t), name


def test_sync_batchnorm_converted_model_on_two_ranks_equals_original_on_global_batch(two_ranks):
    model = build_bn_model().double()
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(3)).double()
    want = [model(x) for _ in range(2)]
    for rank, result in enumerate(two_ranks):
        for step, out in enumerate(result["sync_batchnorm"]["outs"]):
            assert_close_to(
                out, want[step][16 * rank : 16 * (rank + 1)], what=f"rank {rank} step {step + 1}"
            )
    for name, t in model.state_dict().items():
        for result in two_ranks:
            assert_close_to(result["sync_batchnorm"]["state_after_steps"][name], t, what=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_batchnorm_on_cuda_returns_torch_syncbatchnorm():
    model = build_bn_model().cuda()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    converted, choice = sync_batchnorm(model, torch.device("cuda"), world_size=2)
    assert choice == "torch.nn.SyncBatchNorm"
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == 2
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())
    for name, t in converted.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_sync_batchnorm_preserves_parameter_and_buffer_dtype():
    model = build_bn_model(torch.float64)
    converted, _ = sync_batchnorm(model, torch.device("cpu"), world_size=2)
    assert {t.dtype for t in converted.state_dict().values() if t.is_floating_point()} == {
        torch.float64
    }


def test_sync_batchnorm_converts_batchnorm_without_parameters_or_buffers():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8, affine=False, track_running_stats=False)
    )
    converted, choice = sync_batchnorm(model, torch.device("cpu"), world_size=2)
    assert choice == "CrossReplicaBatchNorm1d"
    assert type(converted[1]) is CrossReplicaBatchNorm1d


# --- check_replicas_consistent ----------------------------------------------------------------


def test_check_replicas_consistent_passes_when_ranks_hold_identical_tensors(two_ranks):
    assert [result["consistency"]["identical"] for result in two_ranks] == [None, None]


def test_check_replicas_consistent_names_the_tensor_that_differs_in_one_element(two_ranks):
    """Every rank raises (they all see the gathered checksums), naming the tensor."""
    for result in two_ranks:
        error = result["consistency"]["one_element_differs"]
        with pytest.raises(
            RuntimeError, match=r"replica divergence: tensor 'layer\.weight' differs"
        ):
            if error is not None:
                raise error


def test_check_replicas_consistent_is_a_no_op_on_one_process():
    check_replicas_consistent({"layer.weight": torch.ones(3)})


# --- rank_seed --------------------------------------------------------------------------------


def test_rank_seed_is_distinct_for_every_seed_and_rank_whatever_the_world_size():
    # seed * world_size + rank would give (seed 1, rank 0, 2 ranks) the seed of (0, 2, 4 ranks).
    seeds = [rank_seed(seed, rank) for seed in range(51) for rank in range(8)]
    assert len(set(seeds)) == len(seeds)


def test_rank_seed_is_a_non_negative_63_bit_integer_torch_accepts():
    for seed, rank in [(0, 0), (2**31, 7), (123456789, 3)]:
        s = rank_seed(seed, rank)
        assert isinstance(s, int) and 0 <= s < 2**63
        torch.manual_seed(s)


def test_rank_seed_is_deterministic_across_processes(two_ranks):
    for rank, result in enumerate(two_ranks):
        assert result["rank_seeds"] == {seed: rank_seed(seed, rank) for seed in range(4)}
