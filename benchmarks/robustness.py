"""Robustness figures: the bad-input matrix (input -> message -> exit code), random SIGKILLs during a step
followed by the same command (outcome of each, final weights vs an uninterrupted run), and the cost of
the per-epoch resume checkpoint relative to an epoch.

    OMP_NUM_THREADS=1 python benchmarks/robustness.py [--out /tmp/robustness] [--kills 6] [--part all|inputs|kills|cost]

Everything runs on the CPU on synthetic Vaihingen generated here (tiny ResNet-18, crops 64).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset.layout import dataset_dir, meta_file, png_dir
from process_data.isprs_processing import VAIHINGEN
from process_data.make_synthetic_isprs import generate
from process_data.tile_processing import process_dataset

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--dataset", "vaihingen", "--task", "4-1"]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def make_data(out: Path) -> Path:
    data = out / "data"
    if not meta_file(dataset_dir(data, "vaihingen")).exists():
        generate("vaihingen", out / "raw", seed=0, tile_size=180, n_train=3, n_test=2, object_scale=1.0)
        process_dataset(VAIHINGEN, out / "raw", data, crop_size=64, stride=64, seed=42, progress=False)
    return data


def args_for(data, out, step=0, extra=()):
    return ["--data_root", str(data), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), "--step", str(step), *TINY, *extra]


def cli(argv, timeout=900):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------- bad inputs
def bad_inputs(out: Path) -> list[str]:
    data = make_data(out)
    base = out / "inputs"
    shutil.rmtree(base, ignore_errors=True)
    step0 = base / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth"
    done = cli(["run.py", *args_for(data, base, 0, ["--debug"])])
    assert done.returncode == 0, done.stderr[-2000:]
    blocker = base / "a_file"
    blocker.write_text("x")

    def damaged(name, damage):
        root = base / name
        shutil.copytree(dataset_dir(data, "vaihingen"), dataset_dir(root, "vaihingen"))
        for label in png_dir(dataset_dir(root, "vaihingen"), "train", "labels").glob("*.png"):
            Image.fromarray(damage(np.array(Image.open(label)))).save(label)
        return root

    small, unknown = damaged("small", lambda a: a[:-8]), damaged("unknown", lambda a: np.full_like(a, 7))
    cases = [(f"--{k} {v}", args_for(data, base / "o", 0, [f"--{k}", v])) for k, v in
             [("lr", "nan"), ("lr", "inf"), ("lr", "-1"), ("momentum", "-1"), ("momentum", "1"),
              ("momentum", "nan"), ("num_workers", "-1"), ("weight_decay", "-0.1"), ("loss_kd", "nan"),
              ("ckpt_interval", "-1"), ("dist_timeout", "0"), ("epochs", "0")]]
    cases += [
        ("--icarl --unce", args_for(data, base / "o", 0, ["--icarl", "--unce"])),
        ("--method MiB --icarl", args_for(data, base / "o", 0, ["--method", "MiB", "--icarl"])),
        ("--checkpoint_dir under a file", args_for(data, base / "o", 0, ["--checkpoint_dir", str(blocker / "c")])),
        ("--results_dir under a file", args_for(data, base / "o", 0, ["--results_dir", str(blocker / "r")])),
        ("--logdir under a file", args_for(data, base / "o", 0, ["--logdir", str(blocker / "l")])),
    ]
    for extra, label in [(["--backbone", "resnet34"], "step 1 from a resnet18 step 0, --backbone resnet34"),
                         (["--backbone", "resnet34", "--allow_mismatch"], "same with --allow_mismatch"),
                         (["--backbone", "resnet50", "--allow_mismatch"], "--backbone resnet50 --allow_mismatch"),
                         (["--norm_act", "std"], "step 1 from an iabn step 0, --norm_act std"),
                         (["--overlap"], "step 1 --overlap from a disjoint step 0"),
                         (["--output_stride", "8"], "step 1 --output_stride 8 from OS 16"),
                         (["--dataset", "potsdam"], "step 1 on Potsdam from a Vaihingen step 0 (no Potsdam "
                                                    "processed here; tests/test_bad_inputs.py has both)")]:
        cases.append((label, args_for(data, base / "o", 1, ["--step_ckpt", str(step0), "--debug", *extra])))
    cases += [
        ("--test --ckpt of another backbone", args_for(data, base / "o", 0, ["--test", "--ckpt", str(step0),
                                                                            "--backbone", "resnet34"])),
        ("--test without a checkpoint", args_for(data, base / "empty", 0, ["--test"])),
        ("step 1 without step 0", args_for(data, base / "empty", 1)),
        ("label crops 8 px shorter than images", args_for(small, base / "o", 0, ["--debug"])),
        ("label crops holding only value 7", args_for(unknown, base / "o", 0, ["--debug"])),
    ]
    rows = ["| input | message (last line of stderr) | exit code |", "|---|---|---|"]
    for label, argv in cases:
        proc = cli(["run.py", *argv])
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        last = last.replace(str(base), "OUT").replace(str(out), "OUT").replace("|", "\\|").replace("`", "'")
        rows.append(f"| {label} | `{last}` | {proc.returncode} |")
        print(rows[-1], flush=True)
    proc = cli(["process_data/make_synthetic_isprs.py", "--dataset", "vaihingen", "--dst", str(base / "raw0"),
                "--n_train", "0"])
    last_line = proc.stderr.strip().splitlines()[-1].replace('`', chr(39))
    rows.append(f"| make_synthetic_isprs.py --n_train 0 | `{last_line}` | "
                f"{proc.returncode} |")
    return rows


# ---------------------------------------------------------------------------------------- kills
def kills(out: Path, n_kills: int, seed: int = 0) -> list[str]:
    """Kill one step `n_kills` times at random moments (each re-run of the same command continues), then
    compare the final weights and results row with an uninterrupted run."""
    data = make_data(out)
    extra = ["--epochs", "6", "--regularizer", "rw", "--cd_factor", "0.1", "--ckpt_interval", "4",
             "--batch_size", "2", "--crop_size", "48"]
    straight, killed = out / "straight", out / "killed"
    for folder in (straight, killed):
        shutil.rmtree(folder, ignore_errors=True)
    start = time.time()
    done = cli(["run.py", *args_for(data, straight, 0, extra)])
    assert done.returncode == 0, done.stderr[-2000:]
    duration = time.time() - start
    rng = random.Random(seed)
    rows = ["| run | killed after (s) | how this run started | resume checkpoint left by the kill |",
            "|---|---|---|---|"]
    final = killed / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth"
    last = final.with_suffix(".last.pth")
    argv = [sys.executable, "run.py", *args_for(data, killed, 0, extra)]
    finished = False
    for k in range(n_kills):
        proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        delay = rng.uniform(0.1, 0.4) * duration  # start-up included: some kills land before any checkpoint
        try:
            out_text, _ = proc.communicate(timeout=delay)
            line = next((x for x in out_text.splitlines() if x.startswith("resuming")), "from scratch")
            line = line.split(" (iteration")[0].replace(str(killed), "OUT")
            rows.append(f"| {k + 1} | finished before {delay:.1f} | {line} | - |")
            finished = True
            break
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out_text, _ = proc.communicate()
        line = next((x for x in out_text.splitlines() if x.startswith("resuming")), "from scratch")
        line = line.split(" (iteration")[0].replace(str(killed), "OUT")
        state = "none"
        if last.exists():
            s = torch.load(last, map_location="cpu", weights_only=False)
            state = f"epoch {s['epoch']} + {s['iteration_in_epoch']} it."
        rows.append(f"| {k + 1} | {delay:.1f} | {line} | {state} |")
    if not finished:
        proc = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next((x for x in proc.stdout.splitlines() if x.startswith("resuming")), "from scratch")
        rows.append(f"| last | not killed | {line.split(' (iteration')[0].replace(str(killed), 'OUT')} | - |")
    a = torch.load(straight / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth", weights_only=False)["model"]
    b = torch.load(final, weights_only=False)["model"]
    same = all(torch.equal(a[k], b[k]) for k in a)
    row = lambda o: (o / "results" / "vaihingen_4-1_FT.csv").read_text().splitlines()[1].split(",")[:12]  # noqa
    rows.append(f"\nuninterrupted step: {duration:.1f} s; final weights identical: {same}; results row identical: "
                f"{row(straight) == row(killed)}; resume checkpoint left: {last.exists()}")
    return rows


# ---------------------------------------------------------------------------------------- cost
def cost(out: Path) -> list[str]:
    """Time of each resume-checkpoint save vs each training epoch, in one process."""
    import run
    import train
    from utils.checkpoint import save_checkpoint

    data = make_data(out)
    saves, epochs = [], []
    original_save, original_epoch = train.ResumeCheckpoint.save, train.Trainer.train_epoch

    def timed_save(self, *a, **k):
        t = time.perf_counter()
        original_save(self, *a, **k)
        saves.append(time.perf_counter() - t)

    def timed_epoch(self, *a, **k):
        t = time.perf_counter()
        result = original_epoch(self, *a, **k)
        epochs.append(time.perf_counter() - t)
        return result

    train.ResumeCheckpoint.save, train.Trainer.train_epoch = timed_save, timed_epoch
    folder = out / "cost"
    shutil.rmtree(folder, ignore_errors=True)
    run.main(args_for(data, folder, 0, ["--epochs", "4", "--val_interval", "100"]))
    train.ResumeCheckpoint.save, train.Trainer.train_epoch = original_save, original_epoch
    mean_save, mean_epoch = float(np.mean(saves)), float(np.mean(epochs))
    rows = [f"tiny model (ResNet-18, crops 64, batch 4, {len(epochs)} epochs of the synthetic step 0): "
            f"epoch {mean_epoch:.2f} s, resume checkpoint save {mean_save:.3f} s "
            f"(model + optimizer + RNG, incl. the NaN check) -> ratio {mean_save / mean_epoch:.3f}"]

    # The checkpoint of the real model: ResNet-101 DeepLabV3 with momentum buffers.
    from argparser import model_options, parse_args
    from modules import make_model

    opts = parse_args(["--backbone", "resnet101", "--no_pretrained", "--norm_act", "iabn"])
    model = make_model(model_options(opts), [5])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for p in model.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    path = out / "r101.last.pth"
    t = time.perf_counter()
    save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    elapsed = time.perf_counter() - t
    rows.append(f"ResNet-101 resume checkpoint: {path.stat().st_size / 2**20:.0f} MiB written in {elapsed:.2f} s")
    path.unlink()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="/tmp/micro_robustness")
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--part", default="all", choices=["all", "inputs", "kills", "cost"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    if args.part in ("all", "cost"):
        sections.append(("checkpoint cost", cost(out)))
    if args.part in ("all", "kills"):
        sections.append(("kills", kills(out, args.kills)))
    if args.part in ("all", "inputs"):
        sections.append(("bad inputs", bad_inputs(out)))
    for title, rows in sections:
        print(f"\n### {title}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
