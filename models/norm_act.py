"""Normalisation + activation layers selected by MiB's `--norm_act` (in-place ABN or pure PyTorch).

Every layer built here has the same state-dict keys (weight, bias, running_mean, running_var,
num_batches_tracked), so checkpoints move freely between the inplace_abn and pure implementations.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError

try:  # the compiled extension may be missing or built against another torch
    import inplace_abn as _inplace_abn

    HAS_INPLACE_ABN = True
except Exception:  # noqa: BLE001 - any import failure means "not usable"
    _inplace_abn = None
    HAS_INPLACE_ABN = False

NORM_ACT_NAMES = ("iabn_sync", "iabn", "abn", "std")
PURE_ABN_ENV = "MICRO_PURE_ABN"
LEAKY_SLOPE = 0.01
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def pure_abn_forced() -> bool:
    """True when MICRO_PURE_ABN asks for the pure-PyTorch in-place ABN even if inplace_abn is installed."""
    return os.environ.get(PURE_ABN_ENV, "").strip().lower() not in ("", "0", "false", "no")


def activate(x, activation, activation_param=LEAKY_SLOPE):
    """Apply `activation` (leaky_relu | relu | identity) in place on a fresh tensor."""
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=activation_param, inplace=True)
    if activation == "relu":
        return F.relu(x, inplace=True)
    if activation == "identity":
        return x
    raise ValueError(f"unknown activation {activation!r}")


class _FillNumBatchesTracked:
    """Mixin: accept checkpoints with or without `num_batches_tracked` (old inplace_abn, converted weights)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict and getattr(self, "num_batches_tracked", None) is not None:
            state_dict[key] = self.num_batches_tracked.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class _AllGatherStats(torch.autograd.Function):
    """all_gather of a 1-D statistics vector -> (world, K), differentiable (gradient = sum over ranks)."""

    @staticmethod
    def forward(ctx, stats, group):
        ctx.group = group
        gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, stats.contiguous(), group=group)
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad_gathered):
        # Every rank's loss depends on every rank's statistics: sum their gradients.
        grad_gathered = grad_gathered.contiguous()
        dist.all_reduce(grad_gathered, group=ctx.group)
        return grad_gathered[dist.get_rank(ctx.group)], None


def synced_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group):
    """Training-mode batch norm with statistics over all ranks of `group` (fp32, differentiable).

    Per-rank mean and M2 are gathered and merged exactly (no E[x^2] - E[x]^2 cancellation);
    the running statistics are updated with the unbiased global variance, as torch does.
    """
    channels = x.shape[1]
    reduce_dims = [0] + list(range(2, x.dim()))
    stat_shape = [1, channels] + [1] * (x.dim() - 2)
    xf = x.float()
    count = xf.numel() // channels
    local_mean = xf.sum(reduce_dims) / max(count, 1)
    local_m2 = (xf - local_mean.view(stat_shape)).pow(2).sum(reduce_dims)
    stats = torch.cat([local_mean, local_m2, local_mean.new_full((1,), float(count))])
    gathered = _AllGatherStats.apply(stats, group)
    means, m2s, counts = gathered[:, :channels], gathered[:, channels:2 * channels], gathered[:, -1:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (m2s.sum(0) + (counts * (means - mean).pow(2)).sum(0)) / total
    if running_mean is not None:
        with torch.no_grad():
            unbiased = var * (total / (total - 1).clamp(min=1))
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    factor = torch.rsqrt(var + eps) * weight
    y = (xf - mean.view(stat_shape)) * factor.view(stat_shape) + bias.view(stat_shape)
    return y.to(x.dtype)


def abs_plus_eps(weight, eps):
    """in-place ABN's scale |w| + eps, with d|w|/dw = +1 at w = 0 as inplace_abn computes it."""
    return torch.where(weight >= 0, weight, -weight) + eps


class ABN(_FillNumBatchesTracked, nn.Module):
    """BatchNorm + activation in pure PyTorch, statistics synchronised over `process_group` in training.

    Plain affine weight (MiB's `abn`). Synchronisation works on CPU (gloo) and CUDA (nccl).
    """

    def __init__(self, num_features, eps=BN_EPS, momentum=BN_MOMENTUM, activation="leaky_relu",
                 activation_param=LEAKY_SLOPE, process_group=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.activation_param = activation_param
        self.process_group = process_group
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def scale(self):
        """The per-channel factor multiplying the normalised input."""
        return self.weight

    def _momentum(self):
        if not self.training:
            return 0.0
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def _sync_world_size(self):
        if self.process_group is None or not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x):
        momentum = self._momentum()
        if self.training and self._sync_world_size() > 1:
            x = synced_batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias, momentum,
                                  self.eps, self.process_group)
        else:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias,
                             self.training, momentum, self.eps)
        return activate(x, self.activation, self.activation_param)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, activation={self.activation}"
                f", synced={self.process_group is not None}")


class PureInPlaceABN(ABN):
    """Pure-PyTorch reproduction of in-place ABN: scale = |weight| + eps (its invertibility trick).

    The gradient of |w| is taken as +1 at w = 0, as inplace_abn does.
    """

    def scale(self):
        return abs_plus_eps(self.weight, self.eps)


class BatchNormAct(_FillNumBatchesTracked, nn.BatchNorm2d):
    """torch BatchNorm2d followed by an activation (MiB's `std`, ReLU)."""

    def __init__(self, num_features, eps=BN_EPS, momentum=BN_MOMENTUM, activation="relu", activation_param=0.0):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.activation = activation
        self.activation_param = activation_param

    def forward(self, x):
        return activate(super().forward(x), self.activation, self.activation_param)


NORM_LAYER_TYPES = (nn.modules.batchnorm._BatchNorm, ABN)

if HAS_INPLACE_ABN:

    def _kernel_dtype(x):
        """inplace_abn's compiled kernels take fp32 (and fp16 on CUDA): under autocast, feed them
        fp32 instead of a dtype they lack; the next convolution casts back to low precision."""
        supported = (torch.float32, torch.float64) + ((torch.float16,) if x.is_cuda else ())
        return x if x.dtype in supported else x.float()

    class InPlaceABN(_FillNumBatchesTracked, _inplace_abn.InPlaceABN):
        """inplace_abn.InPlaceABN that also loads checkpoints lacking num_batches_tracked."""

        def forward(self, x):
            return super().forward(_kernel_dtype(x))

    class InPlaceABNSync(_FillNumBatchesTracked, _inplace_abn.InPlaceABNSync):
        """inplace_abn.InPlaceABNSync that also loads checkpoints lacking num_batches_tracked.

        inplace_abn reduces distributed statistics only on CUDA (and only in CUDA builds); on CPU
        (gloo) training uses the same computation in pure PyTorch, still synchronised.
        """

        def forward(self, x):
            x = _kernel_dtype(x)
            native = x.is_cuda and hasattr(_inplace_abn._backend, "reduce_statistics")
            if not self.training or native or self.group is None:
                return super().forward(x)
            momentum, _ = self._get_momentum_and_training()
            x = synced_batch_norm(x, self.running_mean, self.running_var, abs_plus_eps(self.weight, self.eps),
                                  self.bias, momentum, self.eps, self.group)
            return activate(x, self.activation, self.activation_param)

    NORM_LAYER_TYPES = NORM_LAYER_TYPES + (_inplace_abn.ABN,)


def sync_group():
    """The group iabn_sync synchronises over: every process (WORLD) when a process group of more than one
    process is initialised, else None (nothing to synchronise with). Decided here only: run.py just
    initialises the process group first."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_world_size() > 1 else None


class NormAct:
    """Builder of one kind of norm+activation layer: `norm_act(num_features, activation=None)`.

    activation None means this kind's own activation (leaky_relu 0.01, or relu for `std`);
    "identity" is used for the last BN of a residual branch.
    """

    def __init__(self, name, pure=None):
        if name not in NORM_ACT_NAMES:
            raise UserError(f"unknown norm_act {name!r}; use one of {', '.join(NORM_ACT_NAMES)}")
        self.name = name
        if pure is False and not HAS_INPLACE_ABN and name in ("iabn", "iabn_sync"):
            raise UserError(f"norm_act {name} with the inplace_abn implementation (pure=False) was requested but "
                            "inplace_abn cannot be imported; install inplace-abn or allow the pure-PyTorch one")
        self.pure = (pure_abn_forced() or not HAS_INPLACE_ABN) if pure is None else bool(pure)
        self.group = sync_group() if name == "iabn_sync" else None
        self.activation = "relu" if name == "std" else "leaky_relu"
        self.activation_param = 0.0 if name == "std" else LEAKY_SLOPE

    @property
    def implementation(self):
        """Human-readable description of what is built, for logs."""
        if self.name == "std":
            return "torch BatchNorm2d + ReLU"
        if self.name == "abn":
            return "pure ABN (BatchNorm + LeakyReLU 0.01)"
        kind = "pure-PyTorch in-place ABN" if self.pure else "inplace_abn"
        return f"{kind}, {'synchronised' if self.group is not None else 'not synchronised'}"

    def __call__(self, num_features, activation=None):
        activation = activation or self.activation
        param = self.activation_param if activation == self.activation else LEAKY_SLOPE
        if self.name == "std":
            return BatchNormAct(num_features, activation=activation, activation_param=param)
        if self.name == "abn":
            return ABN(num_features, activation=activation, activation_param=param)
        if activation not in ("leaky_relu", "identity"):
            raise ValueError(f"in-place ABN supports leaky_relu or identity, not {activation!r}")
        if self.pure:
            return PureInPlaceABN(num_features, activation=activation, activation_param=param,
                                  process_group=self.group)
        if self.group is not None:
            return InPlaceABNSync(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, activation=activation,
                                  activation_param=param, group=self.group)
        return InPlaceABN(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, activation=activation,
                          activation_param=param)

    def make_activation(self, inplace=True):
        """The activation applied after a residual sum (a parameter-free module); out of place when the
        sum itself must survive (pre-activation features)."""
        if self.activation == "relu":
            return nn.ReLU(inplace=inplace)
        return nn.LeakyReLU(self.activation_param, inplace=inplace)

    def __repr__(self):
        return f"NormAct({self.name!r}: {self.implementation})"


def norm_act_factory(name, pure=None):
    """Return the builder for norm_act `name` (MiB's --norm_act).

    iabn_sync synchronises over every process (`sync_group`) when a process group of more than one
    process is initialised; otherwise it behaves as iabn. `pure` forces (True) or forbids (False) the
    pure-PyTorch in-place ABN; None = MICRO_PURE_ABN or fallback.
    """
    return NormAct(name, pure=pure)
