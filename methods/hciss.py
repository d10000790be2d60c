"""HCISS: historical-information-guided CISS (label reconstruction + feature global perception),
a reconstruction of Rong et al., IEEE TGRS 2022 from its published description (docs/methods.md#hciss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import Method, StepContext
from methods.common import at_least_fp32, reconstruct_labels


def old_foreground_attention(old_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A = 1 − p°(background) [B, 1, h, w], brought to `size` by adaptive average pooling (area
    average: each feature cell gets the mean old-foreground probability of the pixels it covers)."""
    foreground = 1.0 - torch.softmax(at_least_fp32(old_logits), dim=1)[:, :1]
    return F.adaptive_avg_pool2d(foreground, size)


def feature_global_perception_loss(
    body: torch.Tensor, old_body: torch.Tensor, old_logits: torch.Tensor
) -> torch.Tensor:
    """L_fgp = Σ A·mean_ch (b − b°)² / (Σ A + 1e-6) + mean((GAP(b) − GAP(b°))²), sums over the batch.

    body, old_body [B, K, h, w]; old_logits [B, C°, H, W] (any size: the attention is pooled to h×w)."""
    body, old_body = at_least_fp32(body), at_least_fp32(old_body)
    attention = old_foreground_attention(old_logits, body.shape[-2:])  # no grad: old model only
    local = (body - old_body).pow(2).mean(dim=1, keepdim=True)
    local_term = (attention * local).sum() / (attention.sum() + 1e-6)
    global_term = (body.mean(dim=(2, 3)) - old_body.mean(dim=(2, 3))).pow(2).mean()
    return local_term + global_term


class HCISS(Method):
    """Label reconstruction (plain CE on labels where confident old predictions fill the background)
    + attention-weighted body-feature distillation with a global-context term + MiB's UnKD ×10 and
    balanced initialisation. Step 0 is plain CE.

    A reconstruction: no code was published. Free choices, all flags: the confidence threshold
    (--hciss_threshold), the loss weight (--hciss_fgp); the attention is brought to the body
    resolution by adaptive average pooling; distillation is on `body` (backbone output)."""

    name = "HCISS"
    summary = "label reconstruction from confident old predictions + attention-weighted feature distillation + UnKD"
    paper = (
        "Rong et al., Historical Information-Guided Class-Incremental Semantic Segmentation in Remote "
        "Sensing Images, IEEE TGRS 2022 (reconstruction: no code published)"
    )
    presets = {"loss_kd": 10.0, "unkd": True, "unce": False, "init_balanced": True}
    own_terms_read_old_model = True  # their own terms read it at t > 0

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = cls.argument_group_once(parser, "--hciss_threshold", "HCISS",
                                        "HCISS reconstruction (docs/methods.md#hciss-flags)")
        if group is None:
            return
        group.add_argument("--hciss_threshold", type=float, default=0.7,
                           help="old-model confidence needed to relabel a background pixel with its old class (0.7)")
        group.add_argument("--hciss_fgp", type=float, default=100.0,
                           help="weight of the feature global perception loss (100; 0 disables it)")

    @classmethod
    def step0_terms(cls, options) -> dict:
        return super().step0_terms(options)  # both HCISS terms need the old model: step 0 is the base's

    def target_labels(self, labels: torch.Tensor, old_logits: torch.Tensor | None) -> torch.Tensor:
        if self.step == 0:
            return labels
        return reconstruct_labels(labels, old_logits, self.options.hciss_threshold)

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if ctx.old_features is None or ctx.old_logits is None or self.options.hciss_fgp <= 0:
            return {}
        loss = feature_global_perception_loss(ctx.features["body"], ctx.old_features["body"], ctx.old_logits)
        return {"fgp": self.options.hciss_fgp * loss}
