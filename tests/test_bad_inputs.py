"""Every bad input a user can give ends in one `error: ...` line naming the problem, exit code 2, before
anything is trained or written (options, output folders, disk space, incompatible checkpoints, damaged
labels, non-finite weights, a stalled rank)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import run
from tests.conftest import png_only_copy
from tests.test_run import ROOT, assert_user_error, run_args

OPTION_CASES = [
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--momentum", "-1"], ["--momentum must be in (0, 1)", "-1"]),
    (["--momentum", "1"], ["--momentum must be in (0, 1)"]),
    (["--momentum", "nan"], ["--momentum must be a finite number"]),
    (["--num_workers", "-1"], ["--num_workers must be >= 0"]),
    (["--weight_decay", "-0.1"], ["--weight_decay must be >= 0"]),
    (["--loss_kd", "nan"], ["--loss_kd must be a finite number"]),
    (["--icarl", "--unce"], ["--icarl", "--unce", "drop one"]),
    (["--method", "MiB", "--icarl"], ["--icarl", "--unce"]),
    (["--ckpt_interval", "-1"], ["--ckpt_interval must be >= 0"]),
    (["--dist_timeout", "0"], ["--dist_timeout must be positive"]),
    (["--epochs", "0"], ["--epochs must be positive"]),
]


@pytest.mark.parametrize("extra, fragments", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_option_is_one_line(extra, fragments, data_root, tmp_path, capsys):
    assert_user_error(capsys, run_args(data_root, tmp_path, 0, extra=extra), *fragments)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "results").exists()


def test_preset_turned_off_is_a_warning(capsys):
    from argparser import parse_args

    opts = parse_args(["--method", "LWF", "--loss_kd", "0"])
    assert opts.loss_kd == 0
    assert "warning: --loss_kd 0.0 turns off LWF's --loss_kd 100" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--checkpoint_dir", "--results_dir", "--logdir"])
def test_unwritable_output_folder_before_training(option, data_root, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trained = []
    monkeypatch.setattr(run.Trainer, "train_epoch", lambda *a, **k: trained.append(1))
    argv = run_args(data_root, tmp_path, 0) + [option, str(blocker / "sub")]
    assert_user_error(capsys, argv, "cannot write to", str(blocker / "sub"), option)
    assert not trained


def test_not_enough_disk_space_before_training(data_root, tmp_path, capsys, monkeypatch):
    import collections

    import utils.checkpoint

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(utils.checkpoint.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    trained = []
    monkeypatch.setattr(run.Trainer, "train_epoch", lambda *a, **k: trained.append(1))
    assert_user_error(capsys, run_args(data_root, tmp_path, 0), "1 MiB free", "a checkpoint of this model")
    assert not trained


@pytest.fixture(scope="module")
def step0(data_root, tmp_path_factory):
    """A step-0 checkpoint of resnet18 / iabn / disjoint 4-1 Vaihingen."""
    out = tmp_path_factory.mktemp("step0")
    run.main(run_args(data_root, out, 0, extra=["--debug"]))
    return out / "ckpt" / "step" / "4-1-vaihingen_FT_0.pth"


CHECKPOINT_CASES = [
    (["--backbone", "resnet34"], ["--backbone resnet18", "--backbone resnet34", "--allow_mismatch"]),
    (["--backbone", "resnet34", "--allow_mismatch"], ["does not match the model", "missing"]),
    (["--backbone", "resnet50", "--allow_mismatch"], ["does not match the model", "has shape"]),
    (["--norm_act", "std"], ["--norm_act iabn", "--norm_act std"]),
    (["--overlap"], ["--overlap False", "--overlap True"]),
    (["--output_stride", "8"], ["--output_stride 16", "--output_stride 8"]),
    (["--dataset", "potsdam"], ["--dataset vaihingen", "--dataset potsdam"]),
]


@pytest.mark.parametrize("extra, fragments", CHECKPOINT_CASES, ids=[" ".join(c[0]) for c in CHECKPOINT_CASES])
def test_incompatible_previous_step(extra, fragments, step0, data_root, tmp_path, capsys):
    argv = run_args(data_root, tmp_path, 1, extra=["--step_ckpt", str(step0), "--debug", *extra])
    assert_user_error(capsys, argv, str(step0), *fragments)


def test_incompatible_checkpoint_for_test(step0, data_root, tmp_path, capsys):
    argv = run_args(data_root, tmp_path, 0, extra=["--test", "--ckpt", str(step0), "--backbone", "resnet34"])
    assert_user_error(capsys, argv, "--backbone resnet18", "--backbone resnet34")


def test_iabn_sync_checkpoint_is_compatible_with_iabn(step0, data_root, tmp_path):
    """Synchronised and plain in-place ABN are the same model: no mismatch."""
    run.main(run_args(data_root, tmp_path, 1, extra=["--step_ckpt", str(step0), "--debug", "--norm_act",
                                                     "iabn_sync"]))


def _broken_copy(data_root, tmp_path, damage):
    """PNG crops (the store cannot hold a label of another size) with damaged training labels."""
    root = tmp_path / "data"
    png_only_copy(data_root, "vaihingen", root)
    for label in sorted((root / "vaihingen" / "train" / "labels").glob("*.png")):
        array = np.array(Image.open(label))
        Image.fromarray(damage(array)).save(label)
    return root


def test_label_of_another_size_names_the_file(data_root, tmp_path, capsys):
    root = _broken_copy(data_root, tmp_path, lambda a: a[:-8])
    assert_user_error(capsys, run_args(root, tmp_path, 0, extra=["--debug"]), "labels", ".png", "56 px",
                      "64x64")


def test_label_without_any_known_class_names_the_file(data_root, tmp_path, capsys):
    root = _broken_copy(data_root, tmp_path, lambda a: np.full_like(a, 7))
    assert_user_error(capsys, run_args(root, tmp_path, 0, extra=["--debug"]), "labels", ".png", "[7]",
                      "no class of vaihingen (0-5, 255 ignored)")


def test_non_finite_weights_are_never_saved(data_root, tmp_path, capsys, monkeypatch):
    """A finite loss but a NaN buffer (e.g. BN statistics): refused before the checkpoint is written."""
    original = run.Trainer.train_epoch

    def poisoned(self, *args, **kwargs):
        means = original(self, *args, **kwargs)
        next(b for b in self.module.buffers() if b.is_floating_point()).fill_(float("nan"))
        return means

    monkeypatch.setattr(run.Trainer, "train_epoch", poisoned)
    assert_user_error(capsys, run_args(data_root, tmp_path, 0, extra=["--debug", "--epochs", "2"]), "NaN/inf",
                      "no checkpoint was written")
    assert not list((tmp_path / "ckpt").rglob("*.pth"))
    assert not (tmp_path / "results" / "vaihingen_4-1_FT.csv").exists()


def test_synthetic_generator_rejects_zero_tiles(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "process_data/make_synthetic_isprs.py", "--dataset", "vaihingen",
                           "--dst", str(tmp_path / "raw"), "--n_train", "0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --n_train 0"), proc.stderr
    assert not (tmp_path / "raw").exists()


STALL = """
import os, time
import torch.distributed as dist
from utils.distributed import barrier, init_distributed
info = init_distributed(timeout_s=3)
if info.rank == 1:
    time.sleep(60)  # a stalled rank
start = time.time()
try:
    barrier()
except Exception as err:
    print(f"rank {info.rank} gave up after {time.time() - start:.1f} s", flush=True)
    os._exit(3)
"""


def test_a_stalled_rank_ends_the_run_after_dist_timeout(tmp_path, free_port):
    script = tmp_path / "stall.py"
    script.write_text(STALL)
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    start = time.time()
    out, _ = procs[0].communicate(timeout=120)
    elapsed = time.time() - start
    procs[1].kill()
    procs[1].wait()
    assert procs[0].returncode == 3, out
    assert "rank 0 gave up after" in out
    assert elapsed < 45  # 3 s timeout (plus start-up), not the 30 minutes of torch's default
