"""Cost of seeding every training item's augmentation (dataset.SeededSampler): one 512 px crop through
IncrementalDataset with the training transform, unseeded vs seeded, with the same random draws, measured
side by side (interleaved rounds, median).

    OMP_NUM_THREADS=1 python benchmarks/seeded_augmentation.py [--rounds 10] [--items 200]
"""
import argparse
import time

import numpy as np
import torch

from dataset.incremental import IncrementalDataset
from dataset.transforms import train_transform


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--crop", type=int, default=512)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    crop = (rng.integers(0, 256, (args.crop, args.crop, 3), dtype=np.uint8),
            rng.integers(0, 6, (args.crop, args.crop), dtype=np.uint8))
    ds = IncrementalDataset([crop], [0], np.arange(256, dtype=np.uint8), train_transform(args.crop))
    times = {"unseeded": [], "seeded": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        for i in range(args.items):  # the same draws as the seeded item i, from the global generator
            torch.default_generator.manual_seed(i)
            ds[0]
        times["unseeded"].append((time.perf_counter() - start) / args.items)
        start = time.perf_counter()
        for i in range(args.items):
            ds[(0, i)]
        times["seeded"].append((time.perf_counter() - start) / args.items)
    unseeded, seeded = (float(np.median(times[k])) for k in ("unseeded", "seeded"))
    print(f"{args.crop} px crop: unseeded {unseeded * 1e3:.3f} ms, seeded {seeded * 1e3:.3f} ms, "
          f"seeded / unseeded {seeded / unseeded:.3f} (threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
