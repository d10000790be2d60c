"""Train and test one incremental step (or only test it with --test).

    python run.py --dataset vaihingen --task 4-1 --step 0 --method MiB ...
    torchrun --nproc_per_node=2 run.py ...          (or python -m torch.distributed.launch ...)
    srun --ntasks-per-node=2 python run.py ...       (SLURM: one process group from SLURM's variables)
"""
from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import tasks
from argparser import data_options, default_lr, parse_args, run_id
from dataset.incremental import SeededSampler
from dataset.layout import load_meta
from dataset.step_datasets import get_datasets
from dataset.transforms import BatchNormalize
from methods import SetupContext, get_method_class
from models import norm_act_factory
from modules import check_checkpoint_bands, classifier_prefix, make_model
from train import AMP_LEVELS, Trainer, batches_per_pass, compile_model, evaluate
from utils.atomic_files import remove_stale_temps
from utils.checkpoint import (
    capture_rng_state,
    check_free_space,
    check_writable,
    file_sha256,
    load_checkpoint,
    loader_generator,
    non_finite_tensors,
    restore_rng_state,
    save_checkpoint,
    tensor_bytes,
)
from utils.distributed import (
    DistributedEvalSampler,
    all_gather_object,
    available_cpus,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    local_world_size,
    relaunch_command,
)
from utils.early_stopping import EarlyStopping
from utils.errors import UserError, exit_on_user_error
from utils.metrics import format_table
from utils.optimizer import make_optimizer
from utils.preemption import PREEMPTED_EXIT_CODE, Preempted, Preemption, parse_signals, requeue_slurm_job
from utils.reporting.logger import Logger, write_task_curve
from utils.reporting.results import (
    POOLING_KEYS,
    environment_manifest,
    mark_pending,
    read_results,
    write_results,
)
from utils.scheduler import build_scheduler

REPO_ROOT = Path(__file__).resolve().parent


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - code that draws from numpy's global state gets the seed too
    torch.manual_seed(seed)


def default_num_workers(dist) -> int:
    """min(8, CPUs available / processes on this machine), at least 1."""
    return max(1, min(8, available_cpus() // max(local_world_size(dist.world_size), 1)))


def seed_worker(worker_id: int) -> None:
    """numpy and random in a loader worker follow the worker's torch seed (set from the loader's seeded
    generator). Training augmentation draws from torch seeded per item (dataset.SeededSampler) instead."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)  # noqa: NPY002 - transforms may draw from the global state
    random.seed(seed)


def make_loaders(opts, dist, train_set, val_set, test_set):
    """Shuffled (distributed) training loader; evaluation loaders that see every crop exactly once.

    Workers: --num_workers, or min(8, CPUs / processes); on CUDA pinned memory; workers persist
    across epochs; each worker keeps 4 batches in flight (items are cheap uint8 crops)."""
    pin = dist.device.type == "cuda"
    workers = opts.num_workers if getattr(opts, "num_workers", None) is not None else default_num_workers(dist)
    # Worker seeds only: what a training item looks like comes from SeededSampler's seeds, never from these.
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                  generator=torch.Generator().manual_seed(opts.random_seed))
    if workers > 0:
        common.update(prefetch_factor=4, worker_init_fn=seed_worker)

    def eval_loader(ds):
        if ds is None:
            return None
        sampler = (DistributedEvalSampler(ds, dist.world_size, dist.rank) if dist.distributed
                   else SequentialSampler(ds))
        return DataLoader(ds, batch_size=opts.batch_size, sampler=sampler, **common)

    train_loader = None
    if train_set is not None:
        # The training order and every item's augmentation follow the seed and the epoch alone (and the rank).
        rank_seed = np.random.SeedSequence([opts.random_seed, dist.rank]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(rank_seed))
        order = (DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=opts.random_seed)
                 if dist.distributed else RandomSampler(train_set, generator=generator))
        sampler = SeededSampler(order, generator)
        if len(train_set) < opts.batch_size * dist.world_size:
            raise UserError(
                f"step {opts.step} has {len(train_set)} training crops, fewer than one batch "
                f"({opts.batch_size} x {dist.world_size} processes); lower --batch_size"
            )
        train_loader = DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler, drop_last=True, **common)
    return train_loader, eval_loader(val_set), eval_loader(test_set)


def input_normalizer(opts, meta) -> BatchNormalize:
    return BatchNormalize(meta["mean"], meta["std"], channels_last=getattr(opts, "channels_last", False))


def load_model_weights(model, checkpoint: dict, path: str, strict: bool = True) -> None:
    """Load a step checkpoint into `model`; a class-count mismatch is the user's error."""
    state = checkpoint.get("model")
    if state is None:
        raise UserError(f"{path} is not a step checkpoint of this framework (no 'model' entry)")
    expected = list(model.classes)
    saved = list(checkpoint.get("classes", []))
    if strict and saved != expected:
        raise UserError(f"{path} holds a model with classes per step {saved}, but this run needs {expected}; "
                        f"check --task/--step/--dataset or pass the right --ckpt")
    if not strict and saved != expected[: len(saved)]:
        raise UserError(f"{path} holds a model with classes per step {saved}, but step {len(expected) - 1} "
                        f"needs {expected[:-1]} before it; check --task/--dataset or --step_ckpt")
    own = model.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong_shape:
        k = wrong_shape[0]
        raise UserError(f"{path} does not match the model built from the options (--backbone, --output_stride?): "
                        f"{k} has shape {tuple(state[k].shape)} there, {tuple(own[k].shape)} here")
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_classifier = classifier_prefix(len(expected) - 1)
    missing = [k for k in missing if strict or not k.startswith(new_classifier)]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model built from the options (--backbone, --output_stride, "
                        f"--norm_act?): missing {missing[:3]}, unexpected {unexpected[:3]}")


def previous_checkpoint_path(opts):
    """The step t-1 checkpoint a step t > 0 starts from: --step_ckpt, else the run's own of step t-1."""
    return opts.step_ckpt or run_id(opts).checkpoint(opts.checkpoint_dir, opts.step - 1)


def previous_checkpoint(opts) -> tuple[str, dict]:
    path = previous_checkpoint_path(opts)
    if not os.path.isfile(path):
        argv = _drop_options(opts.command_line, ("--step", "--lr"))
        previous = ["--step", str(opts.step - 1), "--lr", f"{default_lr(opts.step - 1):g}"]
        raise UserError(f"step {opts.step - 1} checkpoint {path} not found; train it first "
                        f"({shlex.join(relaunch_command(argv + previous))}) or pass --step_ckpt")
    return path, load_checkpoint(path)


def _drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """The command line without the given options and their values."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(n + "=" for n in names)):
            kept.append(arg)
    return kept


# Options stored in a checkpoint that the loading run must share (label, option).
COMPATIBILITY = (("backbone", "--backbone"), ("output_stride", "--output_stride"), ("norm_act", "--norm_act"),
                 ("dataset", "--dataset"), ("task", "--task"),
                 ("overlap", "--overlap"), ("filter_mode", "--filter_mode"))
# In-place ABN with and without synchronisation: the same parameters and the same function.
_SAME_NORM = {"iabn_sync": "iabn"}


def check_compatible(opts, checkpoint: dict, path, meta: dict, logger) -> None:
    """The backbone, output stride, norm_act, dataset, task and split stored in `checkpoint` must be this
    run's; a mismatch is a UserError naming both values (a warning with --allow_mismatch). Checkpoints
    without stored options are not checked. Input bands are checked earlier, by check_checkpoint_bands."""
    saved = dict(checkpoint.get("opts") or {})
    if not saved:
        return
    ours = vars(opts)
    for key, label in COMPATIBILITY:
        theirs, mine = saved.get(key), ours.get(key)
        if theirs is None:
            continue
        if key == "norm_act":
            theirs, mine = _SAME_NORM.get(theirs, theirs), _SAME_NORM.get(mine, mine)
        if theirs != mine:
            message = (f"{path} was trained with {label} {saved.get(key)} but this run has {label} {ours.get(key)}")
            if not opts.allow_mismatch:
                raise UserError(f"{message}; use the same options, another checkpoint, or --allow_mismatch "
                                f"if this is on purpose")
            logger.info(f"warning: {message} (--allow_mismatch)")


def git_commit() -> str | None:
    """The commit of the code that runs, when it is a git checkout (None otherwise)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def manifest(opts, dist) -> dict:
    """The run's reproducibility manifest (utils.reporting.results.environment_manifest)."""
    return environment_manifest(dist.device, dist.world_size, dist.local_world_size, dist.nodes, dist.launcher,
                                vars(opts))


def run_record(opts, dist, kind: str, checkpoint: dict, previous: dict | None) -> dict:
    """What a results row records besides the numbers (utils/reporting/results.py)."""
    return {"kind": kind, "seed": opts.random_seed, "world_size": dist.world_size,
            "effective_batch_size": opts.batch_size * dist.world_size, "git_commit": git_commit(),
            "debug": bool(opts.debug), "checkpoint": checkpoint, "previous_checkpoint": previous,
            "manifest": manifest(opts, dist)}


def test_and_report(model, opts, dist, test_loader, classes, logger, meta, record: dict, rid) -> dict:
    """Final test of the (unwrapped) model on every test crop (all seen classes) -> console, TensorBoard,
    results CSV/JSON."""
    # channels: 0 background, then the classes in task order (tasks.py); old = step 0's, new = later
    num_seen = sum(classes)
    metrics, samples = evaluate(model, test_loader, num_seen, dist.device, input_norm=input_normalizer(opts, meta),
                                amp_dtype=AMP_LEVELS[opts.opt_level][0], sample_num=opts.sample_num,
                                max_batches=batches_per_pass(test_loader, opts.debug))
    results = metrics.results(old_classes=list(range(classes[0])), new_classes=list(range(classes[0], num_seen)))
    results["protocol"] = data_options(opts).protocol()  # label convention of the test (recorded in the JSON)
    all_names = tasks.channel_names(opts.dataset, opts.task)
    names = all_names[:num_seen]
    if dist.rank == 0:
        logger.add_results(results, opts.step, names)
        if samples:
            images, labels, preds = samples
            to_class = torch.from_numpy(tasks.channel_to_class(opts.dataset, opts.task)).long()  # for the palette
            logger.add_prediction_figure("test/predictions", images, to_class[labels], to_class[preds],
                                         meta["mean"], meta["std"], opts.step, tasks.class_names(opts.dataset),
                                         meta.get("palette"))
        protocol = results["protocol"]
        logger.info(f"test of step {opts.step} ({rid.tag}, {opts.name}; {protocol['test_crops']} test crops, "
                    f"unseen classes -> {protocol['test_unseen']}):\n{format_table(results, names)}")
        path = write_results(rid.results(opts.results_dir), opts.step, results, all_names, range(num_seen),
                             vars(opts), record=record)
        logger.info(f"results row of step {opts.step} written to {path}")
        # One run per task and name: mIoU old/new/all against the step, rebuilt from the results file.
        write_task_curve(rid.task_curve_dir(opts.logdir), read_results(path))
    return results


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


def check_outputs(opts, logdir, ckpt_path, last_path) -> None:
    """Before anything runs: every output folder writable; temp files of killed saves removed."""
    if not opts.test:
        check_writable(ckpt_path.parent, "--checkpoint_dir")
    check_writable(opts.results_dir, "--results_dir")
    check_writable(logdir, "--logdir")
    results = run_id(opts).results(opts.results_dir)
    removed = remove_stale_temps([ckpt_path, last_path, results, results.with_suffix(".json")])
    if removed:
        print(f"removed {len(removed)} temporary file(s) of interrupted saves: {', '.join(map(str, removed))}",
              flush=True)


def run_step(opts, dist, preemption=None) -> dict:
    seed_everything(opts.random_seed)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick the fastest kernels
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    meta = load_meta(opts.data_root, opts.dataset)
    opts.in_channels = int(meta.get("num_channels", 3))  # the model's input bands follow the data
    rid = run_id(opts)
    ckpt_path = rid.checkpoint(opts.checkpoint_dir, opts.step)
    last_path = rid.last_checkpoint(opts.checkpoint_dir, opts.step)
    loaded = (opts.ckpt or ckpt_path) if opts.test else previous_checkpoint_path(opts) if opts.step else None
    try:  # before anything is written
        check_checkpoint_bands(loaded, opts.in_channels, f"{opts.dataset} under --data_root {opts.data_root} "
                                                         f"({meta.get('channels')})")
    except UserError as err:
        raise err.reworded(channels="--channels") from None  # process_data's option making the bands
    # --test logs into its own run below the step's, never into the training run's folder.
    logdir = rid.log_dir(opts.logdir, opts.step, test=opts.test)
    if dist.rank == 0:
        check_outputs(opts, logdir, ckpt_path, last_path)
    logger = Logger(logdir, rank=dist.rank)
    logger.info(f"{'test' if opts.test else 'train'} step {opts.step} of {rid.tag} with {opts.method} "
                f"({opts.name}, seed {opts.random_seed}); classes per step {classes}; {dist.world_size} process(es) "
                f"on {dist.device}"
                + (f" ({torch.get_num_threads()} threads each)" if dist.device.type == "cpu" else ""))
    if dist.launcher == "srun" and dist.distributed:
        logger.info(f"launched by srun: {dist.world_size} tasks on {dist.nodes} node(s) ({dist.local_world_size} on "
                    f"this one) join one process group at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                    f"(the first host of the job's nodes, a port from the job id)")
    # after init_distributed: iabn_sync synchronises over the process group when there is one (models.norm_act)
    logger.info(f"normalisation --norm_act {opts.norm_act}: {norm_act_factory(opts.norm_act).implementation}")

    if opts.test:
        return run_test(opts, dist, build_model(opts, dist, classes), classes, meta, logger, ckpt_path)

    # The method from the options alone (argparser checked them with its `validate`); its per-step state
    # comes in `setup` below. A missing or incompatible step t-1 checkpoint is reported before anything else
    # is read.
    method = get_method_class(opts.method)(opts, opts.step, classes)
    previous = read_previous_step(opts, meta, logger) if opts.step > 0 else None
    # 1. data and loaders
    train_loader, val_loader, test_loader = load_data(opts, dist)
    # 2. model (step t-1 weights at t > 0) and old model
    model = build_model(opts, dist, classes)
    old_model, previous_state, lineage = None, None, None
    if previous is not None:
        old_model, previous_state, lineage = load_previous_step(opts, dist, model, method, classes, previous, logger)
    logger.info(f"{len(train_loader.dataset)} training crops, {len(val_loader.dataset) if val_loader else 0} "
                f"validation, {len(test_loader.dataset)} test")
    if opts.freeze and not opts.regularizer:
        # MiB's --freeze keeps the body out of the optimiser at every step (below); only a regulariser's
        # running state reads its gradient, so without one it is not computed
        model.freeze_body()
    if opts.fix_bn or opts.fix_bn_strict:
        model.fix_bn(keep_eval=opts.fix_bn_strict)
    # 3. the method's per-step state
    input_norm = input_normalizer(opts, meta)
    method.setup(SetupContext(model=model, old_model=old_model, train_loader=train_loader,
                              previous_state=previous_state, dist=dist, input_norm=input_norm,
                              previous_model_state=previous[1]["model"] if previous is not None else None,
                              max_batches=batches_per_pass(train_loader, opts.debug)))
    # 4. train
    params = model.optimizer_parameters(freeze_body=opts.freeze)
    optimizer = make_optimizer(params, opts, dist.device)
    iters_per_epoch = batches_per_pass(train_loader, opts.debug)
    scheduler = build_scheduler(opts.lr_policy, optimizer, max_iters=opts.epochs * iters_per_epoch,
                                power=opts.lr_power, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor)
    if dist.rank == 0:
        # room for the resume checkpoint (model, momentum, method state) and its temp copy while replaced
        estimate = 2 * tensor_bytes(model.state_dict()) + tensor_bytes(method.state_dict())
        check_free_space(ckpt_path.parent, 2 * estimate, "a checkpoint of this model")
    train_model = model
    if dist.distributed:
        device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if opts.compile:
        train_model = compile_model(train_model, dist.device)
    trainer = Trainer(train_model, old_model, method, optimizer, scheduler, opts, dist, logger, input_norm=input_norm)
    trainer.preemption = preemption
    stopper = EarlyStopping(opts.patience) if opts.patience else None
    resume = Resume(opts, dist, trainer, model, method, train_loader, last_path, logger, stopper)
    try:
        epochs_run = train_epochs(opts, trainer, model, train_loader, val_loader, sum(classes), resume, stopper,
                                  logger)
    except Preempted as stop:
        stop_for_preemption(opts, dist, preemption, stop, last_path, logger)
    finished = method.finish_training(model)  # e.g. EWF's weight fusion: before the checkpoint and the test
    if finished:
        logger.info("after training: " + ", ".join(f"{k} {v:g}" for k, v in finished.items()))

    # 5. save
    check_finite_model(model, trainer)
    record = None
    if dist.rank == 0:
        record = save_step(opts, dist, ckpt_path, model, optimizer, scheduler, method, classes, lineage, stopper,
                           epochs_run, logger)
    barrier()
    # 6. test
    results = test_and_report(model, opts, dist, test_loader, classes, logger, meta, record, run_id(opts))
    if dist.rank == 0:
        resume.remove()
    logger.close()
    return results


def load_data(opts, dist, test_only: bool = False):
    """The step's loaders (train, validation, test); for --test only the test loader (the others None)."""
    train_set, val_set, test_set = get_datasets(data_options(opts))
    if test_only:
        return make_loaders(opts, dist, None, None, test_set)
    return make_loaders(opts, dist, train_set, val_set, test_set)


def build_model(opts, dist, classes, no_pretrained=None):
    """The step's model on the device, in the chosen memory format, with the classifiers the method
    allocates for `classes` (Method.model_classes). Weights come from ImageNet only at step 0 training;
    otherwise from step checkpoints."""
    if no_pretrained is None:
        no_pretrained = not (opts.step == 0 and not opts.test and not opts.no_pretrained)
    task_classes = tasks.get_per_task_classes(opts.dataset, opts.task, tasks.num_steps(opts.dataset, opts.task) - 1)
    classes = get_method_class(opts.method).model_classes(classes, task_classes)
    model = make_model(_with(opts, no_pretrained=no_pretrained), classes)
    memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
    return model.to(dist.device).to(memory_format=memory_format)


def read_previous_step(opts, meta, logger) -> tuple[str, dict]:
    """t > 0: (path, contents) of the step t-1 checkpoint, checked against this run's options."""
    prev_path, prev = previous_checkpoint(opts)
    check_compatible(opts, prev, prev_path, meta, logger)
    return prev_path, prev


def load_previous_step(opts, dist, model, method, classes, previous, logger):
    """t > 0: step t-1's weights (`previous`: path and contents) into `model` (then the method's
    `init_new_model`), the frozen old model when the method runs it, the method state step t-1 handed on,
    and the lineage record."""
    prev_path, prev = previous
    load_model_weights(model, prev, prev_path, strict=False)
    method.init_new_model(model)
    old_model = None
    if method.uses_old_model:
        old_model = build_model(opts, dist, classes[:-1], no_pretrained=True)
        load_model_weights(old_model, prev, prev_path)
        old_model.eval()
        old_model.requires_grad_(False)
    lineage = {"path": str(prev_path), "sha256": file_sha256(prev_path) if dist.rank == 0 else None}
    logger.info(f"loaded step {opts.step - 1} from {prev_path}")
    return old_model, prev.get("method_state"), lineage


def train_epochs(opts, trainer, model, train_loader, val_loader, num_seen, resume, stopper, logger) -> int:
    """The step's epochs from where a resume checkpoint left off, with validation and early stopping;
    returns the number of epochs run. With --patience the best weights are back in `model` at the end."""
    start_epoch, start_iter, resume_rng = resume.load()
    epochs_run = opts.epochs
    for epoch in range(start_epoch, opts.epochs):
        try:
            trainer.train_epoch(train_loader, epoch, start_iter=start_iter, resume_rng=resume_rng,
                                after_iteration=resume.after_iteration)
        except Preempted as stop:
            resume.save(stop.epoch, stop.iteration_in_epoch)
            raise
        start_iter, resume_rng = 0, None
        last = epoch + 1 == opts.epochs
        # with --patience every validation counts (the last epoch's too); without, it is monitoring only
        if val_loader is not None and (epoch + 1) % opts.val_interval == 0 and (stopper is not None or not last):
            metrics, _ = trainer.evaluate(val_loader, num_classes=num_seen)
            # validation labels hold only background and the step's classes (docs/data.md)
            miou = metrics.results(old_classes=list(range(num_seen)), new_classes=[])["miou_all_bg"]
            if miou is not None:  # None: empty validation set
                logger.add_scalar("val/mIoU", miou, epoch + 1)
            shown = "x" if miou is None else f"{100 * miou:.2f}"
            if stopper is None:
                logger.info(f"validation (monitoring only) after epoch {epoch + 1}: mIoU {shown}")
            else:
                improved = stopper.update(epoch + 1, miou, model)
                logger.info(f"validation after epoch {epoch + 1}: mIoU {shown}"
                            + (" (best so far: weights kept)" if improved else
                               f" (best {100 * (stopper.best_score or 0):.2f} at epoch {stopper.best_epoch})"))
                if stopper.should_stop and not last:
                    epochs_run = epoch + 1
                    logger.info(f"early stopping after epoch {epoch + 1}: {opts.patience} epoch(s) without a better "
                                f"validation mIoU")
                    break
        if not last:  # after the last epoch the step checkpoint follows at once
            resume.save(epoch + 1, 0)
            if trainer.preemption is not None and trainer.preemption.should_stop():
                raise Preempted(epoch + 1, 0)
    if stopper is not None:
        if stopper.restore_best(model):
            logger.info(f"kept the weights of epoch {stopper.best_epoch} (best validation mIoU "
                        f"{100 * stopper.best_score:.2f}, --patience {opts.patience}) as the step checkpoint, which "
                        f"the test below and the next step use; optimizer, scheduler and method state are those "
                        f"of the last epoch trained ({epochs_run})")
        else:
            logger.info("no validation gave a mIoU: the step checkpoint holds the last epoch")
    return epochs_run


def stop_for_preemption(opts, dist, preemption, stop, last_path, logger):
    """Every rank: after the resume checkpoint of `stop` is written, wait for all, requeue the SLURM job
    (rank 0, when allowed) and exit with PREEMPTED_EXIT_CODE."""
    barrier()  # the checkpoint is on disk before any rank exits (a launcher may kill the rest at the first exit)
    where = f"after iteration {stop.iteration_in_epoch} of epoch {stop.epoch + 1}" if stop.iteration_in_epoch \
        else f"after epoch {stop.epoch}"
    logger.info(f"stopped by {preemption.decided.name} {where}; resume checkpoint {last_path} written: the same "
                f"command continues from it (exit code {PREEMPTED_EXIT_CODE})")
    if dist.rank == 0:
        requeued = requeue_slurm_job(preemption.decided)
        if requeued:
            logger.info(requeued)
    logger.close()
    raise SystemExit(PREEMPTED_EXIT_CODE)


def save_step(opts, dist, ckpt_path, model, optimizer, scheduler, method, classes, lineage, stopper, epochs_run,
              logger) -> dict:
    """Rank 0: the step checkpoint, then its results row marked pending until the test writes it.
    Returns the run record of the training."""
    save_checkpoint(ckpt_path, {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": stopper.best_epoch if stopper is not None and stopper.best_epoch else epochs_run,
        "epochs_run": epochs_run,
        "method_state": method.state_dict(),
        "classes": list(model.classes),  # with classifiers allocated ahead (Method.model_classes)
        "step": opts.step,
        "opts": vars(opts),
        "input_channels": opts.in_channels,
        "lineage": lineage,
        "manifest": manifest(opts, dist),
    })
    digest = file_sha256(ckpt_path)
    logger.info(f"saved {ckpt_path} (sha256 {digest[:12]})")
    record = run_record(opts, dist, "train", {"path": str(ckpt_path), "sha256": digest}, lineage)
    # until the test writes the new row, the old run's numbers must not stand beside the new
    # checkpoint; later steps trained from the replaced model are marked stale
    stale = mark_pending(run_id(opts).results(opts.results_dir), opts.step, record,
                         tasks.channel_names(opts.dataset, opts.task))
    if stale:
        logger.info(f"warning: step(s) {', '.join(map(str, stale))} of {opts.name} were trained from the "
                    f"replaced step {opts.step} and are marked stale in the results; re-train them")
    return record


def run_test(opts, dist, model, classes, meta, logger, ckpt_path) -> dict:
    """--test: the step's own checkpoint refreshes the step's row; any other --ckpt gets its own results
    file, so a test never replaces the training row of another model."""
    path = Path(opts.ckpt or ckpt_path)
    if not path.is_file():
        raise UserError(f"--test needs the checkpoint of step {opts.step}: {path} not found; "
                        f"train the step first or pass --ckpt")
    checkpoint = load_checkpoint(path)
    check_compatible(opts, checkpoint, path, meta, logger)
    load_model_weights(model, checkpoint, path)
    logger.info(f"testing {path}")
    test_loader = load_data(opts, dist, test_only=True)[2]
    own = path.resolve() == ckpt_path.resolve() if ckpt_path.exists() else False
    record = None
    if dist.rank == 0:
        record = run_record(opts, dist, "test", {"path": str(path), "sha256": file_sha256(path)},
                            checkpoint.get("lineage"))
    rid = run_id(opts) if own else run_id(opts).testing(path)
    results = test_and_report(model, opts, dist, test_loader, classes, logger, meta, record, rid)
    logger.close()
    return results


def check_finite_model(model, trainer) -> None:
    """No NaN/inf parameter or buffer may be saved (or reported)."""
    bad = non_finite_tensors(model.state_dict().items())
    if bad:
        raise UserError(f"the model holds NaN/inf values ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                        f"{trainer.divergence_hint()} (no checkpoint was written)")


# Options that may differ between a run and the resume checkpoint it continues from.
RESUME_FREE = {"command_line", "local_rank", "no_resume", "dist_timeout", "print_interval", "sample_num",
               "num_workers", "logdir", "results_dir", "checkpoint_dir", "ckpt_interval", "data_root",
               "allow_mismatch", "preempt_signals"}


class Resume:
    """The step's "last" checkpoint: written atomically at the end of every epoch (and every
    --ckpt_interval iterations), read back by the same command after a crash, removed when the step ends."""

    def __init__(self, opts, dist, trainer, model, method, loader, path, logger, stopper=None):
        self.opts, self.dist, self.trainer, self.model, self.method = opts, dist, trainer, model, method
        self.loader, self.path, self.logger = loader, Path(path), logger
        self.stopper = stopper  # --patience: its best epoch, score and weights travel with the checkpoint

    def save(self, epoch: int, iteration_in_epoch: int) -> None:
        """`epoch` epochs and `iteration_in_epoch` iterations of the next one are done."""
        check_finite_model(self.model, self.trainer)
        generator = loader_generator(self.loader)
        if iteration_in_epoch:  # replayed from the epoch start on resume
            loader_state = self.trainer.loader_state_at_epoch_start
        else:
            loader_state = generator.get_state() if generator is not None else None
        rng = all_gather_object({"rng": capture_rng_state(), "loader": loader_state})  # one per rank
        if self.dist.rank == 0:
            trainer = self.trainer
            save_checkpoint(self.path, {
                "model": self.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict(),
                "method_resume": self.method.resume_state(),
                "early_stopping": self.stopper.state_dict() if self.stopper is not None else None,
                "epoch": epoch,
                "iteration_in_epoch": iteration_in_epoch,
                "iteration": trainer.iteration,
                "rng_per_rank": rng,
                "world_size": self.dist.world_size,
                "manifest": manifest(self.opts, self.dist),
                "opts": vars(self.opts),
            })

    def after_iteration(self, epoch: int, iteration_in_epoch: int) -> None:
        interval = self.opts.ckpt_interval
        n_iters = batches_per_pass(self.loader, self.opts.debug)
        if interval and self.trainer.iteration % interval == 0 and iteration_in_epoch < n_iters:
            self.save(epoch, iteration_in_epoch)

    def load(self) -> tuple[int, int, dict | None]:
        """(first epoch, iterations of it already done, RNG states to restore after replaying them)."""
        exists = broadcast_object(self.path.is_file() if self.dist.rank == 0 else None)
        if not exists:
            return 0, 0, None
        if self.opts.no_resume:
            self.logger.info(f"--no_resume: starting over (ignoring {self.path})")
            return 0, 0, None
        state = load_checkpoint(self.path)
        self._check_same_run(state)
        self._warn_other_environment(state.get("manifest"))
        trainer = self.trainer
        self.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        self.method.load_resume_state(state["method_resume"])
        if self.stopper is not None and state.get("early_stopping") is not None:
            self.stopper.load_state_dict(state["early_stopping"])
        trainer.iteration = int(state["iteration"])
        mine = state["rng_per_rank"][self.dist.rank]
        if mine["loader"] is not None:
            loader_generator(self.loader).set_state(mine["loader"])
        epoch, done = int(state["epoch"]), int(state["iteration_in_epoch"])
        self.logger.info(f"resuming from {self.path}: epoch {epoch + 1}, iteration {done + 1} "
                         f"(iteration {trainer.iteration} of the step); --no_resume starts over")
        if done:
            return epoch, done, mine["rng"]
        restore_rng_state(mine["rng"])
        return epoch, 0, None

    def _check_same_run(self, state: dict) -> None:
        saved = state.get("opts", {})
        if state.get("world_size") != self.dist.world_size:
            raise UserError(f"{self.path} was written by {state.get('world_size')} process(es), this run has "
                            f"{self.dist.world_size} (another effective batch and split of the data); run with the "
                            f"same number of processes, on any number of nodes, or pass --no_resume")
        ours = vars(self.opts)
        changed = [k for k in sorted(set(saved) | set(ours)) if k not in RESUME_FREE and saved.get(k) != ours.get(k)]
        if changed:
            k = changed[0]
            raise UserError(f"{self.path} was written with --{k} {saved.get(k)}, this run has --{k} {ours.get(k)}; "
                            f"re-run the same command to resume, or pass --no_resume to start the step over")

    def _warn_other_environment(self, saved: dict | None) -> None:
        """A requeued or restarted job may land on other machines: say what differs from the part trained
        before (the numbers of the step may then differ from an uninterrupted run's)."""
        if not saved:
            return
        ours = manifest(self.opts, self.dist)
        changed = [f"{k} {saved.get(k)} -> {ours.get(k)}" for k in POOLING_KEYS if k in saved and saved[k] != ours[k]]
        if changed:
            self.logger.info(f"warning: {self.path} was written in another environment: {'; '.join(changed)}")

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _with(opts, **changes):
    copy = type(opts)(**vars(opts))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


if __name__ == "__main__":
    main()
