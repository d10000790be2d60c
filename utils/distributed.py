"""Process-group set-up for torchrun, torch.distributed.launch, srun and plain `python run.py`."""
from __future__ import annotations

import gc
import os
import re
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
    launcher: str = "python"  # python, torchrun (or launch) or srun
    local_world_size: int = 1  # processes on this node
    nodes: int = 1
    control_group: object = None  # a gloo group for small CPU collectives next to nccl (None: the default group)


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def gpu_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver loaded (GPUs exist, visible or not)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def choose_device(choice: str, local_rank: int, local_world_size: int, *, cuda_built: bool, gpu_count: int,
                  driver_present: bool, visible_devices: str | None, launcher: str = "torchrun",
                  own_gpus: bool = False) -> torch.device:
    """The device of this process for the choice auto|cuda|cpu, or a UserError saying why not (its part `cpu`
    words the CPU choice; a command line rewords it as its option, `err.reworded(cpu="pass --device cpu")`).

    auto: the local rank's GPU when GPUs are visible, else the CPU, unless the machine plainly has GPUs
    that this process cannot see (torch built with CUDA and a driver present, or CUDA_VISIBLE_DEVICES
    set): training days on the CPU by mistake are worse than an error. `own_gpus`: the launcher may have
    given each process GPUs of its own (srun --gpus-per-task): when it sees fewer than the node's
    processes, it takes the first one it sees.
    """
    if choice == "cpu":
        return torch.device("cpu")
    if gpu_count > 0:
        if own_gpus and (local_world_size > gpu_count or local_rank >= gpu_count):
            return torch.device("cuda", 0)
        if local_world_size > gpu_count or local_rank >= gpu_count:
            fix = ("srun --ntasks-per-node" if launcher == "srun" else "--nproc_per_node")
            # {cpu}: the command line names its option there (run.py, scripts/predict_tiles.py)
            raise UserError("{processes} process(es) on this node but only {gpus} GPU(s) visible "
                            "(CUDA_VISIBLE_DEVICES={visible}); lower {fix} to {gpus}, make more GPUs visible, or {cpu}",
                            processes=local_world_size, gpus=gpu_count,
                            visible=visible_devices if visible_devices is not None else "unset", fix=fix,
                            cpu="choose the device 'cpu'")
        return torch.device("cuda", local_rank)
    hidden = cuda_built and (driver_present or visible_devices is not None)
    if choice == "cuda" or hidden:
        if not cuda_built:
            reason = "this torch is a CPU-only build; install the CUDA build of torch"
        else:
            shown = "unset" if visible_devices is None else repr(visible_devices)
            reason = f"torch is built with CUDA but sees no GPU (CUDA_VISIBLE_DEVICES={shown}); check that variable"
        raise UserError("no GPU available: {reason}, or {cpu} to run on the CPU on purpose", reason=reason,
                        cpu="choose the device 'cpu'")
    return torch.device("cpu")


def local_world_size(world_size: int) -> int:
    """Processes on this node: LOCAL_WORLD_SIZE from the launcher, else all of them."""
    return _env_int("LOCAL_WORLD_SIZE", None) or world_size


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_threads_per_process(processes_on_node: int, env=None) -> int:
    """Threads for one of `processes_on_node` CPU processes: the cores this process may use (its CPU
    affinity) shared out evenly, never more than OMP_NUM_THREADS when that is set."""
    env = os.environ if env is None else env
    threads = max(1, available_cpus() // max(1, processes_on_node))
    limit = env.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        threads = min(threads, int(limit))
    return threads


# ---------------------------------------------------------------------------------------------- SLURM (srun)
def expand_hostlist(text: str) -> list[str]:
    """SLURM's compressed host list as host names, in order: `node[01-03,07]` -> node01 node02 node03
    node07; `a[1-2],b3` -> a1 a2 b3; `r[1-2]-n[1-2]` -> r1-n1 r1-n2 r2-n1 r2-n2 (zero padding kept)."""
    parts, depth, current = [], 0, []
    for char in text.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced brackets in host list {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced brackets in host list {text!r}")
    parts.append("".join(current))
    return [host for part in parts if part.strip() for host in _expand_host(part.strip())]


def _expand_host(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[:match.start()], item[match.end():]
    hosts = []
    for value in _expand_ranges(match.group(1), item):
        hosts.extend(_expand_host(head + value + tail))  # the tail may hold more brackets
    return hosts


def _expand_ranges(ranges: str, item: str) -> list[str]:
    values = []
    for piece in ranges.split(","):
        low, _, high = piece.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"cannot read the range {piece!r} of host list item {item!r}")
        width = len(low)  # SLURM pads every number to the width of the range's start
        values.extend(str(n).zfill(width) for n in range(int(low), int(high or low) + 1))
    return values


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM's tasks per node (`SLURM_STEP_TASKS_PER_NODE`) per node: `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for piece in text.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", piece)
        if match is None:
            raise ValueError(f"cannot read tasks per node {text!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_port(job_id: int, step_id: int) -> int:
    """The rendezvous port of srun step `step_id` of job `job_id`: the same on every task, different for the
    steps and jobs that may run side by side, below Linux's ephemeral ports (32768-)."""
    return 15000 + (job_id * 16 + step_id) % 17000


def slurm_launch_env(env) -> dict[str, str] | None:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for
    a task that srun started, from SLURM's; None when torchrun's are set (torchrun inside srun) or when
    this is no srun task (a batch script or salloc shell: SLURM_PROCID without a job step).
    MASTER_ADDR/MASTER_PORT given by the user are kept."""
    if env.get("RANK") or env.get("WORLD_SIZE"):
        return None
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if env.get("SLURM_PROCID") is None or step is None:
        return None

    def number(name, value):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"SLURM variable {name}={value!r} is not an integer; start the run with srun "
                            f"or torchrun") from None

    world = number("SLURM_STEP_NUM_TASKS", env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    nodes_text = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    per_node_text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
    try:
        hosts = expand_hostlist(nodes_text or "localhost")
        per_node = expand_tasks_per_node(per_node_text)
    except ValueError as err:
        raise UserError(f"{err}; set MASTER_ADDR to the first node of the job") from None
    node = number("SLURM_NODEID", env.get("SLURM_NODEID") or "0")
    job = number("SLURM_JOB_ID", env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0")
    return {"RANK": str(number("SLURM_PROCID", env["SLURM_PROCID"])), "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(number("SLURM_LOCALID", env.get("SLURM_LOCALID") or "0")),
            "LOCAL_WORLD_SIZE": str(per_node[node] if node < len(per_node) else per_node[0]),
            "GROUP_WORLD_SIZE": str(len(hosts)),
            "MASTER_ADDR": env.get("MASTER_ADDR") or hosts[0],
            "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(job, int(step) if step.isdigit() else 0))}


# ---------------------------------------------------------------------------------------------- process group
DEFAULT_TIMEOUT_S = 300.0  # a stalled rank ends the run after this long, not torch's default 30 min


def init_distributed(local_rank_arg: int | None = None, device: str = "auto",
                     timeout_s: float | None = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group described by the launcher's environment, or run as one process.

    torchrun (and launch --use-env) set RANK / WORLD_SIZE / LOCAL_RANK; the old
    torch.distributed.launch sets RANK / WORLD_SIZE and passes --local_rank, given here as
    `local_rank_arg`; a task started by srun without torchrun gets them from SLURM's variables
    (slurm_launch_env; they are put into the environment, so that children see one launcher). Without
    WORLD_SIZE > 1 there is no process group. `device` is --device (auto, cuda or cpu; see
    choose_device). On the CPU the threads of each process are sized to its share of the cores (see
    cpu_threads_per_process). `timeout_s` bounds every collective (and the rendezvous): a rank that
    stalls longer makes the others fail instead of waiting.
    """
    launcher = "torchrun" if os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("RANK") else "python"
    from_slurm = slurm_launch_env(os.environ)
    if from_slurm is not None:
        os.environ.update(from_slurm)
        launcher = "srun"
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", None)
    if local_rank is None:
        local_rank = local_rank_arg if local_rank_arg is not None and local_rank_arg >= 0 else 0
    distributed = world_size > 1
    per_node = local_world_size(world_size)
    nodes = _env_int("GROUP_WORLD_SIZE", None) or max(1, world_size // max(per_node, 1))
    cuda_built = torch.version.cuda is not None
    device = choose_device(device, local_rank, per_node, cuda_built=cuda_built,
                           gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                           driver_present=gpu_driver_present(),
                           visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), launcher=launcher,
                           own_gpus=launcher == "srun" and bool(os.environ.get("SLURM_GPUS_PER_TASK")))
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cpu_threads_per_process(per_node))

    if not distributed:
        return DistInfo(0, 1, local_rank, device, False, None, launcher)

    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():  # already joined (e.g. by a test harness): reuse it
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, True, dist.get_backend(),
                        launcher, per_node, nodes)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UserError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set; "
            "launch with torchrun --nproc_per_node=N run.py ... (or plain `python run.py` for one process)"
        )
    timeout = timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
    dist.init_process_group(backend=backend, store=rendezvous_store(rank, world_size, timeout), rank=rank,
                            world_size=world_size, timeout=timeout)
    # nccl reduces GPU tensors only: the per-iteration stop flag (pre-emption) goes through gloo on the CPU
    control = dist.new_group(backend="gloo") if backend == "nccl" else None
    return DistInfo(rank, world_size, local_rank, device, True, backend, launcher, per_node, nodes, control)


def rendezvous_store(rank: int, world_size: int, timeout: timedelta):
    """The key-value store the process group meets in, under a prefix of its own per torchrun restart.

    torchrun's agent keeps one TCP store for all its restarts (TORCHELASTIC_USE_AGENT_STORE) and torch's
    env:// set-up adds no prefix for the attempt: the workers of a restart then read the addresses the
    killed group had published there and fail in gloo's connectFullMesh (Connection refused) or wait on
    counters of the previous group. Keys under `attempt<TORCHELASTIC_RESTART_COUNT>` keep the groups apart.
    Without torchrun's agent (srun, launch) rank 0 hosts the store."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=not agent_store and rank == 0, timeout=timeout)
    return dist.PrefixStore(f"micro/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


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


LOCAL_RANK_OPTIONS = ("--local_rank", "--local-rank")


def relaunch_command(argv: list[str], script: str = "run.py", env=None, drop=()) -> list[str]:
    """The command line that started this process, as a user would type it again (for hints).

    Keeps the launcher (`torchrun --nproc_per_node=N` when started by torchrun, `python -m
    torch.distributed.launch --nproc_per_node=N` when the old launcher passed --local_rank, `srun
    --nodes=M --ntasks-per-node=N` for srun's tasks) and drops --local_rank / --local-rank, which the
    launcher adds itself, and the options named in `drop` (with their values).
    """
    env = os.environ if env is None else env
    kept, skip, old_launcher = [], False, False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LOCAL_RANK_OPTIONS:
            skip, old_launcher = True, True
        elif arg.startswith(tuple(name + "=" for name in LOCAL_RANK_OPTIONS)):
            old_launcher = True
        elif arg in drop:
            skip = True
        elif not arg.startswith(tuple(name + "=" for name in drop)):
            kept.append(arg)
    world_size = int(env.get("WORLD_SIZE") or 1)
    per_node = int(env.get("LOCAL_WORLD_SIZE") or world_size)
    if world_size <= 1 and not old_launcher:
        return ["python", script, *kept]
    if env.get("SLURM_STEP_ID") is not None and not env.get("TORCHELASTIC_RUN_ID") and not old_launcher:
        nodes = max(1, world_size // max(per_node, 1))
        return ["srun", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "python", script, *kept]
    launcher = ["python", "-m", "torch.distributed.launch"] if old_launcher else ["torchrun"]
    launcher.append(f"--nproc_per_node={per_node}")
    if world_size > per_node:
        launcher.append(f"--nnodes={world_size // per_node}")
    return [*launcher, script, *kept]
