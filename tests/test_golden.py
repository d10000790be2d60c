"""Golden check: the working tree trains bit-identical weights and writes the same results as a recorded
baseline commit, for the same command lines (issue 20's behaviour-preserving refactor).

Each scenario runs `python run.py ...` (or torchrun) once with the code of BASELINE_COMMIT, extracted
with `git archive`, and once with the working tree, on the session's synthetic Vaihingen, and compares
the step checkpoints (every tensor exactly: model, method state, optimiser, scheduler; the recorded
options and manifest), the results CSV rows and their JSON records, and the layout of the output files.
Only what legitimately differs between two checkouts is left out: the git_commit, checkpoint_sha256
and previous_sha256 columns (the files record their own options and paths, so their hashes differ),
the write time, and the output folder itself (each run has its own, replaced by `<out>` before
comparing).

Moving the baseline: after a change of training or results made ON PURPOSE (e.g. a new augmentation),
set BASELINE_COMMIT to the commit that introduces it: commit the change (this test fails on it), then
set the constant to that commit's full sha (`git rev-parse HEAD`) in the next commit, whose message
says what moved and why. Never move it to make an unexplained difference go away.

Needs git and the baseline commit in the repository: where they are missing (a source archive, a
shallow clone) the tests are skipped with one line, except under CI (CI=true), where they fail.
"""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The code whose behaviour the working tree must keep. History: cb3c743 (main before the issue-20 refactor),
# which the refactor matched bit for bit; then 4afed84, the training augmentation by OpenCV's warpAffine
# (its rounding moves trained weights on purpose: docs/data-pipeline.md, benchmarks/RESULTS.md).
BASELINE_COMMIT = "4afed84f2ed774a60f24fcbc786f3b779184f126"
WORKING_TREE = Path(__file__).resolve().parents[1]

# Tiny model and data; --debug (set per scenario) makes an epoch and an evaluation 2 batches.
TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--print_interval", "2", "--device", "cpu"]
# MiB-CD's recipe (adamw, cosine schedule, validation split, early stopping) on its own task family.
MIBCD_RECIPE = ["--optimizer", "adamw", "--lr", "1e-3", "--weight_decay", "1e-2", "--lr_policy", "cosine",
                "--val_fraction", "0.2", "--patience", "1", "--epochs", "2"]
# Columns whose values differ between two checkouts for the same training (see the module docstring).
RECORD_ONLY_COLUMNS = ("git_commit", "checkpoint_sha256", "previous_sha256")
# Keys of checkpoints and JSON records left out at any depth, for the same reasons.
RECORD_ONLY_KEYS = {"git_commit", "sha256", "written_at"}


# ------------------------------------------------------------------------------------------ the two trees
@pytest.fixture(scope="session")
def baseline_tree(tmp_path_factory) -> Path:
    """The baseline commit's files in a temporary folder (`git archive`: no worktree is registered)."""
    why = None
    if shutil.which("git") is None:
        why = "git is not installed"
    else:
        found = subprocess.run(["git", "-C", str(WORKING_TREE), "cat-file", "-e", f"{BASELINE_COMMIT}^{{commit}}"],
                               capture_output=True, text=True)
        if found.returncode != 0:
            why = (f"commit {BASELINE_COMMIT[:12]} is not in {WORKING_TREE} (no git checkout, or a shallow clone: "
                   f"git fetch --unshallow)")
    if why:
        message = f"golden check needs the baseline code: {why}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("baseline_code")
    archive = subprocess.run(["git", "-C", str(WORKING_TREE), "archive", BASELINE_COMMIT], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def _env(tree: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _command(argv, nproc=1, port=None) -> list[str]:
    if nproc == 1:
        return [sys.executable, "run.py", *argv]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
            "--max-restarts=0", "run.py", *argv]


def run_with(tree: Path, argv, nproc=1, port=None) -> subprocess.CompletedProcess:
    """`run.py argv` with the code of `tree` (cwd and PYTHONPATH); fails the test unless it succeeds."""
    proc = subprocess.run(_command(argv, nproc, port), cwd=tree, env=_env(tree), capture_output=True, text=True,
                          timeout=600)
    code = "baseline" if tree != WORKING_TREE else "working tree"
    assert proc.returncode == 0, f"{code}: run.py {' '.join(map(str, argv))} failed:\n{proc.stderr[-3000:]}"
    return proc


def step_args(data_root, out: Path, method: str, task: str, step: int, extra=()) -> list[str]:
    return ["--data_root", str(data_root), "--dataset", "vaihingen", "--task", task, "--method", method,
            "--step", str(step), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), *TINY, *extra]


# ------------------------------------------------------------------------------------------ comparisons
def _normalised(value, out: Path):
    """`value` with the run's output folder written as `<out>` in every string."""
    if isinstance(value, str):
        return value.replace(str(out), "<out>")
    if isinstance(value, dict):
        return {k: _normalised(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_normalised(v, out) for v in value)
    return value


def first_difference(a, b, where: str = "", skip=frozenset()) -> str | None:
    """Where `a` and `b` first differ, in words (None when they are equal: tensors exactly, with their
    dtype and shape; keys in `skip` left out at any depth)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: {type(a).__name__} against {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype} {tuple(a.shape)} against {b.dtype} {tuple(b.shape)}"
        if not torch.equal(a, b):
            gap = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            return f"{where}: values differ (largest difference {gap})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        keys_a, keys_b = set(a) - skip, set(b) - skip
        if keys_a != keys_b:
            only_a, only_b = sorted(map(str, keys_a - keys_b))[:3], sorted(map(str, keys_b - keys_a))[:3]
            return f"{where}: keys only in the baseline {only_a}, only in the other {only_b}"
        for key in a:
            if key not in skip:
                found = first_difference(a[key], b[key], f"{where}[{key!r}]", skip)
                if found:
                    return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} items against {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}]", skip)
            if found:
                return found
        return None
    if type(a) is not type(b) or (a != b and not (a != a and b != b)):  # NaN equals NaN here
        return f"{where}: {a!r} against {b!r}"
    return None


def load(path: Path) -> dict:
    assert path.is_file(), f"{path} is missing"
    return torch.load(path, map_location="cpu", weights_only=False)


def step_checkpoints(out: Path) -> list[Path]:
    """The step checkpoints a run wrote (not resume checkpoints), relative to `out`."""
    found = sorted(p.relative_to(out) for p in (out / "ckpt").rglob("*.pth") if not p.name.endswith(".last.pth"))
    assert found, f"no step checkpoint under {out / 'ckpt'}"
    return found


def results_files(out: Path) -> list[Path]:
    found = sorted(p.relative_to(out) for p in (out / "results").rglob("*.csv"))
    assert found, f"no results file under {out / 'results'}"
    return found


def output_layout(out: Path) -> list[str]:
    """The files a run wrote, relative to `out`; TensorBoard event files (named by time and host, one per
    process that logged) by their folder, lock files (an implementation detail) left out."""
    files = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if path.suffix == ".lock":
            continue
        files.append(str(rel.parent / "events.out.tfevents.*") if path.name.startswith("events.out.tfevents")
                     else str(rel))
    return sorted(set(files))


def csv_rows(path: Path, steps=None) -> list[dict]:
    """The rows of a results CSV without the record-only columns (all steps, or those in `steps`)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in RECORD_ONLY_COLUMNS} for row in rows
            if steps is None or int(row["step"]) in steps]


def assert_same_checkpoint(scenario, base: Path, other: Path, skip=frozenset()):
    """Every entry of two step checkpoints: `model` and `method_state` first (the trained result), then the
    rest (optimiser, scheduler, recorded options and manifest) with the output folders normalised."""
    a, b = load(base), load(other)
    for key in ("model", "method_state"):
        assert (key in a) == (key in b), f"{scenario}: {other.name}: '{key}' in only one checkpoint"
        if key in a:
            found = first_difference(a[key], b[key], key)
            assert found is None, f"{scenario}: {other.name}: {found}"
    base_out, other_out = base.parents[2], other.parents[2]  # <out>/ckpt/step/<file>
    found = first_difference(_normalised(a, base_out), _normalised(b, other_out), "checkpoint",
                             RECORD_ONLY_KEYS | set(skip))
    assert found is None, f"{scenario}: {other.name}: {found}"


def assert_same_results(scenario, base: Path, other: Path, steps=None, skip=frozenset()):
    """The CSV rows (but the record-only columns) and their JSON records (but record-only keys, output
    folders normalised) of two results files."""
    rows_a, rows_b = csv_rows(base, steps), csv_rows(other, steps)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b], \
        f"{scenario}: {other.name}: steps {[r['step'] for r in rows_a]} against {[r['step'] for r in rows_b]}"
    for row_a, row_b in zip(rows_a, rows_b):
        assert list(row_a) == list(row_b), f"{scenario}: {other.name}: columns {list(row_a)} against {list(row_b)}"
        column = next((k for k in row_a if row_a[k] != row_b[k]), None)
        assert column is None, (f"{scenario}: {other.name}: step {row_a['step']} column '{column}': "
                                f"{row_a[column]!r} against {row_b[column]!r}")
    json_a, json_b = (json.loads(p.with_suffix(".json").read_text()) for p in (base, other))
    if steps is not None:
        for saved in (json_a, json_b):
            saved["steps"] = {k: v for k, v in saved["steps"].items() if int(k) in steps}
    found = first_difference(_normalised(json_a, base.parents[1]), _normalised(json_b, other.parents[1]),
                             other.with_suffix(".json").name, RECORD_ONLY_KEYS | set(skip))
    assert found is None, f"{scenario}: {found}"


def assert_same_outputs(scenario, base_out: Path, other_out: Path, steps=None):
    """The same files in the same places, the same step checkpoints and results."""
    layout = output_layout(base_out)
    assert layout == output_layout(other_out), f"{scenario}: output files {layout} against {output_layout(other_out)}"
    for rel in step_checkpoints(base_out):
        assert_same_checkpoint(scenario, base_out / rel, other_out / rel)
    for rel in results_files(base_out):
        assert_same_results(scenario, base_out / rel, other_out / rel, steps)


# ------------------------------------------------------------------------------------------ scenarios
def train_steps(tree: Path, data_root, out: Path, method: str, task: str, extra, nproc=1, port=None):
    """Steps 0 and 1 with the code of `tree`, step 1 from the run's own step-0 checkpoint."""
    for step in (0, 1):
        run_with(tree, step_args(data_root, out, method, task, step, extra), nproc, port)


# MiB with EWC's Fisher: step 1 reads the old model and a method state from the step-0 checkpoint.
MIB_EWC = ("MiB", "4-1", ["--debug", "--sample_num", "0", "--regularizer", "ewc"])


def test_mib_steps_as_the_baseline_and_baseline_files_load(baseline_tree, data_root, tmp_path):
    """MiB (with EWC's Fisher) steps 0 and 1 as the baseline's; then files written by the baseline load in
    the working tree: its --test of the baseline's step-1 checkpoint writes the baseline's own --test row,
    its step 1 trained from the baseline's step 0 (--step_ckpt) is the baseline's step 1."""
    method, task, extra = MIB_EWC
    base = tmp_path / "baseline"
    train_steps(baseline_tree, data_root, base, method, task, extra)
    train_steps(WORKING_TREE, data_root, tmp_path / "working", method, task, extra)
    assert_same_outputs("MiB with EWC", base, tmp_path / "working")

    ckpt_0, ckpt_1 = (base / rel for rel in step_checkpoints(base))
    tested = {}
    for label, tree in (("baseline", baseline_tree), ("working", WORKING_TREE)):
        # the run's own checkpoint (--checkpoint_dir): its row goes to the run's results file
        out = tmp_path / f"test-{label}"
        run_with(tree, step_args(data_root, out, method, task, 1,
                                 [*extra, "--test", "--checkpoint_dir", str(base / "ckpt")]))
        [tested[label]] = (out / rel for rel in results_files(out))
    assert csv_rows(tested["working"])[0]["kind"] == "test"
    assert_same_results("--test of the baseline's step 1", tested["baseline"], tested["working"])

    own = tmp_path / "step-ckpt"
    run_with(WORKING_TREE, step_args(data_root, own, method, task, 1, [*extra, "--step_ckpt", str(ckpt_0)]))
    [trained] = step_checkpoints(own)
    assert trained.name == ckpt_1.name
    # the options record --step_ckpt, the lineage and the JSON record its path: all else is the same
    assert_same_checkpoint("step 1 from the baseline's step 0", ckpt_1, own / trained, skip={"opts", "lineage"})
    [rel] = results_files(base)
    assert_same_results("step 1 from the baseline's step 0", base / rel, own / rel, steps={1},
                        skip={"options", "previous_checkpoint"})


# scenario -> (method, task, options, processes); steps 0 and 1 of each, the same command for both trees.
CHAINS = {
    "FT": ("FT", "4-1", [], 1),
    "EWC": ("EWC", "4-1", [], 1),  # Fisher information carried from step 0 to step 1
    "MiCro": ("MiCro", "4-1", [], 1),
    # MiB-CD's own task family (synthetic background, its split) and recipe: validation and early stopping
    "MiB-CD": ("MiB-CD", "222a", MIBCD_RECIPE, 1),
    # 2 gloo processes with synchronised in-place ABN
    "MiB-2-processes": ("MiB", "4-1", ["--norm_act", "iabn_sync", "--batch_size", "2"], 2),
}


@pytest.mark.parametrize("scenario", list(CHAINS))
def test_steps_0_and_1_as_the_baseline(scenario, baseline_tree, data_root, tmp_path, free_port):
    """The same two commands (step 0, then step 1 from the run's own step-0 checkpoint) with the baseline
    code and with the working tree: identical checkpoints, results rows and output files."""
    method, task, extra, nproc = CHAINS[scenario]
    extra = ["--debug", "--sample_num", "0", *extra]
    train_steps(baseline_tree, data_root, tmp_path / "baseline", method, task, extra, nproc, free_port)
    train_steps(WORKING_TREE, data_root, tmp_path / "working", method, task, extra, nproc, free_port)
    assert len(step_checkpoints(tmp_path / "baseline")) == 2
    assert_same_outputs(scenario, tmp_path / "baseline", tmp_path / "working")


# 2 epochs of 2 iterations; RW and the symmetry draw give the method a running state and a generator.
RESUME_EXTRA = ["--debug", "--sample_num", "0", "--epochs", "2", "--regularizer", "rw", "--reg_iterations", "2",
                "--cd_factor", "0.1"]


def test_baseline_resume_checkpoint_continued_by_the_working_tree(baseline_tree, data_root, tmp_path):
    """The baseline code stopped by SIGTERM (pre-emption: it writes its resume checkpoint and exits 75)
    and the same command continued by the working tree: the old resume checkpoint loads and the step
    ends as an uninterrupted baseline run."""
    straight, resumed = tmp_path / "baseline", tmp_path / "resumed"
    run_with(baseline_tree, step_args(data_root, straight, "FT", "4-1", 0, RESUME_EXTRA))

    argv = step_args(data_root, resumed, "FT", "4-1", 0, RESUME_EXTRA)
    last = resumed / "ckpt" / "step" / "4-1-vaihingen_FT_0.last.pth"
    errors = tmp_path / "stderr.txt"
    with open(errors, "w") as stderr:
        proc = subprocess.Popen(_command(argv), cwd=baseline_tree, env=dict(_env(baseline_tree), PYTHONUNBUFFERED="1"),
                                stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
    try:
        # Its first log line comes once the signal handlers are in place, well before the first iteration
        # ends: the run stops after that iteration, in the middle of epoch 1.
        for line in proc.stdout:
            if line.startswith("train step 0"):
                proc.send_signal(signal.SIGTERM)
                break
        proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, \
        f"the baseline run was not pre-empted (exit {proc.returncode}): {errors.read_text()[-3000:]}"
    assert last.is_file() and not step_checkpoints_exist(resumed), "the step ended before the stop"
    stopped = load(last)

    done = run_with(WORKING_TREE, argv)
    assert "resuming from" in done.stdout, done.stdout[-2000:]
    assert not last.exists(), "the resume checkpoint must go once the step is done"
    scenario = f"FT step 0 resumed after epoch {stopped['epoch']} and {stopped['iteration_in_epoch']} iteration(s)"
    assert_same_outputs(scenario, straight, resumed)


def step_checkpoints_exist(out: Path) -> bool:
    return any(not p.name.endswith(".last.pth") for p in (out / "ckpt").rglob("*.pth"))
