"""Raw archives of a tiled dataset (docs/data.md#raw-layout): where a spec's tiles are under --src (zipped or
extracted) and how one tile is read as an image (H x W x bands uint8) and a raw label.

`SpecLayout` applies a dataset spec (utils/dataset_spec.py) to the files of a `RawSource`; the ISPRS archives'
quirks are a subclass (process_data/isprs_processing.py).
"""
import io
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import tifffile
from PIL import Image

from dataset.layout import SPLITS
from utils.dataset_spec import DatasetSpec
from utils.errors import UserError


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
