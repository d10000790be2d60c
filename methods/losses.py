"""Loss functions of the MiB family (docs/methods.md#losses): CE, UnCE, KD, UnKD, BCE, iCaRL (combined and disjoint)
and feature distillation.

Conventions shared by every function:
- logits x are (B, C, H, W); old-model logits x° are (B, C°, H, W) with C° <= C (the first C° channels of
  x are the old classes, background at 0); labels are int64 (B, H, W) with `ignore_index` (255) ignored.
- Computed in the inputs' precision, at least fp32: half/bf16 inputs (autocast) are cast to fp32 first, so
  every softmax and log-sum-exp runs in fp32; fp64 inputs stay fp64 (so formula tests can be tight).
  The result is a scalar of that dtype.
- Per-pixel losses are averaged over ALL B*H*W pixels, ignored ones included with loss 0 (as MiB does;
  the preset loss weights were tuned with this averaging).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.common import IGNORE_INDEX


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The tensors' promoted floating dtype, at least fp32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_old_logits(logits: torch.Tensor, old_logits: torch.Tensor) -> int:
    """Number of old channels C°, checked against the new logits."""
    old_channels = old_logits.shape[1]
    if old_logits.shape[0] != logits.shape[0] or old_logits.shape[2:] != logits.shape[2:]:
        raise ValueError(f"old logits {tuple(old_logits.shape)} do not match new logits {tuple(logits.shape)}")
    if not 1 <= old_channels <= logits.shape[1]:
        raise ValueError(f"old model has {old_channels} channels, new model {logits.shape[1]}: need 1 <= C° <= C")
    return old_channels


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """CE: softmax cross-entropy per pixel, ignored pixels count 0, mean over all pixels."""
    x = logits.to(_compute_dtype(logits))
    per_pixel = F.cross_entropy(x, labels.long(), ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


def unbiased_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, old_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """UnCE (MiB): background means "background or any old class".

    log p(bg) = logsumexp(x[:, :C°]) - logsumexp(x), log p(c) = x_c - logsumexp(x) for new c; labels below
    C° become 0 (on a copy). `old_classes` <= 1 (step 0, or only the background is old) gives plain CE:
    the background group is channel 0 alone.
    """
    x = logits.to(_compute_dtype(logits))
    old_classes = max(int(old_classes), 1)
    if old_classes > x.shape[1]:
        raise ValueError(f"old_classes={old_classes} exceeds the {x.shape[1]} logit channels")
    den = torch.logsumexp(x, dim=1, keepdim=True)
    log_p_background = torch.logsumexp(x[:, :old_classes], dim=1, keepdim=True) - den
    # Channels 1..C°-1 keep their own log-probabilities but no label points at them after the remap.
    log_probs = torch.cat([log_p_background, x[:, 1:] - den], dim=1)
    labels = labels.long()
    target = torch.where(labels < old_classes, torch.zeros_like(labels), labels)  # a copy: caller's labels intact
    per_pixel = F.nll_loss(log_probs, target, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


def knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """KD (LWF, ILT): -mean_pixels (1/C°) sum_c softmax(alpha x°)_c log_softmax(x[:, :C°])_c."""
    old_channels = _check_old_logits(logits, old_logits)
    dtype = _compute_dtype(logits, old_logits)
    log_p = torch.log_softmax(logits[:, :old_channels].to(dtype), dim=1)
    q = torch.softmax(alpha * old_logits.to(dtype), dim=1)
    return -(q * log_p).mean(dim=1).mean()


def unbiased_knowledge_distillation(
    logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """UnKD (MiB): the old background is matched by "background or any new class".

    log p(bg) = logsumexp(x[:, {0} ∪ new]) - logsumexp(x), log p(c) = x_c - logsumexp(x) for old c >= 1;
    L = -mean_pixels (1/C°)[q_0 log p(bg) + sum_{c>=1} q_c log p(c)], q = softmax(alpha x°).
    Works for any number of new classes (one, or none).
    """
    old_channels = _check_old_logits(logits, old_logits)
    dtype = _compute_dtype(logits, old_logits)
    x = logits.to(dtype)
    den = torch.logsumexp(x, dim=1)
    background_or_new = torch.cat([x[:, :1], x[:, old_channels:]], dim=1)
    log_p_background = torch.logsumexp(background_or_new, dim=1) - den  # (B, H, W)
    log_p_old = x[:, 1:old_channels] - den.unsqueeze(1)  # (B, C°-1, H, W)
    q = torch.softmax(alpha * old_logits.to(dtype), dim=1)
    per_pixel = (q[:, 0] * log_p_background + (q[:, 1:] * log_p_old).sum(dim=1)) / old_channels
    return -per_pixel.mean()


def bce_with_onehot(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """BCE (LWF-MC, --bce): sum over channels of BCE(x_c, onehot(y)_c) per pixel, 0 on ignored pixels, mean over
    all pixels."""
    x = logits.to(_compute_dtype(logits))
    labels = labels.long()
    channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    onehot = (labels.unsqueeze(1) == channel).to(x.dtype)  # an ignored pixel matches no channel
    per_pixel = F.binary_cross_entropy_with_logits(x, onehot, reduction="none").sum(dim=1)
    valid = (labels != ignore_index).to(x.dtype)
    return (per_pixel * valid).mean()


def icarl_distillation(logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """iCaRL distillation (LWF-MC, t > 0): C° * mean BCE(x[:, :C°], sigmoid(x°)).

    Multiplying the element mean by C° sums the old classes' contributions per pixel; the
    icarl_importance weight is applied by the caller.
    """
    old_channels = _check_old_logits(logits, old_logits)
    dtype = _compute_dtype(logits, old_logits)
    soft_targets = torch.sigmoid(old_logits.to(dtype))
    bce = F.binary_cross_entropy_with_logits(logits[:, :old_channels].to(dtype), soft_targets, reduction="mean")
    return old_channels * bce


def icarl_disjoint(
    logits: torch.Tensor,
    old_logits: torch.Tensor,
    labels: torch.Tensor,
    background_from_labels: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """iCaRL as one loss (LWF-MC with --icarl_disjoint, t > 0; replaces the segmentation loss).

    Per pixel Σ_c BCE(x_c, t_c) with targets t = onehot(y) on the new channels and sigmoid(x°) on the old
    ones; with `background_from_labels` (--icarl_bkg) the background channel keeps its one-hot label and
    only channels 1..C°-1 take sigmoid(x°). Ignored pixels count 0; mean over all pixels.
    """
    old_channels = _check_old_logits(logits, old_logits)
    dtype = _compute_dtype(logits, old_logits)
    x = logits.to(dtype)
    labels = labels.long()
    channel = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    onehot = (labels.unsqueeze(1) == channel).to(dtype)
    first_soft = 1 if background_from_labels else 0
    soft = torch.sigmoid(old_logits[:, first_soft:].to(dtype))
    targets = torch.cat([onehot[:, :first_soft], soft, onehot[:, old_channels:]], dim=1)
    per_pixel = F.binary_cross_entropy_with_logits(x, targets, reduction="none").sum(dim=1)
    valid = (labels != ignore_index).to(dtype)
    return (per_pixel * valid).mean()


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """ILT feature distillation: mean((b - b°)^2) (loss_de is applied by the caller)."""
    if features.shape != old_features.shape:
        raise ValueError(f"features {tuple(features.shape)} and old features {tuple(old_features.shape)} differ")
    dtype = _compute_dtype(features, old_features)
    return (features.to(dtype) - old_features.to(dtype)).pow(2).mean()
