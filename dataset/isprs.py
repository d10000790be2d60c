"""Processed crops (layout and meta.json: dataset/layout.py): the crop store (`<split>/images.npy`,
`labels.npy`, memory-mapped), or the PNG crops `<split>/{images,labels}/*.png` of folders processed before
the store existed."""
import sys

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dataset.crop_store import KINDS, STORE_VERSION, open_store_array, store_file
from dataset.layout import (
    SPLITS,
    convert_command,
    dataset_dir,
    load_meta,
    meta_file,
    png_dir,
    process_command,
)
from utils.errors import UserError

_hinted = set()


def _png_hint(data_root, dataset):
    """One line per dataset and process: PNG crops work, the store is much faster."""
    if (str(data_root), dataset) not in _hinted:
        _hinted.add((str(data_root), dataset))
        print(f"hint: {dataset_dir(data_root, dataset)} holds PNG crops only (decoded at every read); "
              f"convert them once to the crop store with `{convert_command(data_root, dataset)}`",
              file=sys.stderr)


class ISPRSCrops(Dataset):
    """The crops of one split in meta.json's sorted order: item = (image H x W x C uint8, label H x W uint8).

    From the crop store the items are read-only views of the memory-mapped files (nothing is decoded
    or copied until a transform reads them); from PNG folders they are decoded copies.
    """

    def __init__(self, data_root, dataset, split, meta=None):
        if split not in SPLITS:
            raise ValueError(f"split must be train or test, not {split!r}")
        self.meta = load_meta(data_root, dataset) if meta is None else meta
        self.data_root, self.dataset, self.split = str(data_root), dataset, split
        self.png_dirs = {kind: png_dir(dataset_dir(data_root, dataset), split, kind) for kind in KINDS}
        self.names = list(self.meta[split]["crops"])
        self.num_channels = int(self.meta["num_channels"])
        self.crop_size = int(self.meta["crop_size"])
        self.known_label = np.zeros(256, dtype=bool)  # indexed by a label value: may a processed label hold it
        self.known_label[list(self.meta["count_columns"])] = True
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
        meta_path = meta_file(dataset_dir(self.data_root, self.dataset))
        version = store.get("version") if isinstance(store, dict) else None
        if version != STORE_VERSION or self.split not in store or \
                len(store[self.split].get("rows", ())) != len(self.names):
            raise UserError(f"{meta_path} describes a crop store of format {version}, this code reads "
                            f"format {STORE_VERSION}; rebuild the store with "
                            f"`{convert_command(self.data_root, self.dataset)}`")

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
                                f"`{convert_command(self.data_root, self.dataset)}` (from the PNG "
                                f"crops) or `{process_command(self.data_root, self.dataset)}`") from None
        self._arrays = arrays

    def __getstate__(self):  # workers map the files themselves (a memmap would pickle its data)
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self):
        return len(self.names)

    def class_pixels(self):
        """[n_crops, K + 1] pixels per class 0..K-1 and 255 (meta.json's counts)."""
        return np.asarray(self.meta[self.split]["class_pixels"], dtype=np.int64)

    def _read(self, path, channels):
        try:
            with Image.open(path) as img:
                array = np.array(img)  # a writable copy (torch.from_numpy needs one)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path} ({err}); the processed dataset is damaged: run "
                            f"`{process_command(self.data_root, self.dataset)}` again") from None
        got = 1 if array.ndim == 2 else array.shape[2]
        if array.dtype != np.uint8 or got != channels:
            raise UserError(f"{path} has {got} channel(s) of {array.dtype}, expected {channels} of "
                            f"uint8; run `{process_command(self.data_root, self.dataset)}` again")
        return array

    def __getitem__(self, index):
        if self.uses_store:
            if self._arrays is None:
                self._open()
            row = self.rows[index]
            return self._arrays["images"][row], self._arrays["labels"][row]
        name = self.names[index]
        label_path = self.png_dirs["labels"] / name
        image = self._read(self.png_dirs["images"] / name, self.num_channels)
        label = self._read(label_path, 1)
        if image.shape[:2] != label.shape:
            raise UserError(f"{label_path} is {label.shape[1]}x{label.shape[0]} px but its image is "
                            f"{image.shape[1]}x{image.shape[0]}; run "
                            f"`{process_command(self.data_root, self.dataset)}` "
                            f"again")
        if not self.known_label[label].all():
            unknown = sorted(set(np.unique(label[~self.known_label[label]]).tolist()))
            last = len(self.meta["classes"]) - 1
            raise UserError(f"{label_path} holds label value(s) {unknown[:5]} that are no class of {self.dataset} "
                            f"(0-{last}, 255 ignored); run `{process_command(self.data_root, self.dataset)}` again")
        return image, label
