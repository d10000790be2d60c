"""Wall time of one small campaign (2 methods x 2 seeds x the 2 steps of 4-1: 8 runs on synthetic
Vaihingen, ResNet-18, crop 64) run one after the other vs --parallel 2, side by side in one invocation
(interleaved rounds; also sequential with one thread per run), and the same campaign through SLURM
(--slurm --wait) with the scheduling overhead per job from SLURM's own times.

    python benchmarks/campaign_parallel.py [--rounds 1] [--slurm] [--epochs 2]

Sequential runs get every core (OMP_NUM_THREADS = cores); --parallel N gives each run cores / N. The SLURM
part needs a cluster (bash scripts/local_slurm.sh start) and submits with --cpus-per-task 1 (the 4 chains
at once on the 8 CPUs the local node announces: no job waits for resources, so the time from a job's
eligibility to its start is SLURM's own latency).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from process_data.isprs_processing import VAIHINGEN
from process_data.make_synthetic_isprs import generate
from process_data.tile_processing import process_dataset
from utils.distributed import available_cpus

ROOT = Path(__file__).resolve().parents[1]


def campaign(data, out: Path, epochs: int, *own, threads: int) -> float:
    args = [sys.executable, "scripts/campaign.py", "--data_root", str(data), "--tasks", "4-1",
            "--methods", "FT", "LWF-MC", "--seeds", "1", "2", "--out", str(out / "campaign"), *own, "--",
            "--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "4",
            "--epochs", str(epochs), "--num_workers", "0", "--norm_act", "iabn", "--val_interval", "100",
            "--device", "cpu", "--checkpoint_dir", str(out / "ckpt"), "--results_dir", str(out / "results"),
            "--logdir", str(out / "logs")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or "8 trained" not in proc.stdout and "8 of 8 steps done" not in proc.stdout:
        sys.exit(f"campaign failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return seconds


def slurm_overhead(out: Path) -> tuple[list[float], list[float]]:
    """(seconds from a job's eligibility to its start, job run seconds) from the campaign's job list."""
    jobs = json.loads((out / "campaign" / "slurm_jobs.json").read_text())["jobs"]
    by_id = {e["job_id"]: e for e in jobs.values()}

    def t(text):
        return datetime.fromisoformat(text).timestamp()

    waits, runs = [], []
    for entry in jobs.values():
        eligible = max([t(entry["submitted_at"])] + [t(by_id[j]["end"]) for j in entry["after"]])
        waits.append(t(entry["start"]) - eligible)
        runs.append(t(entry["end"]) - t(entry["start"]))
    return waits, runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--slurm", action="store_true", help="also the campaign through SLURM")
    args = parser.parse_args(argv)
    cores = available_cpus()
    work = Path(tempfile.mkdtemp(prefix="campaign-bench-"))
    generate("vaihingen", work / "raw", seed=0, tile_size=180, n_train=3, n_test=2, object_scale=1.0)
    process_dataset(VAIHINGEN, work / "raw", work / "data", crop_size=64, stride=64, seed=42, progress=False)
    # sequential with every core per run (the default), sequential with one thread per run (to tell the
    # gain of running side by side from the thread count's), --parallel 2 (cores / 2 threads per run)
    kinds = {"sequential": ([], cores), "sequential 1 thread": ([], 1), "parallel 2": (["--parallel", "2"], cores)}
    times = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for kind in order:
            out = work / f"{kind.replace(' ', '')}-{r}"
            own, threads = kinds[kind]
            times[kind].append(campaign(work / "data", out, args.epochs, *own, threads=threads))
            print(f"round {r + 1}: {kind}: {times[kind][-1]:.1f} s (load average {os.getloadavg()[0]:.2f})",
                  flush=True)
    seq, seq1, par = (statistics.median(times[k]) for k in kinds)
    print(f"8 runs, {cores} cores: sequential {seq:.1f} s, sequential 1 thread {seq1:.1f} s, --parallel 2 "
          f"{par:.1f} s; ratio parallel / sequential {par / seq:.2f}, parallel / sequential 1 thread {par / seq1:.2f}")
    if args.slurm:
        out = work / "slurm"
        # one CPU (one thread) per job: the 4 independent chains all run at once on the node's 8 CPUs, so
        # no job waits for resources and eligible -> start is the scheduler's own latency
        wall = campaign(work / "data", out, args.epochs, "--slurm", "--wait", "--poll_s", "1",
                        "--slurm_args", "--cpus-per-task 1", threads=1)
        waits, runs = slurm_overhead(out)
        print(f"SLURM (--cpus-per-task 1: up to 4 one-thread jobs at once): wall {wall:.1f} s; submission to "
              f"start, or end of the job it waits for to start: mean {statistics.mean(waits):.1f} s, max "
              f"{max(waits):.0f} s (1 s resolution); job run time mean {statistics.mean(runs):.1f} s "
              f"(load average {os.getloadavg()[0]:.2f})")
    print(f"(work folder {work})")


if __name__ == "__main__":
    main()
