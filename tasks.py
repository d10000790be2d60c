"""Incremental task dictionaries per dataset (DESIGN §3.2) and the helpers that read them.

A task maps each step to the classes it introduces. Class indices are those of DESIGN §3.1
(0 clutter/background, 1 impervious, 2 building, 3 low vegetation, 4 tree, 5 car); the model's
channel index of a class is its position in the task order (`get_order`).
"""
import operator

from utils.errors import UserError

_ISPRS_TASKS = {
    "offline": {0: [0, 1, 2, 3, 4, 5]},
    "4-1": {0: [0, 1, 2, 3, 4], 1: [5]},
    "3-1s": {0: [0, 1, 2, 3], 1: [4], 2: [5]},
    "2-1s": {0: [0, 1, 2], 1: [3], 2: [4], 3: [5]},
    "1s": {0: [0, 1], 1: [2], 2: [3], 3: [4], 4: [5]},
}

# Same tasks for both ISPRS datasets; separate dicts so adding a task to one leaves the other alone.
TASKS = {
    "vaihingen": {task: {step: list(classes) for step, classes in steps.items()}
                  for task, steps in _ISPRS_TASKS.items()},
    "potsdam": {task: {step: list(classes) for step, classes in steps.items()}
                for task, steps in _ISPRS_TASKS.items()},
}


def _task(dataset, task):
    if dataset not in TASKS:
        raise UserError(f"unknown dataset '{dataset}'; choose one of: {', '.join(sorted(TASKS))}")
    if task not in TASKS[dataset]:
        raise UserError(f"unknown task '{task}' for dataset '{dataset}'; "
                        f"choose one of: {', '.join(TASKS[dataset])}")
    return TASKS[dataset][task]


def _check_step(dataset, task, step):
    steps = _task(dataset, task)
    step_given = step
    try:
        step = operator.index(step)  # accept numpy integers, refuse floats and strings
    except TypeError:
        step = None
    if step not in steps:
        raise UserError(f"task '{task}' of '{dataset}' has no step {step_given!r}; "
                        f"valid steps: {', '.join(str(s) for s in sorted(steps))}")
    return steps, step


def num_steps(dataset, task):
    """Number of incremental steps of the task (1 for `offline`)."""
    return len(_task(dataset, task))


def get_task_dict(dataset, task, step):
    """{step: [classes]} for steps 0..step."""
    steps, step = _check_step(dataset, task, step)
    return {s: list(steps[s]) for s in range(step + 1)}


def get_task_labels(dataset, task, step):
    """(classes introduced at `step`, classes of all previous steps in task order)."""
    steps, step = _check_step(dataset, task, step)
    previous = [c for s in range(step) for c in steps[s]]
    return list(steps[step]), previous


def get_per_task_classes(dataset, task, step):
    """Number of classes of each step 0..step (the classifier sizes of the model)."""
    steps, step = _check_step(dataset, task, step)
    return [len(steps[s]) for s in range(step + 1)]


def get_order(dataset, task):
    """All classes of the task in step order: the model's channel index of each class."""
    steps = _task(dataset, task)
    return [c for s in sorted(steps) for c in steps[s]]
