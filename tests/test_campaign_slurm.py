"""scripts/campaign.py --slurm against the real one-node SLURM of scripts/local_slurm.sh (slurm_cluster
fixture): dependencies, re-runs that submit nothing twice, a failed job keeping its dependants from
running, and a job cancelled mid-step that a re-run resubmits and that ends with the weights of an
uninterrupted run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.reporting.results import read_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "2", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--debug", "--val_interval", "100", "--device", "cpu"]


def campaign(data_root, out, *own, methods=("FT", "LWF-MC"), seeds=("1", "2"), extra=TINY):
    args = [sys.executable, "scripts/campaign.py", "--data_root", str(data_root), "--tasks", "4-1",
            "--methods", *methods, "--seeds", *seeds, "--out", str(out / "campaign"), "--poll_s", "0.5", *own,
            "--", *extra, "--checkpoint_dir", str(out / "ckpt"), "--results_dir", str(out / "results"),
            "--logdir", str(out / "logs")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def job_list(out) -> dict:
    return json.loads((out / "campaign" / "slurm_jobs.json").read_text())["jobs"]


def scontrol(job_id) -> dict:
    text = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(w.split("=", 1) for w in text.split() if "=" in w)


def test_slurm_campaign_dependencies_rerun_and_failure(data_root, tmp_path, slurm_cluster):
    # LWF-MC seed 2 fails at its first results row (a foreign file is in the way)
    (tmp_path / "results").mkdir()
    blocker = tmp_path / "results" / "vaihingen_4-1_LWF-MC-s2.csv"
    blocker.write_text("not a results file\n")
    first = campaign(data_root, tmp_path, "--slurm", "--wait", "--slurm_args", f"--partition {slurm_cluster}")
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "8 job(s) submitted, 0 already queued or running" in first.stdout
    assert "6 of 8 steps done, 0 running, 0 queued, 1 failed, 1 not run" in first.stdout
    report = first.stdout.split("failed steps (their logs say why):")[1]
    assert "vaihingen 4-1 disjoint seed 2 step 0: LWF-MC: job" in report and "failed (exit code 2:0)" in report
    assert "resubmit the failed steps and those that need them with:\n  python scripts/campaign.py" in report
    assert "--slurm --wait" in report.split("resubmit the failed steps")[1]
    jobs = job_list(tmp_path)
    blocked = jobs["vaihingen/4-1/disjoint/LWF-MC-s2/step1"]
    info = scontrol(blocked["job_id"])
    assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied"
    assert not Path(blocked["log"]).exists()  # it never ran
    assert not (tmp_path / "ckpt" / "step" / "4-1-vaihingen_LWF-MC-s2_1.pth").exists()
    # every job's name says what it trains; each step 1 waited for its step 0 and started after it ended
    assert scontrol(jobs["vaihingen/4-1/disjoint/FT-s2/step1"]["job_id"])["JobName"] == \
        "vaihingen.4-1.disjoint.FT.s2.step1"
    for chain in ("FT-s1", "FT-s2", "LWF-MC-s1"):
        step0, step1 = (jobs[f"vaihingen/4-1/disjoint/{chain}/step{s}"] for s in (0, 1))
        assert step1["after"] == [step0["job_id"]]
        assert step0["state"] == step1["state"] == "COMPLETED"
        assert step1["start"] >= step0["end"]  # SLURM's own times (ISO, to the second)
        assert Path(step1["log"]).is_file() and "=== started" in Path(step1["log"]).read_text()

    # a re-run resubmits the failed step and its dependant (afterok on the new job), nothing else
    blocker.unlink()
    second = campaign(data_root, tmp_path, "--slurm", "--slurm_args", f"--partition {slurm_cluster}")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "2 job(s) submitted" in second.stdout
    assert "seed 2 step 0: LWF-MC (again: job" in second.stdout
    new = job_list(tmp_path)
    step0, step1 = (new[f"vaihingen/4-1/disjoint/LWF-MC-s2/step{s}"] for s in (0, 1))
    assert step1["after"] == [step0["job_id"]] and step0["job_id"] != jobs[
        "vaihingen/4-1/disjoint/LWF-MC-s2/step0"]["job_id"]
    assert [h["job_id"] for h in step1["history"]] == [blocked["job_id"]]
    # while they are queued or running (or once done), running it again submits nothing
    third = campaign(data_root, tmp_path, "--slurm", "--wait")
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "0 job(s) submitted" in third.stdout and "8 of 8 steps done" in third.stdout
    assert (tmp_path / "campaign" / "paper_vaihingen.md").is_file()  # the tables, once everything is done
    fourth = campaign(data_root, tmp_path, "--slurm")
    assert "0 job(s) submitted, 0 already queued or running" in fourth.stdout and fourth.returncode == 0
    assert len(read_results(tmp_path / "results" / "vaihingen_4-1_LWF-MC-s2.csv")) == 2


def test_slurm_cancelled_step_is_resubmitted_and_ends_as_uninterrupted(data_root, tmp_path, slurm_cluster):
    extra = [*TINY[:TINY.index("--epochs")], "--epochs", "12", *TINY[TINY.index("--epochs") + 2:]]
    one = dict(methods=("FT",), seeds=("1",), extra=extra)
    reference = campaign(data_root, tmp_path / "ref", **one)  # uninterrupted, on this machine
    assert reference.returncode == 0, reference.stdout[-3000:] + reference.stderr[-3000:]

    out = tmp_path / "slurm"
    submitted = campaign(data_root, out, "--slurm", **one)
    assert submitted.returncode == 0 and "2 job(s) submitted" in submitted.stdout, submitted.stdout[-3000:]
    step1 = job_list(out)["vaihingen/4-1/disjoint/FT-s1/step1"]
    local = campaign(data_root, out, **one)  # not while its steps are SLURM jobs
    assert local.returncode == 2 and "queued or running as SLURM jobs" in local.stderr, local.stderr[-2000:]
    log = Path(step1["log"])
    deadline = time.time() + 600
    while time.time() < deadline and not (log.is_file() and "epoch 2/12:" in log.read_text()):
        time.sleep(0.05)
    subprocess.run(["scancel", step1["job_id"]], check=True)  # mid-step (SIGTERM, then SIGKILL)
    while time.time() < deadline and scontrol(step1["job_id"]).get("JobState") != "CANCELLED":
        time.sleep(0.2)
    assert "epoch 12/12:" not in log.read_text()  # it was cancelled before the end
    assert not (out / "ckpt" / "step" / "4-1-vaihingen_FT-s1_1.pth").exists()

    again = campaign(data_root, out, "--slurm", "--wait", **one)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "1 job(s) submitted" in again.stdout
    assert f"seed 1 step 1: FT (again: job {step1['job_id']} cancelled" in again.stdout
    resumed = Path(job_list(out)["vaihingen/4-1/disjoint/FT-s1/step1"]["log"])
    assert "resuming from" in resumed.read_text()
    for step in (0, 1):
        name = f"4-1-vaihingen_FT-s1_{step}.pth"
        a = torch.load(tmp_path / "ref" / "ckpt" / "step" / name, map_location="cpu", weights_only=False)["model"]
        b = torch.load(out / "ckpt" / "step" / name, map_location="cpu", weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
