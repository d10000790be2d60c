"""A step's report: the record a results row keeps besides the numbers (kind, seed, processes, git commit,
checkpoints, environment manifest), the pending mark after training, and the test's table, TensorBoard
figures, results row and task curve. Names and values come in from the caller (utils imports nothing above it)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

from utils.checkpoint import file_sha256
from utils.metrics import format_table
from utils.options import OptionRecord
from utils.reporting.logger import write_task_curve
from utils.reporting.results import environment_manifest, mark_pending, read_results, write_results


def git_commit() -> str | None:
    """The commit of the code that runs, when it is a git checkout (None otherwise)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_manifest(recorded: dict, dist) -> dict:
    """The run's reproducibility manifest (utils.reporting.results.environment_manifest) of its options."""
    return environment_manifest(dist.device, dist.world_size, dist.local_world_size, dist.nodes, dist.launcher,
                                recorded)


class StepReport:
    """What one step reports, on rank 0 (the writing methods are called there only).

    channel_names: every channel of the task (background first, then the classes in task order);
    class_names: the dataset's classes; channel_to_class: the uint8[256] lookup from channels to dataset
    classes (for the palette of the prediction figure); meta: the data's meta.json (mean, std, palette);
    recorded: every option of the run, as checkpoints and results files record them."""

    def __init__(self, recorded: dict, dist, logger, meta: dict, channel_names, class_names, channel_to_class):
        self.options = OptionRecord(**recorded)
        self.dist, self.logger, self.meta = dist, logger, meta
        self.channel_names, self.class_names = list(channel_names), list(class_names)
        self.channel_to_class = torch.from_numpy(channel_to_class).long()
        self.manifest = run_manifest(recorded, dist)

    def started(self, rid, classes) -> None:
        """What runs where: the step, method, classes, processes and device, and srun's process group."""
        options, dist, logger = self.options, self.dist, self.logger
        logger.info(f"{'test' if options.test else 'train'} step {options.step} of {rid.tag} with "
                    f"{options.method} "
                    f"({options.name}, seed {options.random_seed}); classes per step {classes}; {dist.world_size} "
                    f"process(es) on {dist.device}"
                    + (f" ({torch.get_num_threads()} threads each)" if dist.device.type == "cpu" else ""))
        if dist.launcher == "srun" and dist.distributed:
            logger.info(f"launched by srun: {dist.world_size} tasks on {dist.nodes} node(s) ({dist.local_world_size} "
                        f"on this one) join one process group at {os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']} (the first host of the job's nodes, a port from the job id)")

    def record(self, kind: str, checkpoint_path, previous: dict | None) -> dict | None:
        """Rank 0 (None on the others): what a results row records besides the numbers (utils/reporting/results.py)
        for the `kind` ("train" or "test") of the checkpoint at `checkpoint_path`, hashed here; `previous`:
        the lineage, the step t-1 checkpoint's path and hash."""
        options, dist = self.options, self.dist
        if dist.rank != 0:
            return None
        checkpoint = {"path": str(checkpoint_path), "sha256": file_sha256(checkpoint_path)}
        return {"kind": kind, "seed": options.random_seed, "world_size": dist.world_size,
                "effective_batch_size": options.batch_size * dist.world_size, "git_commit": git_commit(),
                "debug": bool(options.debug), "checkpoint": checkpoint, "previous_checkpoint": previous,
                "manifest": self.manifest}

    def trained(self, rid, checkpoint_path, lineage: dict | None) -> dict:
        """Right after the step checkpoint is written: its hash, and its results row marked pending (until
        the test writes the new row, the old run's numbers must not stand beside the new checkpoint; later
        steps trained from the replaced model are marked stale). Returns the run record of the training."""
        options = self.options
        record = self.record("train", checkpoint_path, lineage)
        self.logger.info(f"saved {checkpoint_path} (sha256 {record['checkpoint']['sha256'][:12]})")
        stale = mark_pending(rid.results(options.results_dir), options.step, record, self.channel_names)
        if stale:
            self.logger.info(f"warning: step(s) {', '.join(map(str, stale))} of {options.name} were trained "
                             f"from the replaced step {options.step} and are marked stale in the results; "
                             f"re-train them")
        return record

    def tested(self, rid, results: dict, samples, num_seen: int, record: dict | None) -> Path:
        """The test's numbers -> console, TensorBoard (numbers and prediction figure), the results row of
        `rid` and its task curve (mIoU old/new/all against the step, rebuilt from the results file)."""
        options, logger, meta = self.options, self.logger, self.meta
        names = self.channel_names[:num_seen]
        logger.add_results(results, options.step, names)
        if samples:
            images, labels, preds = samples
            to_class = self.channel_to_class
            logger.add_prediction_figure("test/predictions", images, to_class[labels], to_class[preds],
                                         meta["mean"], meta["std"], options.step, self.class_names, meta.get("palette"))
        protocol = results["protocol"]
        logger.info(f"test of step {options.step} ({rid.tag}, {options.name}; {protocol['test_crops']} test crops, "
                    f"unseen classes -> {protocol['test_unseen']}):\n{format_table(results, names)}")
        path = write_results(rid.results(options.results_dir), options.step, results, self.channel_names,
                             range(num_seen), options.as_dict(), record=record)
        logger.info(f"results row of step {options.step} written to {path}")
        write_task_curve(rid.task_curve_dir(options.logdir), read_results(path))
        return path
