"""Tiles -> crops: the stride-based crop grid, crop names, per-crop class pixel counts, and the writing of a
dataset's tiles into the crop store (dataset/crop_store.py) with the crop entries of meta.json.

The grid's last row/column is aligned to the tile edge, so every pixel is covered; a tile smaller than the
crop is padded (image 0, label 255).
"""
import numpy as np
from PIL import Image

try:  # tqdm is a dependency; stay usable without it
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable, **_):
        return iterable

from dataset.crop_store import KINDS, NpyAppender, store_file, store_meta
from dataset.layout import SPLITS, png_dir
from utils.dataset_spec import IGNORE_INDEX


def count_columns(num_classes):
    """Columns of the per-crop pixel counts: classes 0..K-1, then 255 (ignored)."""
    return [*range(num_classes), IGNORE_INDEX]


def crop_positions(length, crop_size, stride):
    """Start offsets along one axis: every `stride`, the last aligned to the edge (covers all).

    Count = ceil((length - crop) / stride) + 1, or 1 when the axis is shorter than the crop
    (the crop is then padded).
    """
    if length <= crop_size:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, length - crop_size + 1, stride, dtype=np.int64)
    if starts[-1] + crop_size < length:
        starts = np.append(starts, length - crop_size)
    return starts


def crop_name(tile, row, col):
    return f"{tile}_{row:02d}_{col:02d}.png"


def class_pixel_counts(label, num_classes):
    """Pixels per class 0..K-1 and per ignore (255) of a label crop."""
    counts = np.bincount(label.ravel(), minlength=256)
    return counts[count_columns(num_classes)].astype(np.int64)


def _pad_to(array, size, value):
    pad_h, pad_w = size - array.shape[0], size - array.shape[1]
    if pad_h <= 0 and pad_w <= 0:
        return array
    widths = [(0, max(pad_h, 0)), (0, max(pad_w, 0))] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


def _save_png(array, path):
    # compress_level 1: crops are written once and read often; fast writing matters more
    Image.fromarray(np.ascontiguousarray(array)).save(path, compress_level=1)


def crop_tiles(layout, source, tiles, work_dir, crop_size, stride, channels, progress, png=False):
    """Write the crops of `tiles` ([(split, tile, image locator, label locator)]) into the crop store of
    `work_dir` (and PNG previews with `png`); returns meta.json's crop entries (names, origins, class pixel
    counts per split, mean/std of the train pixels, tiles, store). A failure leaves no store file behind."""
    per_split = {split: {"crops": [], "origins": [], "class_pixels": []} for split in SPLITS}
    bands = layout.num_bands(channels)
    writers = {(split, kind): NpyAppender(store_file(work_dir, split, kind),
                                          (crop_size, crop_size, bands) if kind == "images" else (crop_size, crop_size))
               for split in SPLITS for kind in KINDS}
    try:
        meta = _crop_tiles_into(layout, source, tiles, work_dir, crop_size, stride, channels, progress, png,
                                per_split, writers)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return meta


def _crop_tiles_into(layout, source, tiles, work_dir, crop_size, stride, channels, progress, png,
                     per_split, writers):
    tile_info = {}
    channel_sum = np.zeros(layout.num_bands(channels), dtype=np.float64)
    channel_sq_sum = np.zeros(layout.num_bands(channels), dtype=np.float64)
    n_train_pixels = 0

    bar = tqdm(tiles, desc=f"{layout.name} tiles", unit="tile", disable=not progress)
    for split, tile, image_loc, label_loc in bar:  # one tile in memory at a time
        image, raw_label = layout.read_tile(source, image_loc, label_loc, channels)
        label, n_unknown, n_off = layout.decode(raw_label)
        tile_info[tile] = {"split": split, "height": int(image.shape[0]), "width": int(image.shape[1]),
                           "image": source.describe(image_loc), "label": source.describe(label_loc),
                           "off_palette_pixels": n_off, "unknown_pixels": n_unknown}
        del raw_label
        rows = crop_positions(image.shape[0], crop_size, stride)
        cols = crop_positions(image.shape[1], crop_size, stride)
        for r, y in enumerate(rows):
            for c, x in enumerate(cols):
                image_crop = image[y:y + crop_size, x:x + crop_size]
                label_crop = label[y:y + crop_size, x:x + crop_size]
                if split == "train":  # statistics of real pixels only (no padding)
                    values = image_crop.reshape(-1, image.shape[2]).astype(np.float64) / 255.0
                    channel_sum += values.sum(axis=0)
                    channel_sq_sum += np.square(values).sum(axis=0)
                    n_train_pixels += len(values)
                image_crop = _pad_to(image_crop, crop_size, 0)
                label_crop = _pad_to(label_crop, crop_size, IGNORE_INDEX)
                name = crop_name(tile, r, c)
                writers[split, "images"].append(image_crop)
                writers[split, "labels"].append(label_crop)
                if png:
                    _save_png(image_crop, png_dir(work_dir, split, "images") / name)
                    _save_png(label_crop, png_dir(work_dir, split, "labels") / name)
                entry = per_split[split]
                entry["crops"].append(name)
                entry["origins"].append([int(y), int(x)])
                entry["class_pixels"].append(class_pixel_counts(label_crop, len(layout.classes)).tolist())

    mean = channel_sum / n_train_pixels
    std = np.sqrt(np.maximum(channel_sq_sum / n_train_pixels - mean ** 2, 0.0))
    meta = {"mean": mean.round(6).tolist(), "std": std.round(6).tolist(),
            "tiles": {split: [t for s, t, _, _ in tiles if s == split] for split in SPLITS},
            "tile_info": tile_info, "store": None}
    rows = {}
    for split, entry in per_split.items():
        # split files index the crops in sorted name order; the store keeps the order of writing
        rows[split] = sorted(range(len(entry["crops"])), key=entry["crops"].__getitem__)
        meta[split] = {key: [values[i] for i in rows[split]] for key, values in entry.items()}
    meta["store"] = store_meta(rows)
    return meta
