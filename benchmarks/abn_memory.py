"""Peak training memory of in-place ABN against BN + ReLU: one training iteration (forward, loss,
backward) of DeepLabV3 on a ResNet, each variant in a fresh subprocess so that peaks do not mix.

    OMP_NUM_THREADS=2 python benchmarks/abn_memory.py                         # CPU: ResNet-101, batch 2, crop 256
    python benchmarks/abn_memory.py --device cuda --batch_size 12 --crop 512  # the paper's step on a GPU

Variants: `iabn` with the inplace-abn package (when installed), `iabn` with the pure-PyTorch fall-back
(MICRO_PURE_ABN=1), `abn` (BN + LeakyReLU) and `std` (BN + ReLU). On CUDA the figure is
torch.cuda.max_memory_allocated() during the iteration minus the memory allocated before it; on the CPU
it is the growth of the process's peak resident memory (ru_maxrss) over its resident memory before the
iteration (model, optimiser state and input already allocated): an OS-level figure that includes the
allocator's slack, so compare the variants with each other, not with a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

VARIANTS = [("iabn (inplace-abn package)", "iabn", "0"), ("iabn (pure-PyTorch fall-back)", "iabn", "1"),
            ("abn (BN + LeakyReLU)", "abn", "1"), ("std (BN + ReLU)", "std", "1")]


def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args):
    """In the subprocess: one iteration, print a JSON line."""
    import torch
    import torch.nn.functional as F

    from argparser import model_options, parse_args
    from models.norm_act import norm_act_factory
    from modules import make_model
    torch.manual_seed(0)
    device = torch.device(args.device)
    opts = parse_args(["--backbone", args.backbone, "--norm_act", args.norm_act, "--no_pretrained",
                       "--output_stride", str(args.output_stride)])
    model = make_model(model_options(opts), [6]).to(device).train()
    kind = type(norm_act_factory(args.norm_act)(8)).__module__ + "." + type(norm_act_factory(args.norm_act)(8)).__name__
    x = torch.randn(args.batch_size, 3, args.crop, args.crop, device=device)
    y = torch.randint(0, 6, (args.batch_size, args.crop, args.crop), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes()
    logits, _ = model(x)
    F.cross_entropy(logits, y).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak_mib": peak / 2 ** 20, "norm_module": kind}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--output_stride", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--norm_act", default=None, help=argparse.SUPPRESS)  # set in the subprocess
    args = parser.parse_args(argv)
    if args.norm_act:
        return measure(args)
    print(f"peak memory of one training iteration: DeepLabV3 {args.backbone} OS{args.output_stride}, batch "
          f"{args.batch_size}, crop {args.crop}, {args.device}\n\n| norm_act | module used | peak MiB |\n|---|---|---|")
    results = {}
    for label, norm_act, pure in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--backbone", args.backbone,
               "--output_stride", str(args.output_stride), "--batch_size", str(args.batch_size), "--crop",
               str(args.crop), "--norm_act", norm_act]
        out = subprocess.run(cmd, env={**os.environ, "MICRO_PURE_ABN": pure}, capture_output=True, text=True)
        if out.returncode != 0:
            reason = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode
            print(f"| {label} | failed: {reason} | |")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        results[label] = row["peak_mib"]
        print(f"| {label} | {row['norm_module']} | {row['peak_mib']:.0f} |")
    std = results.get("std (BN + ReLU)")
    if std:
        for label, value in results.items():
            print(f"\n{label}: {value / std:.2f} x std" if label != "std (BN + ReLU)" else "", end="")
        print()


if __name__ == "__main__":
    main()
