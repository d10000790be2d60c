"""A tiled dataset described by a JSON spec file (docs/data.md#your-own-dataset): classes, label coding,
bands, where the image and label tiles are. The built-in datasets' specs and task files are in utils/specs/.

The spec is data only; process_data/tile_processing.py turns any spec into the processed layout of
dataset/layout.py, and tasks.py reads task files against the classes named here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from utils.errors import UserError

SPEC_DIR = Path(__file__).resolve().parent / "specs"
BUILTIN_DATASETS = ("vaihingen", "potsdam", "loveda", "openearthmap")
IGNORE_INDEX = 255
IGNORE = "ignore"  # in an index label's "values": the raw value is ignored (-> 255)
SNAP_RULES = ("threshold", "nearest")
DEFAULT_VARIANT = "complete"  # name of the label variant when the spec gives one label pattern
_KEYS = {"name", "description", "classes", "background", "palette", "labels", "channels", "default_channels",
         "images", "label_files", "train_labels", "test_labels", "splits", "crop_size", "stride", "tasks"}
_SOURCE_KEYS = {"images", "label_files", "tiles", "list", "name"}
# dataset and task names are folder names and parts of results file names (<dataset>_<task>_<name>.csv): no _
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")


def builtin_spec_file(name) -> Path:
    return SPEC_DIR / f"{name}.json"


def _fail(where, message):
    raise UserError(f"{where}: {message}")


def _read_json(path, what):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {what} {path} ({err}); fix the JSON") from None


def _patterns(value, where, key):
    """{variant: pattern} from a string or a dict of strings; each pattern holds {tile} once."""
    table = {DEFAULT_VARIANT if key == "label_files" else "default": value} if isinstance(value, str) else value
    if not isinstance(table, dict) or not table or not all(isinstance(p, str) for p in table.values()):
        _fail(where, f'"{key}" must be a path pattern or an object of path patterns')
    for pattern in table.values():
        if Path(pattern).name.count("{tile}") != 1 or pattern.count("{tile}") != 1:
            _fail(where, f'"{key}" pattern {pattern!r} must hold {{tile}} once, in the file name')
    return dict(table)


class DatasetSpec:
    """A validated dataset spec; `path` is where it was read from (list files are found in --src)."""

    def __init__(self, raw: dict, where: str):
        if not isinstance(raw, dict):
            _fail(where, "a dataset spec is a JSON object")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            _fail(where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}")
        for key in ("name", "classes", "palette", "labels", "channels", "images", "label_files", "splits"):
            if key not in raw:
                _fail(where, f'"{key}" is missing')
        self.where = where
        self.name = raw["name"]
        if not isinstance(self.name, str) or not NAME.match(self.name):
            _fail(where, f'"name" {self.name!r} must be letters, digits, . + - (a folder name without _)')
        self.classes = list(raw["classes"])
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes) or \
                len(set(self.classes)) != len(self.classes) or len(self.classes) > 254:
            _fail(where, '"classes" must be a list of 1-254 distinct names')
        self.background = raw.get("background")
        if self.background is not None and self.background not in self.classes:
            _fail(where, f'"background" {self.background!r} is not one of the classes')
        self.palette = np.asarray(raw["palette"])
        if self.palette.shape != (len(self.classes), 3) or self.palette.min() < 0 or self.palette.max() > 255:
            _fail(where, f'"palette" must hold one [R, G, B] (0-255) per class ({len(self.classes)})')
        self.palette = self.palette.astype(np.uint8)
        self._init_labels(raw["labels"])
        self.channels = raw["channels"]
        if not isinstance(self.channels, dict) or not self.channels or not all(
                isinstance(b, list) and b for b in self.channels.values()):
            _fail(where, '"channels" must map a product name to its list of bands, e.g. {"RGB": ["R", "G", "B"]}')
        self.default_channels = raw.get("default_channels", next(iter(self.channels)))
        if self.default_channels not in self.channels:
            _fail(where, f'"default_channels" {self.default_channels!r} is not one of "channels"')
        self.images = self._image_patterns(raw["images"])
        self.label_files = _patterns(raw["label_files"], where, "label_files")
        self.train_labels = raw.get("train_labels", next(iter(self.label_files)))
        test = raw.get("test_labels", [self.train_labels])
        self.test_labels = [test] if isinstance(test, str) else list(test)
        for variant in [self.train_labels, *self.test_labels]:
            if variant not in self.label_files:
                _fail(where, f"label variant {variant!r} is not one of \"label_files\" ({', '.join(self.label_files)})")
        self.splits = {}
        splits = raw["splits"]
        if not isinstance(splits, dict) or set(splits) != {"train", "test"}:
            _fail(where, '"splits" must give "train" and "test"')
        for split, sources in splits.items():
            sources = [sources] if isinstance(sources, dict) else sources
            if not isinstance(sources, list) or not sources:
                _fail(where, f'"splits"."{split}" must be an object or a list of objects')
            self.splits[split] = [self._source(s, f'"splits"."{split}"') for s in sources]
        self.crop_size = int(raw.get("crop_size", 512))
        self.stride = int(raw.get("stride", self.crop_size))
        self.task_file = raw.get("tasks")

    def _init_labels(self, labels):
        where = self.where
        if not isinstance(labels, dict) or labels.get("encoding") not in ("index", "rgb"):
            _fail(where, '"labels" must be {"encoding": "index", ...} or {"encoding": "rgb", ...}')
        self.encoding = labels["encoding"]
        self.lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # raw value or colour code -> class
        self.known = np.zeros(256, dtype=bool)  # raw values that are a class or ignored on purpose
        if self.encoding == "index":
            values = labels.get("values") or {str(i): c for i, c in enumerate(self.classes)}
            for raw_value, target in values.items():
                if not str(raw_value).isdigit() or not 0 <= int(raw_value) <= 255:
                    _fail(where, f'"labels"."values": key {raw_value!r} is not a label value 0-255')
                if target != IGNORE and target not in self.classes:
                    _fail(where, f'"labels"."values": {raw_value} -> {target!r} is neither a class nor "ignore"')
                self.lut[int(raw_value)] = IGNORE_INDEX if target == IGNORE else self.classes.index(target)
                self.known[int(raw_value)] = True
            return
        self.snap = labels.get("snap", "nearest")
        if self.snap not in SNAP_RULES:
            _fail(where, f'"labels"."snap" must be one of {", ".join(SNAP_RULES)}')
        self.ignore_colours = np.asarray(labels.get("ignore_colours", [[0, 0, 0]]), dtype=np.int64).reshape(-1, 3)
        self.tolerance = int(labels.get("tolerance", 0))
        if self.snap == "threshold":
            if not np.isin(self.palette, (0, 255)).all():
                _fail(where, '"snap": "threshold" needs class colours made of 0 and 255 only; use "nearest"')
            codes = _threshold_codes(self.palette)
            if len(set(codes.tolist())) != len(codes):
                _fail(where, "two classes share a colour")
            self.lut[codes] = np.arange(len(codes), dtype=np.uint8)
            self.known[codes] = True
            self.known[_threshold_codes(self.ignore_colours)] = True

    def _image_patterns(self, value):
        """{product: pattern}: one pattern serves every product of "channels"."""
        table = _patterns(value, self.where, "images")
        if list(table) == ["default"]:
            return {channels: table["default"] for channels in self.channels}
        if set(table) != set(self.channels):
            _fail(self.where, '"images" must give one pattern, or one per product of "channels"')
        return table

    def _source(self, source, where):
        if not isinstance(source, dict) or set(source) - _SOURCE_KEYS:
            _fail(self.where, f"{where}: a source is an object with keys among {', '.join(sorted(_SOURCE_KEYS))}")
        images = self._image_patterns(source["images"]) if "images" in source else self.images
        labels = _patterns(source["label_files"], self.where, "label_files") if "label_files" in source \
            else self.label_files
        tiles = source.get("tiles")
        if tiles is not None and (not isinstance(tiles, list) or not all(isinstance(t, str) for t in tiles)):
            _fail(self.where, f'{where}: "tiles" must be a list of tile ids')
        name = source.get("name", "{tile}")
        if "{tile}" not in name:
            _fail(self.where, f'{where}: "name" {name!r} must hold {{tile}}')
        return {"images": images, "label_files": labels, "tiles": tiles, "list": source.get("list"), "name": name}

    # ------------------------------------------------------------------------------------- patterns
    def image_pattern(self, source, channels):
        return source["images"][channels]

    @property
    def num_bands(self):
        return {name: len(bands) for name, bands in self.channels.items()}

    # ------------------------------------------------------------------------------------- labels
    def decode(self, raw):
        """Raw label tile -> (class index map uint8, unknown pixels, off-palette pixels).

        index: the value's class (or 255 when "ignore"); a value the spec does not name -> 255, counted
        unknown. rgb "threshold": each channel snapped to 0/255 at 128, then the class of that colour
        (off-palette = pixels with a channel other than 0 or 255). rgb "nearest": the class colour
        closest in max-channel distance if within "tolerance" (off-palette = not exactly a class or
        ignore colour); ignore colours and colours farther than the tolerance -> 255 (the latter unknown).
        """
        raw = np.asarray(raw)
        if self.encoding == "index":
            label = raw[..., 0] if raw.ndim == 3 else raw
            label = label.astype(np.uint8)
            return self.lut[label], int(np.count_nonzero(~self.known[label])), 0
        rgb = raw[..., :3]
        if self.snap == "threshold":
            codes = _threshold_codes(rgb)
            off = int(np.count_nonzero(((rgb != 0) & (rgb != 255)).any(axis=-1)))
            return self.lut[codes], int(np.count_nonzero(~self.known[codes])), off
        packed = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        codes, inverse = np.unique(packed.ravel(), return_inverse=True)  # few distinct colours per tile
        colours = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=1).astype(np.int16)
        distance = np.abs(colours[:, None, :] - self.palette[None].astype(np.int16)).max(axis=2)
        nearest = distance.argmin(axis=1)
        ignored = (np.abs(colours[:, None, :] - self.ignore_colours[None]).max(axis=2) <= self.tolerance).any(1)
        within = distance[np.arange(len(colours)), nearest] <= self.tolerance
        classes = np.where(within & ~ignored, nearest, IGNORE_INDEX).astype(np.uint8)
        exact = (distance.min(axis=1) == 0) | \
            (np.abs(colours[:, None, :] - self.ignore_colours[None]).max(axis=2) == 0).any(1)
        counts = np.bincount(inverse.ravel(), minlength=len(colours))
        unknown = int(counts[~within & ~ignored].sum())
        off = int(counts[~exact].sum())
        return classes[inverse.ravel()].reshape(rgb.shape[:2]), unknown, off

    @property
    def label_bands(self):
        return 3 if self.encoding == "rgb" else 1


def _threshold_codes(rgb):
    """3-bit code r*4 + g*2 + b of each colour after snapping every channel at 128."""
    bits = (np.asarray(rgb)[..., :3] >= 128).astype(np.uint8)
    return (bits[..., 0] << 2) | (bits[..., 1] << 1) | bits[..., 2]


def load_spec(path) -> DatasetSpec:
    """The dataset spec of a JSON file; UserError naming the file and the problem."""
    return DatasetSpec(_read_json(path, "dataset spec"), str(path))


def builtin_spec(name) -> DatasetSpec:
    if name not in BUILTIN_DATASETS:
        raise UserError(f"unknown dataset {name!r}: the built-in ones are {', '.join(BUILTIN_DATASETS)}")
    return load_spec(builtin_spec_file(name))


def read_task_file(path) -> dict:
    """The JSON content of a task file (validated against a dataset's classes by tasks.py)."""
    return _read_json(path, "task file")
