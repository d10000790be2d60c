"""PLOP, EWF (--ewf on any method, MiB+EWF, PLOP+EWF) and DFT* end to end: steps 0-2, what each freezes,
fuses and allocates, step-0 sharing in a campaign, option errors, resume inside a step and two processes."""
import json
import math

import pytest
import torch

import methods.base
import run
from argparser import method_options, parse_args
from methods import METHODS, get_method_class
from methods.ewf import ewf_alpha, fuse_endpoints
from modules import ModelOptions, make_model
from tests.test_run import assert_user_error, run_cli

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--debug", "--print_interval", "1"]


def args(data_root, out, method, step, task="3-1s", extra=(), dataset="vaihingen"):
    return ["--data_root", str(data_root), "--dataset", dataset, "--task", task, "--method", method,
            "--step", str(step), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), *TINY, *extra]


def ckpt(out, method, step, task="3-1s"):
    return torch.load(out / "ckpt" / "step" / f"{task}-vaihingen_{method}_{step}.pth", map_location="cpu",
                      weights_only=False)


# ---------------------------------------------------------------------------------------------- EWF
def test_ewf_alpha_and_fusion_follow_the_formula():
    assert ewf_alpha([4, 1]) == pytest.approx(math.sqrt(1 / 5))
    assert ewf_alpha([3, 2, 2]) == pytest.approx(math.sqrt(2 / 7))
    assert ewf_alpha([3, 2, 2], 0.3) == 0.3
    opts = ModelOptions(backbone="resnet18", norm_act="iabn", output_stride=16, no_pretrained=True, pretrained=None)
    torch.manual_seed(0)
    previous = make_model(opts, [3])
    previous.train()(torch.randn(2, 3, 32, 32))  # running statistics away from their initial values
    old_state = {k: v.clone() for k, v in previous.state_dict().items()}
    model = make_model(opts, [3, 2])
    model.train()(torch.randn(2, 3, 32, 32))
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_endpoints(model, old_state, 0.25)
    after = model.state_dict()
    floating = [k for k, v in old_state.items() if v.is_floating_point()]
    assert fused == len(floating)
    assert any("running_mean" in k for k in floating) and "cls.0.weight" in floating
    for key, value in after.items():
        if key in floating:
            torch.testing.assert_close(value, 0.75 * old_state[key] + 0.25 * trained[key], rtol=0, atol=1e-6)
        else:  # the new classifier and integer buffers keep the trained values
            assert torch.equal(value, trained[key]), key
    assert any(k.startswith("cls.1.") for k in after) and "cls.1.weight" not in old_state


# ---------------------------------------------------------------------------------------------- steps 0-2
@pytest.mark.parametrize("method", ["PLOP", "MiB+EWF", "PLOP+EWF", "DFTstar"])
def test_steps_0_to_2_end_to_end(method, data_root, tmp_path, monkeypatch):
    seen_terms, before_fusion = {}, {}
    original_losses, original_finish = methods.base.Method.training_losses, methods.base.Method.finish_training

    def spy_losses(self, *a, **kw):
        terms = original_losses(self, *a, **kw)
        seen_terms.setdefault(self.step, set()).update(terms)
        return terms

    def spy_finish(self, model):
        before_fusion[self.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original_finish(self, model)

    monkeypatch.setattr(methods.base.Method, "training_losses", spy_losses)
    monkeypatch.setattr(methods.base.Method, "finish_training", spy_finish)
    results = [run.main(args(data_root, tmp_path, method, step)) for step in range(3)]
    assert all(r["miou_all"] is not None and 0 <= r["miou_all"] <= 1 for r in results)
    saved = [ckpt(tmp_path, method, step) for step in range(3)]
    seen = [[4], [4, 1], [4, 1, 1]]
    opts = saved[2]["opts"]

    if method == "DFTstar":
        assert [s["classes"] for s in saved] == [[4, 1, 1]] * 3  # every classifier from step 0
        assert [s["opts"]["lr"] for s in saved] == [0.02, 0.0005, 0.0005]
        assert seen_terms[1] == seen_terms[2] == {"seg"}  # plain CE, no old model
        for step in (1, 2):
            prev, now = saved[step - 1]["model"], saved[step]["model"]
            for key in now:
                frozen = key.startswith(("body.", "head.")) or any(key.startswith(f"cls.{i}.") for i in range(step))
                if frozen:  # parameters and normalisation statistics (eval mode) unchanged
                    assert torch.equal(now[key], prev[key]), (step, key)
            assert not torch.equal(now[f"cls.{step}.weight"], prev[f"cls.{step}.weight"])
        # metrics count only the seen classes; predictions of later classes are misses
        assert len(results[1]["iou"]) == 5 and len(results[1]["unseen_predictions"]) == 5
        return

    assert [s["classes"] for s in saved] == seen
    if method.startswith("PLOP"):
        assert {"seg", "pod"} <= seen_terms[1] and {"seg", "pod"} <= seen_terms[2]
        assert "kd" not in seen_terms[1]
        for step in (1, 2):
            thresholds = saved[step]["method_state"]["plop_thresholds"]
            assert thresholds.shape == (sum(seen[step]),) and bool((thresholds >= 0.001).all())
    if not opts["ewf"]:
        assert not before_fusion.get(1, {}) or torch.equal(before_fusion[1]["cls.0.weight"],
                                                          saved[1]["model"]["cls.0.weight"])
        return
    for step in (1, 2):
        prev, trained, now = saved[step - 1]["model"], before_fusion[step], saved[step]["model"]
        alpha = math.sqrt(1 / (1 + sum(seen[step][:-1])))
        # old classifiers stayed frozen in training (only init_balanced moved the background bias)
        for i in range(step):
            assert torch.equal(trained[f"cls.{i}.weight"], prev[f"cls.{i}.weight"])
            if i > 0:
                assert torch.equal(trained[f"cls.{i}.bias"], prev[f"cls.{i}.bias"])
        assert torch.equal(trained["cls.0.bias"][1:], prev["cls.0.bias"][1:])
        # the saved (and tested, and next step's) model is the fusion with the saved step t-1 model
        for key, value in now.items():
            if key in prev and value.is_floating_point():
                torch.testing.assert_close(value, (1 - alpha) * prev[key] + alpha * trained[key], rtol=0, atol=1e-6)
            else:
                assert torch.equal(value, trained[key]), key
        assert not torch.equal(now["body.mod1.conv1.weight"], trained["body.mod1.conv1.weight"])


def test_ewf_on_any_method_and_its_options(data_root, tmp_path, capsys, monkeypatch):
    opts = parse_args(["--method", "FT", "--ewf", "--step", "1"])
    method = get_method_class("FT")(opts, 1, [4, 1])
    assert method.uses_ewf and not method.uses_old_model  # FT + EWF still runs no old model
    assert get_method_class("MiB+EWF").presets["ewf"] and get_method_class("PLOP+EWF").presets["ewf"]
    assert not get_method_class("FT")(opts, 0, [4]).uses_ewf  # step 0: nothing to fuse
    monkeypatch.setattr(run, "run_step", lambda *a: pytest.fail("the step started despite a refused option"))
    assert_user_error(capsys, args(data_root, tmp_path, "MiB", 1, extra=["--ewf", "--ewf_alpha", "1.5"]),
                      "--ewf_alpha must be in (0, 1]")
    assert_user_error(capsys, args(data_root, tmp_path, "MiB", 1, extra=["--ewf_alpha", "0.5"]), "add --ewf")
    assert_user_error(capsys, args(data_root, tmp_path, "DFT*", 0, extra=["--init_balanced", "--loss_kd", "1"]),
                      "drop --init_balanced, --loss_kd")
    assert_user_error(capsys, args(data_root, tmp_path, "PLOP", 1, extra=["--unce"]), "drop --unce")


# ---------------------------------------------------------------------------------------------- campaign
def signature(method, *extra):
    return METHODS[method].step0_signature(method_options(parse_args(["--method", method, *extra])))


def test_step0_sharing_plop_and_ewf_with_ft_but_not_dft():
    assert signature("PLOP") == signature("FT") == signature("MiB+EWF") == signature("PLOP+EWF")
    assert signature("FT", "--ewf") == signature("FT")  # EWF acts at t > 0 only
    assert signature("DFTstar") != signature("FT")
    assert get_method_class("DFT*") is METHODS["DFTstar"]


def test_campaign_plan_trains_ft_step0_once_for_plop_and_ewf(data_root, tmp_path):
    proc = run_cli(["scripts/campaign.py", "--data_root", str(data_root), "--datasets", "vaihingen", "--tasks",
                    "3-1s", "--methods", "FT", "PLOP", "PLOP+EWF", "MiB+EWF", "DFTstar", "--seeds", "42",
                    "--out", str(tmp_path / "campaign"), "--dry_run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step 0 of vaihingen 3-1s disjoint: shared by FT, PLOP, PLOP+EWF, MiB+EWF; own: DFTstar" in proc.stdout
    assert "step trainings: 12 (2 of step 0, 10 later); 15 without step-0 sharing" in proc.stdout


# ---------------------------------------------------------------------------------------------- resume
class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["PLOP+EWF", "DFTstar"])
def test_resume_inside_step1_is_bit_identical(method, data_root, tmp_path, monkeypatch):
    extra = ["--epochs", "2", "--ckpt_interval", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for out in (straight, killed):
        run.main(args(data_root, out, method, 0, task="4-1", extra=["--epochs", "1"]))
    run.main(args(data_root, straight, method, 1, task="4-1", extra=extra))

    calls = {"n": 0}
    original = run.Trainer._train_iteration

    def dies_at_fourth(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, iteration 2: the resume checkpoint holds epoch 2's first iteration
            raise _Stop()
        return original(self, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(run.Trainer, "_train_iteration", dies_at_fourth)
        with pytest.raises(_Stop):
            run.main(args(data_root, killed, method, 1, task="4-1", extra=extra))
    run.main(args(data_root, killed, method, 1, task="4-1", extra=extra))
    a, b = ckpt(straight, method, 1, task="4-1"), ckpt(killed, method, 1, task="4-1")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    log = (killed / "logs" / "4-1-vaihingen" / method / "step1" / "log.txt").read_text()
    assert "resuming from" in log and ": epoch 2, iteration 2 (iteration 3 of the step)" in log


# ---------------------------------------------------------------------------------------------- 2 processes
def test_two_gloo_processes_plop_ewf_step1_match_single_process_test(data_root, tmp_path, free_port):
    common = ["--batch_size", "2"]

    def full(argv):  # without --debug: both runs test every test crop
        return [a for a in argv if a != "--debug"]

    run.main(args(data_root, tmp_path, "PLOP+EWF", 0, task="4-1", extra=common))
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}", "run.py",
                    *full(args(data_root, tmp_path, "PLOP+EWF", 1, task="4-1", extra=common))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "4-1-vaihingen" / "PLOP+EWF" / "step1" / "log.txt").read_text()
    assert "ewf_alpha" in log and "2 process(es)" in log
    distributed = json.load(open(tmp_path / "results" / "vaihingen_4-1_PLOP+EWF.json"))["steps"]["1"]
    single = run.main(full(args(data_root, tmp_path, "PLOP+EWF", 1, task="4-1", extra=[
        *common, "--test", "--name", "single", "--ckpt",
        str(tmp_path / "ckpt" / "step" / "4-1-vaihingen_PLOP+EWF_1.pth")])))
    assert distributed["confusion"] == single["confusion"] and sum(map(sum, single["confusion"])) > 0


def test_baselines_paper_script_shares_ft_step0(tmp_path):
    from tests.test_scripts import bash

    proc = bash("scripts/paper/baselines.sh", "vaihingen", "3-1s",
                env={"NGPUS": "2", "DATA_ROOT": str(tmp_path), "CAMPAIGN_ARGS": "--dry_run"})
    assert proc.returncode == 0, proc.stderr
    assert "step 0 of vaihingen 3-1s disjoint: shared by FT, MiB, PLOP, MiB+EWF, PLOP+EWF; own: DFTstar, MiCro" \
        in proc.stdout
    for script, method in (("plop.sh", "PLOP"), ("plop-ewf.sh", "PLOP+EWF"), ("mib-ewf.sh", "MiB+EWF"),
                           ("dft.sh", "DFTstar")):
        single = bash(f"scripts/paper/{script}", "potsdam", "4-1",
                      env={"NGPUS": "1", "DATA_ROOT": str(tmp_path), "CAMPAIGN_ARGS": "--dry_run"})
        assert single.returncode == 0, single.stderr
        assert f"potsdam 4-1 disjoint seed 42 step 1: {method}" in single.stdout, single.stdout


@pytest.mark.parametrize("method", ["PLOP+EWF", "DFTstar"])
def test_mibcd_task_on_potsdam_steps_0_1(method, data_root, tmp_path):
    """MiB-CD's task family (synthetic background at channel 0, two classes per step, --patience on a
    validation split): the new methods run it too."""
    extra = ["--val_fraction", "0.3", "--patience", "1", "--epochs", "2"]
    results = [run.main(args(data_root, tmp_path, method, step, task="222a", extra=extra, dataset="potsdam"))
               for step in (0, 1)]
    assert all(r["miou_all"] is not None for r in results)
    saved = torch.load(tmp_path / "ckpt" / "step" / f"222a-potsdam_{method}_1.pth", weights_only=False)
    assert saved["classes"] == ([3, 2, 2] if method == "DFTstar" else [3, 2])


def test_metrics_count_a_predicted_unseen_class_as_a_miss():
    from utils.metrics import SegmentationMetrics

    target = torch.tensor([[0, 0, 1, 1, 2, 2, 255, 1]])
    pred = torch.tensor([[0, 3, 1, 4, 2, 1, 4, 1]])  # channels 3, 4: classifiers of later steps
    metrics = SegmentationMetrics(3, prediction_classes=5)
    metrics.update(pred, target)
    metrics.synchronize()
    res = metrics.results(old_classes=[0, 1, 2], new_classes=[])
    assert res["unseen_predictions"] == [1, 1, 0]  # the ignored pixel does not count
    # class 0: TP 1, FN 1 (predicted 3), FP 0; class 1: TP 2, FN 1 (predicted 4), FP 1 (a 2 predicted 1)
    assert res["iou"] == pytest.approx([1 / 2, 2 / 4, 1 / 2])
    assert res["overall_acc"] == pytest.approx(4 / 7)
    with pytest.raises(ValueError):  # without allocated classifiers an out-of-range prediction is a bug
        SegmentationMetrics(3).update(pred, target)
