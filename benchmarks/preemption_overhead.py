"""Cost of the per-iteration pre-emption check (utils.preemption.Preemption.should_stop: one int32
all-reduce on the CPU) against a training iteration, side by side in the same 2 gloo processes.

    OMP_NUM_THREADS=1 python benchmarks/preemption_overhead.py [--backbone resnet18 --crop 64 --batch_size 2]

The iteration is a DDP forward/backward/SGD step of DeepLabV3 at the given size: at the tests' tiny size
it is an upper bound of the relative cost (real steps' iterations are far longer, the check is not).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(rank, args, port, queue):
    import torch.distributed as dist
    import torch.nn.functional as F

    from argparser import model_options, parse_args
    from modules import make_model
    from utils.distributed import rendezvous_store
    from utils.preemption import Preemption

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=rendezvous_store(rank, 2, timedelta(seconds=60)), rank=rank, world_size=2)
    check = Preemption([], distributed=True)
    for _ in range(50):
        check.should_stop()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.checks):
        check.should_stop()
    per_check = (time.perf_counter() - t0) / args.checks

    torch.manual_seed(0)
    opts = parse_args(["--backbone", args.backbone, "--norm_act", "iabn", "--no_pretrained"])
    model = torch.nn.parallel.DistributedDataParallel(make_model(model_options(opts), [6]).train())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch_size, 3, args.crop, args.crop)
    y = torch.randint(0, 6, (args.batch_size, args.crop, args.crop))

    def iteration():
        logits, _ = model(x)
        F.cross_entropy(logits, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    iteration()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.iterations):
        iteration()
    per_iteration = (time.perf_counter() - t0) / args.iterations
    if rank == 0:
        queue.put((per_check, per_iteration))
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args, port, queue), nprocs=2)
    per_check, per_iteration = queue.get()
    print(f"2 gloo processes, {args.backbone} crop {args.crop} batch {args.batch_size}: stop check "
          f"{1e6 * per_check:.0f} us, training iteration {1e3 * per_iteration:.1f} ms, "
          f"check / iteration {100 * per_check / per_iteration:.3f} %")


if __name__ == "__main__":
    main()
