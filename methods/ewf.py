"""EWF, Endpoints Weight Fusion (Xiao et al., CVPR 2023): after step t trains, every tensor the step t-1
model had is replaced by (1-α)·θ_{t-1} + α·θ_t; the new classifier keeps θ_t. Any method uses it through
--ewf (docs/methods.md#ewf); the old classifiers are then frozen at t > 0 (`Method.setup`)."""
from __future__ import annotations

import math

import torch

from utils.errors import UserError


def ewf_alpha(classes: list[int], override: float | None = None) -> float:
    """α = sqrt(N_new / (N_new + C°)): N_new the step's classes, C° every earlier channel (background
    included); `override` (--ewf_alpha) replaces it."""
    if override is not None:
        return float(override)
    new = classes[-1]
    return math.sqrt(new / (new + sum(classes[:-1])))


@torch.no_grad()
def fuse_endpoints(model: torch.nn.Module, previous_state: dict, alpha: float) -> int:
    """θ := (1-α)·θ_{t-1} + α·θ_t in place, for every floating parameter and buffer of `model` that the step
    t-1 state dict `previous_state` holds (backbone, head, normalisation statistics, old classifiers);
    tensors it lacks (the new classifier) keep θ_t, and so do integer buffers (num_batches_tracked), which
    have no meaningful average. Returns the number of tensors fused."""
    if previous_state is None:
        raise ValueError("EWF needs the step t-1 weights")
    fused = 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        old = previous_state.get(name)
        if old is None or not tensor.is_floating_point():
            continue
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"EWF: {name} has shape {tuple(old.shape)} at step t-1, {tuple(tensor.shape)} now")
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        data.mul_(alpha).add_(old.to(device=data.device, dtype=data.dtype), alpha=1.0 - alpha)
        fused += 1
    return fused


def check_options(options) -> None:
    """--ewf_alpha must be a fusion weight in (0, 1]."""
    alpha = getattr(options, "ewf_alpha", None)
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise UserError(f"--ewf_alpha must be in (0, 1] (the weight of the new step's model), got {alpha}")
    if alpha is not None and not getattr(options, "ewf", False):
        raise UserError("--ewf_alpha sets the fusion weight of --ewf; add --ewf or drop --ewf_alpha")
