"""Tables of benchmarks/mibcd_6s.sh: old/new/all mIoU and micro/macro F1 per step of 6s, and the training
time of MiB + CD relative to MiB.      python benchmarks/summarize_mibcd.py bench_mibcd"""
import json
import re
import sys
from pathlib import Path

from benchmarks.epoch_times import epoch_seconds

NAMES = {"FT": "FT", "UFT-CD": "UFT + CD", "MiB": "MiB", "MiB-CD": "MiB + CD"}
STEP0 = {"UFT-CD": "MiB-CD", "MiB": "FT"}  # whose step 0 a method continues (the same training)


def pct(value) -> str:
    return "x" if value is None else f"{100 * value:.1f}"


def main(out: Path) -> None:
    for bands in ("RGB", "RGBIR"):
        print(f"\n### synthetic Potsdam {bands}, task 6s (split)\n")
        print("| method | step | mIoU old | mIoU new | mIoU all | F1 micro | F1 macro | epochs (best) | train s |")
        print("|---|---|---|---|---|---|---|---|---|")
        times = {}
        for name, shown in NAMES.items():
            path = out / "results" / bands / f"potsdam_6s_{name}-{bands}.json"
            if not path.is_file():
                continue
            steps = json.loads(path.read_text())["steps"]
            if name in STEP0:  # step 0 is the shared model of another method
                other = out / "results" / bands / f"potsdam_6s_{STEP0[name]}-{bands}.json"
                steps = {**json.loads(other.read_text())["steps"], **steps} if other.is_file() else steps
            for step in sorted(steps, key=int):
                r = steps[step]
                owner = STEP0[name] if step == "0" and name in STEP0 else name
                log = out / "logs" / bands / "6s-potsdam" / f"{owner}-{bands}" / f"step{step}" / "log.txt"
                secs = epoch_seconds(log)
                kept = re.search(r"kept the weights of epoch (\d+)", log.read_text()) if log.is_file() else None
                times[(name, int(step))] = (sum(secs), len(secs))
                shared = f" ({NAMES[owner]}'s)" if owner != name else ""
                print(f"| {shown} | {step}{shared} | {pct(r['miou_old'])} | {pct(r['miou_new'])} | "
                      f"{pct(r['miou_all'])} | {pct(r['f1_micro'])} | {pct(r['f1_macro'])} | {len(secs)} "
                      f"({kept.group(1) if kept else '-'}) | {sum(secs):.1f} |")
        print("\n| step | MiB s (epochs) | MiB + CD s (epochs) | time ratio | per-epoch ratio |")
        print("|---|---|---|---|---|")
        for step in range(3):
            mib, cd = times.get(("MiB", step)), times.get(("MiB-CD", step))
            if mib and cd and mib[1] and cd[1]:
                print(f"| {step} | {mib[0]:.1f} ({mib[1]}) | {cd[0]:.1f} ({cd[1]}) | {cd[0] / mib[0]:.2f} | "
                      f"{(cd[0] / cd[1]) / (mib[0] / mib[1]):.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench_mibcd"))
