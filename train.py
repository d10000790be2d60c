"""The Trainer and the step's loop: `Trainer.fit` runs the epochs (per-iteration schedule, AMP, DDP) from
where a resume checkpoint left off, validates, stops early (--patience), writes the resume checkpoints
(ResumeCheckpoint) and stops for pre-emption; `final_test` is the step's final test. It only calls the
Method's hooks and knows no method by name."""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from utils.checkpoint import (
    capture_rng_state,
    check_free_space,
    load_checkpoint,
    loader_generator,
    non_finite_tensors,
    restore_rng_state,
    save_checkpoint,
    tensor_bytes,
)
from utils.distributed import all_gather_object, all_reduce_sum, barrier, broadcast_buffers, broadcast_object
from utils.errors import UserError
from utils.metrics import SegmentationMetrics
from utils.preemption import PREEMPTED_EXIT_CODE, Preempted, requeue_slurm_job
from utils.reporting.results import POOLING_KEYS

# --opt_level -> (autocast dtype or None, use a GradScaler)
AMP_LEVELS = {"O0": (None, False), "O1": (torch.float16, True), "O2": (torch.bfloat16, False)}
# --debug: batches per epoch (training) and per evaluation
DEBUG_BATCHES = 2
# What to change when training diverges, unless the method gives its own hint.
DIVERGENCE_HINT = "lower --lr, check the data, or use --opt_level O0"


def batches_per_pass(loader, debug: bool) -> int:
    """Batches one epoch (or one evaluation) goes through: the whole loader, or at most DEBUG_BATCHES with --debug."""
    return min(len(loader), DEBUG_BATCHES) if debug else len(loader)


def autocast(device, amp_dtype):
    """Autocast to `amp_dtype` on `device` (a no-op context for None)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def to_device(images, labels, device, input_norm=None):
    """The batch on the device: uint8 crosses the link, conversion and normalisation happen there."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True).long()
    if input_norm is not None:
        images = input_norm(images)
    elif images.dtype == torch.uint8:
        raise ValueError("uint8 batches need an input_norm (BatchNormalize)")
    return images, labels


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, input_norm=None, amp_dtype=None, sample_num: int = 0,
             max_batches: int | None = None):
    """Confusion matrix over `num_classes` of the unwrapped `model` on `loader` (each sample counted once
    over all ranks). Returns (metrics, samples), samples = (images, labels, preds) of the first
    `sample_num` crops. The model is left in eval mode; a caller that trains next switches it back."""
    model.eval()
    broadcast_buffers(model)  # every rank tests the model rank 0 saves
    # a model may hold classifiers of future steps (Method.model_classes): predicting one is a miss
    metrics = SegmentationMetrics(num_classes, device=device,
                                  prediction_classes=getattr(model, "num_classes", num_classes))
    samples = []
    n_batches = len(loader) if max_batches is None else min(len(loader), max_batches)
    for i, (images, labels) in enumerate(loader):
        if i >= n_batches:
            break
        images, labels = to_device(images, labels, device, input_norm)
        with autocast(device, amp_dtype):
            logits, _ = model(images)
        preds = logits.argmax(dim=1)
        metrics.update(preds, labels)
        if sum(len(s[0]) for s in samples) < sample_num:
            samples.append((images.cpu(), labels.cpu(), preds.cpu()))
    metrics.synchronize()
    if samples:
        samples = [torch.cat(parts)[:sample_num] for parts in zip(*samples)]
    return metrics, samples


@dataclass(frozen=True)
class TrainOptions:
    """How the step trains and evaluates; field names are run.py's options."""

    epochs: int = 40
    opt_level: str = "O0"  # AMP_LEVELS
    val_interval: int = 1
    patience: int = 0  # early stopping after this many validations without a better mIoU (0: off)
    ckpt_interval: int = 0  # also write the resume checkpoint every N iterations
    print_interval: int = 10
    sample_num: int = 4  # test crops shown as figures
    debug: bool = False  # DEBUG_BATCHES per epoch and evaluation
    compile: bool = False
    channels_last: bool = False


def final_test(model, loader, classes, device, options: TrainOptions, input_norm=None):
    """The step's final test of the unwrapped `model` on every crop of `loader`, over all classes seen
    (`classes`: per step; channel 0 background, then the classes in task order, old = step 0's, new = the
    later steps'). Returns (results, samples) as `SegmentationMetrics.results` and `evaluate` give them."""
    num_seen = sum(classes)
    metrics, samples = evaluate(model, loader, num_seen, device, input_norm=input_norm,
                                amp_dtype=AMP_LEVELS[options.opt_level][0], sample_num=options.sample_num,
                                max_batches=batches_per_pass(loader, options.debug))
    results = metrics.results(old_classes=list(range(classes[0])), new_classes=list(range(classes[0], num_seen)))
    return results, samples


@dataclass(frozen=True)
class Fitted:
    """What `Trainer.fit` did: the epochs it ran and the epoch whose weights the model holds (the best
    validated one with --patience, else the last)."""

    epochs_run: int
    weights_epoch: int


def compile_model(model, device, backend="inductor"):
    """torch.compile of the training model, or the model itself with one line saying why not.

    The compiler is tried on a tiny function first: a missing C++ compiler / Triton, or a Python
    that dynamo does not support, then costs a message instead of a crash in the first iteration."""
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2 + 1, backend=backend)
        probe(torch.ones(8, device=device))
        return torch.compile(model, backend=backend)
    except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        print(f"warning: --compile: torch.compile is not available here ({reason}); training runs "
              f"without compilation", file=sys.stderr, flush=True)
        return model


def training_model(model, dist, compile_it: bool = False):
    """The model the Trainer trains through: DistributedDataParallel across processes, then torch.compile
    with --compile (`model` itself in one process without)."""
    if dist.distributed:
        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    return compile_model(model, dist.device) if compile_it else model


def unwrap(model):
    """The plain model under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


class Trainer:
    def __init__(self, model, old_model, method, optimizer, scheduler, options: TrainOptions, dist, logger,
                 input_norm=None, preemption=None):
        self.model = model  # possibly DDP-wrapped and/or compiled: used for training forwards
        self.module = unwrap(model)  # for evaluation and state
        # uint8 N x H x W x C batches -> normalised float N x C x H x W on the device (None: batches
        # arrive as float already)
        self.input_norm = input_norm
        self.old_model = old_model
        self.method = method
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.options = options
        self.dist = dist
        self.device = dist.device
        self.logger = logger
        self.amp_dtype, use_scaler = AMP_LEVELS[options.opt_level]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if use_scaler:
            # GradScaler skips optimizer.step() on overflowing iterations, which torch flags as a wrong call
            # order; the per-iteration poly schedule must advance all the same.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self.iteration = 0
        self.loader_state_at_epoch_start = None  # the loader generator's state before this epoch's draws
        self.preemption = preemption  # utils.preemption.Preemption: asked after every iteration inside an epoch
        self.train_loader = None  # while `fit` runs: its training loader and early stopping, which the
        self.stopper = None  # resume checkpoint saves and restores

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _set_train_mode(self):
        # as MiB: norm layers follow train() (--fix_bn froze only their affine parameters); the model itself
        # keeps them in eval mode under --fix_bn_strict
        self.model.train()

    # ------------------------------------------------------------------ the step's loop
    def fit(self, train_loader, val_loader, num_classes: int, stopper=None, resume=None) -> Fitted:
        """The step's epochs, from where the resume checkpoint left off, with validation and early stopping.

        Validation every --val_interval epochs on `val_loader` (None: never) over `num_classes` channels.
        With `stopper` (utils.early_stopping.EarlyStopping, --patience) every validation counts, the last
        epoch's too, training stops when it says so and the best weights are back in the model at the end;
        without, validation is monitoring only (and skipped after the last epoch, which the test follows).
        `resume` (ResumeCheckpoint) restores what it finds, is written after every epoch but the last (the
        step checkpoint follows it at once) and, on pre-emption, before every rank exits with
        PREEMPTED_EXIT_CODE (SystemExit)."""
        options = self.options
        self.train_loader, self.stopper = train_loader, stopper
        start_epoch, start_iter, resume_rng = resume.on_fit_start(self) if resume is not None else (0, 0, None)
        after_iteration = functools.partial(resume.on_iteration_end, self) if resume is not None else None
        epochs_run = options.epochs
        for epoch in range(start_epoch, options.epochs):
            try:
                self.train_epoch(train_loader, epoch, start_iter=start_iter, resume_rng=resume_rng,
                                 after_iteration=after_iteration)
            except Preempted as stop:
                if resume is None:
                    raise
                resume.save(self, stop.epoch, stop.iteration_in_epoch)
                self._stop_for_preemption(stop, resume.path)
            start_iter, resume_rng = 0, None
            last = epoch + 1 == options.epochs
            if val_loader is not None and (epoch + 1) % options.val_interval == 0 and (stopper is not None or not last):
                if self._validate(val_loader, num_classes, epoch + 1, stopper) and not last:
                    epochs_run = epoch + 1
                    self.logger.info(f"early stopping after epoch {epoch + 1}: {options.patience} epoch(s) without a "
                                     f"better validation mIoU")
                    break
            if not last and resume is not None:
                resume.save(self, epoch + 1, 0)
                if self.preemption is not None and self.preemption.should_stop():
                    self._stop_for_preemption(Preempted(epoch + 1, 0), resume.path)
        if stopper is not None:
            if stopper.restore_best(self.module):
                self.logger.info(f"kept the weights of epoch {stopper.best_epoch} (best validation mIoU "
                                 f"{100 * stopper.best_score:.2f}, --patience {options.patience}) as the step "
                                 f"checkpoint, which the test below and the next step use; optimizer, scheduler and "
                                 f"method state are those of the last epoch trained ({epochs_run})")
            else:
                self.logger.info("no validation gave a mIoU: the step checkpoint holds the last epoch")
        best = stopper.best_epoch if stopper is not None else None
        return Fitted(epochs_run=epochs_run, weights_epoch=best or epochs_run)

    def _validate(self, loader, num_classes: int, epoch: int, stopper) -> bool:
        """Validation after `epoch` (1-based): its mIoU to TensorBoard and the console and, with `stopper`,
        to early stopping; returns whether early stopping says stop."""
        metrics, _ = self.evaluate(loader, num_classes=num_classes)
        # validation labels hold only background and the step's classes (docs/data.md)
        miou = metrics.results(old_classes=list(range(num_classes)), new_classes=[])["miou_all_bg"]
        if miou is not None:  # None: empty validation set
            self.logger.add_scalar("val/mIoU", miou, epoch)
        shown = "x" if miou is None else f"{100 * miou:.2f}"
        if stopper is None:
            self.logger.info(f"validation (monitoring only) after epoch {epoch}: mIoU {shown}")
            return False
        improved = stopper.update(epoch, miou, self.module)
        self.logger.info(f"validation after epoch {epoch}: mIoU {shown}"
                         + (" (best so far: weights kept)" if improved else
                            f" (best {100 * (stopper.best_score or 0):.2f} at epoch {stopper.best_epoch})"))
        return stopper.should_stop

    def _stop_for_preemption(self, stop: Preempted, resume_path) -> None:
        """Every rank, after the resume checkpoint of `stop` is written: wait for all, requeue the SLURM job
        (rank 0, when allowed) and exit with PREEMPTED_EXIT_CODE."""
        barrier()  # the checkpoint is on disk before any rank exits (a launcher may kill the rest at the first exit)
        where = f"after iteration {stop.iteration_in_epoch} of epoch {stop.epoch + 1}" if stop.iteration_in_epoch \
            else f"after epoch {stop.epoch}"
        self.logger.info(f"stopped by {self.preemption.decided.name} {where}; resume checkpoint {resume_path} "
                         f"written: the same command continues from it (exit code {PREEMPTED_EXIT_CODE})")
        if self.dist.rank == 0:
            requeued = requeue_slurm_job(self.preemption.decided)
            if requeued:
                self.logger.info(requeued)
        self.logger.close()
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def check_finite_model(self) -> None:
        """No NaN/inf parameter or buffer may be saved (or reported)."""
        bad = non_finite_tensors(self.module.state_dict().items())
        if bad:
            raise UserError(f"the model holds NaN/inf values ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                            f"{self.divergence_hint()} (no checkpoint was written)")

    def step_checkpoint(self, fitted: Fitted, lineage: dict | None, manifest: dict, recorded: dict) -> dict:
        """What the step checkpoint holds: the model (with the classifiers allocated ahead,
        Method.model_classes), optimiser, scheduler and method state, every option of the run (`recorded`),
        and where it comes from (`lineage`: the step t-1 checkpoint's path and sha256) and ran (`manifest`)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": fitted.weights_epoch,
            "epochs_run": fitted.epochs_run,
            "method_state": self.method.state_dict(),
            "classes": list(self.module.classes),
            "step": recorded["step"],
            "opts": recorded,
            "input_channels": recorded["in_channels"],
            "lineage": lineage,
            "manifest": manifest,
        }

    # ------------------------------------------------------------------ training
    def train_epoch(self, loader, epoch: int, start_iter: int = 0, resume_rng: dict | None = None,
                    after_iteration=None) -> dict[str, float]:
        """One epoch; returns the mean of every loss term over the epoch (averaged across ranks).

        Resuming inside an epoch: the loader's generator must hold its state of the epoch start;
        the first `start_iter` batches are drawn again (same order and augmentations) but not trained
        on, then the RNG states `resume_rng` saved at that iteration are restored.
        `after_iteration(epoch, i)` is called after every trained iteration i (1-based in the epoch).
        With `self.preemption` set, every rank asks it after each iteration but the epoch's last and all
        raise Preempted(epoch, i) together when any rank got a stop signal.
        """
        self._set_train_mode()
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        generator = loader_generator(loader)
        self.loader_state_at_epoch_start = generator.get_state() if generator is not None else None
        epoch_sums: dict[str, torch.Tensor] = {}
        window_sums: dict[str, torch.Tensor] = {}
        window = 0
        n_iters = batches_per_pass(loader, self.options.debug)
        bar = tqdm(total=n_iters, desc=f"epoch {epoch + 1}/{self.options.epochs}",
                   disable=True if self.dist.rank != 0 else None,  # None: only on a terminal
                   leave=False, dynamic_ncols=True, mininterval=2.0)
        start = time.time()
        try:
            for i, (images, labels) in enumerate(loader):
                if i >= n_iters:
                    break
                if i < start_iter:  # replayed batches of a resumed epoch
                    bar.update(1)
                    if i == start_iter - 1 and resume_rng is not None:
                        restore_rng_state(resume_rng)
                    continue
                terms = self._train_iteration(images, labels)
                for sums in (epoch_sums, window_sums):
                    for key, value in terms.items():
                        sums[key] = sums.get(key, 0.0) + value
                window += 1
                bar.update(1)
                if window == self.options.print_interval or i == n_iters - 1:
                    means = self._reduce_means(window_sums, window)
                    self._check_finite(means, epoch, i)
                    bar.set_postfix(loss=f"{means['total']:.4f}")
                    self.logger.add_scalars(means, self.iteration, prefix="train/")
                    self.logger.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.iteration)
                    window_sums, window = {}, 0
                if after_iteration is not None:
                    after_iteration(epoch, i + 1)
                if self.preemption is not None and i + 1 < n_iters and self.preemption.should_stop():
                    raise Preempted(epoch, i + 1)
        finally:
            bar.close()  # before any error line, so it prints alone
        means = self._reduce_means(epoch_sums, max(n_iters - start_iter, 1))
        self.logger.info(
            f"epoch {epoch + 1}/{self.options.epochs}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in means.items())
            + f" ({time.time() - start:.1f}s, lr {self.optimizer.param_groups[0]['lr']:.2e})"
        )
        return means

    def _to_device(self, images, labels):
        return to_device(images, labels, self.device, self.input_norm)

    def _train_iteration(self, images, labels) -> dict[str, torch.Tensor]:
        """Forward, backward, the method's gradient hooks and one optimiser/schedule step.
        Returns the detached loss terms (and the method's logged values) without a host sync."""
        images, labels = self._to_device(images, labels)
        with self._autocast():
            terms = self.method.training_losses(self.model, self.old_model, images, labels)
        # the terms' own precision, at least fp32 (fp16/bf16 terms promoted, fp64 kept)
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in terms.values()), torch.float32)
        loss = torch.stack([t.to(dtype) for t in terms.values()]).sum()

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # the method's gradient hooks see true gradients
        logged = self.method.before_step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()
        self.scheduler.step()
        self.iteration += 1

        terms = {k: v.detach().float() for k, v in terms.items()}
        terms["total"] = loss.detach()
        for key, value in logged.items():
            terms[key] = torch.as_tensor(value, dtype=torch.float32, device=self.device)
        return terms

    def _reduce_means(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Average the accumulated loss terms over iterations and ranks (one collective)."""
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], device=self.device).float() for k in keys])
        stacked = all_reduce_sum(stacked) / (count * self.dist.world_size)
        return dict(zip(keys, stacked.tolist()))

    def divergence_hint(self) -> str:
        """What to change when training diverges (NaN/inf losses or weights): the method's hint."""
        method_hint = getattr(self.method, "divergence_hint", None)
        return (method_hint() if method_hint is not None else None) or DIVERGENCE_HINT

    def _check_finite(self, means: dict[str, float], epoch: int, iteration: int):
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if not bad:
            return
        hint = self.divergence_hint()
        raise UserError(f"loss term(s) {', '.join(bad)} became NaN/inf at epoch {epoch + 1}, iteration "
                        f"{iteration + 1}; {hint} (no checkpoint was written)")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, loader, num_classes: int, sample_num: int = 0):
        """`evaluate` of the unwrapped model with this run's normalisation, precision and --debug cap;
        the model goes back to training mode after."""
        try:
            return evaluate(self.module, loader, num_classes, self.device, input_norm=self.input_norm,
                            amp_dtype=self.amp_dtype, sample_num=sample_num,
                            max_batches=batches_per_pass(loader, self.options.debug))
        finally:
            self._set_train_mode()



class ResumeCheckpoint:
    """The step's "last" checkpoint, a hook of `Trainer.fit`: read back at the start of fit by the same
    command after a crash; written atomically at the end of every epoch but the last, every --ckpt_interval
    iterations and when pre-empted; removed by the caller when the step is done. It holds what makes the
    continued run bit-identical to an uninterrupted one: model, optimiser, scheduler, grad scaler, the
    method's resume state, early stopping's state (best weights included) and every rank's RNG and loader
    states."""

    def __init__(self, path, manifest: dict, recorded: dict, resume_free=frozenset(), no_resume: bool = False):
        self.path = Path(path)
        self.manifest = manifest  # this run's environment (utils.reporting.results.environment_manifest)
        self.recorded = recorded  # every option of the run: saved, and compared when resuming
        self.resume_free = frozenset(resume_free)  # the options that may differ then (paths, logging, launch)
        self.no_resume = no_resume  # start over even when the checkpoint exists

    def check_room(self, model, method) -> None:
        """Before training (rank 0): room for this checkpoint (model, momentum, method state) and its temp
        copy while it is replaced."""
        estimate = 2 * tensor_bytes(model.state_dict()) + tensor_bytes(method.state_dict())
        check_free_space(self.path.parent, 2 * estimate, "a checkpoint of this model")

    def save(self, trainer, epoch: int, iteration_in_epoch: int) -> None:
        """`epoch` epochs and `iteration_in_epoch` iterations of the next one are done (every rank calls it)."""
        trainer.check_finite_model()
        generator = loader_generator(trainer.train_loader)
        if iteration_in_epoch:  # replayed from the epoch start on resume
            loader_state = trainer.loader_state_at_epoch_start
        else:
            loader_state = generator.get_state() if generator is not None else None
        rng = all_gather_object({"rng": capture_rng_state(), "loader": loader_state})  # one per rank
        if trainer.dist.rank == 0:
            save_checkpoint(self.path, {
                "model": trainer.module.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "scaler": trainer.scaler.state_dict(),
                "method_resume": trainer.method.resume_state(),
                "early_stopping": trainer.stopper.state_dict() if trainer.stopper is not None else None,
                "epoch": epoch,
                "iteration_in_epoch": iteration_in_epoch,
                "iteration": trainer.iteration,
                "rng_per_rank": rng,
                "world_size": trainer.dist.world_size,
                "manifest": self.manifest,
                "opts": self.recorded,
            })

    def on_iteration_end(self, trainer, epoch: int, iteration_in_epoch: int) -> None:
        """Every --ckpt_interval iterations of the step, but not at an epoch's end (the epoch's save follows)."""
        interval = trainer.options.ckpt_interval
        n_iters = batches_per_pass(trainer.train_loader, trainer.options.debug)
        if interval and trainer.iteration % interval == 0 and iteration_in_epoch < n_iters:
            self.save(trainer, epoch, iteration_in_epoch)

    def on_fit_start(self, trainer) -> tuple[int, int, dict | None]:
        """Restore the checkpoint when there is one: (first epoch, iterations of it already done, RNG states
        to restore after replaying them)."""
        dist, logger = trainer.dist, trainer.logger
        exists = broadcast_object(self.path.is_file() if dist.rank == 0 else None)
        if not exists:
            return 0, 0, None
        if self.no_resume:
            logger.info(f"--no_resume: starting over (ignoring {self.path})")
            return 0, 0, None
        state = load_checkpoint(self.path)
        self._check_same_run(state, dist.world_size)
        self._warn_other_environment(state.get("manifest"), logger)
        trainer.module.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        trainer.method.load_resume_state(state["method_resume"])
        if trainer.stopper is not None and state.get("early_stopping") is not None:
            trainer.stopper.load_state_dict(state["early_stopping"])
        trainer.iteration = int(state["iteration"])
        mine = state["rng_per_rank"][dist.rank]
        if mine["loader"] is not None:
            loader_generator(trainer.train_loader).set_state(mine["loader"])
        epoch, done = int(state["epoch"]), int(state["iteration_in_epoch"])
        logger.info(f"resuming from {self.path}: epoch {epoch + 1}, iteration {done + 1} "
                    f"(iteration {trainer.iteration} of the step); --no_resume starts over")
        if done:
            return epoch, done, mine["rng"]
        restore_rng_state(mine["rng"])
        return epoch, 0, None

    def _check_same_run(self, state: dict, world_size: int) -> None:
        saved = state.get("opts", {})
        if state.get("world_size") != world_size:
            raise UserError(f"{self.path} was written by {state.get('world_size')} process(es), this run has "
                            f"{world_size} (another effective batch and split of the data); run with the "
                            f"same number of processes, on any number of nodes, or pass --no_resume")
        ours = self.recorded
        changed = [k for k in sorted(set(saved) | set(ours))
                   if k not in self.resume_free and saved.get(k) != ours.get(k)]
        if changed:
            k = changed[0]
            raise UserError(f"{self.path} was written with --{k} {saved.get(k)}, this run has --{k} {ours.get(k)}; "
                            f"re-run the same command to resume, or pass --no_resume to start the step over")

    def _warn_other_environment(self, saved: dict | None, logger) -> None:
        """A requeued or restarted job may land on other machines: say what differs from the part trained
        before (the numbers of the step may then differ from an uninterrupted run's)."""
        if not saved:
            return
        ours = self.manifest
        changed = [f"{k} {saved.get(k)} -> {ours.get(k)}" for k in POOLING_KEYS if k in saved and saved[k] != ours[k]]
        if changed:
            logger.info(f"warning: {self.path} was written in another environment: {'; '.join(changed)}")

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
