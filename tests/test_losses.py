"""Losses of docs/methods.md#losses against slow per-pixel / per-class re-computations of their formulas."""
import math

import pytest
import torch

from methods import losses

B, H, W = 2, 4, 4
IGNORE = 255


def make_logits(channels, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, channels, H, W, generator=gen, dtype=torch.float64)


def make_labels(channels, seed=1, ignore_fraction=0.25):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, channels, (B, H, W), generator=gen)
    ignored = torch.rand(B, H, W, generator=gen) < ignore_fraction
    labels[ignored] = IGNORE
    labels[0, 0, 0] = IGNORE  # at least one ignored pixel whatever the seed
    return labels


def pixels():
    for b in range(B):
        for i in range(H):
            for j in range(W):
                yield b, i, j


def lse(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def softmax(values):
    den = lse(values)
    return [math.exp(v - den) for v in values]


def log_sigmoid(v):
    return -math.log1p(math.exp(-v)) if v >= 0 else v - math.log1p(math.exp(v))


def bce(logit, target):
    return -(target * log_sigmoid(logit) + (1 - target) * log_sigmoid(-logit))


# ------------------------------------------------------------------ references (explicit loops)
def ref_ce(x, y):
    total = 0.0
    for b, i, j in pixels():
        c = int(y[b, i, j])
        if c == IGNORE:
            continue
        vals = [float(x[b, k, i, j]) for k in range(x.shape[1])]
        total += -(vals[c] - lse(vals))
    return total / (B * H * W)


def ref_unce(x, y, old):
    total = 0.0
    for b, i, j in pixels():
        c = int(y[b, i, j])
        if c == IGNORE:
            continue
        vals = [float(x[b, k, i, j]) for k in range(x.shape[1])]
        if c < old:  # background or an old class: the whole old group counts as background
            total += -(lse(vals[:old]) - lse(vals))
        else:
            total += -(vals[c] - lse(vals))
    return total / (B * H * W)


def ref_kd(x, xo, alpha):
    old = xo.shape[1]
    total = 0.0
    for b, i, j in pixels():
        new_old = [float(x[b, k, i, j]) for k in range(old)]
        q = softmax([alpha * float(xo[b, k, i, j]) for k in range(old)])
        den = lse(new_old)
        total += sum(q[k] * (new_old[k] - den) for k in range(old)) / old
    return -total / (B * H * W)


def ref_unkd(x, xo, alpha):
    old, channels = xo.shape[1], x.shape[1]
    total = 0.0
    for b, i, j in pixels():
        vals = [float(x[b, k, i, j]) for k in range(channels)]
        den = lse(vals)
        q = softmax([alpha * float(xo[b, k, i, j]) for k in range(old)])
        log_bg = lse([vals[0]] + vals[old:]) - den
        pixel = q[0] * log_bg
        for k in range(1, old):
            pixel += q[k] * (vals[k] - den)
        total += pixel / old
    return -total / (B * H * W)


def ref_bce(x, y):
    total = 0.0
    for b, i, j in pixels():
        c = int(y[b, i, j])
        if c == IGNORE:
            continue
        total += sum(bce(float(x[b, k, i, j]), 1.0 if k == c else 0.0) for k in range(x.shape[1]))
    return total / (B * H * W)


def ref_icarl(x, xo):
    old = xo.shape[1]
    total = 0.0
    for b, i, j in pixels():
        for k in range(old):
            target = 1.0 / (1.0 + math.exp(-float(xo[b, k, i, j])))
            total += bce(float(x[b, k, i, j]), target)
    return old * total / (B * old * H * W)


def ref_icarl_disjoint(x, y, xo, background_from_labels):
    """Per pixel Σ_c BCE(x_c, t_c): t_c = sigmoid(x°_c) on old channels (from 1 with background_from_labels),
    1[y = c] elsewhere; ignored pixels 0; mean over all pixels."""
    old, channels = xo.shape[1], x.shape[1]
    first_soft = 1 if background_from_labels else 0
    total = 0.0
    for b, i, j in pixels():
        c = int(y[b, i, j])
        if c == IGNORE:
            continue
        for k in range(channels):
            if first_soft <= k < old:
                target = 1.0 / (1.0 + math.exp(-float(xo[b, k, i, j])))
            else:
                target = 1.0 if k == c else 0.0
            total += bce(float(x[b, k, i, j]), target)
    return total / (B * H * W)


def ref_de(f, fo):
    total = 0.0
    for value, old_value in zip(f.flatten().tolist(), fo.flatten().tolist()):
        total += (value - old_value) ** 2
    return total / f.numel()


def close(value, reference, tol=1e-12):
    """fp64 inputs are computed in fp64 (not cast down to fp32), so the match is tight."""
    assert value.dim() == 0 and value.dtype == torch.float64
    assert value.item() == pytest.approx(reference, rel=tol, abs=tol)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("channels", [3, 6])
def test_cross_entropy_matches_formula(channels):
    x, y = make_logits(channels), make_labels(channels)
    close(losses.cross_entropy(x, y), ref_ce(x, y))


def test_ignored_pixels_count_zero_in_an_all_pixel_mean():
    x, y = make_logits(4), make_labels(4, ignore_fraction=0.5)
    valid = y != IGNORE
    assert 0 < valid.sum() < valid.numel()
    mean_over_valid = torch.nn.functional.cross_entropy(x, y, ignore_index=IGNORE).item()
    expected = mean_over_valid * valid.sum().item() / valid.numel()
    close(losses.cross_entropy(x, y), expected)
    # All pixels ignored: zero (not NaN), for every labelled loss.
    y_ignored = torch.full_like(y, IGNORE)
    for value in (
        losses.cross_entropy(x, y_ignored),
        losses.unbiased_cross_entropy(x, y_ignored, 2),
        losses.bce_with_onehot(x, y_ignored),
        losses.icarl_disjoint(x, x[:, :2], y_ignored),
    ):
        assert value.item() == 0.0


@pytest.mark.parametrize("old", [2, 3, 4])
def test_unbiased_cross_entropy_matches_formula(old):
    channels = 5
    x, y = make_logits(channels, seed=2), make_labels(channels, seed=3)
    assert ((y > 0) & (y < old)).any()  # some old-class labels to be remapped
    y_before = y.clone()
    close(losses.unbiased_cross_entropy(x, y, old), ref_unce(x, y, old))
    assert torch.equal(y, y_before)  # remapped on a copy


def test_unbiased_cross_entropy_is_ce_without_old_foreground():
    # With C° = 1 (only the background is old) the background group is channel 0 alone: exactly CE.
    # C° = 0 (step 0) is treated the same way.
    x, y = make_logits(4, seed=4), make_labels(4, seed=5)
    ce = losses.cross_entropy(x, y)
    for old in (0, 1):
        torch.testing.assert_close(losses.unbiased_cross_entropy(x, y, old), ce)
    assert abs(losses.unbiased_cross_entropy(x, y, 3).item() - ce.item()) > 1e-3


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_knowledge_distillation_matches_formula(alpha):
    x, xo = make_logits(6, seed=6), make_logits(4, seed=7)
    close(losses.knowledge_distillation(x, xo, alpha=alpha), ref_kd(x, xo, alpha))


@pytest.mark.parametrize("old,channels,alpha", [(3, 5, 1.0), (4, 5, 1.0), (2, 3, 2.0), (1, 2, 1.0), (4, 4, 1.0)])
def test_unbiased_knowledge_distillation_matches_formula(old, channels, alpha):
    # (4, 5) and (2, 3): a step adding a single class; (1, 2): 1s task step 1 after background only;
    # (4, 4): no new class (p(bg) is the background alone).
    x, xo = make_logits(channels, seed=8), make_logits(old, seed=9)
    close(losses.unbiased_knowledge_distillation(x, xo, alpha=alpha), ref_unkd(x, xo, alpha))


def test_unbiased_kd_differs_from_kd():
    x, xo = make_logits(5, seed=10), make_logits(4, seed=11)
    unbiased, plain = losses.unbiased_knowledge_distillation(x, xo).item(), losses.knowledge_distillation(x, xo).item()
    assert abs(unbiased - plain) > 1e-3


@pytest.mark.parametrize("channels", [2, 5])
def test_bce_with_onehot_matches_formula(channels):
    x, y = make_logits(channels, seed=12), make_labels(channels, seed=13)
    close(losses.bce_with_onehot(x, y), ref_bce(x, y))


def test_icarl_distillation_matches_formula():
    x, xo = make_logits(5, seed=14), make_logits(3, seed=15)
    close(losses.icarl_distillation(x, xo), ref_icarl(x, xo))


@pytest.mark.parametrize("background_from_labels", [False, True])
def test_icarl_disjoint_matches_formula(background_from_labels):
    x, xo, y = make_logits(5, seed=25), make_logits(3, seed=26), make_labels(5, seed=27)
    assert (y == 0).any() and ((y > 0) & (y < 3)).any() and (y >= 3).any() and (y == IGNORE).any()
    value = losses.icarl_disjoint(x, xo, y, background_from_labels=background_from_labels)
    close(value, ref_icarl_disjoint(x, y, xo, background_from_labels))
    other = losses.icarl_disjoint(x, xo, y, background_from_labels=not background_from_labels)
    assert abs(value.item() - other.item()) > 1e-3  # --icarl_bkg changes the background target


def test_feature_distillation_matches_formula():
    gen = torch.Generator().manual_seed(16)
    f = torch.randn(B, 8, 2, 2, generator=gen, dtype=torch.float64)
    fo = torch.randn(B, 8, 2, 2, generator=gen, dtype=torch.float64)
    close(losses.feature_distillation(f, fo), ref_de(f, fo))


def all_losses(x, y, xo, f, fo):
    return {
        "ce": losses.cross_entropy(x, y),
        "unce": losses.unbiased_cross_entropy(x, y, xo.shape[1]),
        "kd": losses.knowledge_distillation(x, xo),
        "unkd": losses.unbiased_knowledge_distillation(x, xo),
        "bce": losses.bce_with_onehot(x, y),
        "icarl": losses.icarl_distillation(x, xo),
        "de": losses.feature_distillation(f, fo),
        "icarl_disjoint": losses.icarl_disjoint(x, xo, y),
        "icarl_disjoint_bkg": losses.icarl_disjoint(x, xo, y, background_from_labels=True),
    }


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_fp32(low):
    # Large logits (|x| up to ~60) overflow exp() in fp16: computing in fp32 must still be exact.
    x, xo = make_logits(5, seed=17, scale=20.0), make_logits(4, seed=18, scale=20.0)
    f, fo = make_logits(3, seed=19), make_logits(3, seed=20)
    y = make_labels(5, seed=21)
    low_inputs = [t.to(low).requires_grad_() for t in (x, xo, f, fo)]
    rounded = [t.detach().float() for t in low_inputs]  # the same values, exactly representable in fp32
    got = all_losses(low_inputs[0], y, low_inputs[1], low_inputs[2], low_inputs[3])
    want = all_losses(rounded[0], y, rounded[1], rounded[2], rounded[3])
    full = all_losses(x.float(), y, xo.float(), f.float(), fo.float())
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(value, full[name], rtol=0.05, atol=0.05, msg=name)
    sum(got.values()).backward()
    assert low_inputs[0].grad.dtype == low and torch.isfinite(low_inputs[0].grad.float()).all()


def test_gradients_flow_to_the_new_logits():
    x = make_logits(5, seed=22).requires_grad_()
    xo, y = make_logits(4, seed=23), make_labels(5, seed=24)
    for name, value in all_losses(x, y, xo, x[:, :3], xo[:, :3]).items():
        (grad,) = torch.autograd.grad(value, x)
        assert grad.abs().sum() > 0, name
