"""tasks.py: task dictionaries (docs/data.md#tasks) and the helpers reading them."""
import numpy as np
import pytest

import tasks
from utils.errors import UserError

EXPECTED = {
    "offline": {0: [0, 1, 2, 3, 4, 5]},
    "4-1": {0: [0, 1, 2, 3, 4], 1: [5]},
    "3-1s": {0: [0, 1, 2, 3], 1: [4], 2: [5]},
    "2-1s": {0: [0, 1, 2], 1: [3], 2: [4], 3: [5]},
    "1s": {0: [0, 1], 1: [2], 2: [3], 3: [4], 4: [5]},
}


@pytest.mark.parametrize("dataset", ["vaihingen", "potsdam"])
def test_tasks_match_design(dataset):
    assert tasks.TASKS[dataset] == EXPECTED
    for task, steps in tasks.TASKS[dataset].items():
        classes = [c for s in sorted(steps) for c in steps[s]]
        assert sorted(classes) == list(range(6)), task  # every class exactly once
        assert tasks.num_steps(dataset, task) == len(EXPECTED[task])
        assert tasks.get_order(dataset, task) == list(range(6))


def test_datasets_do_not_share_task_objects():
    tasks.TASKS["vaihingen"]["1s"][0].append(99)
    try:
        assert tasks.TASKS["potsdam"]["1s"][0] == [0, 1]
    finally:
        tasks.TASKS["vaihingen"]["1s"][0].pop()


def test_task_dict_labels_and_counts():
    assert tasks.get_task_dict("potsdam", "2-1s", 2) == {0: [0, 1, 2], 1: [3], 2: [4]}
    assert tasks.get_task_labels("vaihingen", "2-1s", 0) == ([0, 1, 2], [])
    assert tasks.get_task_labels("vaihingen", "2-1s", 2) == ([4], [0, 1, 2, 3])
    assert tasks.get_task_labels("potsdam", "1s", 4) == ([5], [0, 1, 2, 3, 4])
    assert tasks.get_per_task_classes("vaihingen", "1s", 4) == [2, 1, 1, 1, 1]
    assert tasks.get_per_task_classes("vaihingen", "4-1", 0) == [5]
    assert tasks.get_per_task_classes("potsdam", "offline", 0) == [6]
    # numpy integers (e.g. from argparse-free configs) are accepted
    assert tasks.get_task_labels("vaihingen", "3-1s", np.int64(1)) == ([4], [0, 1, 2, 3])


def test_unknown_choices_list_the_valid_ones():
    with pytest.raises(UserError, match="potsdam, vaihingen"):
        tasks.get_task_dict("cityscapes", "4-1", 0)
    with pytest.raises(UserError, match=r"'15-1'.*offline, 4-1, 3-1s, 2-1s, 1s"):
        tasks.get_task_labels("potsdam", "15-1", 0)
    with pytest.raises(UserError, match="valid steps: 0, 1"):
        tasks.get_per_task_classes("vaihingen", "4-1", 2)
    with pytest.raises(UserError, match="valid steps: 0, 1, 2"):
        tasks.get_task_labels("vaihingen", "3-1s", 1.0)
    with pytest.raises(UserError):
        tasks.get_task_labels("vaihingen", "3-1s", -1)
    with pytest.raises(UserError, match="choose one of"):
        tasks.num_steps("vaihingen", "nope")


def test_filter_mode_errors_in_library_words_and_in_flags_on_the_command_line():
    from argparser import parse_args

    with pytest.raises(UserError) as err:
        tasks.check_filter_mode("potsdam", "4-1", "split")
    library = str(err.value)
    assert library.startswith("filter mode split belongs to MiB-CD's tasks") and "--" not in library
    assert library.endswith("task 4-1 (MiCro's family) takes disjoint or overlap")
    with pytest.raises(UserError) as err:
        parse_args(["--dataset", "potsdam", "--task", "4-1", "--filter_mode", "split"])
    assert str(err.value) == "--filter_mode split" + library[len("filter mode split"):]
