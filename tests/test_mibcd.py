"""MiB-CD's benchmark: task family and label convention, filter modes, N-band input, F1, the recipe's
options (AdamW, cosine, early stopping, validation fraction), UFT, runs on synthetic Potsdam RGBIR."""
import csv
import json
import math
import re

import numpy as np
import pytest
import torch

import run
import tasks
from argparser import parse_args
from dataset.colormap import CLASS_NAMES
from dataset.incremental import label_lut
from dataset.layout import load_meta
from dataset.options import DataOptions
from dataset.step_datasets import get_datasets, split_file
from methods import get_method_class
from models import build_backbone, inflate_first_conv
from modules import ModelOptions, make_model
from process_data.isprs_processing import POTSDAM
from process_data.splits import class_balanced_split, class_presence, no_overlap_split, overlapped_split
from process_data.tile_processing import process_dataset
from tests.conftest import FIXTURE_CROP
from tests.test_run import assert_user_error, run_cli, torchrun
from utils.early_stopping import EarlyStopping
from utils.metrics import SegmentationMetrics, format_table
from utils.optimizer import build_optimizer
from utils.scheduler import build_scheduler

MIBCD_STEPS = {  # MiB-CD's tasks written out with class names (the paper's order)
    "6s": [["building"], ["tree"], ["impervious surfaces"], ["low vegetation"], ["car"], ["clutter"]],
    "222a": [["impervious surfaces", "low vegetation"], ["building", "tree"], ["car", "clutter"]],
    "321": [["building", "tree", "clutter"], ["impervious surfaces", "low vegetation"], ["car"]],
    "mibcd-offline": [list(CLASS_NAMES)],
}
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "48", "--batch_size", "2", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--print_interval", "2"]


@pytest.fixture(scope="module")
def rgbir_root(raw_root, tmp_path_factory):
    """The fixture's synthetic Potsdam processed with --channels RGBIR (4 bands)."""
    root = tmp_path_factory.mktemp("rgbir")
    process_dataset(POTSDAM, raw_root, root, crop_size=FIXTURE_CROP, stride=FIXTURE_CROP, seed=42,
                    channels="RGBIR", progress=False)
    return root


def mibcd_args(root, out, step, method="MiB", task="6s", extra=()):
    return ["--data_root", str(root), "--dataset", "potsdam", "--task", task, "--method", method, "--step",
            str(step), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"), "--results_dir",
            str(out / "results"), *TINY, *extra]


# ------------------------------------------------------------------------------------------- tasks
def test_mibcd_tasks_and_channels():
    for task, steps in MIBCD_STEPS.items():
        for dataset in ("vaihingen", "potsdam"):
            assert tasks.family(dataset, task) == "mibcd"
            by_name = [[CLASS_NAMES[c] for c in tasks.get_task_dict(dataset, task, len(steps) - 1)[s]]
                       for s in range(len(steps))]
            assert by_name == steps
            assert tasks.channel_names(dataset, task) == ["background"] + [n for s in steps for n in s]
            counts = tasks.get_per_task_classes(dataset, task, len(steps) - 1)
            assert counts == [len(steps[0]) + 1] + [len(s) for s in steps[1:]]
    assert tasks.channel_of("potsdam", "6s") == {2: 1, 4: 2, 1: 3, 3: 4, 5: 5, 0: 6}
    # MiCro's family keeps its exact meaning: clutter is channel 0, no synthetic background
    for task in tasks.TASKS["potsdam"]:
        assert tasks.family("potsdam", task) == "micro"
        assert tasks.channel_names("potsdam", task) == list(CLASS_NAMES)
        assert tasks.channel_of("potsdam", task) == {c: c for c in range(6)}
    assert tasks.get_per_task_classes("potsdam", "4-1", 1) == [5, 1]


def reference_mibcd(value, new, old, mode, unseen):
    """MiB-CD's convention written out for one raw label value (channel = 1 + position in the task)."""
    order = old + new
    if value == 255 or value > 5:
        return 255
    if mode in ("train", "val"):
        return 1 + order.index(value) if value in new else 0
    if value in order:
        return 1 + order.index(value)
    return 0 if unseen == "background" else 255


@pytest.mark.parametrize("task", ["6s", "222a", "321", "mibcd-offline"])
@pytest.mark.parametrize("unseen", ["background", "ignore"])
def test_mibcd_label_remapping_every_step_both_test_conventions(task, unseen):
    for step in range(tasks.num_steps("potsdam", task)):
        new, old = tasks.get_task_labels("potsdam", task, step)
        for mode in ("train", "val", "test"):
            lut = label_lut("potsdam", task, step, mode, unseen=unseen)
            assert [int(v) for v in lut] == [reference_mibcd(v, new, old, mode, unseen) for v in range(256)]
    # the default test convention of the family is 'background'
    assert np.array_equal(label_lut("potsdam", task, 0, "test"), label_lut("potsdam", task, 0, "test", "background"))


def test_mibcd_label_examples_and_micro_with_background_option():
    raw = np.array([0, 1, 2, 3, 4, 5, 255], np.uint8)  # clutter imp building lowveg tree car ignore
    assert label_lut("potsdam", "6s", 1, "train")[raw].tolist() == [0, 0, 0, 0, 2, 0, 255]
    assert label_lut("potsdam", "6s", 1, "test")[raw].tolist() == [0, 0, 1, 0, 2, 0, 255]
    assert label_lut("potsdam", "6s", 1, "test", "ignore")[raw].tolist() == [255, 255, 1, 255, 2, 255, 255]
    assert label_lut("potsdam", "321", 0, "train")[raw].tolist() == [3, 0, 1, 0, 2, 0, 255]
    # MiCro's tasks keep unseen -> ignore by default; the option sends them to clutter (channel 0)
    assert label_lut("potsdam", "4-1", 0, "test")[raw].tolist() == [0, 1, 2, 3, 4, 255, 255]
    assert label_lut("potsdam", "4-1", 0, "test", "background")[raw].tolist() == [0, 1, 2, 3, 4, 0, 255]


# ------------------------------------------------------------------------------------ filter modes
def test_class_balanced_split_is_disjoint_balanced_and_seeded():
    rng = np.random.default_rng(0)
    presence = rng.random((600, 6)) < 0.5
    presence[:40] = False  # crops without any class go nowhere
    steps = tasks.get_task_dict("potsdam", "6s", 5)
    steps = [steps[s] for s in sorted(steps)]
    first = class_balanced_split(presence, steps, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, class_balanced_split(presence, steps, seed=3)))
    assert any(not np.array_equal(a, b) for a, b in zip(first, class_balanced_split(presence, steps, 4)))
    used = np.concatenate(first)
    assert len(used) == len(np.unique(used))  # disjoint
    assert np.array_equal(np.sort(used), np.flatnonzero(presence.any(axis=1)))  # every crop with a class
    for t, classes in enumerate(steps):
        assert presence[first[t]][:, classes].all(axis=1).all()
    sizes = [len(s) for s in first]
    assert max(sizes) - min(sizes) <= 1  # each class present in plenty of crops: perfectly balanced

    # the greedy written out: seeded order, class present with the fewest crops so far (ties: lower index)
    order = np.random.default_rng(3).permutation(len(presence))
    counts, owner = [0] * 6, {}
    for crop in order:
        present = [c for c in range(6) if presence[crop, c]]
        if present:
            pick = min(present, key=lambda c: (counts[c], c))
            counts[pick] += 1
            owner[int(crop)] = pick
    for t, classes in enumerate(steps):
        assert first[t].tolist() == sorted(k for k, v in owner.items() if v in classes)


def test_overlap_and_noov_modes():
    presence = np.zeros((5, 6), bool)
    presence[0, [2]] = True          # building only
    presence[1, [2, 4]] = True       # building + tree (a later class of 6s)
    presence[2, [4, 1]] = True       # tree + impervious
    presence[3, [0]] = True          # clutter only (last step)
    presence[4, [2, 0]] = True       # building + clutter
    steps = [[2], [4], [1], [3], [5], [0]]
    assert [s.tolist() for s in overlapped_split(presence, steps)] == [[0, 1, 4], [1, 2], [2], [], [], [3, 4]]
    assert [s.tolist() for s in no_overlap_split(presence, steps)] == [[0], [1], [2], [], [], [3, 4]]


def test_split_files_of_the_mibcd_family(data_root):
    meta = load_meta(data_root, "potsdam")
    presence = class_presence(meta["train"]["class_pixels"], meta["split"]["min_pixels"])
    for task in ("6s", "222a", "321"):
        steps = tasks.get_task_dict("potsdam", task, tasks.num_steps("potsdam", task) - 1)
        steps = [steps[s] for s in sorted(steps)]
        expected = {"split": class_balanced_split(presence, steps, 42), "overlap": overlapped_split(presence, steps),
                    "noov": no_overlap_split(presence, steps)}
        for mode, per_step in expected.items():
            for t, indices in enumerate(per_step):
                assert np.array_equal(np.load(split_file(data_root, "potsdam", task, t, mode)), indices)
            assert meta["split"]["sizes"][task + tasks.FILTER_MODES["mibcd"][mode]] == [len(i) for i in per_step]


def test_get_datasets_mibcd_protocol(data_root):
    base = dict(data_root=str(data_root), dataset="potsdam", task="6s", step=1, crop_size=32, random_seed=0)
    train, val, test = get_datasets(DataOptions(**base))
    assert np.array_equal(train.indices, np.load(split_file(data_root, "potsdam", "6s", 1, "split")))
    meta = load_meta(data_root, "potsdam")
    tree = np.flatnonzero(np.asarray(meta["test"]["class_pixels"])[:, 4] >= meta["split"]["min_pixels"])
    assert np.array_equal(test.indices, tree)  # MiB-CD: test crops holding a class of the step
    assert np.array_equal(test.lut, label_lut("potsdam", "6s", 1, "test", "background"))
    _, _, every = get_datasets(DataOptions(**base, test_crops="all", test_unseen="ignore"))
    assert len(every) == len(meta["test"]["crops"])
    assert np.array_equal(every.lut, label_lut("potsdam", "6s", 1, "test", "ignore"))
    held, held_val, _ = get_datasets(DataOptions(**base, val_fraction=0.25, filter_mode="overlap"))
    ov = np.load(split_file(data_root, "potsdam", "6s", 1, "overlap"))
    assert len(held_val) == round(0.25 * len(ov)) and held_val.base.split == "train"
    assert np.array_equal(np.sort(np.concatenate([held.indices, held_val.indices])), ov)


# ---------------------------------------------------------------------------------------- N bands
def test_four_band_model_forward_and_weight_inflation(tmp_path):
    source = build_backbone("resnet18", "std", pretrained=False)  # random (Kaiming) weights
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    body = build_backbone("resnet18", "std", pretrained=path, in_channels=4)
    old_w, new_w = source.mod1.conv1.weight, body.mod1.conv1.weight
    assert new_w.shape == (64, 4, 7, 7)
    assert torch.equal(new_w[:, :3], old_w) and torch.equal(new_w[:, 3], old_w[:, 0])  # IR <- red filters
    assert torch.equal(inflate_first_conv(old_w, 3), old_w)
    assert torch.equal(body.mod2.block1.convs.conv1.weight, source.mod2.block1.convs.conv1.weight)
    # an infrared band equal to red gives the 3-band model's response to the image with red doubled
    body.eval(), source.eval()
    x = torch.randn(1, 3, 64, 64)
    doubled = x.clone()
    doubled[:, 0] *= 2
    with torch.no_grad():
        assert torch.allclose(body(torch.cat([x, x[:, :1]], 1)), source(doubled), rtol=1e-4, atol=1e-5)
    model = make_model(ModelOptions(backbone="resnet18", norm_act="std", output_stride=16, no_pretrained=True,
                                       pretrained=None, in_channels=4), [2, 1])
    logits, feats = model(torch.randn(2, 4, 48, 48))
    assert logits.shape == (2, 3, 48, 48) and model.body.in_channels == 4


def test_sample_images_show_rgb_of_a_four_band_image():
    from utils.reporting.logger import sample_images

    mean, std = [0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]
    image = torch.zeros(1, 4, 2, 2)
    image[0, 3] = 10.0  # a bright infrared band must not leak into the picture
    pixels = sample_images(image, mean, std)
    assert pixels.shape == (1, 2, 2, 3) and (pixels == 128).all()


# ---------------------------------------------------------------------------------------------- F1
def test_f1_per_class_micro_macro_against_direct_computation():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 17, 19))
    target[0, :3] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 5, size=target.shape))
    pred = np.where(target == 255, 0, pred)
    target[target == 4] = 3  # class 4 has no ground truth
    metrics = SegmentationMetrics(5)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
    res = metrics.results(old_classes=[0, 1, 2], new_classes=[3, 4])
    valid = target != 255
    for c in range(5):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        if c == 4:
            assert res["f1"][c] is None
        else:
            precision, recall = tp / (tp + fp), tp / (tp + fn)
            assert math.isclose(res["f1"][c], 2 * precision * recall / (precision + recall), rel_tol=1e-9)
    tps = sum(np.sum((pred == c) & (target == c) & valid) for c in range(5))
    fps = sum(np.sum((pred == c) & (target != c) & valid) for c in range(5))
    assert math.isclose(res["f1_micro"], tps / (tps + fps)) and math.isclose(res["f1_micro"], res["overall_acc"])
    assert math.isclose(res["f1_macro"], np.mean([res["f1"][c] for c in (1, 2, 3)]))  # foreground with truth
    table = format_table(res, ["bg", "a", "b", "c", "d"])
    assert "F1 micro" in table and "F1 macro" in table and re.search(r"^a\s+\S+\s+\S+\s+\S+$", table, re.M)


# ------------------------------------------------------------------------------------ optimisation
def test_adamw_cosine_and_uft():
    param = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer("adamw", [param], lr=1e-3, weight_decay=1e-2)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1e-2
    sched = build_scheduler("cosine", opt, max_iters=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert np.allclose(lrs, [0.5e-3 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert isinstance(build_optimizer("sgd", [param], lr=0.01, weight_decay=0), torch.optim.SGD)
    uft = get_method_class("uft")
    assert uft.name == "UFT" and uft.presets == {"unce": True}
    opts = parse_args(["--method", "UFT", "--cd_factor", "0.1", "--cd_factor_icl", "0.1", "--task", "6s",
                       "--dataset", "potsdam", "--step", "1"])
    assert opts.unce and opts.loss_kd == 0 and opts.cd_factor == 0.1 and opts.filter_mode == "split"


def test_early_stopping_keeps_the_best_epoch():
    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(patience=2)
    weights = {}
    for epoch, score in enumerate([0.1, 0.5, 0.4, 0.5, 0.3], start=1):
        with torch.no_grad():
            model.weight.fill_(epoch)
        weights[epoch] = model.weight.clone()
        stopper.update(epoch, score, model)
        if stopper.should_stop:
            break
    assert epoch == 4 and stopper.best_epoch == 2 and stopper.best_score == 0.5  # ties do not count
    assert stopper.restore_best(model) and torch.equal(model.weight, weights[2])
    empty = EarlyStopping(1)
    empty.update(1, None, model)
    assert empty.should_stop and not empty.restore_best(model)


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mibcd_chain(rgbir_root, tmp_path_factory):
    """MiB-CD's recipe on 6s steps 0-1 of synthetic Potsdam RGBIR (tiny)."""
    out = tmp_path_factory.mktemp("mibcd")
    recipe = ["--optimizer", "adamw", "--lr", "1e-3", "--weight_decay", "1e-2", "--lr_policy", "cosine",
              "--val_fraction", "0.2", "--patience", "1", "--epochs", "3", "--cd_factor", "0.1",
              "--cd_factor_icl", "0.1"]
    res = [run.main(mibcd_args(rgbir_root, out, step, extra=recipe)) for step in (0, 1)]
    return out, res


def test_6s_steps_0_1_rgbir_end_to_end(mibcd_chain, rgbir_root):
    out, (res0, res1) = mibcd_chain
    rows = list(csv.reader(open(out / "results" / "potsdam_6s_MiB.csv")))
    assert rows[0][:8] == ["step", "background", "building", "tree", "impervious surfaces", "low vegetation",
                           "car", "clutter"]
    assert rows[0][rows[0].index("overall_acc") + 1:][:2] == ["f1_micro", "f1_macro"]
    assert rows[1][3] == "x" and rows[2][3] != "x"  # tree is seen from step 1
    saved = json.load(open(out / "results" / "potsdam_6s_MiB.json"))["steps"]
    assert saved["1"]["protocol"] == {"family": "mibcd", "filter_mode": "split", "test_unseen": "background",
                                      "test_crops": "step", "val_fraction": 0.2}
    assert len(saved["1"]["f1"]) == 3 and res1["f1_micro"] == res1["overall_acc"]
    for step in (0, 1):
        ckpt = torch.load(out / "ckpt" / "step" / f"6s-potsdam_MiB_{step}.pth", weights_only=False)
        assert ckpt["model"]["body.mod1.conv1.weight"].shape[1] == 4 and ckpt["opts"]["in_channels"] == 4
        assert ckpt["classes"] == [2, 1][: step + 1]
        log = (out / "logs" / "6s-potsdam" / "MiB" / f"step{step}" / "log.txt").read_text()
        kept = re.search(r"kept the weights of epoch (\d+) \(best validation mIoU", log)
        assert kept and int(kept.group(1)) == ckpt["epoch"]
        scores = [float(s) for s in re.findall(r"validation after epoch \d+: mIoU ([\d.]+)", log)]
        assert scores[ckpt["epoch"] - 1] == max(scores)
        if "early stopping" in log:
            assert ckpt["epochs_run"] < 3
    # the step checkpoint is the best epoch: --test reproduces the reported numbers
    again = run.main(mibcd_args(rgbir_root, out, 1, extra=["--test"]))
    assert again["confusion"] == res1["confusion"]


def test_best_checkpoint_is_the_best_epochs_weights(rgbir_root, tmp_path, monkeypatch):
    """The saved step holds the weights of the epoch whose validation was best, not the last one's."""
    scores = iter([0.2, 0.9, 0.1, 0.05])
    snapshots = {}
    real_update = EarlyStopping.update

    def scripted(self, epoch, score, model):
        snapshots[epoch] = model.cls[0].weight.detach().clone()
        return real_update(self, epoch, next(scores), model)

    monkeypatch.setattr(EarlyStopping, "update", scripted)
    run.main(mibcd_args(rgbir_root, tmp_path, 0, method="FT",
                        extra=["--epochs", "4", "--patience", "2", "--val_fraction", "0.2"]))
    ckpt = torch.load(tmp_path / "ckpt" / "step" / "6s-potsdam_FT_0.pth", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["epochs_run"] == 4
    assert torch.equal(ckpt["model"]["cls.0.weight"], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[4])


def test_noov_and_overlap_runs_have_their_own_names(rgbir_root, tmp_path):
    task = "mibcd-offline"
    run.main(mibcd_args(rgbir_root, tmp_path, 0, method="FT", task=task, extra=["--filter_mode", "noov", "--debug"]))
    assert (tmp_path / "ckpt" / "step" / f"{task}-potsdam-noov_FT_0.pth").is_file()
    assert (tmp_path / "results" / f"potsdam_{task}-noov_FT.csv").is_file()
    run.main(mibcd_args(rgbir_root, tmp_path, 0, method="FT", task=task, extra=["--overlap", "--debug"]))
    assert (tmp_path / "ckpt" / "step" / f"{task}-potsdam-ov_FT_0.pth").is_file()
    assert not (tmp_path / "ckpt" / "step" / f"{task}-potsdam_FT_0.pth").exists()


def test_two_processes_6s_step1_matches_single_process_test(mibcd_chain, rgbir_root, tmp_path, free_port):
    out, _ = mibcd_chain
    args = mibcd_args(rgbir_root, tmp_path, 1, method="MiB-CD",
                      extra=["--step_ckpt", str(out / "ckpt" / "step" / "6s-potsdam_MiB_0.pth"),
                             "--optimizer", "adamw", "--lr_policy", "cosine", "--val_fraction", "0.2",
                             "--patience", "1", "--epochs", "2", "--overlap", "--allow_mismatch"])
    # overlap: enough crops for 2 x 2; --allow_mismatch: step 0 was trained on the split filter on purpose
    proc = torchrun(free_port, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.load(open(tmp_path / "results" / "potsdam_6s-ov_MiB-CD.json"))["steps"]["1"]
    single = run.main(mibcd_args(rgbir_root, tmp_path, 1, method="MiB-CD", extra=[
        "--test", "--overlap", "--name", "single", "--ckpt",
        str(tmp_path / "ckpt" / "step" / "6s-potsdam-ov_MiB-CD_1.pth")]))
    assert distributed["confusion"] == single["confusion"] and sum(map(sum, single["confusion"])) > 0


# ------------------------------------------------------------------------------------------ errors
def test_band_mismatch_is_one_line_and_writes_nothing(mibcd_chain, data_root, tmp_path, capsys):
    out, _ = mibcd_chain
    four_band = str(out / "ckpt" / "step" / "6s-potsdam_MiB_0.pth")
    fresh = tmp_path / "out"
    assert_user_error(capsys, mibcd_args(data_root, fresh, 1, extra=["--step_ckpt", four_band]),
                      "4-band", "3 bands")
    assert_user_error(capsys, mibcd_args(data_root, fresh, 0, extra=["--test", "--ckpt", four_band]),
                      "4-band", "3 bands")
    assert not fresh.exists()


def test_band_mismatch_names_the_option_that_makes_the_bands(mibcd_chain, data_root, tmp_path, capsys):
    out, _ = mibcd_chain
    four_band = out / "ckpt" / "step" / "6s-potsdam_MiB_0.pth"
    assert_user_error(capsys, mibcd_args(data_root, tmp_path / "out", 1, extra=["--step_ckpt", str(four_band)]),
                      f"{four_band} was trained on 4-band images but potsdam under --data_root {data_root} (RGB) has "
                      f"3 bands; use a checkpoint and a processed dataset with the same --channels")


def test_rgb_checkpoint_on_rgbir_data_is_refused(rgbir_root, data_root, tmp_path, capsys):
    run.main(mibcd_args(data_root, tmp_path, 0, method="FT", extra=["--debug"]))
    three = str(tmp_path / "ckpt" / "step" / "6s-potsdam_FT_0.pth")
    fresh = tmp_path / "fresh"
    assert_user_error(capsys, mibcd_args(rgbir_root, fresh, 1, method="FT", extra=["--step_ckpt", three]),
                      "3-band", "4 bands")
    assert not fresh.exists()


@pytest.mark.parametrize("task, extra, fragment", [
    ("4-1", ["--filter_mode", "split"], "belongs to MiB-CD's tasks"),
    ("6s", ["--filter_mode", "disjoint"], "belongs to MiCro's tasks"),
    ("6s", ["--filter_mode", "nonsense"], "is unknown"),
    ("6s", ["--filter_mode", "noov", "--overlap"], "contradict"),
    ("6s", ["--patience", "3"], "--val_fraction"),
    ("6s", ["--val_fraction", "1.5"], "between 0 and 1"),
])
def test_bad_protocol_options_one_line_exit_2_nothing_written(task, extra, fragment, tmp_path, data_root):
    args = mibcd_args(data_root, tmp_path / "out", 0, task=task, extra=extra)
    proc = run_cli(["run.py", *args])
    assert proc.returncode == 2 and proc.stderr.startswith("error:"), proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr
    assert not (tmp_path / "out").exists()


def test_paper_script_runs_the_recipe(data_root, tmp_path):
    """scripts/paper/mibcd.sh with the recipe (tiny model and 2 iterations per epoch added after `--`)."""
    from tests.test_scripts import ROOT, bash

    proc = bash("scripts/paper/mibcd.sh", "RGB", "--", "--backbone", "resnet18", "--no_pretrained", "--crop_size",
                "48", "--batch_size", "2", "--epochs", "1", "--num_workers", "0", "--debug", "--norm_act", "iabn",
                "--opt_level", "O0",  # fp16 autocast is very slow on a CPU; the recipe's O1 is checked below
                "--checkpoint_dir", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "logs"),
                "--results_dir", str(tmp_path / "results"),
                env={"DATA_RGB": str(data_root), "METHODS": "UFT-CD", "LAST_STEP": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = json.load(open(tmp_path / "results" / "potsdam_6s_UFT-CD-RGB.json"))["steps"]
    assert sorted(steps) == ["0", "1"]
    options = steps["1"]["options"]
    expected = dict(method="UFT", unce=True, loss_kd=0.0, cd_factor=0.1, cd_factor_icl=0.1, optimizer="adamw",
                    lr=1e-3, weight_decay=1e-2, lr_policy="cosine", patience=25, val_fraction=0.1,
                    filter_mode="split", task="6s", dataset="potsdam")
    assert {k: options[k] for k in expected} == expected
    assert "--opt_level O1" in (ROOT / "scripts" / "paper" / "mibcd.sh").read_text()
    bad = bash("scripts/paper/mibcd.sh", "CMYK")
    assert bad.returncode == 2 and "CMYK" in bad.stderr
