"""The training step, specified: 2 gloo ranks with half a batch each equal 1 process on the whole
batch; per-replica randomness; D untouched (no gradient, no all-reduce) in the G phase; the L2
penalty's gradient."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.step import l2_penalty
from tests.dist_utils import run_on_ranks

STEPS = 4
GLOBAL_BATCH = 16
ACCEL_ENV = {"ACCELERATE_USE_CPU": "1"}


def _cfg(overrides):
    return load_config(
        None,
        [
            "model.g_hidden=[32,48]",
            "model.d_hidden=[40,24]",
            "model.latent_dim=8",
            "train.d_weight_penalty=0.01",
            "log.trackers=[none]",
            *overrides,
        ],
    )


def _fixed_batches(world, rank):
    """The same global real batches and latents in every process; each rank takes its rows."""
    g = torch.Generator().manual_seed(123)
    real = torch.rand(STEPS, GLOBAL_BATCH, 784, generator=g) * 2 - 1
    z = torch.randn(STEPS, GLOBAL_BATCH, 8, generator=g)
    rows = torch.arange(GLOBAL_BATCH)[rank::world]
    return real[:, rows], z[:, rows]


def _train_fixed(rank, world, overrides):
    """STEPS full steps (D phase + G phase) on fixed data/latents; returns G and D parameters and G's BN buffers."""
    from pipeline.build import build_gan, make_accelerator
    from pipeline.step import train_step

    cfg = _cfg(overrides)
    acc = make_accelerator(cfg)
    state, _, bn_sync = build_gan(cfg, acc)
    real, z = _fixed_batches(world, rank)
    G, D = acc.unwrap_model(state.G), acc.unwrap_model(state.D)
    grads = {}
    for step in range(STEPS):
        train_step(state, acc, cfg.train, real[step], z[step], step)
        if step == 0:  # D's gradients of its phase, G's of its phase (D is frozen in G's)
            for net, module in (("G", G), ("D", D)):
                grads[net] = {n: p.grad.clone() for n, p in module.named_parameters()}
    return {
        "G": {k: v.clone() for k, v in G.state_dict().items()},
        "D": {k: v.clone() for k, v in D.state_dict().items()},
        "grads": grads,
        "bn_sync": bn_sync,
    }


DETERMINISTIC = ["model.d_dropout=0", "train.instance_noise_std=0"]


def _two_rank_scenarios(rank, world):
    """Every 2-rank scenario of this file in one spawn (starting processes dominates the cost)."""
    return {
        "fixed": _train_fixed(rank, world, DETERMINISTIC),
        "streams": _random_streams(rank, world, 7),
        "streams_again": _random_streams(rank, world, 7),
        "g_phase": _g_phase_touches_nothing_of_d(rank, world),
        "syncs": _host_syncs_of_loop_steps(rank, world),
    }


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_ranks(
        _two_rank_scenarios, 2, init_process_group=False, env=ACCEL_ENV, timeout=300
    )


@pytest.fixture(scope="module")
def one_vs_two(two_ranks):
    one = run_on_ranks(_train_fixed, 1, DETERMINISTIC, init_process_group=False, env=ACCEL_ENV)[0]
    return one, [r["fixed"] for r in two_ranks]


def test_training_step_two_ranks_half_batch_equal_one_rank_whole_batch(one_vs_two):
    one, two = one_vs_two
    assert one["bn_sync"] == "none" and two[0]["bn_sync"] == "CrossReplicaBatchNorm1d"
    for net in ("G", "D"):
        for name, ref in one[net].items():
            for rank in (0, 1):
                torch.testing.assert_close(
                    two[rank][net][name],
                    ref,
                    rtol=1e-4,
                    atol=1e-5,
                    msg=lambda m, g=net, n=name, r=rank: f"{g}.{n} on rank {r}: {m}",
                )


def test_gradients_of_two_ranks_on_half_batches_equal_one_rank_on_the_whole_batch(one_vs_two):
    """Adam is invariant to a constant factor on the gradients, so parameters after Adam steps
    cannot see a wrong 1/world-size scaling; the gradients themselves can."""
    one, two = one_vs_two
    for net in ("G", "D"):
        assert one["grads"][net], f"{net} has gradients after the first step"
        for name, ref in one["grads"][net].items():
            assert ref.abs().max() > 0, f"{net}.{name}: a zero gradient cannot show a scale error"
            for rank in (0, 1):
                torch.testing.assert_close(
                    two[rank]["grads"][net][name],
                    ref,
                    rtol=1e-4,
                    atol=1e-6,
                    msg=lambda m, g=net, n=name, r=rank: f"grad {g}.{n} on rank {r}: {m}",
                )


def test_bn_running_statistics_after_training_equal_global_batch_statistics(one_vs_two):
    one, two = one_vs_two
    running = [k for k in one["G"] if "running_" in k or "num_batches" in k]
    assert running, "G has BatchNorm buffers"
    for k in running:
        torch.testing.assert_close(two[0]["G"][k], one["G"][k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(two[1]["G"][k], two[0]["G"][k], rtol=0, atol=0)


def _random_streams(rank, world, seed):
    """Latents, dropout masks and instance noise drawn by the trainer's own code path, plus the
    parameters after a few real training steps."""
    from pipeline.build import build_gan, make_accelerator
    from pipeline.data import ShardedBatches, synthetic_images
    from pipeline.distributed import seed_rank_streams
    from pipeline.step import train_step

    cfg = _cfg([f"seed={seed}", "train.instance_noise_std=0.2"])
    acc = make_accelerator(cfg)
    state, _, _ = build_gan(cfg, acc)
    seed_rank_streams(cfg.seed, rank)
    masks = []
    dropout = [m for m in acc.unwrap_model(state.D).modules() if isinstance(m, torch.nn.Dropout)]
    dropout[0].register_forward_hook(lambda m, i, o: masks.append((o == 0) & (i[0] != 0)))
    images, _ = synthetic_images(64)
    batches = ShardedBatches(64, 8, rank, world, cfg.seed)
    latents = []
    for step in range(3):
        z = torch.randn(8, 8)
        latents.append(z)
        train_step(state, acc, cfg.train, images[batches.next_indices()], z, step)
    noise = torch.randn(4, 784)  # the next draw of the same stream that feeds instance noise
    return {
        "z": torch.stack(latents),
        "mask": masks[0],
        "noise": noise,
        "params": {k: v.clone() for k, v in acc.unwrap_model(state.G).state_dict().items()},
    }


def test_ranks_draw_different_latents_masks_and_noise_and_runs_reproduce(two_ranks):
    first = [r["streams"] for r in two_ranks]
    again = [r["streams_again"] for r in two_ranks]
    for key in ("z", "mask", "noise"):
        assert not torch.equal(first[0][key], first[1][key]), f"ranks share their {key}"
    for rank in (0, 1):
        for key in ("z", "mask", "noise"):
            assert torch.equal(first[rank][key], again[rank][key]), (
                f"{key} not reproduced on rank {rank}"
            )
        for name, value in first[rank]["params"].items():
            assert torch.equal(value, again[rank]["params"][name]), (
                f"G.{name} not reproduced bit for bit"
            )


def _g_phase_touches_nothing_of_d(rank, world):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from pipeline.build import build_gan, make_accelerator
    from pipeline.step import d_phase, g_phase

    cfg = _cfg([])
    acc = make_accelerator(cfg)
    state, _, _ = build_gan(cfg, acc)
    calls = {"D": 0}

    def counting_hook(process_group, bucket):
        calls["D"] += 1
        return allreduce_hook(process_group, bucket)

    state.D.register_comm_hook(None, counting_hook)
    real, z = _fixed_batches(world, rank)
    fake, _, _ = d_phase(state, acc, cfg.train, real[0], z[0], 0)
    d_phase_calls = calls["D"]
    for p in state.D.parameters():
        p.grad = None
    g_phase(state, acc, cfg.train, fake, 0)
    return {
        "d_phase_calls": d_phase_calls,
        "g_phase_calls": calls["D"] - d_phase_calls,
        "d_grads": [p.grad for p in state.D.parameters()],
        "d_requires_grad": all(p.requires_grad for p in state.D.parameters()),
        "g_grads": all(p.grad is not None for p in state.G.parameters()),
    }


def test_g_phase_gives_d_no_gradient_and_no_all_reduce(two_ranks):
    for result in (r["g_phase"] for r in two_ranks):
        assert result["d_phase_calls"] >= 1, "the counting hook sees D's all-reduce in the D phase"
        assert result["g_phase_calls"] == 0
        assert all(g is None for g in result["d_grads"])
        assert result["d_requires_grad"], "D is unfrozen again after the G phase"
        assert result["g_grads"]


CHECK_EVERY = 4


def _host_syncs_of_loop_steps(rank, world):
    """What makes the host wait in the loop body (``TrainLoop.step_all_ranks``, what the trainer
    and the bench run), counted for a plain step and for an agreement step, with the project's
    defaults (BN, dropout, noise, L2 penalty on) at a small size."""
    from pipeline.build import build_gan, make_accelerator
    from pipeline.data import ShardedBatches
    from pipeline.distributed import seed_rank_streams
    from pipeline.loop import TrainLoop
    from tests.dist_utils import count_host_syncs

    cfg = _cfg([f"train.check_every={CHECK_EVERY}", "train.batch_size=8"])
    acc = make_accelerator(cfg)
    state, ema, _ = build_gan(cfg, acc)
    seed_rank_streams(cfg.seed, rank)
    images = torch.rand(64, 784) * 2 - 1
    batches = ShardedBatches(len(images), cfg.train.batch_size, rank, world, cfg.seed, acc.device)
    loop = TrainLoop(cfg, acc, state, ema, images, batches)
    for step in range(2):  # DDP rebuilds its buckets after the first backward
        loop.step_all_ranks(step)
    with count_host_syncs() as plain:
        loop.step_all_ranks(2)
    with count_host_syncs() as agreement:
        loop.step_all_ranks(CHECK_EVERY - 1)  # the step after which the ranks agree
    buckets = sum(len(net.reducer._get_zeros_like_grad_buckets()) for net in (state.G, state.D))
    return {"plain": plain, "agreement": agreement, "ddp_buckets": buckets}


def test_a_training_step_makes_no_host_sync_beyond_ddp_and_batchnorm_collectives(two_ranks):
    bn_layers = 2  # model.g_hidden=[32,48]: one BatchNorm per hidden layer
    for result in (r["syncs"] for r in two_ranks):
        plain = result["plain"]
        assert plain["host_reads"] == {}
        # One all-reduce forward and one backward per BN layer, and nothing else of ours.
        assert plain["collectives"] == {
            "all_reduce from distributed.py:forward": bn_layers,
            "all_reduce from distributed.py:backward": bn_layers,
        }
        # Everything the process group ran: those, plus DDP's gradient buckets of G and D.
        assert plain["backend_collectives"] == 2 * bn_layers + result["ddp_buckets"]


def test_every_check_every_steps_the_ranks_agree_with_one_all_reduce_and_one_read(two_ranks):
    for result in (r["syncs"] for r in two_ranks):
        agreement, plain = result["agreement"], result["plain"]
        extra = {k: v - plain["collectives"].get(k, 0) for k, v in agreement["collectives"].items()}
        assert {k: v for k, v in extra.items() if v} == {
            "all_reduce from distributed.py:all_reduce_min": 1
        }
        assert agreement["host_reads"] == {"tolist from loop.py:agree_all_ranks": 1}
        assert agreement["backend_collectives"] == plain["backend_collectives"] + 1


def test_l2_penalty_gradient_is_two_lambda_theta():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    lam = 0.37
    penalty = l2_penalty(params, lam)
    torch.testing.assert_close(penalty, lam * sum((p.detach() ** 2).sum() for p in params))
    penalty.backward()
    for p in params:
        torch.testing.assert_close(p.grad, 2 * lam * p.detach())


def test_l2_penalty_excludes_biases_unless_asked():
    from pipeline.models import Discriminator
    from pipeline.step import penalty_params

    D = Discriminator(_cfg([]).model)
    names = {id(p): n for n, p in D.named_parameters()}
    assert all(not names[id(p)].endswith("bias") for p in penalty_params(D, include_biases=False))
    assert len(penalty_params(D, include_biases=True)) == len(list(D.parameters()))


def test_without_dropout_switches_off_only_the_dropout_layers_and_restores_them():
    from pipeline.models import Discriminator
    from pipeline.step import without_dropout

    D = Discriminator(_cfg([]).model).train()
    x = torch.randn(8, 784)
    with without_dropout(D):
        assert torch.equal(D(x), D(x)), "no dropout: the same input gives the same output"
        assert D.training and all(
            m.training for m in D.modules() if not isinstance(m, torch.nn.Dropout)
        )
    assert all(m.training for m in D.modules())
    assert not torch.equal(D(x), D(x)), "dropout is back on after the block"
