"""Early stopping on validation (--patience): keeps the weights of the best validated epoch."""
from __future__ import annotations


class EarlyStopping:
    """Track a validation score (higher is better) per validated epoch.

    `update(epoch, score, model)` copies the model's state (parameters and buffers, on the CPU) when
    the score beats the best so far by more than `min_delta`; `should_stop` is True once `patience`
    epochs have passed since the best one. Every rank of a DDP run sees the same (all-reduced)
    score, so all of them take the same decisions.
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, got {patience}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None
        self.last_epoch = 0

    def update(self, epoch: int, score: float | None, model) -> bool:
        """Record the validation `score` after `epoch` (1-based); returns whether it is the new best.
        An undefined score (None, empty validation) never counts as an improvement."""
        self.last_epoch = epoch
        improved = score is not None and (self.best_score is None or score > self.best_score + self.min_delta)
        if improved:
            self.best_score, self.best_epoch = float(score), epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return improved

    @property
    def should_stop(self) -> bool:
        since = self.last_epoch - (self.best_epoch if self.best_epoch is not None else 0)
        return since >= self.patience

    def restore_best(self, model) -> bool:
        """Load the best weights back into `model`; False when no epoch had a defined score."""
        if self.best_state is None:
            return False
        model.load_state_dict(self.best_state)
        return True

    def state_dict(self) -> dict:
        """Everything needed to continue after a resume (the best weights included)."""
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state, self.last_epoch = state["best_state"], state["last_epoch"]
