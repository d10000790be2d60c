"""dataset/: label remapping per step, get_datasets (train/val/test), errors, joint transforms."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

import tasks
from dataset.incremental import label_lut
from dataset.isprs import ISPRSCrops
from dataset.layout import load_meta
from dataset.options import DataOptions
from dataset.step_datasets import get_datasets, split_file
from dataset.transforms import (
    BatchNormalize,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomRotation90,
    RandomScaleCrop,
    RandomVerticalFlip,
    ToTensor,
    eval_transform,
    train_transform,
)
from utils.errors import UserError

ALL_STEPS = [(dataset, task, step) for dataset in ("vaihingen", "potsdam")
             for task in tasks.TASKS[dataset] for step in range(tasks.num_steps(dataset, task))]


def opts(data_root, **overrides):
    base = dict(data_root=str(data_root), dataset="vaihingen", task="4-1", step=0, overlap=False,
                crop_size=48, cross_val=False, random_seed=42)
    base.update(overrides)
    return DataOptions(**base)


def reference_remap(value, new, old, mode):
    """The label remapping of docs/data.md written out for one label value (classes = channel indices here)."""
    if value == 255 or value > 5:
        return 255
    if mode == "train":
        return value if value in new else 0
    if mode == "val":
        return value if value in new or value == 0 else 255
    return value if value in new or value in old else 255


@pytest.mark.parametrize("dataset,task,step", ALL_STEPS)
def test_label_lut_every_step_of_every_task(dataset, task, step):
    new, old = tasks.get_task_labels(dataset, task, step)
    for mode in ("train", "val", "test"):
        lut = label_lut(dataset, task, step, mode)
        assert lut.dtype == np.uint8 and lut.shape == (256,)
        assert [int(v) for v in lut] == [reference_remap(v, new, old, mode) for v in range(256)], mode


def test_label_lut_examples():
    raw = np.array([0, 1, 2, 3, 4, 5, 255, 7], np.uint8)
    assert label_lut("potsdam", "2-1s", 2, "train")[raw].tolist() == [0, 0, 0, 0, 4, 0, 255, 255]
    assert label_lut("potsdam", "2-1s", 2, "val")[raw].tolist() == [0, 255, 255, 255, 4, 255, 255, 255]
    assert label_lut("potsdam", "2-1s", 2, "test")[raw].tolist() == [0, 1, 2, 3, 4, 255, 255, 255]
    assert label_lut("vaihingen", "offline", 0, "test")[raw].tolist() == [0, 1, 2, 3, 4, 5, 255, 255]
    with pytest.raises(ValueError):
        label_lut("vaihingen", "4-1", 0, "training")


@pytest.mark.parametrize("dataset,task,step", ALL_STEPS)
def test_get_datasets_every_step(data_root, dataset, task, step):
    meta = load_meta(data_root, dataset)
    new, old = tasks.get_task_labels(dataset, task, step)
    for overlap in (False, True):
        train, val, test = get_datasets(opts(data_root, dataset=dataset, task=task, step=step, overlap=overlap))
        expected = np.load(split_file(data_root, dataset, task, step, overlap))
        assert np.array_equal(train.indices, expected) and len(train) > 0
        assert train.base.split == "train" and val.base.split == "test"
        image, label = train[0]  # uint8 items: the batch is normalised on the device (BatchNormalize)
        assert image.dtype == torch.uint8 and image.shape == (48, 48, 3)
        assert label.dtype == torch.uint8 and label.shape == (48, 48)
        assert set(label.unique().tolist()) <= set(new) | {0, 255}
    # val: the test crops with a class of this step, labelled as validation
    counts = np.asarray(meta["test"]["class_pixels"])[:, new]
    assert np.array_equal(val.indices, np.flatnonzero((counts >= meta["split"]["min_pixels"]).any(1)))
    assert len(test) == len(meta["test"]["crops"]) and np.array_equal(test.indices, np.arange(len(test)))
    for dataset_view, mode in ((val, "val"), (test, "test")):  # not augmented: compare exactly
        raw_image, raw_label = dataset_view.base[int(dataset_view.indices[0])]
        image, label = dataset_view[0]
        lut = label_lut(dataset, task, step, mode)
        assert np.array_equal(label.numpy(), lut[raw_label])
        norm = (torch.from_numpy(np.array(raw_image)).permute(2, 0, 1).float() / 255
                - torch.tensor(meta["mean"]).view(-1, 1, 1)) / torch.tensor(meta["std"]).view(-1, 1, 1)
        batch = BatchNormalize(meta["mean"], meta["std"])(image[None])
        assert torch.equal(batch[0], norm)  # the old per-item float path, bit for bit


def test_cross_val_holds_out_20_percent_of_the_steps_crops(data_root):
    kw = dict(dataset="potsdam", task="offline", step=0, cross_val=True)
    train, val, test = get_datasets(opts(data_root, random_seed=1, **kw))
    split = np.load(split_file(data_root, "potsdam", "offline", 0, False))
    assert len(val) == round(0.2 * len(split)) and len(train) + len(val) == len(split)
    assert np.array_equal(np.sort(np.concatenate([train.indices, val.indices])), split)
    assert val.base.split == "train" and test.base.split == "test"
    assert np.array_equal(val.lut, label_lut("potsdam", "offline", 0, "val"))
    same, _, _ = get_datasets(opts(data_root, random_seed=1, **kw))
    other, _, _ = get_datasets(opts(data_root, random_seed=2, **kw))
    assert np.array_equal(same.indices, train.indices)
    assert not np.array_equal(other.indices, train.indices)


def test_isprs_crops_reads_the_store(data_root):
    crops = ISPRSCrops(data_root, "vaihingen", "test")
    assert crops.uses_store
    image, label = crops[len(crops) - 1]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label.shape == (64, 64)
    counts = np.bincount(label.ravel(), minlength=256)[[0, 1, 2, 3, 4, 5, 255]]
    assert counts.tolist() == crops.class_pixels()[len(crops) - 1].tolist()


def test_dataloader_with_workers_and_augmentation(data_root):
    train, _, _ = get_datasets(opts(data_root, dataset="vaihingen", task="3-1s", step=1, crop_size=32))
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1, shuffle=True)
    images, labels = next(iter(loader))
    assert images.shape == (4, 32, 32, 3) and labels.shape == (4, 32, 32)
    assert images.dtype == labels.dtype == torch.uint8


# ---------------------------------------------------------------------------------------- errors
def test_errors_are_user_errors_with_the_fix(data_root, tmp_path):
    with pytest.raises(UserError, match=r"meta.json not found.*data_process_potsdam.py"):
        load_meta(tmp_path, "potsdam")
    with pytest.raises(UserError, match="choose one of"):
        get_datasets(opts(data_root, task="15-1"))
    with pytest.raises(UserError, match="valid steps"):
        get_datasets(opts(data_root, task="4-1", step=2))

    root = tmp_path / "data"
    shutil.copytree(data_root / "vaihingen", root / "vaihingen", ignore=shutil.ignore_patterns("*.png"))
    split = split_file(root, "vaihingen", "2-1s", 1, True)
    split.unlink()
    with pytest.raises(UserError, match=r"train-1.npy not found.*--splits_only"):
        get_datasets(opts(root, task="2-1s", step=1, overlap=True))
    np.save(split, np.zeros(0, np.int64))
    with pytest.raises(UserError, match=r"step 1 of task 2-1s has no training crop.*low vegetation"):
        get_datasets(opts(root, task="2-1s", step=1, overlap=True))
    np.save(split, np.array([0, 10_000]))
    with pytest.raises(UserError, match="stale"):
        get_datasets(opts(root, task="2-1s", step=1, overlap=True))
    (root / "vaihingen" / "meta.json").write_text("{broken")
    with pytest.raises(UserError, match="cannot read"):
        load_meta(root, "vaihingen")


def test_damaged_png_crop_is_a_user_error(data_root, tmp_path):
    """Folders processed before the crop store (PNG only): read with a hint; a damaged PNG names itself."""
    root = tmp_path / "data"
    shutil.copytree(data_root / "potsdam", root / "potsdam", ignore=shutil.ignore_patterns("images.npy", "labels.npy"))
    meta = json.loads((root / "potsdam" / "meta.json").read_text())
    del meta["store"]
    (root / "potsdam" / "meta.json").write_text(json.dumps(meta))
    (root / "potsdam" / "test" / "images" / meta["test"]["crops"][0]).write_bytes(b"junk")
    _, _, test = get_datasets(opts(root, dataset="potsdam"))
    with pytest.raises(UserError, match=meta["test"]["crops"][0]):
        test[0]


# ------------------------------------------------------------------------------------ transforms
def block_sample(channels=3, size=40, block=8, seed=0):
    """Image of constant blocks whose label is a function of the pixel value (value = 20 * class)."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 6, size=(size // block, size // block))
    label = np.kron(classes, np.ones((block, block), np.int64)).astype(np.uint8)
    image = np.repeat((label * 20 + 30)[..., None], channels, axis=2).astype(np.uint8)
    image[..., -1] = 255 - image[..., -1]  # channels differ, so channel order is checked too
    return image, label


def assert_aligned(image, label, channels):
    """Where the 3x3 neighbourhood of the image is constant (no interpolation), label = f(image)."""
    image = image.numpy() if torch.is_tensor(image) else np.moveaxis(image, -1, 0)
    label = label.numpy() if torch.is_tensor(label) else label
    value = image[0].astype(np.float64)
    if value.max() <= 1.0:
        value = value * 255
    value = np.rint(value).astype(np.int64)
    padded = np.pad(value, 1, mode="edge")
    shifts = [padded[dy:dy + value.shape[0], dx:dx + value.shape[1]] for dy in range(3) for dx in range(3)]
    pure = np.all([s == value for s in shifts], axis=0) & (value >= 30) & ((value - 30) % 20 == 0)
    assert pure.sum() > 0.15 * (label != 255).sum()  # enough block interiors to check
    assert np.array_equal(label[pure], (value[pure] - 30) // 20)
    last = np.rint(image[channels - 1].astype(np.float64) * (255 if image.max() <= 1 else 1))
    assert np.array_equal(last[pure], 255 - value[pure])


@pytest.mark.parametrize("channels", [3, 4])
def test_each_spatial_transform_keeps_image_and_label_aligned(channels):
    image, label = block_sample(channels)
    t_img, t_lbl = ToTensor()(image, label)
    assert t_img.shape == (channels, 40, 40) and t_lbl.dtype == torch.int64
    assert torch.equal(RandomHorizontalFlip(p=1.0)(t_img, t_lbl)[0], t_img.flip(-1))
    assert torch.equal(RandomRotation90(k=3)(t_img, t_lbl)[1], torch.rot90(t_lbl, 3))
    for seed in range(6):
        torch.manual_seed(seed)
        assert_aligned(*RandomScaleCrop(32)(image, label), channels)  # numpy, like the crops
        for transform in (RandomHorizontalFlip(), RandomVerticalFlip(), RandomRotation90()):
            assert_aligned(*transform(t_img, t_lbl), channels)  # torch, after ToTensor


def pixel_sample(channels, size=40, seed=0):
    """Random class per pixel; every channel a function of the class (so any 1 px shift shows)."""
    label = np.random.default_rng(seed).integers(0, 6, size=(size, size)).astype(np.uint8)
    image = np.stack([label * 40 + 10 + c for c in range(channels)], axis=-1).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("channels", [3, 4])
def test_exact_pixel_alignment_without_rescaling(channels):
    """Scale 1: crop offsets, flips and rotations must move image and label identically."""
    image, label = pixel_sample(channels)
    chain = Compose([RandomScaleCrop(32, scale=(1.0, 1.0)), ToTensor(), RandomHorizontalFlip(),
                     RandomVerticalFlip(), RandomRotation90(), Normalize([0.0] * channels, [1.0] * channels)])
    outputs = set()
    for seed in range(10):
        torch.manual_seed(seed)
        for sample in (chain(image, label), RandomScaleCrop(32, scale=(1.0, 1.0))(image, label)):
            out_image, out_label = sample
            out_image = out_image if torch.is_tensor(out_image) else torch.from_numpy(
                np.moveaxis(out_image, -1, 0) / 255.0)
            out_label = torch.as_tensor(np.asarray(out_label)).long()
            assert out_label.shape == (32, 32)
            values = torch.round(out_image * 255).long()
            for c in range(channels):
                assert torch.equal(values[c], out_label * 40 + 10 + c)
            outputs.add(out_label.numpy().tobytes())
    assert len(outputs) > 10  # offsets, flips and rotations really vary


@pytest.mark.parametrize("channels", [3, 4])
def test_full_train_transform_keeps_alignment(channels):
    image, label = block_sample(channels, size=48)
    transform = train_transform(32)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_label = transform(image, label)
        assert out_image.shape == (32, 32, channels) and out_label.shape == (32, 32)
        assert out_image.dtype == out_label.dtype == torch.uint8
        assert_aligned(out_image.permute(2, 0, 1), out_label, channels)
        seen.add(out_label.numpy().tobytes())
    assert len(seen) > 4  # it really is random


def test_scale_crop_pads_labels_with_ignore():
    image, label = block_sample(3, size=32)
    torch.manual_seed(0)
    out_image, out_label = RandomScaleCrop(64, scale=(0.5, 0.5))(image, label)
    assert out_label.shape == (64, 64)
    assert (out_label != 255).sum() == 16 * 16  # 32 px at scale 0.5, the rest is padding
    assert (out_label[16:, :] == 255).all() and (out_image[16:, :, :] == 0).all()


def test_normalize_and_pickling():
    image, label = block_sample(4)
    transform = eval_transform()
    out, out_label = pickle.loads(pickle.dumps(transform))(image, label)
    assert torch.equal(out, torch.from_numpy(image)) and torch.equal(out_label, torch.from_numpy(label))
    mean, std = [0.5, 0.5, 0.5, 0.2], [0.25, 0.25, 0.25, 0.5]
    expected = Normalize(mean, std)(*ToTensor()(image, label))[0]
    for channels_last in (False, True):
        batch = pickle.loads(pickle.dumps(BatchNormalize(mean, std, channels_last)))(torch.stack([out, out]))
        assert batch.dtype == torch.float32 and batch.shape == (2, 4, 40, 40)
        assert torch.equal(batch[1], expected)  # same operations as the per-item path: bit for bit
        assert batch.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert BatchNormalize(mean, std)(expected[None]) is not None  # float batches pass through
    assert torch.equal(BatchNormalize(mean, std)(expected[None])[0], expected)
    assert isinstance(pickle.loads(pickle.dumps(train_transform(32))), Compose)
    with pytest.raises(ValueError, match="4 channels"):
        Normalize([0.5] * 3, [0.2] * 3)(*ToTensor()(image, label))
    with pytest.raises(ValueError, match="4 channels"):
        BatchNormalize([0.5] * 3, [0.2] * 3)(torch.stack([out]))
