"""Datasets described by spec files, tasks by task files (docs/data.md#your-own-dataset): ISPRS processed through
its spec alone is byte-identical to its processor with the archive quirks; label decoding against a direct
per-pixel computation; LoveDA and OpenEarthMap from their archive layouts; a dataset of your own from a spec
and a task file through processing, --list_tasks, MiB steps 0-1, the campaign plan and the tables; bad specs
and task files end in one clear line."""
import copy as copying
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run
import tasks
from dataset.colormap import decode_colors
from dataset.options import DataOptions
from dataset.step_datasets import get_datasets
from process_data import data_process_loveda, data_process_potsdam, data_process_vaihingen, process_dataset
from process_data.make_synthetic_isprs import generate
from process_data.make_synthetic_landcover import MISSING_XBD_TILE
from tests.conftest import FIXTURE_CROP
from tests.test_outputs import load_script
from tests.test_run import TINY
from utils.dataset_spec import DatasetSpec, builtin_spec, builtin_spec_file, load_spec
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_tasks():
    """Task files loaded by a test (into tasks.py's tables) leave no trace for the other tests."""
    names = ("TASKS", "MIBCD_TASKS", "_CLASSES", "_BACKGROUND")
    saved = {name: copying.deepcopy(getattr(tasks, name)) for name in names}
    yield
    for name, value in saved.items():
        table = getattr(tasks, name)
        table.clear()
        table.update(value)


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def _assert_same_output(a, b):
    """Every file byte-identical; meta.json too but for the time the processing took."""
    assert _files(a) == _files(b) and len(_files(a)) > 10
    for rel in _files(a):
        left, right = (a / rel).read_bytes(), (b / rel).read_bytes()
        if rel.name == "meta.json":
            left, right = (b"\n".join(line for line in text.splitlines() if b'"processing_seconds"' not in line)
                           for text in (left, right))
        assert left == right, rel


# ---------------------------------------------------------------------------------------- ISPRS both ways
@pytest.mark.parametrize("dataset,script", [("vaihingen", data_process_vaihingen), ("potsdam", data_process_potsdam)])
def test_isprs_through_its_spec_alone_is_byte_identical_to_its_processor(raw_root, tmp_path, dataset, script):
    common = ["--src", str(raw_root), "--crop_size", "64", "--stride", "48", "--quiet"]
    script.main([*common, "--dst", str(tmp_path / "quirks")])
    process_dataset.main(["--spec", str(builtin_spec_file(dataset)), *common, "--dst", str(tmp_path / "spec")])
    _assert_same_output(tmp_path / "quirks" / dataset, tmp_path / "spec" / dataset)


# sha256 over every output file (meta.json without processing_seconds and the source paths of tile_info) of the
# ISPRS processors BEFORE dataset specs existed (main at d9c8baf), on the fixture's archives at crop 64 / stride 48.
# A deliberate change of the processed output updates these (with `_digest` on the new output) and says so.
PRE_SPEC_DIGESTS = {"vaihingen": "4efaced286c3e84902cbaba548b97553f5dba87c91fd5d6167aab656a45ea761",
                    "potsdam": "fba68fc28ea065fabd341432dc15bede7f4c04572f5a2ee3902766c2a08f6967"}


def _digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel, data = str(path.relative_to(folder)), path.read_bytes()
        if rel == "meta.json":
            meta = json.loads(data)
            meta.pop("processing_seconds")
            for info in meta["tile_info"].values():
                info.pop("image"), info.pop("label")
            data = json.dumps(meta, sort_keys=True).encode()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


@pytest.mark.parametrize("dataset", ["vaihingen", "potsdam"])
def test_isprs_output_is_what_it_was_before_specs(raw_root, tmp_path, dataset):
    process_dataset.main(["--spec", str(builtin_spec_file(dataset)), "--src", str(raw_root), "--crop_size", "64",
                          "--stride", "48", "--quiet", "--dst", str(tmp_path)])
    assert _digest(tmp_path / dataset) == PRE_SPEC_DIGESTS[dataset]


def test_potsdam_zips_through_its_spec_alone_are_byte_identical_too(tmp_path):
    """Potsdam.zip holds one zip per product: the spec's folders are the nested zips to open."""
    generate("potsdam", tmp_path / "raw", seed=1, tile_size=96, n_train=2, n_test=1, object_scale=0.6, zip=True)
    common = ["--src", str(tmp_path / "raw"), "--crop_size", "48", "--quiet", "--channels", "IRRG"]
    data_process_potsdam.main([*common, "--dst", str(tmp_path / "quirks")])
    process_dataset.main(["--spec", str(builtin_spec_file("potsdam")), *common, "--dst", str(tmp_path / "spec")])
    _assert_same_output(tmp_path / "quirks" / "potsdam", tmp_path / "spec" / "potsdam")
    meta = json.loads((tmp_path / "spec" / "potsdam" / "meta.json").read_text())
    assert "zip:" in meta["tile_info"]["4_12"]["image"] and meta["channels"] == "IRRG"


# ---------------------------------------------------------------------------------------- label decoding
def _direct_rgb(spec, rgb):
    """Per pixel, the rule of the spec's docstring written out (slow, obvious)."""
    label = np.full(rgb.shape[:2], 255, np.uint8)
    unknown = off = 0
    palette = spec.palette.astype(int).tolist()
    ignore = spec.ignore_colours.tolist()
    for y in range(rgb.shape[0]):
        for x in range(rgb.shape[1]):
            colour = [int(v) for v in rgb[y, x, :3]]
            if spec.snap == "threshold":
                off += any(v not in (0, 255) for v in colour)
                snapped = [255 if v >= 128 else 0 for v in colour]
                if snapped in palette:
                    label[y, x] = palette.index(snapped)
                elif snapped not in [[255 if v >= 128 else 0 for v in c] for c in ignore]:
                    unknown += 1
                continue
            off += colour not in palette and colour not in ignore
            distances = [max(abs(a - b) for a, b in zip(colour, c)) for c in palette]
            near_ignore = any(max(abs(a - b) for a, b in zip(colour, c)) <= spec.tolerance for c in ignore)
            if near_ignore:
                continue
            if min(distances) <= spec.tolerance:
                label[y, x] = distances.index(min(distances))
            else:
                unknown += 1
    return label, unknown, off


def test_threshold_snapping_is_the_isprs_decoding():
    spec = builtin_spec("vaihingen")
    rng = np.random.default_rng(0)
    exact = np.concatenate([spec.palette, [[0, 0, 0], [255, 0, 255]]])[rng.integers(0, 8, (24, 20))]
    rgb = np.clip(exact.astype(int) + rng.integers(-40, 41, exact.shape) * (rng.random((24, 20, 1)) < 0.3),
                  0, 255).astype(np.uint8)
    label, unknown, off = spec.decode(rgb)
    direct = _direct_rgb(spec, rgb)
    assert np.array_equal(label, direct[0]) and (unknown, off) == direct[1:]
    assert np.array_equal(label, decode_colors(rgb)[0]) and unknown == decode_colors(rgb)[1] > 0 and off > 0


def test_nearest_colour_with_tolerance_against_a_direct_computation():
    spec = DatasetSpec({"name": "x", "classes": ["a", "b", "c"], "palette": [[10, 20, 30], [200, 100, 50],
                                                                              [90, 90, 90]],
                        "labels": {"encoding": "rgb", "snap": "nearest", "tolerance": 12,
                                   "ignore_colours": [[0, 0, 0]]},
                        "channels": {"RGB": ["R", "G", "B"]}, "images": "i/{tile}.png", "label_files": "l/{tile}.png",
                        "splits": {"train": {}, "test": {}}}, "test")
    rng = np.random.default_rng(1)
    colours = np.array([[10, 20, 30], [200, 100, 50], [90, 90, 90], [0, 0, 0], [150, 150, 10]])
    base = colours[rng.integers(0, 5, (16, 18))]
    rgb = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    label, unknown, off = spec.decode(rgb)
    direct = _direct_rgb(spec, rgb)
    assert np.array_equal(label, direct[0]) and (unknown, off) == direct[1:]
    assert unknown > 0 and set(np.unique(label)) == {0, 1, 2, 255}


def test_index_labels_map_values_and_count_the_unnamed_ones():
    spec = builtin_spec("loveda")  # 0 no-data (ignored), 1..7 the classes
    raw = np.random.default_rng(2).integers(0, 10, (30, 30)).astype(np.uint8)
    label, unknown, off = spec.decode(raw[..., None])
    expected = np.where((raw >= 1) & (raw <= 7), raw.astype(int) - 1, 255)
    assert np.array_equal(label, expected) and unknown == int((raw >= 8).sum()) and off == 0


# ---------------------------------------------------------------------------------------- LoveDA, OpenEarthMap
def test_loveda_from_its_layout(raw_root, data_root):
    meta = json.loads((data_root / "loveda" / "meta.json").read_text())
    assert meta["classes"] == ["background", "building", "road", "water", "barren", "forest", "agricultural"]
    assert meta["tiles"] == {"train": ["urban1366", "urban1367", "rural0", "rural1"],  # Val is the test split
                             "test": ["urban3514", "rural2522"]}  # Test/ has no labels: not used
    assert meta["count_columns"] == [0, 1, 2, 3, 4, 5, 6, 255] and meta["num_channels"] == 3
    labels = np.load(data_root / "loveda" / "train" / "labels.npy", mmap_mode="r")
    images = np.load(data_root / "loveda" / "train" / "images.npy", mmap_mode="r")
    for i, name in enumerate(meta["train"]["crops"]):
        tile = name.rsplit("_", 2)[0]
        domain, number = ("Urban", tile[5:]) if tile.startswith("urban") else ("Rural", tile[5:])
        mask = np.array(Image.open(raw_root / "Train" / domain / "masks_png" / f"{number}.png"))
        picture = np.array(Image.open(raw_root / "Train" / domain / "images_png" / f"{number}.png"))
        y, x = meta["train"]["origins"][i]
        row = meta["store"]["train"]["rows"][i]
        expected = mask[y:y + FIXTURE_CROP, x:x + FIXTURE_CROP].astype(int) - 1
        assert np.array_equal(labels[row], np.where(expected < 0, 255, expected))  # 0 no-data -> ignored
        assert np.array_equal(images[row], picture[y:y + FIXTURE_CROP, x:x + FIXTURE_CROP])
    assert np.asarray(meta["train"]["class_pixels"])[:, -1].sum() > 0  # the no-data strips


def test_openearthmap_from_its_lists(raw_root, data_root):
    meta = json.loads((data_root / "openearthmap" / "meta.json").read_text())
    listed = (raw_root / "OpenEarthMap_wo_xBD" / "train.txt").read_text().split()
    assert MISSING_XBD_TILE in listed  # listed, no image: skipped like the real xBD tiles
    assert meta["tiles"]["train"] == [n[:-4] for n in listed if n != MISSING_XBD_TILE]
    assert meta["tiles"]["test"] == [n[:-4] for n in (raw_root / "OpenEarthMap_wo_xBD" / "val.txt").read_text().split()]
    assert len(meta["classes"]) == 8 and meta["count_columns"][-1] == 255
    assert tasks.family("openearthmap", "7-1") == tasks.MIBCD  # no background class: synthetic background


# ---------------------------------------------------------------------------------------- your own dataset
MY_CLASSES = ["ground", "building", "road", "water", "barren", "forest", "farmland", "snow"]


def _my_spec(tmp_path):
    spec = {"name": "mycity", "classes": MY_CLASSES, "background": "ground",
            "palette": [[255, 255, 255], [255, 0, 0], [255, 255, 0], [0, 0, 255], [159, 129, 183], [0, 255, 0],
                        [255, 195, 128], [200, 200, 255]],
            "labels": {"encoding": "index", "values": {"0": "ignore", **{str(i + 1): c for i, c in
                                                                          enumerate(MY_CLASSES)}}},
            "channels": {"RGB": ["R", "G", "B"]},
            "images": "images_png/{tile}.png", "label_files": "masks_png/{tile}.png",
            "splits": {"train": {"images": "Train/Urban/images_png/{tile}.png",
                                 "label_files": "Train/Urban/masks_png/{tile}.png"},
                       "test": {"images": "Val/*/images_png/{tile}.png", "label_files": "Val/*/masks_png/{tile}.png"}},
            "crop_size": 64}
    task_file = {"tasks": {"5-2": {"family": "micro", "steps": [MY_CLASSES[:5], ["forest", "farmland"]]},
                           "snowy": {"family": "micro", "steps": [["ground", "building"], ["snow"]]}}}
    (tmp_path / "mycity.json").write_text(json.dumps(spec))
    (tmp_path / "mytasks.json").write_text(json.dumps(task_file))
    return tmp_path / "mycity.json", tmp_path / "mytasks.json"


@pytest.fixture(scope="module")
def my_dataset(raw_root, tmp_path_factory):
    """A dataset of your own (LoveDA-like files, own classes incl. a 'snow' no tile holds) from a spec and a task
    file, processed, and MiB steps 0 and 1 of its task 5-2 trained on it."""
    root = tmp_path_factory.mktemp("mine")
    spec, task_file = _my_spec(root)
    process_dataset.main(["--spec", str(spec), "--task_file", str(task_file), "--src", str(raw_root),
                          "--dst", str(root / "data"), "--quiet"])
    out = root / "out"
    args = ["--data_root", str(root / "data"), "--dataset", "mycity", "--task_file", str(task_file), "--task", "5-2",
            "--method", "MiB", "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), *TINY]
    results = [run.main([*args, "--step", str(step)]) for step in (0, 1)]
    return root, spec, task_file, out, results


def test_own_dataset_processing_and_its_tasks(my_dataset):
    root, _, _, _, _ = my_dataset
    meta = json.loads((root / "data" / "mycity" / "meta.json").read_text())
    assert meta["classes"] == MY_CLASSES and meta["crop_size"] == 64  # the spec's crop size
    assert meta["tiles"] == {"train": ["1366", "1367"], "test": ["2522", "3514"]}  # Val/* : both domains
    assert meta["split"]["sizes"]["5-2"][1] > 0 and meta["split"]["sizes"]["snowy"][1] == 0
    presence = np.asarray(meta["train"]["class_pixels"])[:, :-1] >= meta["split"]["min_pixels"]
    step1 = np.load(root / "data" / "mycity" / "5-2" / "train-1.npy")
    assert presence[step1][:, [5, 6]].any(axis=1).all()  # every crop of step 1 holds forest or farmland


def test_own_dataset_mib_steps_0_and_1(my_dataset):
    _, _, _, out, (res0, res1) = my_dataset
    rows = list(csv.DictReader(open(out / "results" / "mycity_5-2_MiB.csv")))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert [name for name in MY_CLASSES[:7] if name in rows[1]] == MY_CLASSES[:7]  # its own class names
    assert rows[0]["forest"] == "x" and rows[1]["forest"] != "x"
    assert res0["miou_new"] is None and res1["miou_new"] is not None


def test_own_dataset_lists_its_tasks_and_refuses_a_step_without_crops(my_dataset, capsys):
    root, _, task_file, out, _ = my_dataset
    data = ["--data_root", str(root / "data"), "--dataset", "mycity", "--task_file", str(task_file)]
    with pytest.raises(SystemExit) as exc:
        run.main([*data, "--list_tasks"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["5-2 (MiCro's family, 2 steps): 0: ground, building, road, water, barren | 1: forest, farmland",
                     "snowy (MiCro's family, 2 steps): 0: ground, building | 1: snow"]
    snowy = [*data, "--task", "snowy", "--checkpoint_dir", str(out / "ckpt2"), "--logdir", str(out / "logs2"),
             "--results_dir", str(out / "results2"), *TINY]
    run.main([*snowy, "--step", "0"])
    with pytest.raises(SystemExit) as exc:
        run.main([*snowy, "--step", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 1 of task snowy has no training crop") and "snow" in err[-1]


def test_own_dataset_campaign_plan_and_tables(my_dataset):
    root, _, task_file, out, _ = my_dataset
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    plan = subprocess.run([sys.executable, "scripts/campaign.py", "--data_root", str(root / "data"), "--datasets",
                           "mycity", "--task_file", str(task_file), "--tasks", "5-2", "--methods", "MiB", "--dry_run",
                           "--", "--checkpoint_dir", str(out / "ckpt"), "--results_dir", str(out / "results"), *TINY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    # the runs trained above with run.py --task_file are the campaign's own runs (same options): done
    assert "done  mycity 5-2 disjoint seed 42 step 0: MiB" in plan.stdout
    assert "done  mycity 5-2 disjoint seed 42 step 1: MiB" in plan.stdout
    results = str(out / "results" / "mycity_5-2_MiB.csv")
    tables = subprocess.run([sys.executable, "scripts/summarize_results.py", results],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert tables.returncode == 0, tables.stderr
    assert "| method | 5-2 old | 5-2 new | 5-2 all |" in tables.stdout and "| MiB |" in tables.stdout


# ---------------------------------------------------------------------------------------- built-in + task file
def test_loveda_mib_steps_0_and_1_of_a_task_from_a_file(data_root, tmp_path):
    """A task file's split files come from meta.json at the run (as --splits_only --task_file writes them) and
    follow the file: a task whose steps change gets new split files."""
    names = builtin_spec("loveda").classes
    task_file = tmp_path / "tasks.json"
    task_file.write_text(json.dumps({"tasks": {"3-4": {"family": "micro", "steps": [names[:3], names[3:]]}}}))
    copy = tmp_path / "data"
    shutil.copytree(data_root / "loveda", copy / "loveda")
    args = ["--data_root", str(copy), "--dataset", "loveda", "--task_file", str(task_file), "--task", "3-4",
            "--method", "MiB", "--checkpoint_dir", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "logs"),
            "--results_dir", str(tmp_path / "results"), *TINY]
    run.main([*args, "--step", "0"])
    run.main([*args, "--step", "1"])
    rows = list(csv.DictReader(open(tmp_path / "results" / "loveda_3-4_MiB.csv")))
    assert [r["step"] for r in rows] == ["0", "1"] and rows[0]["water"] == "x" and rows[1]["water"] != "x"
    written = {p.relative_to(copy): p.read_bytes() for p in (copy / "loveda").glob("3-4*/*.npy")}
    expected = sorted(f"loveda/3-4{suffix}/train-{step}.npy" for suffix in ("", "-ov") for step in (0, 1))
    assert sorted(str(p) for p in written) == expected
    cli = tmp_path / "cli"
    shutil.copytree(data_root / "loveda", cli / "loveda")
    data_process_loveda.main(["--dst", str(cli), "--splits_only", "--task_file", str(task_file)])
    assert all((cli / rel).read_bytes() == content for rel, content in written.items())
    # the same name with other steps: the next run's split files are the new task's
    three = [names[:3], names[3:5], names[5:]]
    task_file.write_text(json.dumps({"tasks": {"3-4": {"family": "micro", "steps": three}}}))
    tasks.load_task_file(task_file, "loveda")
    opts = DataOptions(data_root=str(copy), dataset="loveda", task="3-4", step=2, crop_size=64,
                       task_file=str(task_file))
    train, _, _ = get_datasets(opts)
    meta = json.loads((copy / "loveda" / "meta.json").read_text())
    presence = np.asarray(meta["train"]["class_pixels"])[:, :-1] >= meta["split"]["min_pixels"]
    folder = copy / "loveda" / "3-4"
    assert np.array_equal(np.sort(train.indices), np.load(folder / "train-2.npy")) and len(train.indices)
    for step, classes in enumerate(three):  # the disjoint rule of the new steps: each crop once, holding a class
        indices = np.load(folder / f"train-{step}.npy")
        assert presence[indices][:, [names.index(c) for c in classes]].any(axis=1).all()
    steps = [set(np.load(folder / f"train-{step}.npy").tolist()) for step in range(3)]
    assert not (steps[0] & steps[1] or steps[0] & steps[2] or steps[1] & steps[2])


def test_openearthmap_mib_steps_0_and_1_of_a_shipped_task_and_whole_tiles(raw_root, data_root, tmp_path):
    args = ["--data_root", str(data_root), "--dataset", "openearthmap", "--task", "7-1", "--method", "MiB",
            "--filter_mode", "overlap", "--checkpoint_dir", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "logs"),
            "--results_dir", str(tmp_path / "results"), *TINY]
    run.main([*args, "--step", "0"])
    run.main([*args, "--step", "1"])
    rows = list(csv.DictReader(open(tmp_path / "results" / "openearthmap_7-1-ov_MiB.csv")))
    assert [r["step"] for r in rows] == ["0", "1"] and rows[0]["building"] == "x" and rows[1]["building"] != "x"
    # whole tiles from the raw layout, coloured in the dataset's palette (synthetic background: black)
    predict = load_script("predict_tiles")
    ckpt = tmp_path / "ckpt" / "step" / "7-1-openearthmap-ov_MiB_1.pth"
    predict.main(["--ckpt", str(ckpt), "--src", str(raw_root), "--out", str(tmp_path / "pred"), "--data_root",
                  str(data_root), "--window", "64", "--device", "cpu", "--no_preview"])
    meta = json.loads((data_root / "openearthmap" / "meta.json").read_text())
    tiles = [r["tile"] for r in csv.DictReader(open(tmp_path / "pred" / "metrics.csv"))]
    assert tiles == meta["tiles"]["test"] + ["all"]
    allowed = {tuple(c) for c in meta["palette"]} | {(0, 0, 0)}
    for tile in meta["tiles"]["test"]:
        colours = np.array(Image.open(tmp_path / "pred" / f"{tile}_pred.png")).reshape(-1, 3)
        assert {tuple(int(v) for v in c) for c in np.unique(colours, axis=0)} <= allowed


# ---------------------------------------------------------------------------------------- bad files: one line
BAD_TASKS = {
    "unknown class": ({"t": {"family": "micro", "steps": [["background", "house"]]}}, "unknown class 'house'"),
    "class in two steps": ({"t": {"family": "micro", "steps": [["background", "road"], ["road"]]}},
                           "class 'road' is in step 0 and step 1"),
    "empty step": ({"t": {"family": "micro", "steps": [["background"], []]}}, "step 1 is empty"),
    "no family": ({"t": {"steps": [["background"]]}}, 'give "family": micro or mibcd'),
    "micro without the background first": ({"t": {"family": "micro", "steps": [["road", "background"]]}},
                                           "starts step 0 with the background class 'background'"),
    "a shipped name, other steps": ({"6-1": {"family": "micro", "steps": [["background"], ["road"]]}},
                                    "already has a task of that name"),
    "underscore in the name": ({"my_task": {"family": "micro", "steps": [["background"]]}}, "no _ or /"),
}


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_files_are_one_line(tmp_path, capsys, case):
    content, fragment = BAD_TASKS[case]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": content}))
    with pytest.raises(SystemExit) as exc:
        run.main(["--dataset", "loveda", "--task_file", str(path), "--list_tasks"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: task '") and fragment in err, err


def test_micro_family_needs_a_background_class(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": {"t": {"family": "micro", "steps": [["road", "tree"]]}}}))
    with pytest.raises(UserError, match="openearthmap has no background class"):
        tasks.load_task_file(path, "openearthmap")


BAD_SPECS = {
    "missing key": (lambda s: s.pop("splits"), '"splits" is missing'),
    "no {tile}": (lambda s: s.update(images="Train/x.png"), "must hold {tile} once"),
    "unknown class value": (lambda s: s["labels"]["values"].update({"9": "snow"}), "9 -> 'snow' is neither"),
    "background not a class": (lambda s: s.update(background="sky"), "\"background\" 'sky' is not one"),
    "threshold on other colours": (lambda s: s.update(labels={"encoding": "rgb", "snap": "threshold"}),
                                   "needs class colours made of 0 and 255"),
    "palette size": (lambda s: s["palette"].pop(), "one [R, G, B]"),
    "underscore in the name": (lambda s: s.update(name="my_city"), "without _"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_are_one_line(tmp_path, capsys, case):
    spec = json.loads(builtin_spec_file("loveda").read_text())
    change, fragment = BAD_SPECS[case]
    change(spec)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(SystemExit) as exc:
        process_dataset.main(["--spec", str(path), "--src", str(tmp_path), "--dst", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_every_shipped_spec_and_task_file_loads():
    for name in ("vaihingen", "potsdam", "loveda", "openearthmap"):
        spec = load_spec(builtin_spec_file(name))
        assert spec.name == name and tasks.class_names(name) == spec.classes
        assert len(tasks.task_names(name)) >= 3  # offline and at least two CISS tasks


def test_spec_sources_that_clash_or_miss_their_list_are_one_line(raw_root, tmp_path, capsys):
    spec_path, _ = _my_spec(tmp_path)
    spec = json.loads(spec_path.read_text())
    spec["splits"]["train"] = [spec["splits"]["train"], spec["splits"]["train"]]  # the same tiles twice
    spec_path.write_text(json.dumps(spec))
    for change, fragment in ((None, "tile 1366 of mycity is found twice"),
                             ({"list": "missing.txt"}, "no list file missing.txt under --src")):
        if change:
            spec["splits"]["train"] = change
            spec_path.write_text(json.dumps(spec))
        with pytest.raises(SystemExit) as exc:
            process_dataset.main(["--spec", str(spec_path), "--src", str(raw_root), "--dst", str(tmp_path / "out")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_list_tasks_of_built_in_datasets(capsys):
    for dataset, first in (("vaihingen", "offline (MiCro's family, 1 step): 0: clutter, impervious surfaces, "
                                         "building, low vegetation, tree, car"),
                           ("loveda", "offline (MiCro's family, 1 step): 0: background, building, road, water, "
                                      "barren, forest, agricultural"),
                           ("openearthmap", "offline (MiB-CD's family, 1 step): 0: bareland, rangeland, developed "
                                            "space, road, tree, water, agriculture land, building")):
        with pytest.raises(SystemExit) as exc:
            run.main(["--dataset", dataset, "--list_tasks"])
        lines = capsys.readouterr().out.splitlines()
        assert exc.value.code == 0 and lines[0] == first and len(lines) == len(tasks.task_names(dataset))
    assert "6-1 (MiCro's family, 2 steps): 0: background, building, road, water, barren, forest | 1: agricultural" \
        in tasks.describe_tasks("loveda")
    assert "6s (MiB-CD's family, 6 steps): 0: building | 1: tree | 2: impervious surfaces | 3: low vegetation | " \
           "4: car | 5: clutter" in tasks.describe_tasks("potsdam")
