"""Table of benchmarks/synthetic_methods.sh: mIoU old/new/all per step and training time relative to FT.
    python benchmarks/summarize_methods.py bench_out"""
import sys
from pathlib import Path

from benchmarks.epoch_times import epoch_seconds
from utils.reporting.results import read_results


def training_seconds(log_txt: Path) -> float | None:
    """Sum of the epoch times a step's log.txt reports (data loading + training, no evaluation)."""
    return sum(epoch_seconds(log_txt)) if log_txt.is_file() else None


def show(value) -> str:
    return "x" if value is None else f"{value:.2f}"


def main(out: Path) -> None:
    for csv_path in sorted((out / "results").glob("vaihingen_*.csv")):
        task, method = csv_path.stem.split("_", 2)[1:]
        if method != "FT":
            continue
        print(f"\n### task {task} (synthetic Vaihingen, disjoint)\n")
        print("| method | step | mIoU old | mIoU new | mIoU all | train s | time / FT |")
        print("|---|---|---|---|---|---|---|")
        ft_time = {}
        for path in sorted(csv_path.parent.glob(f"vaihingen_{task}_*.csv"), key=lambda p: p.stem != csv_path.stem):
            name = path.stem.split("_", 2)[2]
            for row in read_results(path):
                step = row["step"]
                seconds = training_seconds(out / "logs" / f"{task}-vaihingen" / name / f"step{step}" / "log.txt")
                if name == "FT":
                    ft_time[step] = seconds
                ratio = seconds / ft_time[step] if seconds and ft_time.get(step) else None
                print(f"| {name} | {step} | {show(row['miou_old'])} | {show(row['miou_new'])} | "
                      f"{show(row['miou_all'])} | {show(seconds)} | {show(ratio)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench_out"))
