"""TensorBoard (tensorboardX) + plain-text logging; active on rank 0 only."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from utils.checkpoint import run_tag
from utils.metrics import format_table


def log_dir(logdir_root, task: str, dataset: str, overlap: bool, name: str) -> Path:
    """`<logdir_root>/<task>-<dataset>[-ov]/<name>` (DESIGN.md §4)."""
    return Path(logdir_root) / run_tag(task, dataset, overlap) / name


class Logger:
    """On rank 0: a SummaryWriter in `logdir` and `logdir/log.txt`. On other ranks every method is a no-op.

    enabled=False keeps console messages (rank 0) but writes no files.
    """

    def __init__(self, logdir, rank: int = 0, enabled: bool = True, text_log: bool = True):
        self.logdir = Path(logdir)
        self.is_main = rank == 0
        self.writer = None
        self.text_file = None
        if self.is_main and enabled:
            from tensorboardX import SummaryWriter  # imported here: other ranks never need it

            self.logdir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(self.logdir))
            if text_log:
                self.text_file = open(self.logdir / "log.txt", "a", encoding="utf-8")

    # ---- text -------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        print(msg, flush=True)
        if self.text_file is not None:
            self.text_file.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")
            self.text_file.flush()

    # ---- scalars ----------------------------------------------------------------------
    def add_scalar(self, tag: str, value, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def add_scalars(self, values: dict, step: int, prefix: str = "") -> None:
        """One scalar per entry, tagged `<prefix>/<key>` (not tensorboardX's multi-run add_scalars)."""
        for key, value in values.items():
            if value is not None:
                self.add_scalar(f"{prefix}/{key}" if prefix else key, value, step)

    # ---- evaluation results -----------------------------------------------------------
    def add_results(self, results: dict, step: int, class_names, prefix: str = "test") -> None:
        """Per-class IoU, the mIoU summary, accuracies, the confusion matrix figure and the text table."""
        if self.writer is None:
            return
        names = _names(class_names, len(results["iou"]))
        self.add_scalars({n.replace(" ", "_"): iou for n, iou in zip(names, results["iou"])}, step, f"{prefix}/iou")
        summary_keys = ("miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc", "mean_acc",
                        "f1_micro", "f1_macro")
        self.add_scalars({k: results.get(k) for k in summary_keys}, step, prefix)
        if results.get("f1"):
            self.add_scalars({n.replace(" ", "_"): f for n, f in zip(names, results["f1"])}, step, f"{prefix}/f1")
        self.writer.add_figure(f"{prefix}/confusion_matrix", confusion_figure(results["confusion"], names), step, close=True)
        # Indent by four spaces: TensorBoard renders text as markdown, this keeps the table monospaced.
        table = "\n".join("    " + line for line in format_table(results, names).splitlines())
        self.writer.add_text(f"{prefix}/table", table, step)

    def add_samples(self, tag: str, images, labels, preds, mean, std, step: int) -> None:
        """One picture of rows `image | label | prediction` (labels in the ISPRS palette; first 3 bands)."""
        if self.writer is None:
            return
        strip = sample_strip(images, labels, preds, mean, std)
        self.writer.add_image(tag, strip, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.text_file is not None:
            self.text_file.close()
            self.text_file = None


def _names(class_names, count: int) -> list[str]:
    return [class_names[c] if c < len(class_names) else str(c) for c in range(count)]


def confusion_figure(confusion, class_names):
    """Row-normalised confusion matrix (rows = ground truth) as a matplotlib figure (Agg backend)."""
    from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    counts = np.asarray(confusion, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(counts)
    fig = Figure(figsize=(1.0 + 0.9 * n, 1.0 + 0.8 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names[:n], rotation=45, ha="right")
    ax.set_yticks(range(n), class_names[:n])
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for (row, col), value in np.ndenumerate(normalised):  # n x n annotations; matplotlib has no batch text
        ax.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=8,
                color="white" if value > 0.5 else "black")
    fig.tight_layout()
    return fig


def sample_strip(images, labels, preds, mean, std) -> np.ndarray:
    """uint8 [N*H, 3*W, 3]: each row is de-normalised image | coloured label | coloured prediction.

    images: [N,C,H,W] normalised as (x - mean) / std with x in [0, 1] (a mean above 1 means 0-255 scale).
    """
    from utils.colormap import colorize  # lazy: the palette lives in its own module

    images = torch.as_tensor(images).detach().float().cpu()[:, :3]
    channels = images.shape[1]
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[:channels].view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32)[:channels].view(1, -1, 1, 1)
    pixels = images * std_t + mean_t
    if mean_t.max() > 1.0:
        pixels = pixels / 255.0
    pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    rgb = pixels.permute(0, 2, 3, 1).numpy()  # N,H,W,3
    n, h, w, _ = rgb.shape

    def coloured(label_maps) -> np.ndarray:
        # colorize takes one HxW map: stack the batch vertically into one tall map.
        flat = torch.as_tensor(label_maps).detach().cpu().numpy().astype(np.int64).reshape(n * h, w)
        return np.asarray(colorize(flat), dtype=np.uint8).reshape(n, h, w, 3)

    strip = np.concatenate([rgb, coloured(labels), coloured(preds)], axis=2)  # N,H,3W,3
    return np.ascontiguousarray(strip.reshape(n * h, 3 * w, 3))
