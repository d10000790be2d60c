"""MiB-CD: MiB plus rotation/flip invariance distillation of features (docs/methods.md#mib-cd)."""
from methods.mib_family import MiB


class MiBCD(MiB):
    """MiB + rotation/flip invariance of `pre_logits` (new-vs-new from step 0, new-vs-old at t > 0).

    The invariance itself lives in `Method.training_losses` (driven by --cd_factor and --cd_factor_icl,
    which any method may use); MiB-CD adds its presets to MiB's."""

    name = "MiB-CD"
    summary = "MiB + rotation/flip invariance distillation of features"
    paper = ("Arnaudo et al., A Contrastive Distillation Approach for Incremental Semantic Segmentation "
             "in Aerial Images, ICIAP 2021")
    presets = {**MiB.presets, "cd_factor": 0.1, "cd_factor_icl": 0.1}
