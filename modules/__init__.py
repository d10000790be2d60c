"""Segmentation modules: DeepLabV3 head, incremental model (body, head, per-step classifiers), step checkpoints."""
import dataclasses
from dataclasses import dataclass

from models import WeightsError, build_backbone, norm_act_factory

from .checkpoints import check_checkpoint_bands, check_compatible, checkpoint_input_bands, load_model_weights
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


__all__ = ["ASPP_RATES", "check_checkpoint_bands", "check_compatible", "checkpoint_input_bands", "load_model_weights",
           "DeeplabV3", "HEAD_CHANNELS", "IncrementalSegmentationModule", "ModelOutput", "classifier_prefix",
           "make_model", "ModelOptions"]
