"""Segmentation modules: the DeepLabV3 head and the incremental segmentation model (body, head, classifiers)."""
from models import build_backbone, norm_act_factory

from .deeplab import ASPP_RATES, DeeplabV3
from .segmentation import IncrementalSegmentationModule, classifier_prefix, is_classifier_param

HEAD_CHANNELS = 256


def make_model(opts, classes, process_group=None):
    """Build the segmentation model of `opts` for per-step class counts `classes`.

    Reads opts.backbone, norm_act, output_stride, no_pretrained, pretrained (path or None),
    pooling_size (optional). Body, head and classifiers share one norm_act builder.
    """
    norm_act = norm_act_factory(opts.norm_act, process_group=process_group)
    if getattr(opts, "no_pretrained", False):
        pretrained = False
    else:
        pretrained = getattr(opts, "pretrained", None)
    body = build_backbone(opts.backbone, norm_act=norm_act, output_stride=opts.output_stride,
                          pretrained=pretrained)
    head = DeeplabV3(body.out_channels, HEAD_CHANNELS, HEAD_CHANNELS, norm_act=norm_act,
                     output_stride=opts.output_stride, pooling_size=getattr(opts, "pooling_size", None))
    return IncrementalSegmentationModule(body, head, HEAD_CHANNELS, classes)


__all__ = ["ASPP_RATES", "DeeplabV3", "HEAD_CHANNELS", "IncrementalSegmentationModule", "classifier_prefix",
           "is_classifier_param", "make_model"]
