"""What a run leaves for the researcher: TensorBoard runs (tags, prediction figures, the per-task curve,
nothing from failed runs, --test apart), whole-tile predictions and their scores, the demo's figures."""
import csv
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from dataset.colormap import CLASS_NAMES, PALETTE, decode_colors
from utils.reporting.logger import Logger, clean_tag, prediction_figure, write_task_curve
from utils.reporting.results import read_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--print_interval", "2"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def events(folder):
    """{(tag, step): value proto} over every event file directly in `folder`."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                found[(value.tag, event.step)] = value
    return found


def event_files(folder):
    return sorted(Path(folder).glob("events.out.tfevents.*"))


def args_for(data_root, out, step, extra=()):
    return ["--data_root", str(data_root), "--dataset", "vaihingen", "--task", "4-1", "--method", "FT",
            "--step", str(step), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), *TINY, *extra]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """FT steps 0 and 1 of 4-1 with the default --sample_num."""
    out = tmp_path_factory.mktemp("outputs")
    run.main(args_for(data_root, out, 0))
    run.main(args_for(data_root, out, 1))
    return out


# ---- logger ---------------------------------------------------------------------------
def test_tags_have_no_empty_levels(tmp_path):
    assert clean_tag("train//seg") == "train/seg" and clean_tag("/a/b/") == "a/b"
    logger = Logger(tmp_path / "run")
    logger.add_scalars({"seg": 1.5}, 3, prefix="train/")  # the Trainer's call
    logger.close()
    assert set(events(tmp_path / "run")) == {("train/seg", 3)}


def test_logger_writes_nothing_until_the_first_record(tmp_path, capsys):
    logger = Logger(tmp_path / "run")
    logger.info("set-up line")
    logger.close()
    assert not (tmp_path / "run").exists()
    assert "set-up line" in capsys.readouterr().out
    logger = Logger(tmp_path / "run2")
    logger.info("kept for log.txt")
    logger.add_scalar("x", 1.0, 0)
    logger.close()
    assert "kept for log.txt" in (tmp_path / "run2" / "log.txt").read_text()


def test_run_failing_before_training_logs_nothing(data_root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(args_for(data_root, tmp_path, 1))  # step 0 is missing: a user error after the logger exists
    assert "error: step 0 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_prediction_figure_has_titles_and_legend():
    columns = [np.zeros((2, 8, 8, 3), np.uint8)] * 3
    fig = prediction_figure(columns, ["image", "ground truth", "prediction"], CLASS_NAMES)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["image", "ground truth", "prediction"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:6] == list(CLASS_NAMES) and len(legend) == 7
    colours = [tuple(np.round(np.array(p.get_facecolor()[:3]) * 255).astype(int)) for p in fig.legends[0].get_patches()]
    assert colours[:6] == [tuple(int(v) for v in row) for row in PALETTE]


def test_task_curve_is_rebuilt_from_the_rows(tmp_path):
    rows = [{"step": 0, "miou_old": 80.0, "miou_new": None, "miou_all": 80.0},
            {"step": 1, "miou_old": 70.0, "miou_new": 10.0, "miou_all": 60.0}]
    write_task_curve(tmp_path / "task", rows)
    rows[1] = {"step": 1, "miou_old": 75.0, "miou_new": 20.0, "miou_all": 64.0}  # step 1 re-run
    write_task_curve(tmp_path / "task", rows)
    assert len(event_files(tmp_path / "task")) == 1
    values = {key: v.simple_value for key, v in events(tmp_path / "task").items() if v.HasField("simple_value")}
    assert values == pytest.approx({("task/mIoU_old", 0): 0.8, ("task/mIoU_all", 0): 0.8, ("task/mIoU_old", 1): 0.75,
                                    ("task/mIoU_new", 1): 0.2, ("task/mIoU_all", 1): 0.64})


def test_run_logs_predictions_and_the_task_curve(trained):
    logs = trained / "logs" / "4-1-vaihingen" / "FT"
    step1 = events(logs / "step1")
    assert ("test/predictions", 1) in step1 and step1[("test/predictions", 1)].image.height > 100
    assert not [tag for tag, _ in step1 if "//" in tag]
    assert {("train/seg", 2), ("train/lr", 2)} <= set(step1)
    curve = events(logs / "task")
    rows = read_results(trained / "results" / "vaihingen_4-1_FT.csv")
    for row in rows:
        for key in ("miou_old", "miou_all"):
            assert curve[(f"task/mIoU_{key[5:]}", row["step"])].simple_value == pytest.approx(row[key] / 100, abs=1e-4)
    assert curve[("task/mIoU_new", 1)].simple_value == pytest.approx(rows[1]["miou_new"] / 100, abs=1e-4)
    assert ("task/mIoU_new", 0) not in curve


def test_test_mode_logs_beside_not_into_the_training_run(trained, data_root):
    step1 = trained / "logs" / "4-1-vaihingen" / "FT" / "step1"
    before = event_files(step1)
    run.main(args_for(data_root, trained, 1, ["--test"]))
    assert event_files(step1) == before
    assert ("test/miou_all", 1) in events(step1 / "test")


# ---- whole tiles ----------------------------------------------------------------------
class Averaging(torch.nn.Module):
    """A model whose logits depend on the absolute window content (3 channels -> 2 classes)."""

    def forward(self, x):
        logits = torch.stack([x[:, 0] * 2 + x[:, 1], x[:, 2] - x[:, 0] + x.mean(dim=(1, 2, 3))[:, None, None]], 1)
        return logits, {}


def test_sliding_window_averages_the_logits_of_every_covering_window():
    tiles = load_script("predict_tiles")
    image = torch.randn(3, 23, 30, generator=torch.Generator().manual_seed(0))
    got = tiles.sliding_window_logits(Averaging(), image, window=10, overlap=0.5, batch_size=3, device="cpu")
    total, count = np.zeros((2, 23, 30)), np.zeros((23, 30))
    for y in [0, 5, 10, 13]:  # stride 5, last window aligned to the edge
        for x in [0, 5, 10, 15, 20]:
            window = image[:, y:y + 10, x:x + 10][None]
            total[:, y:y + 10, x:x + 10] += Averaging()(window)[0][0].numpy()
            count[y:y + 10, x:x + 10] += 1
    np.testing.assert_allclose(got.numpy(), total / count, rtol=1e-5, atol=1e-5)
    small = torch.randn(3, 6, 7)  # shorter than the window: zero padded, cropped back
    padded = torch.zeros(3, 10, 10)
    padded[:, :6, :7] = small
    np.testing.assert_allclose(tiles.sliding_window_logits(Averaging(), small, 10, 0.5, 2, "cpu").numpy(),
                               Averaging()(padded[None])[0][0, :, :6, :7].numpy(), rtol=1e-5)


def test_predict_tiles_writes_palette_pngs_and_correct_scores(trained, raw_root, data_root, tmp_path):
    tiles = load_script("predict_tiles")
    ckpt = trained / "ckpt" / "step" / "4-1-vaihingen_FT_1.pth"
    out = tmp_path / "pred"
    overall = tiles.main(["--ckpt", str(ckpt), "--src", str(raw_root), "--out", str(out), "--data_root",
                          str(data_root), "--window", "64", "--overlap", "0.25", "--device", "cpu"])
    meta = json.loads((data_root / "vaihingen" / "meta.json").read_text())
    test_tiles = meta["tiles"]["test"]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["tile"] for r in rows] == test_tiles + ["all"]
    confusion = np.zeros((6, 6), np.int64)
    for tile in test_tiles:
        pred_rgb = np.array(Image.open(out / f"{tile}_pred.png"))
        assert {tuple(c) for c in pred_rgb.reshape(-1, 3)} <= {tuple(int(v) for v in c) for c in PALETTE}
        assert (out / f"{tile}_preview.png").is_file()
        pred, _ = decode_colors(pred_rgb)
        area = tile.replace("area", "")
        label_file = next(raw_root.rglob(f"top_mosaic_09cm_area{area}_noBoundary.tif"))
        import tifffile
        label, _ = decode_colors(tifffile.imread(label_file))
        assert label.shape == pred.shape
        keep = label != 255
        for g, p in zip(label[keep], pred[keep]):  # slow, per pixel
            confusion[g, p] += 1
    iou = {c: confusion[c, c] / (confusion[c].sum() + confusion[:, c].sum() - confusion[c, c])
           for c in range(6) if confusion[c].sum() > 0}
    assert overall["confusion"] == confusion.tolist()
    assert overall["miou_all"] == pytest.approx(np.mean([v for c, v in iou.items() if c != 0]))
    assert float(rows[-1]["miou_all"]) == pytest.approx(100 * overall["miou_all"], abs=0.01)


def test_predict_tiles_user_errors(trained, raw_root, tmp_path, capsys):
    tiles = load_script("predict_tiles")
    ckpt = str(trained / "ckpt" / "step" / "4-1-vaihingen_FT_1.pth")
    base = ["--ckpt", ckpt, "--out", str(tmp_path / "o")]
    cases = [(["--src", str(raw_root), "--tiles", "area99"], "area99 not found"),
             (["--src", str(raw_root), "--overlap", "1.5"], "--overlap"),
             (["--src", str(tmp_path / "nope")], "is not a folder"),
             (["--src", str(raw_root), "--ckpt", str(tmp_path / "none.pth")], "does not exist")]
    for extra, fragment in cases:
        with pytest.raises(SystemExit) as exc:
            tiles.main(base + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err


# ---- demo figures ---------------------------------------------------------------------
def test_richest_window_matches_brute_force():
    figures = load_script("demo_figures")
    label = np.random.default_rng(0).integers(0, 6, size=(20, 25)).astype(np.uint8)
    y, x = figures.richest_window(label, [5, 3], 7)
    counts = np.array([[np.isin(label[i:i + 7, j:j + 7], [5, 3]).sum() for j in range(19)] for i in range(14)])
    assert counts[y, x] == counts.max()


def test_demo_figures_table_and_pictures(trained, raw_root, data_root, tmp_path, capsys):
    figures = load_script("demo_figures")
    csv_path = trained / "results" / "vaihingen_4-1_FT.csv"
    ckpt = trained / "ckpt" / "step" / "4-1-vaihingen_FT_1.pth"
    runs = [a for name in ("FT", "Again") for a in ("--run", name, str(csv_path), str(ckpt))]
    figures.main([*runs, "--step", "1", "--out", str(tmp_path), "--src", str(raw_root), "--data_root",
                  str(data_root), "--region", "64"])
    row = read_results(csv_path)[1]
    out = capsys.readouterr().out
    assert f"| FT | {row['miou_old']:.2f} | {row['miou_new']:.2f} | {row['miou_all']:.2f} |" in out
    for name in ("miou.png", "predictions.png"):
        picture = np.array(Image.open(tmp_path / name))
        assert picture.shape[0] > 100 and picture.shape[1] > 100
    with pytest.raises(SystemExit):
        figures.main([*runs, "--step", "2", "--out", str(tmp_path), "--src", str(raw_root)])
    assert "no row for step 2" in capsys.readouterr().err


def test_demo_script_runs_end_to_end(tmp_path):
    """scripts/demo.sh with 2 iterations per epoch: every stage runs and the table and figures appear."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", OUT=str(tmp_path / "demo"), EPOCHS0="1",
               EPOCHS1="1", DEMO_EXTRA="--debug --num_workers 0")
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["FT", "MiB", "MiCro"]
    for name in ("miou.png", "predictions.png"):
        assert (tmp_path / "demo" / "figures" / name).stat().st_size > 10_000
    assert (tmp_path / "demo" / "logs" / "3-1s-vaihingen" / "MiCro" / "task").is_dir()
