"""Parameter regularisers of the MiB family (docs/methods.md#parameter-regularisers): EWC, PI (path integral)
and RW (Riemannian walk).

How they run (the Trainer calls these through the Method, identically on every rank):

    loss.backward()                 # task gradient g_i at θ_{i-1}, DDP-averaged (and unscaled under AMP)
    penalty = reg.before_step()     # running state from g_i and θ_{i-1} (MiB's order); then adds
                                    # 2λΩ⊙(θ−θ_ref) to p.grad and returns λΣΩ⊙(θ−θ_ref)²
    optimizer.step()                # θ_{i-1} -> θ_i
    reg.after_step()                # nothing in MiB's order

MiB's order (the default, what its published baselines were computed with): the running state is updated
after backward and before the optimiser step, so the gradient g_i of iteration i meets the parameter change
θ_{i-2} -> θ_{i-1} made by iteration i-1 (PI), and RW's periodic score update fires at iterations
1, K+1, 2K+1, ... (the first one only records θ_K = θ_0). With `update_after_step=True`
(--reg_update_after_step, a deviation from MiB) the update runs in `after_step` instead: g_i meets the change
θ_{i-1} -> θ_i that it produced itself, and RW's score fires at iterations K, 2K, ...

The running Fisher of EWC and RW starts from the Fisher saved by step t-1 (ones at step 0, and for parameters
the previous step did not have). The state depends only on averaged gradients and parameters, so it is the
same on every rank without any communication.

Penalty (t > 0): λ Σ Ω ⊙ (θ − θ_ref)² over the parameters present in the previous step's state and in
`params` (the new classifier is never penalised; frozen parameters are skipped), with Ω built from the
previous state (min-max normalised per tensor unless normalize=False) and θ_ref = the previous step's final
parameters θ° (for PI that is θ_start, which equals θ° at t > 0). Running state is tracked for every
parameter in `params`, so the next step penalises this step's classifier too.

State (`state_dict()`, CPU tensors keyed by parameter name, handed to the next step as `previous_state`):
    {"method": name, "params": {n: θ}, "fisher": {n: F} (EWC, RW), "score": {n: s} (PI, RW)}.

An iteration whose task gradient is not finite (an fp16 GradScaler overflow: the optimizer skips that
step) leaves the running state unchanged; this is decided on the device, without a host sync.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from utils.errors import UserError

NORMALIZE_EPS = 1e-8
PI_EPS = 1e-20
RW_EPS = 1e-8


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation of one tensor: (M − min M) / (max M − min M + 1e-8)."""
    low, high = tensor.min(), tensor.max()
    return (tensor - low) / (high - low + NORMALIZE_EPS)


def check_hyperparameters(importance=None, alpha=None, iterations=None) -> None:
    """A UserError for a weight λ below 0, a running Fisher factor α outside [0, 1] or an RW interval K
    below 1 (None: not checked), naming the argument (parts `importance`, `alpha`, `iterations`): every
    regulariser runs it on its own arguments, and `check_options` on the options before anything is built,
    reworded as the options that set them (--reg_importance, --reg_alpha, --reg_iterations)."""
    if importance is not None and importance < 0:
        raise UserError("{importance} must be >= 0, got {value}; pass a non-negative weight",
                        importance="the regulariser's importance", value=importance)
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise UserError("{alpha} must be in [0, 1], got {value}; it weights the newest squared gradient",
                        alpha="the regulariser's alpha", value=alpha)
    if iterations is not None and int(iterations) < 1:
        raise UserError("{iterations} must be >= 1, got {value}; it is RW's score interval K",
                        iterations="the regulariser's iterations", value=iterations)


def check_options(options) -> None:
    """The regulariser's options when --regularizer is given (Method.validate); options the namespace
    lacks are left to the regulariser's defaults."""
    if getattr(options, "regularizer", None):
        try:
            check_hyperparameters(*(getattr(options, f"reg_{key}", None)
                                    for key in ("importance", "alpha", "iterations")))
        except UserError as err:
            raise err.reworded(importance="--reg_importance", alpha="--reg_alpha",
                               iterations="--reg_iterations") from None


class Regularizer:
    """Common machinery: previous state, penalty injection, gradient bookkeeping."""

    name = ""
    #: keys of the previous state's per-parameter dictionaries this regulariser needs (besides "params")
    state_keys: tuple[str, ...] = ()

    def __init__(
        self,
        params: Mapping[str, torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
        previous_state: dict | None,
        importance: float,
        alpha: float = 0.9,
        normalize: bool = True,
        iterations: int = 10,
        update_after_step: bool = False,
    ):
        self.params: dict[str, torch.nn.Parameter] = dict(params)
        if not self.params:
            raise ValueError("a regulariser needs at least one trainable parameter")
        check_hyperparameters(importance, alpha, iterations)
        self.importance = float(importance)
        self.alpha = float(alpha)
        self.normalize = bool(normalize)
        self.iterations = int(iterations)
        self.update_after_step = bool(update_after_step)
        self.iteration = 0  # running-state updates so far (one per training iteration)
        self._pending: tuple[dict[str, torch.Tensor | None], torch.Tensor] | None = None

        first = next(iter(self.params.values()))
        self._device, self._dtype = first.device, first.dtype
        self.previous = self._check_previous_state(previous_state)
        old = self.previous["params"] if self.previous else {}
        # Penalised: parameters of the old model that still train, in model order.
        self.penalised_names: tuple[str, ...] = tuple(n for n in self.params if n in old)
        self.reference = {n: self._to_param(old[n], n) for n in self.penalised_names}  # θ_ref
        self.omega = {n: self._importance_weights(n) for n in self.penalised_names}  # Ω

    # ------------------------------------------------------------------ previous state
    def _check_previous_state(self, state: dict | None) -> dict | None:
        """Validate the previous step's state: right regulariser, needed keys, matching shapes."""
        if state is None:
            return None
        recorded = state.get("method", self.name)
        if recorded != self.name:
            raise UserError(
                f"the regulariser state of the previous step is {recorded!r} but --regularizer is {self.name!r}; "
                f"train every step with the same --regularizer"
            )
        for key in ("params",) + self.state_keys:
            if not isinstance(state.get(key), Mapping):
                raise UserError(
                    f"the {self.name} state of the previous step has no {key!r} entry; re-train the previous "
                    f"step with --regularizer {self.name}"
                )
        for key in ("params",) + self.state_keys:
            for n, tensor in state[key].items():
                p = self.params.get(n)
                if p is not None and tuple(tensor.shape) != tuple(p.shape):
                    raise UserError(
                        f"the {self.name} state of the previous step has {key} of parameter {n!r} with shape "
                        f"{tuple(tensor.shape)} but the model has {tuple(p.shape)}; use the same --backbone, --dataset "
                        f"and --task as the previous step"
                    )
        for key in self.state_keys:  # every penalised parameter needs its importance
            missing = [n for n in state["params"] if n in self.params and n not in state[key]]
            if missing:
                raise UserError(
                    f"the {self.name} state of the previous step has no {key} for parameter {missing[0]!r}; "
                    f"re-train the previous step with --regularizer {self.name}"
                )
        return state

    def _to_param(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        p = self.params[name]
        return tensor.detach().to(device=p.device, dtype=p.dtype).clone()

    def _as_importance(self, tensor: torch.Tensor) -> torch.Tensor:
        return normalize(tensor) if self.normalize else tensor

    def _importance_weights(self, name: str) -> torch.Tensor:
        """Ω of one penalised parameter from the previous state."""
        raise NotImplementedError

    # ------------------------------------------------------------------ penalty
    def penalty(self) -> torch.Tensor:
        """λ Σ Ω ⊙ (θ − θ_ref)² with autograd ops (0 when nothing is penalised)."""
        total = torch.zeros((), device=self._device, dtype=self._dtype)
        for n in self.penalised_names:
            total = total + (self.omega[n] * (self.params[n] - self.reference[n]).pow(2)).sum()
        return self.importance * total

    @torch.no_grad()
    def before_step(self) -> torch.Tensor:
        """After backward, before optimizer.step(): update the running state from the task gradient g and
        the current θ (MiB's order; with update_after_step keep g for `after_step` instead), add the
        penalty's analytic gradient 2λΩ⊙(θ − θ_ref) to p.grad, return the penalty value (detached; 0 at
        step 0)."""
        if self.update_after_step:
            # after_step needs g once p.grad also holds the penalty gradient: keep a copy
            grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in self.params.items()}
        else:
            grads = {n: p.grad for n, p in self.params.items()}  # read before the penalty is added
        finite = [torch.isfinite(g).all() for g in grads.values() if g is not None]
        finite = torch.stack(finite).all() if finite else torch.ones((), dtype=torch.bool, device=self._device)
        if self.update_after_step:
            self._pending = (grads, finite)
        else:
            self.iteration += 1
            self._update(grads, finite)
        total = torch.zeros((), device=self._device, dtype=self._dtype)
        for n in self.penalised_names:
            p = self.params[n]
            weighted_diff = self.omega[n] * (p - self.reference[n])
            total += (weighted_diff * (p - self.reference[n])).sum()
            penalty_grad = (2.0 * self.importance) * weighted_diff
            if p.grad is None:
                p.grad = penalty_grad.to(p.dtype)
            else:
                p.grad.add_(penalty_grad)
        return self.importance * total

    @torch.no_grad()
    def after_step(self) -> None:
        """After optimizer.step(): nothing in MiB's order; with update_after_step, update the running state
        with this iteration's g and the θ its step produced."""
        if not self.update_after_step:
            return
        if self._pending is None:
            raise RuntimeError("Regularizer.after_step() called without before_step() in this iteration")
        (grads, finite), self._pending = self._pending, None
        self.iteration += 1
        self._update(grads, finite)

    def _update(self, grads: dict[str, torch.Tensor | None], finite: torch.Tensor) -> None:
        """One running-state update from the task gradients `grads` and the parameters' current values."""
        raise NotImplementedError

    @property
    def _first_update_only_records(self) -> bool:
        """MiB's order: the first update of a step has no earlier parameters to pair with; it only records
        them (whatever happened to the parameters between construction and the first iteration)."""
        return not self.update_after_step and self.iteration == 1

    def _running_fisher_update(self, fisher: dict, grads: dict, finite: torch.Tensor) -> None:
        """F ← α g² + (1 − α) F for every parameter that received a gradient."""
        for n, g in grads.items():
            if g is not None:
                updated = self.alpha * g.pow(2) + (1.0 - self.alpha) * fisher[n]
                fisher[n] = torch.where(finite, updated, fisher[n])

    def _initial_fisher(self) -> dict[str, torch.Tensor]:
        """Running F at the start of a step (as MiB): the Fisher saved by step t-1 (not normalised) where
        it has one, ones elsewhere (every parameter at step 0, the new classifier at t > 0)."""
        saved = self.previous.get("fisher", {}) if self.previous else {}
        return {n: self._to_param(saved[n], n) if n in saved else torch.ones_like(p.detach())
                for n, p in self.params.items()}

    # ------------------------------------------------------------------ state
    def _params_cpu(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.params.items()}

    @staticmethod
    def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in tensors.items()}

    def state_dict(self) -> dict:
        """What the next step needs, on CPU, keyed by parameter name; "params" becomes its θ_ref."""
        return {"method": self.name, "params": self._params_cpu()}


class EWC(Regularizer):
    """Elastic weight consolidation with an online Fisher: Ω = normalize(F°), θ_ref = θ°."""

    name = "ewc"
    state_keys = ("fisher",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fisher = self._initial_fisher()

    def _importance_weights(self, name):
        return self._as_importance(self._to_param(self.previous["fisher"][name], name))

    def _update(self, grads, finite):
        self._running_fisher_update(self.fisher, grads, finite)

    def state_dict(self):
        return {**super().state_dict(), "fisher": self._cpu(self.fisher)}


class PI(Regularizer):
    """Path integral (synaptic intelligence): Ω = normalize(s°), θ_ref = θ_start = θ°.

    Each update: ω += g ⊙ (θ_prev − θ), θ_prev ← θ, with θ the parameters when the update runs (θ_{i-1} in
    MiB's order, θ_i with update_after_step) and θ_prev those of the previous update (the values at
    construction before the first one; in MiB's order the first update only records θ). The score saved is
    s = max(0, ω / ((θ − θ_start)² + 1e-20)) + s° (s° only for parameters that have one).
    θ_start is θ° for old parameters and the value at construction for the others (the initial model at
    step 0, the freshly initialised classifier at t > 0).
    """

    name = "pi"
    state_keys = ("score",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # θ° where there is one (the penalty's θ_ref, shared), else the value at construction.
        self.start = {n: self.reference.get(n, p.detach().clone()) for n, p in self.params.items()}
        self.omega_path = {n: torch.zeros_like(p.detach()) for n, p in self.params.items()}
        self.previous_params = {n: p.detach().clone() for n, p in self.params.items()}  # θ_prev, on device

    def _importance_weights(self, name):
        return self._as_importance(self._to_param(self.previous["score"][name], name))

    def _update(self, grads, finite):
        record_only = self._first_update_only_records
        for n, p in self.params.items():
            g = grads[n]
            if g is not None and not record_only:
                updated = self.omega_path[n] + g * (self.previous_params[n] - p.detach())
                self.omega_path[n] = torch.where(finite, updated, self.omega_path[n])
            self.previous_params[n].copy_(p.detach())

    @torch.no_grad()
    def score(self) -> dict[str, torch.Tensor]:
        """The score of this step (on the parameters' device)."""
        previous = self.previous["score"] if self.previous else {}
        scores = {}
        for n, p in self.params.items():
            s = (self.omega_path[n] / ((p.detach() - self.start[n]).pow(2) + PI_EPS)).clamp_min(0)
            if n in previous:
                s = s + self._to_param(previous[n], n)
            scores[n] = s
        return scores

    def state_dict(self):
        return {**super().state_dict(), "score": self._cpu(self.score())}


class RW(Regularizer):
    """Riemannian walk: Ω = normalize(F°) + normalize(s°), θ_ref = θ°.

    Each update, with θ the parameters when it runs (θ_{i-1} in MiB's order, θ_i with update_after_step):
    at iterations 1, K+1, 2K+1, ... (MiB's order; K, 2K, ... with update_after_step), K = `iterations`,
    first s += g ⊙ (θ_K − θ) / (½ F ⊙ (θ − θ_K)² + 1e-8) with F before this iteration's update, then
    θ_K ← θ (θ_K starts at the parameters at construction; MiB's first firing only records θ);
    then, every iteration, F ← α g² + (1 − α) F. Saved score: max(s, 0), averaged ½(max(s, 0) + s°) with
    the previous step's score where there is one.
    """

    name = "rw"
    state_keys = ("fisher", "score")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fisher = self._initial_fisher()
        self.walk_score = {n: torch.zeros_like(p.detach()) for n, p in self.params.items()}
        self.checkpoint_params = {n: p.detach().clone() for n, p in self.params.items()}  # θ_K

    def _importance_weights(self, name):
        fisher = self._to_param(self.previous["fisher"][name], name)
        score = self._to_param(self.previous["score"][name], name)
        return self._as_importance(fisher) + self._as_importance(score)

    def _fires(self) -> bool:
        """Whether this update also updates the walk score (self.iteration counts from 1)."""
        if self.update_after_step:
            return self.iteration % self.iterations == 0
        return (self.iteration - 1) % self.iterations == 0

    def _update(self, grads, finite):
        if self._fires():
            record_only = self._first_update_only_records
            for n, p in self.params.items():
                g, theta = grads[n], p.detach()
                if g is not None and not record_only:
                    moved = self.checkpoint_params[n] - theta
                    updated = self.walk_score[n] + g * moved / (0.5 * self.fisher[n] * moved.pow(2) + RW_EPS)
                    self.walk_score[n] = torch.where(finite, updated, self.walk_score[n])
                self.checkpoint_params[n].copy_(theta)
        self._running_fisher_update(self.fisher, grads, finite)

    @torch.no_grad()
    def score(self) -> dict[str, torch.Tensor]:
        """The score saved for the next step (on the parameters' device)."""
        previous = self.previous["score"] if self.previous else {}
        scores = {}
        for n in self.params:
            s = self.walk_score[n].clamp_min(0)
            if n in previous:
                s = 0.5 * (s + self._to_param(previous[n], n))
            scores[n] = s
        return scores

    def state_dict(self):
        return {**super().state_dict(), "fisher": self._cpu(self.fisher), "score": self._cpu(self.score())}


REGULARIZERS: dict[str, type[Regularizer]] = {"ewc": EWC, "pi": PI, "rw": RW}


def make_regularizer(
    name: str,
    params,
    previous_state: dict | None,
    importance: float,
    alpha: float = 0.9,
    normalize: bool = True,
    iterations: int = 10,
    update_after_step: bool = False,
) -> Regularizer:
    """Build the regulariser `name` (ewc, pi, rw) for the trainable `params` of the current model.
    update_after_step=True pairs each gradient with its own step's change (not MiB's order)."""
    cls = REGULARIZERS.get(str(name).lower())
    if cls is None:
        raise UserError("unknown {regularizer}; known: {known}", regularizer=f"regularizer {name!r}",
                        known=", ".join(REGULARIZERS))
    return cls(params, previous_state, importance, alpha=alpha, normalize=normalize, iterations=iterations,
               update_after_step=update_after_step)
