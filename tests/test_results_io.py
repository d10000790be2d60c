"""Results files: concurrent writers lose nothing, CSV and JSON agree, test/debug rows, seeds in the names,
lineage of steps and stale marks after re-training an earlier step."""
import csv
import json
import multiprocessing

import pytest
import torch

import run
import utils.reporting.results
from dataset.colormap import CLASS_NAMES
from tests.test_run import run_args
from utils.metrics import SegmentationMetrics
from utils.reporting.results import read_results, write_results
from utils.run_id import RunId


def _results(offset=0):
    metrics = SegmentationMetrics(6)
    target = torch.tensor([[[0, 1, 2, 3, 4, 5, 5, 0]]])
    metrics.update((target + offset) % 6, target)
    return metrics.results(old_classes=[0, 1, 2, 3, 4], new_classes=[5])


def _writer(folder, writer, count):
    for i in range(count):
        step = writer * count + i
        write_results(RunId("potsdam", "1s", "", "FT").results(folder), step, _results(step % 3), CLASS_NAMES, range(6),
                      {"writer": writer}, record={"kind": "train", "seed": writer})


def test_concurrent_writers_lose_no_row(tmp_path):
    writers, count = 8, 10
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, w, count)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    path = tmp_path / "potsdam_1s_FT.csv"
    rows = list(csv.DictReader(open(path)))
    assert [int(r["step"]) for r in rows] == list(range(writers * count))
    assert [int(r["seed"]) for r in rows] == [s // count for s in range(writers * count)]
    steps = json.loads(path.with_suffix(".json").read_text())["steps"]
    assert sorted(map(int, steps)) == list(range(writers * count))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_kill_between_json_and_csv_heals(tmp_path, monkeypatch):
    """The JSON is written first: a CSV left stale by a crash is never read, and the next update rewrites it."""
    args = (RunId("vaihingen", "4-1", "", "FT").results(tmp_path),)
    path = write_results(*args, 0, _results(), CLASS_NAMES, range(5), {})
    before = path.read_text()
    original = utils.reporting.results.atomic_write

    def crash_on_csv(target, *a, **kw):
        if str(target).endswith(".csv"):
            raise KeyboardInterrupt  # stands in for a kill after the JSON's rename
        return original(target, *a, **kw)

    monkeypatch.setattr(utils.reporting.results, "atomic_write", crash_on_csv)
    with pytest.raises(KeyboardInterrupt):
        write_results(*args, 0, _results(1), CLASS_NAMES, range(5), {})
    monkeypatch.setattr(utils.reporting.results, "atomic_write", original)
    assert path.read_text() == before  # the old CSV ...
    assert read_results(path)[0]["clutter"] == 0.0  # ... but readers get the record of the JSON
    write_results(*args, 1, _results(), CLASS_NAMES, range(6), {})
    rows = list(csv.DictReader(open(path)))
    assert rows[0]["clutter"] == "0.00" and [r["step"] for r in rows] == ["0", "1"]


def test_pending_row_replaces_the_old_numbers_until_the_test(tmp_path):
    """Between the new checkpoint and its test, the old run's numbers must not stand in the row."""
    from utils.reporting.results import mark_pending

    args = (RunId("vaihingen", "4-1", "", "FT").results(tmp_path),)
    write_results(*args, 0, _results(), CLASS_NAMES, range(5), {}, record={"kind": "train"})
    write_results(*args, 1, _results(), CLASS_NAMES, range(6), {},
                  record={"kind": "train", "previous_checkpoint": {"path": "a", "sha256": "old"}})
    stale = mark_pending(*args, 0, {"kind": "train", "checkpoint": {"path": "a", "sha256": "new"}}, CLASS_NAMES)
    assert stale == [1]
    rows = read_results(tmp_path / "vaihingen_4-1_FT.csv")
    assert rows[0]["status"] == "pending" and rows[0]["miou_all"] is None and rows[0]["clutter"] is None
    assert rows[1]["status"] == "stale: step 0 re-trained after it" and rows[1]["miou_all"] is not None
    csv_rows = list(csv.DictReader(open(tmp_path / "vaihingen_4-1_FT.csv")))
    assert csv_rows[0]["status"] == "pending" and csv_rows[0]["miou_all"] == "x"


def test_csv_of_an_earlier_version_is_imported(tmp_path):
    path = tmp_path / "vaihingen_4-1_FT.csv"
    header = ["step", *CLASS_NAMES, "miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc"]
    path.write_text(",".join(header) + "\n0," + ",".join(["10.00"] * 5 + ["x"] + ["10.00", "x", "10.00", "10.00",
                                                                                   "50.00"]) + "\n")
    write_results(RunId("vaihingen", "4-1", "", "FT").results(tmp_path), 1, _results(), CLASS_NAMES, range(6), {})
    rows = read_results(path)
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["clutter"] == 10.0 and rows[0]["status"] == "imported" and rows[1]["status"] == "ok"


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """FT step 0 (--debug) and step 1 trained from it."""
    out = tmp_path_factory.mktemp("lineage")
    run.main(run_args(data_root, out, 0, extra=["--debug"]))
    run.main(run_args(data_root, out, 1, extra=["--debug"]))
    return out


def _records(out, name="FT"):
    return json.loads((out / "results" / f"vaihingen_4-1_{name}.json").read_text())["steps"]


def test_rows_record_provenance_and_lineage(trained):
    out = trained
    steps = _records(out)
    ckpt0 = out / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth"
    from utils.checkpoint import file_sha256

    assert steps["0"]["checkpoint"] == {"path": str(ckpt0), "sha256": file_sha256(ckpt0)}
    assert steps["1"]["previous_checkpoint"] == steps["0"]["checkpoint"]
    for record in steps.values():
        assert record["kind"] == "train" and record["status"] == "ok" and record["debug"] is True
        assert record["seed"] == 42 and record["world_size"] == 1 and record["effective_batch_size"] == 4
    row = read_results(out / "results" / "vaihingen_4-1_FT.csv")[1]
    assert row["debug"] == "1" and row["previous_sha256"] == file_sha256(ckpt0) and row["miou_all"] is not None
    saved = torch.load(out / "ckpt" / "step" / "4-1-vaihingen_FT_1.pth", weights_only=False)
    assert saved["lineage"] == steps["1"]["previous_checkpoint"]


def test_test_rows_never_replace_another_models_row(trained, data_root):
    out = trained
    before = _records(out)
    # the step's own checkpoint: refreshes its row (kind test, same checkpoint)
    run.main(run_args(data_root, out, 0, extra=["--test", "--debug"]))
    after = _records(out)
    assert after["0"]["kind"] == "test" and after["0"]["checkpoint"]["sha256"] == before["0"]["checkpoint"]["sha256"]
    assert after["0"]["confusion"] == before["0"]["confusion"]
    # another model's checkpoint under this name: its own results file, FT's rows untouched
    other = out / "ckpt" / "step" / "4-1-vaihingen_FT_1.pth"
    zeroed = out / "zeroed.pth"
    ckpt = torch.load(other, weights_only=False)
    ckpt["model"] = {k: torch.zeros_like(v) if k.startswith("cls.") else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, zeroed)
    run.main(run_args(data_root, out, 1, extra=["--test", "--debug", "--ckpt", str(zeroed)]))
    assert _records(out)["1"] == after["1"]
    separate = _records(out, "FT_test-zeroed")
    assert separate["1"]["kind"] == "test" and separate["1"]["checkpoint"]["path"] == str(zeroed)


def test_seeds_get_their_own_files_and_do_not_touch_the_default(trained, data_root):
    out = trained
    before = _records(out)
    stamp = (out / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth").stat().st_mtime_ns
    run.main(run_args(data_root, out, 0, extra=["--debug", "--random_seed", "7"]))
    assert (out / "ckpt" / "step" / "4-1-vaihingen_FT-s7_0.pth").is_file()
    assert (out / "logs" / "4-1-vaihingen" / "FT-s7" / "step0" / "log.txt").is_file()
    assert _records(out, "FT-s7")["0"]["seed"] == 7
    assert _records(out) == before
    assert (out / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth").stat().st_mtime_ns == stamp
    # step 1 of seed 7 finds step 0 of seed 7
    run.main(run_args(data_root, out, 1, extra=["--debug", "--random_seed", "7"]))
    assert _records(out, "FT-s7")["1"]["previous_checkpoint"]["path"].endswith("4-1-vaihingen_FT-s7_0.pth")


def test_retraining_an_earlier_step_marks_later_steps_stale(trained, data_root, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    run.main(run_args(data_root, out, 0, extra=["--debug", "--lr", "0.02"]))
    assert "marked stale" in capsys.readouterr().out
    steps = _records(out)
    assert steps["0"]["status"] == "ok" and steps["1"]["status"].startswith("stale: step 0 re-trained")
    assert read_results(out / "results" / "vaihingen_4-1_FT.csv")[1]["status"].startswith("stale")
    # re-testing the stale step keeps the mark: its model still comes from the replaced step 0
    run.main(run_args(data_root, out, 1, extra=["--test", "--debug"]))
    assert _records(out)["1"]["status"].startswith("stale")
