"""run.py end to end on synthetic Vaihingen: step chaining, --test, results files, launchers, errors."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--print_interval", "2"]


def run_args(data_root, out, step=0, method="FT", task="4-1", extra=()):
    return ["--data_root", str(data_root), "--dataset", "vaihingen", "--task", task, "--method", method,
            "--step", str(step), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), *TINY, *extra]


def ckpt_file(out, step, name="FT", task="4-1"):
    return out / "ckpt" / "step" / f"{task}-vaihingen_{name}_{step}.pth"


def run_cli(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kwargs)


def assert_user_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])


@pytest.fixture(scope="module")
def chained(data_root, tmp_path_factory):
    """FT steps 0 and 1 of 4-1, trained once for the tests below."""
    out = tmp_path_factory.mktemp("chain")
    res0 = run.main(run_args(data_root, out, 0, extra=["--sample_num", "2"]))
    res1 = run.main(run_args(data_root, out, 1))
    return out, res0, res1


def test_chain_writes_checkpoints_logs_and_results(chained):
    out, res0, res1 = chained
    for step in (0, 1):
        ckpt = torch.load(ckpt_file(out, step), map_location="cpu", weights_only=False)
        assert ckpt["classes"] == [5] if step == 0 else ckpt["classes"] == [5, 1]
        assert ckpt["step"] == step and ckpt["epoch"] == 1
        assert {"model", "optimizer", "scheduler", "method_state", "opts"} <= set(ckpt)
        logdir = out / "logs" / "4-1-vaihingen" / "FT" / f"step{step}"
        assert any(f.name.startswith("events.out.tfevents") for f in logdir.iterdir())
        assert "test of step" in (logdir / "log.txt").read_text()
    assert not list((out / "ckpt" / "step").glob("*.tmp*"))
    rows = list(csv.DictReader(open(out / "results" / "vaihingen_4-1_FT.csv")))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert rows[0]["car"] == "x" and rows[1]["car"] != "x"  # car (class 5) is unseen at step 0
    assert res0["miou_new"] is None and res1["miou_new"] is not None
    saved = json.load(open(out / "results" / "vaihingen_4-1_FT.json"))
    assert set(saved["steps"]) == {"0", "1"}


def test_test_mode_reproduces_final_numbers_and_replaces_row(chained, data_root, capsys):
    out, _, res1 = chained
    again = run.main(run_args(data_root, out, 1, extra=["--test"]))
    for key in ("iou", "miou_old", "miou_new", "miou_all", "overall_acc", "confusion"):
        assert again[key] == res1[key], key
    rows = list(csv.DictReader(open(out / "results" / "vaihingen_4-1_FT.csv")))
    assert [r["step"] for r in rows] == ["0", "1"]


def test_test_mode_evaluates_the_saved_model_not_a_fresh_one(chained, data_root):
    """--test with a checkpoint whose weights were perturbed must give different numbers."""
    out, _, res1 = chained
    ckpt = torch.load(ckpt_file(out, 1), map_location="cpu", weights_only=False)
    ckpt["model"] = {k: (torch.zeros_like(v) if k.startswith("cls.") else v) for k, v in ckpt["model"].items()}
    zeroed = out / "zeroed.pth"
    torch.save(ckpt, zeroed)
    res = run.main(run_args(data_root, out, 1, extra=["--test", "--ckpt", str(zeroed), "--name", "zeroed"]))
    # zero classifiers predict class 0 everywhere: only background can have a non-zero IoU
    assert all(v in (None, 0.0) for v in res["iou"][1:])
    assert res["iou"] != res1["iou"]


def test_missing_previous_step_is_one_clear_line(data_root, tmp_path, capsys):
    expected = ckpt_file(tmp_path, 0)
    assert_user_error(capsys, run_args(data_root, tmp_path, 1), str(expected), "--step 0")


def test_test_without_checkpoint(data_root, tmp_path, capsys):
    assert_user_error(capsys, run_args(data_root, tmp_path, 0, extra=["--test"]), "--test", "not found")


def test_checkpoint_with_wrong_classes(chained, data_root, capsys):
    out, _, _ = chained
    argv = run_args(data_root, out, 1, extra=["--test", "--ckpt", str(ckpt_file(out, 0))])
    assert_user_error(capsys, argv, "classes per step [5]", "[5, 1]")


def test_step_ckpt_of_another_task_is_rejected(chained, data_root, capsys):
    out, _, _ = chained
    argv = run_args(data_root, out, 1, task="2-1s", extra=["--step_ckpt", str(ckpt_file(out, 0))])
    assert_user_error(capsys, argv, "--task 4-1", "--task 2-1s", "--allow_mismatch")  # the stored task differs
    assert_user_error(capsys, argv + ["--allow_mismatch"], "classes per step [5]")  # and so do the classes


def test_missing_data_root(tmp_path, capsys):
    assert_user_error(capsys, run_args(tmp_path / "nowhere", tmp_path, 0), "nowhere")


def test_nan_loss_stops_without_checkpoint(data_root, tmp_path, capsys, monkeypatch):
    import methods.losses

    monkeypatch.setattr(methods.losses, "cross_entropy", lambda logits, labels, **kw: logits.sum() * float("nan"))
    assert_user_error(capsys, run_args(data_root, tmp_path, 0), "NaN")
    assert not ckpt_file(tmp_path, 0).exists()


def test_cli_exit_code_and_single_line(tmp_path):
    proc = run_cli(["run.py", "--data_root", str(tmp_path), "--dataset", "vaihingen", "--task", "4-1", "--step", "3"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr


def torchrun(port, args, nproc=2):
    return run_cli(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}", "run.py",
                    *args])


def test_torchrun_two_processes_gloo_matches_single_process_test(data_root, tmp_path, free_port):
    args = run_args(data_root, tmp_path, 0, extra=["--norm_act", "iabn_sync", "--batch_size", "2"])
    proc = torchrun(free_port, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.load(open(tmp_path / "results" / "vaihingen_4-1_FT.json"))["steps"]["0"]
    single = run.main(run_args(data_root, tmp_path, 0, extra=["--test", "--norm_act", "iabn_sync",
                                                              "--name", "single", "--ckpt",
                                                              str(ckpt_file(tmp_path, 0))]))
    assert distributed["confusion"] == single["confusion"]
    assert sum(map(sum, single["confusion"])) > 0


@pytest.mark.parametrize("method, terms", [("MiCro", {"cfrd", "contrast", "region"}), ("HCISS", {"fgp"}),
                                           ("MiB-CD", {"cd", "cd_icl"})])
def test_torchrun_two_processes_step1_of_remote_sensing_methods(method, terms, chained, data_root, tmp_path,
                                                               free_port):
    """Step 1 of each cross-image / invariance method under 2-process DDP from a shared step 0."""
    out, _, _ = chained
    args = run_args(data_root, tmp_path, 1, method, extra=["--step_ckpt", str(ckpt_file(out, 0)),
                                                           "--batch_size", "2", "--print_interval", "1"])
    proc = torchrun(free_port, args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "4-1-vaihingen" / method / "step1" / "log.txt").read_text()
    epoch_line = next(line for line in log.splitlines() if "epoch 1/1:" in line)
    logged = dict(item.rsplit(" ", 1) for item in epoch_line.split(": ", 1)[1].split(" (")[0].split(", "))
    assert terms <= set(logged) and all(float(logged[t]) > 0 for t in terms), epoch_line
    distributed = json.load(open(tmp_path / "results" / f"vaihingen_4-1_{method}.json"))["steps"]["1"]
    single = run.main(run_args(data_root, tmp_path, 1, method, extra=["--test", "--name", "single", "--ckpt",
                                                                      str(ckpt_file(tmp_path, 1, method))]))
    assert distributed["confusion"] == single["confusion"]


def test_torch_distributed_launch_with_local_rank(chained, data_root, tmp_path, free_port):
    out, _, res1 = chained
    args = run_args(data_root, out, 1, extra=["--test", "--name", "FT", "--results_dir", str(tmp_path)])
    proc = run_cli(["-m", "torch.distributed.launch", "--nproc_per_node=1", f"--master_port={free_port}", "run.py",
                    *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    launched = json.load(open(tmp_path / "vaihingen_4-1_FT.json"))["steps"]["1"]
    assert launched["confusion"] == res1["confusion"]


def test_corrupt_image_in_a_worker_is_one_line(data_root, tmp_path, capsys):
    """A damaged crop read inside a DataLoader worker process still ends in one clear line (PNG crops
    of a folder processed before the crop store: those are decoded in the workers)."""
    import json
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(data_root / "vaihingen", broken / "vaihingen",
                    ignore=shutil.ignore_patterns("images.npy", "labels.npy"))
    meta = json.loads((broken / "vaihingen" / "meta.json").read_text())
    del meta["store"]
    (broken / "vaihingen" / "meta.json").write_text(json.dumps(meta))
    for image in (broken / "vaihingen" / "train" / "images").glob("*.png"):
        image.write_bytes(b"not a png")
    argv = run_args(broken, tmp_path, 0, extra=["--num_workers", "1"])
    assert_user_error(capsys, argv, "cannot read", "damaged")


def test_truncated_crop_store_is_one_line(data_root, tmp_path, capsys):
    """A truncated store file: one line naming the file and the commands that rebuild it, exit 2."""
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(data_root / "vaihingen", broken / "vaihingen")
    path = broken / "vaihingen" / "train" / "images.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    assert_user_error(capsys, run_args(broken, tmp_path, 0), str(path), "make_crop_store.py")


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_mixed_precision_levels_train_and_test(level, data_root, tmp_path):
    """fp16 + GradScaler and bf16 autocast run a MiB step 1 with finite losses (on CPU here)."""
    extra = ["--opt_level", level, "--debug", "--method", "MiB"]
    run.main(run_args(data_root, tmp_path, 0, extra=extra))
    res = run.main(run_args(data_root, tmp_path, 1, extra=extra))
    assert res["miou_all"] is not None
    ckpt = torch.load(tmp_path / "ckpt" / "step" / "4-1-vaihingen_MiB_1.pth", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_overlap_writes_ov_names(data_root, tmp_path):
    run.main(run_args(data_root, tmp_path, 0, extra=["--overlap", "--debug"]))
    assert (tmp_path / "ckpt" / "step" / "4-1-vaihingen-ov_FT_0.pth").is_file()
    assert (tmp_path / "results" / "vaihingen_4-1-ov_FT.csv").is_file()
    assert (tmp_path / "logs" / "4-1-vaihingen-ov" / "FT" / "step0" / "log.txt").is_file()


def _norm_keys(state, kinds):
    """State-dict keys of the norm layers' `kinds` (e.g. running_mean) — every norm layer has running_var."""
    layers = {k.rsplit(".", 1)[0] for k in state if k.endswith(".running_var")}
    return [k for k in state if k.rsplit(".", 1)[0] in layers and k.rsplit(".", 1)[1] in kinds]


@pytest.mark.parametrize("strict", [False, True])
def test_freeze_and_fix_bn_semantics(data_root, tmp_path, strict):
    """MiB's --freeze: the body is not optimised, head and classifiers are. MiB's --fix_bn: norm affine
    parameters fixed, running statistics still updated; --fix_bn_strict fixes those too."""
    run.main(run_args(data_root, tmp_path, 0, extra=["--debug"]))
    fix = "--fix_bn_strict" if strict else "--fix_bn"
    run.main(run_args(data_root, tmp_path, 1, extra=["--debug", "--freeze", fix]))
    before = torch.load(ckpt_file(tmp_path, 0), weights_only=False)["model"]
    after = torch.load(ckpt_file(tmp_path, 1), weights_only=False)["model"]
    affine = set(_norm_keys(before, ("weight", "bias")))
    stats = _norm_keys(before, ("running_mean", "running_var"))
    assert len(affine) > 40
    for key in affine:
        assert torch.equal(before[key], after[key]), key
    body_weights = [k for k in before if k.startswith("body.") and k.endswith("weight") and k not in affine]
    head_weights = [k for k in before if k.startswith("head.") and k.endswith("weight") and k not in affine]
    assert body_weights and head_weights
    assert all(torch.equal(before[k], after[k]) for k in body_weights)  # body out of the optimiser
    assert all(not torch.equal(before[k], after[k]) for k in head_weights)  # the head trains
    assert not torch.equal(before["cls.0.weight"], after["cls.0.weight"])
    changed = [k for k in stats if not torch.equal(before[k], after[k])]
    assert changed == [] if strict else len(changed) == len(stats)


def test_freeze_applies_at_step0_and_keeps_the_body_gradient_for_a_regulariser(data_root, tmp_path):
    """MiB freezes the body at every step, step 0 included; its gradient still feeds EWC's Fisher."""
    run.main(run_args(data_root, tmp_path, 0, method="EWC", extra=["--debug", "--freeze", "--fix_bn_strict"]))
    ckpt = torch.load(ckpt_file(tmp_path, 0, name="EWC"), weights_only=False)
    fisher = ckpt["method_state"]["regularizer"]["state"]["fisher"]
    assert any(k.startswith("body.") for k in fisher)
    run.main(run_args(data_root, tmp_path, 1, method="EWC", extra=["--debug", "--freeze", "--fix_bn_strict"]))
    after = torch.load(ckpt_file(tmp_path, 1, name="EWC"), weights_only=False)
    body = [k for k in ckpt["model"] if k.startswith("body.")]
    assert all(torch.equal(ckpt["model"][k], after["model"][k]) for k in body)
    fisher1 = after["method_state"]["regularizer"]["state"]["fisher"]
    assert any(not torch.equal(fisher[k], fisher1[k]) for k in fisher if k.startswith("body.") and k in fisher1)


def test_cross_val_holds_out_a_fifth_of_the_step_crops(data_root, tmp_path):
    run.main(run_args(data_root, tmp_path, 0, extra=["--debug", "--cross_val"]))
    log = (tmp_path / "logs" / "4-1-vaihingen" / "FT" / "step0" / "log.txt").read_text()
    import re

    train, val = map(int, re.search(r"(\d+) training crops, (\d+) validation", log).groups())
    assert val == round(0.2 * (train + val)) and val > 0
