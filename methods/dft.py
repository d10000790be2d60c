"""DFT*: a frozen backbone and classifiers for every step allocated from step 0 (docs/methods.md#dft).

At step 0 the whole model trains with plain CE over every allocated logit (the classes of later steps sit
in the softmax as never-positive classes). At t > 0 body, head and the classifiers of steps < t are frozen
(no gradient, eval mode: normalisation statistics fixed); the current and later classifiers train with
plain CE over all allocated logits; the old model is not run. Evaluation takes the argmax over every
allocated channel, so a pixel predicted as a class not seen yet is a miss (utils.metrics)."""
from __future__ import annotations

from methods.base import Method, SetupContext
from utils.errors import UserError


class DFTStar(Method):
    name = "DFTstar"
    summary = "DFT*: classifiers of every step from step 0, backbone/head/old classifiers frozen at t > 0, plain CE"
    paper = "DFT* baseline of 'Revisiting continual semantic segmentation' (2025)"
    learning_rates = (0.02, 0.0005)

    @classmethod
    def model_classes(cls, classes, task_classes):
        return list(task_classes)

    @classmethod
    def step0_terms(cls, options) -> dict:
        # another model (every step's classifier) and learning rate from step 0: never shares FT's step 0
        return {**super().step0_terms(options), "classifiers": "every step from step 0"}

    @classmethod
    def validate(cls, options, step=None) -> None:
        super().validate(options, step)
        conflicting = [flag for flag, on in (
            ("--init_balanced", options.init_balanced), ("--unce", options.unce), ("--bce", options.bce),
            ("--icarl", options.icarl), ("--loss_kd", options.loss_kd > 0), ("--loss_de", options.loss_de > 0),
            ("--cd_factor_icl", options.cd_factor_icl > 0), ("--regularizer", bool(options.regularizer))) if on]
        if conflicting:
            raise UserError(f"DFTstar trains the pre-allocated classifiers with plain cross-entropy and never runs "
                            f"the old model; drop {', '.join(conflicting)}")

    def setup(self, ctx: SetupContext) -> None:
        if self.step > 0:
            ctx.model.freeze(["body", "head"] + [f"cls.{index}" for index in range(self.step)])
        super().setup(ctx)
