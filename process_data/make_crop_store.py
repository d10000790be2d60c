"""Convert a dataset processed into PNG crops (before the crop store existed) into the crop store.

    python process_data/make_crop_store.py --data_root DATA_ROOT --dataset NAME [--remove_png]

Reads `DATA_ROOT/<dataset>/{train,test}/{images,labels}/*.png` in meta.json's order and writes
`{train,test}/{images,labels}.npy`; meta.json gains its `store` entry only once both splits are
complete, so an interrupted conversion leaves the PNG dataset as it was. The PNGs are kept as
previews unless --remove_png.
"""
import argparse
import shutil
import sys

import numpy as np
from PIL import Image

from dataset.crop_store import KINDS, NpyAppender, store_file, store_meta
from dataset.layout import (
    SPLITS,
    dataset_dir,
    load_meta,
    png_dir,
    process_command,
    write_meta,
)
from utils.errors import UserError, exit_on_user_error


def _read_png(path, shape, reprocess):
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); process the raw data again with `{reprocess}`") from None
    if array.dtype != np.uint8 or array.shape != shape:
        raise UserError(f"{path} is {array.dtype} {array.shape}, expected uint8 {shape}; process the raw "
                        f"data again with `{reprocess}`")
    return array


def convert(data_root, dataset, remove_png=False, progress=True):
    """Write the crop store of a PNG-processed dataset; returns the updated meta.json content."""
    meta = load_meta(data_root, dataset)
    root = dataset_dir(data_root, dataset)
    reprocess = process_command(data_root, dataset)
    size, bands = int(meta["crop_size"]), int(meta["num_channels"])
    shapes = {"images": (size, size, bands) if bands > 1 else (size, size), "labels": (size, size)}
    written = []
    try:
        for split in SPLITS:
            for kind in KINDS:
                writer = NpyAppender(store_file(root, split, kind), (size, size, bands) if kind == "images"
                                     else (size, size))
                try:
                    for i, name in enumerate(meta[split]["crops"]):
                        array = _read_png(png_dir(root, split, kind) / name, shapes[kind], reprocess)
                        writer.append(array.reshape(writer.item_shape))
                        if progress and i % 500 == 0:
                            print(f"\r{split} {kind}: {i}/{len(meta[split]['crops'])}", end="", file=sys.stderr)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
                written.append(writer.path)
    except BaseException:
        for path in written:  # the store is not announced in meta.json: leave no orphan file either
            path.unlink(missing_ok=True)
        raise
    if progress:
        print(file=sys.stderr)
    meta["store"] = store_meta({split: range(len(meta[split]["crops"])) for split in SPLITS})
    write_meta(root, meta)
    if remove_png:
        for split in SPLITS:
            for kind in KINDS:
                shutil.rmtree(png_dir(root, split, kind), ignore_errors=True)
    return meta


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert PNG crops of a processed dataset into the crop store.")
    parser.add_argument("--data_root", required=True, help="the --dst the dataset was processed into")
    parser.add_argument("--dataset", required=True, help="the processed dataset's name (its folder in --data_root)")
    parser.add_argument("--remove_png", action="store_true", help="delete the PNG crops afterwards")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    meta = convert(args.data_root, args.dataset, remove_png=args.remove_png, progress=not args.quiet)
    print(f"{args.dataset}: crop store written in {dataset_dir(args.data_root, args.dataset)} "
          f"({len(meta['train']['crops'])} train / {len(meta['test']['crops'])} test crops)")
    return meta


if __name__ == "__main__":
    main()
