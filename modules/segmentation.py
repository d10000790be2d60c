"""The incremental segmentation model: body (backbone), head (DeepLabV3), one 1x1 classifier per step."""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.norm_act import NORM_LAYER_TYPES


def classifier_prefix(step):
    """Parameter-name prefix of the classifier added at `step` (e.g. `cls.1.`)."""
    return f"cls.{step}."


class ModelOutput(NamedTuple):
    """What the segmentation model returns: the methods' contract with the model.

    logits: [B, sum(classes), H, W] at the input size. features: by name, every backbone stage
    ("stage1".."stage4" for the ResNets, the output of each residual stage, strides 4, 8, 16/8, 16/8),
    "body" (the last stage, the head's input) and "pre_logits" (the head's output, the classifiers'
    input). After `model.return_pre_activations()` also "stage1_preact".."stage4_preact" (each stage's
    output before its last activation) and "logits_small" (the logits at the head's resolution, before
    upsampling). A tuple, so `logits, features = model(x)` works too."""

    logits: torch.Tensor
    features: dict


class IncrementalSegmentationModule(nn.Module):
    """body -> head -> concatenation of the per-step classifiers `cls[i]` (classes[i] channels each).

    forward(x) -> ModelOutput(logits bilinearly upsampled to x's size, features by name). A body with
    `forward_stages(x)` (name -> map, in order, the last being the body output) gives its stages too.
    """

    def __init__(self, body, head, head_channels, classes):
        super().__init__()
        if not classes or any(int(c) < 1 for c in classes):
            raise ValueError(f"classes must be a non-empty list of positive counts, got {classes}")
        self.body = body
        self.head = head
        self.classes = [int(c) for c in classes]
        self.cls = nn.ModuleList([nn.Conv2d(head_channels, c, 1, bias=True) for c in self.classes])
        self._norm_eval = False  # --fix_bn_strict: norm layers stay in eval mode through train()
        self._frozen_eval = []  # names of submodules kept in eval mode through train() (`freeze`)
        self.pre_activations = False  # `return_pre_activations`

    @property
    def num_classes(self):
        return sum(self.classes)

    def forward(self, x):
        pre_activations = {} if self.pre_activations else None
        if hasattr(self.body, "forward_stages"):
            stages = (self.body.forward_stages(x) if pre_activations is None
                      else self.body.forward_stages(x, pre_activations=pre_activations))
        else:
            stages = {}
        body_out = next(reversed(stages.values())) if stages else self.body(x)
        head_out = self.head(body_out)
        small = torch.cat([classifier(head_out) for classifier in self.cls], dim=1)
        logits = F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        features = {**stages, "body": body_out, "pre_logits": head_out}
        if pre_activations is not None:
            features.update({f"{name}_preact": value for name, value in pre_activations.items()})
            features["logits_small"] = small
        return ModelOutput(logits, features)

    def return_pre_activations(self, on=True):
        """Also return each stage before its last activation and the logits before upsampling (for
        feature distillation that needs them, e.g. PLOP). Costs one extra map per stage: the last
        activation of each stage then runs out of place."""
        if on and not hasattr(self.body, "forward_stages"):
            raise ValueError(f"{type(self.body).__name__} has no forward_stages: it cannot give pre-activation "
                             f"stage features")
        self.pre_activations = bool(on)
        return self

    @torch.no_grad()
    def init_new_classifier(self, step=-1):
        """MiB's init_balanced (docs/methods.md#balanced-classifier-initialisation) on the classifier of
        `step` (default the last): the old background probability is shared equally by background and the N
        new classes."""
        if len(self.cls) < 2 or step == 0:
            raise ValueError("init_new_classifier needs a model with a classifier added after step 0")
        background_weight = self.cls[0].weight[0].clone()
        background_bias = self.cls[0].bias[0].clone()
        new = self.cls[step]
        shared_bias = background_bias - math.log(new.out_channels + 1)
        new.weight.copy_(background_weight.expand_as(new.weight))
        new.bias.copy_(shared_bias.expand_as(new.bias))
        self.cls[0].bias[0] = shared_bias

    def freeze(self, names):
        """Stop training the named submodules ("body", "head", "cls.0", ...) and keep them in eval mode
        through later train() calls, so their normalisation statistics stay fixed too."""
        for name in names:
            self.get_submodule(name).requires_grad_(False)
            if name not in self._frozen_eval:
                self._frozen_eval.append(name)
        self.train(self.training)

    def freeze_body(self, include_head=False):
        """Stop training the backbone (and the head if asked); classifiers stay trainable."""
        frozen = [self.body, self.head] if include_head else [self.body]
        for module in frozen:
            module.requires_grad_(False)

    def optimizer_parameters(self, freeze_body=False):
        """The parameters the optimiser updates: every one that requires a gradient, without the body's
        under MiB's --freeze (its gradient may still be computed, e.g. for a regulariser's running state)."""
        frozen = {id(p) for p in self.body.parameters()} if freeze_body else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in frozen]

    def _norm_layers(self):
        return [module for module in self.modules() if isinstance(module, NORM_LAYER_TYPES)]

    def fix_bn(self, keep_eval=False):
        """Freeze the affine parameters of every norm layer (MiB's --fix_bn).

        MiB also switched the layers to eval mode, but its model.train() at every epoch switched them back,
        so their running statistics kept updating in training: the same happens here. keep_eval=True
        (--fix_bn_strict) keeps them in eval mode through later train() calls, so the statistics stay fixed.
        """
        for module in self._norm_layers():
            for param in (module.weight, module.bias):
                if param is not None:
                    param.requires_grad_(False)
        if keep_eval:
            self._norm_eval = True
            self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self._norm_eval:
            for module in self._norm_layers():
                module.eval()
        for name in self._frozen_eval:
            self.get_submodule(name).eval()
        return self
