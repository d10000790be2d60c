"""Split files: which training crops each step of a task uses, per filter mode (docs/data.md#split-files).

MiCro's family: `disjoint` (a seeded, per-class balanced partition) and `overlap`; MiB-CD's family: `split`
(class-balanced partition), `overlap` and `noov`. Every algorithm reads only the per-crop class pixel counts
of meta.json, so splits are regenerated without reading an image.
"""
import numpy as np

import tasks as task_defs
from dataset.layout import save_npy, split_file, split_folder


def class_presence(class_pixels, min_pixels, num_classes=None):
    """Bool [n_crops, K]: the crop has at least `min_pixels` pixels of the class (columns of the counts:
    the K classes, then 255; num_classes is needed only when there is no crop)."""
    class_pixels = np.asarray(class_pixels, dtype=np.int64)
    if class_pixels.ndim != 2:
        class_pixels = class_pixels.reshape(-1, (num_classes or 0) + 1)
    return class_pixels[:, :-1] >= max(int(min_pixels), 1)


def _step_has(presence, steps):
    return np.stack([presence[:, classes].any(axis=1) for classes in steps], axis=1)


def overlapped_split(presence, steps):
    """Step t gets every crop that contains a class of step t."""
    step_has = _step_has(presence, steps)
    return [np.flatnonzero(step_has[:, t]).astype(np.int64) for t in range(len(steps))]


def disjoint_split(presence, steps, seed):
    """Seeded partition: each crop goes to one step whose new classes it contains, or to none.

    Crops with a single possible step are placed first; then, in a seeded random order, each
    remaining crop goes to the candidate step whose classes present in the crop are the least
    covered so far (crops per class), ties broken at random: a greedy per-class balance.
    """
    presence = np.asarray(presence, dtype=bool)
    step_has = _step_has(presence, steps)
    n_options = step_has.sum(axis=1)
    rng = np.random.default_rng(seed)
    random_rank = rng.permutation(len(presence))
    order = np.lexsort((random_rank, n_options))
    order = order[n_options[order] > 0]
    tie_break = rng.random((len(presence), len(steps))) * 0.5  # < 1: only separates equal counts

    step_classes = [np.asarray(classes) for classes in steps]
    coverage = np.zeros(presence.shape[1], dtype=np.int64)  # crops assigned per class
    assigned = np.full(len(presence), -1, dtype=np.int64)
    for crop in order:  # a loop over crops (objects), each step vectorised
        options = np.flatnonzero(step_has[crop])
        if len(options) == 1:
            choice = options[0]
        else:
            need = [coverage[step_classes[s][presence[crop, step_classes[s]]]].min()
                    + tie_break[crop, s] for s in options]
            choice = options[int(np.argmin(need))]
        assigned[crop] = choice
        coverage[step_classes[choice][presence[crop, step_classes[choice]]]] += 1
    return [np.flatnonzero(assigned == t).astype(np.int64) for t in range(len(steps))]


def class_balanced_split(presence, steps, seed):
    """MiB-CD's `split` mode: a seeded, class-balanced, disjoint partition of the crops.

    Crops are visited in a seeded random order; each goes to the class of the task present in it
    that has the fewest crops so far (ties: the lower class index), and step t gets the crops
    assigned to its classes. Crops holding no class of the task go nowhere.
    """
    presence = np.asarray(presence, dtype=bool)
    task_classes = sorted(c for classes in steps for c in classes)
    present = presence[:, task_classes]
    order = np.random.default_rng(seed).permutation(len(presence))
    coverage = np.zeros(len(task_classes), dtype=np.int64)
    owner = np.full(len(presence), -1, dtype=np.int64)  # class each crop is assigned to
    for crop in order:  # sequential greedy: each choice depends on the previous ones
        candidates = np.flatnonzero(present[crop])
        if len(candidates):
            pick = candidates[np.argmin(coverage[candidates])]
            coverage[pick] += 1
            owner[crop] = task_classes[pick]
    return [np.flatnonzero(np.isin(owner, classes)).astype(np.int64) for classes in steps]


def no_overlap_split(presence, steps):
    """MiB-CD's `noov` mode: crops with a class of step t and no class of a later step."""
    step_has = _step_has(presence, steps)
    future = np.flip(np.cumsum(np.flip(step_has, axis=1), axis=1), axis=1) - step_has  # later steps present
    return [np.flatnonzero(step_has[:, t] & (future[:, t] == 0)).astype(np.int64) for t in range(len(steps))]


def task_splits(family, presence, steps, seed):
    """{filter mode: per-step crop indices} of one task of a family (tasks.FILTER_MODES)."""
    if family == task_defs.MIBCD:
        return {"split": class_balanced_split(presence, steps, seed),
                "overlap": overlapped_split(presence, steps), "noov": no_overlap_split(presence, steps)}
    return {"disjoint": disjoint_split(presence, steps, seed), "overlap": overlapped_split(presence, steps)}


def write_splits(folder, meta, only_task=None, unchanged_ok=False):
    """Write the split files of every filter mode of every task (both families), or of `only_task`; returns
    their sizes. unchanged_ok: leave a file that already holds the same indices (a run's own check)."""
    seed, min_pixels = meta["split"]["seed"], meta["split"]["min_pixels"]
    presence = class_presence(meta["train"]["class_pixels"], min_pixels, len(meta["classes"]))
    sizes = {}
    for task, (family, step_dict) in task_defs.all_tasks(meta["dataset"]).items():
        if only_task is not None and task != only_task:
            continue
        steps = [step_dict[s] for s in sorted(step_dict)]
        suffixes = task_defs.FILTER_MODES[family]
        for mode, per_step in task_splits(family, presence, steps, seed).items():
            for step, indices in enumerate(per_step):
                path, indices = split_file(folder, task, suffixes[mode], step), np.sort(indices)
                if not (unchanged_ok and _holds(path, indices)):
                    save_npy(path, indices)
            sizes[split_folder(task, suffixes[mode])] = [int(len(indices)) for indices in per_step]
    return sizes


def _holds(path, indices):
    try:
        return np.array_equal(np.load(path), indices)
    except (OSError, ValueError):
        return False


def default_min_pixels(crop_size):
    """0.1 % of a crop (at least 1 px): a sliver of a class does not make a crop 'contain' it."""
    return max(1, crop_size * crop_size // 1000)
