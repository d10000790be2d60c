"""Incremental tasks per dataset, declared in task files (docs/data.md#tasks), in two families with their own
label convention.

A task file (JSON) maps each task name to its family and its steps, each step the list of the class names
it introduces. The built-in datasets' tasks are shipped in the same format (utils/specs/*.tasks.json, named
by each dataset spec); `load_task_file` adds a user's tasks to a dataset. Here every class is an index in
the dataset's class list (ISPRS: 0 clutter, 1 impervious surfaces, 2 building, 3 low vegetation, 4 tree,
5 car). The family fixes what the model's channel 0 (background) is:

- MiCro's family (`micro`; ISPRS 4-1, 3-1s, 2-1s, 1s, offline): the first class of step 0 is the
  background class (the dataset's "background", clutter for ISPRS); channel = position of the class in
  the task order (`get_order`).
- MiB-CD's family (`mibcd`; ISPRS 6s, 222a, 321, mibcd-offline): every class is learnable; channel 0 is a
  synthetic background that absorbs everything not (yet) learned, then the classes follow in step order
  (channel = 1 + position).

The raw-class helpers (`get_task_labels`, `get_order`) never list the synthetic background;
the channel helpers (`get_per_task_classes`, `channel_of`, `channel_names`) do.
"""
import operator

import numpy as np

from utils.dataset_spec import BUILTIN_DATASETS, NAME, SPEC_DIR, builtin_spec, read_task_file
from utils.errors import UserError

MICRO, MIBCD = "micro", "mibcd"
BACKGROUND_CHANNEL = 0
SYNTHETIC_BACKGROUND_NAME = "background"

# Filter modes (which training crops a step uses) per family; the first is the family's default.
# Value: suffix of the split folder `<task><suffix>/train-<step>.npy` (and of run tags).
FILTER_MODES = {
    MICRO: {"disjoint": "", "overlap": "-ov"},
    MIBCD: {"split": "", "overlap": "-ov", "noov": "-noov"},
}

DATASETS = BUILTIN_DATASETS  # the datasets known without a processed meta.json; others join by `register_dataset`
TASKS = {}  # dataset -> {task: {step: [class indices]}} of MiCro's family
MIBCD_TASKS = {}  # dataset -> the same of MiB-CD's family
_FAMILY_TASKS = {MICRO: TASKS, MIBCD: MIBCD_TASKS}
_CLASSES = {}  # dataset -> class names (index = processed label value)
_BACKGROUND = {}  # dataset -> name of its background class (None: only MiB-CD's family; ANY_BACKGROUND: unchecked)
ANY_BACKGROUND = ""  # a dataset known from meta.json alone: the first class of step 0 is the background
_SHIPPED = {}  # built-in dataset -> {task: steps} of its shipped task file (their split files come with processing)


def register_dataset(dataset, classes, background=None):
    """Make a dataset known by its classes (a processed meta.json's); its tasks come from task files."""
    if dataset in _CLASSES:
        if list(classes) != _CLASSES[dataset]:
            raise UserError(f"dataset {dataset} has the classes {', '.join(_CLASSES[dataset])}, not "
                            f"{', '.join(classes)}; process it again or choose another name")
        return
    _CLASSES[dataset] = list(classes)
    _BACKGROUND[dataset] = background
    TASKS[dataset], MIBCD_TASKS[dataset] = {}, {}


def register_processed(data_root, dataset):
    """Make a dataset processed under `data_root` known by its meta.json (built-in datasets already are)."""
    if dataset not in _CLASSES:
        from dataset.layout import load_meta  # only for datasets that are not built in
        register_dataset(dataset, load_meta(data_root, dataset)["classes"], ANY_BACKGROUND)


def prepare(dataset, data_root=None, task_file=None):
    """Make `dataset` (built in, or processed under `data_root`) and the tasks of `task_file` known; idempotent."""
    if data_root is not None:
        register_processed(data_root, dataset)
    if task_file:
        load_task_file(task_file, dataset)


def class_names(dataset):
    """The dataset's class names; index = the class value of processed labels."""
    _check_dataset(dataset)
    return list(_CLASSES[dataset])


def _task_error(source, task, message):
    return UserError(f"{source}: task '{task}': {message}")


def parse_tasks(content, dataset, source):
    """{task: (family, {step: [class indices]})} of a task file's content, checked against the dataset's
    classes; a UserError naming the file, the task and the problem otherwise."""
    classes, background = _CLASSES[dataset], _BACKGROUND[dataset]
    table = content.get("tasks") if isinstance(content, dict) else None
    if not isinstance(table, dict) or not table:
        raise UserError(f'{source}: a task file is {{"tasks": {{"NAME": {{"family": "micro"|"mibcd", '
                        f'"steps": [[class, ...], ...]}}}}}}')
    parsed = {}
    for task, entry in table.items():
        if not NAME.match(task):
            raise _task_error(source, task, "a task name is letters, digits, . + - (no _ or /: it names folders "
                                            "and results files)")
        if not isinstance(entry, dict) or entry.get("family") not in FILTER_MODES:
            raise _task_error(source, task, f'give "family": {" or ".join(FILTER_MODES)}')
        steps = entry.get("steps")
        if not isinstance(steps, list) or not steps:
            raise _task_error(source, task, '"steps" must be a non-empty list of steps (lists of class names)')
        seen, indexed = {}, {}
        for step, names in enumerate(steps):
            if not isinstance(names, list) or not names:
                raise _task_error(source, task, f"step {step} is empty; every step introduces at least one class")
            for name in names:
                if name not in classes:
                    raise _task_error(source, task, f"step {step}: unknown class {name!r}; {dataset}'s classes "
                                                    f"are {', '.join(classes)}")
                if name in seen:
                    raise _task_error(source, task, f"class {name!r} is in step {seen[name]} and step {step}; "
                                                    f"a class is introduced once")
                seen[name] = step
            indexed[step] = [classes.index(name) for name in names]
        if entry["family"] == MICRO:
            if background is None:
                raise _task_error(source, task, f"{dataset} has no background class, so MiCro's family does "
                                                f'not apply; use "family": "mibcd" (synthetic background)')
            if background != ANY_BACKGROUND and steps[0][0] != background:
                raise _task_error(source, task, f"MiCro's family starts step 0 with the background class "
                                                f"{background!r}")
        extra = set(entry) - {"family", "steps", "description"}
        if extra:
            raise _task_error(source, task, f"unknown key(s) {', '.join(sorted(extra))}")
        parsed[task] = (entry["family"], indexed)
    return parsed


def load_task_file(path, dataset):
    """Add the tasks of a task file to `dataset` (replacing a task of an earlier file of the same name); returns
    their names. A task may not redefine one of the dataset's shipped tasks (its split files are the shipped
    one's)."""
    _check_dataset(dataset)
    parsed = parse_tasks(read_task_file(path), dataset, str(path))
    for task, (family_name, steps) in parsed.items():
        known = _find(dataset, task)
        if known is not None and is_shipped(dataset, task) and (known[0] != family_name or known[1] != steps):
            raise _task_error(path, task, f"{dataset} already has a task of that name with other steps; "
                                          f"give yours another name")
        for table in _FAMILY_TASKS.values():
            table[dataset].pop(task, None)
        _FAMILY_TASKS[family_name][dataset][task] = steps
    return list(parsed)


def _find(dataset, task):
    for family_name, table in _FAMILY_TASKS.items():
        if task in table[dataset]:
            return family_name, table[dataset][task]
    return None


def _register_builtin(dataset):
    spec = builtin_spec(dataset)
    register_dataset(dataset, spec.classes, spec.background)
    load_task_file(SPEC_DIR / spec.task_file, dataset)
    _SHIPPED[dataset] = {task: _find(dataset, task) for task in task_names(dataset)}


def is_shipped(dataset, task):
    """Whether `task` is one of a built-in dataset's shipped tasks (not one of a task file given later)."""
    return task in _SHIPPED.get(dataset, {})


def describe_tasks(dataset):
    """One line per task: name, family and its steps as class names (`run.py --list_tasks`)."""
    names = class_names(dataset)
    lines = []
    for task, (family_name, steps) in all_tasks(dataset).items():
        shown = " | ".join(f"{s}: {', '.join(names[c] for c in steps[s])}" for s in sorted(steps))
        lines.append(f"{task} ({'MiCro' if family_name == MICRO else 'MiB-CD'}'s family, {len(steps)} "
                     f"step{'s' if len(steps) > 1 else ''}): {shown}")
    return lines


def task_names(dataset):
    """Every task of the dataset, MiCro's family first."""
    _check_dataset(dataset)
    return list(TASKS[dataset]) + list(MIBCD_TASKS[dataset])


def all_tasks(dataset):
    """{task: (family, {step: [classes]})} of both families."""
    _check_dataset(dataset)
    return {task: (family, steps) for family, table in _FAMILY_TASKS.items()
            for task, steps in table[dataset].items()}


def _check_dataset(dataset):
    if dataset not in _CLASSES:
        raise UserError(f"unknown dataset '{dataset}'; choose one of: {', '.join(sorted(_CLASSES))} (or process "
                        f"your own from a dataset spec)")


def _task(dataset, task):
    _check_dataset(dataset)
    for table in _FAMILY_TASKS.values():
        if task in table[dataset]:
            return table[dataset][task]
    raise UserError(f"unknown task '{task}' for dataset '{dataset}'; "
                    f"choose one of: {', '.join(task_names(dataset))}")


def family(dataset, task):
    """'micro' (the first class is the background) or 'mibcd' (synthetic background channel 0)."""
    _task(dataset, task)
    return MIBCD if task in MIBCD_TASKS[dataset] else MICRO


def synthetic_background(dataset, task):
    return family(dataset, task) == MIBCD


def filter_modes(dataset, task):
    """{mode: split-folder suffix} of the task's family; the first mode is the default."""
    return dict(FILTER_MODES[family(dataset, task)])


def check_filter_mode(dataset, task, mode):
    """The filter mode to use (None -> the family's default); UserError for another family's or unknown mode."""
    modes = filter_modes(dataset, task)
    if mode is None:
        return next(iter(modes))
    if mode not in modes:
        fam = family(dataset, task)
        other = MICRO if fam == MIBCD else MIBCD
        known = mode in FILTER_MODES[other]
        what = (f"belongs to {'MiB-CD' if other == MIBCD else 'MiCro'}'s tasks "
                f"({', '.join(_FAMILY_TASKS[other][dataset])})" if known else "is unknown")
        raise UserError("{mode} {what}; task {task} ({family}'s family) takes {modes}", mode=f"filter mode {mode}",
                        what=what, task=task, family="MiB-CD" if fam == MIBCD else "MiCro", modes=" or ".join(modes))
    return mode


def split_suffix(dataset, task, mode):
    """Suffix of the split folder / run tag of a filter mode ('' for the family's default)."""
    return filter_modes(dataset, task)[check_filter_mode(dataset, task, mode)]


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


def num_steps_if_known(dataset, task):
    """num_steps, or None for a task not known here (results tables then end at the files' last step)."""
    try:
        return num_steps(dataset, task)
    except UserError:
        return None


def table_task_order():
    """The order of the task columns of results tables: the shipped ISPRS tasks' order."""
    return list(TASKS["vaihingen"])


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
    """Channels of each step 0..step (the classifier sizes); step 0 includes the synthetic background."""
    steps, step = _check_step(dataset, task, step)
    extra = 1 if synthetic_background(dataset, task) else 0
    return [len(steps[s]) + (extra if s == 0 else 0) for s in range(step + 1)]


def get_order(dataset, task):
    """All classes of the task in step order (without the synthetic background)."""
    steps = _task(dataset, task)
    return [c for s in sorted(steps) for c in steps[s]]


def channel_of(dataset, task):
    """{class: model channel} (MiCro: position in the order; MiB-CD: 1 + position)."""
    offset = 1 if synthetic_background(dataset, task) else 0
    return {cls: offset + index for index, cls in enumerate(get_order(dataset, task))}


def channel_to_class(dataset, task):
    """uint8[256] lookup: model channel -> class index (for the palette and whole-tile outputs);
    MiB-CD's synthetic background channel and 255 map to 255."""
    lut = np.full(256, 255, dtype=np.uint8)
    for cls, channel in channel_of(dataset, task).items():
        lut[channel] = cls
    return lut


def channel_names(dataset, task):
    """Name of every model channel of the task (MiB-CD: 'background' first)."""
    names = [_CLASSES[dataset][c] for c in get_order(dataset, task)]
    return ([SYNTHETIC_BACKGROUND_NAME] + names) if synthetic_background(dataset, task) else names


for _dataset in BUILTIN_DATASETS:  # the shipped datasets and their tasks, once at import
    _register_builtin(_dataset)
