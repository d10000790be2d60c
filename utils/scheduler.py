"""Learning-rate schedules stepped every iteration (MiB's --lr_policy poly|step, MiB-CD's cosine)."""
from __future__ import annotations

from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR

from utils.errors import UserError


class PolyLR(LRScheduler):
    """lr_i = max(base_lr * (1 - i / max_iters) ** power, min_lr); call step() after every iteration.

    min_lr defaults to 0: MiB's schedule has no floor, so the last iteration trains at
    base_lr * (1 / max_iters) ** power. A positive min_lr is an explicit departure from MiB.
    """

    def __init__(self, optimizer, max_iters: int, power: float = 0.9, min_lr: float = 0.0, last_epoch: int = -1):
        if max_iters <= 0:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        self.max_iters = int(max_iters)
        self.power = float(power)
        self.min_lr = float(min_lr)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        # Clamp so stepping past max_iters (never done in training) stays at min_lr instead of a complex
        # power of a negative number.
        done = min(self.last_epoch, self.max_iters) / self.max_iters
        return (1.0 - done) ** self.power

    def get_lr(self):
        factor = self._factor()
        return [max(base_lr * factor, self.min_lr) for base_lr in self.base_lrs]

    _get_closed_form_lr = get_lr


def build_scheduler(name: str, optimizer, max_iters: int, power: float = 0.9, step_size: int | None = None,
                    gamma: float = 0.1):
    """'poly' -> PolyLR; 'step' -> StepLR every `step_size` iterations by `gamma` (MiB --lr_decay_step /
    --lr_decay_factor); 'cosine' -> CosineAnnealingLR over max_iters (MiB-CD)."""
    if name == "poly":
        return PolyLR(optimizer, max_iters=max_iters, power=power)
    if name == "cosine":  # annealed once over the step's iterations, down to 0 (MiB-CD's recipe)
        if max_iters <= 0:
            raise ValueError(f"max_iters must be positive, got {max_iters}")
        return CosineAnnealingLR(optimizer, T_max=int(max_iters), eta_min=0.0)
    if name == "step":
        if not step_size or step_size <= 0:
            raise UserError(f"the step schedule needs a positive step_size in iterations (got {step_size})")
        return StepLR(optimizer, step_size=int(step_size), gamma=gamma)
    raise UserError("{policy} is unknown; known: poly, step, cosine", policy=f"learning-rate policy {name!r}")
