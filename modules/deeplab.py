"""DeepLabV3 head (ASPP) in MiB's layout: parameter names map_convs, map_bn, global_pooling_conv,
global_pooling_bn, red_conv, pool_red_conv, red_bn."""
import torch
import torch.nn as nn
import torch.nn.functional as F

# output stride -> ASPP dilation rates (6/12/18 at OS16, doubled at OS8, halved at OS32)
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class DeeplabV3(nn.Module):
    """ASPP: a 1x1 and three dilated 3x3 branches + an image-pooling branch, each norm_act'ed,
    concatenated and reduced by a 1x1 conv to `out_channels`, then norm_act.

    The concatenation + reduction is computed as red_conv(map branches) + pool_red_conv(pool
    branch), which is the same 1x1 conv split in two (and lets the pooled vector broadcast).
    pooling_size: None = global average pooling always; otherwise global pooling in training and,
    in eval, a sliding avg-pool of that size (clipped to the input) with replicate padding (MiB).
    """

    def __init__(self, in_channels, out_channels=256, hidden_channels=256, norm_act=None, output_stride=16,
                 pooling_size=None):
        super().__init__()
        if norm_act is None:
            raise ValueError("DeeplabV3 needs a norm_act builder (models.norm_act_factory)")
        self.pooling_size = pooling_size
        self.rates = ASPP_RATES[output_stride]
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, padding=rate, dilation=rate, bias=False)
               for rate in self.rates])
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        self.out_channels = out_channels
        self.reset_parameters()

    def reset_parameters(self):
        gain = nn.init.calculate_gain("leaky_relu", 0.01)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
            elif getattr(module, "weight", None) is not None and hasattr(module, "running_var"):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)
        out = self.red_conv(self.map_bn(out))
        pool = self.global_pooling_conv(self._pool(x))
        pool = self.pool_red_conv(self.global_pooling_bn(pool))
        out = out + pool  # (B, C, 1, 1) broadcasts over the map for global pooling
        return self.red_bn(out)

    def _pool(self, x):
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        size = tuple(min(s, dim) for s, dim in zip(_pair(self.pooling_size), x.shape[2:]))
        pool = F.avg_pool2d(x, size, stride=1)
        # pad back to the input size: (left, right, top, bottom), the extra pixel on the right/bottom
        pad_w, pad_h = size[1] - 1, size[0] - 1
        padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        return F.pad(pool, padding, mode="replicate")
