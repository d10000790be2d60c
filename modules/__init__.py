"""Segmentation modules: DeepLabV3 head, incremental model (body, head, per-step classifiers), step checkpoints."""
from models import WeightsError, build_backbone, norm_act_factory

from .checkpoints import check_checkpoint_bands, check_compatible, checkpoint_input_bands, load_model_weights
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


__all__ = ["ASPP_RATES", "check_checkpoint_bands", "check_compatible", "checkpoint_input_bands", "load_model_weights",
           "DeeplabV3", "HEAD_CHANNELS", "IncrementalSegmentationModule", "ModelOutput", "classifier_prefix",
           "make_model"]
