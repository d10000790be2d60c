"""Helpers several methods share: the ignore label, fp32 promotion, label reconstruction from the old model."""
from __future__ import annotations

import torch

from dataset.colormap import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "at_least_fp32", "reconstruct_labels"]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 (autocast) -> fp32, so softmaxes and squared errors run in fp32; fp64 is kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def reconstruct_labels(labels: torch.Tensor, old_logits: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """Give background pixels back the old class the old model is confident about (HCISS's label
    reconstruction, MiCro's pseudo-labels; docs/methods.md#label-reconstruction).

    labels [B, H, W] (255 = ignore), old_logits [B, C°, H, W] at the same size. A pixel labelled 0
    whose old argmax c is an old foreground class (c >= 1) with softmax probability >= threshold is
    relabelled c; every other pixel (current classes, 255, uncertain or old-background pixels) is
    kept. Returns a new tensor; `labels` is not modified. Without old logits, returns `labels`.
    """
    if old_logits is None:
        return labels
    if old_logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"old logits {tuple(old_logits.shape)} and labels {tuple(labels.shape)} differ in size")
    with torch.no_grad():
        confidence, old_class = torch.softmax(at_least_fp32(old_logits), dim=1).max(dim=1)
        relabel = (labels == 0) & (old_class > 0) & (confidence >= threshold)
        return torch.where(relabel, old_class.to(labels.dtype), labels)
