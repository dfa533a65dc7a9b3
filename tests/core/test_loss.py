"""Tests for clipforge.loss: the plain contrastive loss against its definition and OpenCLIP's values, the
tiled path against the plain one (values and gradients), the sigmoid loss and input validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.runtime.distributed import process_env
from clipforge.loss import (DEFAULT_TILE_SIZE, SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE, _TiledLogSumExp,
                            clamp_logit_scale_, contrastive_loss, sigmoid_loss)


def _features(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=1).to(dtype)


def _golden_features(n: int, d: int, phase: float) -> torch.Tensor:
    """Deterministic features; the golden values below were computed from these by OpenCLIP 3.3."""
    x = torch.arange(n * d, dtype=torch.float64).reshape(n, d)
    return F.normalize(torch.sin(0.37 * x + phase) + 0.5 * torch.cos(1.3 * x * phase), dim=1)


def _loss_and_grads(images, texts, log_scale: float, **kwargs):
    images = images.clone().requires_grad_()
    texts = texts.clone().requires_grad_()
    log_scale = torch.tensor(log_scale, dtype=images.dtype, requires_grad=True)
    loss = contrastive_loss(images, texts, log_scale.exp(), **kwargs)
    loss.backward()
    return loss.detach(), images.grad, texts.grad, log_scale.grad


def _reference_loss(images, texts, scale):
    """The definition, written out: mean over i of -log softmax of row i and of column i at the label."""
    logits = scale * images @ texts.T
    n = logits.shape[0]
    per_image = [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)]
    per_text = [torch.logsumexp(logits[:, i], 0) - logits[i, i] for i in range(n)]
    return (sum(per_image) + sum(per_text)) / (2 * n)


def test_public_api_exports_the_losses():
    assert clipforge.contrastive_loss is contrastive_loss
    assert clipforge.sigmoid_loss is sigmoid_loss


@pytest.mark.parametrize("n,d,scale,expected", [(4, 3, 100.0, 2.6535848217), (6, 8, 1 / 0.07, 2.0715860277)])
def test_plain_loss_matches_openclip_golden_values(n, d, scale, expected):
    loss = contrastive_loss(_golden_features(n, d, 0.1), _golden_features(n, d, 0.7), scale)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("tile_size", [None, 2])
def test_loss_matches_written_out_definition(tile_size):
    images, texts = _features(7, 5, 0), _features(7, 5, 1)
    loss = contrastive_loss(images, texts, 20.0, tile_size)
    assert loss.item() == pytest.approx(_reference_loss(images, texts, 20.0).item(), rel=1e-12)


def test_perfectly_aligned_pairs_give_near_zero_loss():
    images = torch.eye(4)
    assert 0.0 <= contrastive_loss(images, images.clone(), 100.0).item() < 1e-6


@pytest.mark.parametrize("n,d,tile_size", [(1, 4, 3), (5, 8, 2), (64, 16, 64), (100, 32, 16), (257, 32, 64),
                                           (130, 16, 1000)])
def test_tiled_matches_plain_fp32_values_and_gradients(n, d, tile_size):
    images, texts = _features(n, d, 2 * n), _features(n, d, 2 * n + 1)
    truth = _loss_and_grads(images, texts, math.log(30.0))  # float64 plain
    tiled = _loss_and_grads(images.float(), texts.float(), math.log(30.0), tile_size=tile_size)
    for got, want in zip(tiled, truth):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    plain32 = _loss_and_grads(images.float(), texts.float(), math.log(30.0))
    for got, want in zip(tiled, plain32):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,tile_size", [(50, 7), (33, 33), (40, 64)])
def test_tiled_is_exact_in_float64(n, tile_size):
    images, texts = _features(n, 12, 3), _features(n, 12, 4)
    for got, want in zip(_loss_and_grads(images, texts, math.log(100.0), tile_size=tile_size),
                         _loss_and_grads(images, texts, math.log(100.0))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_tiled_is_stable_with_large_logits():
    images, texts = _features(20, 4, 5), _features(20, 4, 6)
    tiled = _loss_and_grads(images, texts, math.log(5000.0), tile_size=6)
    assert all(torch.isfinite(t).all() for t in tiled)
    for got, want in zip(tiled, _loss_and_grads(images, texts, math.log(5000.0))):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("with_cols,offset", [(True, 0), (False, 3)])
def test_tiled_function_passes_gradcheck(with_cols, offset):
    q = _features(5, 3, 7).requires_grad_()
    k = _features(9 if not with_cols else 5, 3, 8).requires_grad_()
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5 + 5 + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def weighted(q, k, scale):  # arbitrary upstream gradients on every output
        rows, cols, matched = _TiledLogSumExp.apply(q, k, scale, 2, with_cols, offset)
        total = (weights[:5] * rows).sum() + weights[10] * matched
        return total + (weights[5:10] * cols).sum() if with_cols else total

    assert torch.autograd.gradcheck(weighted, (q, k, scale))


def test_plain_loss_gradients_equal_autograd_of_the_definition():
    """The plain path's hand-written backward against autograd through cross-entropy both ways."""
    images, texts = _features(9, 4, 11).requires_grad_(), _features(9, 4, 12).requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda i, t, s: contrastive_loss(i, t, s), (images, texts, scale))
    labels = torch.arange(9)
    logits = scale * images @ texts.T
    definition = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    expected = torch.autograd.grad(definition, (images, texts, scale))
    got = torch.autograd.grad(contrastive_loss(images, texts, scale), (images, texts, scale))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_plain_loss_under_bf16_autocast_stays_close_to_float32():
    images, texts = _features(16, 8, 15).float(), _features(16, 8, 16).float()
    reference = _loss_and_grads(images, texts, math.log(20.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _loss_and_grads(images, texts, math.log(20.0))
    assert mixed[0].dtype == torch.float32 and mixed[1].dtype == torch.float32
    assert mixed[0] != reference[0]  # the products did run in bfloat16
    for got, want in zip(mixed, reference):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-2)


def test_plain_loss_with_a_frozen_tower_gives_the_other_gradients_unchanged():
    images, texts = _features(6, 4, 13), _features(6, 4, 14)
    full = _loss_and_grads(images, texts, math.log(9.0))
    trainable_texts = texts.clone().requires_grad_()
    loss = contrastive_loss(images, trainable_texts, 9.0)  # images (a locked tower) need no gradient
    loss.backward()
    torch.testing.assert_close(trainable_texts.grad, full[2], rtol=1e-12, atol=1e-12)


def test_logit_scale_gradient_matches_finite_difference():
    images, texts = _features(12, 6, 9), _features(12, 6, 10)
    log_scale, eps = math.log(10.0), 1e-6
    _, _, _, grad = _loss_and_grads(images, texts, log_scale, tile_size=5)
    up = contrastive_loss(images, texts, math.exp(log_scale + eps), 5)
    down = contrastive_loss(images, texts, math.exp(log_scale - eps), 5)
    assert grad.item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-6)


def test_half_precision_features_are_accumulated_in_float32():
    images, texts = _features(40, 16, 11), _features(40, 16, 12)
    loss = contrastive_loss(images.bfloat16(), texts.bfloat16(), 50.0, 16)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(contrastive_loss(images, texts, 50.0).item(), rel=2e-2)


@pytest.mark.parametrize("tile_size", [None, 4])
def test_gather_and_local_loss_without_process_group_equal_plain_loss(tile_size):
    env = process_env()
    assert (env.rank, env.world_size, env.initialized) == (0, 1, False)
    images, texts = _features(10, 6, 13), _features(10, 6, 14)
    plain = _loss_and_grads(images, texts, 2.0)
    for kwargs in ({"gather": True}, {"gather": True, "local_loss": True}):
        for got, want in zip(_loss_and_grads(images, texts, 2.0, tile_size=tile_size, **kwargs), plain):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("args,kwargs,message", [
    ((torch.zeros(4, 3), torch.zeros(5, 3), 1.0), {}, "same shape"),
    ((torch.zeros(4), torch.zeros(4), 1.0), {}, "image_features must be a non-empty"),
    ((torch.zeros(0, 3), torch.zeros(0, 3), 1.0), {}, "non-empty"),
    ((torch.zeros(4, 3), [[0.0]], 1.0), {}, "text_features"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(2)), {}, "logit_scale must be a scalar"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), "100"), {}, "logit_scale must be a float"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), 1.0, 0), {}, "tile_size must be a positive int"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), 1.0, 2.5), {}, "tile_size"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), 1.0), {"local_loss": True}, "local_loss=True needs gather=True"),
])
def test_contrastive_loss_rejects_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        contrastive_loss(*args, **kwargs)


def test_default_tile_size_is_a_positive_int():
    assert isinstance(DEFAULT_TILE_SIZE, int) and DEFAULT_TILE_SIZE > 0


def _reference_sigmoid_loss(images, texts, scale, bias):
    n = images.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(label * (scale * images[i] @ texts[j] + bias))
    return total / n


@pytest.mark.parametrize("n,d,scale,bias,expected", [
    (4, 3, 10.0, -10.0, 1.7188307717), (4, 3, 3.0, 0.5, 4.8127164526),
    (6, 8, 10.0, -10.0, 3.4548029387), (6, 8, 3.0, 0.5, 5.7923469294)])
def test_sigmoid_loss_matches_openclip_golden_values(n, d, scale, bias, expected):
    loss = sigmoid_loss(_golden_features(n, d, 0.1), _golden_features(n, d, 0.7), scale, bias)
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_sigmoid_loss_matches_definition_and_trains_scale_and_bias():
    images, texts = _features(6, 5, 15), _features(6, 5, 16)
    log_scale = torch.tensor(SIGLIP_INIT_LOGIT_SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(SIGLIP_INIT_LOGIT_BIAS, dtype=torch.float64, requires_grad=True)
    loss = sigmoid_loss(images, texts, log_scale.exp(), bias)
    expected = _reference_sigmoid_loss(images, texts, 10.0, -10.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert log_scale.grad is not None and bias.grad is not None and bias.grad.item() != 0.0


def test_siglip_init_constants():
    assert math.exp(SIGLIP_INIT_LOGIT_SCALE) == pytest.approx(10.0)
    assert SIGLIP_INIT_LOGIT_BIAS == -10.0


def test_sigmoid_loss_rejects_bad_bias():
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        sigmoid_loss(torch.zeros(3, 2), torch.zeros(3, 2), 10.0, torch.zeros(3))


def test_clamp_logit_scale_caps_at_log_100():
    param = torch.nn.Parameter(torch.tensor(7.0))
    assert clamp_logit_scale_(param) is param
    assert param.item() == pytest.approx(math.log(100))
    param.data.fill_(-1.0)
    clamp_logit_scale_(param, max_value=3.0)
    assert param.item() == 0.0
    param.data.fill_(1.5)
    clamp_logit_scale_(param)
    assert param.item() == 1.5
