"""Step checkpoints into models: loading their weights (with the class, shape and input-band checks)
and the options a checkpoint must share with the run that loads it."""
from __future__ import annotations

import os

import torch

from models.weights import FIRST_CONV
from utils.errors import UserError

from .segmentation import classifier_prefix

# Options stored in a checkpoint that the loading run must share (label, option).
# In-place ABN with and without synchronisation: the same parameters and the same function.
_SAME_NORM = {"iabn_sync": "iabn"}


def load_model_weights(model, checkpoint: dict, path, strict: bool = True) -> None:
    """Load a step checkpoint into `model`; a class-count mismatch is the user's error. strict=False: the
    checkpoint of step t-1 into the model of step t (its new classifier stays as built)."""
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


def check_compatible(recorded: dict, checkpoint: dict, path, compared, logger,
                     allow_mismatch: bool = False) -> None:
    """The options `compared` ((option, flag) pairs: backbone, output stride, norm_act, dataset, task, split)
    stored in `checkpoint` must equal this run's (`recorded`); a mismatch is a UserError naming both values (a
    warning when `allow_mismatch`). Checkpoints without stored options are not checked. Input bands are
    checked earlier, by check_checkpoint_bands."""
    saved = dict(checkpoint.get("opts") or {})
    if not saved:
        return
    for key, label in compared:
        theirs, mine = saved.get(key), recorded.get(key)
        if theirs is None:
            continue
        if key == "norm_act":
            theirs, mine = _SAME_NORM.get(theirs, theirs), _SAME_NORM.get(mine, mine)
        if theirs != mine:
            message = f"{path} was trained with {label} {saved.get(key)} but this run has {label} {recorded.get(key)}"
            if not allow_mismatch:
                raise UserError(f"{message}; use the same options, another checkpoint, or --allow_mismatch "
                                f"if this is on purpose")
            logger.info(f"warning: {message} (--allow_mismatch)")


def checkpoint_input_bands(state):
    """Input bands of a model state dict (its first convolution), or None when it has none."""
    weight = state.get("body." + FIRST_CONV) if isinstance(state, dict) else None
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else None


def check_checkpoint_bands(path, bands, data_description):
    """UserError when the step checkpoint at `path` was trained on another number of input bands than
    the data (`bands`). Reads the file memory-mapped (cheap); a missing or unreadable file is left to
    the caller's own checks."""
    if path is None or not os.path.isfile(path):
        return
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - reported by the caller's loading with the proper message
        return
    have = checkpoint_input_bands(checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    if have is not None and have != bands:
        raise UserError("{path} was trained on {have}-band images but {data} has {bands} bands; use a checkpoint "
                        "and a processed dataset with the same {channels}", path=path, have=have,
                        data=data_description, bands=bands, channels="bands")
