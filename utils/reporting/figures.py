"""Figures of grouped results (utils.reporting.tables.Experiment): mIoU old/new/all over the steps of a
task, one line per method; per-class IoU bars at the final step. PNG files, matplotlib (Agg)."""
from __future__ import annotations

from pathlib import Path

from utils.reporting.tables import SUMMARY, SUMMARY_LABELS, Experiment, _ordered


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _groups(experiments):
    return dict.fromkeys((e.dataset, e.split, e.task) for e in experiments)


def _stem(dataset, split, task):
    return f"{dataset}_{task}{'-ov' if split == 'overlap' else ''}"


def steps_figure(experiments: list[Experiment], order=None):
    """Panels old / new / all: mIoU against the step, a line per method (mean over seeds, shaded ± std).
    `experiments` are those of one (dataset, split, task)."""
    plt = _pyplot()
    exps = {e.name: e for e in experiments}
    first = experiments[0]
    fig, axes = plt.subplots(1, len(SUMMARY), figsize=(4 * len(SUMMARY) + 1.5, 3.4), sharey=True)
    for ax, column in zip(axes, SUMMARY):
        for name in _ordered(experiments, order):
            points = [(s, exps[name].value(s, column)) for s in exps[name].steps()]
            points = [(s, v) for s, v in points if v is not None]
            if not points:
                continue
            steps = [s for s, _ in points]
            means = [v.mean for _, v in points]
            stds = [v.std or 0.0 for _, v in points]
            line, = ax.plot(steps, means, marker="o", label=name)
            ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(f"mIoU {SUMMARY_LABELS[column]}")
        ax.set_xlabel("step")
        ax.set_xticks(range(first.last_step + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mIoU (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize="small")
    fig.suptitle(f"{first.dataset} {first.task} ({first.split})")
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    return fig


def per_class_figure(experiments: list[Experiment], order=None):
    """IoU of every class at the final step, a bar per method (mean over seeds, ± std error bars);
    None when no method reached the final step. `experiments` are those of one (dataset, split, task)."""
    plt = _pyplot()
    exps = {e.name: e for e in experiments}
    first = experiments[0]
    last = first.last_step
    classes = []
    for exp in experiments:
        classes += [c for c in exp.classes(last) if c not in classes]
    names = [n for n in _ordered(experiments, order) if last in exps[n].steps()]
    if not classes or not names:
        return None
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(classes) + 0.25 * len(names)), 3.8))
    for i, name in enumerate(names):
        cells = [exps[name].value(last, c) for c in classes]
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(classes))]
        ax.bar(xs, [c.mean if c else 0.0 for c in cells], width,
               yerr=[(c.std or 0.0) if c else 0.0 for c in cells], capsize=2, label=name)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=20, ha="right", fontsize="small")
    ax.set_ylabel("IoU (%)")
    ax.set_title(f"{first.dataset} {first.task} ({first.split}): IoU per class at step {last}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=min(len(names), 5))
    fig.tight_layout()
    return fig


def _save_each(experiments, out_dir, make, prefix, order) -> list[Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset, split, task in _groups(experiments):
        fig = make([e for e in experiments if (e.dataset, e.split, e.task) == (dataset, split, task)], order)
        if fig is None:
            continue
        path = out_dir / f"{prefix}_{_stem(dataset, split, task)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_steps(experiments: list[Experiment], out_dir, order=None) -> list[Path]:
    """`steps_<dataset>_<task>[-ov].png` per (dataset, split, task): see steps_figure."""
    return _save_each(experiments, out_dir, steps_figure, "steps", order)


def plot_per_class(experiments: list[Experiment], out_dir, order=None) -> list[Path]:
    """`per_class_<dataset>_<task>[-ov].png` per (dataset, split, task): see per_class_figure."""
    return _save_each(experiments, out_dir, per_class_figure, "per_class", order)
