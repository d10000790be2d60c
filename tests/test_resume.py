"""Resume within a step: a SIGKILLed run continued by the same command ends bit-identical to an
uninterrupted one (1 process; 2 gloo processes); --no_resume; changed options; stale temp files."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run
from tests.test_run import ROOT, run_args

# Enough iterations per epoch for a kill to land inside the step; RW and the symmetry draw of MiB-CD
# give the method a running state and a random generator of its own.
RESUME_EXTRA = ["--epochs", "2", "--regularizer", "rw", "--reg_iterations", "2", "--cd_factor", "0.1",
                "--crop_size", "48", "--batch_size", "2"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _final(out, name="FT"):
    return out / "ckpt" / "step" / f"4-1-vaihingen_{name}_0.pth"


def _last(out, name="FT"):
    return out / "ckpt" / "step" / f"4-1-vaihingen_{name}_0.last.pth"


def _kill_after_last_checkpoint(cmd, out, appearances=1, name="FT", max_delay=0.3):
    """Start `cmd`, SIGKILL its process group at a random moment (up to `max_delay` s) after the resume
    checkpoint was (re)written `appearances` times; returns the seconds waited after the last write."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    seen, stamp = 0, None
    deadline = time.time() + 600
    try:
        while seen < appearances:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline
            last = _last(out, name)
            if last.exists() and last.stat().st_mtime_ns != stamp:
                stamp, seen = last.stat().st_mtime_ns, seen + 1
            time.sleep(0.01)
        delay = random.Random(len(str(out))).uniform(0.0, max_delay)
        time.sleep(delay)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_workers(out)  # torchrun starts its workers in sessions of their own
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not _final(out, name).exists(), "the step ended before the kill; make it longer"
    return delay


def _kill_workers(out):
    """SIGKILL every process whose command line names the run's own output folder."""
    marker = str(out).encode()
    for _ in range(50):
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _assert_same_step(a, b, name="FT"):
    ca, cb = (torch.load(_final(o, name), map_location="cpu", weights_only=False) for o in (a, b))
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for key in ("regularizer",):
        sa, sb = ca["method_state"][key]["state"], cb["method_state"][key]["state"]
        for part in ("fisher", "score"):
            assert all(torch.equal(sa[part][n], sb[part][n]) for n in sa[part]), part
    rows = [(o / "results" / f"vaihingen_4-1_{name}.csv").read_text().splitlines() for o in (a, b)]
    # every column up to overall_acc (the numbers) identical; the record columns follow
    assert [r.split(",")[:12] for r in rows[0]] == [r.split(",")[:12] for r in rows[1]]
    assert not _last(b, name).exists(), "the resume checkpoint must go once the step is done"


@pytest.mark.parametrize("interval", [0, 3], ids=["per-epoch", "every-3-iterations"])
def test_sigkill_then_same_command_is_bit_identical(data_root, tmp_path, interval):
    extra = [*RESUME_EXTRA, "--ckpt_interval", str(interval)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cmd = [sys.executable, "run.py", *run_args(data_root, straight, 0, extra=extra)]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stdout

    cmd = [sys.executable, "run.py", *run_args(data_root, killed, 0, extra=extra)]
    if interval:  # 9 iterations per epoch: written after iterations 3 and 6, killed at once after the 2nd
        _kill_after_last_checkpoint(cmd, killed, appearances=2, max_delay=0.0)
        state = torch.load(_last(killed), map_location="cpu", weights_only=False)
        assert (state["epoch"], state["iteration_in_epoch"]) == (0, 6)
    else:
        _kill_after_last_checkpoint(cmd, killed)
    resumed = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [line for line in resumed.stdout.splitlines() if line.startswith("resuming from")]
    assert len(lines) == 1 and str(_last(killed)) in lines[0], resumed.stdout[-2000:]
    _assert_same_step(straight, killed)


def test_sigkill_with_loader_workers_resumes_to_the_run_without_workers(data_root, tmp_path):
    """Order and augmentation follow the seed and the epoch alone (dataset.SeededSampler): a run with 2
    loader workers, killed mid-epoch and resumed with fresh workers, ends bit-identical to one without."""
    extra = [*RESUME_EXTRA, "--ckpt_interval", "3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run([sys.executable, "run.py", *run_args(data_root, straight, 0, extra=extra)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cmd = [sys.executable, "run.py", *run_args(data_root, killed, 0, extra=[*extra, "--num_workers", "2"])]
    _kill_after_last_checkpoint(cmd, killed, appearances=2, max_delay=0.0)
    assert torch.load(_last(killed), map_location="cpu", weights_only=False)["iteration_in_epoch"] == 6
    resumed = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    _assert_same_step(straight, killed)


def test_two_gloo_processes_resume_identically(data_root, tmp_path, free_port):
    """torchrun with 2 processes, killed after the first epoch's checkpoint and started again, ends with
    the weights of an uninterrupted 2-process run (each rank's RNG states restored)."""
    extra = ["--epochs", "2", "--crop_size", "48", "--batch_size", "2", "--cd_factor", "0.1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    def torchrun(out, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                "--max-restarts=0", "run.py", *run_args(data_root, out, 0, extra=extra)]

    done = subprocess.run(torchrun(straight, free_port), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _kill_after_last_checkpoint(torchrun(killed, free_port), killed)
    resumed = subprocess.run(torchrun(killed, free_port), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    ca, cb = (torch.load(_final(o), map_location="cpu", weights_only=False) for o in (straight, killed))
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key


class _Stop(Exception):
    pass


def _stop_in_epoch(monkeypatch, stop_epoch):
    """Make the run die at the start of `stop_epoch` (after the previous epoch's resume checkpoint)."""
    original = run.Trainer.train_epoch

    def train_epoch(self, loader, epoch, **kwargs):
        if epoch == stop_epoch:
            raise _Stop()
        return original(self, loader, epoch, **kwargs)

    monkeypatch.setattr(run.Trainer, "train_epoch", train_epoch)


def _interrupted_in_epoch_2(data_root, tmp_path, monkeypatch) -> list[str]:
    """Train a 2-epoch step 0 that stops at the start of epoch 2 (the last checkpoint holds epoch 1);
    returns its command line."""
    argv = run_args(data_root, tmp_path, 0, extra=["--epochs", "2", "--debug"])
    with monkeypatch.context() as patch:
        _stop_in_epoch(patch, 1)
        with pytest.raises(_Stop):
            run.main(argv)
    return argv


def test_no_resume_starts_over_and_changed_options_are_refused(data_root, tmp_path, monkeypatch, capsys):
    argv = _interrupted_in_epoch_2(data_root, tmp_path, monkeypatch)
    last = _last(tmp_path)
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["iteration_in_epoch"] == 0 and state["iteration"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "method_resume", "rng_per_rank"} <= set(state)

    with pytest.raises(SystemExit) as exc:
        run.main(argv[:-1] + ["--lr", "0.02", "--debug"])  # another lr: not the same run
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--lr 0.01" in err and "--lr 0.02" in err and "--no_resume" in err

    run.main(argv + ["--no_resume"])
    out = capsys.readouterr().out
    assert "--no_resume: starting over" in out and "resuming from" not in out
    assert not last.exists() and _final(tmp_path).exists()


def test_resume_from_a_checkpoint_of_another_world_size_is_refused(data_root, tmp_path, monkeypatch, capsys):
    argv = _interrupted_in_epoch_2(data_root, tmp_path, monkeypatch)
    state = torch.load(_last(tmp_path), map_location="cpu", weights_only=False)
    state["world_size"] = 2
    torch.save(state, _last(tmp_path))
    with pytest.raises(SystemExit):
        run.main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 process(es)" in err and "--no_resume" in err


def test_stale_temp_files_of_killed_saves_are_removed_at_the_next_start(data_root, tmp_path, capsys):
    folder = tmp_path / "ckpt" / "step"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [folder / f".4-1-vaihingen_FT_0.pth.{dead.pid}.0123abcd.tmp",
             folder / f".4-1-vaihingen_FT_0.last.pth.{dead.pid}.4567abcd.tmp"]
    live = folder / f".4-1-vaihingen_FT_0.pth.{os.getpid()}.89abcdef.tmp"  # a save in progress
    other = folder / f".4-1-vaihingen_MiB_0.pth.{dead.pid}.0123abcd.tmp"  # another run's file
    for path in (*stale, live, other):
        path.write_bytes(b"half a checkpoint")
    run.main(run_args(data_root, tmp_path, 0, extra=["--debug"]))
    assert not any(p.exists() for p in stale)
    assert live.exists() and other.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().out


def test_method_resume_state_round_trip():
    """Generators and the regulariser's running state come back in place (shared tensors stay shared)."""
    from argparser import parse_args
    from methods import SetupContext, get_method_class

    opts = parse_args(["--method", "MiCro", "--regularizer", "pi", "--cd_factor", "0.1", "--step", "0"])
    model = torch.nn.Linear(3, 2)
    method = get_method_class("MiCro")(opts, 0, [5])
    method.setup(SetupContext(model=model))
    state = method.resume_state()
    assert {"_symmetry_rng", "_anchor_rng"} <= set(state["generators"])
    expected = torch.randint(100, (5,), generator=method._symmetry_rng)
    method.regularizer.omega_path["weight"].add_(1.0)
    method.regularizer.iteration = 7
    method.load_resume_state(state)
    assert torch.equal(torch.randint(100, (5,), generator=method._symmetry_rng), expected)
    assert method.regularizer.iteration == 0 and not method.regularizer.omega_path["weight"].any()
