"""Command line: MiB names and aliases, presets from the method classes, explicit flags win."""
import shlex

import pytest

from argparser import parse_args
from methods import METHODS, get_method_class
from utils.errors import UserError

# Command lines as users type them from the seed READMEs (MiB / MiCro style).
SEED_COMMANDS = [
    "--data_root data --batch_size 12 --dataset vaihingen --name MIB --task 4-1 --step 0 --lr 0.01 --epochs 40 "
    "--method MIB",
    "--data_root data --batch_size 12 --dataset potsdam --name MIB --task 2-1s --step 1 --lr 0.001 --epochs 40 "
    "--method MIB --overlapped --local_rank 0",
    "--data_root data --dataset vaihingen --task 3-1s --step 2 --method LWF-MC --no-pretrained --local-rank=1",
    "--dataset vaihingen --task 1s --step 4 --method EWC --test --ckpt checkpoints/step/x.pth",
    "--dataset vaihingen --task 4-1 --step 1 --method FT --loss_kd 100 --unkd --regularizer rw --reg_importance 5",
]


@pytest.mark.parametrize("cmd", SEED_COMMANDS)
def test_seed_commands_parse(cmd):
    opts = parse_args(shlex.split(cmd))
    assert opts.method in METHODS


def test_aliases():
    opts = parse_args(shlex.split("--method MIB --overlapped --no-pretrained --local-rank 3 --step 1"))
    assert (opts.method, opts.overlap, opts.no_pretrained, opts.local_rank) == ("MiB", True, True, 3)
    assert parse_args(["--local_rank", "2"]).local_rank == 2


@pytest.mark.parametrize("name", list(METHODS))
def test_presets_applied(name):
    opts = parse_args(["--method", name])
    for key, value in METHODS[name].presets.items():
        assert getattr(opts, key) == value, (name, key)
    assert opts.name == name


def test_mib_preset_values():
    opts = parse_args(["--method", "MiB"])
    assert (opts.loss_kd, opts.unce, opts.unkd, opts.init_balanced) == (10.0, True, True, True)
    opts = parse_args(["--method", "EWC"])
    assert (opts.regularizer, opts.reg_importance) == ("ewc", 500.0)


def test_explicit_flags_override_presets():
    opts = parse_args(["--method", "LWF", "--loss_kd", "3"])
    assert opts.loss_kd == 3.0
    opts = parse_args(["--method", "EWC", "--reg_importance", "7", "--name", "mine"])
    assert (opts.regularizer, opts.reg_importance, opts.name) == ("ewc", 7.0, "mine")
    # a flag equal to the default but given explicitly still wins over the preset
    opts = parse_args(["--method", "MiB", "--loss_kd", "0"])
    assert opts.loss_kd == 0.0


def test_lr_defaults_follow_the_papers():
    assert parse_args(["--step", "0"]).lr == 0.01
    assert parse_args(["--step", "1"]).lr == 0.001
    assert parse_args(["--step", "1", "--lr", "0.5"]).lr == 0.5
    assert parse_args([]).epochs == 40


def test_method_lookup_is_case_insensitive():
    assert get_method_class("mib").name == "MiB"
    assert get_method_class("lwf-mc").name == "LWF-MC"
    with pytest.raises(UserError, match="unknown --method"):
        parse_args(["--method", "nope"])


@pytest.mark.parametrize("argv,match", [
    (["--task", "9-9"], "task"),
    (["--task", "4-1", "--step", "2"], "step"),
    (["--epochs", "0"], "--epochs"),
    (["--method", "XYZ"], "--method"),
])
def test_bad_options_are_user_errors(argv, match):
    with pytest.raises(UserError, match=match):
        parse_args(argv)
