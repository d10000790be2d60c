"""The step's data loaders: a shuffled, seeded (distributed) training loader and evaluation loaders that
see every crop exactly once; worker counts and seeds."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from utils.distributed import DistributedEvalSampler, available_cpus, local_world_size
from utils.errors import UserError

from .incremental import SeededSampler
from .options import DataOptions
from .transforms import BatchNormalize


def default_num_workers(dist) -> int:
    """min(8, CPUs available / processes on this machine), at least 1."""
    return max(1, min(8, available_cpus() // max(local_world_size(dist.world_size), 1)))


def seed_worker(worker_id: int) -> None:
    """numpy and random in a loader worker follow the worker's torch seed (set from the loader's seeded
    generator). Training augmentation draws from torch seeded per item (dataset.SeededSampler) instead."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)  # noqa: NPY002 - transforms may draw from the global state
    random.seed(seed)


def make_loaders(data: DataOptions, dist, train_set, val_set, test_set):
    """Shuffled (distributed) training loader; evaluation loaders that see every crop exactly once
    (None for a dataset given as None).

    Batches of data.batch_size per process. Workers: data.num_workers, or min(8, CPUs / processes); on
    CUDA pinned memory; workers persist across epochs; each worker keeps 4 batches in flight (items are
    cheap uint8 crops)."""
    pin = dist.device.type == "cuda"
    workers = data.num_workers if data.num_workers is not None else default_num_workers(dist)
    # Worker seeds only: what a training item looks like comes from SeededSampler's seeds, never from these.
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                  generator=torch.Generator().manual_seed(data.random_seed))
    if workers > 0:
        common.update(prefetch_factor=4, worker_init_fn=seed_worker)

    def eval_loader(ds):
        if ds is None:
            return None
        sampler = (DistributedEvalSampler(ds, dist.world_size, dist.rank) if dist.distributed
                   else SequentialSampler(ds))
        return DataLoader(ds, batch_size=data.batch_size, sampler=sampler, **common)

    train_loader = None
    if train_set is not None:
        # The training order and every item's augmentation follow the seed and the epoch alone (and the rank).
        rank_seed = np.random.SeedSequence([data.random_seed, dist.rank]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(rank_seed))
        order = (DistributedSampler(train_set, dist.world_size, dist.rank, shuffle=True, seed=data.random_seed)
                 if dist.distributed else RandomSampler(train_set, generator=generator))
        sampler = SeededSampler(order, generator)
        if len(train_set) < data.batch_size * dist.world_size:
            raise UserError(
                f"step {data.step} has {len(train_set)} training crops, fewer than one batch "
                f"({data.batch_size} x {dist.world_size} processes); lower --batch_size"
            )
        train_loader = DataLoader(train_set, batch_size=data.batch_size, sampler=sampler, drop_last=True, **common)
    return train_loader, eval_loader(val_set), eval_loader(test_set)


def input_normalizer(meta, channels_last: bool = False) -> BatchNormalize:
    """uint8 batches -> normalised float input on the device, with the data's mean and std (meta.json)."""
    return BatchNormalize(meta["mean"], meta["std"], channels_last=channels_last)
