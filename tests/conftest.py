"""Shared fixtures: small synthetic raw archives (ISPRS, LoveDA, OpenEarthMap) and their processed crops
(session scoped)."""
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from process_data import make_synthetic_landcover
from process_data.isprs_processing import POTSDAM, VAIHINGEN
from process_data.make_synthetic_isprs import generate
from process_data.tile_processing import process_dataset

# Small enough for a few seconds in total, big enough for every step of every task to get crops.
# Tiny tiles need small objects (object_scale) so every step of every task still gets crops.
RAW_SIZES = {"vaihingen": dict(tile_size=180, n_train=3, n_test=2, object_scale=1.0),
             "potsdam": dict(tile_size=192, n_train=3, n_test=2, object_scale=1.0)}
FIXTURE_CROP = 64
# LoveDA: per domain (Urban, Rural); 128 px tiles = 4 crops each.
LANDCOVER_SIZES = {"loveda": dict(tile_size=128, n_train=2, n_test=1),
                   "openearthmap": dict(tile_size=128, n_train=3, n_test=2)}


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory):
    """Folder with the extracted synthetic raw archives of both datasets (tiles ~150-210 px)."""
    root = tmp_path_factory.mktemp("raw")
    for dataset, sizes in RAW_SIZES.items():
        generate(dataset, root, seed=0, **sizes)
    for dataset, sizes in LANDCOVER_SIZES.items():
        make_synthetic_landcover.generate(dataset, root, seed=0, **sizes)
    return root


@pytest.fixture(scope="session")
def data_root(raw_root, tmp_path_factory):
    """Data root with the four built-in datasets processed at crop 64 / stride 64 (a few dozen crops each), as
    the crop store plus PNG previews (so tests can compare the two).

    Shared by the whole session: treat it as read-only (copy it to change anything).
    """
    root = tmp_path_factory.mktemp("data")
    for layout in (VAIHINGEN, POTSDAM, *LANDCOVER_SIZES):
        process_dataset(layout, raw_root, root, crop_size=FIXTURE_CROP, stride=FIXTURE_CROP,
                        seed=42, progress=False, png=True)
    return root


LOCAL_SLURM = Path(__file__).resolve().parents[1] / "scripts" / "local_slurm.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real one-node SLURM of scripts/local_slurm.sh, started if it is not up (root only).

    Where it cannot be started the test is skipped with one line, except under CI (CI=true), where
    the SLURM tests must run: there it fails.
    """
    if subprocess.run(["bash", str(LOCAL_SLURM), "status"], capture_output=True).returncode != 0:
        why = None
        if os.geteuid() != 0 and shutil.which("slurmctld") is None:
            why = "SLURM is not installed and this is not root"
        else:
            started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True)
            if started.returncode != 0:
                why = (started.stderr or started.stdout).strip().splitlines()[-1:] or ["no output"]
                why = why[0]
        if why:
            message = f"local SLURM not available ({why}); start it with: bash scripts/local_slurm.sh start"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return "debug"  # the partition


@pytest.fixture
def free_port() -> int:
    """A TCP port nobody listens on now, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_every_split_nonempty(root, dataset):
    """Helper for tests: every step of every task has train crops (every filter mode but MiB-CD's noov,
    which is empty by design where a later class, e.g. clutter, is in nearly every crop)."""
    import json
    meta = json.loads((root / dataset / "meta.json").read_text())
    for folder, sizes in meta["split"]["sizes"].items():
        if folder.endswith("-noov"):
            continue
        for step, size in enumerate(sizes):
            assert size > 0, f"{dataset} {folder} step {step} is empty"
            assert len(np.load(root / dataset / folder / f"train-{step}.npy")) == size


def png_only_copy(data_root, dataset, root):
    """Copy `dataset` to `root` as a folder processed before the crop store existed (PNG crops only)."""
    import json
    import shutil
    shutil.copytree(data_root / dataset, root / dataset, ignore=shutil.ignore_patterns("images.npy", "labels.npy"))
    meta = json.loads((root / dataset / "meta.json").read_text())
    del meta["store"]
    (root / dataset / "meta.json").write_text(json.dumps(meta))
