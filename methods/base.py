"""The Method base class: MiB's composable losses (CE/UnCE/BCE, KD/UnKD, DE, iCaRL, regularisers,
rotation invariance), driven by options. A named method is a subclass that sets presets and may add
loss terms; the Trainer only calls the hooks below and never names a method."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from methods import losses
from methods.ewf import check_options as check_ewf_options
from methods.ewf import ewf_alpha, fuse_endpoints
from methods.invariance import NUM_SYMMETRIES, apply_symmetry, invariance_losses
from methods.regularizers import check_options as check_regularizer_options
from methods.regularizers import make_regularizer
from utils.checkpoint import loader_generator
from utils.errors import UserError
from utils.options import OptionRecord, option_group


class MethodOptions(OptionRecord):
    """The options a method reads: those every method shares (run.py's "method" group), its own classes'
    (Method.add_arguments), and step, random_seed and lr. `step0`: {term: option names} of the options
    declared to act at step 0 (utils.options.Role.step0), in declaration order."""

    __slots__ = ("step0",)

    def __init__(self, step0: dict[str, tuple[str, ...]] | None = None, **values):
        super().__init__(**values)
        object.__setattr__(self, "step0", dict(step0 or {}))

    def replace(self, **changes):
        return type(self)(self.step0, **{**self.as_dict(), **changes})


@dataclass
class StepContext:
    """Everything a loss may need for one training batch (the un-rotated half when MiB-CD doubles it)."""

    step: int
    old_classes: int  # C°: channels of the old model, background included (0 at step 0)
    images: torch.Tensor  # [B, C, H, W]
    labels: torch.Tensor  # [B, H, W] training labels after `target_labels`
    logits: torch.Tensor  # [B, C, H, W] new-model logits at the input size
    features: dict = field(default_factory=dict)  # the new model's features by name ("stage1".., "body", "pre_logits")
    old_logits: torch.Tensor | None = None  # [B, C°, H, W], no grad
    old_features: dict | None = None


@dataclass
class SetupContext:
    """What `Method.setup` gets, once per step, after the data, the model and the old model exist."""

    model: torch.nn.Module  # the new model (unwrapped: no DDP/compile), previous weights already loaded at t > 0
    old_model: torch.nn.Module | None = None  # frozen model of step t-1, in eval mode (None unless uses_old_model)
    train_loader: Any = None  # the step's training loader (uint8 batches on the host)
    previous_state: dict | None = None  # `state_dict()` of the method at step t-1 (None at step 0)
    dist: Any = None  # rank, world_size, device, distributed (utils.distributed.DistInfo)
    input_norm: Callable | None = None  # uint8 N×H×W×C batch on the device -> normalised float N×C×H×W
    max_batches: int | None = None  # batches an epoch trains on (--debug caps it); None: the whole loader
    previous_model_state: dict | None = None  # the model state dict saved by step t-1 (None at step 0)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches as the model sees them: (normalised images, long labels) on the device;
        for pre-passes over the data (e.g. statistics of the old model's outputs). The loader's and the
        global random state are put back afterwards, so training draws the same batches with or without
        a pre-pass."""
        device = self.dist.device if self.dist is not None else torch.device("cpu")
        generator = loader_generator(self.train_loader)
        saved = (generator.get_state() if generator is not None else None, torch.get_rng_state())
        try:
            for i, (images, labels) in enumerate(self.train_loader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                images = images.to(device)
                images = self.input_norm(images) if self.input_norm is not None else images
                yield images, labels.to(device).long()
        finally:
            if generator is not None:
                generator.set_state(saved[0])
            torch.set_rng_state(saved[1])


class Method:
    """FT behaviour plus every MiB option; subclasses change presets or add terms."""

    name = "base"
    summary = ""
    paper = ""
    # option -> value applied when the user did not give the flag explicitly
    presets: dict = {}
    # True for methods whose own terms read the old model at t > 0, whatever the distillation weights
    own_terms_read_old_model = False
    # (learning rate at step 0, at later steps) when --lr is not given; None: the framework's 0.01 / 0.001
    learning_rates: tuple[float, float] | None = None

    @classmethod
    def model_classes(cls, classes: list[int], task_classes: list[int]) -> list[int]:
        """The classes per classifier the model holds: one classifier per step seen (`classes`) unless the
        method allocates later steps' classifiers ahead (`task_classes`: every step of the task). The old
        model, checkpoints and --test use the same allocation; metrics count only the seen classes."""
        return list(classes)

    # ---------------------------------------------------------------- what step 0 depends on
    @classmethod
    def step0_terms(cls, options) -> dict:
        """The step-0 loss terms and the state step 0 hands to step 1, from the options (after presets).

        Options read only at t > 0 (KD/DE/iCaRL weights, UnCE/UnKD, balanced init, cd_factor_icl) are
        not in it; options shared by every method (data, model, schedule, seed) are not either. A
        subclass whose own terms act at step 0 overrides this and adds them."""
        terms = {"segmentation": "bce" if options.icarl or options.bce else "ce"}
        # the options declared to act at step 0 (e.g. a regulariser's, whose state step 0 accumulates):
        # a term counts when its first option is on
        for term, names in options.step0.items():
            values = [getattr(options, name) for name in names]
            if values[0]:
                terms[term] = values if len(values) > 1 else values[0]
        return terms

    @classmethod
    def step0_signature(cls, options) -> str:
        """Methods with equal signatures (and equal shared options) train the same step-0 model and
        state, so a campaign trains it once. A class that overrides a training hook but inherits
        `step0_terms` from above that override is assumed to differ at step 0: it never shares."""
        terms = cls.step0_terms(options)
        for klass in cls.__mro__:
            if "step0_terms" in vars(klass) or klass is Method:
                break
            if any(hook in vars(klass) for hook in _TRAINING_HOOKS):
                terms = {**terms, "method": cls.name}
                break
        return json.dumps(terms, sort_keys=True)

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add method-specific flags to the parser (called for every registered method)."""

    @staticmethod
    def argument_group_once(parser, first_flag: str, title: str, description: str):
        """A new argument group for a method's flags, or None when `first_flag` is already defined: every
        registered method's add_arguments runs, and a subclass inherits its parent's."""
        if first_flag in parser._option_string_actions:
            return None
        return option_group(parser, title, description)  # its options take `role=` (utils.options.Role)

    @classmethod
    def validate(cls, options, step: int | None = None) -> None:
        """Refuse options this method cannot train with: a UserError worded in flags, before anything is
        built. `step`: the step to train (default options.step). argparser.finalize calls it once for the
        chosen method; the constructor calls it too, so a method built without the command line is
        checked the same way. A subclass checks its own options after `super().validate(options, step)`."""
        step = options.step if step is None else step
        if options.icarl and options.unce:
            raise UserError("--icarl (BCE classifier, LWF-MC) and --unce (unbiased cross-entropy, MiB) are "
                            "alternative segmentation losses; drop one of them")
        # icarl_replaces_segmentation and uses_invariance at this step
        invariance = options.cd_factor > 0 or options.cd_factor_icl > 0
        if step > 0 and options.icarl and options.icarl_disjoint and invariance:
            raise UserError("--icarl_disjoint replaces the segmentation loss with one that needs the old model's "
                            "outputs on the same images, which the rotated half of --cd_factor/--cd_factor_icl "
                            "does not have; drop --icarl_disjoint or the invariance terms")
        check_regularizer_options(options)
        check_ewf_options(options)

    def __init__(self, options, step: int, classes: list[int]):
        type(self).validate(options, step)
        self.options = options
        self.step = step
        self.classes = list(classes)
        self.old_classes = sum(self.classes[:-1]) if step > 0 else 0
        self.regularizer = None
        self.ewf_previous = None  # --ewf: the step t-1 weights (from `setup`)
        # Symmetries are drawn from a seeded generator so runs are reproducible.
        self._symmetry_rng = torch.Generator().manual_seed(int(options.random_seed) + 1000 * step)

    @property
    def icarl_replaces_segmentation(self) -> bool:
        """MiB's --icarl_disjoint at t > 0: one iCaRL loss instead of BCE + iCaRL distillation."""
        return self.step > 0 and self.options.icarl and self.options.icarl_disjoint

    # ---------------------------------------------------------------- model set-up
    @property
    def uses_old_model(self) -> bool:
        """Whether the frozen model of step t-1 must be run during training (not for FT or a
        regulariser alone: they would pay a forward pass for nothing)."""
        options = self.options
        return self.step > 0 and (self.own_terms_read_old_model or options.loss_kd > 0 or options.loss_de > 0
                                  or options.icarl or options.cd_factor_icl > 0)

    def init_new_model(self, model) -> None:
        """Called once after the step t-1 weights were loaded into the new model (t > 0)."""
        if self.options.init_balanced:
            model.init_new_classifier(self.step)

    def setup(self, ctx: SetupContext) -> None:
        """Build per-step state once the data, the model and the old model exist (before training and
        before a resume checkpoint is read): here the regulariser, from the trainable parameters and the
        state the checkpoint of step t-1 carried. A method needing a pass over the training data
        (`ctx.batches()`) or the old model does it here."""
        model = ctx.model
        if self.uses_ewf:
            self.ewf_previous = ctx.previous_model_state
            for index in range(self.step):  # old classifiers (background included) out of the optimiser
                model.cls[index].requires_grad_(False)
        previous_state = ctx.previous_state or {}
        name = self.options.regularizer
        if not name:
            return
        prev_reg = previous_state.get("regularizer")
        if self.step > 0 and (prev_reg is None or prev_reg.get("name") != name):
            raise UserError(
                f"--regularizer {name} needs the {name} state of step {self.step - 1}, but that checkpoint "
                f"has none; train step 0 with the same method/--regularizer first"
            )
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.regularizer = make_regularizer(
            name,
            params,
            previous_state=prev_reg["state"] if prev_reg else None,
            importance=self.options.reg_importance,
            alpha=self.options.reg_alpha,
            normalize=not self.options.reg_no_normalize,
            iterations=self.options.reg_iterations,
            update_after_step=self.options.reg_update_after_step,
        )

    # ---------------------------------------------------------------- training
    def target_labels(self, labels: torch.Tensor, old_logits: torch.Tensor | None) -> torch.Tensor:
        """Training labels actually used (HCISS reconstructs old classes here)."""
        return labels

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """BCE (--bce or --icarl, before --unce as in MiB), UnCE at t > 0, else CE."""
        if self.options.bce or self.options.icarl:
            return losses.bce_with_onehot(logits, labels)
        if self.options.unce and self.step > 0:
            return losses.unbiased_cross_entropy(logits, labels, self.old_classes)
        return losses.cross_entropy(logits, labels)

    def distillation_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """KD/UnKD on outputs, ILT's feature distillation and iCaRL's distillation (t > 0)."""
        terms = {}
        if ctx.old_logits is None:
            return terms
        options = self.options
        if options.loss_kd > 0:
            kd = losses.unbiased_knowledge_distillation if options.unkd else losses.knowledge_distillation
            terms["kd"] = options.loss_kd * kd(ctx.logits, ctx.old_logits, alpha=options.alpha)
        if options.loss_de > 0:
            terms["de"] = options.loss_de * losses.feature_distillation(ctx.features["body"], ctx.old_features["body"])
        if options.icarl and not self.icarl_replaces_segmentation:
            terms["icarl"] = options.icarl_importance * losses.icarl_distillation(ctx.logits, ctx.old_logits)
        return terms

    def extra_losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Method-specific terms (HCISS, MiCro); empty for the MiB family."""
        return {}

    @property
    def uses_invariance(self) -> bool:
        return self.options.cd_factor > 0 or (self.step > 0 and self.options.cd_factor_icl > 0)

    def training_losses(self, model, old_model, images, labels) -> dict[str, torch.Tensor]:
        """Forward the batch (doubled with a random symmetry for MiB-CD) and return the weighted loss
        terms by name; the Trainer sums them."""
        old_logits = old_features = None
        if old_model is not None and self.uses_old_model:
            with torch.no_grad():
                old_logits, old_features = old_model(images)  # a ModelOutput (modules.ModelOutput)
        labels = self.target_labels(labels, old_logits)

        batch = images.shape[0]
        symmetry = None
        if self.uses_invariance:
            symmetry = int(torch.randint(NUM_SYMMETRIES, (1,), generator=self._symmetry_rng))
            inputs = torch.cat([images, apply_symmetry(images, symmetry)])
            seg_labels = torch.cat([labels, apply_symmetry(labels, symmetry)])
        else:
            inputs, seg_labels = images, labels

        logits_all, features_all = model(inputs)
        ctx = StepContext(
            step=self.step,
            old_classes=self.old_classes,
            images=images,
            labels=labels,
            logits=logits_all[:batch],
            features={k: v[:batch] for k, v in features_all.items()},
            old_logits=old_logits,
            old_features=old_features,
        )
        if self.icarl_replaces_segmentation:
            seg = losses.icarl_disjoint(ctx.logits, old_logits, labels, background_from_labels=self.options.icarl_bkg)
        else:
            seg = self.segmentation_loss(logits_all, seg_labels)
        terms = {"seg": seg}
        terms.update(self.distillation_losses(ctx))
        terms.update(self.extra_losses(ctx))
        if symmetry is not None:
            terms.update(
                invariance_losses(
                    features_all["pre_logits"],
                    old_features["pre_logits"] if old_features is not None else None,
                    symmetry,
                    batch,
                    cd_factor=self.options.cd_factor,
                    cd_factor_icl=self.options.cd_factor_icl,
                )
            )
        return terms

    # ---------------------------------------------------------------- after training
    @property
    def uses_ewf(self) -> bool:
        """--ewf at t > 0: old classifiers frozen, endpoints weight fusion after training."""
        return self.step > 0 and bool(getattr(self.options, "ewf", False))

    def finish_training(self, model) -> dict[str, float]:
        """After the step's last epoch (and --patience's choice of weights), before the step checkpoint is
        written and tested, on every rank: here EWF's fusion with the step t-1 weights. Returns values to
        log."""
        if not self.uses_ewf:
            return {}
        alpha = ewf_alpha(self.classes, getattr(self.options, "ewf_alpha", None))
        fused = fuse_endpoints(model, self.ewf_previous, alpha)
        return {"ewf_alpha": alpha, "ewf_fused_tensors": float(fused)}

    def before_step(self) -> dict[str, torch.Tensor]:
        """After backward (gradients DDP-averaged and unscaled), before optimizer.step().
        Returns extra values to log (e.g. the regulariser penalty)."""
        if self.regularizer is None:
            return {}
        return {"reg_penalty": self.regularizer.before_step()}

    def after_step(self) -> None:
        """After optimizer.step(): running state updates."""
        if self.regularizer is not None:
            self.regularizer.after_step()

    def divergence_hint(self) -> str | None:
        """What to change when training diverges (NaN/inf losses or weights), when this method knows
        better than the generic advice (None: the Trainer's generic hint)."""
        if self.regularizer is not None:
            # the penalty's curvature 2·λ·Ω makes SGD unstable when lr·2λ is large
            # (docs/methods.md#parameter-regularisers)
            return (f"lower --lr or --reg_importance (with momentum 0.9 SGD needs lr·2·reg_importance < 3.8; "
                    f"here {self.options.lr:g}·2·{self.options.reg_importance:g})")
        return None

    # ---------------------------------------------------------------- resume within a step
    def resume_state(self) -> dict:
        """Everything that changes while the step trains: the method's random generators (every
        torch.Generator attribute, e.g. the symmetry and anchor draws) and the regulariser's running
        state (tensors, dicts of tensors, counters; the parameters themselves travel with the model)."""
        state = {"generators": {k: v.get_state() for k, v in vars(self).items() if isinstance(v, torch.Generator)}}
        if self.regularizer is not None:
            state["regularizer"] = {k: _copy_state(v) for k, v in vars(self.regularizer).items()
                                    if k not in _REGULARIZER_FIXED and _is_state(v)}
        return state

    def load_resume_state(self, state: dict) -> None:
        """Undo `resume_state`: in place, so tensors shared between attributes stay shared."""
        for key, generator_state in state.get("generators", {}).items():
            getattr(self, key).set_state(generator_state)
        for key, value in state.get("regularizer", {}).items():
            setattr(self.regularizer, key, _load_state(getattr(self.regularizer, key, None), value))

    # ---------------------------------------------------------------- state across steps
    def state_dict(self) -> dict:
        """State saved in the step checkpoint and handed to the next step's `setup`."""
        state = {}
        if self.regularizer is not None:
            state["regularizer"] = {"name": self.options.regularizer, "state": self.regularizer.state_dict()}
        return state


# Hooks whose override can change step-0 training (see Method.step0_signature).
_TRAINING_HOOKS = ("target_labels", "segmentation_loss", "distillation_losses", "extra_losses",
                   "training_losses", "setup", "before_step", "after_step", "state_dict", "uses_invariance")


# Regulariser attributes set from options or the previous step, or the live parameters: not resume state.
_REGULARIZER_FIXED = {"params", "previous", "importance", "alpha", "normalize", "iterations", "penalised_names",
                      "_device", "_dtype", "_task_grads", "_grads_finite"}


def _is_state(value) -> bool:
    if isinstance(value, (int, float, torch.Tensor)):
        return True
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def _copy_state(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: v.detach().cpu().clone() for k, v in value.items()}
    return value


def _load_state(current, saved):
    if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor):
        return current.copy_(saved)
    if isinstance(saved, dict) and isinstance(current, dict):
        for k, v in saved.items():
            if k in current:
                current[k].copy_(v)
            else:
                current[k] = v
        return current
    return saved
