"""process_data/: synthetic archives, crop grid, meta.json, split files, zips, RGBIR, error paths."""
import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import tasks
from dataset.colormap import decode_colors
from process_data import data_process_potsdam, data_process_vaihingen
from process_data.archives import RawSource, to_hwc
from process_data.isprs_processing import COUNT_COLUMNS, POTSDAM, VAIHINGEN
from process_data.make_synthetic_isprs import generate
from process_data.splits import class_presence, disjoint_split, overlapped_split
from process_data.tile_processing import process_dataset
from process_data.tiling import crop_positions
from tests.conftest import FIXTURE_CROP, assert_every_split_nonempty

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"vaihingen": VAIHINGEN, "potsdam": POTSDAM}


def read_png(path):
    with Image.open(path) as img:
        return np.array(img)


def load_meta(root, dataset):
    return json.loads((Path(root) / dataset / "meta.json").read_text())


# ---------------------------------------------------------------------------------- raw archives
def test_synthetic_raw_layout_is_the_official_one(raw_root):
    vaihingen = sorted(p.name for p in (raw_root / "top").iterdir())
    assert vaihingen == sorted(f"top_mosaic_09cm_area{a}.tif" for a in (1, 3, 5, 2, 4))
    for area in (1, 2):  # labels of train and test areas, same names as the images / _noBoundary
        assert (raw_root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE"
                / f"top_mosaic_09cm_area{area}.tif").is_file()
        assert (raw_root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
                / f"top_mosaic_09cm_area{area}_noBoundary.tif").is_file()
    for tile in ("4_12", "6_7", "2_10", "2_13", "2_14"):  # quirky tiles always in train
        for folder, suffix in (("2_Ortho_RGB", "RGB"), ("3_Ortho_IRRG", "IRRG"), ("4_Ortho_RGBIR", "RGBIR"),
                               ("5_Labels_all", "label"), ("5_Labels_all_noBoundary", "label_noBoundary")):
            assert (raw_root / folder / f"top_potsdam_{tile}_{suffix}.tif").is_file(), (folder, tile)
    image = tifffile.imread(raw_root / "top" / "top_mosaic_09cm_area1.tif")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] != image.shape[1]  # Vaihingen tiles are not square


def test_synthetic_generation_is_deterministic(tmp_path):
    sizes = dict(tile_size=64, n_train=1, n_test=1)
    generate("vaihingen", tmp_path / "a", seed=3, **sizes)
    generate("vaihingen", tmp_path / "b", seed=3, **sizes)
    generate("vaihingen", tmp_path / "c", seed=4, **sizes)
    name = "top/top_mosaic_09cm_area1.tif"
    first = tifffile.imread(tmp_path / "a" / name)
    assert np.array_equal(first, tifffile.imread(tmp_path / "b" / name))
    other = tifffile.imread(tmp_path / "c" / name)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_synthetic_labels_quirks_and_erosion(raw_root):
    complete = tifffile.imread(raw_root / "5_Labels_all" / "top_potsdam_6_7_label.tif")
    colours = {tuple(c) for c in np.unique(complete.reshape(-1, 3), axis=0)}
    assert (252, 255, 0) in colours and (255, 255, 0) not in colours  # 6_7's cars
    lossy = tifffile.imread(raw_root / "5_Labels_all" / "top_potsdam_4_12_label.tif")
    assert len(np.unique(lossy.reshape(-1, 3), axis=0)) > 100  # jittered off-palette colours
    clean = tifffile.imread(raw_root / "5_Labels_all" / "top_potsdam_2_10_label.tif")
    label, unknown = decode_colors(clean)
    assert unknown == 0 and (label != 255).all()
    assert 0.003 < (label == 5).mean() < 0.05  # cars are a small class, but present
    eroded, _ = decode_colors(tifffile.imread(raw_root / "5_Labels_all_noBoundary"
                                              / "top_potsdam_2_10_label_noBoundary.tif"))
    black = eroded == 255
    assert 0.02 < black.mean() < 0.4
    assert np.array_equal(eroded[~black], label[~black])  # only boundary pixels dropped
    # slow reference on a patch: dropped <=> another class within 2 px (Potsdam's erosion radius)
    for i in range(40, 100):
        for j in range(40, 100):
            window = label[i - 2:i + 3, j - 2:j + 3]
            assert black[i, j] == (window != label[i, j]).any(), (i, j)


def test_rgbir_is_planar_pil_cannot_open_it_and_it_reads_as_4_bands(raw_root):
    path = raw_root / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif"
    assert tifffile.imread(path).shape[0] == 4  # stored C, H, W
    with pytest.raises(Exception):  # noqa: B017 - whichever error PIL raises for a planar 4-band TIFF
        with Image.open(path) as img:
            img.load()
    with RawSource(raw_root, POTSDAM.wanted_folders()) as source:
        rgbir = source.read_tiff(source.find("4_Ortho_RGBIR", path.name))
        rgb = source.read_tiff(source.find("2_Ortho_RGB", "top_potsdam_2_10_RGB.tif"))
        irrg = source.read_tiff(source.find("3_Ortho_IRRG", "top_potsdam_2_10_IRRG.tif"))
    assert rgbir.shape == rgb.shape[:2] + (4,)
    assert np.array_equal(rgbir[..., :3], rgb) and np.array_equal(rgbir[..., 3], irrg[..., 0])


def test_to_hwc_axes():
    planar = np.arange(2 * 5 * 7).reshape(2, 5, 7)
    assert to_hwc(planar, "SYX").shape == (5, 7, 2)
    assert np.array_equal(to_hwc(planar, "SYX")[..., 1], planar[1])
    assert to_hwc(planar.transpose(1, 2, 0), "YXS").shape == (5, 7, 2)
    assert to_hwc(planar).shape == (5, 7, 2)  # no axes: the short axis is the channel one
    assert to_hwc(planar[0]).shape == (5, 7, 1)


# ------------------------------------------------------------------------------------ crop grid
@pytest.mark.parametrize("length,crop,stride", [(481, 128, 128), (512, 128, 128), (300, 128, 96),
                                                (2569, 512, 512), (1919, 512, 256), (100, 128, 128),
                                                (129, 128, 128)])
def test_crop_positions_cover_every_pixel(length, crop, stride):
    starts = crop_positions(length, crop, stride)
    expected = 1 if length <= crop else math.ceil((length - crop) / stride) + 1
    assert len(starts) == expected
    assert starts[0] == 0 and np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s:s + crop] = True
    assert covered.all()
    if length > crop:
        assert starts[-1] == length - crop  # last crop aligned to the edge


def test_documented_grid():
    assert crop_positions(481, 128, 128).tolist() == [0, 128, 256, 353]
    assert crop_positions(300, 128, 96).tolist() == [0, 96, 172]
    assert crop_positions(512, 128, 128).tolist() == [0, 128, 256, 384]


@pytest.mark.parametrize("dataset", ["vaihingen", "potsdam"])
def test_processed_crops_cover_tiles_and_match_the_raw_data(raw_root, data_root, dataset):
    layout = DATASETS[dataset]
    meta = load_meta(data_root, dataset)
    assert meta["crop_size"] == meta["stride"] == FIXTURE_CROP
    assert meta["count_columns"] == COUNT_COLUMNS and meta["num_channels"] == 3
    assert meta["channels"] == ("IRRG" if dataset == "vaihingen" else "RGB")
    assert meta["test_labels"] == "eroded"
    for split in ("train", "test"):
        names = meta[split]["crops"]
        assert names == sorted(names)
        assert sorted(p.name for p in (data_root / dataset / split / "images").iterdir()) == names
        assert sorted(p.name for p in (data_root / dataset / split / "labels").iterdir()) == names
    non_square = 0
    for tile, info in meta["tile_info"].items():
        h, w = info["height"], info["width"]
        non_square += h != w and h % FIXTURE_CROP != 0 and w % FIXTURE_CROP != 0
        entry = meta[info["split"]]
        mine = [i for i, n in enumerate(entry["crops"]) if n.rsplit("_", 2)[0] == tile]
        assert len(mine) == len(crop_positions(h, FIXTURE_CROP, FIXTURE_CROP)) * \
            len(crop_positions(w, FIXTURE_CROP, FIXTURE_CROP))
        covered = np.zeros((h, w), np.int32)
        for i in mine:
            y, x = entry["origins"][i]
            covered[y:y + FIXTURE_CROP, x:x + FIXTURE_CROP] += 1
        assert (covered >= 1).all()
    if dataset == "vaihingen":
        assert non_square >= 3

    # one train and one test tile: every crop equals the tile region, labels decoded
    for split in ("train", "test"):
        tile = meta["tiles"][split][0]
        kind = "complete" if split == "train" else "eroded"
        image = tifffile.imread(raw_root / layout.image_folder(meta["channels"])
                                / layout.image_file(tile, meta["channels"]))
        label, _ = decode_colors(tifffile.imread(raw_root / layout.label_folders[kind]
                                                 / layout.label_file(tile, kind)))
        entry = meta[split]
        for i, name in enumerate(entry["crops"]):
            if name.rsplit("_", 2)[0] != tile:
                continue
            y, x = entry["origins"][i]
            crop_label = read_png(data_root / dataset / split / "labels" / name)
            assert np.array_equal(read_png(data_root / dataset / split / "images" / name),
                                  image[y:y + FIXTURE_CROP, x:x + FIXTURE_CROP])
            assert np.array_equal(crop_label, label[y:y + FIXTURE_CROP, x:x + FIXTURE_CROP])
            counts = np.bincount(crop_label.ravel(), minlength=256)[COUNT_COLUMNS]
            assert counts.tolist() == entry["class_pixels"][i]
    assert np.asarray(meta["test"]["class_pixels"])[:, 6].sum() > 0  # eroded test labels


def test_meta_statistics_and_quirky_tiles(data_root):
    meta = load_meta(data_root, "potsdam")
    pixels = np.concatenate([read_png(data_root / "potsdam" / "train" / "images" / n).reshape(-1, 3)
                             for n in meta["train"]["crops"]]) / 255.0
    assert np.allclose(meta["mean"], pixels.mean(0), atol=1e-5)  # 192 px tiles: no padding
    assert np.allclose(meta["std"], pixels.std(0), atol=1e-5)
    info = meta["tile_info"]
    assert info["4_12"]["off_palette_pixels"] > 0.5 * 192 * 192 and info["4_12"]["unknown_pixels"] == 0
    assert info["6_7"]["off_palette_pixels"] > 0 and info["6_7"]["unknown_pixels"] == 0
    assert info["2_10"]["off_palette_pixels"] == 0
    counts = np.asarray(meta["train"]["class_pixels"])
    quirky = np.array([n.startswith(("4_12_", "6_7_")) for n in meta["train"]["crops"]])
    assert counts[quirky, 6].sum() == 0  # complete labels decode fully despite the quirks
    assert counts[np.array([n.startswith("6_7_") for n in meta["train"]["crops"]]), 5].sum() > 0
    assert meta["split"]["seed"] == 42 and meta["split"]["min_pixels"] == 4
    assert "sorted" in meta["split"]["index"]


# --------------------------------------------------------------------------------------- splits
def _presence(meta):
    return class_presence(meta["train"]["class_pixels"], meta["split"]["min_pixels"])


@pytest.mark.parametrize("dataset", ["vaihingen", "potsdam"])
def test_split_files_semantics(data_root, dataset):
    assert_every_split_nonempty(data_root, dataset)
    meta = load_meta(data_root, dataset)
    presence = _presence(meta)
    n_crops = len(presence)
    for task, step_dict in tasks.TASKS[dataset].items():
        steps = [step_dict[s] for s in sorted(step_dict)]
        disjoint = [np.load(data_root / dataset / task / f"train-{t}.npy") for t in range(len(steps))]
        overlapped = [np.load(data_root / dataset / f"{task}-ov" / f"train-{t}.npy") for t in range(len(steps))]
        used = np.concatenate(disjoint)
        assert len(used) == len(np.unique(used))  # a crop is in at most one step
        has_any = presence[:, sorted(c for s in steps for c in s)].any(axis=1)
        assert np.array_equal(np.sort(used), np.flatnonzero(has_any))  # unused = no class of any step
        for t, classes in enumerate(steps):
            assert disjoint[t].dtype == np.int64 and np.all(np.diff(disjoint[t]) > 0)
            assert presence[disjoint[t]][:, classes].any(axis=1).all()
            expected = np.flatnonzero(presence[:, classes].any(axis=1))
            assert np.array_equal(overlapped[t], expected)
            assert overlapped[t].max() < n_crops
            assert np.isin(disjoint[t], overlapped[t]).all()


def test_disjoint_split_deterministic_balanced_and_seeded():
    rng = np.random.default_rng(0)
    presence = rng.random((300, 6)) < 0.6
    steps = [[0, 1], [2], [3], [4], [5]]
    first = disjoint_split(presence, steps, seed=1)
    again = disjoint_split(presence, steps, seed=1)
    other = disjoint_split(presence, steps, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
    # crops that contain every class: the greedy spreads them evenly over the steps
    everything = np.ones((100, 6), bool)
    sizes = [len(s) for s in disjoint_split(everything, [[0, 1, 2, 3, 4], [5]], seed=0)]
    assert sizes == [50, 50]
    sizes = [len(s) for s in disjoint_split(everything, steps, seed=0)]
    assert max(sizes) - min(sizes) <= 1
    # a crop with a single candidate step always goes there
    only_car = np.zeros((5, 6), bool)
    only_car[:, 5] = True
    assert [len(s) for s in disjoint_split(only_car, steps, seed=0)] == [0, 0, 0, 0, 5]
    assert [len(s) for s in overlapped_split(only_car, steps)] == [0, 0, 0, 0, 5]


def test_splits_only_regenerates_from_meta(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root / "vaihingen", root / "vaihingen",
                    ignore=shutil.ignore_patterns("images", "images.npy", "labels.npy"))  # no image needed
    original = {p.relative_to(root): np.load(p) for p in root.rglob("*.npy")}
    # MiCro's tasks: disjoint + overlapped; MiB-CD's: split + overlap + noov
    assert len(original) == (2 * sum(len(s) for s in tasks.TASKS["vaihingen"].values())
                             + 3 * sum(len(s) for s in tasks.MIBCD_TASKS["vaihingen"].values()))
    for path in original:
        (root / path).unlink()
    data_process_vaihingen.main(["--dst", str(root), "--splits_only"])
    assert all(np.array_equal(np.load(root / p), a) for p, a in original.items())
    data_process_vaihingen.main(["--dst", str(root), "--splits_only", "--seed", "7"])
    assert load_meta(root, "vaihingen")["split"]["seed"] == 7
    changed = [not np.array_equal(np.load(root / p), a) for p, a in original.items()]
    assert any(changed)
    assert "split files rewritten" in capsys.readouterr().out
    overlapped_same = [np.array_equal(np.load(root / p), a) for p, a in original.items() if "-ov" in str(p)]
    assert all(overlapped_same)  # the overlapped split does not depend on the seed


# ---------------------------------------------------------------------------- zips and channels
def test_processing_from_zips_equals_processing_from_folders(tmp_path):
    sizes = dict(tile_size=100, n_train=2, n_test=1)
    for dataset in ("vaihingen", "potsdam"):
        generate(dataset, tmp_path / "folders", seed=5, **sizes)
        generate(dataset, tmp_path / "zips", seed=5, zip=True, **sizes)
    assert sorted(p.name for p in (tmp_path / "zips").iterdir()) == sorted([
        "ISPRS_semantic_labeling_Vaihingen.zip",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip", "Potsdam.zip"])
    with zipfile.ZipFile(tmp_path / "zips" / "Potsdam.zip") as archive:
        assert "Potsdam/4_Ortho_RGBIR.zip" in archive.namelist()  # one nested zip per product
    for dataset, layout in DATASETS.items():
        channels = "IRRG" if dataset == "potsdam" else None
        a = process_dataset(layout, tmp_path / "folders", tmp_path / "out_f", crop_size=48,
                            channels=channels, progress=False)
        b = process_dataset(layout, tmp_path / "zips", tmp_path / "out_z", crop_size=48,
                            channels=channels, progress=False)
        for split in ("train", "test"):
            assert a[split] == b[split] and len(a[split]["crops"]) > 0
            assert a["store"] == b["store"]
            for kind in ("images", "labels"):
                assert np.array_equal(np.load(tmp_path / "out_f" / dataset / split / f"{kind}.npy"),
                                      np.load(tmp_path / "out_z" / dataset / split / f"{kind}.npy"))
        assert a["test_labels"] == b["test_labels"] == "eroded"
        assert "zip:" in b["tile_info"][b["tiles"]["train"][0]]["image"]


def test_potsdam_rgbir_gives_4_channel_pngs(raw_root, tmp_path):
    meta = process_dataset(POTSDAM, raw_root, tmp_path, crop_size=96, channels="RGBIR",
                           test_labels="complete", progress=False, png=True)
    assert meta["channels"] == "RGBIR" and meta["num_channels"] == 4
    assert len(meta["mean"]) == len(meta["std"]) == 4
    assert meta["test_labels"] == "complete"
    assert np.asarray(meta["test"]["class_pixels"])[:, 6].sum() == 0  # complete: nothing ignored
    name = meta["train"]["crops"][0]
    with Image.open(tmp_path / "potsdam" / "train" / "images" / name) as img:
        assert img.mode == "RGBA"
        crop = np.array(img)
    tile = name.rsplit("_", 2)[0]
    y, x = meta["train"]["origins"][0]
    nir = tifffile.imread(raw_root / "3_Ortho_IRRG" / f"top_potsdam_{tile}_IRRG.tif")[..., 0]
    assert np.array_equal(crop[..., 3], nir[y:y + 96, x:x + 96])
    stored = np.load(tmp_path / "potsdam" / "train" / "images.npy")
    assert stored.shape[1:] == (96, 96, 4) and np.array_equal(stored[meta["store"]["train"]["rows"][0]], crop)
    from dataset.options import DataOptions
    from dataset.step_datasets import get_datasets
    train, val, test = get_datasets(DataOptions(data_root=str(tmp_path), dataset="potsdam", task="offline",
                                                step=0, overlap=False, crop_size=32, cross_val=False,
                                                random_seed=0))
    assert train[0][0].shape == (32, 32, 4) and test[0][0].shape == (96, 96, 4)  # uint8 H x W x C items


def test_missing_eroded_archive_falls_back_to_complete(raw_root, tmp_path, capsys):
    src = tmp_path / "raw"
    shutil.copytree(raw_root / "top", src / "top")
    shutil.copytree(raw_root / VAIHINGEN.label_folders["complete"], src / VAIHINGEN.label_folders["complete"])
    meta = process_dataset(VAIHINGEN, src, tmp_path / "out", crop_size=128, progress=False)
    assert meta["test_labels"] == "complete" and "test labels are the complete ones" in capsys.readouterr().out


# --------------------------------------------------------------------------------- error paths
def _small_vaihingen_copy(raw_root, dst):
    for folder in ("top", *VAIHINGEN.label_folders.values()):
        shutil.copytree(raw_root / folder, dst / folder)
    return dst


def _cli_error(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1  # one line, no traceback
    return err


def test_cli_missing_src_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = subprocess.run([sys.executable, str(REPO / "process_data" / "data_process_potsdam.py"),
                             "--src", str(missing), "--dst", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


def test_cli_errors_name_the_file(raw_root, tmp_path, capsys):
    src = _small_vaihingen_copy(raw_root, tmp_path / "raw")
    out = tmp_path / "out"
    args = ["--src", str(src), "--dst", str(out), "--crop_size", "64", "--quiet"]
    main = data_process_vaihingen.main

    label = src / VAIHINGEN.label_folders["complete"] / "top_mosaic_09cm_area3.tif"
    saved = label.read_bytes()
    label.unlink()  # image without label
    err = _cli_error(main, args, capsys)
    assert "top_mosaic_09cm_area3.tif has no label" in err

    tifffile.imwrite(label, np.zeros((20, 30, 3), np.uint8), photometric="rgb")  # size mismatch
    err = _cli_error(main, args, capsys)
    assert "size mismatch" in err and "top_mosaic_09cm_area3.tif" in err
    label.write_bytes(saved)

    image = src / "top" / "top_mosaic_09cm_area5.tif"
    image.write_bytes(b"not a tiff at all")  # unreadable file
    err = _cli_error(main, args, capsys)
    assert "cannot read" in err and str(image) in err
    assert not out.exists() or not any(out.iterdir())  # a failed run leaves nothing behind

    shutil.rmtree(src / "top")  # missing folder
    err = _cli_error(main, args, capsys)
    assert "'top'" in err and "ISPRS_semantic_labeling_Vaihingen.zip" in err

    (src / "Potsdam.zip").write_bytes(b"PK broken")  # damaged archive
    err = _cli_error(data_process_potsdam.main, ["--src", str(src), "--dst", str(out)], capsys)
    assert "cannot open" in err and "Potsdam.zip" in err

    err = _cli_error(main, ["--dst", str(tmp_path / "empty"), "--splits_only"], capsys)
    assert "meta.json not found" in err and "data_process_vaihingen.py" in err


def test_generator_cli_errors(tmp_path, capsys):
    from process_data import make_synthetic_isprs
    err = _cli_error(make_synthetic_isprs.main, ["--dataset", "potsdam", "--n_train", "1",
                                                 "--dst", str(tmp_path / "raw")], capsys)
    assert "--n_train 1" in err and "4_12" in err
    assert not (tmp_path / "raw").exists()
    err = _cli_error(make_synthetic_isprs.main, ["--dataset", "vaihingen", "--n_test", "18",
                                                 "--dst", str(tmp_path / "raw")], capsys)
    assert "17 test tiles" in err


def test_failed_run_keeps_the_previous_dataset(raw_root, tmp_path, capsys):
    src = _small_vaihingen_copy(raw_root, tmp_path / "raw")
    out = tmp_path / "out"
    process_dataset(VAIHINGEN, src, out, crop_size=128, progress=False)
    before = load_meta(out, "vaihingen")
    (src / "top" / "top_mosaic_09cm_area2.tif").write_bytes(b"junk")
    _cli_error(data_process_vaihingen.main, ["--src", str(src), "--dst", str(out), "--crop_size", "64",
                                             "--quiet"], capsys)
    assert load_meta(out, "vaihingen") == before
    assert sorted(p.name for p in out.iterdir()) == ["vaihingen"]  # no partial folder left
