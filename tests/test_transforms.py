"""The OpenCV scale-crop-flip-rotate against a slow per-pixel evaluation of its formula, and its random
draws against the chain of separate transforms it fuses."""
import math

import numpy as np
import pytest
import torch

from dataset.transforms import (
    Compose,
    RandomHorizontalFlip,
    RandomRotation90,
    RandomScaleCrop,
    RandomScaleCropFlipRotate,
    RandomVerticalFlip,
    scale_crop_window,
)

# uint8 images: OpenCV's 8-bit bilinear kernel is within 0.525 grey levels of the exact value over
# thousands of random cases (0.5 would be exact arithmetic rounded once)
UINT8_BOUND = 0.6


def reference(image, label, size, top, left, crop, flip_rows, flip_cols, k, ignore=255):
    """Per output pixel: the bilinear sample (half-pixel centres, edges clamped) of the image rescaled to
    `size`, the nearest label (source floor(y * H / H')), image 0 / label `ignore` beyond the rescaled
    image; then the flips and torch.rot90 by k. float64 image."""
    h, w = label.shape
    out_h, out_w = size
    channels = image.shape[2]
    img = np.zeros((crop, crop, channels))
    lab = np.full((crop, crop), ignore, dtype=label.dtype)
    src = image.astype(np.float64)
    for r in range(crop):
        for c in range(crop):
            y, x = top + r, left + c
            if y >= out_h or x >= out_w:
                continue
            lab[r, c] = label[min(y * h // out_h, h - 1), min(x * w // out_w, w - 1)]
            sy = max((y + 0.5) * h / out_h - 0.5, 0.0)
            sx = max((x + 0.5) * w / out_w - 0.5, 0.0)
            y0, x0 = math.floor(sy), math.floor(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            ay, ax = sy - y0, sx - x0
            top_row = src[y0, x0] * (1 - ax) + src[y0, x1] * ax
            bottom_row = src[y1, x0] * (1 - ax) + src[y1, x1] * ax
            img[r, c] = top_row * (1 - ay) + bottom_row * ay
    if flip_rows:
        img, lab = img[::-1], lab[::-1]
    if flip_cols:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = torch.rot90(torch.from_numpy(img.copy()), k, dims=(0, 1)).numpy()
    lab = torch.rot90(torch.from_numpy(lab.copy()), k, dims=(0, 1)).numpy()
    return img, lab


def random_case(rng, channels, dtype=np.uint8):
    h, w = (int(v) for v in rng.integers(6, 40, size=2))
    crop = int(rng.integers(4, 20))
    s = rng.uniform(0.5, 2.0)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    top = int(rng.integers(0, max(size[0], crop) - crop + 1))
    left = int(rng.integers(0, max(size[1], crop) - crop + 1))
    image = rng.integers(0, 256, (h, w, channels)).astype(dtype)
    if dtype != np.uint8:
        image /= 255
    label = rng.integers(0, 7, (h, w)).astype(np.uint8)
    label[label == 6] = 255
    geometry = dict(flip_rows=bool(rng.integers(2)), flip_cols=bool(rng.integers(2)), k=int(rng.integers(4)))
    return image, label, size, top, left, crop, geometry


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 6, 7, 9])
def test_uint8_window_matches_the_per_pixel_formula(channels):
    """Every flip/rotation, padding and 1-9 bands (warpAffine is only accurate on 1, 3 or 4 channels;
    wider images go in chunks): labels exactly equal, images within UINT8_BOUND grey levels."""
    rng = np.random.default_rng(channels)
    worst, padded, geometries = 0.0, 0, set()
    for _ in range(40):
        image, label, size, top, left, crop, geometry = random_case(rng, channels)
        out_image, out_label = scale_crop_window(image, label, size, top, left, crop, **geometry)
        ref_image, ref_label = reference(image, label, size, top, left, crop, **geometry)
        assert out_image.shape == (crop, crop, channels) and out_image.dtype == np.uint8
        assert out_label.dtype == label.dtype
        np.testing.assert_array_equal(out_label, ref_label)
        worst = max(worst, np.abs(out_image - ref_image).max())
        padded += bool(size[0] < top + crop or size[1] < left + crop)
        geometries.add(tuple(geometry.values()))
    assert worst <= UINT8_BOUND
    assert padded >= 5 and len(geometries) >= 10  # the cases really cover padding, flips and rotations


def test_float_window_matches_the_per_pixel_formula():
    """float32 input: no rounding; float32 source positions (1e-7 from the float64 formula with OpenCV 5.1
    over thousands of cases, 2e-6 with 5.0)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        image, label, size, top, left, crop, geometry = random_case(rng, 3, np.float32)
        image = image.astype(np.float32)
        out_image, out_label = scale_crop_window(image, label, size, top, left, crop, **geometry)
        ref_image, ref_label = reference(image, label, size, top, left, crop, **geometry)
        assert out_image.dtype == np.float32
        np.testing.assert_array_equal(out_label, ref_label)
        np.testing.assert_allclose(out_image, ref_image, rtol=0, atol=1e-5)


def test_scale_one_is_an_exact_copy():
    """Scale 1 moves pixels only: bit-exact crops, flips and rotations of the input."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (30, 30, 5)).astype(np.uint8)
    label = rng.integers(0, 6, (30, 30)).astype(np.uint8)
    for k in range(4):
        out_image, out_label = scale_crop_window(image, label, (30, 30), 3, 7, 16, flip_rows=True, k=k)
        expected = torch.rot90(torch.from_numpy(image[3:19, 7:23][::-1].copy()), k, dims=(0, 1)).numpy()
        assert np.array_equal(out_image, expected)
        assert np.array_equal(out_label, torch.rot90(torch.from_numpy(label[3:19, 7:23][::-1].copy()), k).numpy())


def test_fused_transform_draws_like_the_chain_it_replaces():
    """Same seed: the fused transform makes the same generator calls in the same order as RandomScaleCrop,
    RandomHorizontalFlip, RandomVerticalFlip, RandomRotation90 (same state after), hence the same crop:
    labels equal, images within one grey level (the two paths round the source coordinates differently)."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 40, 4)).astype(np.uint8)
    label = rng.integers(0, 6, (40, 40)).astype(np.uint8)
    fused = RandomScaleCropFlipRotate(24)
    # the chain's flips and rotation work on C x H x W tensors
    flips_rotation = Compose([RandomHorizontalFlip(), RandomVerticalFlip(), RandomRotation90()])
    outputs = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out_image, out_label = fused(image, label)
        after_fused = torch.get_rng_state()
        torch.manual_seed(seed)
        crop_image, crop_label = RandomScaleCrop(24)(image, label)
        chain_image, chain_label = flips_rotation(torch.from_numpy(crop_image).permute(2, 0, 1),
                                                  torch.from_numpy(crop_label))
        assert torch.equal(torch.get_rng_state(), after_fused)
        assert np.array_equal(out_label, chain_label.numpy())
        assert np.abs(out_image.astype(int) - chain_image.permute(1, 2, 0).numpy().astype(int)).max() <= 1
        outputs.add(out_label.tobytes())
    assert len(outputs) == 30
