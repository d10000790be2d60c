"""Every command-line option of run.py (MiB's names and meanings), method presets and validation."""
from __future__ import annotations

import argparse
import math
import sys

import tasks
from methods import METHODS, get_method_class
from utils.errors import UserError


def _str2bool_flag(group, *names, help):
    group.add_argument(*names, action="store_true", default=False, help=help)


DEFAULT_SEED = 42


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py",
        description="Train (and test) one step of a class-incremental segmentation task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    g = parser.add_argument_group("data")
    g.add_argument("--data_root", default="data", help="folder holding <dataset>/ made by process_data/")
    g.add_argument("--dataset", default="vaihingen", choices=["vaihingen", "potsdam"])
    g.add_argument("--task", default="4-1", help="task name of tasks.py (4-1, 3-1s, 2-1s, 1s, offline)")
    g.add_argument("--step", type=int, default=0, help="incremental step to train/test")
    g.add_argument("--overlap", "--overlapped", dest="overlap", action="store_true", default=False,
                   help="use the overlapped split instead of the disjoint one")
    g.add_argument("--cross_val", action="store_true", default=False,
                   help="validate on 20%% of the step's train crops instead of the test crops")
    g.add_argument("--crop_size", type=int, default=512, help="training crop size")
    g.add_argument("--num_workers", type=int, default=1, help="data loader workers per process")

    g = parser.add_argument_group("method")
    g.add_argument("--method", default="FT", help=f"one of {', '.join(METHODS)} (sets presets)")
    g.add_argument("--name", default=None, help="experiment name (default: the method name)")
    g.add_argument("--loss_kd", type=float, default=0.0, help="weight of output distillation (KD / UnKD)")
    g.add_argument("--loss_de", type=float, default=0.0, help="weight of ILT feature distillation")
    _str2bool_flag(g, "--unce", help="unbiased cross-entropy (MiB)")
    _str2bool_flag(g, "--unkd", help="unbiased knowledge distillation (MiB)")
    g.add_argument("--alpha", type=float, default=1.0, help="temperature factor on old logits in KD")
    _str2bool_flag(g, "--init_balanced", help="MiB classifier initialisation of new classes")
    _str2bool_flag(g, "--icarl", help="BCE classifier + iCaRL distillation (LWF-MC)")
    g.add_argument("--icarl_importance", type=float, default=1.0, help="weight of iCaRL distillation")
    g.add_argument("--regularizer", default=None, choices=["ewc", "rw", "pi"], help="parameter regulariser")
    g.add_argument("--reg_importance", type=float, default=1.0, help="regulariser weight (lambda)")
    g.add_argument("--reg_alpha", type=float, default=0.9, help="EWC/RW running Fisher factor")
    _str2bool_flag(g, "--reg_no_normalize", help="do not min-max normalise importance")
    g.add_argument("--reg_iterations", type=int, default=10, help="RW score update period (iterations)")
    g.add_argument("--cd_factor", type=float, default=0.0,
                   help="rotation/flip invariance of features (MiB-CD); adds the term to any method")
    g.add_argument("--cd_factor_icl", type=float, default=0.0,
                   help="invariance w.r.t. the old model's features at t > 0 (MiB-CD)")
    for cls in METHODS.values():
        cls.add_arguments(parser)

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=40, help="epochs per step (papers: 40)")
    g.add_argument("--batch_size", type=int, default=4, help="batch size PER PROCESS")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default 0.01 at step 0, 0.001 after)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--lr_policy", default="poly", choices=["poly", "step"])
    g.add_argument("--lr_power", type=float, default=0.9, help="poly schedule power")
    g.add_argument("--lr_decay_step", type=int, default=5000, help="step policy: iterations per decay")
    g.add_argument("--lr_decay_factor", type=float, default=0.1, help="step policy: decay factor")
    _str2bool_flag(g, "--freeze", help="at t > 0 train only the classifiers (body and head frozen)")
    _str2bool_flag(g, "--fix_bn", help="keep normalisation statistics and affine parameters fixed")
    g.add_argument("--opt_level", default="O0", choices=["O0", "O1", "O2"],
                   help="O0 fp32 (paper); O1 fp16 autocast + GradScaler; O2 bf16 autocast")
    g.add_argument("--random_seed", type=int, default=DEFAULT_SEED,
                   help=f"seed; any other than {DEFAULT_SEED} is appended to the run name as -s<seed>")

    g = parser.add_argument_group("model")
    g.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    g.add_argument("--output_stride", type=int, default=16, choices=[8, 16])
    g.add_argument("--norm_act", default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "std"])
    g.add_argument("--no_pretrained", "--no-pretrained", dest="no_pretrained", action="store_true", default=False,
                   help="start from random weights instead of ImageNet")
    g.add_argument("--pretrained", default=None, help="ImageNet weights (default pretrained/<backbone>_<norm_act>.pth.tar)")
    g.add_argument("--pooling_size", type=int, default=None, help="eval-time ASPP pooling size (MiB); default global")

    g = parser.add_argument_group("checkpoints, testing and logging")
    _str2bool_flag(g, "--test", help="only test the saved model of --step (or --ckpt)")
    g.add_argument("--ckpt", default=None, help="checkpoint to test with --test (default: the step's own)")
    g.add_argument("--step_ckpt", default=None, help="checkpoint to use as step t-1 (default: the step's own name)")
    g.add_argument("--checkpoint_dir", default="checkpoints", help="root of checkpoints/step/")
    g.add_argument("--results_dir", default="results", help="where the results CSV/JSON go")
    g.add_argument("--logdir", default="logs", help="TensorBoard root")
    g.add_argument("--val_interval", type=int, default=1, help="validate every N epochs (monitoring only)")
    g.add_argument("--print_interval", type=int, default=10, help="log training losses every N iterations")
    g.add_argument("--sample_num", type=int, default=0, help="image|label|prediction strips logged per test")
    _str2bool_flag(g, "--debug", help="tiny runs: 2 iterations per epoch and per evaluation")
    _str2bool_flag(g, "--no_resume", help="start the step over even if its last (resume) checkpoint exists")
    g.add_argument("--ckpt_interval", type=int, default=0,
                   help="also write the resume checkpoint every N iterations (0: only at the end of each epoch)")
    _str2bool_flag(g, "--allow_mismatch", help="only warn when a loaded checkpoint was trained with another "
                                               "backbone/output_stride/norm_act/task/split/dataset")
    g.add_argument("--dist_timeout", type=float, default=300.0,
                   help="seconds a process waits for the others before the run fails (stalled rank)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch; torchrun uses the environment")
    return parser


def _explicit_options(argv) -> set[str]:
    """Names of the options given on the command line (so presets never override them)."""
    shadow = build_parser()
    for action in shadow._actions:  # argparse has no public way to suppress every default
        action.default = argparse.SUPPRESS
    return set(vars(shadow.parse_args(argv)))


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    opts = parser.parse_args(argv)
    method_cls = get_method_class(opts.method)
    opts.method = method_cls.name
    explicit = _explicit_options(argv)
    for key, value in method_cls.presets.items():
        if key not in explicit:
            setattr(opts, key, value)
        elif value and not getattr(opts, key):
            print(f"warning: --{key} {getattr(opts, key)} turns off {method_cls.name}'s --{key} {value}: this run "
                  f"is not {method_cls.name} any more (name it with --name)", file=sys.stderr)
    return finalize(opts)


def finalize(opts: argparse.Namespace) -> argparse.Namespace:
    """Derived defaults and validation shared by every entry point."""
    if not hasattr(opts, "base_name"):  # finalize once: the seed goes into the name only once
        opts.base_name = opts.name or opts.method
        seed = getattr(opts, "random_seed", DEFAULT_SEED)
        # Runs of other seeds never share checkpoints, logs or results rows (docs/robustness.md).
        opts.name = opts.base_name if seed == DEFAULT_SEED else f"{opts.base_name}-s{seed}"
    tasks.get_task_dict(opts.dataset, opts.task, opts.step)  # UserError for unknown task / step
    if opts.lr is None:
        opts.lr = 0.01 if opts.step == 0 else 0.001
    for key, value in vars(opts).items():  # nan/inf pass argparse's float()
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{key} must be a finite number (got {value})")
    for key in ("epochs", "batch_size", "crop_size", "val_interval"):
        if getattr(opts, key) <= 0:
            raise UserError(f"--{key} must be positive (got {getattr(opts, key)})")
    if opts.lr <= 0:
        raise UserError(f"--lr must be positive (got {opts.lr})")
    _check_range(opts, "momentum", 0.0, 1.0, "in (0, 1): SGD uses Nesterov momentum", low_open=True, high_open=True)
    _check_range(opts, "weight_decay", 0.0, math.inf, ">= 0")
    for key in ("num_workers", "ckpt_interval", "sample_num"):
        _check_range(opts, key, 0, math.inf, ">= 0")
    _check_range(opts, "dist_timeout", 0.0, math.inf, "positive (seconds)", low_open=True)
    if getattr(opts, "icarl", False) and getattr(opts, "unce", False):
        raise UserError("--icarl (BCE classifier, LWF-MC) and --unce (unbiased cross-entropy, MiB) are alternative "
                        "segmentation losses; drop one of them")
    return opts


def _check_range(opts, key, low, high, wording, low_open=False, high_open=False):
    value = getattr(opts, key, None)
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise UserError(f"--{key} must be {wording} (got {value})")
