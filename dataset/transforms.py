"""Joint image/label transforms for segmentation; picklable, no torchvision.

Image and label always get the same geometry. Random draws use torch's global generator; for training
items IncrementalDataset seeds it per item (dataset.SeededSampler), so workers do not matter.

The data path keeps crops uint8 until the device: items are numpy uint8 (image H x W x C, label H x W),
`RandomScaleCropFlipRotate` resamples only what lands in the crop, with the flips and rotations folded
into one affine map (one OpenCV `warpAffine` per array), `ToUint8` makes them tensors and
`BatchNormalize` converts and normalises the whole batch on the device. The separate transforms it
fuses are kept as its definition: `RandomScaleCrop` (numpy, like the fused one) and, for the per-item
float path of benchmarks/legacy_pipeline.py, `ToTensor` (numpy -> float C x H x W), the flips and
`RandomRotation90` (torch C x H x W) and `Normalize`.
"""
import cv2
import numpy as np
import torch

if int(cv2.__version__.split(".")[0]) < 5:  # 4.x rounds warpAffine's source positions to 1/32 px
    raise ImportError(f"dataset.transforms needs OpenCV 5 or later (found {cv2.__version__}): "
                      f"pip install -U 'opencv-python-headless>=5'")


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


# warpAffine's float-coordinate kernels cover 1, 3 and 4 channels; other counts fall back to a
# fixed-point path that quantises positions to 1/32 px (several grey levels off), so wider images
# are resampled in chunks of these sizes
_CHUNKS = {0: (), 1: (1,), 2: (1, 1), 3: (3,)}


def _channel_chunks(channels):
    """Channel slices of at most 4, none of 2 (5 -> 4 + 1, 6 -> 4 + 1 + 1, 2 -> 1 + 1)."""
    sizes = (4,) * (channels // 4) + _CHUNKS[channels % 4]
    starts = np.cumsum((0,) + sizes)
    return [slice(a, b) for a, b in zip(starts[:-1], starts[1:])]


def _axis_map(start, valid, crop_size, flip):
    """Where the `valid` crop rows (or columns) showing the rescaled image land in the output, and the
    map from output index i in that block to the index in the rescaled image: (first, count, a, b) with
    index = a * i + b."""
    if flip:  # output i shows crop index crop_size - 1 - i; the valid rows end up at the bottom
        first = crop_size - valid
        return first, valid, -1.0, float(start + crop_size - 1 - first)
    return 0, valid, 1.0, float(start)


def _transpose(array):
    """H x W (x C) -> W x H (x C), contiguous; OpenCV's transpose where it takes the pixel size."""
    if array.ndim == 2 or array.shape[2] in (1, 3, 4):
        return cv2.transpose(array).reshape((array.shape[1], array.shape[0]) + array.shape[2:])
    return np.ascontiguousarray(array.transpose(1, 0, 2))


def scale_crop_window(image, label, size, top, left, crop_size, ignore_index=255, flip_rows=False,
                      flip_cols=False, k=0):
    """The crop [top, top + crop_size) x [left, ...) of image/label resized to `size`, padded (image 0,
    label ignore_index) where the resized image ends, then flipped (rows, columns) and rotated by
    k x 90 degrees (as torch.rot90 on (H, W)); only the output pixels are computed.

    image H x W x C (uint8 or float32, any number of bands), label H x W (uint8 or uint16). The image
    is sampled bilinearly like torch's `interpolate(bilinear, align_corners=False)` (half-pixel centres,
    edges replicated); OpenCV's 8-bit kernel lands within 0.53/255 of the exact value (0.5/255 would be
    exact arithmetic rounded once), float32 within float32 error. The label is sampled like torch's
    `interpolate(nearest)`: source row floor(y * H / H'), in exact arithmetic.

    One `cv2.warpAffine` per array does the scale, crop offset, flips and the 180-degree rotation
    (one affine map); 90 and 270 degrees are a flip in that map and a transpose of the crop after it
    (a warp whose map swaps the axes reads the source column-wise, 3-9x slower than warp + transpose).
    """
    h, w = label.shape
    out_h, out_w = size
    channels = image.shape[2]
    # rot90(F, 1) = transpose(F[:, ::-1]); rot90(F, 2) = F[::-1, ::-1]; rot90(F, 3) = transpose(F[::-1])
    k %= 4
    flip_cols ^= k in (1, 2)
    flip_rows ^= k in (2, 3)
    out_image = np.zeros((crop_size, crop_size, channels), dtype=image.dtype)
    out_label = np.full((crop_size, crop_size), ignore_index, dtype=label.dtype)
    rows = max(0, min(crop_size, out_h - top))  # crop rows / columns inside the resized image
    cols = max(0, min(crop_size, out_w - left))
    if rows and cols:
        y0, n_rows, ay, by = _axis_map(top, rows, crop_size, flip_rows)
        x0, n_cols, ax, bx = _axis_map(left, cols, crop_size, flip_cols)
        sx, sy = w / out_w, h / out_h
        # image: half-pixel centres, source x = (u + 0.5) * sx - 0.5 for rescaled-image column u;
        # replicated edges are torch's clamping of the source position
        bilinear = np.array([[ax * sx, 0.0, (bx + 0.5) * sx - 0.5], [0.0, ay * sy, (by + 0.5) * sy - 0.5]])
        # label: floor(u * sx) is the nearest integer to u * sx - 0.5 + 0.5 / out_w (u * sx is a multiple
        # of 1 / out_w, so this stays half a step clear of any rounding boundary; checked exact up to
        # 2048 px rescaled to 4096)
        nearest = np.array([[ax * sx, 0.0, bx * sx - 0.5 + 0.5 / out_w], [0.0, ay * sy, by * sy - 0.5 + 0.5 / out_h]])
        block = (slice(y0, y0 + n_rows), slice(x0, x0 + n_cols))
        dsize = (n_cols, n_rows)
        for chunk in _channel_chunks(channels):
            part = image if chunk.stop - chunk.start == channels else np.ascontiguousarray(image[:, :, chunk])
            warped = cv2.warpAffine(part, bilinear, dsize, flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE)
            out_image[block + (chunk,)] = warped.reshape(n_rows, n_cols, -1)
        out_label[block] = cv2.warpAffine(label, nearest, dsize, flags=cv2.WARP_INVERSE_MAP | cv2.INTER_NEAREST,
                                          borderMode=cv2.BORDER_CONSTANT, borderValue=ignore_index)
    if k in (1, 3):
        return _transpose(out_image), _transpose(out_label)
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


class RandomScaleCropFlipRotate:
    """RandomScaleCrop, RandomHorizontalFlip, RandomVerticalFlip and RandomRotation90 in one step, with
    the same random draws in the same order: one `cv2.warpAffine` per array (scale, crop offset, flips,
    180 degrees), plus a transpose for 90 / 270 degrees (`scale_crop_window`). numpy image H x W x C
    and label H x W in and out.
    """

    def __init__(self, crop_size, scale=(0.5, 2.0), ignore_index=255, p_flip=0.5):
        self.scale_crop = RandomScaleCrop(crop_size, scale, ignore_index)
        self.p_flip = p_flip

    def __call__(self, image, label):
        sc = self.scale_crop
        size, top, left = sc.draw(*label.shape[-2:])
        flip_cols, flip_rows = _coin(self.p_flip), _coin(self.p_flip)  # horizontal first, as in Compose
        k = int(torch.randint(0, 4, ()).item())
        return scale_crop_window(image, label, size, top, left, sc.crop_size, sc.ignore_index,
                                 flip_rows=flip_rows, flip_cols=flip_cols, k=k)


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
