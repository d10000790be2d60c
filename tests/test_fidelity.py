"""MiB's options and semantics that its published baselines depend on (docs/fidelity.md): --bce,
--icarl_disjoint/--icarl_bkg, --no_mask, the regulariser order flag, the eval-time pooling default, and
the Trainer keeping the loss terms' precision."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tasks
from argparser import parse_args
from dataset.incremental import label_lut
from dataset.options import DataOptions
from dataset.step_datasets import get_datasets
from methods import LWFMC, MiB, SetupContext, losses
from methods.mib_family import EWC as EWCMethod
from methods.mib_family import FT
from tests.test_invariance import TinySegModel, make_opts, make_step_models, random_batch
from train import Trainer
from utils.errors import UserError


# ---------------------------------------------------------------- command line
def test_mib_options_parse_with_mib_defaults():
    opts = parse_args([])
    assert (opts.bce, opts.icarl_disjoint, opts.icarl_bkg, opts.no_mask, opts.reg_update_after_step,
            opts.freeze, opts.fix_bn, opts.fix_bn_strict) == (False,) * 8
    assert opts.pooling_size == 32  # MiB's --pooling default
    opts = parse_args(["--method", "LWF-MC", "--icarl_disjoint", "--icarl_bkg", "--no_mask", "--bce",
                       "--reg_update_after_step", "--fix_bn_strict"])
    assert (opts.icarl, opts.icarl_disjoint, opts.icarl_bkg, opts.no_mask, opts.bce, opts.reg_update_after_step,
            opts.fix_bn_strict) == (True,) * 7
    with pytest.raises(UserError, match="--pooling_size"):
        parse_args(["--pooling_size", "0"])


# ---------------------------------------------------------------- losses chosen by the options
def step1_batch():
    old, new = make_step_models()
    images, labels = random_batch(4)
    labels[(labels > 0) & (labels < 3)] = 0  # old classes are background in step-1 training labels
    with torch.no_grad():
        old_logits, _ = old(images)
        logits, _ = new(images)
    return old, new, images, labels, old_logits, logits


def test_bce_replaces_unbiased_cross_entropy():
    """MiB: --bce (or --icarl) selects the BCE criterion before --unce is looked at."""
    old, new, images, labels, old_logits, logits = step1_batch()
    terms = MiB(make_opts(MiB, bce=True), 1, [3, 1]).training_losses(new, old, images, labels)
    torch.testing.assert_close(terms["seg"], losses.bce_with_onehot(logits, labels))
    plain = MiB(make_opts(MiB), 1, [3, 1]).training_losses(new, old, images, labels)
    torch.testing.assert_close(plain["seg"], losses.unbiased_cross_entropy(logits, labels, 3))
    torch.testing.assert_close(terms["kd"], plain["kd"])  # only the segmentation loss changes
    step0 = FT(make_opts(FT, bce=True), 0, [3])
    model = TinySegModel(3)
    images0, labels0 = random_batch(3)
    with torch.no_grad():
        logits0, _ = model(images0)
    torch.testing.assert_close(step0.training_losses(model, None, images0, labels0)["seg"],
                               losses.bce_with_onehot(logits0, labels0))


@pytest.mark.parametrize("bkg", [False, True])
def test_icarl_disjoint_replaces_segmentation_and_distillation(bkg):
    old, new, images, labels, old_logits, logits = step1_batch()
    method = LWFMC(make_opts(LWFMC, icarl_disjoint=True, icarl_bkg=bkg), 1, [3, 1])
    terms = method.training_losses(new, old, images, labels)
    assert set(terms) == {"seg"}  # no separate, weighted iCaRL term
    want = losses.icarl_disjoint(logits, old_logits, labels, background_from_labels=bkg)
    torch.testing.assert_close(terms["seg"], want)
    combined = LWFMC(make_opts(LWFMC), 1, [3, 1]).training_losses(new, old, images, labels)
    assert set(combined) == {"seg", "icarl"}
    torch.testing.assert_close(combined["seg"], losses.bce_with_onehot(logits, labels))
    torch.testing.assert_close(combined["icarl"], 10.0 * losses.icarl_distillation(logits, old_logits))


def test_icarl_disjoint_at_step0_is_plain_bce_and_refuses_invariance():
    model = TinySegModel(3)
    images, labels = random_batch(3)
    terms = LWFMC(make_opts(LWFMC, icarl_disjoint=True), 0, [3]).training_losses(model, None, images, labels)
    with torch.no_grad():
        logits, _ = model(images)
    torch.testing.assert_close(terms["seg"], losses.bce_with_onehot(logits, labels))
    with pytest.raises(UserError, match="--icarl_disjoint"):
        LWFMC(make_opts(LWFMC, icarl_disjoint=True, cd_factor=0.1), 1, [3, 1])


@pytest.mark.parametrize("after", [False, True])
def test_method_passes_the_regulariser_order(after):
    _, new = make_step_models()
    method = EWCMethod(make_opts(EWCMethod, reg_update_after_step=after), 0, [4])
    method.setup(SetupContext(model=new))
    assert method.regularizer.update_after_step is after


# ---------------------------------------------------------------- --no_mask
def mib_label_map(dataset, task, step, mode, masking):
    """MiB's remapping written out class by class (255 kept as ignore in training, see docs/fidelity.md)."""
    new, old = tasks.get_task_labels(dataset, task, step)
    order = tasks.get_order(dataset, task)
    kept = ([0] + [c for c in new if c != 0]) if masking else [0] + [c for c in old + new if c != 0]
    masked = 0 if mode == "train" else 255
    table = {}
    for value in range(256):
        if value in order and value in kept:
            table[value] = order.index(value)
        elif value in order:
            table[value] = masked
        else:
            table[value] = 255
    return table


@pytest.mark.parametrize("masking", [True, False])
@pytest.mark.parametrize("mode", ["train", "val"])
@pytest.mark.parametrize("task,step", [("2-1s", 2), ("1s", 3), ("4-1", 1), ("2-1s", 0)])
def test_no_mask_keeps_old_classes_in_train_and_val_labels(task, step, mode, masking):
    lut = label_lut("vaihingen", task, step, mode, masking=masking)
    want = mib_label_map("vaihingen", task, step, mode, masking)
    assert lut.tolist() == [want[v] for v in range(256)]
    test_lut = label_lut("vaihingen", task, step, "test", masking=masking)
    assert np.array_equal(test_lut, label_lut("vaihingen", task, step, "test"))  # test labels never masked


def test_get_datasets_reads_no_mask(data_root):
    opts = DataOptions(data_root=str(data_root), dataset="vaihingen", task="2-1s", step=2, overlap=False,
                      crop_size=64, cross_val=False, random_seed=42, no_mask=True)
    train, val, test = get_datasets(opts)
    assert np.array_equal(train.lut, label_lut("vaihingen", "2-1s", 2, "train", masking=False))
    assert np.array_equal(val.lut, label_lut("vaihingen", "2-1s", 2, "val", masking=False))
    assert train.lut[1] == 1 and train.lut[5] == 0


# ---------------------------------------------------------------- Trainer precision
class TermsMethod:
    """A stand-in Method returning fixed-precision terms built from one parameter."""

    def __init__(self, dtypes):
        self.dtypes = dtypes

    def training_losses(self, model, old_model, images, labels):
        w = model.weight
        return {f"t{i}": (w * (i + 1)).sum().to(dtype) for i, dtype in enumerate(self.dtypes)}

    def before_step(self):
        return {}

    def after_step(self):
        pass


@pytest.mark.parametrize("dtypes,want", [((torch.float64, torch.float64), torch.float64),
                                         ((torch.float16, torch.float32), torch.float32),
                                         ((torch.bfloat16,), torch.float32),
                                         ((torch.float64, torch.float16), torch.float64)])
def test_trainer_sums_terms_in_their_precision(dtypes, want):
    model = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 1e-9, 3.0]], dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    opts = SimpleNamespace(opt_level="O0", debug=False)
    dist = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    trainer = Trainer(model, None, TermsMethod(dtypes), optimizer, scheduler, opts, dist, logger=None)
    weight = model.weight.detach().clone()
    terms = trainer._train_iteration(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    assert terms["total"].dtype == want
    exact = sum(float((weight * (i + 1)).sum().to(d)) for i, d in enumerate(dtypes))
    assert terms["total"].item() == pytest.approx(exact, rel=1e-15 if want == torch.float64 else 1e-6)
    # the gradient of Σ (i+1)·Σw is Σ (i+1) per weight, whatever the terms' precision
    step = sum(range(1, len(dtypes) + 1))
    torch.testing.assert_close(model.weight.detach(), weight - 0.5 * step)
