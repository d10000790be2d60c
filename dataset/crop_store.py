"""The crop store: one uint8 .npy per split and kind, read memory-mapped (no decoding).

`<data_root>/<dataset>/<split>/images.npy` is N x S x S x C and `labels.npy` N x S x S, row r of
both the crop `meta["store"][split]["rows"]` points to; meta.json's `store` entry (`store_meta`, with its
format `version`) is written only after both files are complete, so a half-written store is never read.
The rest of the processed layout and meta.json are dataset/layout.py's.
"""
import os
import struct
from pathlib import Path

import numpy as np

STORE_VERSION = 1
KINDS = ("images", "labels")
_HEADER_BYTES = 128  # fixed, so the final shape can be written over the provisional one


def store_file(dataset_dir, split, kind):
    return Path(dataset_dir) / split / f"{kind}.npy"


def store_meta(rows):
    """meta.json's `store` entry: the format version and, per split, its files (relative to the dataset
    folder) and `rows` (rows[split][i] = the store row of crop i of meta[split]["crops"])."""
    return {"version": STORE_VERSION, **{split: {**{kind: f"{split}/{kind}.npy" for kind in KINDS}, "rows": list(r)}
                                         for split, r in rows.items()}}


def _npy_header(shape):
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(int(n) for n in shape)}, }}"
    prefix_len = 10  # magic (6) + version (2) + header length (2)
    pad = _HEADER_BYTES - prefix_len - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit the fixed .npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - prefix_len) + (text + " " * pad + "\n").encode()


class NpyAppender:
    """Write a uint8 .npy of unknown length crop by crop: append() rows, close() writes the final
    shape into the header and moves the file from its temporary name to `path`; abort() removes it."""

    def __init__(self, path, item_shape):
        self.path = Path(path)
        self.item_shape = tuple(int(n) for n in item_shape)
        self.count = 0
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.tmp, "wb")
        self.handle.write(_npy_header((0,) + self.item_shape))

    def append(self, array):
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.shape != self.item_shape:
            raise ValueError(f"{self.path}: item of shape {array.shape}, expected {self.item_shape}")
        self.handle.write(array.tobytes())
        self.count += 1

    def close(self):
        self.handle.seek(0)
        self.handle.write(_npy_header((self.count,) + self.item_shape))
        self.handle.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.handle.close()
        self.tmp.unlink(missing_ok=True)


def open_store_array(path, expected_shape):
    """Memory-map a store file read-only; ValueError with the reason when it does not match."""
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise ValueError("file missing") from None
    except (OSError, ValueError) as err:  # truncated files fail here ("mmap length is greater ...")
        raise ValueError(f"unreadable or truncated: {err}") from None
    if array.dtype != np.uint8 or tuple(array.shape) != tuple(expected_shape):
        raise ValueError(f"holds {array.dtype} {tuple(array.shape)}, meta.json expects uint8 "
                         f"{tuple(expected_shape)}")
    return array
