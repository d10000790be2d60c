"""The bash entry points: the per-task loop chains steps with the papers' lr; scripts parse."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").rglob("*.sh")) + \
    sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.sh"))


def bash(*args, env=None):
    full_env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(["bash", *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_run_task_loops_over_steps_with_paper_lr(data_root, tmp_path):
    proc = bash("scripts/run_task.sh", "vaihingen", "3-1s", "FT", "--data_root", str(data_root),
                "--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "2",
                "--epochs", "1", "--num_workers", "0", "--debug", "--checkpoint_dir", str(tmp_path / "ckpt"),
                "--logdir", str(tmp_path / "logs"), "--results_dir", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = json.load(open(tmp_path / "results" / "vaihingen_3-1s_FT.json"))["steps"]
    assert sorted(steps) == ["0", "1", "2"]
    assert [steps[s]["options"]["lr"] for s in ("0", "1", "2")] == [0.01, 0.001, 0.001]


def test_run_task_rejects_unknown_task():
    proc = bash("scripts/run_task.sh", "vaihingen", "7-7", "FT")
    assert proc.returncode != 0 and "7-7" in proc.stderr


def test_paper_protocol_needs_a_divisor_of_24():
    proc = bash("scripts/paper/mib.sh", "vaihingen", "4-1", env={"NGPUS": "5"})
    assert proc.returncode == 2 and "NGPUS=5" in proc.stderr


def test_paper_scripts_are_campaigns(tmp_path):
    jobs = tmp_path / "jobs.txt"
    proc = bash("scripts/paper/all.sh", "potsdam", "4-1", "1s", "--", "--overlap",
                env={"NGPUS": "2", "SEEDS": "1 2", "DATA_ROOT": str(tmp_path),
                     "CAMPAIGN_ARGS": f"--emit_commands {jobs}"})
    assert proc.returncode == 0, proc.stderr
    assert "step 0 of potsdam 4-1 overlap: shared by FT, LWF, ILT, MiB, HCISS" in proc.stdout
    # 10 methods x (2 + 5 steps) x 2 seeds, minus 4 shared step 0 trainings per task and seed
    assert "step trainings: 124 (" in proc.stdout
    lines = [line for line in jobs.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 124
    assert all("--nproc_per_node=2 run.py" in line and "--overlap" in line and "--dataset potsdam" in line
               and "--batch_size 12 --epochs 40 --crop_size 512 --backbone resnet101 --output_stride 16" in line
               for line in lines)
    single = bash("scripts/paper/mib.sh", "vaihingen", "4-1", "--", "--name", "MiB_paper",
                  env={"NGPUS": "1", "DATA_ROOT": str(tmp_path), "CAMPAIGN_ARGS": "--dry_run"})
    assert single.returncode == 0, single.stderr
    assert "[  1] todo  vaihingen 4-1 disjoint seed 42 step 0: MiB_paper" in single.stdout
