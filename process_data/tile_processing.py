"""Processing of any tiled dataset described by a spec (utils/dataset_spec.py) -> the processed layout, and its
command line (docs/data.md: raw and processed layouts; the processed layout and meta.json's format are
dataset/layout.py's, the crop store's dataset/crop_store.py's). process_data/process_dataset.py runs it on a
spec file; the built-in datasets' scripts run it on their shipped specs (ISPRS: plus its archive quirks,
process_data/isprs_processing.py). Its parts: reading the raw archives (process_data/archives.py), tiles ->
crops (process_data/tiling.py), the split files (process_data/splits.py).

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
import os
import shutil
import time
from pathlib import Path

import numpy as np

import tasks as task_defs
from dataset.crop_store import KINDS
from dataset.layout import (
    SPLITS,
    check_meta,
    dataset_dir,
    meta_file,
    meta_header,
    png_dir,
    process_command,
    read_meta,
    write_meta,
)
from process_data.archives import RawSource, SpecLayout
from process_data.isprs_processing import LAYOUTS as ISPRS_LAYOUTS
from process_data.splits import default_min_pixels, write_splits
from process_data.tiling import count_columns, crop_tiles
from utils.dataset_spec import BUILTIN_DATASETS, IGNORE_INDEX, DatasetSpec, builtin_spec, load_spec
from utils.errors import UserError, exit_on_user_error


def as_layout(layout):
    """A layout from a layout, a built-in dataset name, a DatasetSpec or a spec file path."""
    if isinstance(layout, SpecLayout):
        return layout
    if isinstance(layout, DatasetSpec):
        return SpecLayout(layout)
    if isinstance(layout, str) and layout in BUILTIN_DATASETS:
        if layout in ISPRS_LAYOUTS:  # their archive quirks
            return ISPRS_LAYOUTS[layout]
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
        tiles, test_labels = layout.locate(source, channels, test_labels)
        try:
            dst.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --dst {dst} ({err.strerror}); choose a writable folder") from None
        shutil.rmtree(work_dir, ignore_errors=True)
        for split in SPLITS:
            for kind in KINDS if png else ():
                png_dir(work_dir, split, kind).mkdir(parents=True)
        try:
            crops = crop_tiles(layout, source, tiles, work_dir, crop_size, stride, channels, progress, png)
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
