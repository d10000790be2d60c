"""EWC, PI and RW (docs/methods.md#parameter-regularisers): running state vs hand-rolled update rules in
MiB's order (the default) and in the opt-in after-the-step order, injected penalty gradient vs autograd,
hand-over of the state to the next step (running Fisher restarting from the saved one), user errors."""
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
        # targets follow the inputs, so successive gradients agree and path scores are positive somewhere
        targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 1).long() * (outputs.shape[1] - 2)
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
# records[i] = (g, θ before, θ after) of iteration i+1. MiB updates its regulariser after backward and before
# optimizer.step(): the update of iteration i sees g_i and θ_{i-1} (= "before"). The opt-in order updates after
# the step and sees θ_i (= "after").
def start_fisher(records, saved=None):
    """F at the start of a step: the saved Fisher of step t-1 where it has one, ones elsewhere (MiB)."""
    saved = saved or {}
    return {n: saved[n].clone() if n in saved else torch.ones_like(t) for n, t in records[0][0].items()}


def ref_fisher(records, saved=None):
    fisher = start_fisher(records, saved)
    for grads, _, _ in records:
        for n, g in grads.items():
            fisher[n] = ALPHA * g * g + (1 - ALPHA) * fisher[n]
    return fisher


def ref_pi_omega_mib(records):
    """MiB: ω += g_i (θ_temp − θ_{i-1}), θ_temp ← θ_{i-1}; nothing to add at the first iteration."""
    omega = {n: torch.zeros_like(t) for n, t in records[0][0].items()}
    temp = None
    for grads, before, _ in records:
        if temp is not None:
            for n in omega:
                omega[n] += grads[n] * (temp[n] - before[n])
        temp = {n: t.clone() for n, t in before.items()}
    return omega


def ref_pi_omega_after(records):
    """Opt-in order: ω += g_i (θ_{i-1} − θ_i), each gradient with its own step's change."""
    omega = {n: torch.zeros_like(t) for n, t in records[0][0].items()}
    for grads, before, after in records:
        for n in omega:
            omega[n] += grads[n] * (before[n] - after[n])
    return omega


def ref_pi_score(records, start, previous_score=None, order="mib"):
    omega = ref_pi_omega_mib(records) if order == "mib" else ref_pi_omega_after(records)
    final = records[-1][2]
    score = {}
    for n in omega:
        s = omega[n] / ((final[n] - start[n]) ** 2 + 1e-20)
        s = torch.where(s > 0, s, torch.zeros_like(s))
        if previous_score and n in previous_score:
            s = s + previous_score[n]
        score[n] = s
    return score


def ref_rw_raw_score(records, k, saved_fisher=None, order="mib"):
    """RW's walk score before clamping. MiB: a counter from 0, checked before the update; when it is a
    multiple of K the score takes g_i (θ_K − θ_{i-1}) / (½ F (θ_{i-1} − θ_K)² + 1e-8) unless θ_K is not set yet,
    then θ_K ← θ_{i-1}; F is updated afterwards, every iteration. Opt-in order: at i = K, 2K, ... with θ_i and
    θ_K starting at θ_0."""
    fisher = start_fisher(records, saved_fisher)
    score = {n: torch.zeros_like(t) for n, t in fisher.items()}
    theta_k = None if order == "mib" else {n: t.clone() for n, t in records[0][1].items()}
    count = 0
    for i, (grads, before, after) in enumerate(records, start=1):
        theta = before if order == "mib" else after
        fires = count % k == 0 if order == "mib" else i % k == 0
        if fires:
            if theta_k is not None:
                for n in score:
                    score[n] += grads[n] * (theta_k[n] - theta[n]) / (
                        0.5 * fisher[n] * (theta[n] - theta_k[n]) ** 2 + 1e-8)
            theta_k = {n: t.clone() for n, t in theta.items()}
        count += 1
        for n, g in grads.items():
            fisher[n] = ALPHA * g * g + (1 - ALPHA) * fisher[n]
    return score


def ref_rw_score(records, k, previous_score=None, saved_fisher=None, order="mib"):
    score = ref_rw_raw_score(records, k, saved_fisher, order)
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


ORDERS = ["mib", "after"]


def run_step0(name, iterations=7, k=3, order="mib"):
    model = TinySegmenter((2,))
    initial = {n: p.detach().clone() for n, p in trainable(model).items()}
    reg = make_regularizer(name, trainable(model), None, importance=1.0, alpha=ALPHA, iterations=k,
                           update_after_step=order == "after")
    records, penalties = train(model, reg, iterations)
    return model, reg, initial, records, penalties


def step1_model(step0_model):
    """Step-1 model: step-0 weights loaded, plus a freshly initialised classifier for one new class."""
    model = TinySegmenter((2, 1), seed=5)
    model.load_state_dict(step0_model.state_dict(), strict=False)
    return model


# ------------------------------------------------------------------ step 0
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_step0_state_matches_update_rules(name, order):
    model, reg, initial, records, penalties = run_step0(name, order=order)
    assert all(p.item() == 0.0 for p in penalties)  # nothing to penalise at step 0
    state = reg.state_dict()
    assert state["method"] == name
    assert_dicts_close(state["params"], {n: p.detach() for n, p in trainable(model).items()})
    if name in ("ewc", "rw"):
        assert_dicts_close(state["fisher"], ref_fisher(records))
    if name == "pi":
        want = ref_pi_score(records, initial, order=order)
        assert any((s > 0).any() for s in want.values())  # the reference is not trivially zero
        assert_dicts_close(state["score"], want)
    if name == "rw":
        want = ref_rw_score(records, k=3, order=order)
        assert any((s > 0).any() for s in want.values())
        assert_dicts_close(state["score"], want)
    for tensors in state.values():
        if isinstance(tensors, dict):
            assert all(t.device.type == "cpu" for t in tensors.values())


@pytest.mark.parametrize("name", ["pi", "rw"])
def test_the_two_orders_give_different_scores(name):
    """The pairing matters (so the order tests above can tell the orders apart): same data, same first
    iterations, different importance scores."""
    scores = {order: run_step0(name, order=order)[1].state_dict()["score"] for order in ORDERS}
    assert any(not torch.allclose(scores["mib"][n], scores["after"][n]) for n in scores["mib"])


@pytest.mark.parametrize("name", ["pi", "rw"])
def test_mib_order_updates_before_the_step(name):
    """In MiB's order the running state moves inside before_step (from g_i and θ_{i-1}); after_step is a
    no-op. RW's walk score first changes at iteration K+1 = 4, not at K = 3."""
    model = TinySegmenter((2,))
    reg = make_regularizer(name, trainable(model), None, importance=1.0, alpha=ALPHA, iterations=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    first_change = None
    for i in range(1, 6):
        optimizer.zero_grad(set_to_none=True)
        inputs = torch.randn(8, 3, generator=gen, dtype=torch.float64)
        nn.functional.cross_entropy(model(inputs), torch.randint(0, 2, (8,), generator=gen)).backward()
        running = reg.omega_path if name == "pi" else reg.walk_score
        before = {n: t.clone() for n, t in running.items()}
        reg.before_step()
        changed = any(not torch.equal(before[n], t) for n, t in running.items())
        if changed and first_change is None:
            first_change = i
        optimizer.step()
        after_before_step = {n: t.clone() for n, t in running.items()}
        reg.after_step()
        assert all(torch.equal(after_before_step[n], t) for n, t in running.items())
    assert first_change == (2 if name == "pi" else 4)


@pytest.mark.parametrize("name", ["pi", "rw"])
def test_mib_order_first_update_only_records_the_parameters(name):
    """As MiB (no θ_temp before the first iteration): parameters changed between construction and the first
    iteration (e.g. weights loaded later) add nothing to the path or walk score."""
    model = TinySegmenter((2,))
    reg = make_regularizer(name, trainable(model), None, importance=1.0, alpha=ALPHA, iterations=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    records, _ = train(model, reg, 7)
    start = {n: p.clone() for n, p in records[0][1].items()}
    want = ref_pi_omega_mib(records) if name == "pi" else ref_rw_raw_score(records, 3)
    got = reg.omega_path if name == "pi" else reg.walk_score
    assert_dicts_close(got, want)
    if name == "pi":  # θ_start stays the value at construction (MiB: the state dict when the trainer is built)
        assert not torch.equal(reg.start["body.weight"], start["body.weight"])


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
    want = importance * sum((omega[n] * (params[n] - state0["params"][n]) ** 2).sum() for n in omega)
    torch.testing.assert_close(value, want.detach())
    torch.testing.assert_close(reg.penalty().detach(), want.detach())
    # Gradient: what was added to p.grad equals autograd's gradient of penalty(); new classifier untouched.
    names = list(params)
    nonzero = 0
    autograd = torch.autograd.grad(reg.penalty(), [params[n] for n in names], allow_unused=True)
    for n, g in zip(names, autograd):
        added = params[n].grad - task_grads[n]
        if n.startswith("cls.1."):
            assert g is None and torch.equal(added, torch.zeros_like(added))
        else:
            # a 2-class bias gets opposite gradients, hence a constant Fisher that normalises to Ω = 0
            if omega[n].abs().max() > 0:
                assert added.abs().max() > 0
                nonzero += 1
            torch.testing.assert_close(added, g)
    assert nonzero >= 3


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_step1_training_and_state_handover(name, order):
    """Across the step boundary: step 1's state from its own iterations (in the chosen order), the
    running Fisher restarting from step 0's saved Fisher, the scores combined with step 0's."""
    model0, reg0, _, _, _ = run_step0(name, order=order)
    state0 = reg0.state_dict()
    model = step1_model(model0)
    start = {n: p.detach().clone() for n, p in trainable(model).items()}
    reg = make_regularizer(name, trainable(model), state0, importance=1.0, alpha=ALPHA, iterations=3,
                           update_after_step=order == "after")
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
        assert_dicts_close(state["fisher"], ref_fisher(records, state0["fisher"]))
    if name == "pi":
        theta_start = {n: state0["params"].get(n, start[n]) for n in start}
        assert_dicts_close(state["score"], ref_pi_score(records, theta_start, state0["score"], order=order))
    if name == "rw":
        want = ref_rw_score(records, 3, state0["score"], state0["fisher"], order=order)
        assert_dicts_close(state["score"], want)

    # Step 2 penalises this step's classifier too.
    reg2 = make_regularizer(name, trainable(model), state, importance=1.0, iterations=3)
    assert "cls.1.weight" in reg2.penalised_names and "cls.1.bias" in reg2.penalised_names


@pytest.mark.parametrize("name", ["ewc", "rw"])
def test_running_fisher_restarts_from_the_saved_fisher(name):
    """At t > 0 the running Fisher starts from step t-1's saved (raw, not normalised) Fisher, and from ones
    for the new classifier; a third step starts from step 1's."""
    model0, reg0, _, _, _ = run_step0(name)
    state0 = reg0.state_dict()
    assert not torch.equal(state0["fisher"]["body.weight"], torch.ones_like(state0["fisher"]["body.weight"]))
    model = step1_model(model0)
    reg = make_regularizer(name, trainable(model), state0, importance=1.0, alpha=ALPHA, iterations=3)
    for n, f in reg.fisher.items():
        want = state0["fisher"][n] if n in state0["fisher"] else torch.ones_like(f)
        assert torch.equal(f, want), n
    train(model, reg, 3, seed=2)
    state1 = reg.state_dict()
    reg2 = make_regularizer(name, trainable(model), state1, importance=1.0, alpha=ALPHA, iterations=3)
    assert_dicts_close(reg2.fisher, state1["fisher"])


def test_frozen_old_parameters_are_not_penalised():
    model0, reg0, _, _, _ = run_step0("ewc", iterations=2)
    model = step1_model(model0)
    model.body.requires_grad_(False)
    reg = EWC(trainable(model), reg0.state_dict(), importance=1.0)
    assert reg.penalised_names == ("cls.0.weight", "cls.0.bias")


# ------------------------------------------------------------------ robustness
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", ["ewc", "pi", "rw"])
def test_non_finite_gradient_leaves_state_unchanged(name, order):
    model, reg, _, _, _ = run_step0(name, iterations=3, k=1, order=order)
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
    with pytest.raises(UserError, match="unknown regularizer 'mas'"):
        make_regularizer("mas", trainable(model), None, importance=1.0)
    with pytest.raises(UserError, match="iterations must be >= 1"):
        make_regularizer("rw", trainable(model), None, importance=1.0, iterations=0)


def test_registry_and_normalize():
    assert REGULARIZERS == {"ewc": EWC, "pi": PI, "rw": RW}
    assert isinstance(make_regularizer("PI", trainable(TinySegmenter()), None, 1.0), PI)
    m = torch.tensor([[2.0, 4.0], [6.0, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(normalize(m), (m - 2.0) / (8.0 + 1e-8))
    assert torch.equal(normalize(torch.ones(3)), torch.zeros(3))
