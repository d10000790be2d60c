"""MiCro: cross-image semantic relationship dependencies (CFRD, cross-image pixel contrast, region
relation distillation) on top of MiB, a reconstruction of Rong et al., IEEE TGRS 2023 from its
published description (docs/methods.md#micro). Every loss is one batched computation over the whole batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.base import StepContext
from methods.common import IGNORE_INDEX, at_least_fp32, reconstruct_labels
from methods.mib_family import MiB
from utils.errors import UserError
from utils.options import Role

# The pixel contrast acts from step 0: its options are counted in the step-0 signature when it is on.
CONTRAST_AT_STEP0 = Role(step0="micro_contrast")


# ---------------------------------------------------------------- feature grid
def prepare_features(pre_logits: torch.Tensor, pool: int, normalize: str = "after_pool") -> torch.Tensor:
    """[B, D, h, w] -> (at least fp32) [B, D, ⌈h/pool⌉, ⌈w/pool⌉]: average-pooled by `pool` and L2-normalised per
    pixel. normalize='after_pool' (default) pools then normalises, so every grid vector has unit norm
    and F_a F_bᵀ are cosine similarities; 'before_pool' normalises per pixel first (norms <= 1)."""
    features = at_least_fp32(pre_logits)
    if normalize == "before_pool":
        features = F.normalize(features, dim=1)
    if pool > 1:
        features = F.avg_pool2d(features, kernel_size=pool, stride=pool, ceil_mode=True)
    if normalize == "after_pool":
        features = F.normalize(features, dim=1)
    elif normalize != "before_pool":
        raise ValueError(f"normalize must be 'after_pool' or 'before_pool', got {normalize!r}")
    return features


def downsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour label map [B, H, W] -> [B, h, w] (the pixel nearest each cell's centre)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    down = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return down[:, 0].to(labels.dtype)


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """[B, D, h, w] -> [B·h·w, D] in the order of labels.reshape(-1)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def _kl_from_logits(old_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Σ_last softmax(old)·(log softmax(old) − log softmax(new)), per row."""
    log_q = torch.log_softmax(old_logits, dim=-1)
    log_p = torch.log_softmax(new_logits, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


# ---------------------------------------------------------------- CFRD
def cfrd_loss(feat: torch.Tensor, old_feat: torch.Tensor, tau: float) -> torch.Tensor:
    """Cross-image feature relationship distillation.

    feat, old_feat [B, D, h, w]. For every ordered pair (a, b) of images (a = b included) and every
    pixel i of a, the distribution over the pixels j of b, softmax_j(F_a F_bᵀ / τ), of the new model
    must match the old one: KL(old ‖ new) averaged over the rows and the B² pairs. One einsum builds
    the [B, P, B, P] similarities of all pairs at once."""
    new = feat.flatten(2).transpose(1, 2)  # [B, P, D]
    old = old_feat.flatten(2).transpose(1, 2).detach()
    new_sim = torch.einsum("aid,bjd->aibj", new, new) / tau
    old_sim = torch.einsum("aid,bjd->aibj", old, old) / tau
    return _kl_from_logits(old_sim, new_sim).mean()


# ---------------------------------------------------------------- pixel contrast
def sample_anchors(labels: torch.Tensor, max_anchors: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-balanced sample of at most `max_anchors` labelled pixels (label != 255) of the batch.

    Returns flat indices into labels.reshape(-1). Pixels are dealt round-robin: every class present
    gives its 1st random pixel, then its 2nd, ... (classes in random order within a round), and the
    first `max_anchors` are kept. So a class runs short only when it has no pixels left, and the
    counts of the other classes differ by at most 1."""
    flat = labels.reshape(-1)
    candidates = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    if candidates.numel() <= max_anchors:
        return candidates
    classes = flat[candidates]
    keys = torch.rand(candidates.numel(), generator=generator).to(flat.device)
    # Random order within each class: shuffle by the keys, then a stable sort by class.
    shuffled = torch.argsort(keys)
    by_class = shuffled[torch.argsort(classes[shuffled], stable=True)]
    sorted_classes = classes[by_class]
    unique, class_slot, counts = torch.unique_consecutive(sorted_classes, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(by_class.numel(), device=flat.device) - starts[class_slot]  # rank within its class
    # Random class order inside each round, so the leftover anchors do not always go to low class ids.
    class_order = torch.randperm(unique.numel(), generator=generator).to(flat.device)
    priority = rank * unique.numel() + class_order[class_slot]
    chosen = by_class[torch.argsort(priority)[:max_anchors]]
    return candidates[chosen]


def supervised_contrastive_loss(
    embeddings: torch.Tensor, classes: torch.Tensor, temperature: float = 0.1, base_temperature: float = 0.07
) -> torch.Tensor:
    """SupCon over N anchors [N, D] with classes [N]: for anchor i, positives P(i) = other anchors of
    its class, denominator = all other anchors;
    L_i = −(τ/τ_base)·mean_{p∈P(i)} log(exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ)).
    Anchors without a positive are excluded; mean over the others (0 when there are none)."""
    n = embeddings.shape[0]
    if n < 2:
        return embeddings.sum() * 0.0
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    logits = (embeddings @ embeddings.t() / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (classes[:, None] == classes[None, :]) & ~self_mask
    num_positives = positives.sum(1)
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1) / num_positives.clamp(min=1)
    has_positive = num_positives > 0
    per_anchor = -(temperature / base_temperature) * mean_log_prob
    return per_anchor.masked_fill(~has_positive, 0.0).sum() / has_positive.sum().clamp(min=1)


def pixel_contrast_loss(
    feat: torch.Tensor,
    labels: torch.Tensor,
    max_anchors: int,
    generator: torch.Generator | None = None,
    temperature: float = 0.1,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Cross-image pixel contrast: class-balanced anchors from the whole batch (`sample_anchors`),
    positives = same-class anchors from any image, SupCon loss. feat [B, D, h, w], labels [B, h, w]."""
    index = sample_anchors(labels, max_anchors, generator)
    return supervised_contrastive_loss(_pixels(feat)[index], labels.reshape(-1)[index], temperature, base_temperature)


# ---------------------------------------------------------------- region relation
def region_relation_loss(
    feat: torch.Tensor, old_feat: torch.Tensor, old_logits_down: torch.Tensor, old_classes: int, tau: float
) -> torch.Tensor:
    """Cross-image region relation distillation.

    Prototypes: for each old class c (background included) the mean feature of the pixels of the
    whole batch whose old argmax (old_logits_down [B, C°, h, w], on the feature grid) is c, computed
    separately from the new (feat) and the old (old_feat) features. For every pixel, softmax over the
    prototypes of cosine similarity / τ; KL(old ‖ new) averaged over pixels. Classes with no pixel
    in the batch are left out."""
    new = _pixels(feat)
    old = _pixels(old_feat).detach()
    assignment = old_logits_down[:, :old_classes].argmax(dim=1).reshape(-1)
    members = F.one_hot(assignment, old_classes).to(new.dtype)  # [N, C°]
    counts = members.sum(0)
    present = counts > 0
    members, counts = members[:, present], counts[present]
    new_prototypes = F.normalize(members.t() @ new / counts[:, None], dim=1)
    old_prototypes = F.normalize(members.t() @ old / counts[:, None], dim=1)
    new_logits = F.normalize(new, dim=1) @ new_prototypes.t() / tau
    old_logits = F.normalize(old, dim=1) @ old_prototypes.t() / tau
    return _kl_from_logits(old_logits, new_logits).mean()


# ---------------------------------------------------------------- method
class MiCro(MiB):
    """MiB (UnCE, UnKD ×10, init_balanced) + three cross-image losses on `pre_logits`:
    CFRD (t > 0), class-balanced cross-image pixel contrast (every step, old-model pseudo-labels at
    t > 0) and region relation distillation (t > 0).

    A reconstruction: no code was published; every free choice is a flag (--micro_*). Features are
    pooled by --micro_pool, then L2-normalised (--micro_normalize); labels go to that grid by
    nearest neighbour, old logits by average pooling (their argmax gives region assignments and
    pseudo-labels; region prototypes cover every old class, background included). Anchors are drawn
    from a generator seeded with --random_seed and the step.
    Under DDP each process uses its own batch (no all-gather): "the batch" is the per-process batch
    (--batch_size), and the losses' gradients are averaged by DDP like any other loss."""

    name = "MiCro"
    summary = "MiB + cross-image feature relation distillation, pixel contrast and region relation distillation"
    paper = (
        "Rong et al., MiCro: Modeling Cross-Image Semantic Relationship Dependencies for Class-Incremental "
        "Semantic Segmentation in Remote Sensing Images, IEEE TGRS 2023 (reconstruction: no code published)"
    )
    # presets: MiB's (inherited)
    own_terms_read_old_model = True  # their own terms read it at t > 0

    @classmethod
    def add_arguments(cls, parser) -> None:
        group = cls.argument_group_once(parser, "--micro_contrast", "MiCro",
                                        "MiCro reconstruction (docs/methods.md#micro-flags)")
        if group is None:
            return
        group.add_argument("--micro_contrast", role=CONTRAST_AT_STEP0, type=float, default=0.1,
                           help="weight of the cross-image pixel contrast loss, every step (0.1)")
        group.add_argument("--micro_anchors", role=CONTRAST_AT_STEP0, type=int, default=1024,
                           help="max class-balanced anchors per batch for the pixel contrast (1024)")
        group.add_argument("--micro_contrast_temperature", role=CONTRAST_AT_STEP0, type=float, default=0.1,
                           help="temperature of the pixel contrast (0.1)")
        group.add_argument("--micro_base_temperature", role=CONTRAST_AT_STEP0, type=float, default=0.07,
                           help="base temperature: the contrast loss is scaled by temperature/base (0.07)")
        group.add_argument("--micro_pool", role=CONTRAST_AT_STEP0, type=int, default=2,
                           help="average-pooling factor applied to pre_logits before the MiCro losses (2); the "
                                "CFRD cost grows as (batch·pixels/pool²)², so pool 1 costs ~16x pool 2")
        group.add_argument("--micro_normalize", role=CONTRAST_AT_STEP0, choices=["after_pool", "before_pool"],
                           default="after_pool",
                           help="L2-normalise the features after pooling (unit vectors, default) or per pixel before")
        group.add_argument("--micro_cfrd", type=float, default=1.0,
                           help="weight of the cross-image feature relationship distillation, t > 0 (1.0)")
        group.add_argument("--micro_tau", type=float, default=0.1,
                           help="temperature of the CFRD and region relation softmaxes (0.1)")
        group.add_argument("--micro_pseudo_threshold", type=float, default=0.7,
                           help="old-model confidence for pseudo-labelling background anchors with old classes (0.7)")
        group.add_argument("--micro_region", type=float, default=0.1,
                           help="weight of the cross-image region relation distillation, t > 0 (0.1)")

    @classmethod
    def step0_terms(cls, options) -> dict:
        return super().step0_terms(options)  # the pixel contrast (CONTRAST_AT_STEP0 options) is the base's term

    @classmethod
    def validate(cls, options, step: int | None = None) -> None:
        super().validate(options, step)
        for flag in ("micro_pool", "micro_anchors"):
            if getattr(options, flag) < 1:
                raise UserError(f"--{flag} must be >= 1 (got {getattr(options, flag)})")
        for flag in ("micro_tau", "micro_contrast_temperature", "micro_base_temperature"):
            if getattr(options, flag) <= 0:
                raise UserError(f"--{flag} must be positive (got {getattr(options, flag)})")

    def __init__(self, options, step: int, classes: list[int]):
        super().__init__(options, step, classes)
        # Own stream (offset 500 from the symmetry generator's seed) so anchors are reproducible.
        self._anchor_rng = torch.Generator().manual_seed(int(options.random_seed) + 1000 * step + 500)

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        # The similarity matmuls would run in fp16/bf16 under autocast; cosines / 0.1 need fp32.
        with torch.autocast(device_type=ctx.logits.device.type, enabled=False):
            return self._micro_losses(ctx)

    def _micro_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        options = self.options
        feat = prepare_features(ctx.features["pre_logits"], options.micro_pool, options.micro_normalize)
        grid = feat.shape[-2:]
        labels = downsample_labels(ctx.labels, grid)
        distill = ctx.old_features is not None and ctx.old_logits is not None
        if distill:
            old_feat = prepare_features(ctx.old_features["pre_logits"], options.micro_pool, options.micro_normalize)
            old_logits = F.adaptive_avg_pool2d(at_least_fp32(ctx.old_logits), grid)
            labels = reconstruct_labels(labels, old_logits, options.micro_pseudo_threshold)

        terms = {}
        if options.micro_contrast > 0:
            terms["contrast"] = options.micro_contrast * pixel_contrast_loss(
                feat, labels, options.micro_anchors, self._anchor_rng,
                options.micro_contrast_temperature, options.micro_base_temperature,
            )
        if distill and options.micro_cfrd > 0:
            terms["cfrd"] = options.micro_cfrd * cfrd_loss(feat, old_feat, options.micro_tau)
        if distill and options.micro_region > 0:
            terms["region"] = options.micro_region * region_relation_loss(
                feat, old_feat, old_logits, ctx.old_classes, options.micro_tau
            )
        return terms
