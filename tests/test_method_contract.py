"""The Method contract carries a method that needs more than losses: a PLOP-like method defined only here,
registered at test time, with a pre-pass over the training data with the old model in `setup`, a
backbone stage feature ("stage3") and state shared between its label and loss hooks. Runs steps 0 and 1
end to end through run.main."""
import pytest
import torch

import methods
import run
from methods import Method, SetupContext, StepContext
from methods.common import reconstruct_labels
from utils.errors import UserError

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "32", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "std", "--print_interval", "1", "--debug"]


class PrePassMethod(Method):
    """At t > 0: `setup` runs the old model over the training batches and takes the median confidence of
    its prediction on background pixels as the pseudo-labelling threshold; `target_labels` relabels
    background with confident old classes at that threshold and remembers which pixels it relabelled;
    `extra_losses` distils the "stage3" features on exactly those pixels' cells."""

    name = "PrePass"
    summary = "test-only: loader pre-pass + stage feature + state across hooks"
    own_terms_read_old_model = True
    instances: list = []  # the test reads what each step's method saw

    def __init__(self, opts, step, classes):
        super().__init__(opts, step, classes)
        self.threshold = None
        self.prepass_pixels = 0
        self.relabelled = None  # set by target_labels, read by extra_losses of the same batch
        self.seen = []  # (labels in, old logits, labels out, relabelled mask seen by extra_losses)
        PrePassMethod.instances.append(self)

    def setup(self, ctx: SetupContext) -> None:
        super().setup(ctx)
        if ctx.old_model is None:
            return
        confidences = []
        with torch.no_grad():
            for images, labels in ctx.batches():
                confidence = torch.softmax(ctx.old_model(images).logits, dim=1).max(dim=1).values
                confidences.append(confidence[labels == 0])
        values = torch.cat(confidences)
        self.prepass_pixels = values.numel()
        self.threshold = float(values.median())

    def target_labels(self, labels, old_logits):
        if self.step == 0:
            return labels
        out = reconstruct_labels(labels, old_logits, self.threshold)
        self.relabelled = out != labels
        self.seen.append([labels.clone(), old_logits.clone(), out.clone(), None])
        return out

    def extra_losses(self, ctx: StepContext):
        if ctx.old_features is None:
            return {}
        new, old = ctx.features["stage3"], ctx.old_features["stage3"]
        mask = torch.nn.functional.adaptive_max_pool2d(self.relabelled[:, None].float(), new.shape[-2:])
        self.seen[-1][3] = self.relabelled
        return {"stage3_kd": ((new - old).pow(2).mean(1, keepdim=True) * mask).sum() / mask.sum().clamp(min=1)}


def test_method_with_prepass_stage_feature_and_shared_state(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, PrePassMethod.name, PrePassMethod)
    PrePassMethod.instances.clear()
    common = ["--data_root", str(data_root), "--dataset", "vaihingen", "--task", "4-1", "--method", "PrePass",
              "--checkpoint_dir", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "logs"),
              "--results_dir", str(tmp_path / "results"), *TINY]
    run.main([*common, "--step", "0"])
    run.main([*common, "--step", "1"])
    step0, step1 = PrePassMethod.instances
    assert step0.threshold is None and not step0.seen  # no old model at step 0: no pre-pass, no relabelling

    # the pre-pass covered the training batches of the step (--debug: 2 batches of 4 crops of 32x32)
    assert 0 < step1.prepass_pixels <= 2 * 4 * 32 * 32
    assert 0 < step1.threshold < 1
    # ... and its threshold is the one the label hook applied, on every training batch
    assert len(step1.seen) == 2
    relabelled_any = False
    for labels_in, old_logits, labels_out, mask in step1.seen:
        torch.testing.assert_close(labels_out, reconstruct_labels(labels_in, old_logits, step1.threshold))
        below = reconstruct_labels(labels_in, old_logits, 0.0)
        relabelled_any |= bool((labels_out != labels_in).any())
        # a median threshold relabels some but not all background pixels the old model calls foreground
        assert (labels_out != labels_in).sum() <= (below != labels_in).sum()
        # the loss hook saw the label hook's state for the same batch
        assert mask is not None and torch.equal(mask, labels_out != labels_in)
    assert relabelled_any
    log = (tmp_path / "logs" / "4-1-vaihingen" / "PrePass" / "step1" / "log.txt").read_text()
    assert "stage3_kd" in log
    assert "normalisation --norm_act std: torch BatchNorm2d + ReLU" in log  # which implementation runs


def test_model_output_names_every_stage():

    from modules import ModelOptions, ModelOutput, make_model

    model = make_model(ModelOptions(backbone="resnet18", norm_act="std", output_stride=16, no_pretrained=True,
                                       pretrained=None), [3, 1])
    out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, ModelOutput)
    assert list(out.features) == ["stage1", "stage2", "stage3", "stage4", "body", "pre_logits"]
    assert [out.features[f"stage{i}"].shape[-1] for i in range(1, 5)] == [16, 8, 4, 4]  # strides 4, 8, 16, 16
    assert out.features["body"] is out.features["stage4"]
    logits, features = out  # tuple unpacking still works
    assert logits is out.logits and features is out.features


@pytest.mark.parametrize("regularizer", ["", "ewc"])
def test_divergence_hint_comes_from_the_method(regularizer):
    from types import SimpleNamespace

    from train import DIVERGENCE_HINT, Trainer

    opts = SimpleNamespace(regularizer=regularizer, lr=0.01, reg_importance=500.0, random_seed=0, icarl=False,
                           icarl_disjoint=False, cd_factor=0.0, cd_factor_icl=0.0, opt_level="O0")
    method = Method(opts, 0, [5])
    if regularizer:
        method.regularizer = object()  # stands for a built regulariser
    trainer = Trainer(torch.nn.Linear(1, 1), None, method, None, None, opts,
                      SimpleNamespace(device=torch.device("cpu")), None)
    hint = trainer.divergence_hint()
    assert ("--reg_importance" in hint) == bool(regularizer)
    assert (hint == DIVERGENCE_HINT) == (not regularizer)


class PickyMethod(Method):
    """Test-only: refuses a value of a shared option in its own `validate` and records each call."""

    name = "Picky"
    summary = "test-only: its own option check"
    calls: list = []  # the step of each validate call

    @classmethod
    def validate(cls, opts, step=None):
        super().validate(opts, step)
        cls.calls.append(opts.step if step is None else step)
        if opts.alpha > 1:
            raise UserError(f"--alpha {opts.alpha:g}: Picky needs a temperature factor of at most 1")


def test_finalize_calls_the_methods_validate_and_its_error_reaches_the_user(data_root, tmp_path, monkeypatch,
                                                                             capsys):
    from argparser import parse_args
    from tests.test_run import assert_user_error, run_args

    monkeypatch.setitem(methods.METHODS, PickyMethod.name, PickyMethod)
    PickyMethod.calls.clear()
    parse_args(["--method", "picky", "--step", "1"])
    assert PickyMethod.calls == [1]  # once, for the step to train
    monkeypatch.setattr(run, "run_step", lambda *args: pytest.fail("the step started despite a refused option"))
    assert_user_error(capsys, run_args(data_root, tmp_path, 0, method="Picky", extra=["--alpha", "2"]),
                      "--alpha 2: Picky needs a temperature factor of at most 1")


@pytest.mark.parametrize("method, extra, fragment", [
    ("EWC", ["--reg_alpha", "2"], "--reg_alpha must be in [0, 1], got 2.0"),
    ("RW", ["--reg_iterations", "0"], "--reg_iterations must be >= 1, got 0"),
    ("MiCro", ["--micro_pool", "0"], "--micro_pool must be >= 1 (got 0)"),
    ("LWF-MC", ["--step", "1", "--icarl_disjoint", "--cd_factor", "0.1"], "drop --icarl_disjoint or the invariance"),
])
def test_method_option_errors_come_before_anything_is_built(method, extra, fragment, data_root, tmp_path, capsys,
                                                            monkeypatch):
    from tests.test_run import assert_user_error, run_args

    monkeypatch.setattr(run, "run_step", lambda *args: pytest.fail("the step started despite a refused option"))
    assert_user_error(capsys, run_args(data_root, tmp_path, 0, method=method, extra=extra), fragment)
