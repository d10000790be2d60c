"""RunId: who a run is (dataset, task, split, name, seed); every path and tag of its outputs derives from it."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

# The seed runs are named without: any other is appended to the name as -s<seed>.
DEFAULT_SEED = 42
_SEED_SUFFIX = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")


def effective_name(name: str, seed: int) -> str:
    """The name a run with --name `name` and --random_seed `seed` writes under (`-s<seed>` unless 42)."""
    return name if int(seed) == DEFAULT_SEED else f"{name}-s{int(seed)}"


def split_seed(name: str) -> tuple[str, int]:
    """`MiB-s3` -> ("MiB", 3); `MiB` -> ("MiB", 42): the inverse of effective_name."""
    match = _SEED_SUFFIX.match(name)
    if match is None:
        return name, DEFAULT_SEED
    return match["name"], int(match["seed"])


@dataclass(frozen=True)
class RunId:
    """One chain of steps: a method (or experiment `name`) on a dataset's task and training split with a seed.

    split: the suffix naming the training split in file names ('' for the task family's default, '-ov',
    '-noov'; tasks.split_suffix). tested: the stem of a checkpoint tested with `--test --ckpt` that is
    not the run's own: its numbers go to results of their own (`<name>_test-<stem>`), never the run's."""

    dataset: str
    task: str
    split: str = ""
    name: str = "FT"
    seed: int = DEFAULT_SEED
    tested: str | None = None

    @classmethod
    def from_run_name(cls, dataset: str, task: str, split: str, run_name: str) -> RunId:
        """The RunId of a name as written in file names (`MiB-s3` -> name MiB, seed 3)."""
        name, seed = split_seed(run_name)
        return cls(dataset, task, split, name, seed)

    @property
    def run_name(self) -> str:
        """The name in file names: `name`, `-s<seed>` unless the default seed, `_test-<stem>` for a test."""
        name = effective_name(self.name, self.seed)
        return f"{name}_test-{self.tested}" if self.tested else name

    @property
    def tag(self) -> str:
        """`<task>-<dataset><split>`: the prefix of checkpoint names and of log folders."""
        return f"{self.task}-{self.dataset}{self.split}"

    def testing(self, checkpoint) -> RunId:
        """The RunId whose results hold the test of another `checkpoint` than the run's own."""
        return replace(self, tested=Path(checkpoint).stem)

    # ------------------------------------------------------------------ files
    def checkpoint(self, root, step: int) -> Path:
        """`<root>/step/<task>-<dataset><split>_<name>_<step>.pth` (root: --checkpoint_dir)."""
        return Path(root) / "step" / f"{self.tag}_{self.run_name}_{int(step)}.pth"

    def last_checkpoint(self, root, step: int) -> Path:
        """The resume ("last") checkpoint beside the step checkpoint: `<...>_<step>.last.pth`."""
        return self.checkpoint(root, step).with_suffix(".last.pth")

    def results(self, results_dir) -> Path:
        """`<results_dir>/<dataset>_<task><split>_<name>.csv`; the JSON twin has the same stem."""
        return Path(results_dir) / f"{self.dataset}_{self.task}{self.split}_{self.run_name}.csv"

    def log_dir(self, logdir, step: int | None = None, test: bool = False) -> Path:
        """TensorBoard folder `<logdir>/<tag>/<name>[/step<step>[/test]]` (--test logs below the step's run)."""
        path = Path(logdir) / self.tag / self.run_name
        if step is not None:
            path = path / f"step{int(step)}"
        return path / "test" if test else path

    def task_curve_dir(self, logdir) -> Path:
        """The run of mIoU old/new/all against the step, one per task and name."""
        return self.log_dir(logdir) / "task"

    def step_log(self, folder, step: int) -> Path:
        """A campaign's log of one step: `<folder>/<dataset>_<task><split>_<name>_step<step>.log`."""
        return Path(folder) / f"{self.dataset}_{self.task}{self.split}_{self.run_name}_step{int(step)}.log"
