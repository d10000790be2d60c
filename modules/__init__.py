"""Segmentation modules: the DeepLabV3 head and the incremental segmentation model (body, head, classifiers)."""
import os

import torch

from models import WeightsError, build_backbone, norm_act_factory
from models.weights import FIRST_CONV
from utils.errors import UserError

from .deeplab import ASPP_RATES, DeeplabV3
from .segmentation import IncrementalSegmentationModule, ModelOutput, classifier_prefix

HEAD_CHANNELS = 256


def make_model(opts, classes):
    """Build the segmentation model of `opts` for per-step class counts `classes`.

    Reads opts.backbone, norm_act, output_stride, no_pretrained, pretrained (path or None),
    pooling_size and in_channels (optional; input bands, default 3; run.py takes it from meta.json).
    Body, head and classifiers share one norm_act builder. ImageNet weights that cannot be used are a
    UserError worded in the options (--backbone, --norm_act, --no_pretrained).
    """
    norm_act = norm_act_factory(opts.norm_act)
    if getattr(opts, "no_pretrained", False):
        pretrained = False
    else:
        pretrained = getattr(opts, "pretrained", None)
    try:
        body = build_backbone(opts.backbone, norm_act=norm_act, output_stride=opts.output_stride,
                              pretrained=pretrained, in_channels=getattr(opts, "in_channels", None) or 3)
    except WeightsError as err:
        raise err.reworded(backbone=f"--backbone {opts.backbone}", norm_act=f"--norm_act {opts.norm_act}",
                           hint=" or pass --no_pretrained") from None
    head = DeeplabV3(body.out_channels, HEAD_CHANNELS, HEAD_CHANNELS, norm_act=norm_act,
                     output_stride=opts.output_stride, pooling_size=getattr(opts, "pooling_size", None))
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
           "make_model"]
