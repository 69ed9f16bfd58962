"""The models, specified: the CPU Dropout is nn.Dropout's distribution (zero with probability p,
survivors scaled by 1/(1-p), unbiased, the same mask in the backward pass) drawn from torch's
global CPU stream; G maps z to images in [-1, 1] with BN and bias-free Linears exactly when
``g_batchnorm``; D returns one logit per image."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import Discriminator, Dropout, Generator, build_models

N = 1_000_000  # elements for the statistical checks: the binomial std of a fraction is <= 5e-4
SIGMAS = 6  # bounds are 6 standard deviations: a correct Dropout fails about once in 5e8 seeds


def _small(**overrides) -> ModelConfig:
    return ModelConfig(latent_dim=8, g_hidden=[16, 32], d_hidden=[32, 16], **overrides)


def _positive(*shape: int) -> torch.Tensor:
    """Inputs bounded away from 0, so a zero in the output can only be a dropped element."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(7)) + 0.5


# --- Dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_in_eval_mode_is_the_identity(p):
    x = torch.randn(64, 32)
    assert torch.equal(Dropout(p).eval()(x), x)


def test_dropout_with_p_0_is_the_identity_in_train_mode():
    x = torch.randn(64, 32)
    assert torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_output_is_zero_or_input_scaled_by_1_over_1_minus_p(p):
    torch.manual_seed(0)
    x = _positive(256, 128)
    out = Dropout(p).train()(x)
    kept = out != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_zeroes_a_fraction_p_of_the_elements(p):
    torch.manual_seed(0)
    out = Dropout(p).train()(_positive(N))
    zero_fraction = (out == 0).double().mean().item()
    assert abs(zero_fraction - p) < SIGMAS * math.sqrt(p * (1 - p) / N), zero_fraction


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_is_unbiased_in_expectation(p):
    torch.manual_seed(0)
    x = _positive(N).double()
    out = Dropout(p).train()(x)
    # sum(out) = sum(x_i * b_i / (1-p)), b_i ~ Bernoulli(1-p): mean sum(x), var sum(x^2) p/(1-p).
    std_of_ratio = math.sqrt((x**2).sum().item() * p / (1 - p)) / x.sum().item()
    ratio = (out.sum() / x.sum()).item()
    assert abs(ratio - 1) < SIGMAS * std_of_ratio, ratio


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_gradient_is_the_forward_mask_scaled_by_1_over_1_minus_p(p):
    torch.manual_seed(0)
    x = _positive(128, 64).requires_grad_(True)
    upstream = torch.randn(128, 64)
    out = Dropout(p).train()(x)
    (out * upstream).sum().backward()
    mask = (out != 0).to(x.dtype)
    torch.testing.assert_close(x.grad, upstream * mask / (1 - p))


def test_dropout_mask_is_rand_ge_p_drawn_from_the_global_cpu_generator():
    p, x = 0.3, _positive(64, 32)
    torch.manual_seed(5)
    expected_kept = torch.rand(64, 32) >= p
    after_one_draw = torch.get_rng_state()
    torch.manual_seed(5)
    out = Dropout(p).train()(x)
    assert torch.equal(out != 0, expected_kept)
    assert torch.equal(torch.get_rng_state(), after_one_draw), "one draw of the global stream"


def test_dropout_same_seed_gives_the_same_mask_and_another_seed_another():
    drop, x = Dropout(0.5).train(), _positive(64, 32)

    def mask(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return drop(x) != 0

    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


# --- Generator and Discriminator --------------------------------------------------------------


def test_discriminator_returns_one_logit_per_image():
    torch.manual_seed(0)
    D = Discriminator(_small()).eval()
    logits = D(torch.randn(5, 784) * 100)
    assert logits.shape == (5,)
    assert isinstance(D.net[-1], nn.Linear), "no Sigmoid: the loss is BCE-with-logits"
    assert ((logits < 0) | (logits > 1)).any(), "logits, not probabilities in [0, 1]"


def test_generator_maps_latents_to_images_in_minus_1_to_1():
    cfg = _small()
    torch.manual_seed(0)
    G = Generator(cfg).train()
    with torch.no_grad():
        G.net[-2].weight.mul_(1000)  # drive the output layer deep into the Tanh's saturation
    images = G(torch.randn(16, cfg.latent_dim))
    assert images.shape == (16, cfg.image_size)
    assert images.min() >= -1 and images.max() <= 1
    assert images.abs().max() > 0.99


@pytest.mark.parametrize("g_batchnorm", [True, False])
def test_generator_has_batchnorm_after_each_hidden_linear_only_with_g_batchnorm(g_batchnorm):
    cfg = _small(g_batchnorm=g_batchnorm)
    layers = list(Generator(cfg).net)
    bns = [m for m in layers if isinstance(m, nn.BatchNorm1d)]
    assert len(bns) == (len(cfg.g_hidden) if g_batchnorm else 0)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm1d):
            assert isinstance(layers[i - 1], nn.Linear) and isinstance(layers[i + 1], nn.ReLU)


@pytest.mark.parametrize("g_batchnorm", [True, False])
def test_generator_linears_before_batchnorm_have_no_bias_and_the_others_do(g_batchnorm):
    layers = list(Generator(_small(g_batchnorm=g_batchnorm)).net)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            before_bn = i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm1d)
            assert (layer.bias is None) == before_bn, (i, layer)
    assert layers[-2].bias is not None, "the output Linear keeps its bias"


def test_generator_batchnorm_takes_eps_and_momentum_from_the_config():
    G = Generator(_small(bn_eps=1e-3, bn_momentum=0.25))
    for bn in (m for m in G.modules() if isinstance(m, nn.BatchNorm1d)):
        assert (bn.eps, bn.momentum) == (1e-3, 0.25)


@pytest.mark.parametrize("d_dropout", [0.0, 0.3])
def test_discriminator_uses_the_cpu_dropout_exactly_when_d_dropout_is_positive(d_dropout):
    cfg = _small(d_dropout=d_dropout, leaky_slope=0.1)
    D = Discriminator(cfg)
    drops = [m for m in D.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == (len(cfg.d_hidden) if d_dropout > 0 else 0)
    assert all(type(m) is Dropout and m.p == d_dropout for m in drops)
    slopes = {m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}


def test_build_models_returns_a_generator_and_a_discriminator_that_compose():
    cfg = _small()
    G, D = build_models(cfg)
    assert isinstance(G, Generator) and isinstance(D, Discriminator)
    assert D(G(torch.randn(4, cfg.latent_dim))).shape == (4,)
