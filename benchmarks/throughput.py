"""Does the input path keep the model fed? One run measures, side by side:

(a) the data path per crop on one thread (decode + augmentation of one 512 px training crop), the old
    path (PNG + whole-crop float rescale + per-item normalisation) against the new one (crop store +
    OpenCV scale-crop-flip-rotate on uint8) and against a plain PNG decode of the same crop (image and
    label, nothing else), optionally the training transform of another version of dataset/transforms.py
    (--baseline_transforms FILE), and DataLoader throughput in crops/s for 1, 2, ... workers, both paths;
(b) the model: images/s of one training iteration (old-model forward, forward, losses, backward, SGD
    step) of FT, MiB, MiCro and MiB-CD at step 1 of 4-1; on CUDA also peak memory, host syncs inside
    the iteration and model FLOP utilisation (torch.utils.flop_counter against the device's peak);
(c) loader crops/s at the default --num_workers over the model's images/s (>= 3 keeps it fed).

The synthetic 512 px crops are made in a temporary folder (synthetic Potsdam, processed with PNG
previews so both paths read the same crops). Usage, from the repository root:

    OMP_NUM_THREADS=2 python benchmarks/throughput.py                     # CPU: reduced model (minutes)
    python benchmarks/throughput.py --device cuda --backbone resnet101 --model_crop 512 --batch_size 12 \\
        --opt_level O2 --channels_last                                   # the paper's step on a GPU

Options: --workers 1,2 (loader worker counts), --loader_batches N, --iters N, --methods FT,MiB,...,
--peak_tflops X (device peak when the GPU is not in the built-in table), --channels RGBIR (4-band
crops), --baseline_transforms FILE
(e.g. `git show <commit>:dataset/transforms.py > /tmp/old_transforms.py`). Prints markdown tables.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from argparser import method_options, model_options, optimizer_options, parse_args, train_options
from benchmarks.legacy_pipeline import legacy_train_transform, read_png
from dataset.incremental import IncrementalDataset, label_lut
from dataset.isprs import ISPRSCrops
from dataset.layout import load_meta
from dataset.loaders import default_num_workers
from dataset.transforms import BatchNormalize, train_transform
from methods import SetupContext, get_method_class
from modules import make_model
from process_data.isprs_processing import POTSDAM
from process_data.make_synthetic_isprs import generate
from process_data.tile_processing import process_dataset
from train import Trainer, compile_model
from utils.distributed import DistInfo, available_cpus
from utils.optimizer import make_optimizer

CROP = 512
# dense peak FLOP/s: (16-bit tensor cores, TF32 tensor cores); fp32 convolutions run as TF32 in cuDNN
# by default, so O0 is measured against the TF32 peak
PEAKS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12),
         "A10": (125e12, 62.5e12), "L4": (121e12, 60e12), "4090": (165e12, 82.6e12), "V100": (125e12, 15.7e12)}


class PngCrops(ISPRSCrops):
    """The same crops read from the PNG previews (the path before the crop store)."""

    def __getitem__(self, index):
        name = self.names[index]
        return read_png(self.png_dirs["images"] / name), read_png(self.png_dirs["labels"] / name)


def baseline_dataset(data_root, path):
    """The store crops through the train_transform of another version of dataset/transforms.py."""
    spec = importlib.util.spec_from_file_location("baseline_transforms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    meta = load_meta(data_root, "potsdam")
    return IncrementalDataset(ISPRSCrops(data_root, "potsdam", "train", meta), np.arange(len(meta["train"]["crops"])),
                              label_lut("potsdam", "offline", 0, "train"), module.train_transform(CROP))


class AugmentationOnly:
    """The training transform of `dataset` alone, on its items' crops held in memory (remapped labels)."""

    def __init__(self, dataset):
        self.items = [(np.array(image), dataset.lut[label]) for image, label in
                      (dataset.base[i] for i in range(len(dataset.base)))]
        self.transform = dataset.transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.transform(*self.items[index])


def make_data(root, channels=None):
    raw = Path(root) / "raw"
    generate("potsdam", raw, seed=0, tile_size=1536, n_train=2, n_test=1)
    process_dataset(POTSDAM, raw, Path(root) / "data", crop_size=CROP, stride=CROP, progress=False, png=True,
                    channels=channels)
    return Path(root) / "data"


def datasets(data_root):
    meta = load_meta(data_root, "potsdam")
    lut = label_lut("potsdam", "offline", 0, "train")
    indices = np.arange(len(meta["train"]["crops"]))
    old = IncrementalDataset(PngCrops(data_root, "potsdam", "train", meta), indices, lut,
                             legacy_train_transform(CROP, meta["mean"], meta["std"]))
    new = IncrementalDataset(ISPRSCrops(data_root, "potsdam", "train", meta), indices, lut, train_transform(CROP))
    return old, new


def per_crop_ms(dataset, repeats, seed=0):
    """Median (wall, CPU) ms per item on one thread; CPU time is the steadier figure on a shared machine."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    wall, cpu = [], []
    for r in range(seed, seed + repeats):
        torch.manual_seed(r)
        start, start_cpu = time.perf_counter(), time.process_time()
        for i in range(len(dataset)):
            dataset[i]
        wall.append((time.perf_counter() - start) / len(dataset) * 1000)
        cpu.append((time.process_time() - start_cpu) / len(dataset) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def loader_rate(dataset, workers, batches, batch_size=8):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(0))
    seen, it = 0, iter(loader)
    next(it)  # workers started and warm
    start = time.perf_counter()
    while seen < batches * batch_size:
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += len(images)
    rate = seen / (time.perf_counter() - start)
    del it, loader
    return rate


def model_rates(args, device, meta):
    rows = []
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device, distributed=False, backend=None)
    logger = argparse.Namespace(info=lambda *a, **k: None, add_scalars=lambda *a, **k: None,
                                add_scalar=lambda *a, **k: None)
    for method in args.methods:
        argv = ["--method", method, "--task", "4-1", "--step", "1", "--dataset", "potsdam", "--no_pretrained",
                "--backbone", args.backbone, "--crop_size", str(args.model_crop), "--batch_size",
                str(args.batch_size), "--opt_level", args.opt_level, "--norm_act", args.norm_act]
        argv += ["--channels_last"] if args.channels_last else []
        opts = parse_args(argv)
        torch.manual_seed(0)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = make_model(model_options(opts), [5, 1]).to(device, memory_format=fmt)
        old_model = make_model(model_options(opts), [5]).to(device, memory_format=fmt).eval().requires_grad_(False)
        method_obj = get_method_class(method)(method_options(opts), 1, [5, 1])
        method_obj.init_new_model(model)
        method_obj.setup(SetupContext(model=model))
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_options(opts), device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        train_model = compile_model(model, device) if args.compile else model
        trainer = Trainer(train_model, old_model if method_obj.uses_old_model else None, method_obj, optimizer,
                          scheduler, train_options(opts), dist, logger,
                          input_norm=BatchNormalize(meta["mean"], meta["std"], args.channels_last))
        g = torch.Generator().manual_seed(0)
        shape = (args.batch_size, args.model_crop, args.model_crop)
        images = torch.randint(0, 256, shape + (3,), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 6, shape, generator=g, dtype=torch.uint8)
        if device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()
        for _ in range(args.warmup):
            trainer._train_iteration(images, labels)
        sync()
        row = {"method": method}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("warn")
        times = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(args.iters):
                start = time.perf_counter()
                trainer._train_iteration(images, labels)
                sync()
                times.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            row["host_syncs_per_iter"] = sum("synchroniz" in str(w.message) for w in caught) / args.iters
        seconds = statistics.median(times)
        row["ms_per_iter"] = seconds * 1000
        row["images_per_s"] = args.batch_size / seconds
        if device.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode
            with FlopCounterMode(display=False) as counter:
                trainer._train_iteration(images, labels)
            flops = counter.get_total_flops()
            peak = args.peak_tflops * 1e12 if args.peak_tflops else _device_peak(args.opt_level)
            row["tflop_per_iter"] = flops / 1e12
            row["mfu"] = flops / seconds / peak if peak else float("nan")
        rows.append(row)
        del trainer, model, old_model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _device_peak(opt_level):
    name = torch.cuda.get_device_name()
    for key, (half, tf32) in PEAKS.items():
        if key in name:
            return half if opt_level in ("O1", "O2") else tf32
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", default=None, help="comma-separated loader worker counts (default 1..CPUs)")
    parser.add_argument("--loader_batches", type=int, default=12, help="batches of 8 timed per loader")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the crops for the per-crop time")
    parser.add_argument("--methods", default="FT,MiB,MiCro,MiB-CD")
    parser.add_argument("--backbone", default=None, help="default resnet101 on CUDA, resnet18 on CPU")
    parser.add_argument("--model_crop", type=int, default=None, help="default 512 on CUDA, 256 on CPU")
    parser.add_argument("--batch_size", type=int, default=None, help="default 12 on CUDA, 2 on CPU")
    parser.add_argument("--opt_level", default="O0", choices=["O0", "O1", "O2"])
    parser.add_argument("--norm_act", default="iabn")
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--skip_loader", action="store_true")
    parser.add_argument("--skip_model", action="store_true", help="only (a): the data path")
    parser.add_argument("--channels", default=None, help="Potsdam bands of the crops: RGB (default) or RGBIR")
    parser.add_argument("--baseline_transforms", default=None,
                        help="a dataset/transforms.py of another version to time side by side in (a)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    args.backbone = args.backbone or ("resnet101" if cuda else "resnet18")
    args.model_crop = args.model_crop or (512 if cuda else 256)
    args.batch_size = args.batch_size or (12 if cuda else 2)
    args.methods = args.methods.split(",")
    cpus = available_cpus()
    workers = [int(w) for w in args.workers.split(",")] if args.workers else list(range(1, cpus + 1))
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=device, distributed=False, backend=None)
    default_workers = default_num_workers(one)
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}; {cpus} CPUs available; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; torch {torch.__version__}; default "
          f"--num_workers {default_workers}")
    with tempfile.TemporaryDirectory() as tmp:
        data_root = make_data(tmp, args.channels)
        meta = load_meta(data_root, "potsdam")
        old, new = datasets(data_root)
        rates = {}
        if not args.skip_loader:
            threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
            png = PngCrops(data_root, "potsdam", "train", meta)  # a plain decode: no remapping, no augmentation
            baseline = baseline_dataset(data_root, args.baseline_transforms) if args.baseline_transforms else None
            # side by side: the paths alternate within each pass
            paths = {"old": old, "new": new, "png": png, "baseline": baseline, "new_aug": AugmentationOnly(new),
                     "baseline_aug": AugmentationOnly(baseline) if baseline is not None else None}
            times = {name: [] for name in paths}
            for r in range(args.repeats):
                for name, ds in paths.items():
                    if ds is not None:
                        times[name].append(per_crop_ms(ds, 1, seed=r))
            old_ms, new_ms, png_ms = (tuple(map(statistics.median, zip(*times[n]))) for n in ("old", "new", "png"))
            torch.set_num_threads(threads)
            cv2.setNumThreads(cv_threads)
            print(f"\n(a) one {CROP} px training crop, decode + augmentation + label remapping, one thread "
                  f"({len(new)} crops of {new.base[0][0].shape[-1]} bands x {args.repeats}, median)\n\n"
                  f"| path | wall ms / crop | CPU ms / crop | crops/s per worker (CPU time) |\n|---|---|---|---|")
            print(f"| old: PNG + float whole-crop rescale + normalise | {old_ms[0]:.2f} | {old_ms[1]:.2f} | "
                  f"{1000 / old_ms[1]:.0f} |")
            if baseline is not None:
                base_ms = tuple(map(statistics.median, zip(*times["baseline"])))
                print(f"| crop store + {args.baseline_transforms} | {base_ms[0]:.2f} | {base_ms[1]:.2f} | "
                      f"{1000 / base_ms[1]:.0f} |")
            print(f"| new: crop store + OpenCV scale-crop-flip-rotate on uint8 | {new_ms[0]:.2f} | {new_ms[1]:.2f} | "
                  f"{1000 / new_ms[1]:.0f} |")
            print(f"| plain PNG decode of the same crop (image + label), nothing else | {png_ms[0]:.2f} | "
                  f"{png_ms[1]:.2f} | |")
            print(f"| speed-up new / old | {old_ms[0] / new_ms[0]:.1f}x | {old_ms[1] / new_ms[1]:.1f}x | |")
            if baseline is not None:
                print(f"| speed-up new / baseline | {base_ms[0] / new_ms[0]:.1f}x | {base_ms[1] / new_ms[1]:.1f}x | |")
            print(f"| new item / PNG decode | {new_ms[0] / png_ms[0]:.2f} | {new_ms[1] / png_ms[1]:.2f} | |")
            aug_ms = tuple(map(statistics.median, zip(*times["new_aug"])))
            print(f"| augmentation alone (crop in memory), new | {aug_ms[0]:.2f} | {aug_ms[1]:.2f} | |")
            if baseline is not None:
                base_aug = tuple(map(statistics.median, zip(*times["baseline_aug"])))
                print(f"| augmentation alone, baseline | {base_aug[0]:.2f} | {base_aug[1]:.2f} | |")
                print(f"| augmentation alone, baseline / new | {base_aug[0] / aug_ms[0]:.1f}x | "
                      f"{base_aug[1] / aug_ms[1]:.1f}x | |")
            print(f"\nDataLoader, batches of 8, {args.loader_batches} batches timed after the first\n\n"
                  f"| workers | old crops/s | new crops/s | new / old |\n|---|---|---|---|")
            for w in sorted(set(workers + [default_workers])):
                r_old = loader_rate(old, w, args.loader_batches)
                r_new = loader_rate(new, w, args.loader_batches)
                rates[w] = (r_old, r_new)
                print(f"| {w} | {r_old:.0f} | {r_new:.0f} | {r_new / r_old:.1f} |")

        if args.skip_model:
            return
        rows = model_rates(args, device, meta)
        print(f"\n(b) one training iteration at step 1 of 4-1: {args.backbone}, crop {args.model_crop}, batch "
              f"{args.batch_size}, {args.opt_level}, {args.norm_act}"
              f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''} "
              f"(median of {args.iters})\n")
        extra = ["peak_mem_gib", "host_syncs_per_iter", "tflop_per_iter", "mfu"] if cuda else []
        print("| method | ms / iteration | images/s | " + " | ".join(extra) + (" |" if extra else "") +
              (" loader / model (default workers, new) | old loader / model |" if rates else ""))
        print("|---" * (3 + len(extra) + (2 if rates else 0)) + "|")
        for row in rows:
            cells = [row["method"], f"{row['ms_per_iter']:.0f}", f"{row['images_per_s']:.2f}"]
            cells += [f"{row[k]:.3g}" for k in extra]
            if rates:
                r_old, r_new = rates[default_workers]
                cells += [f"{r_new / row['images_per_s']:.1f}", f"{r_old / row['images_per_s']:.1f}"]
            print("| " + " | ".join(cells) + " |")
        if rates:
            per_worker = rates[min(rates)][1] / min(rates)
            print(f"\n(c) at the default --num_workers {default_workers} the new loader gives "
                  f"{rates[default_workers][1]:.0f} crops/s ({per_worker:.0f} per worker here); a model consuming "
                  f"R images/s needs about 3 x R / {per_worker:.0f} workers to be fed 3 times over.")


if __name__ == "__main__":
    main()
