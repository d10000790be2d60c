"""The Trainer: epoch loop with a per-iteration schedule, AMP, DDP, validation and testing.
It only calls the Method's hooks and knows no method by name."""
from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
import warnings

import torch
from tqdm import tqdm

from utils.checkpoint import loader_generator, restore_rng_state
from utils.distributed import all_reduce_sum, broadcast_buffers
from utils.errors import UserError
from utils.metrics import SegmentationMetrics
from utils.preemption import Preempted

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


def unwrap(model):
    """The plain model under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


class Trainer:
    def __init__(self, model, old_model, method, optimizer, scheduler, opts, dist, logger, input_norm=None):
        self.model = model  # possibly DDP-wrapped and/or compiled: used for training forwards
        self.module = unwrap(model)  # for evaluation and state
        # uint8 N x H x W x C batches -> normalised float N x C x H x W on the device (None: batches
        # arrive as float already)
        self.input_norm = input_norm
        self.old_model = old_model
        self.method = method
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.opts = opts
        self.dist = dist
        self.device = dist.device
        self.logger = logger
        self.amp_dtype, use_scaler = AMP_LEVELS[opts.opt_level]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        if use_scaler:
            # GradScaler skips optimizer.step() on overflowing iterations, which torch flags as a wrong call
            # order; the per-iteration poly schedule must advance all the same.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        self.iteration = 0
        self.loader_state_at_epoch_start = None  # the loader generator's state before this epoch's draws
        self.preemption = None  # utils.preemption.Preemption: asked after every iteration inside an epoch

    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _set_train_mode(self):
        # as MiB: norm layers follow train() (--fix_bn froze only their affine parameters); the model itself
        # keeps them in eval mode under --fix_bn_strict
        self.model.train()

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
        n_iters = batches_per_pass(loader, self.opts.debug)
        bar = tqdm(total=n_iters, desc=f"epoch {epoch + 1}/{self.opts.epochs}",
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
                if window == self.opts.print_interval or i == n_iters - 1:
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
            f"epoch {epoch + 1}/{self.opts.epochs}: "
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
                            max_batches=batches_per_pass(loader, self.opts.debug))
        finally:
            self._set_train_mode()
