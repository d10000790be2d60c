"""PLOP's formulas (docs/methods.md#plop) against slow direct re-computations on small tensors: entropy,
histogram, the authors' median (with its quirks) and the corrected one, pseudo-labels, the adaptive factor,
logit folding and Local POD; the pre-activation stage features the model gives for it."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods import plop
from modules import ModelOptions, make_model

IGNORE = 255


def slow_u(logits, total_classes):
    """u per pixel by loops: −(1/ln C°)·mean_c p_c ln(p_c+1e-8) / ln(N_tot)."""
    B, C, H, W = logits.shape
    out = torch.zeros(B, H, W, dtype=torch.float64)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                values = [float(v) for v in logits[b, :, i, j]]
                top = max(values)
                den = sum(math.exp(v - top) for v in values)
                probs = [math.exp(v - top) / den for v in values]
                mean = sum(p * math.log(p + 1e-8) for p in probs) / C
                out[b, i, j] = -mean / math.log(C) / math.log(total_classes)
    return out


def authors_median_loop(hist_row, bins=100):
    """The authors' scan, transcribed literally (floating k/bins·bins, run += bin index, bin read at int())."""
    total = float(sum(hist_row))
    if total <= 0:
        return 0.0
    half = total / 2
    running_sum = 0.0
    for lower_border in range(bins):
        lower_border = lower_border / bins
        bin_index = int(lower_border * bins)
        if running_sum <= half <= running_sum + hist_row[bin_index]:
            break
        running_sum += lower_border * bins
    count = float(hist_row[bin_index])
    numerator = half - running_sum
    if count == 0:  # torch's float division: ±inf, or nan for 0/0
        ratio = math.nan if numerator == 0 else math.copysign(math.inf, numerator)
    else:
        ratio = numerator / count
    return lower_border + ratio * (1 / bins)


def corrected_median_loop(hist_row, bins=100):
    total = float(sum(hist_row))
    if total <= 0:
        return 0.0
    half, running = total / 2, 0.0
    for k in range(bins):
        if running <= half <= running + hist_row[k]:
            return k / bins + (half - running) / hist_row[k] / bins
        running += hist_row[k]
    raise AssertionError("a cumulative scan always stops")


def test_normalized_entropy_and_histogram_match_loops():
    gen = torch.Generator().manual_seed(0)
    old_logits = 3 * torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    labels[0, 0, :2] = IGNORE
    total = 5  # N_tot: 3 old channels + 2 new classes
    u = slow_u(old_logits, total)
    predicted, got_u = plop.old_predictions(old_logits, total)
    torch.testing.assert_close(got_u, u)
    hist = plop.entropy_histogram(old_logits, labels, total)
    expected = torch.zeros(total, 100, dtype=torch.int64)
    for b, i, j in zip(*torch.nonzero(labels == 0, as_tuple=True)):
        expected[int(old_logits[b, :, i, j].argmax()), min(int(u[b, i, j] * 100), 99)] += 1
    assert torch.equal(hist, expected) and hist.sum() == (labels == 0).sum()
    assert hist[3:].sum() == 0  # the old model never predicts a new class


def _hist_with(**cells):
    row = [0] * 100
    for k, v in cells.items():
        row[int(k[1:])] = v
    return row


@pytest.mark.parametrize("row", [
    _hist_with(b5=10, b20=3),  # small class: stops early (run 10 ≤ half ≤ run + hist)
    _hist_with(b3=400, b40=300, b70=500),  # large class: the scan stops at a big bin
    _hist_with(b28=7, b29=5000, b30=4),  # stops at k = 29, where the authors read bin 28
    _hist_with(b56=11, b57=4000, b58=3000),  # k = 57, 58 read bins 56, 57
    _hist_with(b2=6, b9=5),  # never stops, hist[99] = 0: −inf, then the lower bound
    _hist_with(b2=6000, b99=2),  # never stops, hist[99] > 0: a large negative median
    _hist_with(b1=1, b2=3),  # half = 2: stops at bin 2 where run = 1
    [0] * 100,  # no pixel: 0, then the lower bound
])
def test_authors_median_and_thresholds_match_their_loop(row):
    hist = torch.tensor([row])
    got = float(plop.histogram_medians(hist, authors=True)[0])
    want = authors_median_loop(row)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-12, abs=1e-12)
    tau = float(plop.entropy_thresholds(hist, 0.001)[0])
    expected_tau = want if math.isnan(want) else max(want, 0.001)
    assert (math.isnan(tau) and math.isnan(expected_tau)) or tau == pytest.approx(expected_tau, rel=1e-12)


def test_quirks_change_the_median_and_the_correction_is_the_true_median():
    gen = torch.Generator().manual_seed(3)
    values = torch.rand(20001, generator=gen, dtype=torch.float64) ** 3  # skewed towards 0
    row = torch.bincount((values * 100).long().clamp(max=99), minlength=100)
    hist = row[None]
    corrected = float(plop.histogram_medians(hist, authors=False)[0])
    assert corrected == pytest.approx(corrected_median_loop(row.tolist()), rel=1e-12)
    true_median = float(values.median())
    assert int(corrected * 100) == int(true_median * 100)  # the interpolation stays in the right bin
    assert abs(corrected - true_median) < 0.01
    authors = float(plop.histogram_medians(hist, authors=True)[0])
    assert authors == pytest.approx(authors_median_loop(row.tolist()), rel=1e-12)
    assert abs(authors - true_median) > 0.01  # the quirk moves it
    # six pixels over three bins: the running sum of bin indices meets half = 3 at the empty bin 3 (run
    # 0+1+2), so the authors' interpolation divides 0 by 0: nan, and no pseudo-label of the class passes
    small = _hist_with(b10=2, b30=2, b60=2)
    assert plop.histogram_medians(torch.tensor([small]), authors=False)[0] == pytest.approx(0.305)
    assert math.isnan(authors_median_loop(small))
    assert plop.histogram_medians(torch.tensor([small]), authors=True)[0].isnan()
    assert plop.entropy_thresholds(torch.tensor([small]), 0.001)[0].isnan()


def test_pseudo_labels_and_adaptive_factor_match_loops():
    gen = torch.Generator().manual_seed(1)
    old_logits = 4 * torch.randn(3, 3, 4, 4, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 4, 4), generator=gen)
    labels[0, 0, 0] = IGNORE
    labels[2] = 4  # an image without background pixels: factor 0
    thresholds = torch.tensor([0.02, 0.05, 0.03, 0.001, 0.001], dtype=torch.float64)
    out, factor = plop.pseudo_labels(labels, old_logits, thresholds, total_classes=5)
    u = slow_u(old_logits, 5)
    expected = labels.clone()
    kept, background = [0] * 3, [0] * 3
    for b in range(3):
        for i in range(4):
            for j in range(4):
                if labels[b, i, j] != 0:
                    continue
                background[b] += 1
                c = int(old_logits[b, :, i, j].argmax())
                if u[b, i, j] < thresholds[c]:
                    expected[b, i, j] = c
                    kept[b] += 1
                else:
                    expected[b, i, j] = IGNORE
    assert torch.equal(out, expected)
    assert 0 < sum(kept) < sum(background)  # both kinds of background pixel occur
    want = torch.tensor([k / (n + 1e-6) for k, n in zip(kept, background)], dtype=torch.float64)
    torch.testing.assert_close(factor, want)
    assert factor[2] == 0

    logits = torch.randn(3, 5, 4, 4, generator=gen, dtype=torch.float64)
    loss = plop.adaptive_cross_entropy(logits, out, factor)
    total = 0.0
    for b in range(3):
        for i in range(4):
            for j in range(4):
                y = int(out[b, i, j])
                if y != IGNORE:
                    total += -float(factor[b]) * float(torch.log_softmax(logits[b, :, i, j], 0)[y])
    assert float(loss) == pytest.approx(total / (3 * 16), rel=1e-12)


def test_fold_logits_matches_a_loop():
    gen = torch.Generator().manual_seed(2)
    new = torch.randn(2, 6, 3, 3, generator=gen, dtype=torch.float64)  # C° = 4, two new classes
    folded = plop.fold_logits(new, 4)
    assert folded.shape == (2, 4, 3, 3)
    for b, i, j in [(0, 0, 0), (1, 2, 1), (0, 1, 2)]:
        assert float(folded[b, 0, i, j]) == pytest.approx(float(new[b, 0, i, j] + new[b, 4, i, j] + new[b, 5, i, j]))
        assert torch.equal(folded[b, 1:, i, j], new[b, 1:4, i, j])


def slow_embedding(m):
    """Φ(m) of one sample [C, H, W] by explicit regions, as the formula reads."""
    x = m.pow(2)
    C, H, W = x.shape
    parts = []
    for s in (1, 2, 4):
        k = W // s
        for i in range(s):
            for j in range(s):
                region = x[:, i * k:(i + 1) * k, j * k:(j + 1) * k]
                parts.append(region.mean(dim=2).reshape(-1))  # mean over width: C·k values
                parts.append(region.mean(dim=1).reshape(-1))  # mean over height
    return torch.cat(parts)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 2, 9, 7)])  # remainder rows/columns dropped
def test_local_pod_embedding_and_distance_match_loops(shape):
    gen = torch.Generator().manual_seed(4)
    new = torch.randn(*shape, generator=gen, dtype=torch.float64)
    old = torch.randn(*shape, generator=gen, dtype=torch.float64)
    emb = plop.local_pod_embedding(new)
    for b in range(shape[0]):
        torch.testing.assert_close(emb[b], slow_embedding(new[b]))
    want = sum(float((slow_embedding(old[b]) - slow_embedding(new[b])).pow(2).sum().sqrt())
               for b in range(shape[0])) / shape[0]
    assert float(plop.local_pod(new, old)) == pytest.approx(want, rel=1e-12)


def test_pod_loss_over_six_maps_with_factors_and_folding():
    gen = torch.Generator().manual_seed(5)
    classes = [4, 2]  # N_tot 6, N_new 2
    names = [*plop.POD_FEATURES, plop.POD_LOGITS]
    new = {n: torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) for n in plop.POD_FEATURES}
    old = {n: torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64) for n in plop.POD_FEATURES}
    new[plop.POD_LOGITS] = torch.randn(2, 6, 4, 4, generator=gen, dtype=torch.float64)
    old[plop.POD_LOGITS] = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64)
    got = plop.pod_loss(new, old, classes, 0.01, 0.0005)
    total = 0.0
    for n in names:
        n_map = plop.fold_logits(new[n], 4) if n == plop.POD_LOGITS else new[n]
        factor = 0.0005 if n == plop.POD_LOGITS else 0.01
        dist = sum(float((slow_embedding(old[n][b]) - slow_embedding(n_map[b])).norm()) for b in range(2)) / 2
        total += factor * math.sqrt(6 / 2) * dist
    assert float(got) == pytest.approx(total / 6, rel=1e-12)
    # without the logits map: five maps, divided by five
    five = plop.pod_loss(new, old, classes, 0.01, 0.0005, use_logits=False)
    part = sum(0.01 * math.sqrt(3) * sum(float((slow_embedding(old[n][b]) - slow_embedding(new[n][b])).norm())
                                         for b in range(2)) / 2 for n in plop.POD_FEATURES)
    assert float(five) == pytest.approx(part / 5, rel=1e-12)


@pytest.mark.parametrize("norm_act", ["std", "abn", "iabn"])
def test_pre_activation_features_of_every_stage(norm_act):
    opts = ModelOptions(backbone="resnet18", norm_act=norm_act, output_stride=16, no_pretrained=True,
                        pretrained=None)
    torch.manual_seed(0)
    model = make_model(opts, [3, 2]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        model.return_pre_activations()
        out = model(x)
    assert list(plain.features) == ["stage1", "stage2", "stage3", "stage4", "body", "pre_logits"]
    torch.testing.assert_close(out.logits, plain.logits)  # same function, more outputs
    slope = 0.0 if norm_act == "std" else 0.01
    for i in range(1, 5):
        pre, post = out.features[f"stage{i}_preact"], out.features[f"stage{i}"]
        torch.testing.assert_close(post, plain.features[f"stage{i}"])
        assert (pre < 0).any()  # really before the activation
        torch.testing.assert_close(post, F.leaky_relu(pre, slope))
    small = out.features["logits_small"]
    assert small.shape == (2, 5, 4, 4)
    torch.testing.assert_close(F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False), out.logits)
    # gradients flow through the pre-activation maps (the new model is trained through them)
    model.train()
    out = model(x)
    out.features["stage2_preact"].pow(2).mean().backward()
    assert model.body.mod2.block1.convs.conv1.weight.grad is not None
