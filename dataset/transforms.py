"""Joint image/label transforms for segmentation; picklable, no torchvision.

Image and label always get the same geometry. Random draws use torch's global generator; for training
items IncrementalDataset seeds it per item (dataset.SeededSampler), so workers do not matter.

The data path keeps crops uint8 until the device: items are numpy uint8 (image H x W x C, label H x W),
`RandomScaleCropFlipRotate` resamples only what lands in the crop, with the flips and rotations folded
into its index arrays, `ToUint8` makes them tensors and `BatchNormalize` converts and normalises the
whole batch on the device. The separate transforms it fuses are kept as its definition:
`RandomScaleCrop` (numpy, like the fused one) and, for the per-item float path of
benchmarks/legacy_pipeline.py, `ToTensor` (numpy -> float C x H x W), the flips and
`RandomRotation90` (torch C x H x W) and `Normalize`.
"""
import numpy as np
import torch


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
    """numpy uint8 H x W x C image -> float32 C x H x W in [0, 1]; numpy label -> int64 H x W."""

    def __call__(self, image, label):
        image = np.ascontiguousarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        image = torch.from_numpy(image).permute(2, 0, 1)
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        return image.contiguous(), torch.from_numpy(np.ascontiguousarray(label)).long()


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
    """Flip image C x H x W and label H x W (torch) together with probability p."""

    dim: int

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, label):
        if not _coin(self.p):
            return image, label
        return image.flip(self.dim), label.flip(self.dim)


class RandomHorizontalFlip(_RandomFlip):
    dim = -1


class RandomVerticalFlip(_RandomFlip):
    dim = -2


class RandomRotation90:
    """Rotate image C x H x W and label H x W (torch) by k x 90 degrees, k uniform in {0, 1, 2, 3} (or fixed `k`)."""

    def __init__(self, k=None):
        self.k = k

    def __call__(self, image, label):
        k = int(torch.randint(0, 4, ()).item()) if self.k is None else self.k
        if k % 4 == 0:
            return image, label
        return torch.rot90(image, k, dims=(-2, -1)), torch.rot90(label, k, dims=(-2, -1))


def _bilinear_taps(out_start, out_count, in_size, out_size):
    """Source rows (lo, hi) and weights of output rows out_start.. of a bilinear resize in_size -> out_size.

    The same arithmetic as torch's `interpolate(mode="bilinear", align_corners=False)` on CPU (float32
    scale in/out, half-pixel centres, negative coordinates clamped to 0), for a window of the output.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_start, out_start + out_count, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _nearest_taps(out_start, out_count, in_size, out_size):
    """Source index of output rows out_start.. of torch's legacy `mode="nearest"` resize."""
    if out_size == in_size:
        return np.arange(out_start, out_start + out_count)
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_start, out_start + out_count, dtype=np.float32)
    return np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)


def scale_crop_window(image, label, size, top, left, crop_size, ignore_index=255, flip_rows=False,
                      flip_cols=False):
    """The crop [top, top + crop_size) x [left, ...) of image/label resized to `size`, padded (image 0,
    label ignore_index) where the resized image ends, computing only the pixels that land in the crop.

    image H x W x C (uint8 or float), label H x W. Equal to resizing the whole image (bilinear image,
    nearest label) and cutting the crop; a uint8 image is rounded back to uint8 (0.5/255 at most).
    flip_rows / flip_cols then flip the whole crop (padding included) at no cost: the index arrays
    are reversed instead of the pixels.
    """
    h, w = label.shape
    out_h, out_w = size
    rows = max(0, min(crop_size, out_h - top))  # output rows inside the resized image
    cols = max(0, min(crop_size, out_w - left))
    channels = image.shape[2]
    out_image = np.zeros((crop_size, crop_size, channels), dtype=image.dtype)
    out_label = np.full((crop_size, crop_size), ignore_index, dtype=label.dtype)
    if rows == 0 or cols == 0:
        return out_image, out_label
    # where the valid block lands in the (possibly flipped) crop; reversed taps flip it
    rs = slice(crop_size - rows, crop_size) if flip_rows else slice(0, rows)
    cs = slice(crop_size - cols, crop_size) if flip_cols else slice(0, cols)
    ry = slice(None, None, -1) if flip_rows else slice(None)
    rx = slice(None, None, -1) if flip_cols else slice(None)
    if (out_h, out_w) == (h, w):  # scale 1: a plain copy
        out_image[rs, cs] = image[top:top + rows, left:left + cols][ry, rx]
        out_label[rs, cs] = label[top:top + rows, left:left + cols][ry, rx]
        return out_image, out_label

    y_idx = _nearest_taps(top, rows, h, out_h)[ry]
    x_idx = _nearest_taps(left, cols, w, out_w)[rx]
    out_label[rs, cs] = label.take(y_idx, axis=0).take(x_idx, axis=1)

    y0, y1, wy = (a[ry] for a in _bilinear_taps(top, rows, h, out_h))
    x0, x1, wx = (a[rx] for a in _bilinear_taps(left, cols, w, out_w))
    # rows first (only the source columns the crop needs), then columns; `take` on a flattened
    # (column, channel) axis is numpy's fastest gather
    c_lo, c_hi = int(x0.min()), int(x1.max()) + 1
    window = image[:, c_lo:c_hi].reshape(h, -1) if image.flags.c_contiguous else \
        np.ascontiguousarray(image[:, c_lo:c_hi]).reshape(h, -1)
    top_rows = window.take(y0, axis=0).astype(np.float32)
    blended = window.take(y1, axis=0).astype(np.float32)
    blended -= top_rows
    blended *= wy[:, None]
    blended += top_rows  # rows x (window columns * C)
    lane = np.arange(channels)
    left_cols = blended.take(((x0 - c_lo)[:, None] * channels + lane).ravel(), axis=1)
    result = blended.take(((x1 - c_lo)[:, None] * channels + lane).ravel(), axis=1)
    result -= left_cols
    result *= np.repeat(wx, channels)[None, :]
    result += left_cols
    result = result.reshape(rows, cols, channels)
    if image.dtype == np.uint8:
        np.rint(result, out=result)
        np.clip(result, 0, 255, out=result)
    out_image[rs, cs] = result
    return out_image, out_label


class RandomScaleCrop:
    """Random rescale by s in `scale` (bilinear image, nearest label), pad, random crop; numpy image
    H x W x C and label H x W in and out.

    The MiB recipe (scale 0.5-2.0): a rescaled image smaller than the crop is padded with 0 and
    its label with `ignore_index`, so padding never counts as a class. Only the source window that
    lands in the crop is resampled (cost follows the crop, not the input); uint8 stays uint8.
    Random draws (s, then top, then left) are those of rescaling the whole image first.
    """

    def __init__(self, crop_size, scale=(0.5, 2.0), ignore_index=255):
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ignore_index = ignore_index

    def draw(self, h, w):
        """The random rescaled size (h', w') of an h x w input and the crop's top-left corner in it."""
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(()).item()
        size = (max(1, round(h * s)), max(1, round(w * s)))
        top = int(torch.randint(0, max(size[0], self.crop_size) - self.crop_size + 1, ()).item())
        left = int(torch.randint(0, max(size[1], self.crop_size) - self.crop_size + 1, ()).item())
        return size, top, left

    def __call__(self, image, label):
        size, top, left = self.draw(*label.shape[-2:])
        return scale_crop_window(image, label, size, top, left, self.crop_size, self.ignore_index)


def _transpose(image, label):
    """Swap the two spatial axes into new contiguous arrays (per channel plane: numpy copies a 2-D
    transpose far faster than one with 3 interleaved channels)."""
    out = np.empty((image.shape[1], image.shape[0], image.shape[2]), dtype=image.dtype)
    for c in range(image.shape[2]):
        out[:, :, c] = image[:, :, c].T
    return out, np.ascontiguousarray(label.T)


class RandomScaleCropFlipRotate:
    """RandomScaleCrop, RandomHorizontalFlip, RandomVerticalFlip and RandomRotation90 in one step, with
    the same random draws in the same order (hence the same outputs): the flips, and a rotation by
    180 degrees, are folded into the resampling's index arrays (free); 90 / 270 degrees add one
    transpose of the uint8 crop. numpy image H x W x C and label H x W in and out.
    """

    def __init__(self, crop_size, scale=(0.5, 2.0), ignore_index=255, p_flip=0.5):
        self.scale_crop = RandomScaleCrop(crop_size, scale, ignore_index)
        self.p_flip = p_flip

    def __call__(self, image, label):
        sc = self.scale_crop
        size, top, left = sc.draw(*label.shape[-2:])
        flip_cols, flip_rows = _coin(self.p_flip), _coin(self.p_flip)  # horizontal first, as in Compose
        k = int(torch.randint(0, 4, ()).item())
        # rot90(F, 1) = transpose(F[:, ::-1]); rot90(F, 2) = F[::-1, ::-1]; rot90(F, 3) = transpose(F[::-1])
        if k in (1, 2):
            flip_cols = not flip_cols
        if k in (2, 3):
            flip_rows = not flip_rows
        image, label = scale_crop_window(image, label, size, top, left, sc.crop_size, sc.ignore_index,
                                         flip_rows=flip_rows, flip_cols=flip_cols)
        if k in (1, 3):
            image, label = _transpose(image, label)
        return image, label


class ToUint8:
    """numpy image H x W x C and label H x W (views allowed) -> contiguous uint8 torch tensors of the
    same shapes. Batches of them cross to the device as uint8; `BatchNormalize` does the rest there."""

    def __call__(self, image, label):
        image, label = np.ascontiguousarray(image), np.ascontiguousarray(label)
        if image.ndim == 2:
            image = image[:, :, None]
        # read-only memory-mapped store crops are copied here (eval); augmented ones are new arrays
        image = image if image.flags.writeable else image.copy()
        label = label if label.flags.writeable else label.copy()
        return torch.from_numpy(image), torch.from_numpy(label)


class BatchNormalize:
    """On the device, for a whole batch: uint8 N x H x W x C -> float32 N x C x H x W, x / 255, then
    (x - mean) / std per channel (the same operations, in the same order, as ToTensor + Normalize per
    item). channels_last keeps the batch's natural N x H x W x C memory order. Float batches are
    taken as already normalised N x C x H x W and only change memory format.
    """

    def __init__(self, mean, std, channels_last=False):
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._cache = {}

    def _stats(self, device):
        if device not in self._cache:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._cache[device] = (mean.to(device), std.to(device))
        return self._cache[device]

    def __call__(self, images):
        if images.dtype != torch.uint8:
            return images.contiguous(memory_format=self.memory_format)
        if images.shape[-1] != len(self.mean):
            raise ValueError(f"BatchNormalize has {len(self.mean)} channel statistics but the batch has "
                             f"{images.shape[-1]} channels")
        mean, std = self._stats(images.device)
        x = images.permute(0, 3, 1, 2).float().div_(255.0)  # channels_last strides, no copy beyond .float()
        x = (x - mean) / std
        return x.contiguous(memory_format=self.memory_format)


def train_transform(crop_size):
    """Training augmentation on uint8: scale-crop, flips, 90-degree rotations, to uint8 tensors (the
    composition RandomScaleCrop, RandomHorizontalFlip, RandomVerticalFlip, RandomRotation90, computed
    in one pass)."""
    return Compose([RandomScaleCropFlipRotate(crop_size), ToUint8()])


def eval_transform():
    """Validation / test: the stored crop as it is, as uint8 tensors (normalised on the device)."""
    return Compose([ToUint8()])
