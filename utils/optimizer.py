"""The optimiser of a step (--optimizer): SGD with Nesterov momentum (MiB) or AdamW (MiB-CD)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from utils.errors import UserError

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9, device=None):
    """'sgd' -> SGD(momentum, nesterov); 'adamw' -> AdamW (decoupled weight decay, default betas).

    Fused on CUDA where torch offers it (one kernel for every parameter, no host sync under GradScaler),
    else the multi-tensor foreach version: same update, same numbers."""
    params = list(params)
    if name == "sgd":
        cls, kwargs = torch.optim.SGD, dict(lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    elif name == "adamw":
        cls, kwargs = torch.optim.AdamW, dict(lr=lr, weight_decay=weight_decay)
    else:
        raise UserError(f"unknown optimizer {name!r}; use {' or '.join(OPTIMIZERS)}")
    supported = inspect.signature(cls).parameters
    if device is not None and torch.device(device).type == "cuda" and "fused" in supported:
        kwargs["fused"] = True
    elif "foreach" in supported:
        kwargs["foreach"] = True
    return cls(params, **kwargs)


@dataclass(frozen=True)
class OptimizerOptions:
    """The optimiser and its per-iteration schedule; field names are run.py's options."""

    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_policy: str = "poly"
    lr_power: float = 0.9
    lr_decay_step: int = 5000
    lr_decay_factor: float = 0.1
    freeze: bool = False  # the backbone body stays out of the optimiser (MiB's --freeze)


def make_optimizer(params, options: OptimizerOptions, device):
    """The optimiser of `options` on `device`."""
    return build_optimizer(options.optimizer, params, lr=options.lr, weight_decay=options.weight_decay,
                           momentum=options.momentum, device=device)
