"""Symmetries of the square, the MiB-CD invariance losses and the MiB-CD method. Also holds the tiny
fake segmentation model and option builder used by the HCISS and MiCro integration tests."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
from methods.invariance import NUM_SYMMETRIES, apply_symmetry, invariance_losses
from methods.mib_cd import MiBCD


# ---------------------------------------------------------------- shared helpers
class TinySegModel(nn.Module):
    """Returns (logits at the input size, {"body", "pre_logits"}) like the real model, stride 4."""

    def __init__(self, num_classes: int, body_channels: int = 8, feature_channels: int = 6):
        super().__init__()
        self.body = nn.Conv2d(3, body_channels, 3, stride=4, padding=1)
        self.head = nn.Conv2d(body_channels, feature_channels, 1)
        self.cls = nn.Conv2d(feature_channels, num_classes, 1)

    def forward(self, images):
        body = F.relu(self.body(images))
        pre_logits = self.head(body)
        logits = F.interpolate(self.cls(pre_logits), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits, {"body": body, "pre_logits": pre_logits}


MIB_DEFAULTS = dict(
    loss_kd=0.0, loss_de=0.0, unce=False, unkd=False, alpha=1.0, init_balanced=False, icarl=False,
    icarl_importance=1.0, regularizer=None, reg_importance=1.0, reg_alpha=0.9, reg_no_normalize=False,
    reg_iterations=10, random_seed=42, cd_factor=0.0, cd_factor_icl=0.0, bce=False, icarl_disjoint=False,
    icarl_bkg=False, reg_update_after_step=False,
)


def make_opts(method_cls, **overrides) -> argparse.Namespace:
    """Shared defaults + every method's flags + the method's presets + explicit overrides."""
    parser = argparse.ArgumentParser()
    for cls in methods.METHODS.values():
        cls.add_arguments(parser)
    opts = parser.parse_args([])
    vars(opts).update(MIB_DEFAULTS)
    vars(opts).update(method_cls.presets)
    vars(opts).update(overrides)
    return opts


def make_step_models(seed: int = 0, old_classes: int = 3, new_classes: int = 1):
    """(old model with C° outputs, new model with C° + new outputs initialised from the old one)."""
    torch.manual_seed(seed)
    old = TinySegModel(old_classes).eval()
    new = TinySegModel(old_classes + new_classes)
    new.body.load_state_dict(old.body.state_dict())
    new.head.load_state_dict(old.head.state_dict())
    with torch.no_grad():
        new.cls.weight[:old_classes] = old.cls.weight
        new.cls.bias[:old_classes] = old.cls.bias
    for p in old.parameters():
        p.requires_grad_(False)
    return old, new


def random_batch(num_classes: int, batch: int = 2, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    labels = torch.randint(0, num_classes, (batch, size, size), generator=g)
    labels[torch.rand(batch, size, size, generator=g) < 0.1] = 255
    return images, labels


def run_training_losses(method_cls, step: int, **overrides):
    """training_losses of a method at step 0 (3 classes) or step 1 (3 old + 1 new), summed & backpropagated."""
    old, new = make_step_models()
    opts = make_opts(method_cls, **overrides)
    if step == 0:
        model, old_model, classes = TinySegModel(3), None, [3]
        images, labels = random_batch(3)
    else:
        model, old_model, classes = new, old, [3, 1]
        images, labels = random_batch(4)
        labels[(labels > 0) & (labels < 3)] = 0  # training labels of step 1: old classes are background
    method = method_cls(opts, step, classes)
    terms = method.training_losses(model, old_model, images, labels)
    total = sum(terms.values())
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    return terms


# ---------------------------------------------------------------- symmetries
def test_symmetries_match_numpy_reference():
    t = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for index in range(NUM_SYMMETRIES):
        expected = np.rot90(t.numpy(), index % 4, axes=(-2, -1))
        if index >= 4:
            expected = np.flip(expected, axis=-1)
        assert torch.equal(apply_symmetry(t, index), torch.from_numpy(expected.copy()))


def test_rotations_have_order_four():
    t = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for index in range(4):
        out = t
        for _ in range(4):
            out = apply_symmetry(out, index)
        assert torch.equal(out, t)
        if index:
            assert not torch.equal(apply_symmetry(t, index), t)


def test_eight_symmetries_are_distinct_on_a_generic_tensor():
    t = torch.randn(1, 4, 4, dtype=torch.float64)
    images = [apply_symmetry(t, i) for i in range(NUM_SYMMETRIES)]
    for i in range(NUM_SYMMETRIES):
        for j in range(i + 1, NUM_SYMMETRIES):
            assert not torch.equal(images[i], images[j]), (i, j)
    with pytest.raises(ValueError):
        apply_symmetry(t, 8)


def test_images_and_labels_transform_consistently():
    labels = torch.randint(0, 6, (2, 8, 8))
    labels[0, 0, :3] = 255
    images = torch.stack([labels.float() * 10, -labels.float(), torch.randn(2, 8, 8)], dim=1)  # [B, 3, H, W]
    for index in range(NUM_SYMMETRIES):
        out_images, out_labels = apply_symmetry(images, index), apply_symmetry(labels, index)
        assert torch.equal(out_images[:, 0], out_labels.float() * 10)
        assert torch.equal(out_images[:, 1], -out_labels.float())


# ---------------------------------------------------------------- invariance losses
def _equivariant_features(x, weight_1x1, centre, edge, corner):
    """1x1 conv then a depthwise 3x3 kernel invariant under the 8 symmetries: equivariant by construction."""
    features = F.conv2d(x, weight_1x1)
    kernel = torch.tensor([[corner, edge, corner], [edge, centre, edge], [corner, edge, corner]], dtype=x.dtype)
    kernel = kernel.expand(features.shape[1], 1, 3, 3)
    return F.conv2d(features, kernel, padding=1, groups=features.shape[1])


def test_invariance_is_zero_for_an_equivariant_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    weight = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    for index in range(NUM_SYMMETRIES):
        features = _equivariant_features(torch.cat([x, apply_symmetry(x, index)]), weight, 0.5, -0.3, 0.2)
        old = _equivariant_features(x, weight, 0.5, -0.3, 0.2)
        terms = invariance_losses(features, old, index, 2, cd_factor=1.0, cd_factor_icl=1.0)
        assert set(terms) == {"cd", "cd_icl"}
        assert terms["cd"].item() < 1e-25 and terms["cd_icl"].item() < 1e-25


def test_invariance_is_positive_for_a_non_equivariant_model_and_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    old_conv = nn.Conv2d(3, 4, 3, padding=1).double()
    for index in range(NUM_SYMMETRIES):
        features = conv(torch.cat([x, apply_symmetry(x, index)]))
        old = old_conv(x).detach()
        terms = invariance_losses(features, old, index, 2, cd_factor=0.1, cd_factor_icl=0.3)
        # direct re-computation with numpy rotations
        plain, rotated = features[:2].detach().numpy(), features[2:].detach().numpy()
        def sym(a, index=index):
            a = np.rot90(a, index % 4, axes=(-2, -1))
            return np.flip(a, axis=-1) if index >= 4 else a
        assert terms["cd"].item() == pytest.approx(0.1 * np.mean((sym(plain) - rotated) ** 2), rel=1e-12)
        assert terms["cd_icl"].item() == pytest.approx(0.3 * np.mean((rotated - sym(old.numpy())) ** 2), rel=1e-12)
        assert terms["cd_icl"].item() > 0
        if index == 0:
            assert terms["cd"].item() == 0.0
        else:
            assert terms["cd"].item() > 1e-4


def test_invariance_gradients_flow_through_both_halves_and_zero_factors_skip_terms():
    features = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    terms = invariance_losses(features, None, 1, 2, cd_factor=1.0, cd_factor_icl=1.0)
    assert set(terms) == {"cd"}  # no old features: no cd_icl
    terms["cd"].backward()
    assert features.grad[:2].abs().sum() > 0 and features.grad[2:].abs().sum() > 0
    assert invariance_losses(features, features[:2], 1, 2, cd_factor=0.0, cd_factor_icl=0.0) == {}
    assert set(invariance_losses(features, features[:2], 1, 2, cd_factor=0.0, cd_factor_icl=1.0)) == {"cd_icl"}


# ---------------------------------------------------------------- MiB-CD method
def test_mibcd_registry_presets_and_no_extra_flags():
    assert methods.get_method_class("MiB-CD") is MiBCD
    assert methods.get_method_class("mib-cd") is MiBCD
    assert MiBCD.presets == {**methods.MiB.presets, "cd_factor": 0.1, "cd_factor_icl": 0.1}
    assert MiBCD.name == "MiB-CD" and "Arnaudo" in MiBCD.paper and issubclass(MiBCD, methods.Method)
    parser = argparse.ArgumentParser()
    MiBCD.add_arguments(parser)
    assert parser.parse_args([]) == argparse.Namespace()
    # every registered method's flags can be added to one parser, twice, without a clash
    parser = argparse.ArgumentParser()
    for _ in range(2):
        for cls in methods.METHODS.values():
            cls.add_arguments(parser)


def test_mibcd_training_losses_step0_and_step1():
    terms = run_training_losses(MiBCD, 0)
    assert set(terms) == {"seg", "cd"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    terms = run_training_losses(MiBCD, 1)
    assert set(terms) == {"seg", "kd", "cd", "cd_icl"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
