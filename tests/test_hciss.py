"""HCISS reconstruction: label reconstruction, feature global perception loss, the method's hooks."""
import argparse

import pytest
import torch

import methods
from methods import losses
from methods.hciss import HCISS, feature_global_perception_loss, reconstruct_labels
from tests.test_invariance import make_opts, make_step_models, random_batch, run_training_losses


def _logits_from_probs(probs):
    """Old logits whose softmax is exactly-ish `probs` [B, C°, H, W]."""
    return torch.log(torch.as_tensor(probs, dtype=torch.float64))


def test_reconstruction_rules_on_hand_made_pixels():
    # 6 pixels in a row, C° = 3 (bg, 1, 2) and a new class 3 in the labels
    probs = torch.tensor([
        [0.10, 0.80, 0.10],  # label 0, old class 1 at 0.80         -> 1
        [0.10, 0.65, 0.25],  # label 0, old class 1 at 0.65 < 0.7  -> 0
        [0.90, 0.05, 0.05],  # label 0, old argmax background       -> 0
        [0.05, 0.05, 0.90],  # label 3 (current class)              -> 3
        [0.05, 0.05, 0.90],  # label 255                            -> 255
        [0.02, 0.02, 0.96],  # label 0, old class 2 at 0.96         -> 2
    ], dtype=torch.float64).t().reshape(1, 3, 1, 6)
    labels = torch.tensor([[[0, 0, 0, 3, 255, 0]]])
    before = labels.clone()
    out = reconstruct_labels(labels, _logits_from_probs(probs), threshold=0.7)
    assert out.tolist() == [[[1, 0, 0, 3, 255, 2]]]
    assert torch.equal(labels, before)  # input untouched
    assert reconstruct_labels(labels, _logits_from_probs(probs), threshold=0.6).tolist() == [[[1, 1, 0, 3, 255, 2]]]
    assert reconstruct_labels(labels, _logits_from_probs(probs), threshold=0.97).tolist() == [[[0, 0, 0, 3, 255, 0]]]
    assert reconstruct_labels(labels, None, 0.7) is labels


def test_reconstruction_matches_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    old_logits = 3 * torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (2, 5, 6), generator=g)
    labels[torch.rand(2, 5, 6, generator=g) < 0.5] = 0
    labels[0, 0, :2] = 255
    for threshold in (0.0, 0.5, 0.7, 0.9):
        out = reconstruct_labels(labels, old_logits, threshold)
        expected = labels.clone()
        changed = 0
        for b in range(2):
            for i in range(5):
                for j in range(6):
                    p = torch.softmax(old_logits[b, :, i, j], 0)
                    c = int(p.argmax())
                    if labels[b, i, j] == 0 and c >= 1 and p[c] >= threshold:
                        expected[b, i, j] = c
                        changed += 1
        assert torch.equal(out, expected)
        if threshold <= 0.5:
            assert changed > 0


def _slow_fgp(body, old_body, old_logits):
    B, K, h, w = body.shape
    H, W = old_logits.shape[-2:]
    sh, sw = H // h, W // w
    num = den = 0.0
    for b in range(B):
        for i in range(h):
            for j in range(w):
                block = old_logits[b, :, i * sh:(i + 1) * sh, j * sw:(j + 1) * sw]
                attention = (1 - torch.softmax(block, 0)[0]).mean()
                diff = sum((body[b, k, i, j] - old_body[b, k, i, j]) ** 2 for k in range(K)) / K
                num += attention * diff
                den += attention
    local = num / (den + 1e-6)
    global_term = 0.0
    for b in range(B):
        for k in range(K):
            global_term += (body[b, k].mean() - old_body[b, k].mean()) ** 2
    return local + global_term / (B * K)


def test_feature_global_perception_matches_a_slow_loop():
    g = torch.Generator().manual_seed(1)
    body = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    old_body = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    old_logits = 2 * torch.randn(2, 3, 12, 16, generator=g, dtype=torch.float64)
    loss = feature_global_perception_loss(body, old_body, old_logits)
    assert loss.item() == pytest.approx(float(_slow_fgp(body.detach(), old_body, old_logits)), rel=1e-10)
    loss.backward()
    assert body.grad.abs().sum() > 0


def test_feature_global_perception_attention_and_zero_cases():
    g = torch.Generator().manual_seed(2)
    body = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64)
    old_logits = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    assert feature_global_perception_loss(body, body.clone(), old_logits).item() == 0.0
    # a difference only in the top-left cell, old model sure it is background there: the local term
    # ignores it, only the global (GAP) term remains
    old_body = body.clone()
    old_body[0, :, 0, 0] += 1.0
    old_logits[0, 0, :4, :4] = 60.0
    loss = feature_global_perception_loss(body, old_body, old_logits).item()
    assert loss == pytest.approx((1.0 / 4) ** 2, rel=1e-9)
    # old model sure it is an old foreground class there: the local term counts it
    old_logits[0, 0, :4, :4] = -60.0
    old_logits[0, 1, :4, :4] = 60.0
    loss_fg = feature_global_perception_loss(body, old_body, old_logits).item()
    assert loss_fg > loss + 0.1


def test_hciss_presets_flags_and_registry():
    assert methods.get_method_class("hciss") is HCISS
    assert HCISS.presets == {"loss_kd": 10.0, "unkd": True, "unce": False, "init_balanced": True}
    assert "Rong" in HCISS.paper
    parser = argparse.ArgumentParser()
    HCISS.add_arguments(parser)
    HCISS.add_arguments(parser)  # a second call is a no-op, not an argparse clash
    opts = parser.parse_args([])
    assert opts.hciss_threshold == 0.7 and opts.hciss_fgp == 100.0
    assert parser.parse_args(["--hciss_threshold", "0.9"]).hciss_threshold == 0.9


def test_hciss_training_losses_step0_is_plain_ce():
    terms = run_training_losses(HCISS, 0)
    assert set(terms) == {"seg"}
    assert torch.isfinite(terms["seg"]) and terms["seg"] > 0


def test_hciss_training_losses_step1_uses_reconstructed_labels():
    old, new = make_step_models()
    # an old model confident about class 1 everywhere, so reconstruction changes labels
    with torch.no_grad():
        old.cls.bias.copy_(torch.tensor([0.0, 8.0, 0.0]))
    opts = make_opts(HCISS)
    method = HCISS(opts, 1, [3, 1])
    images, labels = random_batch(4)
    labels[(labels > 0) & (labels < 3)] = 0
    terms = method.training_losses(new, old, images, labels)
    assert set(terms) == {"seg", "kd", "fgp"}
    assert all(torch.isfinite(v) for v in terms.values())
    # body weights copied from the old model: feature distillation is exactly zero
    assert terms["fgp"].item() == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        old_logits, _ = old(images)
        logits, _ = new(images)
    reconstructed = reconstruct_labels(labels, old_logits, 0.7)
    assert (reconstructed == 1).sum() > 0
    assert terms["seg"].item() == pytest.approx(losses.cross_entropy(logits, reconstructed).item(), rel=1e-6)
    assert terms["seg"].item() != pytest.approx(losses.cross_entropy(logits, labels).item(), rel=1e-3)
    # a different body: positive, weighted feature term
    with torch.no_grad():
        new.body.weight.add_(0.1)
    terms = method.training_losses(new, old, images, labels)
    assert terms["fgp"].item() > 0
    sum(terms.values()).backward()
    assert new.body.weight.grad.abs().sum() > 0
