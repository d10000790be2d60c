"""Every command-line option of run.py (MiB's names and meanings) with its role (utils/options.py), method
presets, validation, and the per-concern option records built from them: nothing below the entry points
sees the whole namespace."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import re
import sys
from dataclasses import dataclass

import tasks
from dataset.options import DataOptions
from methods import ALIASES, METHODS, get_method_class
from methods.base import MethodOptions
from modules import ModelOptions
from train import TrainOptions
from utils.errors import UserError, print_error
from utils.optimizer import OPTIMIZERS, OptimizerOptions
from utils.options import BOOKKEEPING, OptionGroup, Role, option_group
from utils.run_id import DEFAULT_SEED, RunId, effective_name

_PARENTHESES = re.compile(r"\s*\(([^()]*)\)")


class Parser(argparse.ArgumentParser):
    """argparse's errors as one line (no 40-line usage), printed once under a launcher, with a
    suggestion for a misspelt option. Its groups take each option's role."""

    def add_argument_group(self, *args, **kwargs) -> OptionGroup:
        return option_group(self, *args, **kwargs)

    def error(self, message):
        unknown = [arg.split("=")[0] for arg in message.split(":", 1)[-1].split() if arg.startswith("--")]
        if message.startswith("unrecognized arguments") and unknown:
            message += did_you_mean(unknown[0], {o: o for o in self._option_string_actions})
        print_error(f"{message} (python {self.prog} --help lists every option)")
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, once: a default the help already states in
    parentheses, e.g. `(0.7)`, is replaced by `(default: 0.7)`; on/off flags and options whose help
    explains their default (`default ...`) are left as they are. The epilog keeps its line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (default in (None, argparse.SUPPRESS) or action.nargs == 0 or not action.option_strings
                or "default" in text.lower()):
            return text
        text = _PARENTHESES.sub(lambda m: _without_default(m, default), text)
        return f"{text} (default: %(default)s)".lstrip()


def _without_default(match, default) -> str:
    """A parenthesised remark without the default it repeats: `(0.7)` -> ``, `(100; 0 disables it)`
    -> ` (0 disables it)`."""
    parts = re.split(r"([;,])", match.group(1), maxsplit=1)
    head, _, rest = parts + ["", ""][: 3 - len(parts)]
    if not _same_value(head, default):
        return match.group(0)
    return f" ({rest.strip()})" if rest.strip() else ""


def _same_value(text: str, default) -> bool:
    text = text.strip()
    if text == str(default):
        return True
    try:
        return float(text) == float(default)
    except (TypeError, ValueError):
        return False


def format_presets(names=None) -> str:
    """One line per method: the options its preset sets (applied unless given on the command line)."""
    def option(key, value):
        return f"--{key}" if value is True else f"--{key} {value:g}" if isinstance(value, float) else f"--{key} {value}"

    names = list(METHODS) if names is None else names
    width = max(len(n) for n in names)
    lines = []
    for name in names:
        shown = [option(k, v) for k, v in METHODS[name].presets.items() if v is not False]
        rates = METHODS[name].learning_rates
        if rates:
            shown.append(f"--lr {rates[0]:g} at step 0, {rates[1]:g} after")
        lines.append(f"  {name:<{width}}  {' '.join(shown) if shown else '(none: plain cross-entropy fine-tuning)'}")
    return "\n".join(lines)


def did_you_mean(given: str, known) -> str:
    """`; did you mean X?` for the closest known name (case-insensitive), or an empty string.
    known: names, or {name: name to suggest} (aliases pointing at their canonical name)."""
    known = known if isinstance(known, dict) else {k: k for k in known}
    by_upper = {str(k).upper(): str(v) for k, v in known.items()}
    close = difflib.get_close_matches(str(given).upper(), list(by_upper), n=1, cutoff=0.6)
    return f"; did you mean {by_upper[close[0]]}?" if close else ""


def _str2bool_flag(group, *names, help, role=None):
    group.add_argument(*names, action="store_true", default=False, help=help, role=role)


def default_lr(step: int) -> float:
    """The learning rate when --lr is not given: 0.01 at step 0, 0.001 at later steps (MiB's)."""
    return 0.01 if step == 0 else 0.001


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="run.py",
        description="Train (and test) one step of a class-incremental segmentation task.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # a prefix such as --pooling must not silently mean --pooling_size
        epilog="method presets (each sets the options below unless they are given; --print_presets):\n"
               + format_presets(),
    )

    g = parser.add_argument_group("data")
    g.add_argument("--data_root", role=Role(kind="bookkeeping", per_run=True),
                   default="data", help="folder holding <dataset>/ made by process_data/")
    g.add_argument("--dataset", role=Role(compatible=True, per_run=True), default="vaihingen",
                   help=f"built in: {', '.join(tasks.DATASETS)}; or the name of a dataset of your own processed "
                        f"from its spec into --data_root (docs/data.md#your-own-dataset)")
    g.add_argument("--task", role=Role(compatible=True, per_run=True), default="4-1",
                   help=f"incremental task (--list_tasks): for ISPRS MiCro's {', '.join(tasks.TASKS['vaihingen'])} "
                        f"(clutter = background) or MiB-CD's {', '.join(tasks.MIBCD_TASKS['potsdam'])} (synthetic "
                        f"background)")
    g.add_argument("--task_file", role=Role(per_run=True), default=None,
                   help="JSON task file adding tasks to the dataset's (docs/data.md#task-files)")
    g.add_argument("--list_tasks", role=BOOKKEEPING, action="store_true", default=False,
                   help="print every task of --dataset (and --task_file) with its steps, and exit")
    g.add_argument("--step", role=Role(per_run=True), type=int, default=0, help="incremental step to train/test")
    g.add_argument("--overlap", "--overlapped", role=Role(compatible=True),
                   dest="overlap", action="store_true", default=False,
                   help="use the overlapped split instead of the disjoint one")
    g.add_argument("--filter_mode", role=Role(compatible=True), default=None,
                   help="training crops of a step: MiCro's tasks disjoint|overlap, MiB-CD's split|overlap|noov "
                        "(default: the first of the task's family)")
    g.add_argument("--cross_val", action="store_true", default=False,
                   help="validate on 20%% of the step's train crops instead of the test crops")
    g.add_argument("--val_fraction", type=float, default=None,
                   help="validate on this seeded fraction of the step's train crops (MiB-CD: 0.1)")
    g.add_argument("--test_unseen", default=None, choices=["background", "ignore"],
                   help="test labels of classes not seen yet (default: background for MiB-CD's tasks, "
                        "ignore for MiCro's)")
    g.add_argument("--test_crops", default=None, choices=["all", "step"],
                   help="test crops: all, or those holding a class of the step (default: step for MiB-CD's "
                        "tasks, all for MiCro's)")
    g.add_argument("--crop_size", type=int, default=512, help="training crop size")
    _str2bool_flag(g, "--no_mask", help="at t > 0 old classes keep their labels in the training and validation "
                                        "labels instead of becoming background (MiB)")
    g.add_argument("--num_workers", role=BOOKKEEPING, type=int, default=None,
                   help="data loader workers per process (default: min(8, CPUs / processes on this machine))")

    g = parser.add_argument_group("method")
    g.add_argument("--method", role=Role(per_run=True), default="FT",
                   help=f"one of {', '.join(METHODS)}, case-insensitive; sets its presets (see below)")
    g.add_argument("--print_presets", role=BOOKKEEPING, action="store_true", default=False,
                   help="print the options each method's preset sets (only --method's when given) and exit")
    g.add_argument("--name", default=None, help="experiment name (default: the method name)")
    g.add_argument("--loss_kd", type=float, default=0.0, help="weight of output distillation (KD / UnKD)")
    g.add_argument("--loss_de", type=float, default=0.0, help="weight of ILT feature distillation")
    _str2bool_flag(g, "--unce", help="unbiased cross-entropy (MiB)")
    _str2bool_flag(g, "--unkd", help="unbiased knowledge distillation (MiB)")
    g.add_argument("--alpha", type=float, default=1.0, help="temperature factor on old logits in KD")
    _str2bool_flag(g, "--init_balanced", help="MiB classifier initialisation of new classes")
    _str2bool_flag(g, "--bce", help="sigmoid/BCE segmentation loss instead of (unbiased) cross-entropy (MiB)")
    _str2bool_flag(g, "--icarl", help="BCE classifier + iCaRL distillation (LWF-MC)")
    g.add_argument("--icarl_importance", type=float, default=1.0, help="weight of iCaRL distillation")
    _str2bool_flag(g, "--icarl_disjoint", help="with --icarl at t > 0: one BCE whose old-class targets are the old "
                                               "model's sigmoid outputs, instead of BCE + weighted distillation (MiB)")
    _str2bool_flag(g, "--icarl_bkg", help="with --icarl_disjoint: the background target comes from the labels, "
                                          "not from the old model (MiB)")
    g.add_argument("--regularizer", role=Role(step0="regularizer"),
                   default=None, choices=["ewc", "rw", "pi"], help="parameter regulariser")
    g.add_argument("--reg_importance", role=Role(step0="regularizer"),
                   type=float, default=1.0, help="regulariser weight (lambda)")
    g.add_argument("--reg_alpha", role=Role(step0="regularizer"),
                   type=float, default=0.9, help="EWC/RW running Fisher factor")
    _str2bool_flag(g, "--reg_no_normalize", role=Role(step0="regularizer"), help="do not min-max normalise importance")
    g.add_argument("--reg_iterations", role=Role(step0="regularizer"),
                   type=int, default=10, help="RW score update period (iterations)")
    _str2bool_flag(g, "--reg_update_after_step", role=Role(step0="regularizer"),
                   help="update PI/RW/EWC state after the optimiser step, pairing each gradient with its own "
                        "step's change (differs from MiB, which updates before it; see docs/fidelity.md)")
    g.add_argument("--cd_factor", role=Role(step0="cd_factor"), type=float, default=0.0,
                   help="rotation/flip invariance of features (MiB-CD); adds the term to any method")
    g.add_argument("--cd_factor_icl", type=float, default=0.0,
                   help="invariance w.r.t. the old model's features at t > 0 (MiB-CD)")
    _str2bool_flag(g, "--ewf", help="endpoints weight fusion at t > 0 on any method: old classifiers frozen, "
                                    "then the trained model fused with step t-1's (EWF)")
    g.add_argument("--ewf_alpha", type=float, default=None,
                   help="EWF's weight of the new model (default sqrt(new classes / all seen channels))")
    for cls in METHODS.values():
        known = set(map(id, parser._actions))
        cls.add_arguments(parser)
        for action in parser._actions:  # a method's own options: they count for it and its subclasses only
            if id(action) not in known:
                action.owner = cls

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=40, help="epochs per step (papers: 40)")
    g.add_argument("--batch_size", type=int, default=4, help="batch size PER PROCESS")
    g.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {default_lr(0):g} at step 0, {default_lr(1):g} after)")
    g.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help="sgd (Nesterov momentum, MiB) or adamw (MiB-CD)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight_decay", type=float, default=1e-4)
    g.add_argument("--lr_policy", default="poly", choices=["poly", "step", "cosine"],
                   help="per-iteration schedule; cosine anneals once over the step (MiB-CD)")
    g.add_argument("--lr_power", type=float, default=0.9, help="poly schedule power")
    g.add_argument("--lr_decay_step", type=int, default=5000, help="step policy: iterations per decay")
    g.add_argument("--lr_decay_factor", type=float, default=0.1, help="step policy: decay factor")
    _str2bool_flag(g, "--freeze", help="leave the backbone body out of the optimiser at every step; head and "
                                       "classifiers train (MiB)")
    _str2bool_flag(g, "--fix_bn", help="freeze the normalisation layers' affine parameters; their running "
                                       "statistics still update in training (MiB)")
    _str2bool_flag(g, "--fix_bn_strict", help="like --fix_bn, and keep the normalisation layers in eval mode so "
                                              "their running statistics stay fixed too (not MiB)")
    g.add_argument("--opt_level", default="O0", choices=["O0", "O1", "O2"],
                   help="O0 fp32 (paper); O1 fp16 autocast + GradScaler; O2 bf16 autocast")
    g.add_argument("--random_seed", role=Role(per_run=True), type=int, default=DEFAULT_SEED,
                   help=f"seed; any other than {DEFAULT_SEED} is appended to the run name as -s<seed>")
    _str2bool_flag(g, "--channels_last", help="channels-last memory format for model and inputs (faster "
                                              "convolutions on tensor-core GPUs)")
    _str2bool_flag(g, "--compile", help="torch.compile the training model (falls back, with a message, "
                                        "where no compiler is available)")

    g = parser.add_argument_group("model")
    g.add_argument("--backbone", role=Role(compatible=True),
                   default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    g.add_argument("--output_stride", role=Role(compatible=True), type=int, default=16, choices=[8, 16])
    g.add_argument("--norm_act", role=Role(compatible=True),
                   default="iabn_sync", choices=["iabn_sync", "iabn", "abn", "std"])
    g.add_argument("--no_pretrained", "--no-pretrained", dest="no_pretrained", action="store_true", default=False,
                   help="start from random weights instead of ImageNet")
    g.add_argument("--pretrained", default=None,
                   help="ImageNet weights (default pretrained/<backbone>_<norm_act>.pth.tar)")
    g.add_argument("--pooling_size", type=int, default=32,
                   help="eval-time ASPP image-pooling window (MiB's --pooling); global when the feature map is "
                        "no larger")

    g = parser.add_argument_group("checkpoints, testing and logging")
    _str2bool_flag(g, "--test", role=Role(kind="bookkeeping", per_run=True),
                   help="only test the saved model of --step (or --ckpt)")
    g.add_argument("--ckpt", role=Role(kind="bookkeeping", per_run=True),
                   default=None, help="checkpoint to test with --test (default: the step's own)")
    g.add_argument("--step_ckpt", role=Role(kind="source", per_run=True),
                   default=None, help="checkpoint to use as step t-1 (default: the step's own name)")
    g.add_argument("--checkpoint_dir", role=BOOKKEEPING, default="checkpoints", help="root of checkpoints/step/")
    g.add_argument("--results_dir", role=BOOKKEEPING, default="results", help="where the results CSV/JSON go")
    g.add_argument("--logdir", role=BOOKKEEPING, default="logs", help="TensorBoard root")
    g.add_argument("--val_interval", role=BOOKKEEPING,
                   type=int, default=1, help="validate every N epochs (monitoring only)")
    g.add_argument("--patience", type=int, default=0,
                   help="early stopping: stop after N epochs without a better validation mIoU and keep the "
                        "best epoch as the step checkpoint (0 = off; needs --val_fraction or --cross_val)")
    g.add_argument("--print_interval", role=BOOKKEEPING,
                   type=int, default=10, help="log training losses every N iterations")
    g.add_argument("--sample_num", role=BOOKKEEPING, type=int, default=4,
                   help="test crops shown as image | ground truth | prediction in TensorBoard (0: none)")
    _str2bool_flag(g, "--debug", help="tiny runs: 2 iterations per epoch and per evaluation")
    g.add_argument("--device", role=BOOKKEEPING, default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: the GPU of the local rank when GPUs are visible, else the CPU; it stops with an "
                        "error when this machine has GPUs that are hidden (CUDA_VISIBLE_DEVICES). "
                        "cpu: run on the CPU on purpose (default: auto)")
    _str2bool_flag(g, "--no_resume", role=BOOKKEEPING,
                   help="start the step over even if its last (resume) checkpoint exists")
    g.add_argument("--ckpt_interval", role=BOOKKEEPING, type=int, default=0,
                   help="also write the resume checkpoint every N iterations (0: only at the end of each epoch)")
    g.add_argument("--preempt_signals", role=BOOKKEEPING, default="TERM,USR1",
                   help="signals that make training stop at the next iteration (all ranks together), write the "
                        "resume checkpoint and exit with code 75; a SLURM batch job allowed to requeue is requeued "
                        "after USR1/USR2 (docs/clusters.md); empty: none")
    _str2bool_flag(g, "--allow_mismatch", role=BOOKKEEPING,
                   help="only warn when a loaded checkpoint was trained with another "
                                               "backbone/output_stride/norm_act/task/split/dataset")
    g.add_argument("--dist_timeout", role=BOOKKEEPING, type=float, default=300.0,
                   help="seconds a process waits for the others before the run fails (stalled rank)")
    g.add_argument("--local_rank", "--local-rank", role=Role(kind="bookkeeping", per_run=True),
                   dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch; torchrun uses the environment")
    for action in parser._actions:  # argparse prints no help line, hence no default, for help=None
        if action.help is None and action.option_strings and action.nargs != 0:
            action.help = ""
            if action.default not in (None, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"
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
    explicit = _explicit_options(argv)
    if opts.list_tasks:
        _prepare_tasks(opts)
        print("\n".join(tasks.describe_tasks(opts.dataset)))
        sys.exit(0)
    if opts.print_presets:
        print("method presets (each sets these options unless they are given on the command line):")
        print(format_presets([_method_class(opts.method).name] if "method" in explicit else None))
        sys.exit(0)
    method_cls = _method_class(opts.method)
    opts.method = method_cls.name
    for key, value in method_cls.presets.items():
        if key not in explicit:
            setattr(opts, key, value)
        elif value and not getattr(opts, key):
            print(f"warning: --{key} {getattr(opts, key)} turns off {method_cls.name}'s --{key} {value}: this run "
                  f"is not {method_cls.name} any more (name it with --name)", file=sys.stderr)
    return finalize(opts)


def _method_class(name: str):
    try:
        return get_method_class(name)
    except UserError as err:
        raise err.reworded(method=f"--method {name!r}", hint=did_you_mean(name, {**ALIASES, **{n: n for n in METHODS}})
                           ) from None


def _prepare_tasks(opts: argparse.Namespace) -> None:
    """--dataset (built in, or processed into --data_root) and the tasks of --task_file made known to tasks.py."""
    try:
        tasks.prepare(opts.dataset, opts.data_root, getattr(opts, "task_file", None))
    except UserError as err:
        if str(err).startswith("unknown dataset"):
            raise UserError(f"--dataset {opts.dataset}: {err}{did_you_mean(opts.dataset, tasks.DATASETS)}") from None
        raise


def finalize(opts: argparse.Namespace) -> argparse.Namespace:
    """Derived defaults and validation shared by every entry point."""
    if not hasattr(opts, "base_name"):  # finalize once: the seed goes into the name only once
        opts.base_name = opts.name or opts.method
        # Runs of other seeds never share checkpoints, logs or results rows (docs/robustness.md).
        opts.name = effective_name(opts.base_name, getattr(opts, "random_seed", DEFAULT_SEED))
    _prepare_tasks(opts)
    try:
        tasks.get_task_dict(opts.dataset, opts.task, opts.step)  # UserError for unknown task / step
    except UserError as err:
        known = list(tasks.task_names(opts.dataset))
        if opts.task in known:
            raise
        raise UserError(f"{err}{did_you_mean(opts.task, known)}") from None
    _finalize_protocol(opts)
    if opts.lr is None:  # the method's own learning rates (DFT*) or MiB's
        rates = get_method_class(opts.method).learning_rates
        opts.lr = rates[min(opts.step, 1)] if rates else default_lr(opts.step)
    for key, value in vars(opts).items():  # nan/inf pass argparse's float()
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{key} must be a finite number (got {value})")
    for key in ("epochs", "batch_size", "crop_size", "val_interval"):
        if getattr(opts, key) <= 0:
            raise UserError(f"--{key} must be positive (got {getattr(opts, key)})")
    if opts.lr <= 0:
        raise UserError(f"--lr must be positive (got {opts.lr})")
    if opts.pooling_size is not None and opts.pooling_size <= 0:
        raise UserError(f"--pooling_size must be positive (got {opts.pooling_size})")
    _check_range(opts, "momentum", 0.0, 1.0, "in (0, 1): SGD uses Nesterov momentum", low_open=True, high_open=True)
    _check_range(opts, "weight_decay", 0.0, math.inf, ">= 0")
    for key in ("num_workers", "ckpt_interval", "sample_num"):
        _check_range(opts, key, 0, math.inf, ">= 0")
    _check_range(opts, "dist_timeout", 0.0, math.inf, "positive (seconds)", low_open=True)
    if opts.lr_policy == "step" and opts.lr_decay_step <= 0:
        raise UserError(f"--lr_policy step needs a positive step size in iterations (got {opts.lr_decay_step}); "
                        f"set --lr_decay_step")
    get_method_class(opts.method).validate(method_options(opts))  # its own options, and which it cannot combine
    return opts


def _finalize_protocol(opts: argparse.Namespace) -> None:
    """Filter mode (--overlap is its alias for `overlap`) and split suffix, settled by the data's own rules
    (dataset.options.DataOptions) in the options' words; validation and early stopping."""
    mode = opts.filter_mode or ("overlap" if opts.overlap else None)
    try:
        data = data_options(opts)
    except UserError as err:
        raise err.reworded(overlap="--overlap", mode=f"--filter_mode {mode}",
                           fraction=f"--val_fraction {opts.val_fraction}") from None
    opts.filter_mode, opts.overlap, opts.split_suffix = data.filter_mode, data.overlap, data.split_suffix
    fraction = opts.val_fraction
    patience = getattr(opts, "patience", 0) or 0
    if patience < 0:
        raise UserError(f"--patience must be 0 (off) or a number of epochs (got {patience})")
    if patience and fraction is None and not opts.cross_val:
        raise UserError("--patience selects the step checkpoint on validation: give --val_fraction F (MiB-CD: 0.1) "
                        "or --cross_val so that it is not chosen on test crops")


def run_id(opts: argparse.Namespace) -> RunId:
    """The RunId of finalized options: every path and tag of the run derives from it."""
    return RunId(opts.dataset, opts.task, opts.split_suffix, opts.base_name, opts.random_seed)


def _check_range(opts, key, low, high, wording, low_open=False, high_open=False):
    value = getattr(opts, key, None)
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise UserError(f"--{key} must be {wording} (got {value})")


# ---------------------------------------------------------------- option roles and the records built from them
# Values recorded with the options that no option sets directly (argparser and run.py derive them).
DERIVED_ROLES = {"base_name": Role(), "split_suffix": Role(), "in_channels": Role(),
                 "command_line": BOOKKEEPING}


@functools.lru_cache(maxsize=1)
def _reference_parser() -> argparse.ArgumentParser:
    return build_parser()


def _option_actions() -> list[argparse.Action]:
    return [a for a in _reference_parser()._actions if a.option_strings and a.dest != "help"]


def option_roles() -> dict[str, Role]:
    """{option or recorded value: its Role}, as declared where each option is defined."""
    return {**{a.dest: a.role for a in _option_actions()}, **DERIVED_ROLES}


def options_of_kind(*kinds: str) -> frozenset[str]:
    """Names of the options (and recorded values) of the given Role kinds."""
    return frozenset(k for k, role in option_roles().items() if role.kind in kinds)


def compatibility_options() -> list[tuple[str, str]]:
    """(option, flag) of the options a loaded checkpoint must share with the run."""
    return [(a.dest, a.option_strings[0]) for a in _option_actions() if a.role.compatible]


def per_run_flags() -> tuple[str, ...]:
    """Every spelling of the options a campaign sets for each run."""
    return tuple(flag for a in _option_actions() if a.role.per_run for flag in a.option_strings)


def method_options(opts: argparse.Namespace) -> MethodOptions:
    """The options --method's class reads: the shared method options, its own classes' options (in their
    class hierarchy), step, random_seed and lr; with the step-0 terms their roles declare."""
    method_cls = get_method_class(opts.method)
    values, step0 = {}, {}
    for action in _option_actions():
        owner = getattr(action, "owner", None)
        if owner is None and action.container.title != "method":
            continue
        if owner is not None and not issubclass(method_cls, owner):
            continue
        values[action.dest] = getattr(opts, action.dest)
        if action.role.step0:
            step0.setdefault(action.role.step0, []).append(action.dest)
    return MethodOptions({k: tuple(v) for k, v in step0.items()}, **values, step=opts.step,
                         random_seed=opts.random_seed, lr=opts.lr)


def _record(cls, opts: argparse.Namespace, **extra):
    return cls(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(cls) if f.name not in extra}, **extra)


def data_options(opts: argparse.Namespace) -> DataOptions:
    return _record(DataOptions, opts)


def model_options(opts: argparse.Namespace, in_channels: int = 3) -> ModelOptions:
    return _record(ModelOptions, opts, in_channels=in_channels)


def optimizer_options(opts: argparse.Namespace) -> OptimizerOptions:
    return _record(OptimizerOptions, opts)


def train_options(opts: argparse.Namespace) -> TrainOptions:
    return _record(TrainOptions, opts)


@dataclass(frozen=True)
class OptionRecords:
    """Every part's options of one run, built once from the command line: each part gets its own."""

    id: RunId
    data: DataOptions
    model: ModelOptions
    optimizer: OptimizerOptions
    train: TrainOptions
    method: MethodOptions


def option_records(opts: argparse.Namespace, in_channels: int = 3) -> OptionRecords:
    """The run's option records; `in_channels`: the input bands of the data (meta.json)."""
    return OptionRecords(run_id(opts), data_options(opts), model_options(opts, in_channels), optimizer_options(opts),
                         train_options(opts), method_options(opts))
