"""ResNet-18/34/50/101 in the layout of the in-place ABN ResNets MiB used.

State-dict names follow those networks (mod1.conv1, mod1.bn1, mod2.block1.convs.conv1,
mod2.block1.convs.bn1, mod2.block1.proj_conv, mod2.block1.proj_bn, ...), so MiB's
`pretrained/resnet101_iabn_sync.pth.tar` loads as is.
"""
from collections import OrderedDict

import torch.nn as nn

from utils.errors import UserError

# name -> (blocks per stage, bottleneck)
ARCHITECTURES = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}

# output stride -> dilation of stages mod2..mod5 (a dilated stage keeps its resolution)
STAGE_DILATIONS = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}


def _conv(in_channels, out_channels, kernel_size, stride=1, dilation=1):
    padding = dilation * (kernel_size - 1) // 2
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, bias=False)


class ResidualBlock(nn.Module):
    """Basic (2 convs 3x3) or bottleneck (1x1, 3x3, 1x1) block; stride on the 3x3 conv.

    Each conv is followed by norm_act, the last one with identity activation; the
    activation is applied after the residual sum.
    """

    def __init__(self, in_channels, channels, norm_act, stride=1, dilation=1):
        super().__init__()
        if len(channels) == 3:
            layers = [
                ("conv1", _conv(in_channels, channels[0], 1)),
                ("bn1", norm_act(channels[0])),
                ("conv2", _conv(channels[0], channels[1], 3, stride=stride, dilation=dilation)),
                ("bn2", norm_act(channels[1])),
                ("conv3", _conv(channels[1], channels[2], 1)),
                ("bn3", norm_act(channels[2], activation="identity")),
            ]
        else:
            layers = [
                ("conv1", _conv(in_channels, channels[0], 3, stride=stride, dilation=dilation)),
                ("bn1", norm_act(channels[0])),
                ("conv2", _conv(channels[0], channels[1], 3, dilation=dilation)),
                ("bn2", norm_act(channels[1], activation="identity")),
            ]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = _conv(in_channels, channels[-1], 1, stride=stride)
            self.proj_bn = norm_act(channels[-1], activation="identity")
        else:
            self.proj_conv = self.proj_bn = None
        self.act = norm_act.make_activation()
        self.act_out_of_place = norm_act.make_activation(inplace=False)

    def forward(self, x, keep_pre_activation=False):
        """The block's output; with keep_pre_activation, (output, residual sum before the activation)."""
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        if keep_pre_activation:  # the in-place activation would overwrite the sum
            pre_activation = self.convs(x) + shortcut
            return self.act_out_of_place(pre_activation), pre_activation
        return self.act(self.convs(x) + shortcut)


class ResNet(nn.Module):
    """ResNet body returning the last stage's feature map (stride `output_stride`).

    Attributes: in_channels (input bands: 3 RGB/IRRG, 4 RGBIR), out_channels (512 basic / 2048
    bottleneck), output_stride.
    """

    def __init__(self, structure, bottleneck, norm_act, output_stride=16, in_channels=3):
        super().__init__()
        if output_stride not in STAGE_DILATIONS:
            raise UserError(f"output_stride {output_stride} is not supported; use one of "
                            f"{', '.join(map(str, sorted(STAGE_DILATIONS)))}")
        if int(in_channels) < 1:
            raise UserError(f"the input must have at least one band, got {in_channels}")
        self.output_stride = output_stride
        self.in_channels = int(in_channels)
        self.mod1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(self.in_channels, 64, 7, stride=2, padding=3, bias=False)),
            ("bn1", norm_act(64)),
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        in_channels = 64
        channels = (64, 64, 256) if bottleneck else (64, 64)
        for stage, (num_blocks, dilation) in enumerate(zip(structure, STAGE_DILATIONS[output_stride])):
            blocks = []
            for block in range(num_blocks):
                # the first block of stages 3-5 halves the resolution unless the stage is dilated
                stride = 2 if (stage > 0 and block == 0 and dilation == 1) else 1
                blocks.append((f"block{block + 1}",
                               ResidualBlock(in_channels, channels, norm_act, stride=stride, dilation=dilation)))
                in_channels = channels[-1]
            self.add_module(f"mod{stage + 2}", nn.Sequential(OrderedDict(blocks)))
            channels = tuple(2 * c for c in channels)
        self.out_channels = in_channels
        self.reset_parameters()

    def reset_parameters(self):
        """Random initialisation (used when no ImageNet weights are loaded)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif getattr(module, "weight", None) is not None and hasattr(module, "running_var"):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_stages(self, x, pre_activations=None):
        """{"stage1": mod2 output, ..., "stage4": mod5 output}: the residual stages after the stem (mod1).

        pre_activations: a dict that, when given, receives "stage1".."stage4" before their last
        activation (the last block's residual sum), as PLOP's Local POD distils them."""
        x = self.mod1(x)
        stages = {}
        for i, stage in enumerate((self.mod2, self.mod3, self.mod4, self.mod5)):
            name = f"stage{i + 1}"
            if pre_activations is None:
                x = stages[name] = stage(x)
                continue
            *blocks, last = stage
            for block in blocks:
                x = block(x)
            x, pre_activations[name] = last(x, keep_pre_activation=True)
            stages[name] = x
        return stages

    def forward(self, x):
        return self.forward_stages(x)["stage4"]


def resnet(name, norm_act, output_stride=16, in_channels=3):
    """Build an untrained ResNet by name (resnet18|34|50|101) for `in_channels` input bands."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown backbone {name!r}; use one of {', '.join(ARCHITECTURES)}")
    structure, bottleneck = ARCHITECTURES[name]
    return ResNet(structure, bottleneck, norm_act, output_stride=output_stride, in_channels=in_channels)
