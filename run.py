"""Train and test one incremental step (or only test it with --test).

    python run.py --dataset vaihingen --task 4-1 --step 0 --method MiB ...
    torchrun --nproc_per_node=2 run.py ...          (or python -m torch.distributed.launch ...)
    srun --ntasks-per-node=2 python run.py ...       (SLURM: one process group from SLURM's variables)

It assembles the step: options -> data -> models -> method -> Trainer.fit (train.py) -> save -> test -> report.
"""
from __future__ import annotations

import os
import random
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import tasks
from argparser import compatibility_options, default_lr, option_records, options_of_kind, parse_args, run_id
from dataset.layout import load_meta
from dataset.loaders import input_normalizer, make_loaders
from dataset.step_datasets import get_datasets
from methods import SetupContext, get_method_class
from models import norm_act_factory
from modules import check_checkpoint_bands, check_compatible, load_model_weights, make_model
from train import ResumeCheckpoint, Trainer, batches_per_pass, final_test, training_model
from utils.checkpoint import file_sha256, load_checkpoint, prepare_outputs, save_checkpoint
from utils.distributed import barrier, cleanup, init_distributed, relaunch_command
from utils.early_stopping import EarlyStopping
from utils.errors import UserError, exit_on_user_error
from utils.optimizer import make_optimizer
from utils.preemption import Preemption, parse_signals
from utils.reporting.logger import Logger
from utils.reporting.step import StepReport
from utils.scheduler import build_scheduler


@dataclass
class Step:
    """What one step's run holds besides its models: the command line's options (read here only), each part's
    option records (argparser.OptionRecords), the step checkpoint it writes or tests."""

    opts: object
    o: object
    dist: object
    classes: list
    meta: dict
    logger: Logger
    report: StepReport
    checkpoint: Path


@exit_on_user_error
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    opts.command_line = argv
    signals = parse_signals(opts.preempt_signals) if not opts.test else []
    try:
        dist = init_distributed(opts.local_rank, opts.device, timeout_s=opts.dist_timeout)
    except UserError as err:
        raise err.reworded(cpu="pass --device cpu") from None
    preemption = Preemption(signals, dist.distributed, dist.control_group).install()
    try:
        return run_step(opts, dist, preemption)
    finally:
        preemption.uninstall()
        cleanup()


def run_step(opts, dist, preemption=None) -> dict:
    random.seed(opts.random_seed)
    np.random.seed(opts.random_seed)  # noqa: NPY002 - code that draws from numpy's global state gets the seed too
    torch.manual_seed(opts.random_seed)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick the fastest kernels
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    meta = load_meta(opts.data_root, opts.dataset)
    opts.in_channels = int(meta.get("num_channels", 3))  # the model's input bands follow the data
    o = option_records(opts, opts.in_channels)
    rid = o.id
    loaded = (opts.ckpt or rid.checkpoint(opts.checkpoint_dir, opts.step)) if opts.test else \
        previous_checkpoint_path(opts) if opts.step else None
    try:  # before anything is written
        check_checkpoint_bands(loaded, opts.in_channels, f"{opts.dataset} under --data_root {opts.data_root} "
                                                         f"({meta.get('channels')})")
    except UserError as err:
        raise err.reworded(channels="--channels") from None  # process_data's option making the bands
    # --test logs into its own run below the step's, never into the training run's folder.
    logdir = rid.log_dir(opts.logdir, opts.step, test=opts.test)
    if dist.rank == 0:  # before anything runs
        ckpt, last = rid.checkpoint(opts.checkpoint_dir, opts.step), rid.last_checkpoint(opts.checkpoint_dir, opts.step)
        results, folders = rid.results(opts.results_dir), {"--results_dir": opts.results_dir, "--logdir": logdir}
        prepare_outputs(folders if opts.test else {"--checkpoint_dir": ckpt.parent, **folders},
                        [ckpt, last, results, results.with_suffix(".json")])
    logger = Logger(logdir, rank=dist.rank)
    report = StepReport(vars(opts), dist, logger, meta, tasks.channel_names(opts.dataset, opts.task),
                        tasks.class_names(opts.dataset), tasks.channel_to_class(opts.dataset, opts.task))
    report.started(rid, classes)
    # after init_distributed: iabn_sync synchronises over the process group when there is one (models.norm_act)
    logger.info(f"normalisation --norm_act {opts.norm_act}: {norm_act_factory(opts.norm_act).implementation}")
    step = Step(opts, o, dist, classes, meta, logger, report, rid.checkpoint(opts.checkpoint_dir, opts.step))
    return run_test(step) if opts.test else run_training(step, preemption)


def run_training(step: Step, preemption) -> dict:
    """Train the step (Trainer.fit), write its checkpoint, test it and report; returns the test's results."""
    opts, o, dist, logger, classes = step.opts, step.o, step.dist, step.logger, step.classes
    # The method from its options alone (argparser ran its `validate`); its per-step state comes in `setup`.
    # A missing or incompatible step t-1 checkpoint is reported before anything else is read.
    method = get_method_class(opts.method)(o.method, opts.step, classes)
    previous = previous_checkpoint(opts, logger) if opts.step > 0 else None
    # 1. data and loaders
    train_loader, val_loader, test_loader = make_loaders(o.data, dist, *get_datasets(o.data))
    # 2. model (step t-1 weights at t > 0) and old model
    model = build_model(step, classes)
    old_model, previous_state, lineage = load_previous_step(step, model, method, previous) if previous else (None,) * 3
    logger.info(f"{len(train_loader.dataset)} training crops, {len(val_loader.dataset) if val_loader else 0} "
                f"validation, {len(test_loader.dataset)} test")
    if o.optimizer.freeze and not o.method.regularizer:
        # MiB's --freeze keeps the body out of the optimiser at every step (below); only a regulariser's
        # running state reads its gradient, so without one it is not computed
        model.freeze_body()
    if opts.fix_bn or opts.fix_bn_strict:
        model.fix_bn(keep_eval=opts.fix_bn_strict)
    # 3. the method's per-step state
    input_norm = input_normalizer(step.meta, o.train.channels_last)
    method.setup(SetupContext(model=model, old_model=old_model, train_loader=train_loader,
                              previous_state=previous_state, dist=dist, input_norm=input_norm,
                              previous_model_state=previous[1]["model"] if previous is not None else None,
                              max_batches=batches_per_pass(train_loader, o.train.debug)))
    # 4. train
    optimizer = make_optimizer(model.optimizer_parameters(freeze_body=o.optimizer.freeze), o.optimizer, dist.device)
    iters = o.train.epochs * batches_per_pass(train_loader, o.train.debug)
    scheduler = build_scheduler(o.optimizer.lr_policy, optimizer, max_iters=iters, power=o.optimizer.lr_power,
                                step_size=o.optimizer.lr_decay_step, gamma=o.optimizer.lr_decay_factor)
    # what may differ when the same command resumes: the options argparser declares bookkeeping
    resume = ResumeCheckpoint(o.id.last_checkpoint(opts.checkpoint_dir, opts.step), step.report.manifest,
                              vars(opts), options_of_kind("bookkeeping"), no_resume=opts.no_resume)
    if dist.rank == 0:
        resume.check_room(model, method)
    trainer = Trainer(training_model(model, dist, o.train.compile), old_model, method, optimizer, scheduler,
                      o.train, dist, logger, input_norm=input_norm, preemption=preemption)
    stopper = EarlyStopping(o.train.patience) if o.train.patience else None
    fitted = trainer.fit(train_loader, val_loader, sum(classes), stopper, resume)
    finished = method.finish_training(model)  # e.g. EWF's weight fusion: before the checkpoint and the test
    if finished:
        logger.info("after training: " + ", ".join(f"{k} {v:g}" for k, v in finished.items()))
    # 5. save: rank 0 writes the step checkpoint, then its results row marked pending until the test writes it
    trainer.check_finite_model()
    record = None
    if dist.rank == 0:
        save_checkpoint(step.checkpoint, trainer.step_checkpoint(fitted, lineage, step.report.manifest, vars(opts)))
        record = step.report.trained(o.id, step.checkpoint, lineage)
    barrier()
    # 6. test and report
    results = test_and_report(step, model, test_loader, record, o.id)
    if dist.rank == 0:
        resume.remove()
    logger.close()
    return results


def run_test(step: Step) -> dict:
    """--test: the step's own checkpoint refreshes the step's row; any other --ckpt gets its own results
    file, so a test never replaces the training row of another model."""
    opts, dist, logger = step.opts, step.dist, step.logger
    model = build_model(step, step.classes)
    path = Path(opts.ckpt or step.checkpoint)
    if not path.is_file():
        raise UserError(f"--test needs the checkpoint of step {opts.step}: {path} not found; "
                        f"train the step first or pass --ckpt")
    checkpoint = load_checkpoint(path)
    check_compatible(vars(opts), checkpoint, path, compatibility_options(), logger, opts.allow_mismatch)
    load_model_weights(model, checkpoint, path)
    logger.info(f"testing {path}")
    test_loader = make_loaders(step.o.data, dist, None, None, get_datasets(step.o.data)[2])[2]
    own = path.resolve() == step.checkpoint.resolve() if step.checkpoint.exists() else False
    record = step.report.record("test", path, checkpoint.get("lineage"))
    results = test_and_report(step, model, test_loader, record, step.o.id if own else step.o.id.testing(path))
    logger.close()
    return results


def test_and_report(step: Step, model, test_loader, record: dict | None, rid) -> dict:
    """The final test of the unwrapped model (train.final_test), reported in the results row of `rid`."""
    o, input_norm = step.o, input_normalizer(step.meta, step.o.train.channels_last)
    results, samples = final_test(model, test_loader, step.classes, step.dist.device, o.train, input_norm)
    results["protocol"] = o.data.protocol()  # label convention of the test (recorded in the JSON)
    if step.dist.rank == 0:
        step.report.tested(rid, results, samples, sum(step.classes), record)
    return results


def build_model(step: Step, classes, no_pretrained=None):
    """The step's model on the device, in the chosen memory format, with the classifiers the method
    allocates for `classes` (Method.model_classes). Weights come from ImageNet only at step 0 training;
    otherwise from step checkpoints."""
    opts, o = step.opts, step.o
    if no_pretrained is None:
        no_pretrained = not (opts.step == 0 and not opts.test and not o.model.no_pretrained)
    task_classes = tasks.get_per_task_classes(opts.dataset, opts.task, tasks.num_steps(opts.dataset, opts.task) - 1)
    classes = get_method_class(opts.method).model_classes(classes, task_classes)
    model = make_model(replace(o.model, no_pretrained=no_pretrained), classes)
    memory_format = torch.channels_last if o.train.channels_last else torch.contiguous_format
    return model.to(step.dist.device).to(memory_format=memory_format)


def previous_checkpoint_path(opts):
    """The step t-1 checkpoint a step t > 0 starts from: --step_ckpt, else the run's own of step t-1."""
    return opts.step_ckpt or run_id(opts).checkpoint(opts.checkpoint_dir, opts.step - 1)


def previous_checkpoint(opts, logger) -> tuple[str, dict]:
    """t > 0: (path, contents) of the step t-1 checkpoint, checked against this run's options; missing, the
    error gives the command that trains it."""
    path = previous_checkpoint_path(opts)
    if not os.path.isfile(path):
        command = [*relaunch_command(opts.command_line, drop=("--step", "--lr")),
                   "--step", str(opts.step - 1), "--lr", f"{default_lr(opts.step - 1):g}"]
        raise UserError(f"step {opts.step - 1} checkpoint {path} not found; train it first "
                        f"({shlex.join(command)}) or pass --step_ckpt")
    checkpoint = load_checkpoint(path)
    check_compatible(vars(opts), checkpoint, path, compatibility_options(), logger, opts.allow_mismatch)
    return path, checkpoint


def load_previous_step(step: Step, model, method, previous):
    """t > 0: step t-1's weights (`previous`: path and contents) into `model` (then the method's
    `init_new_model`), the frozen old model when the method runs it, the method state step t-1 handed on,
    and the lineage record."""
    prev_path, prev = previous
    load_model_weights(model, prev, prev_path, strict=False)
    method.init_new_model(model)
    old_model = None
    if method.uses_old_model:
        old_model = build_model(step, step.classes[:-1], no_pretrained=True)
        load_model_weights(old_model, prev, prev_path)
        old_model.eval().requires_grad_(False)
    lineage = {"path": str(prev_path), "sha256": file_sha256(prev_path) if step.dist.rank == 0 else None}
    step.logger.info(f"loaded step {step.opts.step - 1} from {prev_path}")
    return old_model, prev.get("method_state"), lineage


if __name__ == "__main__":
    main()
