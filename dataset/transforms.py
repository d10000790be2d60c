"""Joint image/label transforms for segmentation; picklable, no torchvision.

Spatial transforms accept either numpy (image H x W x C, label H x W) or torch (image C x H x W,
label H x W) and return the same kind; image and label always get the same geometry. Random
draws use torch's generator, which DataLoader seeds differently in every worker.
"""
import numpy as np
import torch
import torch.nn.functional as F


def _coin(p):
    return p >= 1.0 or (p > 0.0 and torch.rand(()).item() < p)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label

    def __repr__(self):
        return f"Compose({self.transforms})"


class ToTensor:
    """uint8 H x W x C image -> float32 C x H x W in [0, 1]; label -> int64 H x W."""

    def __call__(self, image, label):
        if isinstance(image, np.ndarray):
            image = np.ascontiguousarray(image)
            if image.ndim == 2:
                image = image[:, :, None]
            image = torch.from_numpy(image).permute(2, 0, 1)
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        label = torch.from_numpy(np.ascontiguousarray(label)) if isinstance(label, np.ndarray) else label
        return image.contiguous(), label.long()


class Normalize:
    """(image - mean) / std per channel, on a float C x H x W tensor (3 or 4 channels)."""

    def __init__(self, mean, std):
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]

    def __call__(self, image, label):
        if image.shape[0] != len(self.mean):
            raise ValueError(f"Normalize has {len(self.mean)} channel statistics but the image has "
                             f"{image.shape[0]} channels")
        mean = torch.tensor(self.mean, dtype=image.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=image.dtype).view(-1, 1, 1)
        return (image - mean) / std, label


class _RandomFlip:
    """Flip image and label together with probability p: numpy H x W (x C) or torch (C x) H x W."""

    numpy_axis: int
    torch_dim: int

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, label):
        if not _coin(self.p):
            return image, label
        if isinstance(image, np.ndarray):
            return np.flip(image, self.numpy_axis), np.flip(label, self.numpy_axis)
        return image.flip(self.torch_dim), label.flip(self.torch_dim)


class RandomHorizontalFlip(_RandomFlip):
    numpy_axis, torch_dim = 1, -1


class RandomVerticalFlip(_RandomFlip):
    numpy_axis, torch_dim = 0, -2


class RandomRotation90:
    """Rotate by k x 90 degrees, k uniform in {0, 1, 2, 3} (or fixed `k`)."""

    def __init__(self, k=None):
        self.k = k

    def __call__(self, image, label):
        k = int(torch.randint(0, 4, ()).item()) if self.k is None else self.k
        if k % 4 == 0:
            return image, label
        if isinstance(image, np.ndarray):
            return np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
        return torch.rot90(image, k, dims=(-2, -1)), torch.rot90(label, k, dims=(-2, -1))


class RandomScaleCrop:
    """Random rescale by s in `scale` (bilinear image, nearest label), pad, random crop.

    The MiB recipe (scale 0.5-2.0): a rescaled image smaller than the crop is padded with 0 and
    its label with `ignore_index`, so padding never counts as a class.
    """

    def __init__(self, crop_size, scale=(0.5, 2.0), ignore_index=255):
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ignore_index = ignore_index

    def __call__(self, image, label):
        as_numpy = isinstance(image, np.ndarray)
        if as_numpy:
            dtype = image.dtype
            image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
            label = torch.from_numpy(np.ascontiguousarray(label))
        image_dtype, label_dtype = image.dtype, label.dtype
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
        if image_dtype == torch.uint8:
            image = image.round().clamp_(0, 255)
        image, label = image.to(image_dtype), label.to(label_dtype)
        if as_numpy:
            return image.permute(1, 2, 0).numpy().astype(dtype, copy=False), label.numpy()
        return image.contiguous(), label.contiguous()


def train_transform(crop_size, mean, std):
    """Training augmentation: scale-crop, flips, 90-degree rotations, to tensor, normalise."""
    return Compose([ToTensor(), RandomScaleCrop(crop_size), RandomHorizontalFlip(),
                    RandomVerticalFlip(), RandomRotation90(), Normalize(mean, std)])


def eval_transform(mean, std):
    """Validation / test: the processed crop as it is, to tensor, normalised."""
    return Compose([ToTensor(), Normalize(mean, std)])
