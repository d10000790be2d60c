"""Option roles (utils/options.py) declared where each option is defined, the lists derived from them, and the
frozen per-concern records argparser builds (DataOptions, ModelOptions, OptimizerOptions, MethodOptions)."""
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

import argparser
from argparser import (
    compatibility_options,
    data_options,
    method_options,
    model_options,
    optimizer_options,
    option_roles,
    options_of_kind,
    parse_args,
    per_run_flags,
)
from dataset.options import DataOptions
from methods import METHODS, MiB
from modules import ModelOptions
from utils.errors import UserError
from utils.optimizer import OptimizerOptions
from utils.options import Role

ROOT = Path(__file__).resolve().parents[1]


def _dests() -> set[str]:
    return {a.dest for a in argparser.build_parser()._actions if a.option_strings and a.dest != "help"}


def test_every_option_declares_a_role():
    parser = argparser.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert isinstance(getattr(action, "role", None), Role), action.dest
    assert set(option_roles()) >= _dests()


def test_the_lists_are_derived_from_the_roles():
    free = options_of_kind("bookkeeping")
    # launch, logging, paths and resumption may change when a run resumes; what trains may not
    assert {"command_line", "local_rank", "dist_timeout", "ckpt_interval", "allow_mismatch", "preempt_signals",
            "logdir", "results_dir", "checkpoint_dir", "data_root", "num_workers", "device"} <= free
    assert not {"lr", "epochs", "method", "step_ckpt", "backbone", "batch_size", "random_seed"} & free
    assert options_of_kind("source") == {"step_ckpt"}
    assert dict(compatibility_options()) == {"backbone": "--backbone", "output_stride": "--output_stride",
                                             "norm_act": "--norm_act", "dataset": "--dataset", "task": "--task",
                                             "overlap": "--overlap", "filter_mode": "--filter_mode"}
    assert set(per_run_flags()) == {"--data_root", "--dataset", "--task", "--task_file", "--step", "--method",
                                    "--random_seed", "--step_ckpt", "--test", "--ckpt", "--local_rank",
                                    "--local-rank"}


def test_the_campaign_reads_the_roles(monkeypatch):
    spec = importlib.util.spec_from_file_location("campaign_script", ROOT / "scripts" / "campaign.py")
    campaign = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "campaign_script", campaign)
    spec.loader.exec_module(campaign)
    assert campaign.CAMPAIGN_OPTIONS == per_run_flags()
    assert campaign.DONE_CHECK_IGNORES == options_of_kind("bookkeeping", "source")


def test_a_method_option_declared_for_step0_counts_for_its_class_only(monkeypatch):
    class Toy(MiB):
        name = "Toy"

        @classmethod
        def add_arguments(cls, parser):
            group = cls.argument_group_once(parser, "--toy_weight", "Toy", "a method of this test")
            if group is not None:
                group.add_argument("--toy_weight", type=float, default=0.5, role=Role(step0="toy"))
                group.add_argument("--toy_later", type=float, default=1.0)  # t > 0 only: not counted

        @classmethod
        def step0_terms(cls, options):
            return super().step0_terms(options)

    monkeypatch.setitem(METHODS, "Toy", Toy)
    argparser._reference_parser.cache_clear()
    try:
        toy = method_options(parse_args(["--method", "Toy"]))
        mib = method_options(parse_args(["--method", "MiB"]))
        assert toy.step0["toy"] == ("toy_weight",) and "toy" not in mib.step0
        assert "toy_weight" in toy and "toy_weight" not in mib  # a method gets its own options, not others'
        assert json.loads(Toy.step0_signature(toy))["toy"] == 0.5
        assert Toy.step0_signature(method_options(parse_args(["--method", "Toy", "--toy_later", "3"]))) == \
            Toy.step0_signature(toy)
        off = method_options(parse_args(["--method", "Toy", "--toy_weight", "0"]))
        assert Toy.step0_signature(off) == MiB.step0_signature(mib)  # a term that is off counts for nothing
    finally:
        argparser._reference_parser.cache_clear()


def test_records_hold_options_and_are_frozen(data_root):
    opts = parse_args(["--data_root", str(data_root), "--method", "EWC", "--backbone", "resnet18", "--lr", "0.02",
                       "--cross_val", "--crop_size", "48"])
    dests = _dests()
    for record, extra in ((data_options(opts), set()), (model_options(opts, in_channels=4), {"in_channels"}),
                          (optimizer_options(opts), set())):
        names = {f.name for f in dataclasses.fields(record)}
        assert names - extra <= dests, names - dests
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.lr = 1.0
    assert model_options(opts, in_channels=4) == ModelOptions(backbone="resnet18", in_channels=4)
    assert optimizer_options(opts) == OptimizerOptions(lr=0.02)
    method = method_options(opts)
    assert method.regularizer == "ewc" and method.lr == 0.02 and method.step == 0
    assert "backbone" not in method and "crop_size" not in method  # the method's options only
    with pytest.raises(AttributeError):
        method.lr = 1.0


def test_data_options_settle_the_family_defaults_once(data_root):
    data = DataOptions(data_root=str(data_root), task="2-1s", cross_val=True, overlap=True)
    assert data.filter_mode == "overlap" and data.split_suffix == "-ov" and data.val_fraction == 0.2
    assert data.test_unseen == "ignore" and data.test_crops == "all"
    assert data.protocol() == {"family": "micro", "filter_mode": "overlap", "test_unseen": "ignore",
                               "test_crops": "all", "val_fraction": 0.2}
    parsed = data_options(parse_args(["--data_root", str(data_root), "--task", "2-1s", "--cross_val", "--overlap"]))
    assert parsed.protocol() == data.protocol() and parsed.crop_size == 512
    with pytest.raises(UserError, match="between 0 and 1"):
        DataOptions(data_root=str(data_root), val_fraction=1.5)
