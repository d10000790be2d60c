"""Processed ISPRS crops: the crop store (`<split>/images.npy`, `labels.npy`, memory-mapped), or the
PNG crops `<split>/{images,labels}/*.png` of folders processed before the store existed."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils.crop_store import KINDS, STORE_VERSION, open_store_array, store_file
from utils.errors import UserError

META_VERSION = 1
DATASETS = ("vaihingen", "potsdam")
# Values a processed label may hold: the six ISPRS classes and 255 (ignored).
KNOWN_LABEL = np.zeros(256, dtype=bool)
KNOWN_LABEL[[0, 1, 2, 3, 4, 5, 255]] = True


def dataset_dir(data_root, dataset):
    return Path(data_root) / dataset


def _process_command(data_root, dataset):
    return f"python process_data/data_process_{dataset}.py --src RAW --dst {data_root}"


def _convert_command(data_root, dataset):
    return f"python process_data/make_crop_store.py --data_root {data_root} --dataset {dataset}"


_hinted = set()


def _png_hint(data_root, dataset):
    """One line per dataset and process: PNG crops work, the store is much faster."""
    if (str(data_root), dataset) not in _hinted:
        _hinted.add((str(data_root), dataset))
        print(f"hint: {dataset_dir(data_root, dataset)} holds PNG crops only (decoded at every read); "
              f"convert them once to the crop store with `{_convert_command(data_root, dataset)}`",
              file=sys.stderr)


def load_meta(data_root, dataset):
    """meta.json of a processed dataset; a clear UserError when it is missing or unreadable."""
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset}: choose one of {', '.join(DATASETS)}")
    path = dataset_dir(data_root, dataset) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found: --data_root {data_root} holds no processed {dataset}; "
                        f"run `{_process_command(data_root, dataset)}` first")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); run `{_process_command(data_root, dataset)}` "
                        f"again") from None
    if meta.get("format_version") != META_VERSION or meta.get("dataset") != dataset:
        raise UserError(f"{path} is not a meta.json of {dataset} in format {META_VERSION}; run "
                        f"`{_process_command(data_root, dataset)}` again")
    return meta


class ISPRSCrops(Dataset):
    """The crops of one split in meta.json's sorted order: item = (image H x W x C uint8, label H x W uint8).

    From the crop store the items are read-only views of the memory-mapped files (nothing is decoded
    or copied until a transform reads them); from PNG folders they are decoded copies.
    """

    def __init__(self, data_root, dataset, split, meta=None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, not {split!r}")
        self.meta = load_meta(data_root, dataset) if meta is None else meta
        self.data_root, self.dataset, self.split = str(data_root), dataset, split
        self.root = dataset_dir(data_root, dataset) / split
        self.names = list(self.meta[split]["crops"])
        self.num_channels = int(self.meta["num_channels"])
        self.crop_size = int(self.meta["crop_size"])
        store = self.meta.get("store")
        self.uses_store = store is not None
        self._arrays = None
        if self.uses_store:
            self._check_store(store)
            self.rows = np.asarray(store[split]["rows"], dtype=np.int64)
            self._open()  # fail now, not in a worker
        else:
            _png_hint(data_root, dataset)

    def _check_store(self, store):
        meta_path = dataset_dir(self.data_root, self.dataset) / "meta.json"
        version = store.get("version") if isinstance(store, dict) else None
        if version != STORE_VERSION or self.split not in store or \
                len(store[self.split].get("rows", ())) != len(self.names):
            raise UserError(f"{meta_path} describes a crop store of format {version}, this code reads "
                            f"format {STORE_VERSION}; rebuild the store with "
                            f"`{_convert_command(self.data_root, self.dataset)}`")

    def _open(self):
        n, size = len(self.names), self.crop_size
        shapes = {"images": (n, size, size, self.num_channels), "labels": (n, size, size)}
        arrays = {}
        for kind in KINDS:
            path = store_file(dataset_dir(self.data_root, self.dataset), self.split, kind)
            try:
                arrays[kind] = open_store_array(path, shapes[kind])
            except ValueError as err:
                raise UserError(f"crop store file {path} is damaged ({err}); rebuild it with "
                                f"`{_convert_command(self.data_root, self.dataset)}` (from the PNG "
                                f"crops) or `{_process_command(self.data_root, self.dataset)}`") from None
        self._arrays = arrays

    def __getstate__(self):  # workers map the files themselves (a memmap would pickle its data)
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self):
        return len(self.names)

    def class_pixels(self):
        """[n_crops, 7] pixels per class 0..5 and 255 (meta.json's counts)."""
        return np.asarray(self.meta[self.split]["class_pixels"], dtype=np.int64)

    def _read(self, path, channels):
        try:
            with Image.open(path) as img:
                array = np.array(img)  # a writable copy (torch.from_numpy needs one)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path} ({err}); the processed dataset is damaged: run "
                            f"`{_process_command(self.data_root, self.dataset)}` again") from None
        got = 1 if array.ndim == 2 else array.shape[2]
        if array.dtype != np.uint8 or got != channels:
            raise UserError(f"{path} has {got} channel(s) of {array.dtype}, expected {channels} of "
                            f"uint8; run `{_process_command(self.data_root, self.dataset)}` again")
        return array

    def __getitem__(self, index):
        if self.uses_store:
            if self._arrays is None:
                self._open()
            row = self.rows[index]
            return self._arrays["images"][row], self._arrays["labels"][row]
        name = self.names[index]
        image = self._read(self.root / "images" / name, self.num_channels)
        label = self._read(self.root / "labels" / name, 1)
        if image.shape[:2] != label.shape:
            raise UserError(f"{self.root / 'labels' / name} is {label.shape[1]}x{label.shape[0]} px but its image is "
                            f"{image.shape[1]}x{image.shape[0]}; run "
                            f"`{_process_command(self.data_root, self.dataset)}` "
                            f"again")
        if not KNOWN_LABEL[label].all():
            unknown = sorted(set(np.unique(label[~KNOWN_LABEL[label]]).tolist()))
            raise UserError(f"{self.root / 'labels' / name} holds label value(s) {unknown[:5]} that are no ISPRS class "
                            f"(0-5, 255 ignored); run `{_process_command(self.data_root, self.dataset)}` again")
        return image, label
