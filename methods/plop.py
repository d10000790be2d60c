"""PLOP (Douillard et al., CVPR 2021): Local POD distillation of multi-scale features, entropy-thresholded
pseudo-labels from the old model and an adaptive factor on the segmentation loss (docs/methods.md#plop).

Everything acts at t > 0; step 0 is plain cross-entropy, so PLOP shares FT's step 0 in a campaign.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.base import Method, SetupContext, StepContext
from methods.common import IGNORE_INDEX, at_least_fp32
from utils.distributed import all_reduce_sum
from utils.errors import UserError

ENTROPY_BINS = 100
POD_SCALES = (1, 2, 4)
# the maps Local POD distils: each stage before its last activation, the head output, the small logits
POD_FEATURES = ("stage1_preact", "stage2_preact", "stage3_preact", "stage4_preact", "pre_logits")
POD_LOGITS = "logits_small"


# ---------------------------------------------------------------------------------------------- entropy
def normalized_entropy(probs: torch.Tensor, total_classes: int) -> torch.Tensor:
    """u per pixel [B, H, W] from old-model probabilities [B, C°, H, W]: −(1/ln C°)·mean_c p_c ln(p_c + 1e-8),
    divided again by ln(N_tot) as the authors' code does (N_tot = every class of the step, background
    included)."""
    entropy = -(probs * torch.log(probs + 1e-8)).mean(dim=1) / math.log(probs.shape[1])
    return entropy / math.log(total_classes)


def old_predictions(old_logits: torch.Tensor, total_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, u): the old model's argmax class and normalised entropy per pixel."""
    probs = torch.softmax(at_least_fp32(old_logits), dim=1)
    return probs.argmax(dim=1), normalized_entropy(probs, total_classes)


def entropy_histogram(old_logits: torch.Tensor, labels: torch.Tensor, total_classes: int,
                      bins: int = ENTROPY_BINS) -> torch.Tensor:
    """hist[ŷ, min(⌊bins·u⌋, bins−1)] over the pixels labelled background: [total_classes, bins] int64."""
    predicted, uncertainty = old_predictions(old_logits, total_classes)
    background = labels == 0
    bin_index = (uncertainty[background] * bins).long().clamp(max=bins - 1)
    cell = predicted[background] * bins + bin_index
    return torch.bincount(cell, minlength=total_classes * bins).view(total_classes, bins)


def _authors_bin_index(bins: int) -> torch.Tensor:
    """int(k / bins · bins) as the authors' loop computes it in floating point: for 100 bins it is k − 1 at
    k = 29, 57, 58 (0.29·100 = 28.999...), so their median reads the count of the bin below."""
    return torch.tensor([int(k / bins * bins) for k in range(bins)])


def histogram_medians(hist: torch.Tensor, authors: bool = True) -> torch.Tensor:
    """Per-class median of the normalised entropy from its histogram [C, bins] (float64 [C]).

    Scanning k = 0..bins−1 with run = 0, stop at the first k with run ≤ n/2 ≤ run + hist[k] (else k is the
    last bin) and interpolate: median = k/bins + (n/2 − run)/hist[k]·(1/bins); a class without pixels gets 0.
    authors=True reproduces the authors' code: run grows by the bin index k instead of the bin count, so
    run = k(k−1)/2 before bin k (4950 after a scan of 100 bins that never stopped), and hist[k] is read at
    int(k/bins·bins) (see `_authors_bin_index`). A zero count in the interpolation gives ±inf or nan there as
    it does in their code. authors=False is the true interpolated median (cumulative counts)."""
    counts = hist.double()
    classes, bins = counts.shape
    k = torch.arange(bins, dtype=torch.float64)
    if authors:
        read = counts[:, _authors_bin_index(bins)]
        run_before = (k * (k - 1) / 2).expand(classes, bins)
        run_after_scan = torch.full((classes,), bins * (bins - 1) / 2, dtype=torch.float64)
    else:
        read = counts
        run_before = counts.cumsum(dim=1) - counts
        run_after_scan = counts.sum(dim=1)
    total = counts.sum(dim=1)
    half = (total / 2).unsqueeze(1)
    hit = (run_before <= half) & (half <= run_before + read)
    found = hit.any(dim=1)
    first = hit.to(torch.int64).argmax(dim=1)
    stop = torch.where(found, first, torch.full_like(first, bins - 1))
    run = torch.where(found, run_before.gather(1, first[:, None])[:, 0], run_after_scan)
    count = read.gather(1, stop[:, None])[:, 0]
    median = stop.double() / bins + (half[:, 0] - run) / count * (1.0 / bins)
    return torch.where(total > 0, median, torch.zeros_like(median))


def entropy_thresholds(hist: torch.Tensor, threshold: float, authors: bool = True) -> torch.Tensor:
    """τ_c = max(median_c, threshold); torch.maximum keeps a nan median nan (no pseudo-label of that class
    passes), as Python's max in the authors' code does."""
    medians = histogram_medians(hist, authors=authors)
    return torch.maximum(medians, torch.tensor(float(threshold), dtype=medians.dtype))


def pseudo_labels(labels: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor,
                  total_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, adaptive factor per image). Background pixels M take the old prediction ŷ where its entropy
    u < τ[ŷ] (V; ŷ may be 0) and become 255 elsewhere; other pixels keep their label. The factor is
    |M∧V| / (|M| + 1e-6) per image (0 for an image without background)."""
    with torch.no_grad():
        predicted, uncertainty = old_predictions(old_logits, total_classes)
        background = labels == 0
        valid = uncertainty < thresholds.to(uncertainty.device, uncertainty.dtype)[predicted]
        out = torch.where(background & valid, predicted.to(labels.dtype), labels)
        out = torch.where(background & ~valid, torch.full_like(labels, IGNORE_INDEX), out)
        kept = (background & valid).flatten(1).sum(dim=1).to(uncertainty.dtype)
        factor = kept / (background.flatten(1).sum(dim=1).to(uncertainty.dtype) + 1e-6)
    return out, factor


def adaptive_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """CE over all channels (ignore 255, per pixel) × the image's factor, mean over all B·H·W pixels."""
    x = at_least_fp32(logits)
    per_pixel = F.cross_entropy(x, labels.long(), ignore_index=IGNORE_INDEX, reduction="none")
    return (per_pixel * factor.to(x.dtype).view(-1, 1, 1)).mean()


# ---------------------------------------------------------------------------------------------- Local POD
def fold_logits(new_logits: torch.Tensor, old_channels: int) -> torch.Tensor:
    """The new model's logits on the old model's channels: background := bg + Σ new-class logits (raw
    logits, not probabilities); old channels unchanged."""
    background = new_logits[:, :1] + new_logits[:, old_channels:].sum(dim=1, keepdim=True)
    return torch.cat([background, new_logits[:, 1:old_channels]], dim=1)


def local_pod_embedding(feature_map: torch.Tensor, scales=POD_SCALES) -> torch.Tensor:
    """Φ(m) [B, D]: m squared element-wise; per scale s, k = W // s for both axes (remainder dropped), per
    region in row-major order the mean over width (C·k values) then the mean over height (C·k values)."""
    x = at_least_fp32(feature_map).pow(2)
    batch, width = x.shape[0], x.shape[-1]
    parts = []
    for scale in scales:
        k = width // scale
        # [B, C, s, k, s, k]: region (i, j) = rows i·k.., columns j·k..
        regions = x[..., : scale * k, : scale * k].unflatten(-1, (scale, k)).unflatten(-3, (scale, k))
        regions = regions.permute(0, 2, 4, 1, 3, 5)  # [B, s(i), s(j), C, k(rows), k(cols)]
        over_width = regions.mean(dim=-1)  # [B, s, s, C, k]
        over_height = regions.mean(dim=-2)
        parts.append(torch.stack([over_width, over_height], dim=3).reshape(batch, -1))
    return torch.cat(parts, dim=1)


def local_pod(new_map: torch.Tensor, old_map: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm (not squared) of Φ(old) − Φ(new), averaged over the batch."""
    return (local_pod_embedding(old_map) - local_pod_embedding(new_map)).norm(dim=1).mean()


def pod_loss(features: dict, old_features: dict, classes: list[int], feature_factor: float,
             logits_factor: float, use_logits: bool = True) -> torch.Tensor:
    """L_POD = Σ over the maps of λ_map · sqrt(N_tot / N_new) · local_pod, divided by the number of maps
    (five feature maps at λ = feature_factor, the folded small logits at λ = logits_factor)."""
    adaptive = math.sqrt(sum(classes) / classes[-1])
    terms = [feature_factor * local_pod(features[name], old_features[name]) for name in POD_FEATURES]
    if use_logits:
        old_logits = old_features[POD_LOGITS]
        folded = fold_logits(features[POD_LOGITS], old_logits.shape[1])
        terms.append(logits_factor * local_pod(folded, old_logits))
    return adaptive * torch.stack(terms).sum() / len(terms)


# ---------------------------------------------------------------------------------------------- method
class PLOP(Method):
    """At t > 0: entropy thresholds from a pre-pass of the old model over the training data (`setup`),
    pseudo-labels of background pixels (`target_labels`), CE × adaptive factor (`segmentation_loss`) and
    Local POD on six maps (`extra_losses`). init_balanced as in the authors' recipe."""

    name = "PLOP"
    summary = "Local POD multi-scale distillation + entropy pseudo-labels + adaptive CE factor"
    paper = ("Douillard et al., PLOP: Learning without Forgetting for Continual Semantic Segmentation, "
             "CVPR 2021")
    presets = {"init_balanced": True}
    own_terms_read_old_model = True

    @classmethod
    def step0_terms(cls, options) -> dict:
        return super().step0_terms(options)  # nothing of PLOP acts at step 0: FT's step 0 (and campaign sharing)

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = cls.argument_group_once(parser, "--pod_factor", "PLOP", "PLOP (docs/methods.md#plop)")
        if group is None:
            return
        group.add_argument("--pod_factor", type=float, default=0.01,
                           help="Local POD weight of the five feature maps (0.01; ADE recipe 0.001)")
        group.add_argument("--pod_logits_factor", type=float, default=0.0005,
                           help="Local POD weight of the logits map (0.0005; ADE recipe 1e-5); 0 leaves it out")
        group.add_argument("--pseudo_threshold", type=float, default=0.001,
                           help="lower bound of the per-class entropy thresholds of PLOP's pseudo-labels (0.001)")
        group.add_argument("--plop_median", choices=["authors", "corrected"], default="authors",
                           help="per-class entropy median as the authors' code computes it (default; see "
                                "docs/fidelity.md#plop-median) or the corrected interpolated median")
        group.add_argument("--plop_no_adaptive_factor", action="store_true", default=False,
                           help="plain CE on the pseudo-labels, without PLOP's per-image adaptive factor")

    @classmethod
    def validate(cls, options, step=None) -> None:
        super().validate(options, step)
        if options.pod_factor < 0 or options.pod_logits_factor < 0:
            raise UserError("--pod_factor and --pod_logits_factor must be >= 0")
        if not 0 <= options.pseudo_threshold < 1:
            raise UserError(f"--pseudo_threshold must be in [0, 1) (a normalised entropy), "
                            f"got {options.pseudo_threshold}")
        if options.unce or options.bce or options.icarl:
            raise UserError("PLOP trains with cross-entropy on its pseudo-labels; drop --unce/--bce/--icarl")

    def __init__(self, options, step, classes):
        super().__init__(options, step, classes)
        self.total_classes = sum(self.classes)
        self.thresholds = None  # τ per class (t > 0, from `setup`)
        self.histogram = None  # the pre-pass's entropy histogram, summed over ranks
        self.adaptive_factor = None  # per image of the batch `target_labels` labelled last

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        if self.step == 0 or ctx.old_model is None:
            return
        hist = None
        with torch.no_grad():
            for images, labels in ctx.batches():
                part = entropy_histogram(ctx.old_model(images).logits, labels, self.total_classes)
                hist = part if hist is None else hist + part
        device = ctx.dist.device if ctx.dist is not None else torch.device("cpu")
        if hist is None:
            hist = torch.zeros(self.total_classes, ENTROPY_BINS, dtype=torch.int64, device=device)
        # the original kept one histogram per rank; summed here, every rank uses the same thresholds
        hist = all_reduce_sum(hist)
        self.histogram = hist.cpu()
        self.thresholds = entropy_thresholds(self.histogram, self.options.pseudo_threshold,
                                             authors=self.options.plop_median == "authors").to(device)
        ctx.model.return_pre_activations()  # Local POD reads the stages before their last activation
        ctx.old_model.return_pre_activations()

    def target_labels(self, labels, old_logits):
        if self.step == 0 or old_logits is None:
            return labels
        labels, self.adaptive_factor = pseudo_labels(labels, old_logits, self.thresholds, self.total_classes)
        return labels

    def segmentation_loss(self, logits, labels):
        if self.step == 0 or self.adaptive_factor is None or self.options.plop_no_adaptive_factor:
            return super().segmentation_loss(logits, labels)
        factor = self.adaptive_factor
        if logits.shape[0] != factor.shape[0]:  # [x; T(x)] under --cd_factor: the same images twice
            factor = factor.repeat(logits.shape[0] // factor.shape[0])
        return adaptive_cross_entropy(logits, labels, factor)

    def extra_losses(self, ctx: StepContext):
        if ctx.old_features is None:
            return {}
        use_logits = self.options.pod_logits_factor > 0
        return {"pod": pod_loss(ctx.features, ctx.old_features, self.classes, self.options.pod_factor,
                                self.options.pod_logits_factor, use_logits=use_logits)}

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.thresholds is not None:  # for the record: what the pseudo-labels used
            state["plop_thresholds"] = self.thresholds.cpu()
        return state


class PLOPEWF(PLOP):
    name = "PLOP+EWF"
    summary = "PLOP + endpoints weight fusion after each step, old classifiers frozen (--ewf)"
    paper = "Xiao et al., Endpoints Weight Fusion for Class Incremental Semantic Segmentation, CVPR 2023"
    presets = {**PLOP.presets, "ewf": True}
