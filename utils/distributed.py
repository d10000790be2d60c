"""Process-group set-up for torchrun, torch.distributed.launch and plain `python run.py`."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from utils.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    backend: str | None


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


DEFAULT_TIMEOUT_S = 300.0  # a stalled rank ends the run after this long, not torch's default 30 min


def init_distributed(local_rank_arg: int | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group described by the launcher's environment, or run as one process.

    torchrun (and launch --use-env) set RANK / WORLD_SIZE / LOCAL_RANK; the old
    torch.distributed.launch sets RANK / WORLD_SIZE and passes --local_rank, given here as
    `local_rank_arg`. Without WORLD_SIZE > 1 there is no process group. `timeout_s` bounds every
    collective (and the rendezvous): a rank that stalls longer makes the others fail instead of waiting.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", None)
    if local_rank is None:
        local_rank = local_rank_arg if local_rank_arg is not None and local_rank_arg >= 0 else 0
    distributed = world_size > 1
    use_cuda = torch.cuda.is_available()

    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; "
                "lower --nproc_per_node or check CUDA_VISIBLE_DEVICES"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if not distributed:
        return DistInfo(0, 1, local_rank, device, False, None)

    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():  # already joined (e.g. by a test harness): reuse it
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, True, dist.get_backend())
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; "
            "launch with torchrun --nproc_per_node=N run.py ... (or plain `python run.py` for one process)"
        )
    timeout = timedelta(seconds=float(timeout_s)) if timeout_s else None
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timeout)
    return DistInfo(rank, world_size, local_rank, device, True, backend)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if not _initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (no-op in a single process); returns it."""
    if not _initialized():
        return tensor
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        # NCCL reduces CUDA tensors only: go through the current GPU and copy back.
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        tensor.copy_(on_gpu)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (returned as is in a single process)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] in a single process)."""
    if not _initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BN running statistics; a no-op in a single process).

    Without synchronised BN each rank's last training forward leaves its own running statistics;
    evaluating with rank 0's makes every rank test the model that rank 0 saves.
    """
    if not _initialized():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


def cleanup() -> None:
    """Destroy the process group; call it once the models wrapped in DDP are no longer referenced."""
    if _initialized():
        # DDP wrappers sit in reference cycles, which keep the process group alive past this call.
        # Collect them first so that gloo's worker threads are joined here: left running until
        # interpreter exit, a thread releasing its last work object aborts the process (SIGABRT).
        gc.collect()
        dist.destroy_process_group()


class DistributedEvalSampler(Sampler):
    """Rank r takes indices r, r+W, r+2W, ...: every sample exactly once overall, no padding.

    Ranks may then run different numbers of batches: evaluate under torch.no_grad() and
    without collectives per batch (DDP forward does none under no_grad); sum metrics after.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None):
        self.num_replicas = get_world_size() if num_replicas is None else int(num_replicas)
        self.rank = get_rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        self.indices = range(self.rank, len(dataset), self.num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler; order is fixed
        pass
