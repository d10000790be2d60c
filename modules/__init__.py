"""Segmentation modules: the DeepLabV3 head and the incremental segmentation model (body, head, classifiers)."""
import dataclasses
import os
from dataclasses import dataclass

import torch

from models import WeightsError, build_backbone, norm_act_factory
from models.weights import FIRST_CONV
from utils.errors import UserError

from .deeplab import ASPP_RATES, DeeplabV3
from .segmentation import IncrementalSegmentationModule, ModelOutput, classifier_prefix

HEAD_CHANNELS = 256


@dataclass(frozen=True)
class ModelOptions:
    """The segmentation model of a run; field names are run.py's options.

    pretrained: ImageNet weights file (None: pretrained/<backbone>_<norm_act>.pth.tar); no_pretrained:
    random initial weights instead. pooling_size: eval-time ASPP image-pooling window (None: global).
    in_channels: input bands (run.py takes them from the data's meta.json)."""

    backbone: str = "resnet101"
    output_stride: int = 16
    norm_act: str = "iabn_sync"
    no_pretrained: bool = False
    pretrained: str | None = None
    pooling_size: int | None = 32
    in_channels: int = 3

    @classmethod
    def from_recorded(cls, options: dict, **changes) -> "ModelOptions":
        """The model options a checkpoint recorded with its options (those it lacks keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in options.items() if k in names}, **changes})


def make_model(model: ModelOptions, classes):
    """The segmentation model of `model` (ModelOptions) for per-step class counts `classes`.

    Body, head and classifiers share one norm_act builder. ImageNet weights that cannot be used are a
    UserError worded in the options (--backbone, --norm_act, --no_pretrained).
    """
    norm_act = norm_act_factory(model.norm_act)
    pretrained = False if model.no_pretrained else model.pretrained
    try:
        body = build_backbone(model.backbone, norm_act=norm_act, output_stride=model.output_stride,
                              pretrained=pretrained, in_channels=model.in_channels)
    except WeightsError as err:
        raise err.reworded(backbone=f"--backbone {model.backbone}", norm_act=f"--norm_act {model.norm_act}",
                           hint=" or pass --no_pretrained") from None
    head = DeeplabV3(body.out_channels, HEAD_CHANNELS, HEAD_CHANNELS, norm_act=norm_act,
                     output_stride=model.output_stride, pooling_size=model.pooling_size)
    return IncrementalSegmentationModule(body, head, HEAD_CHANNELS, classes)


def checkpoint_input_bands(state):
    """Input bands of a model state dict (its first convolution), or None when it has none."""
    weight = state.get("body." + FIRST_CONV) if isinstance(state, dict) else None
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else None


def check_checkpoint_bands(path, bands, data_description):
    """UserError when the step checkpoint at `path` was trained on another number of input bands than
    the data (`bands`). Reads the file memory-mapped (cheap); a missing or unreadable file is left to
    the caller's own checks."""
    if path is None or not os.path.isfile(path):
        return
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - reported by the caller's loading with the proper message
        return
    have = checkpoint_input_bands(checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    if have is not None and have != bands:
        raise UserError("{path} was trained on {have}-band images but {data} has {bands} bands; use a checkpoint "
                        "and a processed dataset with the same {channels}", path=path, have=have,
                        data=data_description, bands=bands, channels="bands")


__all__ = ["ASPP_RATES", "check_checkpoint_bands", "checkpoint_input_bands",
           "DeeplabV3", "HEAD_CHANNELS", "IncrementalSegmentationModule", "ModelOutput", "classifier_prefix",
           "make_model", "ModelOptions"]
