"""Train and test one incremental step (or only test it with --test).

    python run.py --dataset vaihingen --task 4-1 --step 0 --method MiB ...
    torchrun --nproc_per_node=2 run.py ...          (or python -m torch.distributed.launch ...)
"""
from __future__ import annotations

import os
import random
import shlex
import sys

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import tasks
from argparser import parse_args
from dataset import get_datasets, load_meta
from methods import get_method_class
from modules import make_model
from train import Trainer
from utils.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from utils.colormap import CLASS_NAMES
from utils.distributed import DistributedEvalSampler, barrier, cleanup, init_distributed, relaunch_command
from utils.errors import UserError, exit_on_user_error
from utils.logger import Logger, write_task_curve
from utils.metrics import format_table
from utils.results import read_results, write_results
from utils.scheduler import build_scheduler


def task_tag(opts) -> str:
    return f"{opts.task}-{opts.dataset}{'-ov' if opts.overlap else ''}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loaders(opts, dist, train_set, val_set, test_set):
    """Shuffled (distributed) training loader; evaluation loaders that see every crop exactly once."""
    pin = dist.device.type == "cuda"
    generator = torch.Generator().manual_seed(opts.random_seed)
    common = dict(num_workers=opts.num_workers, pin_memory=pin, persistent_workers=opts.num_workers > 0)

    def eval_loader(ds):
        if ds is None:
            return None
        sampler = (DistributedEvalSampler(ds, dist.world_size, dist.rank) if dist.distributed
                   else SequentialSampler(ds))
        return DataLoader(ds, batch_size=opts.batch_size, sampler=sampler, **common)

    train_loader = None
    if train_set is not None:
        sampler = (DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=opts.random_seed)
                   if dist.distributed else RandomSampler(train_set, generator=generator))
        if len(train_set) < opts.batch_size * dist.world_size:
            raise UserError(
                f"step {opts.step} has {len(train_set)} training crops, fewer than one batch "
                f"({opts.batch_size} x {dist.world_size} processes); lower --batch_size"
            )
        train_loader = DataLoader(train_set, batch_size=opts.batch_size, sampler=sampler, drop_last=True,
                                  generator=generator, **common)
    return train_loader, eval_loader(val_set), eval_loader(test_set)


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
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_classifier = f"cls.{len(expected) - 1}."
    missing = [k for k in missing if strict or not k.startswith(new_classifier)]
    if missing or unexpected:
        raise UserError(f"{path} does not match the model built from the options (--backbone, --output_stride, "
                        f"--norm_act?): missing {missing[:3]}, unexpected {unexpected[:3]}")


def previous_checkpoint(opts) -> tuple[str, dict]:
    path = opts.step_ckpt or checkpoint_path(opts.checkpoint_dir, opts.task, opts.dataset, opts.overlap,
                                             opts.name, opts.step - 1)
    if not os.path.isfile(path):
        argv = _drop_options(opts.command_line, ("--step", "--lr"))
        previous = ["--step", str(opts.step - 1), "--lr", "0.01" if opts.step == 1 else "0.001"]
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


def test_and_report(trainer, opts, test_loader, classes, logger, meta) -> dict:
    """Final test on every test crop (all seen classes) -> console, TensorBoard, results CSV/JSON."""
    seen = tasks.get_order(opts.dataset, opts.task)[: sum(classes)]
    metrics, samples = trainer.evaluate(test_loader, num_classes=len(seen), sample_num=opts.sample_num)
    step0 = tasks.get_task_labels(opts.dataset, opts.task, 0)[0]
    results = metrics.results(old_classes=step0, new_classes=[c for c in seen if c not in step0])
    names = [CLASS_NAMES[c] for c in seen]
    if trainer.dist.rank == 0:
        logger.add_results(results, opts.step, names)
        if samples:
            images, labels, preds = samples
            to_class = channel_to_class(seen)  # model channels -> ISPRS class indices for the palette
            logger.add_prediction_figure("test/predictions", images, to_class[labels], to_class[preds],
                                         meta["mean"], meta["std"], opts.step, CLASS_NAMES)
        logger.info(f"test of step {opts.step} ({task_tag(opts)}, {opts.name}):\n{format_table(results, names)}")
        csv_path = write_results(opts.results_dir, opts.dataset, opts.task, opts.overlap, opts.name, opts.step,
                                 results, CLASS_NAMES, seen, vars(opts))
        # One run per task and name: mIoU old/new/all against the step, rebuilt from the results file.
        write_task_curve(os.path.join(opts.logdir, task_tag(opts), opts.name, "task"), read_results(csv_path))
    return results


def channel_to_class(order) -> torch.Tensor:
    """int64[256] lookup: model channel (position in the task order) -> class index; 255 stays 255."""
    lut = torch.full((256,), 255, dtype=torch.int64)
    lut[: len(order)] = torch.as_tensor(list(order), dtype=torch.int64)
    return lut


@exit_on_user_error
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    opts.command_line = argv
    dist = init_distributed(opts.local_rank, opts.device)
    try:
        return run_step(opts, dist)
    finally:
        cleanup()


def run_step(opts, dist) -> dict:
    seed_everything(opts.random_seed)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick the fastest kernels
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    meta = load_meta(opts.data_root, opts.dataset)
    # --test logs into its own run below the step's, never into the training run's folder.
    logdir = os.path.join(opts.logdir, task_tag(opts), opts.name, f"step{opts.step}", *(["test"] if opts.test else []))
    logger = Logger(logdir, rank=dist.rank)
    logger.info(f"{'test' if opts.test else 'train'} step {opts.step} of {task_tag(opts)} with {opts.method} "
                f"({opts.name}); classes per step {classes}; {dist.world_size} process(es) on {dist.device}"
                + (f" ({torch.get_num_threads()} threads each)" if dist.device.type == "cpu" else ""))
    process_group = torch.distributed.group.WORLD if dist.distributed else None
    ckpt_path = checkpoint_path(opts.checkpoint_dir, opts.task, opts.dataset, opts.overlap, opts.name, opts.step)

    # Weights come from ImageNet only at step 0 training; otherwise from step checkpoints.
    use_imagenet = opts.step == 0 and not opts.test and not opts.no_pretrained
    model_opts = _with(opts, no_pretrained=not use_imagenet)
    model = make_model(model_opts, classes, process_group=process_group).to(dist.device)

    if opts.test:
        path = opts.ckpt or ckpt_path
        if not os.path.isfile(path):
            raise UserError(f"--test needs the checkpoint of step {opts.step}: {path} not found; "
                            f"train the step first or pass --ckpt")
        load_model_weights(model, load_checkpoint(path), path)
        logger.info(f"testing {path}")
        _, _, test_set = get_datasets(opts)
        _, _, test_loader = make_loaders(opts, dist, None, None, test_set)
        trainer = Trainer(model, None, None, None, None, opts, dist, logger)
        results = test_and_report(trainer, opts, test_loader, classes, logger, meta)
        logger.close()
        return results

    method = get_method_class(opts.method)(opts, opts.step, classes)
    old_model, previous_state = None, None
    if opts.step > 0:
        prev_path, prev = previous_checkpoint(opts)
        load_model_weights(model, prev, prev_path, strict=False)
        method.init_new_model(model)
        previous_state = prev.get("method_state")
        if method.uses_old_model:
            old_model = make_model(_with(opts, no_pretrained=True), classes[:-1],
                                   process_group=process_group).to(dist.device)
            load_model_weights(old_model, prev, prev_path)
            old_model.eval()
            old_model.requires_grad_(False)
        logger.info(f"loaded step {opts.step - 1} from {prev_path}")
    if opts.freeze and opts.step > 0:
        model.body.requires_grad_(False)
        model.head.requires_grad_(False)
    if opts.fix_bn:
        model.fix_bn()
    method.setup(model, previous_state)

    train_set, val_set, test_set = get_datasets(opts)
    train_loader, val_loader, test_loader = make_loaders(opts, dist, train_set, val_set, test_set)
    logger.info(f"{len(train_set)} training crops, {len(val_set) if val_set else 0} validation, "
                f"{len(test_set)} test")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum, nesterov=True,
                                weight_decay=opts.weight_decay)
    iters_per_epoch = len(train_loader) if not opts.debug else min(len(train_loader), 2)
    scheduler = build_scheduler(opts.lr_policy, optimizer, max_iters=opts.epochs * iters_per_epoch,
                                power=opts.lr_power, step_size=opts.lr_decay_step, gamma=opts.lr_decay_factor)
    train_model = model
    if dist.distributed:
        device_ids = [dist.local_rank] if dist.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    trainer = Trainer(train_model, old_model, method, optimizer, scheduler, opts, dist, logger)

    num_seen = sum(classes)
    for epoch in range(opts.epochs):
        trainer.train_epoch(train_loader, epoch)
        if val_loader is not None and (epoch + 1) % opts.val_interval == 0 and epoch + 1 < opts.epochs:
            metrics, _ = trainer.evaluate(val_loader, num_classes=num_seen)
            # validation labels hold only background and the step's classes (DESIGN 3.5)
            miou = metrics.results(old_classes=list(range(num_seen)), new_classes=[])["miou_all_bg"]
            logger.add_scalar("val/mIoU", miou, epoch + 1)
            logger.info(f"validation (monitoring only) after epoch {epoch + 1}: mIoU {100 * miou:.2f}")

    if dist.rank == 0:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": opts.epochs,
            "method_state": method.state_dict(),
            "classes": classes,
            "step": opts.step,
            "opts": vars(opts),
        })
        logger.info(f"saved {ckpt_path}")
    barrier()
    results = test_and_report(trainer, opts, test_loader, classes, logger, meta)
    logger.close()
    return results


def _with(opts, **changes):
    copy = type(opts)(**vars(opts))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


if __name__ == "__main__":
    main()
