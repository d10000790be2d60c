"""MiCro overhead: the cost of MiCro's three cross-image losses per training iteration, against one
forward pass of the model, and a MiB iteration vs a MiCro iteration (old-model forward + forward +
losses + backward). Prints a markdown table.

Usage (from the repository root; any run.py model/method option is accepted after the benchmark's own):
    python benchmarks/micro_overhead.py                      # paper: batch 12, crop 512, resnet101, OS16, step 1 of 4-1
    python benchmarks/micro_overhead.py --backbone resnet18 --crop_size 128 --batch_size 4 --iters 3   # quick CPU run
    python benchmarks/micro_overhead.py --losses_only        # MiCro losses on synthetic features, no model
    python benchmarks/micro_overhead.py --opt_level O2 --micro_anchors 2048 --micro_pool 1

Benchmark options: --device (auto: cuda if available), --warmup, --iters (median of), --threads.
Weights are random (--no_pretrained is implied); speed does not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch

import argparser
import tasks
from methods import MiB, MiCro, StepContext
from utils.errors import UserError, exit_on_user_error

PAPER_DEFAULTS = ["--batch_size", "12", "--crop_size", "512", "--backbone", "resnet101", "--output_stride", "16",
                  "--task", "4-1", "--step", "1"]


def bench_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (the median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--losses_only", action="store_true", help="time the MiCro losses on synthetic features only")
    return parser.parse_known_args(argv)


def run_opts(rest, method_cls):
    """run.py's options (paper defaults, then the user's) with the method's presets where the user did
    not give the flag."""
    return argparser.parse_args(PAPER_DEFAULTS + list(rest) + ["--no_pretrained", "--method", method_cls.name])


def timer(device, warmup, iters):
    """Median milliseconds of fn() over `iters` runs after `warmup` runs."""

    def measure(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)

    return measure


def autocast(opts, device):
    if opts.opt_level == "O0":
        return contextlib.nullcontext()
    dtype = torch.float16 if opts.opt_level == "O1" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def synthetic_labels(opts, classes, batch, size, device, generator):
    """Blocky label maps (regions of 32 px) over the step's training labels: 0, new classes, some 255."""
    old = sum(classes[:-1])
    choices = torch.tensor([0] + list(range(old, old + classes[-1])) + [255])
    cells = max(size // 32, 1)
    picks = torch.randint(len(choices), (batch, cells, cells), generator=generator)
    labels = choices[picks].repeat_interleave(size // cells, 1).repeat_interleave(size // cells, 2)
    labels = torch.nn.functional.pad(labels, (0, size - labels.shape[2], 0, size - labels.shape[1]), value=255)
    return labels.to(device)


def micro_ctx(opts, classes, step, features, old_features, old_logits, labels, images):
    return StepContext(step=step, old_classes=sum(classes[:-1]) if step > 0 else 0, images=images, labels=labels,
                       logits=old_logits if old_logits is not None else images, features=features,
                       old_logits=old_logits, old_features=old_features)


@exit_on_user_error
def main(argv=None):
    args, rest = bench_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA device is visible; use --device cpu")
    opts_micro, opts_mib = run_opts(rest, MiCro), run_opts(rest, MiB)
    step = opts_micro.step
    classes = tasks.get_per_task_classes(opts_micro.dataset, opts_micro.task, step)
    batch, size = opts_micro.batch_size, opts_micro.crop_size
    generator = torch.Generator().manual_seed(opts_micro.random_seed)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = synthetic_labels(opts_micro, classes, batch, size, device, generator)
    measure = timer(device, args.warmup, args.iters)
    micro = MiCro(argparser.method_options(opts_micro), step, classes)
    rows = {}

    if args.losses_only:
        grid = -(-size // opts_micro.output_stride)
        features = {"pre_logits": torch.randn(batch, 256, grid, grid, device=device, requires_grad=True)}
        old_features = {"pre_logits": torch.randn(batch, 256, grid, grid, device=device)} if step else None
        old_logits = torch.randn(batch, sum(classes[:-1]), size, size, device=device) if step else None
        model = old_model = None
    else:
        from modules import make_model

        model = make_model(argparser.model_options(opts_micro), classes).to(device).train()
        old_model = make_model(argparser.model_options(opts_micro), classes[:-1]).to(device).eval() if step else None
        if old_model is not None:
            for p in old_model.parameters():
                p.requires_grad_(False)
        with torch.no_grad(), autocast(opts_micro, device):
            _, features = model(images)
            old_logits, old_features = old_model(images) if old_model is not None else (None, None)
        features = {k: v.detach().requires_grad_(True) for k, v in features.items()}

        def forward():
            with autocast(opts_micro, device):
                model(images)

        rows["forward (train mode, with autograd graph)"] = measure(forward)

    ctx = micro_ctx(opts_micro, classes, step, features, old_features, old_logits, labels, images)

    def micro_losses():
        terms = micro.extra_losses(ctx)
        sum(terms.values()).backward()

    rows["MiCro losses (forward + backward)"] = measure(micro_losses)
    memory = {}
    if model is not None:
        for name, opts in (("MiB", opts_mib), ("MiCro", opts_micro)):
            method = (MiB if name == "MiB" else MiCro)(argparser.method_options(opts), step, classes)

            def iteration(opts=opts, method=method):
                model.zero_grad(set_to_none=True)
                with autocast(opts, device):
                    terms = method.training_losses(model, old_model, images, labels)
                sum(terms.values()).backward()

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows[f"{name} iteration (old fwd + fwd + losses + bwd)"] = measure(iteration)
            if device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated(device) / 2**30

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads)")
    print(f"\n**device** {device_name} | batch {batch} | crop {size} | {opts_micro.backbone} "
          f"OS{opts_micro.output_stride} | "
          f"{opts_micro.norm_act} | {opts_micro.opt_level} | step {step} of {opts_micro.task} | micro_pool "
          f"{opts_micro.micro_pool}, anchors {opts_micro.micro_anchors} | median of {args.iters}\n")
    print("| measurement | ms |")
    print("|---|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.1f} |")
    forward = rows.get("forward (train mode, with autograd graph)")
    if forward:
        print(f"| ratio MiCro losses / forward | {rows['MiCro losses (forward + backward)'] / forward:.3f} |")
        mib, mic = (rows[f"{n} iteration (old fwd + fwd + losses + bwd)"] for n in ("MiB", "MiCro"))
        print(f"| MiCro / MiB iteration | {mic / mib:.3f} |")
    for name, gib in memory.items():
        print(f"| peak memory {name} iteration (GiB) | {gib:.2f} |")


if __name__ == "__main__":
    main()
