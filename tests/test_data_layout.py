"""dataset/layout.py: the writer (process_data/) and the reader (dataset/) of a processed dataset agree
through it: names, meta.json format and version, folder layout, split files."""
import shutil
from pathlib import Path

import numpy as np
import pytest

import argparser
import tasks
from dataset import layout as data_layout
from dataset.crop_store import KINDS, store_file
from dataset.layout import DATASETS, META_VERSION, dataset_dir, load_meta, meta_file
from dataset.step_datasets import split_file
from process_data import make_synthetic_isprs, make_synthetic_landcover
from process_data.isprs_processing import ISPRS_DATASETS, LAYOUTS
from process_data.tile_processing import regenerate_splits
from scripts import campaign
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_the_processed_meta_json_is_what_the_reader_reads(data_root, tmp_path):
    for dataset in DATASETS:
        folder = dataset_dir(data_root, dataset)
        meta = data_layout.load_meta(data_root, dataset)
        assert load_meta(data_root, dataset) == meta  # dataset/ reads it through the owner
        assert list(meta)[:2] == ["format_version", "dataset"]
        assert meta["format_version"] == META_VERSION and meta["dataset"] == dataset
        rewritten = data_layout.write_meta(tmp_path / dataset, meta)
        assert meta_file(folder).read_text() == rewritten.read_text()  # the writer wrote it with write_meta
        for split in data_layout.SPLITS:
            for kind in KINDS:  # the store files meta.json names are those the reader maps
                path = store_file(folder, split, kind)
                assert folder / meta["store"][split][kind] == path and path.is_file()


def test_split_files_are_where_the_reader_looks(data_root):
    for dataset in DATASETS:
        meta = data_layout.load_meta(data_root, dataset)
        for task, (family, steps) in tasks.all_tasks(dataset).items():
            for mode, suffix in tasks.FILTER_MODES[family].items():
                sizes = meta["split"]["sizes"][data_layout.split_folder(task, suffix)]
                assert len(sizes) == len(steps)
                for step, size in enumerate(sizes):
                    path = split_file(data_root, dataset, task, step, mode)
                    assert path == data_layout.split_file(dataset_dir(data_root, dataset), task, suffix, step)
                    indices = np.load(path)
                    assert len(indices) == size and indices.dtype == np.int64


def test_write_meta_round_trips_and_leaves_no_temp(tmp_path):
    folder = dataset_dir(tmp_path, "potsdam")
    meta = {**data_layout.meta_header("potsdam"), "crop_size": 64, "split": {"sizes": {"4-1": [3, 0]}}}
    data_layout.write_meta(folder, meta)
    assert data_layout.load_meta(tmp_path, "potsdam") == meta
    data_layout.save_npy(data_layout.split_file(folder, "4-1", "-ov", 1), np.arange(3))
    assert np.array_equal(np.load(folder / "4-1-ov" / "train-1.npy"), np.arange(3))
    assert sorted(p.name for p in folder.rglob("*")) == ["4-1-ov", "meta.json", "train-1.npy"]


@pytest.mark.parametrize("field, value", [("format_version", META_VERSION + 1), ("dataset", "vaihingen")])
def test_reader_and_split_rewriter_refuse_a_foreign_meta_json(data_root, tmp_path, field, value):
    shutil.copytree(dataset_dir(data_root, "potsdam"), dataset_dir(tmp_path, "potsdam"))
    meta = data_layout.load_meta(tmp_path, "potsdam")
    data_layout.write_meta(dataset_dir(tmp_path, "potsdam"), {**meta, field: value})
    message = (f"{tmp_path / 'potsdam' / 'meta.json'} is not a meta.json of potsdam in format {META_VERSION}; run "
               f"`python process_data/data_process_potsdam.py --src RAW --dst {tmp_path}` again")
    with pytest.raises(UserError) as err:
        load_meta(tmp_path, "potsdam")
    assert str(err.value) == message
    with pytest.raises(UserError) as err:
        regenerate_splits(tmp_path, "potsdam")
    assert str(err.value) == message


def test_missing_and_unreadable_meta_json_messages(tmp_path):
    command = f"python process_data/data_process_vaihingen.py --src RAW --dst {tmp_path}"
    path = tmp_path / "vaihingen" / "meta.json"
    with pytest.raises(UserError) as err:
        load_meta(tmp_path, "vaihingen")
    assert str(err.value) == (f"{path} not found: {tmp_path} holds no processed vaihingen; "
                              f"run `{command}` first")
    with pytest.raises(UserError) as err:
        regenerate_splits(tmp_path, "vaihingen")
    assert str(err.value) == f"{path} not found: process the raw archives first with `{command}`"
    path.parent.mkdir()
    path.write_text("{")
    with pytest.raises(UserError, match=rf"^cannot read {path} \(.*\); run `{command}` again$"):
        load_meta(tmp_path, "vaihingen")
    with pytest.raises(UserError, match=rf"^cannot read {path} \(.*\); process the dataset again$"):
        regenerate_splits(tmp_path, "vaihingen")
    with pytest.raises(UserError, match=r"^unknown dataset 'berlin': neither built in \(vaihingen, potsdam, loveda, "
                                        r"openearthmap\) nor processed in .*; process a dataset of your own first "
                                        r"with `python process_data/process_dataset.py --spec SPEC"):
        load_meta(tmp_path, "berlin")


def test_every_list_of_datasets_is_the_owners(capsys):
    assert tuple(tasks.TASKS)[:len(DATASETS)] == tuple(tasks.MIBCD_TASKS)[:len(DATASETS)] == DATASETS
    assert set(LAYOUTS) == set(make_synthetic_isprs.STYLES) == set(ISPRS_DATASETS)
    assert set(ISPRS_DATASETS) | set(make_synthetic_landcover.DATASETS) == set(DATASETS)
    assert {p.stem for p in (ROOT / "utils" / "specs").glob("*.json")} == \
        {*DATASETS, *(f"{name}.tasks" for name in ("isprs", "loveda", "openearthmap"))}
    for parser, dest in ((argparser.build_parser(), "dataset"), (campaign.build_parser(), "datasets")):
        help_text = next(a.help for a in parser._actions if a.dest == dest)
        assert all(name in help_text for name in DATASETS)  # any processed name is allowed; the help names these
    for main, shown in ((make_synthetic_isprs.main, ",".join((*ISPRS_DATASETS, "both"))),
                        (make_synthetic_landcover.main, ",".join((*make_synthetic_landcover.DATASETS, "both")))):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert f"{{{shown}}}" in capsys.readouterr().out
