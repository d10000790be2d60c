"""scripts/campaign.py: which methods share step 0, the plan, skip-on-re-run, recovery after SIGKILL,
one failure not stopping independent runs, and the campaign table against the results rows."""
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argparser import method_options, parse_args
from methods import METHODS, Method
from methods.mib_family import MiB
from utils.run_id import effective_name

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "2", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--debug", "--val_interval", "100"]


def signature(method, *extra):
    return METHODS[method].step0_signature(method_options(parse_args(["--method", method, *extra])))


def test_step0_signatures_share_plain_cross_entropy_methods():
    ce = {m for m in METHODS if signature(m) == signature("FT")}
    assert ce == {"FT", "UFT", "LWF", "ILT", "MiB", "HCISS", "PLOP", "MiB+EWF", "PLOP+EWF"}  # UFT: UnCE only at t > 0
    others = [signature(m) for m in METHODS if m not in ce]
    assert len(set(others)) == len(others)  # LWF-MC, EWC, RW, PI, MiCro, MiB-CD: each its own
    # decided from the options, so a user's option moves a method between groups
    assert signature("FT", "--cd_factor", "0.1") == signature("MiB-CD", "--cd_factor_icl", "0")
    assert signature("MiCro", "--micro_contrast", "0") == signature("FT")
    assert signature("FT", "--bce") != signature("FT")  # a BCE head is another step 0
    assert signature("EWC", "--reg_update_after_step") != signature("EWC")  # other regulariser state
    assert signature("MiCro", "--micro_cfrd", "5") == signature("MiCro")  # t > 0 only
    assert signature("EWC") != signature("EWC", "--reg_importance", "1")
    assert signature("FT", "--icarl") == signature("LWF-MC")


def test_a_method_with_own_hooks_but_no_step0_terms_never_shares():
    class Custom(MiB):
        name = "Custom"

        def extra_losses(self, ctx):
            return {}

    class Declared(Custom):
        @classmethod
        def step0_terms(cls, opts):
            return Method.step0_terms(opts)

    opts = method_options(parse_args(["--method", "MiB"]))
    assert Custom.step0_signature(opts) != MiB.step0_signature(opts)
    assert Declared.step0_signature(opts) == MiB.step0_signature(opts)


def campaign(data_root, out, *own, popen=False, extra=()):
    args = [sys.executable, "scripts/campaign.py", "--data_root", str(data_root), "--tasks", "4-1",
            "--methods", "FT", "MiB", "LWF-MC", "--seeds", "1", "2", "--out", str(out / "tables"), *own, "--",
            *TINY, "--checkpoint_dir", str(out / "ckpt"), "--results_dir", str(out / "results"),
            "--logdir", str(out / "logs"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if popen:
        log = open(out / "first.log", "w")
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True), out / "first.log"
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def run_name(command: str) -> str:
    """The name run.py gives the run of a command line: --name, with -s<seed> for another seed."""
    words = command.split()
    return effective_name(words[words.index("--name") + 1], int(words[words.index("--random_seed") + 1]))


def test_plan_and_emitted_commands(data_root, tmp_path):
    proc = campaign(data_root, tmp_path, "--dry_run")
    assert proc.returncode == 0, proc.stderr
    assert "step 0 of vaihingen 4-1 disjoint: shared by FT, MiB; own: LWF-MC" in proc.stdout
    assert "step trainings: 10 (4 of step 0, 6 later); 12 without step-0 sharing; 0 done, 10 to run" in proc.stdout
    assert not (tmp_path / "ckpt").exists()

    commands = tmp_path / "commands.txt"
    proc = campaign(data_root, tmp_path, "--emit_commands", str(commands), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in commands.read_text().splitlines() if not l.startswith("#")]
    assert len(lines) == 10 and all("torch.distributed.run --standalone --nproc_per_node=2 " in l for l in lines)
    # every --step_ckpt / step 1 line comes after the step-0 line it needs
    shared = [i for i, l in enumerate(lines) if "--step 0 --method FT --name step0-" in l]
    assert len(shared) == 2 and "--random_seed 1" in lines[shared[0]] and "--random_seed 2" in lines[shared[1]]
    for i, line in enumerate(lines):
        if "--step_ckpt" in line:
            ckpt = line.split("--step_ckpt ")[1].split()[0]
            shared_name = Path(ckpt).stem.split("_", 1)[1][:-len("_0")]
            producer = next(j for j, l in enumerate(lines) if "--step 0" in l and run_name(l) == shared_name)
            assert producer < i and f"after [{producer + 1}]" in line  # lines are numbered from 1 in plan order

    bad = campaign(data_root, tmp_path, "--dry_run", extra=["--step", "1"])
    assert bad.returncode == 2 and "--step is set by the campaign" in bad.stderr


def _results_rows(path):
    with open(path, newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}


def test_campaign_shares_skips_recovers_and_tables(data_root, tmp_path):
    """Kill the campaign (and its run) with SIGKILL during its second run, plant a failure, re-run."""
    proc, log = campaign(data_root, tmp_path, popen=True)
    deadline = time.time() + 600
    while "== [2/10]" not in log.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # run 2 is starting up or training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmp_path / "ckpt" / "step"
    assert not (ckpts / "4-1-vaihingen_FT-s1_1.pth").exists()  # run 2 was interrupted

    # LWF-MC seed 2 will fail at its first results row (a foreign file is in the way)
    blocker = tmp_path / "results" / "vaihingen_4-1_LWF-MC-s2.csv"
    blocker.write_text("not a results file\n")
    second = campaign(data_root, tmp_path)
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    out = second.stdout
    assert "1 done, 9 to run" in out
    assert "7 trained, 1 already done, 1 failed, 1 not run" in out
    assert "vaihingen 4-1 disjoint seed 2 step 0: LWF-MC: exit code 2" in out
    assert "--method LWF-MC --name LWF-MC --random_seed 2" in out.split("failed runs")[1]

    blocker.unlink()
    third = campaign(data_root, tmp_path)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "8 done, 2 to run" in third.stdout and "2 trained, 8 already done, 0 failed" in third.stdout

    # step 0 was trained once per seed for FT and MiB together, and once per seed for LWF-MC
    step0 = sorted(p.name for p in ckpts.glob("*_0.pth"))
    assert len(step0) == 4 and sum(n.startswith("4-1-vaihingen_step0-") for n in step0) == 2
    assert len(list(ckpts.glob("*_1.pth"))) == 6
    ft = json.loads((tmp_path / "results" / "vaihingen_4-1_FT-s1.json").read_text())["steps"]
    assert list(ft) == ["1"] and Path(ft["1"]["options"]["step_ckpt"]).name.startswith("4-1-vaihingen_step0-")

    fourth = campaign(data_root, tmp_path, "--dry_run")
    assert "10 done, 0 to run" in fourth.stdout

    # the campaign's table: mean ± std over the two seeds of the rows of the results files
    with open(tmp_path / "tables" / "paper_vaihingen.csv", newline="") as f:
        table = {r["method"]: r for r in csv.DictReader(f)}
    assert list(table) == ["FT", "MiB", "LWF-MC"]
    for method in table:
        rows = [_results_rows(tmp_path / "results" / f"vaihingen_4-1_{method}-s{s}.csv")[1] for s in (1, 2)]
        for column, label in (("miou_old", "old"), ("miou_all", "all")):
            values = [float(r[column]) for r in rows]
            assert float(table[method][f"4-1 {label}"]) == pytest.approx(statistics.mean(values), abs=1e-4)
            assert float(table[method][f"4-1 {label} std"]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        assert table[method]["seeds"] == "1 2"
    md = (tmp_path / "tables" / "paper_vaihingen.md").read_text()
    assert md.count("\n| ") == 4  # header + 3 methods
    assert sorted(p.name for p in (tmp_path / "tables" / "figures").iterdir()) == [
        "per_class_vaihingen_4-1.png", "steps_vaihingen_4-1.png"]
