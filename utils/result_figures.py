"""Figures of grouped results (utils.result_tables.Experiment): mIoU old/new/all over the steps of a
task, one line per method; per-class IoU bars at the final step. PNG files, matplotlib (Agg)."""
from __future__ import annotations

from pathlib import Path

from utils.result_tables import SUMMARY, SUMMARY_LABELS, Experiment, _ordered


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _groups(experiments):
    return dict.fromkeys((e.dataset, e.split, e.task) for e in experiments)


def _stem(dataset, split, task):
    return f"{dataset}_{task}{'-ov' if split == 'overlap' else ''}"


def plot_steps(experiments: list[Experiment], out_dir, order=None) -> list[Path]:
    """One figure per (dataset, split, task): panels old / new / all, mIoU against the step, a line
    per method (mean over seeds, shaded ± std)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset, split, task in _groups(experiments):
        exps = {e.name: e for e in experiments if (e.dataset, e.split, e.task) == (dataset, split, task)}
        fig, axes = plt.subplots(1, len(SUMMARY), figsize=(4 * len(SUMMARY), 3.4), sharey=True)
        for ax, column in zip(axes, SUMMARY):
            for name in _ordered(exps.values(), order):
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
            ax.grid(alpha=0.3)
            last = next(iter(exps.values())).last_step
            ax.set_xticks(range(last + 1))
        axes[0].set_ylabel("mIoU (%)")
        handles, labels = axes[-1].get_legend_handles_labels()
        if not handles:
            handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize="small")
        fig.suptitle(f"{dataset} {task} ({split})")
        fig.tight_layout(rect=(0, 0, 0.86, 1))
        path = out_dir / f"steps_{_stem(dataset, split, task)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_per_class(experiments: list[Experiment], out_dir, order=None) -> list[Path]:
    """One figure per (dataset, split, task): IoU of every class at the final step, a bar per method
    (mean over seeds, ± std as error bars)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dataset, split, task in _groups(experiments):
        exps = {e.name: e for e in experiments if (e.dataset, e.split, e.task) == (dataset, split, task)}
        last = next(iter(exps.values())).last_step
        classes = []
        for exp in exps.values():
            classes += [c for c in exp.classes(last) if c not in classes]
        names = [n for n in _ordered(exps.values(), order) if last in exps[n].steps()]
        if not classes or not names:
            continue
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
        ax.set_title(f"{dataset} {task} ({split}): IoU per class at step {last}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", ncol=min(len(names), 5))
        fig.tight_layout()
        path = out_dir / f"per_class_{_stem(dataset, split, task)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
