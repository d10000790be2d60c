"""Scheduler, checkpoint io, eval sampler, results files and logger."""
import csv
import json
import struct
import sys
import types

import numpy as np
import pytest
import torch

from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import DistributedEvalSampler, init_distributed
from utils.errors import UserError
from utils.metrics import SegmentationMetrics
from utils.reporting.logger import Logger, colour_maps, sample_images
from utils.reporting.results import read_results, write_results
from utils.run_id import RunId
from utils.scheduler import PolyLR, build_scheduler

CLASS_NAMES = ["clutter", "impervious surfaces", "building", "low vegetation", "tree", "car"]
ISPRS_COLOURS = np.array([[255, 0, 0], [255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0]],
                         dtype=np.uint8)


# ---- scheduler ------------------------------------------------------------------------
def _optimizer(lrs=(0.01, 0.001)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0], momentum=0.9)


def test_poly_lr_values_every_iteration():
    opt = _optimizer()
    sched = PolyLR(opt, max_iters=10, power=0.9)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for i, lrs in enumerate(seen):
        expected = [base * (1 - min(i, 10) / 10) ** 0.9 for base in (0.01, 0.001)]
        assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert seen[10] == [0.0, 0.0] and seen[11] == [0.0, 0.0]  # past the end (never trained): 0


def test_poly_lr_last_iterations_have_no_floor():
    """MiB's poly schedule has no floor: the last iterations train below 1e-6 when the formula says so."""
    opt = _optimizer((1e-4,))
    sched = PolyLR(opt, max_iters=1000, power=0.9)
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for i in (997, 998, 999):
        assert lrs[i] == pytest.approx(1e-4 * (1 - i / 1000) ** 0.9, rel=1e-12, abs=0)
    assert lrs[999] < 1e-6 and lrs[999] > 0 and opt.param_groups[0]["lr"] == 0.0
    # an explicit floor is an option, off by default
    opt = _optimizer((1e-4,))
    sched = PolyLR(opt, max_iters=1000, power=0.9, min_lr=1e-6)
    for _ in range(999):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-6


def test_poly_lr_resumes_from_state_dict():
    opt = _optimizer()
    sched = PolyLR(opt, max_iters=20, power=0.9)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = _optimizer()
    sched2 = PolyLR(opt2, max_iters=20, power=0.9)
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 8 / 20) ** 0.9)


def test_build_scheduler_step_and_errors():
    opt = _optimizer((0.1,))
    sched = build_scheduler("step", opt, max_iters=100, power=0.9, step_size=3)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])
    assert isinstance(build_scheduler("poly", _optimizer(), max_iters=5, power=0.9), PolyLR)
    with pytest.raises(UserError, match="learning-rate policy .exponential. is unknown"):
        build_scheduler("exponential", _optimizer(), max_iters=5, power=0.9)
    with pytest.raises(UserError, match="step"):
        build_scheduler("step", _optimizer(), max_iters=5, power=0.9)


# ---- checkpoints ----------------------------------------------------------------------
def test_checkpoint_path_naming(tmp_path):
    assert RunId("vaihingen", "4-1", "", "MiB").checkpoint(tmp_path, 1) == \
        tmp_path / "step" / "4-1-vaihingen_MiB_1.pth"
    assert RunId("potsdam", "2-1s", "-ov", "MiCro").checkpoint("checkpoints", 3).as_posix() == \
        "checkpoints/step/2-1s-potsdam-ov_MiCro_3.pth"


def test_save_load_replace_and_no_temp_left(tmp_path):
    path = RunId("vaihingen", "4-1", "", "FT").checkpoint(tmp_path, 0)  # parents do not exist yet
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}, "epoch": 1, "opts": {"lr": 0.01}})
    save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "epoch": 2, "opts": {"lr": 0.01}})
    state = load_checkpoint(path)
    assert state["epoch"] == 2 and state["model"]["w"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def test_failure_during_write_keeps_previous_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, {"epoch": 1, "weights": torch.ones(1000)})
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="simulated crash"):
        # the tensor is serialised first, so the temp file is partly written when pickling fails
        save_checkpoint(path, {"weights": torch.zeros(1000), "bad": _Unpicklable()})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_load_missing_or_corrupt_is_user_error(tmp_path):
    missing = tmp_path / "nope_0.pth"
    with pytest.raises(UserError, match="nope_0.pth"):
        load_checkpoint(missing)
    corrupt = tmp_path / "half.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(UserError, match="half.pth"):
        load_checkpoint(corrupt)


# ---- distributed helpers --------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 7, 10])
def test_eval_sampler_covers_each_index_exactly_once(world, size):
    dataset = list(range(size))
    parts = [list(DistributedEvalSampler(dataset, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for part in parts for i in part) == list(range(size))
    assert [len(DistributedEvalSampler(dataset, world, r)) for r in range(world)] == [len(p) for p in parts]


def test_init_distributed_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed(local_rank_arg=None)
    assert (info.rank, info.world_size, info.distributed, info.backend) == (0, 1, False, None)
    assert init_distributed(local_rank_arg=0).local_rank == 0


def test_init_distributed_missing_master_is_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(UserError, match="MASTER_ADDR"):
        init_distributed(local_rank_arg=1)


# ---- results files --------------------------------------------------------------------
def _results(pred_offset=0):
    """Metrics of a tiny 6-class step-1 example (task 4-1: old 0-4, new 5)."""
    target = torch.tensor([[[0, 1, 2, 3], [4, 5, 5, 255]]])
    pred = torch.tensor([[[0, 1, 2, 3], [4, 5, 0, 1]]])
    pred = (pred + pred_offset) % 6
    metrics = SegmentationMetrics(6)
    metrics.update(pred, target)
    return metrics.results(old_classes=[0, 1, 2, 3, 4], new_classes=[5])


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_results_csv_rows_replace_and_unseen_x(tmp_path):
    step0 = SegmentationMetrics(6)
    step0.update(torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 2, 3]]]))
    res0 = step0.results(old_classes=[0, 1, 2, 3, 4], new_classes=[])
    args = (RunId("vaihingen", "4-1", "-ov", "MiB").results(tmp_path),)
    write_results(*args, 1, _results(), CLASS_NAMES, range(6), {"lr": 0.001, "epochs": 30})
    path = write_results(*args, 0, res0, CLASS_NAMES, range(5), {"lr": 0.01})
    assert path == tmp_path / "vaihingen_4-1-ov_MiB.csv"

    rows = _csv_rows(path)
    # the record columns (kind, status, seed, ...) are appended after these, whose order is the format
    assert rows[0][:14] == ["step", *CLASS_NAMES, "miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc",
                            "f1_micro", "f1_macro"]
    assert rows[0][14:16] == ["kind", "status"]
    assert [r[0] for r in rows[1:]] == ["0", "1"]  # sorted by step
    # step 0: building 1 TP + 1 FP -> 50, low_vegetation missed -> 0, tree seen but no ground truth -> x,
    # car not seen yet -> x, no new classes at step 0 -> x
    assert rows[1][1:7] == ["100.00", "100.00", "50.00", "0.00", "x", "x"]
    # F1 (appended columns): micro = pixel accuracy 3/4; macro over foreground with truth (1 + 2/3 + 0) / 3
    assert rows[1][7:14] == ["50.00", "x", "50.00", "62.50", "75.00", "75.00", "55.56"]
    # step 1: car TP 1 + FN 1 -> 50; clutter TP 1 + FP 1 -> 50
    assert rows[2][1:7] == ["50.00", "100.00", "100.00", "100.00", "100.00", "50.00"]

    write_results(*args, 1, _results(pred_offset=1), CLASS_NAMES, range(6), {"lr": 0.002})
    rows_after = _csv_rows(path)
    assert len(rows_after) == 3 and rows_after[1] == rows[1]
    assert rows_after[2][1:7] == ["0.00"] * 6

    twin = json.loads(path.with_suffix(".json").read_text())
    assert list(twin["steps"]) == ["0", "1"]
    assert twin["steps"]["1"]["options"] == {"lr": 0.002}
    assert twin["steps"]["1"]["iou"] == [0.0] * 6
    assert twin["steps"]["0"]["miou_new"] is None and twin["steps"]["0"]["seen_classes"] == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left

    parsed = read_results(path)
    assert parsed[0]["step"] == 0 and parsed[0]["car"] is None and parsed[0]["miou_new"] is None
    assert parsed[0]["building"] == pytest.approx(50.0)


def test_results_unseen_class_is_x_even_with_a_value(tmp_path):
    res = _results()  # car has an IoU of 50 here, but at step 0 of 4-1 it is not seen yet
    path = write_results(RunId("vaihingen", "4-1", "", "FT").results(tmp_path), 0, res, CLASS_NAMES, range(5), {})
    assert _csv_rows(path)[1][1:7] == ["50.00", "100.00", "100.00", "100.00", "100.00", "x"]


def test_results_header_mismatch_and_missing_file(tmp_path):
    path = tmp_path / "potsdam_1s_FT.csv"
    path.write_text("step,a,b\n0,1,2\n")
    with pytest.raises(UserError, match="potsdam_1s_FT.csv"):
        write_results(RunId("potsdam", "1s", "", "FT").results(tmp_path), 0, _results(), CLASS_NAMES, range(2), {})
    assert path.read_text() == "step,a,b\n0,1,2\n"
    with pytest.raises(UserError, match="missing.csv"):
        read_results(tmp_path / "missing.csv")


# ---- logger ---------------------------------------------------------------------------
def _event_records(logdir):
    """Decode the TFRecord-framed event protos tensorboardX wrote (length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert len(files) == 1
    data, events, pos = files[0].read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12:pos + 12 + length])
        events.append(event)
        pos += 12 + length + 4
    return {(v.tag, e.step): v for e in events for v in e.summary.value}


@pytest.fixture
def colormap_module(monkeypatch):
    """The real dataset.colormap when it exists, else a stand-in with the palette of docs/data.md."""
    try:
        import dataset.colormap as colormap
    except ImportError:
        colormap = types.ModuleType("dataset.colormap")
        colormap.CLASS_NAMES = CLASS_NAMES
        colormap.PALETTE = ISPRS_COLOURS

        def colorize(label):
            lut = np.zeros((256, 3), dtype=np.uint8)
            lut[:6] = ISPRS_COLOURS
            return lut[np.asarray(label)]

        colormap.colorize = colorize
        monkeypatch.setitem(sys.modules, "dataset.colormap", colormap)
    return colormap


def test_sample_images_and_colour_maps(colormap_module):
    mean, std = [0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]
    raw = torch.rand(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    images = (raw - 0.5) / 0.25
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 255]).repeat(5)[:30].view(2, 3, 5)
    pixels = sample_images(images, mean, std)
    assert pixels.shape == (2, 3, 5, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels[1].astype(int) - (raw[1, :3].permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:6] = ISPRS_COLOURS
    colours = colour_maps(labels)
    assert colours.shape == (2, 3, 5, 3) and colours.dtype == np.uint8
    assert (colours == lut[labels.numpy()]).all()  # 255 -> black


def test_logger_writes_events_and_text_log(tmp_path, colormap_module, capsys):
    logdir = tmp_path / "logs" / "4-1-vaihingen-ov" / "MiB"
    logger = Logger(logdir, rank=0)
    logger.info("epoch 1 done")
    logger.add_scalar("train/lr", torch.tensor(0.5), 3)
    logger.add_scalars({"ce": 1.25, "kd": None}, 3, prefix="loss")
    logger.add_results(_results(), 4, CLASS_NAMES)
    images = torch.zeros(2, 3, 8, 8)
    logger.add_prediction_figure("samples", images, torch.ones(2, 8, 8, dtype=torch.long),
                                 torch.zeros(2, 8, 8, dtype=torch.long), [0.5] * 3, [0.2] * 3, 4, CLASS_NAMES)
    logger.close()

    assert "epoch 1 done" in capsys.readouterr().out
    assert (logdir / "log.txt").read_text().rstrip().endswith("epoch 1 done")
    values = _event_records(logdir)
    assert values[("train/lr", 3)].simple_value == pytest.approx(0.5)
    assert values[("loss/ce", 3)].simple_value == pytest.approx(1.25)
    assert ("loss/kd", 3) not in values
    assert values[("test/iou/car", 4)].simple_value == pytest.approx(0.5)
    assert values[("test/iou/low_vegetation", 4)].simple_value == pytest.approx(1.0)  # no spaces in tags
    assert values[("test/miou_new", 4)].simple_value == pytest.approx(0.5)
    assert values[("test/miou_old", 4)].simple_value == pytest.approx(1.0)
    assert values[("test/confusion_matrix", 4)].image.height > 0
    assert values[("samples", 4)].image.height > 0
    assert "building" in values[("test/table/text_summary", 4)].tensor.string_val[0].decode()


def test_logger_is_noop_on_other_ranks(tmp_path, capsys):
    logdir = tmp_path / "rank1"
    logger = Logger(logdir, rank=1)
    logger.info("hidden")
    logger.add_scalar("x", 1.0, 0)
    logger.add_results(_results(), 0, CLASS_NAMES)
    logger.add_prediction_figure("s", torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), [0] * 3,
                                 [1] * 3, 0, CLASS_NAMES)
    logger.close()
    assert capsys.readouterr().out == ""
    assert not logdir.exists()


def test_user_error_reworded_keeps_the_sentence_and_survives_pickling():
    import pickle

    err = UserError("{path} does not match {backbone}: {problems}; use other weights", path="w{1}.pth",
                    backbone="resnet18", problems="2 missing")
    assert str(err) == "w{1}.pth does not match resnet18: 2 missing; use other weights"
    worded = err.reworded(backbone="--backbone resnet18", norm_act="unused", hint=" or pass --no_pretrained")
    assert isinstance(worded, UserError)
    assert str(worded) == "w{1}.pth does not match --backbone resnet18: 2 missing; use other weights or pass " \
                          "--no_pretrained"
    plain = UserError("a literal {brace} stays")
    assert str(plain) == str(plain.reworded(brace="x")) == "a literal {brace} stays"
    assert str(pickle.loads(pickle.dumps(err)).reworded(backbone="b")) == "w{1}.pth does not match b: 2 missing; " \
                                                                          "use other weights"
