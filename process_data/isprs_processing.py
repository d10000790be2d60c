"""Shared code of the ISPRS processing scripts (docs/data.md: raw and processed layouts; the processed
layout and meta.json's format are utils/data_layout.py's, the crop store's utils/crop_store.py's).

raw archives (zipped or extracted) -> the crop store `<dst>/<dataset>/{train,test}/{images,labels}.npy`
(uint8, memory-mapped by the loader; optional PNG previews `{train,test}/{images,labels}/*.png`),
`meta.json` and the split files of every task in tasks.py (every filter mode of its family).

Layout of the processed dataset:
- crops are named `<tile>_<row>_<col>.png` (also the preview file name; row/col = grid position, zero
  padded); the crop grid
  is stride based with the last row/column aligned to the tile edge, so every pixel is covered;
  a tile smaller than the crop is padded (image 0, label 255);
- meta.json lists the train and test crop names SORTED; split files (MiCro's tasks:
  `<task>/train-<step>.npy` disjoint, `<task>-ov/` overlapped; MiB-CD's tasks: `<task>/` split,
  `<task>-ov/` overlap, `<task>-noov/` noov) are sorted int64 arrays of positions in
  meta["train"]["crops"];
- per-crop class pixel counts (columns = classes 0..5 then 255) are stored so that splits can be
  regenerated (`--splits_only`) without reading any image.
"""
import argparse
import io
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from PIL import Image

try:  # tqdm is a dependency; stay usable without it
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(iterable, **_):
        return iterable

import tasks as task_defs
from utils.colormap import CLASS_NAMES, IGNORE_INDEX, PALETTE, count_off_palette, decode_colors
from utils.crop_store import KINDS, NpyAppender, store_file, store_meta
from utils.data_layout import (
    LABEL_VALUES,
    SPLITS,
    check_meta,
    dataset_dir,
    meta_file,
    meta_header,
    png_dir,
    process_command,
    read_meta,
    save_npy,
    split_file,
    split_folder,
    write_meta,
)
from utils.errors import UserError, exit_on_user_error

NUM_CLASSES = len(CLASS_NAMES)
COUNT_COLUMNS = list(LABEL_VALUES)  # columns of the per-crop pixel counts


# ----------------------------------------------------------------------------------------------
# Official archive layouts
# ----------------------------------------------------------------------------------------------
_VAIHINGEN_AREAS = [a for a in range(1, 39) if a not in (9, 18, 19, 25, 36)]
_VAIHINGEN_TRAIN_AREAS = [1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37]


class VaihingenLayout:
    """ISPRS Vaihingen: 33 areas of IR-R-G true orthophotos at 9 cm."""

    name = "vaihingen"
    train_tiles = [f"area{a}" for a in _VAIHINGEN_TRAIN_AREAS]
    test_tiles = [f"area{a}" for a in _VAIHINGEN_AREAS if a not in _VAIHINGEN_TRAIN_AREAS]
    channel_choices = ("IRRG",)
    default_channels = "IRRG"
    image_archive = "ISPRS_semantic_labeling_Vaihingen"
    label_folders = {"complete": "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE",
                     "eroded": "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"}
    # archives that hold only labels (files at the zip's top level)
    label_archives = dict(label_folders)

    @staticmethod
    def _area(tile):
        return tile[len("area"):]

    def image_folder(self, channels):
        return "top"

    def image_file(self, tile, channels):
        return f"top_mosaic_09cm_area{self._area(tile)}.tif"

    def label_file(self, tile, kind):
        suffix = "_noBoundary" if kind == "eroded" else ""
        return f"top_mosaic_09cm_area{self._area(tile)}{suffix}.tif"

    def archive_hint(self, folder):
        if folder == "top":
            return f"{self.image_archive}.zip (folder top/)"
        return f"{folder}.zip"

    def wanted_folders(self):
        return {self.image_archive, "top", *self.label_folders.values()}


class PotsdamLayout:
    """ISPRS Potsdam: 38 tiles of 6000 x 6000 px at 5 cm; RGB, IRRG and RGBIR orthophotos."""

    name = "potsdam"
    train_tiles = ["2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12",
                   "5_10", "5_11", "5_12", "6_7", "6_8", "6_9", "6_10", "6_11", "6_12",
                   "7_7", "7_8", "7_9", "7_10", "7_11", "7_12"]
    test_tiles = ["2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14",
                  "5_15", "6_13", "6_14", "6_15", "7_13"]
    channel_choices = ("RGB", "IRRG", "RGBIR")
    # RGB like the MiCro paper (and most Potsdam CISS work); --channels IRRG / RGBIR for the others.
    default_channels = "RGB"
    image_archive = "Potsdam"
    image_folders = {"RGB": "2_Ortho_RGB", "IRRG": "3_Ortho_IRRG", "RGBIR": "4_Ortho_RGBIR"}
    label_folders = {"complete": "5_Labels_all", "eroded": "5_Labels_all_noBoundary"}
    label_archives = dict(label_folders)

    def image_folder(self, channels):
        return self.image_folders[channels]

    def image_file(self, tile, channels):
        return f"top_potsdam_{tile}_{channels}.tif"

    def label_file(self, tile, kind):
        suffix = "_noBoundary" if kind == "eroded" else ""
        return f"top_potsdam_{tile}_label{suffix}.tif"

    def archive_hint(self, folder):
        return f"{folder}.zip (inside {self.image_archive}.zip)"

    def wanted_folders(self):
        return {self.image_archive, *self.image_folders.values(), *self.label_folders.values()}


VAIHINGEN = VaihingenLayout()
POTSDAM = PotsdamLayout()
LAYOUTS = {VAIHINGEN.name: VAIHINGEN, POTSDAM.name: POTSDAM}
NUM_BANDS = {"IRRG": 3, "RGB": 3, "RGBIR": 4}


# ----------------------------------------------------------------------------------------------
# Reading the raw archives
# ----------------------------------------------------------------------------------------------
def to_hwc(array, axes=None):
    """Return an image as H x W x C whatever the TIFF's axis order (planar files come as C,H,W)."""
    array = np.asarray(array)
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D image, got shape {array.shape}")
    if axes and len(axes) == 3 and "Y" in axes and "X" in axes:
        channel_axis = next(i for i, a in enumerate(axes) if a not in "YX")
        return np.moveaxis(array, channel_axis, -1)
    # no usable axes information: the channel axis is the short one
    return np.moveaxis(array, int(np.argmin(array.shape)), -1)


class RawSource:
    """The files under --src, found by (folder, file name) whether extracted or inside zips.

    A zip is read member by member (nothing is extracted); a zip inside a zip (Potsdam.zip holds
    one zip per product) is first copied out to a temporary folder, and only when its name is one
    of the folders the dataset needs. A zip's members count as lying in a folder named after the
    zip, so `5_Labels_all.zip` with files at its top level behaves like the extracted folder.
    """

    def __init__(self, src, wanted_folders):
        self.src = Path(src)
        if not self.src.is_dir():
            raise UserError(f"--src {src} is not a folder; give the folder that holds the "
                            f"downloaded ISPRS archives (zipped or extracted)")
        self.wanted = set(wanted_folders)
        self._tmp = tempfile.TemporaryDirectory(prefix="isprs_raw_")
        self._zips = []
        self.entries = []  # (path parts, locator); locator = ("file", path) or ("zip", zipfile, member)
        self._scan_dir(self.src)

    # context manager: closes zips and removes the temporary folder
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for archive in self._zips:
            archive.close()
        self._zips = []
        self._tmp.cleanup()

    def _scan_dir(self, root):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).parts
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if name.lower().endswith(".zip"):
                    self._scan_zip(path, rel + (name[:-4],), str(path))
                else:
                    self.entries.append((rel + (name,), ("file", path)))

    def _scan_zip(self, path, prefix, shown_name):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"cannot open {shown_name} ({err}); the archive is damaged: "
                            f"download it again") from None
        self._zips.append(archive)
        for info in archive.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or not parts or parts[0] == "__MACOSX":
                continue
            if parts[-1].lower().endswith(".zip"):
                stem = parts[-1][:-4]
                if stem in self.wanted:  # nested product archive: copy it out, then read it too
                    nested = Path(self._tmp.name) / f"{len(self._zips)}_{parts[-1]}"
                    with archive.open(info) as member, open(nested, "wb") as out:
                        shutil.copyfileobj(member, out, 1 << 24)
                    self._scan_zip(nested, prefix + parts[:-1] + (stem,),
                                   f"{shown_name}:{info.filename}")
                continue
            self.entries.append((prefix + parts, ("zip", archive, info.filename, shown_name)))

    def find(self, folder, filename):
        """Locator of `filename` lying (at any depth) under a folder called `folder`, or None."""
        matches = [loc for parts, loc in self.entries
                   if parts[-1] == filename and folder in parts[:-1]]
        if not matches:
            return None
        matches.sort(key=lambda loc: loc[0] != "file")  # an extracted file wins over a zip member
        return matches[0]

    def has_folder(self, folder):
        return any(folder in parts[:-1] for parts, _ in self.entries)

    @staticmethod
    def describe(locator):
        if locator[0] == "file":
            return str(locator[1])
        return f"{locator[3]}:{locator[2]}"

    def read_tiff(self, locator):
        """Read a TIFF as H x W x C (planar C,H,W files are transposed)."""
        try:
            if locator[0] == "file":
                handle = tifffile.TiffFile(locator[1])
            else:
                handle = tifffile.TiffFile(io.BytesIO(locator[1].read(locator[2])))
            with handle as tif:
                array = tif.asarray()
                axes = tif.series[0].axes
            return to_hwc(array, axes)
        except Exception as err:  # any failure here means a damaged or foreign file
            raise UserError(f"cannot read {self.describe(locator)} ({type(err).__name__}: {err}); "
                            f"the file is damaged or not a TIFF: download it again") from None


# ----------------------------------------------------------------------------------------------
# Crops and counts
# ----------------------------------------------------------------------------------------------
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


def class_pixel_counts(label):
    """Pixels per class 0..5 and per ignore (255) of a label crop."""
    counts = np.bincount(label.ravel(), minlength=256)
    return counts[COUNT_COLUMNS].astype(np.int64)


def _pad_to(array, size, value):
    pad_h, pad_w = size - array.shape[0], size - array.shape[1]
    if pad_h <= 0 and pad_w <= 0:
        return array
    widths = [(0, max(pad_h, 0)), (0, max(pad_w, 0))] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths, constant_values=value)


def _save_png(array, path):
    # compress_level 1: crops are written once and read often; fast writing matters more
    Image.fromarray(np.ascontiguousarray(array)).save(path, compress_level=1)


# ----------------------------------------------------------------------------------------------
# Split files
# ----------------------------------------------------------------------------------------------
def class_presence(class_pixels, min_pixels):
    """Bool [n_crops, 6]: the crop has at least `min_pixels` pixels of the class."""
    class_pixels = np.asarray(class_pixels, dtype=np.int64).reshape(-1, len(COUNT_COLUMNS))
    return class_pixels[:, :NUM_CLASSES] >= max(int(min_pixels), 1)


def _step_has(presence, steps):
    return np.stack([presence[:, classes].any(axis=1) for classes in steps], axis=1)


def overlapped_split(presence, steps):
    """Step t gets every crop that contains a class of step t."""
    step_has = _step_has(presence, steps)
    return [np.flatnonzero(step_has[:, t]).astype(np.int64) for t in range(len(steps))]


def disjoint_split(presence, steps, seed):
    """Seeded partition: each crop goes to one step whose new classes it contains, or to none.

    Crops with a single possible step are placed first; then, in a seeded random order, each
    remaining crop goes to the candidate step whose classes present in the crop are the least
    covered so far (crops per class), ties broken at random: a greedy per-class balance.
    """
    presence = np.asarray(presence, dtype=bool)
    step_has = _step_has(presence, steps)
    n_options = step_has.sum(axis=1)
    rng = np.random.default_rng(seed)
    random_rank = rng.permutation(len(presence))
    order = np.lexsort((random_rank, n_options))
    order = order[n_options[order] > 0]
    tie_break = rng.random((len(presence), len(steps))) * 0.5  # < 1: only separates equal counts

    step_classes = [np.asarray(classes) for classes in steps]
    coverage = np.zeros(presence.shape[1], dtype=np.int64)  # crops assigned per class
    assigned = np.full(len(presence), -1, dtype=np.int64)
    for crop in order:  # a loop over crops (objects), each step vectorised
        options = np.flatnonzero(step_has[crop])
        if len(options) == 1:
            choice = options[0]
        else:
            need = [coverage[step_classes[s][presence[crop, step_classes[s]]]].min()
                    + tie_break[crop, s] for s in options]
            choice = options[int(np.argmin(need))]
        assigned[crop] = choice
        coverage[step_classes[choice][presence[crop, step_classes[choice]]]] += 1
    return [np.flatnonzero(assigned == t).astype(np.int64) for t in range(len(steps))]


def class_balanced_split(presence, steps, seed):
    """MiB-CD's `split` mode: a seeded, class-balanced, disjoint partition of the crops.

    Crops are visited in a seeded random order; each goes to the class of the task present in it
    that has the fewest crops so far (ties: the lower ISPRS index), and step t gets the crops
    assigned to its classes. Crops holding no class of the task go nowhere.
    """
    presence = np.asarray(presence, dtype=bool)
    task_classes = sorted(c for classes in steps for c in classes)
    present = presence[:, task_classes]
    order = np.random.default_rng(seed).permutation(len(presence))
    coverage = np.zeros(len(task_classes), dtype=np.int64)
    owner = np.full(len(presence), -1, dtype=np.int64)  # ISPRS class each crop is assigned to
    for crop in order:  # sequential greedy: each choice depends on the previous ones
        candidates = np.flatnonzero(present[crop])
        if len(candidates):
            pick = candidates[np.argmin(coverage[candidates])]
            coverage[pick] += 1
            owner[crop] = task_classes[pick]
    return [np.flatnonzero(np.isin(owner, classes)).astype(np.int64) for classes in steps]


def no_overlap_split(presence, steps):
    """MiB-CD's `noov` mode: crops with a class of step t and no class of a later step."""
    step_has = _step_has(presence, steps)
    future = np.flip(np.cumsum(np.flip(step_has, axis=1), axis=1), axis=1) - step_has  # later steps present
    return [np.flatnonzero(step_has[:, t] & (future[:, t] == 0)).astype(np.int64) for t in range(len(steps))]


def task_splits(family, presence, steps, seed):
    """{filter mode: per-step crop indices} of one task of a family (tasks.FILTER_MODES)."""
    if family == task_defs.MIBCD:
        return {"split": class_balanced_split(presence, steps, seed),
                "overlap": overlapped_split(presence, steps), "noov": no_overlap_split(presence, steps)}
    return {"disjoint": disjoint_split(presence, steps, seed), "overlap": overlapped_split(presence, steps)}


def write_splits(folder, meta):
    """Write the split files of every filter mode of every task (both families); returns their sizes."""
    seed, min_pixels = meta["split"]["seed"], meta["split"]["min_pixels"]
    presence = class_presence(meta["train"]["class_pixels"], min_pixels)
    sizes = {}
    for task, (family, step_dict) in task_defs.all_tasks(meta["dataset"]).items():
        steps = [step_dict[s] for s in sorted(step_dict)]
        suffixes = task_defs.FILTER_MODES[family]
        for mode, per_step in task_splits(family, presence, steps, seed).items():
            for step, indices in enumerate(per_step):
                save_npy(split_file(folder, task, suffixes[mode], step), np.sort(indices))
            sizes[split_folder(task, suffixes[mode])] = [int(len(indices)) for indices in per_step]
    return sizes


def default_min_pixels(crop_size):
    """0.1 % of a crop (at least 1 px): a sliver of a class does not make a crop 'contain' it."""
    return max(1, crop_size * crop_size // 1000)


# ----------------------------------------------------------------------------------------------
# Processing
# ----------------------------------------------------------------------------------------------
def _locate_tiles(layout, source, channels, test_labels):
    """[(split, tile, image locator, label locator)] for the official tiles present in --src."""
    image_folder = layout.image_folder(channels)
    if not source.has_folder(image_folder):
        raise UserError(f"no image folder '{image_folder}' under --src {source.src} (expected from "
                        f"{layout.archive_hint(image_folder)}); put the downloaded {layout.name} "
                        f"archives there, zipped or extracted")
    complete_folder = layout.label_folders["complete"]
    if not source.has_folder(complete_folder):
        raise UserError(f"no label folder '{complete_folder}' under --src {source.src} (expected "
                        f"from {layout.archive_hint(complete_folder)}); download the complete "
                        f"ground truth of {layout.name}")
    if test_labels is None:  # eroded when that archive is there (the ISPRS convention)
        test_labels = "eroded" if source.has_folder(layout.label_folders["eroded"]) else "complete"
        if test_labels == "complete":
            print(f"note: no '{layout.label_folders['eroded']}' under --src: test labels are the "
                  f"complete ones", flush=True)
    elif not source.has_folder(layout.label_folders[test_labels]):
        raise UserError(f"--test_labels {test_labels}: no folder '{layout.label_folders[test_labels]}' "
                        f"under --src {source.src}; add "
                        f"{layout.archive_hint(layout.label_folders[test_labels])} or choose "
                        f"--test_labels complete")

    found = []
    for split, tiles, kind in (("train", layout.train_tiles, "complete"),
                               ("test", layout.test_tiles, test_labels)):
        for tile in tiles:
            image = source.find(image_folder, layout.image_file(tile, channels))
            if image is None:
                continue
            label_folder, label_file = layout.label_folders[kind], layout.label_file(tile, kind)
            label = source.find(label_folder, label_file)
            if label is None:
                raise UserError(f"image {source.describe(image)} has no label: expected "
                                f"{label_folder}/{label_file} under --src {source.src}")
            found.append((split, tile, image, label))
    for split, tiles in (("train", layout.train_tiles), ("test", layout.test_tiles)):
        if not any(entry[0] == split for entry in found):
            raise UserError(f"no official {split} tile of {layout.name} found in '{image_folder}' "
                            f"under --src {source.src} (expected e.g. "
                            f"{image_folder}/{layout.image_file(tiles[0], channels)})")
    return found, test_labels


def _read_tile(source, layout, image_loc, label_loc, channels):
    image = source.read_tiff(image_loc)
    label_rgb = source.read_tiff(label_loc)
    bands = NUM_BANDS[channels]
    if image.dtype != np.uint8 or image.shape[2] != bands:
        raise UserError(f"{source.describe(image_loc)} is {image.shape[2]}-band {image.dtype}; "
                        f"expected {bands}-band uint8 {channels} (wrong file in the "
                        f"'{layout.image_folder(channels)}' folder?)")
    if label_rgb.shape[2] < 3:
        raise UserError(f"{source.describe(label_loc)} is not an RGB colour label image "
                        f"(shape {label_rgb.shape}); use the official ISPRS label archive")
    if label_rgb.dtype != np.uint8:
        raise UserError(f"{source.describe(label_loc)} has dtype {label_rgb.dtype}; expected uint8 "
                        f"colour labels")
    if image.shape[:2] != label_rgb.shape[:2]:
        raise UserError(f"size mismatch: {source.describe(image_loc)} is {image.shape[0]}x"
                        f"{image.shape[1]} but its label {source.describe(label_loc)} is "
                        f"{label_rgb.shape[0]}x{label_rgb.shape[1]}; re-extract both archives")
    return image, label_rgb


def _check_sizes(crop_size, stride, min_pixels):
    if crop_size is None or crop_size < 1:
        raise UserError(f"--crop_size {crop_size}: must be a positive number of pixels")
    if stride is None or not 1 <= stride <= crop_size:
        raise UserError(f"--stride {stride}: must be between 1 and --crop_size ({crop_size}) so that "
                        f"the crops cover every pixel")
    if min_pixels is not None and min_pixels < 1:
        raise UserError(f"--min_pixels {min_pixels}: must be at least 1")


def process_dataset(layout, src, dst, crop_size=512, stride=None, test_labels=None, seed=42,
                    min_pixels=None, channels=None, progress=True, png=False):
    """Crop the raw archives of one dataset into `<dst>/<name>/`; returns meta.json's content.

    The result is built in a temporary sibling folder and moved into place at the end, so a
    failed run never leaves a half-written dataset behind.
    """
    start = time.time()
    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    stride = crop_size if stride is None else stride
    _check_sizes(crop_size, stride, min_pixels)
    channels = channels or layout.default_channels
    if channels not in layout.channel_choices:
        raise UserError(f"--channels {channels}: {layout.name} has {', '.join(layout.channel_choices)}")
    if test_labels not in (None, "eroded", "complete"):
        raise UserError(f"--test_labels {test_labels}: choose eroded or complete")
    min_pixels = default_min_pixels(crop_size) if min_pixels is None else int(min_pixels)
    dst = Path(dst)
    final_dir = dataset_dir(dst, layout.name)
    work_dir = dst / f".{layout.name}.partial-{os.getpid()}"

    with RawSource(src, layout.wanted_folders()) as source:
        tiles, test_labels = _locate_tiles(layout, source, channels, test_labels)
        try:
            dst.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --dst {dst} ({err.strerror}); choose a writable folder") from None
        shutil.rmtree(work_dir, ignore_errors=True)
        for split in SPLITS:
            for kind in KINDS if png else ():
                png_dir(work_dir, split, kind).mkdir(parents=True)
        try:
            crops = _crop_tiles(layout, source, tiles, work_dir, crop_size, stride, channels, progress, png)
        except BaseException:
            shutil.rmtree(work_dir, ignore_errors=True)
            raise

    meta = {
        **meta_header(layout.name),
        "classes": list(CLASS_NAMES),
        "palette": PALETTE.tolist(),
        "ignore_index": IGNORE_INDEX,
        "crop_size": crop_size,
        "stride": stride,
        "channels": channels,
        "num_channels": NUM_BANDS[channels],
        "train_labels": "complete",
        "test_labels": test_labels,
        "count_columns": COUNT_COLUMNS,
        "split": {"seed": int(seed), "min_pixels": min_pixels,
                  "index": "split files hold positions in train.crops (the sorted list of train "
                           "crop names)"},
        **crops,
    }
    try:
        meta["split"]["sizes"] = write_splits(work_dir, meta)
        meta["processing_seconds"] = round(time.time() - start, 2)
        write_meta(work_dir, meta)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise

    # swap the finished folder into place; an older processed copy is removed only afterwards
    old_dir = dst / f".{layout.name}.old-{os.getpid()}"
    if final_dir.exists():
        os.replace(final_dir, old_dir)
    os.replace(work_dir, final_dir)
    shutil.rmtree(old_dir, ignore_errors=True)
    return meta


def _crop_tiles(layout, source, tiles, work_dir, crop_size, stride, channels, progress, png=False):
    per_split = {split: {"crops": [], "origins": [], "class_pixels": []} for split in SPLITS}
    bands = NUM_BANDS[channels]
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
    channel_sum = np.zeros(NUM_BANDS[channels], dtype=np.float64)
    channel_sq_sum = np.zeros(NUM_BANDS[channels], dtype=np.float64)
    n_train_pixels = 0

    bar = tqdm(tiles, desc=f"{layout.name} tiles", unit="tile", disable=not progress)
    for split, tile, image_loc, label_loc in bar:  # one tile in memory at a time
        image, label_rgb = _read_tile(source, layout, image_loc, label_loc, channels)
        label, n_unknown = decode_colors(label_rgb)
        tile_info[tile] = {"split": split, "height": int(image.shape[0]), "width": int(image.shape[1]),
                           "image": source.describe(image_loc), "label": source.describe(label_loc),
                           "off_palette_pixels": count_off_palette(label_rgb),
                           "unknown_pixels": n_unknown}
        del label_rgb
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
                entry["class_pixels"].append(class_pixel_counts(label_crop).tolist())

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


def regenerate_splits(dst, dataset, seed=None, min_pixels=None):
    """Rewrite every split file of a processed dataset from meta.json alone (no image is read)."""
    folder = dataset_dir(dst, dataset)
    path = meta_file(folder)
    meta = check_meta(read_meta(path, f"process the raw archives first with `{process_command(dst, dataset)}`",
                                "process the dataset again"), path, dst, dataset)
    if seed is not None:
        meta["split"]["seed"] = int(seed)
    if min_pixels is not None:
        if min_pixels < 1:
            raise UserError(f"--min_pixels {min_pixels}: must be at least 1")
        meta["split"]["min_pixels"] = int(min_pixels)
    meta["split"]["sizes"] = write_splits(folder, meta)
    write_meta(folder, meta)
    return meta


# ----------------------------------------------------------------------------------------------
# Report and command line
# ----------------------------------------------------------------------------------------------
def class_frequencies(meta, split):
    """% of labelled pixels per class (ignored pixels excluded) over a split's crops."""
    counts = np.asarray(meta[split]["class_pixels"], dtype=np.float64)[:, :NUM_CLASSES].sum(axis=0)
    return (100.0 * counts / max(counts.sum(), 1.0)).tolist()


def print_report(meta):
    name = meta["dataset"]
    print(f"{name}: {len(meta['train']['crops'])} train / {len(meta['test']['crops'])} test crops "
          f"of {meta['crop_size']} px (stride {meta['stride']}) from {len(meta['tiles']['train'])} + "
          f"{len(meta['tiles']['test'])} tiles; channels {meta['channels']}; test labels "
          f"{meta['test_labels']}")
    for split in SPLITS:
        freq = class_frequencies(meta, split)
        print(f"  {split} class pixels %: " + ", ".join(
            f"{cls} {value:.1f}" for cls, value in zip(meta["classes"], freq)))
    print(f"  mean {meta['mean']} std {meta['std']} (0-1 units, train crops)")
    odd = {t: i for t, i in meta["tile_info"].items() if i["off_palette_pixels"] or i["unknown_pixels"]}
    for tile, info in odd.items():
        print(f"  tile {tile}: {info['off_palette_pixels']} off-palette label pixels snapped to the "
              f"ISPRS colours, {info['unknown_pixels']} of unknown colour set to ignore (255)")
    if not odd:
        print("  labels: every pixel has an exact ISPRS colour")
    empty = [f"{task} step {step}" for task, sizes in meta["split"]["sizes"].items()
             for step, size in enumerate(sizes) if size == 0]
    noov = [e for e in empty if "-noov " in e]  # empty by design where a later class is almost everywhere
    if len(noov) < len(empty):
        print(f"  warning: empty split steps: {', '.join(e for e in empty if e not in noov)}")
    if noov:
        print(f"  note: MiB-CD's noov mode has no crop for {', '.join(noov)} (a class of a later step is "
              f"in every crop holding theirs)")
    if "processing_seconds" in meta:
        print(f"  done in {meta['processing_seconds']:.1f} s")


def build_parser(layout):
    parser = argparse.ArgumentParser(
        description=f"Crop the ISPRS {layout.name} archives into the crop store, meta.json and the split "
                    f"files of every task (docs/data.md#processing).")
    parser.add_argument("--src", help="folder holding the downloaded archives, zipped or extracted")
    parser.add_argument("--dst", required=True, help="data root; the dataset goes to DST/" + layout.name)
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--stride", type=int, default=None, help="default: the crop size")
    parser.add_argument("--test_labels", choices=("eroded", "complete"), default=None,
                        help="labels of the test crops (default: eroded when that archive is there)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the disjoint and MiB-CD split partitions (default 42; with "
                             "--splits_only the seed in meta.json)")
    parser.add_argument("--min_pixels", type=int, default=None,
                        help="pixels of a class for a crop to contain it (default 0.1%% of a crop; "
                             "with --splits_only the value in meta.json)")
    parser.add_argument("--splits_only", action="store_true",
                        help=f"only rewrite the split files from DST/{layout.name}/meta.json")
    if len(layout.channel_choices) > 1:
        parser.add_argument("--channels", choices=layout.channel_choices,
                            default=layout.default_channels,
                            help=f"orthophoto product to crop (default {layout.default_channels}, "
                                 f"as in the MiCro paper)")
    parser.add_argument("--png", action="store_true",
                        help="also write every crop as PNG previews (train|test/images|labels/*.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main_for(layout):
    """Command-line entry point of one dataset's processing script."""

    @exit_on_user_error
    def main(argv=None):
        args = build_parser(layout).parse_args(argv)
        if args.splits_only:
            meta = regenerate_splits(args.dst, layout.name, seed=args.seed, min_pixels=args.min_pixels)
            print(f"{layout.name}: split files rewritten in {dataset_dir(args.dst, layout.name)} (seed "
                  f"{meta['split']['seed']}, min_pixels {meta['split']['min_pixels']})")
            return meta
        if not args.src:
            raise UserError("--src is required (the folder holding the raw archives), unless "
                            "--splits_only")
        meta = process_dataset(layout, args.src, args.dst, crop_size=args.crop_size,
                               stride=args.stride, test_labels=args.test_labels,
                               seed=42 if args.seed is None else args.seed,
                               min_pixels=args.min_pixels,
                               channels=getattr(args, "channels", None), progress=not args.quiet,
                               png=args.png)
        print_report(meta)
        return meta

    return main
