"""TensorBoard (tensorboardX) + plain-text logging; active on rank 0 only.

Files are opened on the first write that is not a console line, so a run that stops before it logs
anything (a user error while setting up) leaves no folder, no event file and no log.txt behind.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from utils.metrics import format_table


class Logger:
    """On rank 0: a SummaryWriter in `logdir` and `logdir/log.txt`. On other ranks every method is a no-op.

    enabled=False keeps console messages (rank 0) but writes no files. Console lines logged before the
    first TensorBoard record are kept in memory and written to log.txt when the files are opened (by
    that record or by `open()`); a run that ends before either writes nothing to disk.
    """

    def __init__(self, logdir, rank: int = 0, enabled: bool = True, text_log: bool = True):
        self.logdir = Path(logdir)
        self.is_main = rank == 0
        self.enabled = self.is_main and enabled
        self.text_log = text_log
        self.writer = None
        self.text_file = None
        self._pending: list[str] = []  # timestamped console lines not yet in log.txt
        self._closed = False

    def open(self) -> None:
        """Create the folder, the event file and log.txt (idempotent; no-op when disabled or closed)."""
        if not self.enabled or self.writer is not None or self._closed:
            return
        from tensorboardX import SummaryWriter  # imported here: other ranks never need it

        self.logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(logdir=str(self.logdir))
        if self.text_log:
            self.text_file = open(self.logdir / "log.txt", "a", encoding="utf-8")
            self.text_file.writelines(self._pending)
            self.text_file.flush()
        self._pending = []

    def _writer(self):
        self.open()
        return self.writer

    # ---- text -------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if not self.is_main:
            return
        print(msg, flush=True)
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n"
        if self.text_file is not None:
            self.text_file.write(line)
            self.text_file.flush()
        elif self.enabled and self.text_log and not self._closed:
            self._pending.append(line)

    # ---- scalars ----------------------------------------------------------------------
    def add_scalar(self, tag: str, value, step: int) -> None:
        if self.enabled and self._writer() is not None:
            self.writer.add_scalar(clean_tag(tag), float(value), step)

    def add_scalars(self, values: dict, step: int, prefix: str = "") -> None:
        """One scalar per entry, tagged `<prefix>/<key>` (not tensorboardX's multi-run add_scalars)."""
        for key, value in values.items():
            if value is not None:
                self.add_scalar(f"{prefix}/{key}" if prefix else key, value, step)

    # ---- evaluation results -----------------------------------------------------------
    def add_results(self, results: dict, step: int, class_names, prefix: str = "test") -> None:
        """Per-class IoU, the mIoU summary, accuracies, the confusion matrix figure and the text table."""
        if not self.enabled or self._writer() is None:
            return
        names = _names(class_names, len(results["iou"]))
        self.add_scalars({n.replace(" ", "_"): iou for n, iou in zip(names, results["iou"])}, step, f"{prefix}/iou")
        summary_keys = ("miou_old", "miou_new", "miou_all", "miou_all_bg", "overall_acc", "mean_acc",
                        "f1_micro", "f1_macro")
        self.add_scalars({k: results.get(k) for k in summary_keys}, step, prefix)
        if results.get("f1"):
            self.add_scalars({n.replace(" ", "_"): f for n, f in zip(names, results["f1"])}, step, f"{prefix}/f1")
        self.writer.add_figure(f"{prefix}/confusion_matrix", confusion_figure(results["confusion"], names), step,
                               close=True)
        # Indent by four spaces: TensorBoard renders text as markdown, this keeps the table monospaced.
        table = "\n".join("    " + line for line in format_table(results, names).splitlines())
        self.writer.add_text(f"{prefix}/table", table, step)

    def add_prediction_figure(self, tag: str, images, labels, preds, mean, std, step: int, class_names,
                              palette=None) -> None:
        """The samples as a titled figure: columns image | ground truth | prediction, the legend below
        (palette: the dataset's class colours, meta.json's; default ISPRS)."""
        if not self.enabled or self._writer() is None:
            return
        columns = [sample_images(images, mean, std), colour_maps(labels, palette), colour_maps(preds, palette)]
        fig = prediction_figure(columns, ["image", "ground truth", "prediction"], class_names, palette=palette)
        self.writer.add_figure(clean_tag(tag), fig, step, close=True)

    def close(self) -> None:
        self._closed = True
        self._pending = []
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.text_file is not None:
            self.text_file.close()
            self.text_file = None


def clean_tag(tag: str) -> str:
    """`train//seg` -> `train/seg`: no empty tag levels (TensorBoard shows them as separate groups)."""
    return "/".join(part for part in str(tag).split("/") if part)


def write_task_curve(run_dir, rows) -> None:
    """Rewrite the per-task TensorBoard run: mIoU old/new/all (fractions) against the step.

    rows: results rows as `utils.reporting.results.read_results` returns them (`step`, `miou_old`, ... in percent,
    None where undefined). The run is rebuilt from the rows each time, so re-running or re-testing a
    step replaces its point instead of adding a second one.
    """
    from tensorboardX import SummaryWriter

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(logdir=str(run_dir))
    tags = [f"task/mIoU_{part}" for part in ("old", "new", "all")]
    for row in sorted(rows, key=lambda r: r["step"]):
        for tag, key in zip(tags, ("miou_old", "miou_new", "miou_all")):
            if row.get(key) is not None:
                writer.add_scalar(tag, row[key] / 100.0, int(row["step"]))
    writer.add_custom_scalars_multilinechart(tags, category="task", title="mIoU old / new / all over the steps")
    writer.close()


def _names(class_names, count: int) -> list[str]:
    return [class_names[c] if c < len(class_names) else str(c) for c in range(count)]


def confusion_figure(confusion, class_names):
    """Row-normalised confusion matrix (rows = ground truth) as a matplotlib figure (Agg backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # Figure + Agg canvas: no pyplot state, no display needed

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


def sample_images(images, mean, std) -> np.ndarray:
    """uint8 [N, H, W, 3]: normalised images back to pixels (first 3 bands; a mean above 1 means 0-255)."""
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
    return pixels.permute(0, 2, 3, 1).numpy()


def class_colours(palette=None) -> np.ndarray:
    """uint8 [K, 3]: `palette`, or the ISPRS colours (from their spec) for a meta.json written before datasets
    had specs and palettes."""
    if palette is None:
        from utils.dataset_spec import builtin_spec  # read once the default is needed
        palette = builtin_spec("vaihingen").palette
    return np.asarray(palette, dtype=np.uint8)


def colour_maps(label_maps, palette=None) -> np.ndarray:
    """uint8 [N, H, W, 3]: class index maps [N, H, W] in `palette` (default ISPRS; 255 and any value that is
    no class black)."""
    colours = class_colours(palette)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(colours)] = colours
    maps = torch.as_tensor(label_maps).detach().cpu().numpy().astype(np.int64)
    return table[np.where((maps >= 0) & (maps < len(colours)), maps, 255)]


def prediction_figure(columns, titles, class_names, legend_classes=None, ignore_label="ignored / not seen",
                      title=None, palette=None):
    """Figure of rows = samples, one titled column per entry of `columns` ([N, H, W, 3] uint8 each),
    with the ISPRS legend (colour patch + name per class, black for ignored pixels) underneath.

    class_names: names of class indices 0..K-1 (the palette rows); legend_classes: which of them to
    show (default all); title: an optional line above the column titles; palette: class colours (default ISPRS).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = class_colours(palette)
    n_rows, n_cols = len(columns[0]), len(columns)
    height, width = columns[0].shape[1:3]
    shown = range(min(len(class_names), len(colours))) if legend_classes is None else legend_classes
    handles = [Patch(facecolor=colours[c] / 255.0, edgecolor="0.4", label=class_names[c]) for c in shown]
    handles.append(Patch(facecolor="black", edgecolor="0.4", label=ignore_label))
    legend_cols = min(len(handles), 4)
    panel = 2.2  # inches per image width
    images_h = panel * n_rows * height / width
    legend_h = 0.25 * -(-len(handles) // legend_cols) + 0.15  # inches, one line per legend row
    top_h = 0.3 + (0.3 if title else 0.0)
    fig = Figure(figsize=(panel * n_cols, images_h + legend_h + top_h))
    FigureCanvasAgg(fig)
    total_h = images_h + legend_h + top_h
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=legend_h / total_h, top=1 - top_h / total_h,
                        wspace=0.04, hspace=0.04)
    for col, (pictures, column_title) in enumerate(zip(columns, titles)):
        for row in range(n_rows):
            ax = axes[row][col]
            ax.imshow(pictures[row], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(column_title, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.05 / total_h, va="top")
    fig.legend(handles=handles, loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    return fig
