"""The fast data path against the one it replaced: crop store vs PNG, window scale-crop vs whole-crop
rescale, device normalisation vs per-item; store errors; loader defaults; the GPU-ready model step
options (channels_last, compile, fused/foreach SGD) give the default path's losses."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from argparser import data_options, method_options, model_options, optimizer_options, parse_args, train_options
from benchmarks.legacy_pipeline import legacy_eval_transform, legacy_train_transform, read_png
from dataset import loaders
from dataset.isprs import ISPRSCrops
from dataset.layout import load_meta
from dataset.options import DataOptions
from dataset.step_datasets import get_datasets
from dataset.transforms import BatchNormalize, RandomScaleCrop, train_transform
from methods import SetupContext, get_method_class
from modules import make_model
from process_data import make_crop_store
from tests.conftest import png_only_copy
from train import Trainer, compile_model, unwrap
from utils.distributed import DistInfo
from utils.errors import UserError
from utils.optimizer import make_optimizer


def opts(data_root, **overrides):
    base = dict(data_root=str(data_root), dataset="vaihingen", task="4-1", step=0, overlap=False,
                crop_size=48, cross_val=False, random_seed=42)
    base.update(overrides)
    return DataOptions(**base)


# ----------------------------------------------------------------------------- store vs PNG
@pytest.mark.parametrize("dataset", ["vaihingen", "potsdam"])
def test_store_holds_exactly_the_png_crops(data_root, dataset):
    meta = load_meta(data_root, dataset)
    for split in ("train", "test"):
        crops = ISPRSCrops(data_root, dataset, split, meta)
        assert crops.uses_store and len(crops) == len(meta[split]["crops"])
        for i, name in enumerate(meta[split]["crops"]):
            image, label = crops[i]
            assert np.array_equal(image, read_png(data_root / dataset / split / "images" / name))
            assert np.array_equal(label, read_png(data_root / dataset / split / "labels" / name))


def test_png_folder_falls_back_with_a_hint_and_converts(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    png_only_copy(data_root, "potsdam", root)
    png = ISPRSCrops(root, "potsdam", "train")
    assert not png.uses_store
    assert "make_crop_store.py --data_root" in capsys.readouterr().err
    make_crop_store.main(["--data_root", str(root), "--dataset", "potsdam", "--quiet"])
    converted = ISPRSCrops(root, "potsdam", "train")
    original = ISPRSCrops(data_root, "potsdam", "train")
    assert converted.uses_store
    for i in range(len(original)):
        assert np.array_equal(converted[i][0], original[i][0]) and np.array_equal(converted[i][1], png[i][1])


def test_conversion_of_damaged_pngs_leaves_the_dataset_as_it_was(data_root, tmp_path, capsys):
    root = tmp_path / "data"
    png_only_copy(data_root, "vaihingen", root)
    meta_before = (root / "vaihingen" / "meta.json").read_text()
    name = json.loads(meta_before)["test"]["crops"][-1]
    (root / "vaihingen" / "test" / "labels" / name).write_bytes(b"junk")
    with pytest.raises(SystemExit) as exc:
        make_crop_store.main(["--data_root", str(root), "--dataset", "vaihingen", "--quiet"])
    assert exc.value.code == 2 and name in capsys.readouterr().err.strip().splitlines()[-1]
    assert (root / "vaihingen" / "meta.json").read_text() == meta_before
    assert not list((root / "vaihingen").rglob("*.npy.*"))
    assert not (root / "vaihingen" / "train" / "images.npy").exists()


def _store_copy(data_root, root):
    shutil.copytree(data_root / "vaihingen", root / "vaihingen")
    return root / "vaihingen"


def test_store_errors_name_the_file_and_the_fix(data_root, tmp_path):
    folder = _store_copy(data_root, tmp_path / "a")
    labels = folder / "test" / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:200])  # truncated
    with pytest.raises(UserError, match=rf"{labels}.*truncated.*make_crop_store.py"):
        ISPRSCrops(tmp_path / "a", "vaihingen", "test")

    folder = _store_copy(data_root, tmp_path / "b")
    meta = json.loads((folder / "meta.json").read_text())
    meta["store"]["version"] = 0  # a store of an older format
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"{folder / 'meta.json'}.*format 0.*make_crop_store.py"):
        ISPRSCrops(tmp_path / "b", "vaihingen", "train")

    folder = _store_copy(data_root, tmp_path / "c")
    np.save(folder / "train" / "images.npy", np.zeros((2, 64, 64, 3), np.uint8))  # other crops than meta.json's
    with pytest.raises(UserError, match=r"images.npy is damaged \(holds uint8 \(2, 64, 64, 3\)"):
        ISPRSCrops(tmp_path / "c", "vaihingen", "train")

    with pytest.raises(UserError, match=r"--crop_size 65 is larger than the crops stored in .*meta.json \(64 px\).*"
                                        r"data_process_vaihingen.py .*--crop_size 65"):
        get_datasets(opts(data_root, crop_size=65))


def test_store_dataset_pickles_without_its_data(data_root):
    import pickle
    crops = ISPRSCrops(data_root, "vaihingen", "train")
    blob = pickle.dumps(crops)
    assert len(blob) < 100_000  # the memory map is reopened, not copied, in a worker
    again = pickle.loads(blob)
    assert np.array_equal(again[3][0], crops[3][0])


# ------------------------------------------------------------------------ new path vs old path
def _random_sample(channels, size, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, channels)).astype(np.uint8)
    label = rng.integers(0, 7, (size, size)).astype(np.uint8)
    label[label == 6] = 255
    return image, label


@pytest.mark.parametrize("channels", [3, 4])
def test_train_items_equal_the_old_path_for_the_same_draws(channels):
    """Same seed -> same scale, offsets, flips, rotation as the old whole-crop float path: labels equal,
    images equal up to the uint8 rounding of the new path (OpenCV's 8-bit kernel: 0.52 / 255 measured)."""
    mean, std = [0.3] * channels, [0.2] * channels
    old, new = legacy_train_transform(32, mean, std), train_transform(32)
    normalize = BatchNormalize(mean, std)
    for seed in range(40):
        image, label = _random_sample(channels, 48 if seed % 4 else 20, seed)  # 20 px: padding
        torch.manual_seed(seed)
        old_image, old_label = old(image, label)
        torch.manual_seed(seed)
        new_image, new_label = new(image, label)
        assert torch.equal(new_label.long(), old_label.long()), seed
        diff = (normalize(new_image[None])[0] - old_image) * torch.tensor(std).view(-1, 1, 1)
        assert diff.abs().max() <= 0.6 / 255, seed


def test_scale_crop_float_input_matches_the_old_path_exactly():
    """On float input (no uint8 rounding) the window resampling is the whole-crop rescale within float error
    (torch's float32 source coordinates are off by up to 4e-6 here; OpenCV's by 1e-7)."""
    from benchmarks.legacy_pipeline import LegacyRandomScaleCrop
    for seed in range(20):
        image, label = _random_sample(3, 40, seed)
        as_float = torch.from_numpy(image).permute(2, 0, 1).float() / 255
        torch.manual_seed(seed)
        old_image, old_label = LegacyRandomScaleCrop(32)(as_float, torch.from_numpy(label))
        torch.manual_seed(seed)
        new_image, new_label = RandomScaleCrop(32)(as_float.permute(1, 2, 0).numpy(), label)
        new_image, new_label = torch.from_numpy(new_image).permute(2, 0, 1), torch.from_numpy(new_label)
        assert torch.equal(new_label, old_label) and torch.allclose(new_image, old_image, atol=1e-5)


def test_scale_range_and_padding_rules_are_kept():
    """Output size follows s in [0.5, 2]: at s = 0.5 a 64 px crop covers 32 px, the rest is image 0 / label 255."""
    image, label = _random_sample(3, 64, 0)
    label[label == 255] = 1
    for lo, hi in ((0.5, 0.5), (2.0, 2.0)):
        torch.manual_seed(1)
        out_image, out_label = RandomScaleCrop(64, scale=(lo, hi))(image, label)
        valid = out_label != 255
        assert valid.sum() == (32 * 32 if lo == 0.5 else 64 * 64)
        if lo == 0.5:
            assert (out_image[32:] == 0).all() and (out_image[:, 32:] == 0).all()


def test_evaluation_inputs_and_predictions_equal_the_old_path(data_root):
    """Every test crop: PNG + per-item normalisation (old) vs store + device batch normalisation (new) give
    bit-identical inputs, hence identical predictions of a fixed tiny model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1))
    meta = load_meta(data_root, "vaihingen")
    _, _, test = get_datasets(opts(data_root))
    old = legacy_eval_transform(meta["mean"], meta["std"])
    normalize = BatchNormalize(meta["mean"], meta["std"])
    loader = torch.utils.data.DataLoader(test, batch_size=5)
    names, offset = test.names, 0
    for images, _labels in loader:
        new_inputs = normalize(images)
        old_inputs = torch.stack([
            old(read_png(data_root / "vaihingen" / "test" / "images" / n), np.zeros((1, 1), np.uint8))[0]
            for n in names[offset:offset + len(images)]])
        offset += len(images)
        assert torch.equal(new_inputs, old_inputs)
        with torch.no_grad():
            assert torch.equal(model(new_inputs).argmax(1), model(old_inputs).argmax(1))
    assert offset == len(test)


# ------------------------------------------------------------------------------ loader defaults
def test_default_num_workers_and_loader_settings(data_root, monkeypatch):
    monkeypatch.setattr(loaders, "available_cpus", lambda: 32)
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False, backend=None)
    assert loaders.default_num_workers(one) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loaders.default_num_workers(one) == 4
    monkeypatch.setattr(loaders, "available_cpus", lambda: 2)
    assert loaders.default_num_workers(one) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loaders.default_num_workers(one) == 2

    o = parse_args(["--data_root", str(data_root), "--crop_size", "32", "--batch_size", "2"])
    assert o.num_workers is None
    train, val, test = get_datasets(data_options(o))
    train_loader, _, _ = loaders.make_loaders(data_options(o), one, train, val, test)
    assert train_loader.num_workers == 2 and train_loader.prefetch_factor == 4
    assert train_loader.persistent_workers and not train_loader.pin_memory  # pinned on CUDA only

    def draw(seed):  # two loaders with the same seed give the same augmented batches (2 workers)
        o2 = parse_args(["--data_root", str(data_root), "--crop_size", "32", "--batch_size", "2",
                         "--random_seed", str(seed)])
        loader, _, _ = loaders.make_loaders(data_options(o2), one, *get_datasets(data_options(o2)))
        return [b[0] for _, b in zip(range(3), loader)]
    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    with pytest.raises(UserError, match="--num_workers"):
        parse_args(["--num_workers", "-1"])



def test_training_batches_follow_the_seed_and_epoch_not_the_workers(data_root):
    """SeededSampler: 0 or 2 workers, fresh or reused, give the same batches epoch after epoch, and
    iterating in the main process leaves its global random state alone."""
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False, backend=None)

    def epochs(workers, n=2):
        o = parse_args(["--data_root", str(data_root), "--crop_size", "32", "--batch_size", "2",
                        "--num_workers", str(workers)])
        loader, _, _ = loaders.make_loaders(data_options(o), one, *get_datasets(data_options(o)))
        torch.manual_seed(123)
        before = torch.get_rng_state()
        batches = [[(images.clone(), labels.clone()) for images, labels in loader] for _ in range(n)]
        if workers == 0:
            assert torch.equal(torch.get_rng_state(), before)
        return batches

    without, with_workers = epochs(0), epochs(2)
    assert not torch.equal(without[0][0][0], without[1][0][0])  # epochs differ
    for a_epoch, b_epoch in zip(without, with_workers):
        assert len(a_epoch) == len(b_epoch)
        for (ia, la), (ib, lb) in zip(a_epoch, b_epoch):
            assert torch.equal(ia, ib) and torch.equal(la, lb)

# --------------------------------------------------------------------- GPU-ready model step
def _trainer(data_root, tmp_path, method, extra=(), step=1):
    """A Trainer at step `step` of 4-1 on a tiny model whose weights depend only on the seed."""
    argv = ["--data_root", str(data_root), "--method", method, "--step", str(step), "--backbone", "resnet18",
            "--no_pretrained", "--crop_size", "32", "--batch_size", "2", "--norm_act", "iabn",
            "--num_workers", "0", *extra]
    o = parse_args(argv)
    torch.manual_seed(0)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False, backend=None)
    classes = [5, 1][: step + 1]
    memory_format = torch.channels_last if o.channels_last else torch.contiguous_format
    model = make_model(model_options(o), classes).to(memory_format=memory_format)
    old_model = (make_model(model_options(o), classes[:-1]).to(memory_format=memory_format).eval().requires_grad_(False)
                 if step > 0 else None)
    method_obj = get_method_class(o.method)(method_options(o), o.step, classes)
    method_obj.setup(SetupContext(model=model))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer_options(o), dist.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # aot_eager: dynamo + AOT autograd as with inductor, without minutes of C++ code generation on a CPU
    train_model = compile_model(model, dist.device, backend="aot_eager") if o.compile else model
    logger = SimpleNamespace(info=lambda *a, **k: None, add_scalars=lambda *a, **k: None,
                             add_scalar=lambda *a, **k: None)
    meta = load_meta(data_root, "vaihingen")
    trainer = Trainer(train_model, old_model if method_obj.uses_old_model and step > 0 else None, method_obj, optimizer,
                      scheduler, train_options(o), dist, logger, input_norm=BatchNormalize(meta["mean"], meta["std"],
                                                                          o.channels_last))
    return trainer, model


def _losses(trainer, iterations=2):
    rng = np.random.default_rng(3)
    out = []
    for _ in range(iterations):
        images = torch.from_numpy(rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8))
        labels = torch.from_numpy(rng.integers(0, sum(trainer.module.classes), (2, 32, 32)).astype(np.uint8))
        out.append({k: float(v) for k, v in trainer._train_iteration(images, labels).items()})
    return out


def _assert_same_losses(a, b, rtol):
    """Same terms; the first iteration within rtol, later ones (after updates that amplify fp32
    reassociation differences through a from-scratch model) within 10 x rtol."""
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=rtol * (1 if i == 0 else 10), abs=1e-6), (i, key)


@pytest.mark.parametrize("method", ["MiB-CD"])  # MiB-CD: MiB plus the doubled, rotated batch
def test_channels_last_gives_the_default_losses(data_root, tmp_path, method):
    base, _ = _trainer(data_root, tmp_path, method)
    fast, model = _trainer(data_root, tmp_path, method, ["--channels_last"])
    assert next(p for p in model.parameters() if p.dim() == 4).is_contiguous(memory_format=torch.channels_last)
    _assert_same_losses(_losses(base), _losses(fast), rtol=1e-4)  # fp32: 1e-6 seen at iteration 1


def test_foreach_sgd_gives_the_loop_sgds_parameters(data_root, tmp_path):
    trainer, model = _trainer(data_root, tmp_path, "FT", step=0)
    assert trainer.optimizer.defaults.get("foreach") is True  # CPU: foreach (fused on CUDA)
    reference = [p.detach().clone() for p in model.parameters()]
    ref_params = [torch.nn.Parameter(p.clone()) for p in reference]
    ref_opt = torch.optim.SGD(ref_params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in reference]
        for p, q, g in zip(model.parameters(), ref_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        trainer.optimizer.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_params):
        assert torch.allclose(p, q, atol=1e-7)


def test_compile_gives_the_default_losses_or_falls_back_with_a_message(data_root, tmp_path, capsys, monkeypatch):
    std = ["--norm_act", "std"]  # one graph (in-place ABN's extension is a graph break per layer)
    base, _ = _trainer(data_root, tmp_path, "FT", std, step=0)
    expected = _losses(base, iterations=1)

    def unavailable(*_a, **_k):
        raise RuntimeError("no C++ compiler found")
    with monkeypatch.context() as m:  # where the compiler is missing: one warning line, eager training
        m.setattr(torch, "compile", unavailable)
        eager, model = _trainer(data_root, tmp_path, "FT", std + ["--compile"], step=0)
    assert eager.model is model and "--compile: torch.compile is not available here (no C++ compiler" in \
        capsys.readouterr().err
    _assert_same_losses(expected, _losses(eager, iterations=1), rtol=0)

    compiled, model = _trainer(data_root, tmp_path, "FT", std + ["--compile"], step=0)
    assert unwrap(compiled.model) is model
    _assert_same_losses(expected, _losses(compiled, iterations=1), rtol=1e-4)
