"""Any tiled dataset described by a spec (utils/dataset_spec.py) -> the processed layout (docs/data.md: raw and
processed layouts; the processed layout and meta.json's format are utils/data_layout.py's, the crop store's
utils/crop_store.py's). process_data/process_dataset.py runs it on a spec file; the built-in datasets'
scripts run it on their shipped specs (ISPRS: plus its archive quirks, process_data/isprs_processing.py).

raw archives (zipped or extracted) -> the crop store `<dst>/<dataset>/{train,test}/{images,labels}.npy`
(uint8, memory-mapped by the loader; optional PNG previews `{train,test}/{images,labels}/*.png`),
`meta.json` and the split files of every task of the dataset (every filter mode of its family).

Layout of the processed dataset:
- crops are named `<tile>_<row>_<col>.png` (also the preview file name; row/col = grid position, zero
  padded); the crop grid
  is stride based with the last row/column aligned to the tile edge, so every pixel is covered;
  a tile smaller than the crop is padded (image 0, label 255);
- labels hold class indices (position in the spec's classes) and 255 (ignored);
- meta.json lists the train and test crop names SORTED; split files (MiCro's tasks:
  `<task>/train-<step>.npy` disjoint, `<task>-ov/` overlapped; MiB-CD's tasks: `<task>/` split,
  `<task>-ov/` overlap, `<task>-noov/` noov) are sorted int64 arrays of positions in
  meta["train"]["crops"];
- per-crop class pixel counts (columns = classes 0..K-1 then 255) are stored so that splits can be
  regenerated (`--splits_only`) without reading any image.
"""
import argparse
import io
import os
import re
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
from utils.crop_store import KINDS, NpyAppender, store_file, store_meta
from utils.data_layout import (
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
from utils.dataset_spec import IGNORE_INDEX, DatasetSpec, builtin_spec, load_spec
from utils.errors import UserError, exit_on_user_error


def count_columns(num_classes):
    """Columns of the per-crop pixel counts: classes 0..K-1, then 255 (ignored)."""
    return [*range(num_classes), IGNORE_INDEX]


# ----------------------------------------------------------------------------------------------
# Where a spec's tiles are in --src
# ----------------------------------------------------------------------------------------------
def _file_regex(name):
    pieces = [re.escape(p).replace(r"\*", "[^/]*") for p in name.split("{tile}")]
    return pieces[0] + "(?P<tile>[^/]+?)" + pieces[1]


def _pattern_regex(pattern):
    """Regex over `folder/.../file` for a spec path pattern: its folders in order, each at any depth below
    the previous one (`*` = any folder), its file name with {tile} captured (`*` = any characters)."""
    *folders, name = pattern.split("/")
    any_folders = "(?:[^/]+/)*"
    head = any_folders + "".join(("[^/]+/" if f == "*" else re.escape(f) + "/") + any_folders
                                 for f in folders if f)
    return re.compile("^" + head + _file_regex(name) + "$")


def _pattern_folder(pattern):
    return pattern.rsplit("/", 1)[0] if "/" in pattern else "."


class SpecLayout:
    """A dataset spec applied to the files under --src: which tiles, their image and label files, and how
    a raw tile becomes an image (H x W x bands uint8) and a class-index label. Subclasses add an archive's
    quirks (process_data/isprs_processing.py)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.name = spec.name
        self.channel_choices = tuple(spec.channels)
        self.default_channels = spec.default_channels

    @property
    def classes(self):
        return list(self.spec.classes)

    def num_bands(self, channels):
        return self.spec.num_bands[channels]

    def wanted_folders(self):
        """Folder names a nested zip may carry (the literal folders of every pattern)."""
        patterns = [p for sources in self.spec.splits.values() for source in sources
                    for table in (source["images"], source["label_files"]) for p in table.values()]
        return {f for p in patterns for f in p.split("/")[:-1] if f not in ("*", "")}

    def archive_hint(self, folder):
        return f"the {self.name} archive, folder {folder}/"

    def default_test_labels(self, source):
        """The first of the spec's test label variants whose folder is under --src."""
        for variant in self.spec.test_labels:
            if self._variant_present(source, variant):
                return variant
        return self.spec.test_labels[0]

    def _variant_present(self, source, variant):
        return any(source.matching(s["label_files"][variant])
                   for sources in self.spec.splits.values() for s in sources)

    def check_variants(self, source, channels, test_labels):
        """The test label variant to use (`test_labels` or the default); UserError when it is missing."""
        if test_labels is None:
            return self.default_test_labels(source)
        if test_labels not in self.spec.label_files:
            raise UserError(f"--test_labels {test_labels}: {self.name} has {', '.join(self.spec.label_files)}")
        return test_labels

    def _tile_ids(self, source, split, entry, channels):
        """Tile ids of one source of a split: its list, its list file, or every image file matching its
        pattern (sorted)."""
        pattern = self.spec.image_pattern(entry, channels)
        if entry["tiles"] is not None:
            return list(entry["tiles"])
        if entry["list"]:
            locator = source.find_path(entry["list"])
            if locator is None:
                raise UserError(f"no list file {entry['list']} under --src {source.src} ({split} tiles of "
                                f"{self.name}); put the unpacked archive there")
            file_regex = re.compile("^" + _file_regex(pattern.rsplit("/", 1)[-1]) + "$")
            ids = []
            for line in source.read_bytes(locator).decode().splitlines():
                line = line.strip().rsplit("/", 1)[-1]
                if line:
                    match = file_regex.match(line)
                    ids.append(match.group("tile") if match else line)
            return ids
        return sorted(source.matching(pattern))

    def locate(self, source, channels, test_labels):
        """[(split, tile, image locator, label locator)] of the spec's tiles present in --src, and the
        test label variant used."""
        test_labels = self.check_variants(source, channels, test_labels)
        found, names = [], set()
        for split in SPLITS:
            variant = self.spec.train_labels if split == "train" else test_labels
            for entry in self.spec.splits[split]:
                pattern = self.spec.image_pattern(entry, channels)
                for tile in self._tile_ids(source, split, entry, channels):
                    image = source.find_pattern(pattern, tile)
                    if image is None:
                        continue  # tiles absent from --src are skipped
                    label_pattern = entry["label_files"][variant]
                    label = source.find_pattern(label_pattern, tile)
                    if label is None:
                        self.missing_label(source, image, label_pattern.replace("{tile}", tile))
                    name = entry["name"].replace("{tile}", tile)
                    if name in names:
                        raise UserError(f"tile {name} of {self.name} is found twice under --src {source.src} "
                                        f"({source.describe(image)}); give each source of the spec its own "
                                        f'"name", e.g. "urban{{tile}}"')
                    found.append((split, name, image, label))
                    names.add(name)
        for split in SPLITS:
            if not any(e[0] == split for e in found):
                self.no_tiles(source, split, channels)
        return found, test_labels

    def missing_label(self, source, image, label_path):
        raise UserError(f"image {source.describe(image)} has no label: expected {label_path} under --src "
                        f"{source.src}")

    def no_tiles(self, source, split, channels):
        pattern = self.spec.image_pattern(self.spec.splits[split][0], channels)
        raise UserError(f"no {split} tile of {self.name} found under --src {source.src} (expected files like "
                        f"{pattern}); put the unpacked archive there")

    def read_tile(self, source, image_loc, label_loc, channels):
        """(image H x W x bands uint8, raw label) of one tile; UserError for a wrong file."""
        image = source.read_image(image_loc)
        raw_label = source.read_image(label_loc)
        bands = self.num_bands(channels)
        if image.dtype != np.uint8 or image.shape[2] != bands:
            raise UserError(f"{source.describe(image_loc)} is {image.shape[2]}-band {image.dtype}; "
                            f"expected {bands}-band uint8 {channels} (wrong file in the "
                            f"'{_pattern_folder(self.spec.images.get(channels, ''))}' folder?)")
        self.check_label(source, label_loc, raw_label)
        if image.shape[:2] != raw_label.shape[:2]:
            raise UserError(f"size mismatch: {source.describe(image_loc)} is {image.shape[0]}x"
                            f"{image.shape[1]} but its label {source.describe(label_loc)} is "
                            f"{raw_label.shape[0]}x{raw_label.shape[1]}; re-extract both archives")
        return image, raw_label

    def check_label(self, source, label_loc, raw_label):
        if self.spec.encoding == "rgb" and raw_label.shape[2] < 3:
            raise UserError(f"{source.describe(label_loc)} is not an RGB colour label image (shape "
                            f"{raw_label.shape}); {self.name}'s spec declares colour labels")
        if self.spec.encoding == "index" and raw_label.shape[2] != 1:
            raise UserError(f"{source.describe(label_loc)} has {raw_label.shape[2]} bands; {self.name}'s spec "
                            f"declares single-band index labels")
        if raw_label.dtype != np.uint8:
            raise UserError(f"{source.describe(label_loc)} has dtype {raw_label.dtype}; expected uint8 labels")

    def decode(self, raw_label):
        """(class index map, unknown pixels, off-palette pixels) of a raw label tile."""
        return self.spec.decode(raw_label)


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
                            f"downloaded archives (zipped or extracted)")
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

    def _by_name(self):
        if not hasattr(self, "_names"):
            self._names = {}
            for parts, loc in self.entries:
                self._names.setdefault(parts[-1], []).append((parts, loc))
        return self._names

    def find_pattern(self, pattern, tile):
        """Locator of the file of spec path `pattern` (utils/dataset_spec.py) for `tile`, or None."""
        regex = _pattern_regex(pattern)
        name = pattern.rsplit("/", 1)[-1].replace("{tile}", tile)
        candidates = self.entries if "*" in name else self._by_name().get(name, [])
        matches = [loc for parts, loc in candidates
                   if (m := regex.match("/".join(parts))) is not None and m.group("tile") == tile]
        matches.sort(key=lambda loc: loc[0] != "file")  # an extracted file wins over a zip member
        return matches[0] if matches else None

    def matching(self, pattern):
        """The tile ids of every file matching spec path `pattern`."""
        regex = _pattern_regex(pattern)
        return {m.group("tile") for parts, _ in self.entries if (m := regex.match("/".join(parts)))}

    def find_path(self, path):
        """Locator of the file `path` (its last folders and name) at any depth, or None."""
        wanted = tuple(path.split("/"))
        matches = [loc for parts, loc in self._by_name().get(wanted[-1], []) if parts[-len(wanted):] == wanted]
        matches.sort(key=lambda loc: loc[0] != "file")
        return matches[0] if matches else None

    def read_bytes(self, locator):
        if locator[0] == "file":
            return Path(locator[1]).read_bytes()
        return locator[1].read(locator[2])

    def read_image(self, locator):
        """Read a TIFF (tifffile, then Pillow for codecs tifffile lacks) or any Pillow image as H x W x C."""
        name = locator[1].name if locator[0] == "file" else locator[2]
        if name.lower().endswith((".tif", ".tiff")):
            try:
                return self.read_tiff(locator)
            except UserError:
                pass  # e.g. a compression tifffile cannot decode without imagecodecs: Pillow may
        try:
            with Image.open(io.BytesIO(self.read_bytes(locator))) as img:
                return to_hwc(np.array(img), "YXS" if img.mode not in ("L", "P", "I", "I;16") else None)
        except Exception as err:  # any failure here means a damaged or foreign file
            raise UserError(f"cannot read {self.describe(locator)} ({type(err).__name__}: {err}); "
                            f"the file is damaged or not an image: download it again") from None

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


# ----------------------------------------------------------------------------------------------
# Split files
# ----------------------------------------------------------------------------------------------
def class_presence(class_pixels, min_pixels, num_classes=None):
    """Bool [n_crops, K]: the crop has at least `min_pixels` pixels of the class (columns of the counts:
    the K classes, then 255; num_classes is needed only when there is no crop)."""
    class_pixels = np.asarray(class_pixels, dtype=np.int64)
    if class_pixels.ndim != 2:
        class_pixels = class_pixels.reshape(-1, (num_classes or 0) + 1)
    return class_pixels[:, :-1] >= max(int(min_pixels), 1)


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
    that has the fewest crops so far (ties: the lower class index), and step t gets the crops
    assigned to its classes. Crops holding no class of the task go nowhere.
    """
    presence = np.asarray(presence, dtype=bool)
    task_classes = sorted(c for classes in steps for c in classes)
    present = presence[:, task_classes]
    order = np.random.default_rng(seed).permutation(len(presence))
    coverage = np.zeros(len(task_classes), dtype=np.int64)
    owner = np.full(len(presence), -1, dtype=np.int64)  # class each crop is assigned to
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


def write_splits(folder, meta, only_task=None, unchanged_ok=False):
    """Write the split files of every filter mode of every task (both families), or of `only_task`; returns
    their sizes. unchanged_ok: leave a file that already holds the same indices (a run's own check)."""
    seed, min_pixels = meta["split"]["seed"], meta["split"]["min_pixels"]
    presence = class_presence(meta["train"]["class_pixels"], min_pixels, len(meta["classes"]))
    sizes = {}
    for task, (family, step_dict) in task_defs.all_tasks(meta["dataset"]).items():
        if only_task is not None and task != only_task:
            continue
        steps = [step_dict[s] for s in sorted(step_dict)]
        suffixes = task_defs.FILTER_MODES[family]
        for mode, per_step in task_splits(family, presence, steps, seed).items():
            for step, indices in enumerate(per_step):
                path, indices = split_file(folder, task, suffixes[mode], step), np.sort(indices)
                if not (unchanged_ok and _holds(path, indices)):
                    save_npy(path, indices)
            sizes[split_folder(task, suffixes[mode])] = [int(len(indices)) for indices in per_step]
    return sizes


def _holds(path, indices):
    try:
        return np.array_equal(np.load(path), indices)
    except (OSError, ValueError):
        return False


def default_min_pixels(crop_size):
    """0.1 % of a crop (at least 1 px): a sliver of a class does not make a crop 'contain' it."""
    return max(1, crop_size * crop_size // 1000)


# ----------------------------------------------------------------------------------------------
# Processing
# ----------------------------------------------------------------------------------------------
def _locate_tiles(layout, source, channels, test_labels):
    """[(split, tile, image locator, label locator)] of the layout's tiles in --src, and the test labels used."""
    return layout.locate(source, channels, test_labels)


def _read_tile(source, layout, image_loc, label_loc, channels):
    """(image H x W x bands uint8, raw label) of one tile."""
    return layout.read_tile(source, image_loc, label_loc, channels)


def as_layout(layout):
    """A layout from a layout, a built-in dataset name, a DatasetSpec or a spec file path."""
    if isinstance(layout, SpecLayout):
        return layout
    if isinstance(layout, DatasetSpec):
        return SpecLayout(layout)
    from utils.dataset_spec import BUILTIN_DATASETS
    if isinstance(layout, str) and layout in BUILTIN_DATASETS:
        if layout in ("vaihingen", "potsdam"):
            from process_data.isprs_processing import LAYOUTS  # their archive quirks
            return LAYOUTS[layout]
        return SpecLayout(builtin_spec(layout))
    return SpecLayout(load_spec(layout))


def register_tasks(layout, task_files=()):
    """Make the layout's dataset and its tasks (the spec's task file, then `task_files`) known to tasks.py."""
    spec = layout.spec
    if spec.name not in task_defs.DATASETS:
        task_defs.register_dataset(spec.name, spec.classes, spec.background)
        if spec.task_file:
            folder = Path(spec.where).parent
            task_defs.load_task_file(folder / spec.task_file, spec.name)
    for path in task_files or ():
        task_defs.load_task_file(path, spec.name)


def _check_sizes(crop_size, stride, min_pixels):
    if crop_size is None or crop_size < 1:
        raise UserError(f"--crop_size {crop_size}: must be a positive number of pixels")
    if stride is None or not 1 <= stride <= crop_size:
        raise UserError(f"--stride {stride}: must be between 1 and --crop_size ({crop_size}) so that "
                        f"the crops cover every pixel")
    if min_pixels is not None and min_pixels < 1:
        raise UserError(f"--min_pixels {min_pixels}: must be at least 1")


def process_dataset(layout, src, dst, crop_size=512, stride=None, test_labels=None, seed=42,
                    min_pixels=None, channels=None, progress=True, png=False, task_files=()):
    """Crop the raw archives of one dataset into `<dst>/<name>/`; returns meta.json's content.

    The result is built in a temporary sibling folder and moved into place at the end, so a
    failed run never leaves a half-written dataset behind.
    """
    start = time.time()
    layout = as_layout(layout)
    register_tasks(layout, task_files)
    stride = crop_size if stride is None else stride
    _check_sizes(crop_size, stride, min_pixels)
    channels = channels or layout.default_channels
    if channels not in layout.channel_choices:
        raise UserError(f"--channels {channels}: {layout.name} has {', '.join(layout.channel_choices)}")
    if test_labels not in (None, *layout.spec.label_files):
        raise UserError(f"--test_labels {test_labels}: choose {' or '.join(layout.spec.label_files)}")
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
        "classes": layout.classes,
        "palette": layout.spec.palette.tolist(),
        "ignore_index": IGNORE_INDEX,
        "crop_size": crop_size,
        "stride": stride,
        "channels": channels,
        "num_channels": layout.num_bands(channels),
        "train_labels": layout.spec.train_labels,
        "test_labels": test_labels,
        "count_columns": count_columns(len(layout.classes)),
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


def regenerate_splits(dst, dataset, seed=None, min_pixels=None, layout=None, task_files=()):
    """Rewrite every split file of a processed dataset (its tasks, and those of `task_files`) from meta.json
    alone (no image is read)."""
    if layout is not None:
        register_tasks(as_layout(layout), task_files)
    else:
        task_defs.register_processed(dst, dataset)
        for path in task_files or ():
            task_defs.load_task_file(path, dataset)
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
    counts = np.asarray(meta[split]["class_pixels"], dtype=np.float64).reshape(-1, len(meta["classes"]) + 1)
    counts = counts[:, :-1].sum(axis=0)
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
              f"class colours, {info['unknown_pixels']} of unknown colour or value set to ignore (255)")
    if not odd:
        print("  labels: every pixel has an exact class colour or value")
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


def build_parser(layout, spec_option=False):
    """The processing command line of one layout (or, with spec_option, of the spec given by --spec)."""
    name = "the dataset of --spec" if spec_option else layout.name
    folder = "DST/NAME" if spec_option else f"DST/{layout.name}"
    parser = argparse.ArgumentParser(
        description=f"Crop {name} into the crop store, meta.json and the split files of every task "
                    f"(docs/data.md#processing).")
    if spec_option:
        parser.add_argument("--spec", required=True, help="dataset spec file (JSON, docs/data.md#your-own-dataset)")
    parser.add_argument("--src", help="folder holding the downloaded archives, zipped or extracted")
    parser.add_argument("--dst", required=True, help=f"data root; the dataset goes to {folder}")
    parser.add_argument("--crop_size", type=int, default=None,
                        help="crop side in px (default: the spec's, 512)")
    parser.add_argument("--stride", type=int, default=None, help="default: the spec's, else the crop size")
    variants = None if spec_option else tuple(layout.spec.label_files)
    if spec_option or len(variants) > 1:
        parser.add_argument("--test_labels", choices=variants, default=None,
                            help="label variant of the test crops (default: the spec's first one present; ISPRS: "
                                 "eroded when that archive is there)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the disjoint and MiB-CD split partitions (default 42; with "
                             "--splits_only the seed in meta.json)")
    parser.add_argument("--min_pixels", type=int, default=None,
                        help="pixels of a class for a crop to contain it (default 0.1%% of a crop; "
                             "with --splits_only the value in meta.json)")
    parser.add_argument("--task_file", action="append", default=[],
                        help="also write the split files of the tasks of this task file (JSON; repeatable)")
    parser.add_argument("--splits_only", action="store_true",
                        help=f"only rewrite the split files from {folder}/meta.json")
    if spec_option or len(layout.channel_choices) > 1:
        parser.add_argument("--channels", choices=None if spec_option else layout.channel_choices,
                            default=None if spec_option else layout.default_channels,
                            help="image product to crop (default: the spec's first"
                                 + ("" if spec_option else f", {layout.default_channels}") + ")")
    parser.add_argument("--png", action="store_true",
                        help="also write every crop as PNG previews (train|test/images|labels/*.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run_command(layout, args):
    """Process (or with --splits_only re-split) one layout from parsed arguments; returns meta.json's content."""
    if args.splits_only:
        meta = regenerate_splits(args.dst, layout.name, seed=args.seed, min_pixels=args.min_pixels,
                                 layout=layout, task_files=args.task_file)
        print(f"{layout.name}: split files rewritten in {dataset_dir(args.dst, layout.name)} (seed "
              f"{meta['split']['seed']}, min_pixels {meta['split']['min_pixels']})")
        return meta
    if not args.src:
        raise UserError("--src is required (the folder holding the raw archives), unless "
                        "--splits_only")
    crop_size = args.crop_size or layout.spec.crop_size
    stride = args.stride or (layout.spec.stride if args.crop_size is None else None)
    meta = process_dataset(layout, args.src, args.dst, crop_size=crop_size, stride=stride,
                           test_labels=getattr(args, "test_labels", None),
                           seed=42 if args.seed is None else args.seed, min_pixels=args.min_pixels,
                           channels=getattr(args, "channels", None), progress=not args.quiet, png=args.png,
                           task_files=args.task_file)
    print_report(meta)
    return meta


def main_for(layout):
    """Command-line entry point of one dataset's processing script."""
    layout = as_layout(layout)

    @exit_on_user_error
    def main(argv=None):
        return run_command(layout, build_parser(layout).parse_args(argv))

    return main
