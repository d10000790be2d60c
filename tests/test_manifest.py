"""The reproducibility manifest of results records, and summarize_results.py's warnings (--strict refuses)
when a table cell pools seeds that were run differently; files of earlier versions without it still load."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import tasks
from dataset.colormap import CLASS_NAMES
from utils.reporting.results import POOLING_KEYS, environment_manifest, read_manifests, write_results
from utils.run_id import RunId

ROOT = Path(__file__).resolve().parents[1]
RESULTS = {"iou": [0.5] * 6, "miou_old": 0.5, "miou_new": None, "miou_all": 0.5, "miou_all_bg": 0.5,
           "overall_acc": 0.5}


def _manifest(**changes):
    base = environment_manifest(torch.device("cpu"), 2, 2, 1, "torchrun",
                                {"batch_size": 4, "norm_act": "iabn_sync", "opt_level": "O0"})
    return {**base, **changes}


def _write(root, seed, manifest=None, step=0):
    name = "MiB" if seed == 42 else f"MiB-s{seed}"
    seen = tasks.get_order("vaihingen", "4-1")[:5]
    record = {"seed": seed, "effective_batch_size": (manifest or {}).get("effective_batch_size", 8)}
    if manifest is not None:
        record["manifest"] = manifest
    path = RunId.from_run_name("vaihingen", "4-1", "", name).results(root)
    return write_results(path, step, RESULTS, CLASS_NAMES, seen, {"random_seed": seed}, record=record)


def _summarize(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "scripts/summarize_results.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_manifest_records_versions_layout_precision_and_sync():
    m = environment_manifest(torch.device("cpu"), 4, 2, 2, "srun",
                             {"batch_size": 3, "norm_act": "iabn_sync", "opt_level": "O2", "compile": True})
    assert m["torch"] == torch.__version__ and m["cuda"] == torch.version.cuda
    assert (m["world_size"], m["nodes"], m["processes_per_node"], m["launcher"]) == (4, 2, 2, "srun")
    assert m["effective_batch_size"] == 12 and m["bn_sync_group"] == 4 and m["amp_dtype"] == "bfloat16"
    assert m["compile"] is True and m["channels_last"] is False and m["device"] == "cpu" and m["gpu_count"] == 0
    assert m["deterministic"] is False and m["gpu_model"] is None
    unsynced = environment_manifest(torch.device("cpu"), 4, 4, 1, "torchrun", {"batch_size": 3, "norm_act": "iabn"})
    assert unsynced["bn_sync_group"] == 1 and unsynced["amp_dtype"] == "float32"
    assert set(POOLING_KEYS) <= set(m)


def test_alike_seeds_pool_silently(tmp_path):
    paths = [_write(tmp_path, seed, _manifest()) for seed in (42, 1)]
    done = _summarize(*paths, "--strict")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr and "4-1 old" in done.stdout


def test_seeds_run_differently_warn_per_cell_and_strict_refuses(tmp_path):
    paths = [_write(tmp_path, 42, _manifest()),
             _write(tmp_path, 1, _manifest(effective_batch_size=16, gpu_count=4, bn_sync_group=4)),
             _write(tmp_path, 2, _manifest(torch="2.1.0"))]
    done = _summarize(*paths)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr  # one table cell: MiB at step 0 of 4-1
    line = warnings[0]
    assert "vaihingen 4-1 (disjoint) MiB step 0" in line
    assert "effective_batch_size 8 (seed 1)" not in line and "effective_batch_size 16 (seed 1)" in line
    for key in ("gpu_count", "bn_sync_group", "2.1.0 (seed 2)"):
        assert key in line
    assert "4-1 old" in done.stdout  # the tables follow
    strict = _summarize(*paths, "--strict")
    assert strict.returncode == 2 and strict.stdout == ""
    err = strict.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --strict:") and "effective_batch_size" in err[0]


def test_results_files_without_a_manifest_still_load_and_compare_their_batch(tmp_path):
    old = _write(tmp_path, 42)  # a record as earlier versions wrote it: no manifest
    data = json.loads(old.with_suffix(".json").read_text())
    assert "manifest" not in data["steps"]["0"]
    assert read_manifests(old) == {0: {"effective_batch_size": 8}}
    new = _write(tmp_path, 1, _manifest())
    done = _summarize(old, new)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    other = _write(tmp_path, 2, _manifest(effective_batch_size=32))
    done = _summarize(old, new, other)
    assert "effective_batch_size 8 (seed 1); " not in done.stderr
    assert "effective_batch_size 8 (seed 1), 32 (seed 2), 8 (seed 42)" in done.stderr
    # a CSV alone (the oldest files) has no JSON twin: nothing to compare, tables as before
    csv_only = tmp_path / "csv"
    csv_only.mkdir()
    path = _write(csv_only, 3)
    path.with_suffix(".json").unlink()
    assert read_manifests(path) == {}
    assert _summarize(path).returncode == 0
