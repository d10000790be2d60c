"""Rotation/flip invariance ("contrastive distillation") of MiB-CD: the 8 symmetries of the square and
the invariance losses on `pre_logits`. Any method uses them through --cd_factor / --cd_factor_icl.

Paper: Arnaudo, Cermelli, Tavera, Rossi, Caputo, "A Contrastive Distillation Approach for Incremental
Semantic Segmentation in Aerial Images", ICIAP 2021 (docs/methods.md#mib-cd).
"""
from __future__ import annotations

import torch

from methods.common import at_least_fp32

NUM_SYMMETRIES = 8  # the dihedral group of the square: 4 rotations, each optionally mirrored


def _check_index(index: int) -> tuple[int, bool]:
    if not 0 <= int(index) < NUM_SYMMETRIES:
        raise ValueError(f"symmetry index must be in 0..{NUM_SYMMETRIES - 1}, got {index}")
    return int(index) % 4, int(index) >= 4


def apply_symmetry(t: torch.Tensor, index: int) -> torch.Tensor:
    """T_index on the last two dims: rotate by k·90° (k = index % 4, counter-clockwise from dim -2
    to dim -1), then mirror left-right when index >= 4. Works for images, labels and feature maps."""
    k, flipped = _check_index(index)
    out = torch.rot90(t, k, dims=(-2, -1)) if k else t
    return out.flip(-1) if flipped else out


def invariance_losses(
    pre_logits_all: torch.Tensor,
    old_pre_logits: torch.Tensor | None,
    index: int,
    batch_size: int,
    cd_factor: float,
    cd_factor_icl: float,
) -> dict[str, torch.Tensor]:
    """Invariance terms for a batch doubled as [x; T(x)] (first `batch_size` rows are f(x)).

    cd     = cd_factor     · mean((T(f(x)) − f(T(x)))²)   gradients through both halves
    cd_icl = cd_factor_icl · mean((f(T(x)) − T(f°(x)))²)  only with old features (t > 0)
    A term whose factor is 0 is left out. Computed in at least fp32 (autocast may give bf16/fp16 features).
    """
    features = at_least_fp32(pre_logits_all)
    plain, transformed = features[:batch_size], features[batch_size:]
    terms = {}
    if cd_factor > 0:
        terms["cd"] = cd_factor * (apply_symmetry(plain, index) - transformed).pow(2).mean()
    if old_pre_logits is not None and cd_factor_icl > 0:
        old_transformed = apply_symmetry(at_least_fp32(old_pre_logits), index)
        terms["cd_icl"] = cd_factor_icl * (transformed - old_transformed).pow(2).mean()
    return terms
