"""Every registered method trains steps 0 and 1 end to end; method state travels between steps and is
identical on every rank."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import methods.base
import run
from methods import METHODS
from methods.regularizers import make_regularizer
from utils.distributed import cleanup

TINY = ["--backbone", "resnet18", "--no_pretrained", "--crop_size", "64", "--batch_size", "4", "--epochs", "1",
        "--num_workers", "0", "--norm_act", "iabn", "--debug"]


def args(data_root, out, method, step, task="4-1", extra=()):
    return ["--data_root", str(data_root), "--dataset", "vaihingen", "--task", task, "--method", method,
            "--step", str(step), "--checkpoint_dir", str(out / "ckpt"), "--logdir", str(out / "logs"),
            "--results_dir", str(out / "results"), *TINY, *extra]


@pytest.mark.parametrize("method", list(METHODS))
def test_method_runs_steps_0_and_1(method, data_root, tmp_path, monkeypatch):
    seen_terms = []
    original = methods.base.Method.training_losses

    def spy(self, *a, **kw):
        terms = original(self, *a, **kw)
        seen_terms.append((self.step, sorted(terms)))
        return terms

    monkeypatch.setattr(methods.base.Method, "training_losses", spy)
    for step in (0, 1):
        results = run.main(args(data_root, tmp_path, method, step))
        assert results["miou_all"] is not None and 0.0 <= results["miou_all"] <= 1.0
    ckpt = torch.load(tmp_path / "ckpt" / "step" / f"4-1-vaihingen_{method}_1.pth", weights_only=False)
    assert ckpt["classes"] == [5, 1] and ckpt["opts"]["method"] == method
    step1_terms = {t for step, terms in seen_terms if step == 1 for t in terms}
    opts = ckpt["opts"]
    # each preset's distillation term really enters the loss at step 1
    if opts["loss_kd"] > 0:
        assert "kd" in step1_terms
    if opts["loss_de"] > 0:
        assert "de" in step1_terms
    if opts["icarl"]:
        assert "icarl" in step1_terms
    if opts["cd_factor"] > 0:
        assert {"cd", "cd_icl"} <= step1_terms
    if opts["regularizer"]:
        assert ckpt["method_state"]["regularizer"]["name"] == opts["regularizer"]


@pytest.mark.parametrize("method", ["EWC", "PI", "RW"])
def test_regulariser_state_of_step0_is_what_step1_loads(method, data_root, tmp_path, monkeypatch):
    run.main(args(data_root, tmp_path, method, 0))
    saved = torch.load(tmp_path / "ckpt" / "step" / f"4-1-vaihingen_{method}_0.pth", weights_only=False)
    saved_state = saved["method_state"]["regularizer"]["state"]
    captured = {}
    real = methods.base.make_regularizer

    def capture(name, params, previous_state, **kw):
        captured["state"] = previous_state
        return real(name, params, previous_state, **kw)

    monkeypatch.setattr(methods.base, "make_regularizer", capture)
    run.main(args(data_root, tmp_path, method, 1))
    loaded = captured["state"]
    assert set(loaded) == set(saved_state)
    for key, tensors in saved_state.items():
        if isinstance(tensors, dict):
            assert set(loaded[key]) == set(tensors)
            for name, value in tensors.items():
                assert torch.equal(loaded[key][name], value), (key, name)
    # the new classifier of step 1 is not penalised; the old one is
    assert "cls.0.weight" in saved_state["params"] and "cls.1.weight" not in saved_state["params"]


def test_regulariser_needs_step0_of_the_same_method(data_root, tmp_path, capsys):
    run.main(args(data_root, tmp_path, "FT", 0, extra=["--name", "EWC"]))
    with pytest.raises(SystemExit) as exc:
        run.main(args(data_root, tmp_path, "EWC", 1))
    assert exc.value.code == 2
    assert "ewc state of step 0" in capsys.readouterr().err


# ---------------------------------------------------------------- 2-process gloo: identical state on both ranks
def _regulariser_worker(rank, world, port, name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = dict(model.named_parameters())
    reg = make_regularizer(name, params, None, importance=1.0, iterations=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(5):
        x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        reg.before_step()
        opt.step()
        reg.after_step()
    state = reg.state_dict()
    flat = torch.cat([t.flatten() for key in sorted(state) if isinstance(state[key], dict)
                      for _, t in sorted(state[key].items())])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(gathered, out)
    del ddp  # before the process group goes: see utils.distributed.cleanup
    cleanup()


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_two_rank_gloo_regulariser_state_is_identical(name, tmp_path, free_port):
    out = tmp_path / "gathered.pt"
    mp.spawn(_regulariser_worker, args=(2, free_port, name, str(out)), nprocs=2, join=True)
    first, second = torch.load(out)
    assert first.numel() > 0 and torch.count_nonzero(first) > 0
    assert torch.equal(first, second)


def test_unstable_regulariser_ends_in_a_clear_hint(data_root, tmp_path, capsys):
    """lr·2·reg_importance far above SGD's stability limit diverges: one line naming the cause."""
    run.main(args(data_root, tmp_path, "EWC", 0))
    with pytest.raises(SystemExit) as exc:
        run.main(args(data_root, tmp_path, "EWC", 1, extra=["--lr", "1", "--reg_importance", "500", "--epochs", "5"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--reg_importance" in err and "1·2·500" in err
    assert not (tmp_path / "ckpt" / "step" / "4-1-vaihingen_EWC_1.pth").exists()
