"""The optimiser of a step (--optimizer): SGD with Nesterov momentum (MiB) or AdamW (MiB-CD)."""
from __future__ import annotations

import inspect

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


def make_optimizer(params, opts, device):
    """The optimiser the options ask for (--optimizer, --lr, --weight_decay, --momentum) on `device`."""
    return build_optimizer(getattr(opts, "optimizer", "sgd"), params, lr=opts.lr, weight_decay=opts.weight_decay,
                           momentum=opts.momentum, device=device)
