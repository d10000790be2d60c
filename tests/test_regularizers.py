"""EWC, PI and RW (METHODS.md §3): running state vs hand-rolled update rules, injected penalty gradient vs
autograd, hand-over of the state to the next step, user errors."""
import pytest
import torch
from torch import nn

from methods.regularizers import EWC, PI, REGULARIZERS, RW, make_regularizer, normalize
from utils.errors import UserError

ALPHA = 0.9
LR = 0.1


class TinySegmenter(nn.Module):
    """Body + one classifier per step, like the incremental segmentation module (names body.*, cls.<i>.*)."""

    def __init__(self, classes_per_step=(2,), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(3, 4).double()
        self.cls = nn.ModuleList(nn.Linear(4, n).double() for n in classes_per_step)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return torch.cat([head(features) for head in self.cls], dim=1)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def train(model, regularizer, iterations, seed=0):
    """Plain SGD with the Trainer's call order; records (task gradient, θ before, θ after) per iteration."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    records, penalties = [], []
    for _ in range(iterations):
        inputs = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        outputs = model(inputs)
        targets = torch.randint(0, outputs.shape[1], (8,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(outputs, targets).backward()
        grads = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
        before = {n: p.detach().clone() for n, p in trainable(model).items()}
        penalties.append(regularizer.before_step())
        optimizer.step()
        regularizer.after_step()
        after = {n: p.detach().clone() for n, p in trainable(model).items()}
        records.append((grads, before, after))
    return records, penalties


# ------------------------------------------------------------------ hand-rolled references
def ref_fisher(records):
    fisher = {n: torch.ones_like(t) for n, t in records[0][0].items()}  # F starts at ones every step
    for grads, _, _ in records:
        for n, g in grads.items():
            fisher[n] = ALPHA * g * g + (1 - ALPHA) * fisher[n]
    return fisher


def ref_pi_score(records, start, previous_score=None):
    omega = {n: torch.zeros_like(t) for n, t in start.items()}
    for grads, before, after in records:
        for n in omega:
            omega[n] += grads[n] * (before[n] - after[n])
    final = records[-1][2]
    score = {}
    for n in omega:
        s = omega[n] / ((final[n] - start[n]) ** 2 + 1e-20)
        s = torch.where(s > 0, s, torch.zeros_like(s))
        if previous_score and n in previous_score:
            s = s + previous_score[n]
        score[n] = s
    return score


def ref_rw_score(records, k, previous_score=None):
    fisher = {n: torch.ones_like(t) for n, t in records[0][0].items()}
    score = {n: torch.zeros_like(t) for n, t in fisher.items()}
    theta_k = {n: t.clone() for n, t in records[0][1].items()}
    for i, (grads, _, after) in enumerate(records, start=1):
        if i % k == 0:
            for n in score:
                score[n] += grads[n] * (theta_k[n] - after[n]) / (
                    0.5 * fisher[n] * (after[n] - theta_k[n]) ** 2 + 1e-8)
                theta_k[n] = after[n].clone()
        for n, g in grads.items():
            fisher[n] = ALPHA * g * g + (1 - ALPHA) * fisher[n]
    saved = {}
    for n, s in score.items():
        s = torch.where(s >= 0, s, torch.zeros_like(s))
        if previous_score and n in previous_score:
            s = (s + previous_score[n]) / 2
        saved[n] = s
    return saved


def ref_normalize(t):
    return (t - t.min()) / (t.max() - t.min() + 1e-8)


def ref_omega(name, state, normalized=True):
    norm = ref_normalize if normalized else (lambda t: t)
    if name == "ewc":
        return {n: norm(f) for n, f in state["fisher"].items()}
    if name == "pi":
        return {n: norm(s) for n, s in state["score"].items()}
    return {n: norm(state["fisher"][n]) + norm(state["score"][n]) for n in state["fisher"]}


def assert_dicts_close(got, want):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def run_step0(name, iterations=7, k=3):
    model = TinySegmenter((2,))
    initial = {n: p.detach().clone() for n, p in trainable(model).items()}
    reg = make_regularizer(name, trainable(model), None, importance=1.0, alpha=ALPHA, iterations=k)
    records, penalties = train(model, reg, iterations)
    return model, reg, initial, records, penalties


def step1_model(step0_model):
    """Step-1 model: step-0 weights loaded, plus a freshly initialised classifier for one new class."""
    model = TinySegmenter((2, 1), seed=5)
    model.load_state_dict(step0_model.state_dict(), strict=False)
    return model


# ------------------------------------------------------------------ step 0
@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_step0_state_matches_update_rules(name):
    model, reg, initial, records, penalties = run_step0(name)
    assert all(p.item() == 0.0 for p in penalties)  # nothing to penalise at step 0
    state = reg.state_dict()
    assert state["method"] == name
    assert_dicts_close(state["params"], {n: p.detach() for n, p in trainable(model).items()})
    if name in ("ewc", "rw"):
        assert_dicts_close(state["fisher"], ref_fisher(records))
    if name == "pi":
        assert_dicts_close(state["score"], ref_pi_score(records, initial))
    if name == "rw":
        want = ref_rw_score(records, k=3)
        assert any((s > 0).any() for s in want.values())  # the reference is not trivially zero
        assert_dicts_close(state["score"], want)
    for tensors in state.values():
        if isinstance(tensors, dict):
            assert all(t.device.type == "cpu" for t in tensors.values())


def test_step0_leaves_gradients_alone():
    model = TinySegmenter()
    reg = EWC(trainable(model), None, importance=10.0)
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert reg.before_step().item() == 0.0
    assert reg.penalised_names == ()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


def test_state_is_a_copy():
    model, reg, _, _, _ = run_step0("rw", iterations=3)
    state = reg.state_dict()
    saved = state["params"]["body.weight"].clone()
    with torch.no_grad():
        model.body.weight.add_(1.0)
    assert torch.equal(state["params"]["body.weight"], saved)


# ------------------------------------------------------------------ step 1: penalty and hand-over
@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
@pytest.mark.parametrize("normalized", [True, False])
def test_injected_gradient_equals_autograd_of_penalty(name, normalized):
    model0, reg0, _, _, _ = run_step0(name)
    state0 = reg0.state_dict()
    model = step1_model(model0)
    params = trainable(model)
    importance = 3.0
    reg = make_regularizer(name, params, state0, importance, alpha=ALPHA, normalize=normalized, iterations=3)
    assert set(reg.penalised_names) == {"body.weight", "body.bias", "cls.0.weight", "cls.0.bias"}
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move away from θ° so the penalty is not zero
        for p in params.values():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    task_grads = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    for n, p in params.items():
        p.grad = task_grads[n].clone()

    value = reg.before_step()

    # Value: λ Σ Ω (θ − θ°)² over the old parameters, Ω from the step-0 state.
    omega = ref_omega(name, state0, normalized)
    want = importance * sum(((omega[n] * (params[n] - state0["params"][n]) ** 2).sum() for n in omega))
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(reg.penalty().detach(), want.detach())
    # Gradient: what was added to p.grad equals autograd's gradient of penalty(); new classifier untouched.
    names = list(params)
    autograd = torch.autograd.grad(reg.penalty(), [params[n] for n in names], allow_unused=True)
    for n, g in zip(names, autograd):
        added = params[n].grad - task_grads[n]
        if n.startswith("cls.1."):
            assert g is None and torch.equal(added, torch.zeros_like(added))
        else:
            assert added.abs().max() > 0
            torch.testing.assert_close(added, g)


@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_step1_training_and_state_handover(name):
    model0, reg0, _, _, _ = run_step0(name)
    state0 = reg0.state_dict()
    model = step1_model(model0)
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    reg = make_regularizer(name, trainable(model), state0, importance=1.0, alpha=ALPHA, iterations=3)
    records, penalties = train(model, reg, 7, seed=1)
    omega = ref_omega(name, state0)

    # The optimiser saw task gradient + 2λΩ(θ − θ°) on old parameters and the task gradient alone on new ones.
    for grads, before, after in records:
        for n in grads:
            penalty_grad = 2 * omega[n] * (before[n] - state0["params"][n]) if n in omega else 0.0
            torch.testing.assert_close(after[n], before[n] - LR * (grads[n] + penalty_grad), msg=n)
    assert penalties[0].item() == 0.0 and penalties[-1].item() > 0  # θ = θ° at the first iteration only

    # The state is built from task gradients (not penalised ones), for old and new parameters.
    state = reg.state_dict()
    assert set(state["params"]) == set(start) and "cls.1.weight" in state["params"]
    if name in ("ewc", "rw"):
        assert_dicts_close(state["fisher"], ref_fisher(records))
    if name == "pi":
        theta_start = {n: state0["params"].get(n, start[n]) for n in start}
        assert_dicts_close(state["score"], ref_pi_score(records, theta_start, state0["score"]))
    if name == "rw":
        want = ref_rw_score(records, 3, state0["score"])
        assert_dicts_close(state["score"], want)

    # Step 2 penalises this step's classifier too.
    reg2 = make_regularizer(name, trainable(model), state, importance=1.0, iterations=3)
    assert "cls.1.weight" in reg2.penalised_names and "cls.1.bias" in reg2.penalised_names


def test_frozen_old_parameters_are_not_penalised():
    model0, reg0, _, _, _ = run_step0("ewc", iterations=2)
    model = step1_model(model0)
    model.body.requires_grad_(False)
    reg = EWC(trainable(model), reg0.state_dict(), importance=1.0)
    assert reg.penalised_names == ("cls.0.weight", "cls.0.bias")


# ------------------------------------------------------------------ robustness
@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_non_finite_gradient_leaves_state_unchanged(name):
    model, reg, _, _, _ = run_step0(name, iterations=3, k=1)
    before = reg.state_dict()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.body.weight.grad[0, 0] = float("inf")  # a GradScaler overflow: the optimiser skips this step
    reg.before_step()
    reg.after_step()  # RW with K=1: a score update would happen at this iteration
    after = reg.state_dict()
    for key in ("fisher", "score"):
        if key in before:
            assert_dicts_close(after[key], before[key])


def test_shape_mismatch_is_a_user_error_naming_the_parameter():
    _, reg0, _, _, _ = run_step0("ewc", iterations=2)
    other = TinySegmenter((3,))  # cls.0 has 3 outputs instead of 2
    with pytest.raises(UserError, match=r"cls\.0\.weight"):
        EWC(trainable(other), reg0.state_dict(), importance=1.0)


def test_wrong_or_incomplete_previous_state_is_a_user_error():
    _, reg0, _, _, _ = run_step0("ewc", iterations=2)
    model = TinySegmenter()
    with pytest.raises(UserError, match="rw"):
        RW(trainable(model), reg0.state_dict(), importance=1.0)
    state = reg0.state_dict()
    del state["method"], state["fisher"]
    with pytest.raises(UserError, match="fisher"):
        EWC(trainable(model), state, importance=1.0)
    with pytest.raises(UserError, match="--regularizer"):
        make_regularizer("mas", trainable(model), None, importance=1.0)
    with pytest.raises(UserError, match="--reg_iterations"):
        make_regularizer("rw", trainable(model), None, importance=1.0, iterations=0)


def test_registry_and_normalize():
    assert REGULARIZERS == {"ewc": EWC, "pi": PI, "rw": RW}
    assert isinstance(make_regularizer("PI", trainable(TinySegmenter()), None, 1.0), PI)
    m = torch.tensor([[2.0, 4.0], [6.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(normalize(m), (m - 2.0) / (8.0 + 1e-8))
    assert torch.equal(normalize(torch.ones(3)), torch.zeros(3))
