"""The EMA of G, specified: each update moves every parameter to decay*old + (1-decay)*new, so
against a fixed G the gap shrinks as decay^k; BN buffers are copied, not averaged; the average
is a separate, frozen, eval-mode copy, and updating it leaves G untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.ema import EMA
from pipeline.models import Generator

DECAY = 0.9


def _generator(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(ModelConfig(latent_dim=8, g_hidden=[16, 32]))


def _perturb(G: nn.Module, seed: int = 1) -> None:
    """Move every parameter of G, as an optimizer step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def _train_forward(G: Generator, seed: int = 2) -> None:
    """One forward pass in train mode: BN running statistics move, num_batches_tracked counts."""
    G.train()
    with torch.no_grad():
        G(torch.randn(32, G.latent_dim, generator=torch.Generator().manual_seed(seed)))


def _clone(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_update_moves_each_parameter_to_decay_old_plus_1_minus_decay_new():
    G = _generator()
    ema = EMA(G, DECAY)
    old = [p.clone() for p in ema.module.parameters()]
    _perturb(G)
    ema.update(G)
    for ema_p, before, new in zip(ema.module.parameters(), old, G.parameters(), strict=True):
        torch.testing.assert_close(ema_p, DECAY * before + (1 - DECAY) * new.detach())


@pytest.mark.parametrize("k", [1, 5, 20])
def test_k_updates_against_a_fixed_generator_shrink_the_gap_by_decay_to_the_k(k):
    G = _generator()
    ema = EMA(G, DECAY)
    _perturb(G)
    start = [p.clone() for p in ema.module.parameters()]
    for _ in range(k):
        ema.update(G)
    for ema_p, p0, target in zip(ema.module.parameters(), start, G.parameters(), strict=True):
        expected_gap = DECAY**k * (p0 - target.detach())
        torch.testing.assert_close(ema_p - target.detach(), expected_gap, rtol=1e-4, atol=1e-5)


def test_update_copies_the_batchnorm_buffers_of_the_generator():
    G = _generator()
    ema = EMA(G, DECAY)
    _train_forward(G)
    buffers = dict(G.named_buffers())
    assert any(k.endswith("num_batches_tracked") and v.item() == 1 for k, v in buffers.items())
    ema.update(G)
    ema_buffers = dict(ema.module.named_buffers())
    assert ema_buffers.keys() == buffers.keys()
    for name, buf in buffers.items():
        assert torch.equal(ema_buffers[name], buf), name


def test_ema_module_never_requires_grad_and_stays_in_eval_mode():
    G = _generator()
    ema = EMA(G, DECAY)
    for _ in range(2):
        assert not ema.module.training
        assert all(not m.training for m in ema.module.modules())
        assert all(not p.requires_grad for p in ema.module.parameters())
        _perturb(G)
        _train_forward(G)  # G in train mode must not switch its average to train mode
        ema.update(G)


def test_update_leaves_the_generator_unchanged():
    G = _generator()
    ema = EMA(G, DECAY)
    _perturb(G)
    _train_forward(G)
    before = _clone(G)
    ema.update(G)
    after = _clone(G)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert G.training and all(p.requires_grad for p in G.parameters())


def test_ema_module_is_a_separate_copy_of_the_generator():
    G = _generator()
    ema = EMA(G, DECAY)
    ema_state = _clone(ema.module)
    for name, value in _clone(G).items():
        assert torch.equal(ema_state[name], value), "starts equal to G"
    _perturb(G)
    _train_forward(G)  # G's parameters and buffers change, without an update
    for name, value in _clone(ema.module).items():
        assert torch.equal(value, ema_state[name]), name
    ema_ptrs = {t.data_ptr() for t in ema.module.state_dict().values()}
    assert ema_ptrs.isdisjoint(t.data_ptr() for t in G.state_dict().values())


# --- BatchNorm statistics of the averaged weights ---------------------------------------------


def test_with_recalibration_update_leaves_the_batchnorm_buffers_alone():
    G = _generator()
    ema = EMA(G, decay=0.9, bn_batches=2)
    before = {k: v for k, v in _clone(ema.module).items() if "running" in k}
    _train_forward(G)  # moves G's running statistics
    ema.update(G)
    after = {k: v for k, v in _clone(ema.module).items() if "running" in k}
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_recalibration_gives_the_batch_statistics_of_the_averaged_weights():
    from pipeline.ema import RECALIBRATION_BATCH
    from pipeline.io import draw_latents, seeded_generator

    G = _generator()
    ema = EMA(G, decay=0.9, bn_batches=1)
    _perturb(ema.module)  # averaged weights unlike G's
    ema.recalibrate_bn(seed=3, step=40)
    # The first BatchNorm sees Linear(z) (no bias): its statistics follow from z and the weight.
    z = draw_latents(RECALIBRATION_BATCH, G.latent_dim, "cpu", seeded_generator(3, "ema-bn", 40))
    h = z @ ema.module.net[0].weight.T
    bn = ema.module.net[1]
    torch.testing.assert_close(bn.running_mean, h.mean(0))
    torch.testing.assert_close(bn.running_var, h.var(0, unbiased=True))
    assert bn.num_batches_tracked.item() == 1
    assert not ema.module.training and bn.momentum == G.net[1].momentum  # restored


def test_recalibration_is_the_same_on_every_call_and_leaves_the_weights_alone():
    """Each rank calls it with the same (seed, step): identical statistics, no communication."""
    ema = EMA(_generator(), decay=0.9, bn_batches=3)
    _perturb(ema.module)
    weights = {k: v for k, v in _clone(ema.module).items() if "running" not in k and "num" not in k}
    ema.recalibrate_bn(seed=0, step=7)
    first = _clone(ema.module)
    ema.recalibrate_bn(seed=0, step=7)
    for key, value in _clone(ema.module).items():
        assert torch.equal(value, first[key]), key
    for key, value in weights.items():
        assert torch.equal(first[key], value), key
    ema.recalibrate_bn(seed=0, step=8)
    assert not torch.equal(_clone(ema.module)["net.1.running_mean"], first["net.1.running_mean"])
