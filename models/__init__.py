"""ResNet backbones with a pluggable normalisation+activation (in-place ABN or pure PyTorch)."""
from .norm_act import HAS_INPLACE_ABN, NORM_ACT_NAMES, NORM_LAYER_TYPES, PURE_ABN_ENV, NormAct, norm_act_factory
from .resnet import ARCHITECTURES, ResNet, resnet
from .weights import (
    WeightsError,
    convert_torchvision_state_dict,
    default_pretrained_path,
    find_default_pretrained,
    inflate_first_conv,
    load_pretrained,
    read_state_dict,
    resolve_pretrained_path,
)


def build_backbone(name, norm_act="iabn_sync", output_stride=16, pretrained=None, in_channels=3):
    """Build ResNet `name` (resnet18|34|50|101) for `in_channels` input bands.

    norm_act: a norm_act name or a NormAct builder. pretrained: None (or True) loads
    <repo>/pretrained/<name>_<norm_act>.pth.tar, a path loads that file, False = random init.
    Weights that cannot be used raise a WeightsError.
    """
    builder = norm_act if isinstance(norm_act, NormAct) else norm_act_factory(norm_act)
    body = resnet(name, builder, output_stride=output_stride, in_channels=in_channels)
    if pretrained is False:
        return body
    if pretrained is None or pretrained is True:
        path = find_default_pretrained(name, builder.name)
    else:
        path = resolve_pretrained_path(pretrained)
    return load_pretrained(body, path, backbone=name)


__all__ = [
    "ARCHITECTURES", "HAS_INPLACE_ABN", "NORM_ACT_NAMES", "NORM_LAYER_TYPES", "PURE_ABN_ENV", "NormAct",
    "ResNet",
    "build_backbone", "convert_torchvision_state_dict", "default_pretrained_path", "find_default_pretrained",
    "inflate_first_conv",
    "load_pretrained", "norm_act_factory", "read_state_dict", "resnet", "resolve_pretrained_path", "WeightsError",
]
