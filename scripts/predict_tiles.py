"""Predict whole tiles with a saved step and score them (full-tile mIoU); any built-in dataset, or one of your
own with --spec.

    python scripts/predict_tiles.py --ckpt checkpoints/step/4-1-vaihingen_MiB_1.pth --src RAW --out preds/

Every official test tile found in the raw archives (--src, zipped or extracted, as for process_data/) is
predicted with a sliding window (--window px, --overlap between windows; the logits of overlapping
windows are averaged), then written as `<tile>_pred.png` (a colour label image in the dataset's palette; for
ISPRS the format of the benchmark's submissions) and `<tile>_preview.png` (downsized image | ground truth |
prediction with the legend). The confusion matrix of every tile against its label (ISPRS: eroded by default,
the ISPRS convention) gives per-tile and overall metrics in `metrics.csv` / `metrics.json` (mIoU old/new/all as in the
results files) and on the console.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import tasks
from dataset.colormap import colorize
from dataset.incremental import label_lut
from dataset.layout import load_meta
from modules import ModelOptions, make_model
from process_data.archives import RawSource
from process_data.tile_processing import as_layout
from process_data.tiling import crop_positions
from utils.checkpoint import load_checkpoint
from utils.distributed import choose_device, cpu_threads_per_process, gpu_driver_present
from utils.errors import UserError, exit_on_user_error
from utils.metrics import SegmentationMetrics, format_table

PREVIEW_SIDE = 768  # longest side of a preview panel, in pixels


class StepModel:
    """A saved step ready for inference: the model in eval mode, its class order and normalisation."""

    def __init__(self, ckpt_path, device, data_root=None):
        checkpoint = load_checkpoint(ckpt_path)
        saved = checkpoint.get("opts")
        if not isinstance(saved, dict) or "model" not in checkpoint or "classes" not in checkpoint:
            raise UserError(f"{ckpt_path} is not a step checkpoint of run.py (no model/classes/opts entries)")
        opts = argparse.Namespace(**saved)
        self.dataset, self.task = opts.dataset, opts.task
        self.step = int(checkpoint.get("step", len(checkpoint["classes"]) - 1))
        self.classes = list(checkpoint["classes"])
        self.num_channels = sum(self.classes)  # channels of the seen classes (MiB-CD: background included)
        self.meta = load_meta(data_root or opts.data_root, self.dataset)  # mean / std / channels of training
        tasks.prepare(self.dataset, data_root or opts.data_root, getattr(opts, "task_file", None))
        self.window = int(getattr(opts, "crop_size", None) or self.meta["crop_size"])
        # the weights come from the checkpoint
        self.model = make_model(ModelOptions.from_recorded(saved, no_pretrained=True), self.classes).to(device)
        missing, unexpected = self.model.load_state_dict(checkpoint["model"], strict=False)
        if missing or unexpected:
            raise UserError(f"{ckpt_path} does not match the model its own options describe: missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}")
        self.model.eval()
        self.device = device
        self.mean = torch.tensor(self.meta["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(self.meta["std"], dtype=torch.float32).view(-1, 1, 1)

    def channel_to_class(self) -> np.ndarray:
        return tasks.channel_to_class(self.dataset, self.task)

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        """uint8 H x W x C tile -> float32 C x H x W, normalised as the training crops were."""
        if image.shape[2] != len(self.meta["mean"]):
            raise UserError(f"the tile has {image.shape[2]} bands but the step was trained on "
                            f"{len(self.meta['mean'])} ({self.meta['channels']})")
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def predict_logits(self, image: np.ndarray, window: int | None = None, overlap: float = 0.5,
                       batch_size: int = 4) -> torch.Tensor:
        """Averaged logits [channels, H, W] (CPU float32) of a whole tile by a sliding window."""
        window = int(window or self.window)
        return sliding_window_logits(self.model, self.normalise(image), window, overlap, batch_size, self.device)


def window_stride(window: int, overlap: float) -> int:
    if not 0 <= overlap < 1:
        raise UserError(f"--overlap {overlap}: must be at least 0 and below 1 (a fraction of --window)")
    return max(1, int(round(window * (1 - overlap))))


def sliding_window_logits(model, image: torch.Tensor, window: int, overlap: float, batch_size: int,
                          device) -> torch.Tensor:
    """Logits [K, H, W] of `model` over a normalised image [C, H, W]: windows every
    window·(1 - overlap) px (the last one aligned to the edge, as the processing crops are), each
    pixel's logits averaged over the windows that cover it. A side shorter than the window is
    zero-padded for the forward pass and cropped back."""
    channels, height, width = image.shape
    stride = window_stride(window, overlap)
    starts = [(y, x) for y in crop_positions(height, window, stride) for x in crop_positions(width, window, stride)]
    padded = torch.zeros(channels, max(height, window), max(width, window))
    padded[:, :height, :width] = image
    total, count = None, torch.zeros(1, padded.shape[1], padded.shape[2])
    for first in range(0, len(starts), batch_size):
        batch_starts = starts[first:first + batch_size]
        batch = torch.stack([padded[:, y:y + window, x:x + window] for y, x in batch_starts]).to(device)
        logits, _ = model(batch)
        logits = logits.float().cpu()
        if total is None:
            total = torch.zeros(logits.shape[1], padded.shape[1], padded.shape[2])
        for (y, x), window_logits in zip(batch_starts, logits):
            total[:, y:y + window, x:x + window] += window_logits
            count[:, y:y + window, x:x + window] += 1
    return (total / count)[:, :height, :width]


def score(step_model: StepModel, predictions: np.ndarray, label: np.ndarray, metrics: SegmentationMetrics):
    """Add one tile to `metrics` (channel space): label = class index map (255 ignored); classes the
    step has not seen are ignored, as in the crop-level test."""
    lut = label_lut(step_model.dataset, step_model.task, step_model.step, "test")
    metrics.update(torch.from_numpy(predictions.astype(np.int64)), torch.from_numpy(lut[label].astype(np.int64)))


def summary(step_model: StepModel, metrics: SegmentationMetrics) -> dict:
    """old = classes of step 0, new = classes added later (as channel indices), like run.py's test."""
    first = step_model.classes[0]
    return metrics.results(old_classes=list(range(first)), new_classes=list(range(first, step_model.num_channels)))


def preview(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, title: str, names, palette=None):
    """Downsized image | ground truth | prediction with the legend (the dataset's names and palette)."""
    from utils.reporting.logger import prediction_figure

    step = max(1, int(np.ceil(max(image.shape[:2]) / PREVIEW_SIDE)))
    columns = [image[None, ::step, ::step, :3], colorize(label[::step, ::step], palette)[None],
               colorize(prediction[::step, ::step], palette)[None]]
    fig = prediction_figure(columns, ["image", "ground truth", f"prediction ({title})"], names, palette=palette)
    return fig


def build_parser():
    parser = argparse.ArgumentParser(
        prog="scripts/predict_tiles.py", allow_abbrev=False,
        description="Predict whole ISPRS tiles with a saved step (sliding window, averaged logits), write "
                    "colour label PNGs and previews, and score them (per-tile and overall mIoU).")
    parser.add_argument("--ckpt", required=True, help="step checkpoint written by run.py (checkpoints/step/...)")
    parser.add_argument("--src", required=True, help="folder of the raw ISPRS archives, zipped or extracted")
    parser.add_argument("--out", required=True, help="folder for the PNGs and metrics.csv / metrics.json")
    parser.add_argument("--data_root", default=None,
                        help="processed data whose meta.json gave the training normalisation (default: the "
                             "checkpoint's --data_root)")
    parser.add_argument("--tiles", nargs="+", default=None,
                        help="tile ids to predict, e.g. area2 area4 or 2_13 (default: every official test tile found)")
    parser.add_argument("--spec", default=None,
                        help="dataset spec of a dataset of your own (built-in datasets: their shipped spec)")
    parser.add_argument("--labels", default=None,
                        help="label variant to score against (ISPRS: eroded or complete, default eroded when its "
                             "archive is there; other datasets: their spec's)")
    parser.add_argument("--window", type=int, default=None,
                        help="sliding-window size in px (default: the checkpoint's training crop size)")
    parser.add_argument("--overlap", type=float, default=0.5, help="overlap of neighbouring windows, a fraction "
                        "of --window (default: 0.5)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default: 4)")
    parser.add_argument("--no_preview", action="store_true", help="write only the colour label PNGs")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="as run.py's --device "
                        "(default: auto)")
    return parser


def locate(step_model: StepModel, src, tile_ids, labels, spec=None):
    """[(split, tile, image locator, label locator)] of the wanted tiles and the open RawSource."""
    layout = as_layout(spec or step_model.dataset)
    source = RawSource(src, layout.wanted_folders())
    try:
        found, _ = layout.locate(source, step_model.meta["channels"], labels)
    except BaseException:
        source.close()
        raise
    if tile_ids is None:
        chosen = [entry for entry in found if entry[0] == "test"]
    else:
        by_id = {entry[1]: entry for entry in found}
        unknown = [t for t in tile_ids if t not in by_id]
        if unknown:
            source.close()
            raise UserError(f"tile(s) {', '.join(unknown)} not found under --src {src}; found: "
                            f"{', '.join(sorted(by_id))}")
        chosen = [by_id[t] for t in tile_ids]
    return chosen, source, layout


def predict_tiles(args) -> dict:
    if args.batch_size < 1 or (args.window is not None and args.window < 16):
        raise UserError("--batch_size must be at least 1 and --window at least 16 px")
    window_stride(1, args.overlap)  # validates --overlap before any work
    try:
        device = choose_device(args.device, 0, 1, cuda_built=torch.version.cuda is not None,
                               gpu_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                               driver_present=gpu_driver_present(),
                               visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    except UserError as err:
        raise err.reworded(cpu="pass --device cpu") from None
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_process(1))
    step_model = StepModel(args.ckpt, device, args.data_root)
    out = Path(args.out)
    chosen, source, layout = locate(step_model, args.src, args.tiles, args.labels, args.spec)
    palette = step_model.meta.get("palette")
    names = tasks.channel_names(step_model.dataset, step_model.task)[: step_model.num_channels]
    to_class = step_model.channel_to_class()
    overall = SegmentationMetrics(step_model.num_channels)
    rows = []
    with source:
        out.mkdir(parents=True, exist_ok=True)
        for split, tile, image_loc, label_loc in chosen:
            start = time.time()
            image, label_rgb = layout.read_tile(source, image_loc, label_loc, step_model.meta["channels"])
            label = layout.decode(label_rgb)[0]
            del label_rgb
            logits = step_model.predict_logits(image, args.window, args.overlap, args.batch_size)
            prediction = logits.argmax(dim=0).numpy().astype(np.uint8)  # channel indices
            classes = to_class[prediction]
            Image.fromarray(colorize(classes, palette)).save(out / f"{tile}_pred.png")
            tile_metrics = SegmentationMetrics(step_model.num_channels)
            score(step_model, prediction, label, tile_metrics)
            overall.confusion += tile_metrics.confusion
            results = summary(step_model, tile_metrics)
            if not args.no_preview:
                fig = preview(image, label, classes, Path(args.ckpt).stem, tasks.class_names(step_model.dataset),
                              palette)
                fig.savefig(out / f"{tile}_preview.png", dpi=100)
            rows.append({"tile": tile, "split": split, **_row(results, names)})
            print(f"{tile}: mIoU all {_pc(results['miou_all'])}, old {_pc(results['miou_old'])}, new "
                  f"{_pc(results['miou_new'])} ({image.shape[0]}x{image.shape[1]} px, {time.time() - start:.1f}s)",
                  flush=True)
    results = summary(step_model, overall)
    rows.append({"tile": "all", "split": "", **_row(results, names)})
    _write_csv(out / "metrics.csv", rows)
    (out / "metrics.json").write_text(json.dumps({
        "checkpoint": str(args.ckpt), "dataset": step_model.dataset, "task": step_model.task, "step": step_model.step,
        "window": int(args.window or step_model.window), "overlap": args.overlap, "class_names": names,
        "tiles": rows, "overall": results}, indent=1))
    print(f"all {len(chosen)} tile(s) of {step_model.dataset}, task {step_model.task} step {step_model.step}:\n"
          f"{format_table(results, names)}\nwrote {out}/", flush=True)
    return results


def _pc(value) -> str:
    return "x" if value is None else f"{100 * value:.2f}"


def _row(results: dict, names) -> dict:
    row = {name: _pc(iou) for name, iou in zip(names, results["iou"])}
    for key in ("miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc"):
        row[key] = _pc(results[key])
    return row


def _write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@exit_on_user_error
def main(argv=None):
    return predict_tiles(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
