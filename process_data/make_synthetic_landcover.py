"""Synthetic LoveDA and OpenEarthMap look-alikes in their published archive layouts (docs/data.md#synthetic-data).

    python process_data/make_synthetic_landcover.py --dataset loveda|openearthmap|both --dst RAW
        [--seed 0] [--tile_size PX] [--n_train N] [--n_test N]

LoveDA (as unpacked from Train.zip, Val.zip, Test.zip): `{Train,Val,Test}/{Urban,Rural}/images_png/<id>.png`
(RGB) and `masks_png/<id>.png` (8-bit index: 0 no-data, 1-7 the classes) for Train and Val; Test has no
masks (its labels are not public). Ids run on across domains and splits as in the real archive.
OpenEarthMap (OpenEarthMap_wo_xBD): `<region>/images/<region>_<n>.tif` (RGB GeoTIFF-like TIFF) and
`<region>/labels/<region>_<n>.tif` (8-bit index: 0 unknown, 1-8 the classes), plus `train.txt`, `val.txt`
and `test.txt` listing file names; like the real lists, train.txt also names an xBD tile whose image is not
in the archive (the processing skips it).

Scenes: smooth random regions of every class (land cover is areal), each class with its own colour and
texture, a strip of no-data/unknown on some tiles. Deterministic for a seed.
"""
import argparse
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from process_data.make_synthetic_isprs import smooth_noise
from utils.dataset_spec import builtin_spec
from utils.errors import UserError, exit_on_user_error

DATASETS = ("loveda", "openearthmap")
SIZES = {"loveda": dict(tile_size=1024, n_train=4, n_test=2), "openearthmap": dict(tile_size=1024, n_train=4, n_test=2)}
LOVEDA_FIRST_ID = {("Train", "Rural"): 0, ("Train", "Urban"): 1366, ("Val", "Rural"): 2522,
                   ("Val", "Urban"): 3514, ("Test", "Rural"): 4191, ("Test", "Urban"): 5167}
OEM_REGIONS = ("aachen", "chiclayo", "kyoto")
MISSING_XBD_TILE = "hurricane_florence_1.tif"  # listed in train.txt, image not in the archive


def scene(rng, size, num_classes, no_data):
    """(RGB image uint8, class map 1..K with 0 = no-data) of one tile: every class as smooth regions."""
    fields = np.stack([smooth_noise(rng, size, size, max(size // 5, 4)) for _ in range(num_classes)])
    classes = (fields.argmax(axis=0) + 1).astype(np.uint8)  # one colour per class, the same in every tile
    colours = np.random.default_rng(num_classes).uniform(40, 220, size=(num_classes + 1, 3)).astype(np.float32)
    texture = smooth_noise(rng, size, size, 3)[..., None] * 12 + rng.normal(0, 6, size=(size, size, 1))
    image = np.clip(colours[classes] + texture, 0, 255).astype(np.uint8)
    if no_data:  # an unlabelled strip along one edge (LoveDA no-data, OpenEarthMap unknown)
        width = max(size // 16, 1)
        classes[:, :width] = 0
        image[:, :width] = 0
    return image, classes


def _save_png(array, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _write_loveda(dst, seed, tile_size, n_train, n_test):
    num_classes = len(builtin_spec("loveda").classes)
    written = []
    for split, count in (("Train", n_train), ("Val", n_test), ("Test", 1)):
        for domain in ("Urban", "Rural"):
            for k in range(count):
                tile_id = LOVEDA_FIRST_ID[split, domain] + k
                rng = np.random.default_rng([seed, 0, tile_id])
                image, classes = scene(rng, tile_size, num_classes, no_data=k == 0)
                folder = dst / split / domain
                _save_png(image, folder / "images_png" / f"{tile_id}.png")
                if split != "Test":
                    _save_png(classes, folder / "masks_png" / f"{tile_id}.png")
                written.append((split, domain, tile_id))
    return written


def _write_openearthmap(dst, seed, tile_size, n_train, n_test):
    root = dst / "OpenEarthMap_wo_xBD"
    num_classes = len(builtin_spec("openearthmap").classes)
    lists = {"train": [], "val": [], "test": []}
    index = 0
    for split, count in (("train", n_train), ("val", n_test), ("test", 1)):
        for k in range(count):
            region = OEM_REGIONS[index % len(OEM_REGIONS)]
            name = f"{region}_{index + 1}.tif"
            rng = np.random.default_rng([seed, 1, index])
            image, classes = scene(rng, tile_size, num_classes, no_data=k == 0)
            (root / region / "images").mkdir(parents=True, exist_ok=True)
            (root / region / "labels").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / region / "images" / name, image, photometric="rgb")
            tifffile.imwrite(root / region / "labels" / name, classes, photometric="minisblack")
            lists[split].append(name)
            index += 1
    lists["train"].insert(1, MISSING_XBD_TILE)
    for split, names in lists.items():
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return lists


def generate(dataset, dst, seed=0, tile_size=None, n_train=None, n_test=None):
    """Write the synthetic raw archive of `dataset` under `dst` (sizes default to SIZES)."""
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset}: choose {', '.join(DATASETS)} or both")
    sizes = SIZES[dataset]
    tile_size = sizes["tile_size"] if tile_size is None else int(tile_size)
    n_train = sizes["n_train"] if n_train is None else int(n_train)
    n_test = sizes["n_test"] if n_test is None else int(n_test)
    if tile_size < 32 or n_train < 1 or n_test < 1:
        raise UserError(f"--tile_size {tile_size} / --n_train {n_train} / --n_test {n_test}: use at least 32 px "
                        f"and one tile per split")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"--dst {dst} is a file; choose a folder")
    write = _write_loveda if dataset == "loveda" else _write_openearthmap
    return write(dst, seed, tile_size, n_train, n_test)


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic LoveDA / OpenEarthMap raw archives.")
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both")
    parser.add_argument("--dst", required=True, help="folder to write the raw archive to (RAW)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile_size", type=int, default=None, help="tile side in px (default 1024)")
    parser.add_argument("--n_train", type=int, default=None, help="train tiles (LoveDA: per domain; default 4)")
    parser.add_argument("--n_test", type=int, default=None, help="test (Val) tiles (LoveDA: per domain; default 2)")
    args = parser.parse_args(argv)
    for dataset in DATASETS if args.dataset == "both" else (args.dataset,):
        generate(dataset, args.dst, args.seed, args.tile_size, args.n_train, args.n_test)
        print(f"{dataset}: synthetic raw archive written to {args.dst}")


if __name__ == "__main__":
    main()
