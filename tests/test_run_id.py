"""RunId: the one place every path and tag of a run comes from."""
from pathlib import Path

import pytest

from argparser import parse_args, run_id
from utils.run_id import DEFAULT_SEED, RunId, effective_name, split_seed


def test_every_path_of_a_run():
    rid = RunId("potsdam", "2-1s", "-ov", "MiCro", seed=3)
    assert rid.run_name == "MiCro-s3" and rid.tag == "2-1s-potsdam-ov"
    assert rid.checkpoint("ck", 2) == Path("ck/step/2-1s-potsdam-ov_MiCro-s3_2.pth")
    assert rid.last_checkpoint("ck", 2) == Path("ck/step/2-1s-potsdam-ov_MiCro-s3_2.last.pth")
    assert rid.results("res") == Path("res/potsdam_2-1s-ov_MiCro-s3.csv")
    assert rid.log_dir("logs", 1) == Path("logs/2-1s-potsdam-ov/MiCro-s3/step1")
    assert rid.log_dir("logs", 1, test=True) == Path("logs/2-1s-potsdam-ov/MiCro-s3/step1/test")
    assert rid.task_curve_dir("logs") == Path("logs/2-1s-potsdam-ov/MiCro-s3/task")
    assert rid.step_log("out/logs", 0) == Path("out/logs/potsdam_2-1s-ov_MiCro-s3_step0.log")


def test_a_tested_checkpoint_gets_results_of_its_own():
    rid = RunId("vaihingen", "4-1", "", "FT").testing("elsewhere/4-1-vaihingen_MiB_1.pth")
    assert rid.results("r") == Path("r/vaihingen_4-1_FT_test-4-1-vaihingen_MiB_1.csv")
    assert rid.log_dir("logs").name == "FT_test-4-1-vaihingen_MiB_1"


@pytest.mark.parametrize("name,seed", [("MiB", DEFAULT_SEED), ("MiB", 7), ("my_run-s12", 3)])
def test_run_names_round_trip(name, seed):
    run_name = effective_name(name, seed)
    rid = RunId.from_run_name("vaihingen", "4-1", "", run_name)
    assert rid.run_name == run_name
    assert split_seed(run_name)[1] == seed


def test_argparser_builds_the_run_id_of_the_options():
    opts = parse_args(["--dataset", "vaihingen", "--task", "3-1s", "--overlap", "--method", "MiB",
                       "--random_seed", "5", "--name", "exp"])
    assert run_id(opts) == RunId("vaihingen", "3-1s", "-ov", "exp", 5)
    assert run_id(opts).run_name == opts.name == "exp-s5"
