"""DataOptions: what one step's data is made of, settled once (family defaults filled in)."""
from __future__ import annotations

from dataclasses import dataclass

import tasks
from utils.errors import UserError

from .incremental import default_unseen

# Share of the step's training crops held out for validation by cross_val (MiCro's --cross_val).
CROSS_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class DataOptions:
    """The data options of a step; field names are run.py's options. At creation the task family's
    defaults are filled in (filter mode, validation fraction, test labels and crops) and checked, so the
    data code reads settled values.

    filter_mode: training crops of the step (`overlap` True is its alias for "overlap"; None: the family's
    first mode). val_fraction: validate on this seeded share of the step's training crops (cross_val:
    CROSS_VAL_FRACTION; None: on the test crops holding a class of the step, MiB). test_unseen: labels of
    classes not seen yet in the test ("background" | "ignore"). test_crops: "all" | "step". crop_size:
    training crop (None: the stored crops' size). batch_size is per process; num_workers None: automatic.
    """

    data_root: str
    dataset: str = "vaihingen"
    task: str = "4-1"
    step: int = 0
    task_file: str | None = None
    overlap: bool = False
    filter_mode: str | None = None
    cross_val: bool = False
    val_fraction: float | None = None
    test_unseen: str | None = None
    test_crops: str | None = None
    crop_size: int | None = None
    no_mask: bool = False
    random_seed: int = 42
    batch_size: int = 4
    num_workers: int | None = None

    def __post_init__(self):
        tasks.prepare(self.dataset, self.data_root, self.task_file)
        mode = self.filter_mode
        # a command line names its options in place of the parts {overlap}, {mode} and {fraction}
        if self.overlap:
            if mode not in (None, "overlap"):
                raise UserError("{overlap} and {mode} contradict each other; give one of them", overlap="overlap",
                                mode=f"filter mode {mode}")
            mode = "overlap"
        settled = {"filter_mode": tasks.check_filter_mode(self.dataset, self.task, mode)}
        settled["overlap"] = settled["filter_mode"] == "overlap"
        fraction = self.val_fraction
        if fraction is None and self.cross_val:
            fraction = CROSS_VAL_FRACTION
        if fraction is not None and not 0 < fraction < 1:
            raise UserError("{fraction}: give a fraction of the training crops between 0 and 1",
                            fraction=f"validation fraction {fraction}")
        settled["val_fraction"] = fraction
        settled["test_unseen"] = self.test_unseen or default_unseen(self.dataset, self.task)
        synthetic = tasks.synthetic_background(self.dataset, self.task)
        settled["test_crops"] = self.test_crops or ("step" if synthetic else "all")
        for key, value in settled.items():
            object.__setattr__(self, key, value)  # frozen: settled once, here

    @property
    def split_suffix(self) -> str:
        """The suffix of the split folder and of the run's file names ('' for the family's default)."""
        return tasks.split_suffix(self.dataset, self.task, self.filter_mode)

    def protocol(self) -> dict:
        """The data conventions of the step, recorded with its results: {family, filter_mode, test_unseen,
        test_crops, val_fraction}."""
        return {"family": tasks.family(self.dataset, self.task), "filter_mode": self.filter_mode,
                "test_unseen": self.test_unseen, "test_crops": self.test_crops, "val_fraction": self.val_fraction}
