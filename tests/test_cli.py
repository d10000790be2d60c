"""Command-line polish: help defaults, presets, name validation, no abbreviations, errors under a launcher,
suggested commands that keep the launcher, and the device / thread checks."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from argparser import HelpFormatter, build_parser, did_you_mean, parse_args
from methods import METHODS
from utils import errors
from utils.distributed import choose_device, cpu_threads_per_process, relaunch_command
from utils.errors import UserError, exit_on_user_error

ROOT = Path(__file__).resolve().parents[1]


def option_help(parser, option):
    action = parser._option_string_actions[option]
    formatter = HelpFormatter("run.py")
    return formatter._expand_help(action) if action.help else ""


def test_every_option_shows_its_default_once():
    parser = build_parser()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.dest in ("help",):
            continue
        text = option_help(parser, action.option_strings[0])
        assert text.lower().count("default") <= 1, (action.dest, text)
        if action.default is not None:
            assert "default" in text.lower(), (action.dest, text)
    assert option_help(parser, "--hciss_threshold").count("0.7") == 1
    assert "(0 disables it) (default: 100.0)" in option_help(parser, "--hciss_fgp")
    assert option_help(parser, "--momentum") == "(default: 0.9)"
    # every document the help points to is in the repository
    for doc in re.findall(r"[\w./-]+\.md", parser.format_help()):
        assert (ROOT / doc).is_file(), doc


def test_help_lists_every_method_preset(capsys):
    text = build_parser().format_help()
    epilog = text[text.index("method presets"):].splitlines()
    for name, cls in METHODS.items():
        line = next(line for line in epilog if line.strip().startswith(name + " "))
        for key, value in cls.presets.items():
            if value is not False:
                assert f"--{key}" in line, (name, key, line)
    assert "MiB       --loss_kd 10 --unce --unkd --init_balanced" in text  # names padded to PLOP+EWF


def test_print_presets(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--method", "ewc", "--print_presets"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == ["  EWC  --regularizer ewc --reg_importance 500"]
    with pytest.raises(SystemExit):
        parse_args(["--print_presets"])
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(METHODS)


def test_no_prefix_abbreviations(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--pooling", "32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unrecognized arguments: --pooling 32; did you mean --pooling_size? "
                   "(python run.py --help lists every option)"]
    assert parse_args(["--pooling_size", "32"]).pooling_size == 32
    with pytest.raises(SystemExit) as exc:  # argparse's own errors are one line too
        parse_args(["--opt_level", "O9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --opt_level: invalid choice: 'O9'")
    # any processed dataset is a --dataset: a name neither built in nor processed is refused with the closest
    with pytest.raises(UserError, match=r"^--dataset vaihngen: unknown dataset 'vaihngen': .*; did you mean "
                                        r"vaihingen\?$"):
        parse_args(["--dataset", "vaihngen"])


@pytest.mark.parametrize("argv,fragment", [
    (["--method", "mibb"], "did you mean MiB?"),
    (["--method", "micr"], "did you mean MiCro?"),
    (["--method", "lwfmc2"], "did you mean LWF-MC?"),
    (["--task", "4_1"], "did you mean 4-1?"),
    (["--task", "2-1"], "did you mean 2-1s?"),
])
def test_near_misses_get_a_suggestion(argv, fragment):
    with pytest.raises(UserError, match=fragment.replace("?", r"\?")):
        parse_args(argv)


def test_far_misses_get_none():
    assert did_you_mean("zzzz", ["FT", "MiB"]) == ""
    with pytest.raises(UserError) as exc:
        parse_args(["--task", "banana"])
    assert "did you mean" not in str(exc.value) and "4-1" in str(exc.value)


# ---- errors under a launcher ------------------------------------------------------------
def test_user_error_printed_by_rank_zero_only(monkeypatch, capsys):
    @exit_on_user_error
    def fail():
        raise UserError("bad option")

    monkeypatch.setattr(errors, "OTHER_RANKS_DELAY_S", 0.0)
    for rank, expected in (("0", "error: bad option"), ("", "error: bad option"), ("3", "error (rank 3): bad option")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exc:
            fail()
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip() == expected


def test_torchrun_user_error_is_one_line(tmp_path, free_port):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port}", "run.py", "--data_root", str(tmp_path / "none"),
                           "--no_pretrained", "--backbone", "resnet18"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "meta.json not found" in lines[0], proc.stderr


@pytest.mark.parametrize("argv,env,expected", [
    (["--step", "0"], {}, "python run.py --step 0"),
    (["--step", "0"], {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, "torchrun --nproc_per_node=2 run.py --step 0"),
    (["--local-rank=1", "--step", "0"], {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"},
     "python -m torch.distributed.launch --nproc_per_node=4 run.py --step 0"),
    (["--step", "0", "--local_rank", "0"], {"WORLD_SIZE": "2"},
     "python -m torch.distributed.launch --nproc_per_node=2 run.py --step 0"),
    (["--step", "0"], {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"},
     "torchrun --nproc_per_node=4 --nnodes=2 run.py --step 0"),
])
def test_relaunch_command_keeps_the_launcher(argv, env, expected):
    assert " ".join(relaunch_command(argv, env=env)) == expected


def test_missing_step_hint_keeps_the_launcher(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    argv = ["--task", "4-1", "--step", "1", "--local-rank=1", "--checkpoint_dir", str(tmp_path)]
    opts = parse_args(argv)
    opts.command_line = argv
    with pytest.raises(UserError) as exc:
        run.previous_checkpoint(opts, logger=None)
    message = str(exc.value)
    assert "(python -m torch.distributed.launch --nproc_per_node=2 run.py --task 4-1 --checkpoint_dir" in message
    assert "--step 0 --lr 0.01)" in message and "local" not in message


# ---- device ---------------------------------------------------------------------------
def device(choice="auto", rank=0, procs=1, cuda_built=True, gpus=0, driver=False, visible=None):
    """choose_device, its errors worded as run.py words them (its option --device in the library's place)."""
    try:
        return choose_device(choice, rank, procs, cuda_built=cuda_built, gpu_count=gpus, driver_present=driver,
                             visible_devices=visible)
    except UserError as err:
        raise err.reworded(cpu="pass --device cpu") from None


def test_device_choice():
    assert device(gpus=2, rank=1, procs=2) == torch.device("cuda", 1)
    assert device(cuda_built=False) == torch.device("cpu")  # CPU build, no GPU machine
    assert device(cuda_built=True) == torch.device("cpu")  # CUDA build on a machine without a driver
    assert device("cpu", gpus=4, visible="") == torch.device("cpu")
    assert device("cpu", cuda_built=True, driver=True) == torch.device("cpu")
    with pytest.raises(UserError, match=r"sees no GPU \(CUDA_VISIBLE_DEVICES=''\).*--device cpu"):
        device(visible="")
    with pytest.raises(UserError, match="sees no GPU .*--device cpu"):
        device(driver=True)
    with pytest.raises(UserError, match="2 process.* only 1 GPU.*--nproc_per_node to 1"):
        device(gpus=1, rank=0, procs=2)
    with pytest.raises(UserError, match="CPU-only build"):
        device("cuda", cuda_built=False)


def test_hidden_gpus_stop_run_py_unless_device_cpu(monkeypatch, data_root, tmp_path, capsys):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = ["--data_root", str(data_root), "--logdir", str(tmp_path / "logs"), "--checkpoint_dir", str(tmp_path),
            "--backbone", "resnet18", "--no_pretrained", "--test"]
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    assert "error: no GPU available" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --device cpu passes the check and reaches the missing checkpoint
        run.main(argv + ["--device", "cpu"])
    assert "--test needs the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


def test_cpu_threads_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_process(1, env={}) == cores
    assert cpu_threads_per_process(2, env={}) == max(1, cores // 2)
    assert cpu_threads_per_process(cores * 4, env={}) == 1
    assert cpu_threads_per_process(1, env={"OMP_NUM_THREADS": "1"}) == 1
