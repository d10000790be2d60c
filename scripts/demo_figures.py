"""The demo's table and figures from its results files and step checkpoints.

    python scripts/demo_figures.py --out demo_out/figures --step 1 \
        --run FT demo_out/results/vaihingen_4-1_FT.csv demo_out/checkpoints/step/4-1-vaihingen_FT_1.pth \
        --run MiB ... --run MiCro ... --src demo_out/raw --data_root demo_out/data

Prints the old/new/all mIoU of every run at --step (Markdown), writes `miou.png` (bars of old / new / all
per method) and `predictions.png` (image | ground truth | one column per method, ISPRS legend) on the
region of a test tile richest in the classes added at --step, predicted over the whole tile with
scripts/predict_tiles.py's sliding window.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

import tasks
from dataset.colormap import CLASS_NAMES, colorize, decode_colors
from utils.errors import UserError, exit_on_user_error
from utils.reporting.results import read_results


def _sibling_script(name: str):
    """Another entry point of scripts/, loaded from its file: scripts/ is a folder of scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


predict_tiles = _sibling_script("predict_tiles")  # StepModel and locate: the whole-tile inference

PARTS = (("old", "miou_old"), ("new", "miou_new"), ("all", "miou_all"))


def rows_at_step(runs, step: int) -> list[tuple[str, dict]]:
    """(method, results row of `step`) for every run; a missing step is the user's error."""
    picked = []
    for name, csv_path, _ in runs:
        row = next((r for r in read_results(csv_path) if r["step"] == step), None)
        if row is None:
            raise UserError(f"{csv_path} has no row for step {step}; run that step first")
        picked.append((name, row))
    return picked


def markdown_table(rows, step: int, new_names: str) -> str:
    def show(value):
        return "x" if value is None else f"{value:.2f}"

    lines = [f"| method | old (step 0 classes) | new ({new_names}) | all |", "|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(show(row[key]) for _, key in PARTS) + " |" for name, row in rows]
    return "\n".join(lines)


def miou_figure(rows, title: str):
    """Grouped bars: one group per method, bars old / new / all (mIoU %)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.6 + 1.5 * len(rows), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.26
    colours = ("#4c72b0", "#dd8452", "#55a868")
    positions = np.arange(len(rows))
    for i, ((label, key), colour) in enumerate(zip(PARTS, colours)):
        values = [row[key] if row[key] is not None else 0.0 for _, row in rows]
        bars = ax.bar(positions + (i - 1) * width, values, width, label=label, color=colour)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(positions, [name for name, _ in rows])
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 112)  # room for the legend above the bars
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8, ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def richest_window(label: np.ndarray, classes, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size window holding the most pixels of `classes` (integral image)."""
    size = min(size, *label.shape)
    mask = np.isin(label, list(classes)).astype(np.int64)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(y), int(x)


def predictions_figure(runs, src, data_root, step: int, size: int, device):
    """image | ground truth | each run's prediction on the test-tile region richest in the new classes."""
    from utils.reporting.logger import prediction_figure

    models = [(name, predict_tiles.StepModel(ckpt, device, data_root)) for name, _, ckpt in runs]
    first = models[0][1]
    new_classes, _ = tasks.get_task_labels(first.dataset, first.task, step)
    chosen, source, layout = predict_tiles.locate(first, src, None, None)
    with source:
        best = None
        for _, tile, image_loc, label_loc in chosen:  # the tile with the most new-class pixels
            image, label_rgb = layout.read_tile(source, image_loc, label_loc, first.meta["channels"])
            label, _ = decode_colors(label_rgb)
            count = int(np.isin(label, new_classes).sum())
            if best is None or count > best[0]:
                best = (count, tile, image, label)
    _, tile, image, label = best
    y, x = richest_window(label, new_classes, size)
    region = (slice(y, y + size), slice(x, x + size))
    seen = tasks.get_order(first.dataset, first.task)[: sum(first.classes)]
    shown_label = np.where(np.isin(label, seen), label, 255)  # classes the step has not seen: black
    columns = [image[region][None, ..., :3], colorize(shown_label[region])[None]]
    for _, model in models:
        classes = model.channel_to_class()[model.predict_logits(image).argmax(dim=0).numpy()]
        columns.append(colorize(classes[region])[None])
    titles = ["image", "ground truth", *[name for name, _ in models]]
    return prediction_figure(columns, titles, CLASS_NAMES, legend_classes=seen,
                             title=f"test tile {tile}, step {step} of task {first.task}")


def build_parser():
    parser = argparse.ArgumentParser(prog="scripts/demo_figures.py", allow_abbrev=False,
                                     description="Table and figures of the demo (see the module docstring).")
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "CSV", "CKPT"),
                        help="a method: its name, results CSV and the checkpoint of --step (repeat per method)")
    parser.add_argument("--step", type=int, required=True, help="the step shown")
    parser.add_argument("--out", required=True, help="folder for miou.png and predictions.png")
    parser.add_argument("--src", required=True, help="raw tiles (for the predictions picture)")
    parser.add_argument("--data_root", default=None, help="processed data (normalisation; default: the checkpoint's)")
    parser.add_argument("--region", type=int, default=192, help="side of the region shown, px (default: 192)")
    return parser


@exit_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_at_step(args.run, args.step)
    first = predict_tiles.StepModel(args.run[0][2], torch.device("cpu"), args.data_root)
    new_names = ", ".join(CLASS_NAMES[c] for c in tasks.get_task_labels(first.dataset, first.task, args.step)[0])
    print(markdown_table(rows, args.step, new_names))
    title = f"{first.dataset} {first.task}, step {args.step} (new: {new_names}): mIoU of foreground classes"
    miou_figure(rows, title).savefig(out / "miou.png", dpi=120)
    predictions_figure(args.run, args.src, args.data_root, args.step, args.region,
                       torch.device("cpu")).savefig(out / "predictions.png", dpi=120)
    print(f"figures: {out / 'miou.png'}, {out / 'predictions.png'}")


if __name__ == "__main__":
    main()
