"""scripts/campaign.py side by side: --gpus pinning (one GPU set and rendezvous port per run), --parallel on
the CPU giving the same results as one run after the other, a failure stopping only its dependants, and
SIGINT ending every run's process group with a re-run that finishes without training anything twice."""
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from utils.distributed import available_cpus
from utils.reporting.results import read_results

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "2", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--debug", "--val_interval", "100"]
# 2 methods that do not share step 0 x 2 seeds x the 2 steps of 4-1: 8 runs in 4 independent chains
MATRIX = ["--tasks", "4-1", "--methods", "FT", "LWF-MC", "--seeds", "1", "2"]


def campaign(data_root, out, *own, popen=False, extra=TINY):
    args = [sys.executable, "scripts/campaign.py", "--data_root", str(data_root), *MATRIX,
            "--out", str(out / "campaign"), *own, "--", *extra, "--checkpoint_dir", str(out / "ckpt"),
            "--results_dir", str(out / "results"), "--logdir", str(out / "logs")]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def intervals(log_dir: Path) -> dict[str, tuple[datetime, datetime | None, dict]]:
    """Per log file: (start, end, the variables of its header) of its last attempt."""
    out = {}
    for log in log_dir.glob("*.log"):
        text = log.read_text().rsplit("=== started ", 1)[1]
        first = text.splitlines()[0].split()
        end = re.search(r"^=== ended (\S+)", text, re.M)
        out[log.stem] = (datetime.fromisoformat(first[0]), datetime.fromisoformat(end[1]) if end else None,
                         dict(w.split("=", 1) for w in first[1:]))
    return out


def test_gpus_pin_each_run_to_its_own_gpus_and_port(data_root, tmp_path):
    """--gpus 0,1,2,3 --gpus_per_run 2: two runs at once, each on two GPUs of its own with its own port
    (a stand-in interpreter records what each run got; nothing trains)."""
    fake = tmp_path / "fake_python"
    fake.write_text("#!/bin/sh\necho \"argv: $*\"\nsleep 1\n")
    fake.chmod(0o755)
    proc = campaign(data_root, tmp_path, "--gpus", "0,1,2,3", "--gpus_per_run", "2", "--python", str(fake))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 trained" in proc.stdout and "running up to 2 at once on GPUs 0,1,2,3" in proc.stdout
    runs = intervals(tmp_path / "campaign" / "logs")
    assert len(runs) == 8
    for name, (_, _, env) in runs.items():
        gpus = env["CUDA_VISIBLE_DEVICES"].split(",")
        assert len(gpus) == 2 and set(gpus) <= {"0", "1", "2", "3"}
        argv = (tmp_path / "campaign" / "logs" / f"{name}.log").read_text()
        assert "--nproc_per_node=2 run.py" in argv and f"--master_port={env['MASTER_PORT']} " in argv
    overlapping = 0
    names = sorted(runs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (s1, e1, env1), (s2, e2, env2) = runs[a], runs[b]
            if s1 < e2 and s2 < e1:  # ran at the same time: no GPU and no port in common
                overlapping += 1
                assert not set(env1["CUDA_VISIBLE_DEVICES"].split(",")) & set(env2["CUDA_VISIBLE_DEVICES"].split(","))
                assert env1["MASTER_PORT"] != env2["MASTER_PORT"]
    assert overlapping >= 1  # the first two start together


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _same_outputs(a: Path, b: Path):
    ckpts = sorted(p.name for p in (a / "ckpt" / "step").glob("*.pth"))
    assert len(ckpts) == 8 and ckpts == sorted(p.name for p in (b / "ckpt" / "step").glob("*.pth"))
    for name in ckpts:
        wa, wb = _weights(a / "ckpt" / "step" / name), _weights(b / "ckpt" / "step" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    for csv_path in sorted((a / "results").glob("*.csv")):
        ra, rb = read_results(csv_path), read_results(b / "results" / csv_path.name)
        assert [(r["step"], r["miou_all"], r["miou_old"]) for r in ra] == \
            [(r["step"], r["miou_all"], r["miou_old"]) for r in rb]


def _run_processes(out: Path) -> list[int]:
    """Processes of run.py (or torchrun) of the campaign writing to `out`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if " run.py " in cmdline and str(out / "ckpt") in cmdline and "campaign.py" not in cmdline:
                pids.append(int(entry.name))
    return pids


def test_parallel_equals_sequential_failure_blocks_dependants_sigint_resumes(data_root, tmp_path):
    seq, par = tmp_path / "seq", tmp_path / "par"
    first = campaign(data_root, seq)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # --parallel 2 with LWF-MC seed 2 failing at its first results row (a foreign file is in the way)
    (par / "results").mkdir(parents=True)
    blocker = par / "results" / "vaihingen_4-1_LWF-MC-s2.csv"
    blocker.write_text("not a results file\n")
    second = campaign(data_root, par, "--parallel", "2")
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert "6 trained, 0 already done, 1 failed, 1 not run" in second.stdout
    assert "vaihingen 4-1 disjoint seed 2 step 0: LWF-MC: exit code 2" in second.stdout
    logs = par / "campaign" / "logs"
    assert not (logs / "vaihingen_4-1_LWF-MC-s2_step1.log").exists()  # its dependant never started
    runs = intervals(logs)
    threads = str(max(1, available_cpus() // 2))
    assert all(env["OMP_NUM_THREADS"] == threads for _, _, env in runs.values())
    for name, (start, _, _) in runs.items():
        if name.endswith("_step1"):  # started after the step it loads ended
            assert start >= runs[name[:-1] + "0"][1]
    starts = sorted((s, e) for s, e, _ in runs.values())
    assert starts[1][0] < starts[0][1]  # the first two ran side by side

    # SIGINT while LWF-MC seed 2 trains step 0: every run's process group ends, nothing half written
    blocker.unlink()
    done_before = {p: p.stat().st_mtime_ns for p in (par / "ckpt" / "step").glob("*.pth") if "LWF-MC-s2" not in p.name}
    assert len(done_before) == 6
    log = logs / "vaihingen_4-1_LWF-MC-s2_step0.log"
    attempts = log.read_text().count("=== started")  # it failed once above
    third = campaign(data_root, par, "--parallel", "2", popen=True)
    deadline = time.time() + 600
    while time.time() < deadline and third.poll() is None:
        text = log.read_text()
        if text.count("=== started") > attempts and "train step" in text.rsplit("=== started", 1)[-1]:
            break
        time.sleep(0.05)
    assert _run_processes(par)  # the run is alive (training step 0)
    os.kill(third.pid, signal.SIGINT)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 130, out[-3000:]
    assert "interrupted: run the same command again" in out
    assert _run_processes(par) == []  # no orphan
    for csv_path in (par / "results").glob("*.csv"):
        read_results(csv_path)  # every results file whole
    assert not (par / "ckpt" / "step" / "4-1-vaihingen_LWF-MC-s2_1.pth").exists()
    assert "interrupted" in log.read_text().rsplit("=== started", 1)[-1].splitlines()[-1]

    fourth = campaign(data_root, par, "--parallel", "2")
    assert fourth.returncode == 0, fourth.stdout[-3000:] + fourth.stderr[-3000:]
    assert "2 trained, 6 already done, 0 failed" in fourth.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in done_before.items())  # nothing trained twice
    _same_outputs(seq, par)


def test_runner_blocks_only_dependants_and_estimates_time_left(tmp_path):
    """utils/parallel_runs.py alone, with shell commands: a failure blocks its dependants (never launched),
    an independent job still runs; the time left is the work spread over the jobs at once, never less
    than the longest job."""
    from utils.parallel_runs import Job, ParallelRunner

    codes = {1: 3, 2: 0, 3: 0, 4: 0}  # job 1 fails; 2 needs 1, 4 needs 2; 3 is independent
    needs = {2: [1], 4: [2]}
    jobs = [Job(key=k, label=f"job {k}", log=tmp_path / f"{k}.log", deps=needs.get(k, [])) for k in codes]
    launched = []

    def launch(job, slots):
        launched.append(job.key)
        return ["sh", "-c", f"echo running {job.key}; exit {codes[job.key]}"], dict(os.environ)

    runner = ParallelRunner(jobs, [None, None], 1, launch, poll_s=0.05)
    assert runner.run()
    assert {j.key: j.status for j in jobs} == {1: "failed", 2: "blocked", 3: "ok", 4: "blocked"}
    assert sorted(launched) == [1, 3] and jobs[0].detail.startswith("exit code 3")
    assert "running 1" in (tmp_path / "1.log").read_text() and "exit code 3" in (tmp_path / "1.log").read_text()

    left = {1: 10.0, 2: 30.0, 3: 20.0}
    waiting = [Job(key=k, label="", log=tmp_path / "x") for k in left]
    runner = ParallelRunner(waiting, [None, None], 1, launch, seconds_left=lambda job: left[job.key])
    assert runner.estimate_left() == 30.0  # max(60 / 2, 30)
    left.update({2: 12.0, 3: 14.0})
    assert runner.estimate_left() == 18.0  # 36 / 2
    left[2] = None
    assert runner.estimate_left() is None  # not known before an epoch time is logged


def test_epoch_times_are_read_from_run_logs():
    from scripts.campaign import EPOCH_LINE

    log = ("=== started x\ntrain step 1 ...\nepoch 1/3: seg 2.0916, total 2.0916 (1.5s, lr 1.00e-03)\n"
           "validation ...\nepoch 2/3: seg 1.9, pod 0.1, total 2.0 (12.25s, lr 5.00e-04)\n")
    assert [float(x) for x in EPOCH_LINE.findall(log)] == [1.5, 12.25]


def test_side_by_side_options_refused_with_one_line(tmp_path, capsys):
    import pytest

    from scripts.campaign import main

    cases = [(["--gpus", "0", "--gpus_per_run", "2"], "--gpus_per_run 2 needs at least that many GPUs"),
             (["--gpus", "0,0"], "give distinct GPU ids"),
             (["--parallel", "2", "--gpus", "0,1"], "give one of them"),
             (["--wait"], "--wait follows SLURM jobs; add --slurm"),
             (["--slurm", "--parallel", "2"], "with --slurm the cluster places the jobs"),
             (["--gpus_per_run", "2"], "--gpus_per_run is for --gpus or --slurm"),
             (["--gpus", "0,1", "--gpus_per_run", "2", "--nproc", "3"], "disagree")]
    for own, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["--data_root", str(tmp_path), "--tasks", "4-1", "--methods", "FT", "--dry_run", *own])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (own, err)


def test_a_second_campaign_on_the_same_folder_is_refused(tmp_path, capsys):
    import fcntl

    import pytest

    from scripts.campaign import main

    folder = tmp_path / "campaign"
    folder.mkdir()
    with open(folder / ".campaign.lock", "w") as held:
        held.write("pid 12345")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running campaign holds it
        for own in ([], ["--parallel", "2"], ["--slurm"]):
            with pytest.raises(SystemExit) as exit_info:
                main(["--data_root", str(tmp_path), "--tasks", "4-1", "--methods", "FT", "--out", str(folder), *own])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and "another campaign (pid 12345) is running" in err, err
    assert not (tmp_path / "ckpt").exists() and list(folder.iterdir()) == [folder / ".campaign.lock"]
