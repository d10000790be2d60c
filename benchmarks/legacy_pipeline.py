"""The data path as it was before the crop store (PNG decode, float scale-crop of the whole crop, per-item
normalisation), kept to measure against (throughput.py) and to test the new path against."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dataset.transforms import Compose, Normalize, RandomHorizontalFlip, RandomRotation90, RandomVerticalFlip, ToTensor


def read_png(path):
    with Image.open(path) as img:
        return np.array(img)


class LegacyRandomScaleCrop:
    """Rescale the whole image (float, torch interpolate), pad, then crop: draws s, top, left in this order."""

    def __init__(self, crop_size, scale=(0.5, 2.0), ignore_index=255):
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ignore_index = ignore_index

    def __call__(self, image, label):  # torch image C x H x W float, label H x W
        label_dtype = label.dtype
        h, w = label.shape[-2:]
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item()
        size = (max(1, round(h * s)), max(1, round(w * s)))
        image = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0]
        pad_h, pad_w = max(self.crop_size - size[0], 0), max(self.crop_size - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=float(self.ignore_index))
        top = int(torch.randint(0, label.shape[0] - self.crop_size + 1, ()).item())
        left = int(torch.randint(0, label.shape[1] - self.crop_size + 1, ()).item())
        image = image[:, top:top + self.crop_size, left:left + self.crop_size]
        label = label[top:top + self.crop_size, left:left + self.crop_size]
        return image.contiguous(), label.to(label_dtype).contiguous()


def legacy_train_transform(crop_size, mean, std):
    return Compose([ToTensor(), LegacyRandomScaleCrop(crop_size), RandomHorizontalFlip(),
                    RandomVerticalFlip(), RandomRotation90(), Normalize(mean, std)])


def legacy_eval_transform(mean, std):
    return Compose([ToTensor(), Normalize(mean, std)])
