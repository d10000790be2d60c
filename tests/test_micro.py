"""MiCro reconstruction: CFRD, class-balanced anchors, pixel contrast, region relation, the method."""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

import methods
from methods.base import StepContext
from methods.hciss import reconstruct_labels
from methods.micro import (
    MiCro,
    cfrd_loss,
    downsample_labels,
    pixel_contrast_loss,
    prepare_features,
    region_relation_loss,
    sample_anchors,
)
from tests.test_invariance import make_opts, make_step_models, random_batch, run_training_losses


def _unit_features(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)


def _kl(q_logits, p_logits):
    q = torch.softmax(q_logits, 0)
    return float((q * (torch.log_softmax(q_logits, 0) - torch.log_softmax(p_logits, 0))).sum())


# ---------------------------------------------------------------- features and labels on the grid
def test_prepare_features_pools_then_normalises():
    x = torch.randn(2, 5, 8, 6, dtype=torch.float64)
    out = prepare_features(x, 2)
    assert out.shape == (2, 5, 4, 3) and out.dtype == torch.float64
    expected = x[:, :, 2:4, 4:6].mean(dim=(2, 3))
    assert torch.allclose(out[:, :, 1, 2], expected / expected.norm(dim=1, keepdim=True))
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 4, 3, dtype=torch.float64))
    before = prepare_features(x, 2, "before_pool")
    assert torch.allclose(before[:, :, 1, 2], F.normalize(x, dim=1)[:, :, 2:4, 4:6].mean(dim=(2, 3)))
    assert prepare_features(x.half(), 1).dtype == torch.float32


def test_downsample_labels_takes_the_pixel_nearest_each_cell_centre():
    labels = torch.arange(64).reshape(1, 8, 8)
    out = downsample_labels(labels, (2, 2))
    assert out.dtype == labels.dtype
    assert out.tolist() == [[[labels[0, 2, 2].item(), labels[0, 2, 6].item()],
                             [labels[0, 6, 2].item(), labels[0, 6, 6].item()]]]


# ---------------------------------------------------------------- CFRD
def test_cfrd_matches_a_slow_per_pair_loop():
    feat = _unit_features(3, 4, 2, 3, seed=1).requires_grad_(True)
    old = _unit_features(3, 4, 2, 3, seed=2)
    tau = 0.1
    loss = cfrd_loss(feat, old, tau)
    new_pixels = feat.detach().flatten(2).transpose(1, 2)  # [B, P, D]
    old_pixels = old.flatten(2).transpose(1, 2)
    B, P = new_pixels.shape[:2]
    total = 0.0
    for a in range(B):
        for b in range(B):
            for i in range(P):
                total += _kl(old_pixels[a, i] @ old_pixels[b].t() / tau, new_pixels[a, i] @ new_pixels[b].t() / tau)
    assert loss.item() == pytest.approx(total / (B * B * P), rel=1e-10)
    loss.backward()
    assert feat.grad.abs().sum() > 0
    assert cfrd_loss(old, old.clone(), tau).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- anchors
def test_sampler_is_class_balanced_and_never_returns_ignored_pixels():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (3, 10, 10), generator=g)
    labels[torch.rand(3, 10, 10, generator=g) < 0.3] = 255
    labels[labels == 3] = 255
    labels[0, 0, :5] = 3  # a rare class: 5 pixels
    index = sample_anchors(labels, 41, torch.Generator().manual_seed(0))
    flat = labels.reshape(-1)
    assert index.numel() == 41 and index.unique().numel() == 41
    chosen = flat[index]
    assert not (chosen == 255).any()
    counts = torch.bincount(chosen, minlength=4)
    assert counts[3] == 5  # the rare class gives all it has ...
    assert counts[:3].max() - counts[:3].min() <= 1  # ... the others share the rest evenly
    assert counts[:3].sum() == 36
    # no quota reached: 4 classes, 20 anchors -> 5 each
    counts = torch.bincount(flat[sample_anchors(labels, 20, torch.Generator().manual_seed(1))], minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]
    # same seed, same anchors; different seed, different anchors
    again = sample_anchors(labels, 41, torch.Generator().manual_seed(0))
    assert torch.equal(index, again)
    assert not torch.equal(index, sample_anchors(labels, 41, torch.Generator().manual_seed(5)))
    # fewer labelled pixels than anchors: every labelled pixel, once
    small = torch.full((1, 4, 4), 255)
    small[0, 1, :3] = torch.tensor([0, 2, 2])
    assert sorted(sample_anchors(small, 100).tolist()) == [4, 5, 6]


def test_sampler_draws_from_every_image():
    labels = torch.zeros(4, 6, 6, dtype=torch.long)
    labels[:, :, 3:] = torch.arange(1, 5).view(4, 1, 1)  # class k+1 only in image k
    index = sample_anchors(labels, 16, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels.reshape(-1)[index], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 16
    assert set((index // 36).tolist()) == {0, 1, 2, 3}


# ---------------------------------------------------------------- pixel contrast
def _slow_supcon(pixels, classes, temperature, base_temperature):
    losses, n = [], len(classes)
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if classes[p] == classes[i]]
        if not positives:
            continue
        den = math.log(sum(math.exp(float(pixels[i] @ pixels[a]) / temperature) for a in others))
        mean_log_prob = sum(float(pixels[i] @ pixels[p]) / temperature - den for p in positives) / len(positives)
        losses.append(-(temperature / base_temperature) * mean_log_prob)
    return sum(losses) / len(losses)


def test_pixel_contrast_matches_a_slow_per_anchor_loop_with_the_same_anchors():
    feat = _unit_features(3, 5, 4, 4, seed=4).requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (3, 4, 4), generator=g)
    labels[torch.rand(3, 4, 4, generator=g) < 0.2] = 255
    labels[0, 0, 0] = 3  # make class 3 a singleton: its anchor has no positive and is excluded
    labels[(labels == 3)] = 255
    labels[0, 0, 0] = 3
    loss = pixel_contrast_loss(feat, labels, 13, torch.Generator().manual_seed(7), 0.1, 0.07)
    index = sample_anchors(labels, 13, torch.Generator().manual_seed(7))
    pixels = feat.detach().permute(0, 2, 3, 1).reshape(-1, 5)[index]
    classes = labels.reshape(-1)[index].tolist()
    assert 3 in classes and 255 not in classes
    assert loss.item() == pytest.approx(_slow_supcon(pixels, classes, 0.1, 0.07), rel=1e-10)
    loss.backward()
    assert feat.grad.abs().sum() > 0
    # no anchor with a positive: zero, not NaN
    lonely = torch.tensor([[[0, 1], [2, 255]]])
    assert pixel_contrast_loss(feat[:1, :, :2, :2], lonely, 10).item() == 0.0


def test_contrast_uses_old_model_pseudo_labels_at_step1():
    opts = make_opts(MiCro, micro_anchors=10_000, micro_cfrd=0.0, micro_region=0.0)
    method = MiCro(opts, 1, [3, 1])
    g = torch.Generator().manual_seed(6)
    features = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 16, 16), generator=g)
    labels[(labels == 1) | (labels == 2)] = 0
    old_logits = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    old_logits[:, 1, :8] += 6.0  # the old model is sure about class 1 in the top half
    ctx = StepContext(step=1, old_classes=3, images=torch.zeros(2, 3, 16, 16), labels=labels,
                      logits=torch.zeros(2, 4, 16, 16), features={"pre_logits": features},
                      old_logits=old_logits, old_features={"pre_logits": features + 0.1})
    terms = method.extra_losses(ctx)
    assert set(terms) == {"contrast"}
    feat = prepare_features(features, 2)
    grid_labels = downsample_labels(labels, (2, 2))
    pseudo = reconstruct_labels(grid_labels, F.adaptive_avg_pool2d(old_logits, (2, 2)), 0.7)
    assert (pseudo == 1).any() and not (grid_labels == 1).any()
    with_pseudo = 0.1 * pixel_contrast_loss(feat, pseudo, 10_000)
    without = 0.1 * pixel_contrast_loss(feat, grid_labels, 10_000)
    assert terms["contrast"].item() == pytest.approx(with_pseudo.item(), rel=1e-9)
    assert terms["contrast"].item() != pytest.approx(without.item(), rel=1e-3)


# ---------------------------------------------------------------- region relation
def test_region_relation_matches_a_slow_loop_and_skips_absent_classes():
    feat = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    feat.requires_grad_(True)
    old = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    old_logits = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    old_logits[:, 2] -= 100  # class 2 absent from the batch
    tau = 0.1
    loss = region_relation_loss(feat, old, old_logits, 4, tau)

    new_pixels = [feat.detach()[b, :, i, j] for b in range(2) for i in range(3) for j in range(3)]
    old_pixels = [old[b, :, i, j] for b in range(2) for i in range(3) for j in range(3)]
    assignment = [int(old_logits[b, :, i, j].argmax()) for b in range(2) for i in range(3) for j in range(3)]
    present = sorted(set(assignment))
    assert 2 not in present and len(present) >= 2

    def prototypes(pixels):
        out = []
        for c in present:
            members = [p for p, a in zip(pixels, assignment) if a == c]
            mean = sum(members) / len(members)
            out.append(mean / mean.norm())
        return out

    new_protos, old_protos = prototypes(new_pixels), prototypes(old_pixels)
    total = 0.0
    for f_new, f_old in zip(new_pixels, old_pixels):
        new_logits = torch.stack([f_new @ p / f_new.norm() for p in new_protos]) / tau
        old_logits_row = torch.stack([f_old @ p / f_old.norm() for p in old_protos]) / tau
        total += _kl(old_logits_row, new_logits)
    assert loss.item() == pytest.approx(total / len(new_pixels), rel=1e-10)
    loss.backward()
    assert feat.grad.abs().sum() > 0
    assert region_relation_loss(old, old.clone(), old_logits, 4, tau).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- the method
def test_micro_presets_flags_and_registry():
    assert methods.get_method_class("MICRO") is MiCro
    assert issubclass(MiCro, methods.MiB) and MiCro.presets == methods.MiB.presets  # inherited, not copied
    assert "Rong" in MiCro.paper
    parser = argparse.ArgumentParser()
    MiCro.add_arguments(parser)
    MiCro.add_arguments(parser)
    opts = parser.parse_args([])
    assert (opts.micro_pool, opts.micro_cfrd, opts.micro_tau, opts.micro_contrast, opts.micro_anchors,
            opts.micro_region, opts.micro_pseudo_threshold) == (2, 1.0, 0.1, 0.1, 1024, 0.1, 0.7)
    assert (opts.micro_contrast_temperature, opts.micro_base_temperature, opts.micro_normalize) == \
        (0.1, 0.07, "after_pool")


def test_micro_training_losses_step0_and_step1():
    terms = run_training_losses(MiCro, 0)
    assert set(terms) == {"seg", "contrast"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    terms = run_training_losses(MiCro, 1)
    assert set(terms) == {"seg", "kd", "contrast", "cfrd", "region"}
    assert all(torch.isfinite(v) for v in terms.values())
    # new body/head copied from the old model: both distillation terms vanish
    assert terms["cfrd"].item() == pytest.approx(0.0, abs=1e-9)
    assert terms["region"].item() == pytest.approx(0.0, abs=1e-9)


def test_micro_distillation_terms_positive_when_features_drift():
    old, new = make_step_models()
    with torch.no_grad():
        new.head.weight.add_(0.3 * torch.randn_like(new.head.weight))
    method = MiCro(make_opts(MiCro, micro_pool=1), 1, [3, 1])
    images, labels = random_batch(4)
    labels[(labels > 0) & (labels < 3)] = 0
    terms = method.training_losses(new, old, images, labels)
    assert terms["cfrd"].item() > 1e-4 and terms["region"].item() > 1e-6
    sum(terms.values()).backward()
    assert new.head.weight.grad.abs().sum() > 0


def test_micro_rejects_bad_flags():
    from utils.errors import UserError
    with pytest.raises(UserError, match="--micro_pool"):
        MiCro(make_opts(MiCro, micro_pool=0), 0, [3])
    with pytest.raises(UserError, match="--micro_tau"):
        MiCro(make_opts(MiCro, micro_tau=0.0), 0, [3])
