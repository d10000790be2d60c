"""The optimiser of a step (--optimizer): SGD with Nesterov momentum (MiB) or AdamW (MiB-CD)."""
from __future__ import annotations

import torch

from utils.errors import UserError

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9):
    """'sgd' -> SGD(momentum, nesterov); 'adamw' -> AdamW (decoupled weight decay, default betas)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"--optimizer {name!r} is unknown; use {' or '.join(OPTIMIZERS)}")
