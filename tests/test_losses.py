"""Tests for helpers.modeling.losses: PML as the oracle (values and gradients), plain-loop oracles,
a hand-computed case, degenerate batches, low-precision inputs and the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from helpers.core.errors import InputError
from helpers.modeling.losses import (
    LOSSES,
    BatchHardTripletLoss,
    CrossBatchMemory,
    SemiHardTripletLoss,
    SupConLoss,
    create_loss,
)

ATOL = 1e-5
RTOL = 1e-5
SEEDS = (0, 1, 2)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: intra-op threads only add overhead (a lot, on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------


def _pk_labels(p: int = 8, k: int = 4) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(k)


def _irregular_labels(g: torch.Generator) -> torch.Tensor:
    # 19 samples over 6 classes: uneven class sizes, usually some singletons (no positive).
    labels = torch.randint(0, 6, (19,), generator=g)
    labels[-1] = 99  # always one singleton anchor
    return labels


def _embeddings(labels: torch.Tensor, g: torch.Generator, spread: float, dim: int = 16):
    """Clustered unit vectors: class centre + ``spread`` * noise (spread large = random)."""
    centres = torch.randn(int(labels.max()) + 1, dim, generator=g)
    x = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    return F.normalize(x, dim=1).requires_grad_()


def _batches():
    """(name, embeddings, labels) for P x K and irregular batches, random and clustered."""
    out = []
    for seed in SEEDS:
        for kind in ("pk", "irregular"):
            for spread in (10.0, 0.6):
                g = torch.Generator().manual_seed(seed)
                labels = _pk_labels() if kind == "pk" else _irregular_labels(g)
                out.append((f"{kind}-seed{seed}-spread{spread}", _embeddings(labels, g, spread), labels))
    return out


BATCHES = _batches()
BATCH_IDS = [b[0] for b in BATCHES]


def _value_and_grad(loss_fn, x, labels):
    loss = loss_fn(x, labels)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _assert_same(ours, theirs):
    (v1, g1), (v2, g2) = ours, theirs
    assert torch.allclose(v1, v2, atol=ATOL, rtol=RTOL), (v1.item(), v2.item())
    assert torch.allclose(g1, g2, atol=ATOL, rtol=RTOL), (g1 - g2).abs().max().item()


def _pml_distance(squared: bool):
    return pml_distances.LpDistance(p=2, power=2 if squared else 1)


# --------------------------------------------------------------------------------------------
# PML as the oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("squared,margin", [(False, 0.2), (True, 0.2), (False, 0.35), (True, 0.5)])
@pytest.mark.parametrize("name,x,labels", BATCHES, ids=BATCH_IDS)
def test_semi_hard_matches_pml(name, x, labels, squared, margin):
    dist = _pml_distance(squared)
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=dist)
    pml = pml_losses.TripletMarginLoss(margin=margin, distance=dist)  # default AvgNonZeroReducer

    def pml_fn(e, y):
        return pml(e, y, miner(e, y))

    ours = _value_and_grad(SemiHardTripletLoss(margin=margin, squared=squared), x, labels)
    _assert_same(ours, _value_and_grad(pml_fn, x, labels))


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
@pytest.mark.parametrize("squared,margin", [(False, 0.2), (True, 0.5)])
@pytest.mark.parametrize("name,x,labels", BATCHES, ids=BATCH_IDS)
def test_batch_hard_matches_pml(name, x, labels, squared, margin, reduction):
    dist = _pml_distance(squared)
    reducer = pml_reducers.MeanReducer() if reduction == "mean" else pml_reducers.AvgNonZeroReducer()
    miner = pml_miners.BatchHardMiner(distance=dist)
    pml = pml_losses.TripletMarginLoss(margin=margin, distance=dist, reducer=reducer)

    def pml_fn(e, y):
        return pml(e, y, miner(e, y))

    loss = BatchHardTripletLoss(margin=margin, squared=squared, reduction=reduction)
    _assert_same(_value_and_grad(loss, x, labels), _value_and_grad(pml_fn, x, labels))


def test_batch_hard_reductions_differ_on_clustered_batch():
    """Make sure the batches above exercise the difference between the two reductions."""
    differ = 0
    for _, x, labels in BATCHES:
        mean = BatchHardTripletLoss(reduction="mean")(x, labels)
        nonzero = BatchHardTripletLoss(reduction="mean_nonzero")(x, labels)
        assert nonzero >= mean - 1e-7
        differ += bool(nonzero > mean + 1e-4)
    assert differ >= 3


@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("name,x,labels", BATCHES, ids=BATCH_IDS)
def test_supcon_matches_pml(name, x, labels, temperature):
    pml = pml_losses.SupConLoss(temperature=temperature)
    ours = _value_and_grad(SupConLoss(temperature=temperature), x, labels)
    _assert_same(ours, _value_and_grad(pml, x, labels))


def test_supcon_solved_anchors_are_dropped_like_pml():
    # Anchors 0 and 1 are a near-identical pair far from every negative: at t = 0.07 their loss
    # rounds to exactly 0 in fp32, and PML's AvgNonZeroReducer leaves them out of the mean.
    g = torch.Generator().manual_seed(0)
    e0 = torch.zeros(16)
    e0[0] = 1.0
    rest = torch.randn(10, 16, generator=g)
    rest[:, 0] = -3 * rest[:, 0].abs() - 3
    x = torch.cat([e0[None], (e0 + 1e-4 * torch.randn(16, generator=g))[None], rest])
    x = F.normalize(x, dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 5])
    ours = _value_and_grad(SupConLoss(temperature=0.07), x, labels)
    _assert_same(ours, _value_and_grad(pml_losses.SupConLoss(temperature=0.07), x, labels))


# --------------------------------------------------------------------------------------------
# plain-loop oracles (float64 Python arithmetic) on a tiny batch
# --------------------------------------------------------------------------------------------


def _tiny_batch():
    g = torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])  # class 3 is a singleton
    x = _embeddings(labels, g, spread=1.0, dim=3)
    return x, labels


def _loop_distances(x: torch.Tensor, squared: bool) -> list[list[float]]:
    rows = [[float(v) for v in row] for row in x.detach().double()]
    rows = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
    n = len(rows)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            sq = sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))
            d[i][j] = sq if squared else math.sqrt(sq)
    return d


@pytest.mark.parametrize("squared,margin", [(False, 0.2), (False, 0.5), (True, 0.5)])
def test_semi_hard_matches_loop_oracle(squared, margin):
    x, labels = _tiny_batch()
    y = labels.tolist()
    d = _loop_distances(x, squared)
    n = len(y)
    terms = []
    for a in range(n):
        for p in range(n):
            if p == a or y[p] != y[a]:
                continue
            for neg in range(n):
                if y[neg] == y[a]:
                    continue
                if d[a][p] < d[a][neg] < d[a][p] + margin:
                    terms.append(d[a][p] - d[a][neg] + margin)
    assert terms, "the tiny batch must contain semi-hard triplets"
    expected = sum(terms) / len(terms)
    got = SemiHardTripletLoss(margin=margin, squared=squared)(x, labels).item()
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
@pytest.mark.parametrize("squared,margin", [(False, 0.2), (True, 0.5)])
def test_batch_hard_matches_loop_oracle(squared, margin, reduction):
    x, labels = _tiny_batch()
    y = labels.tolist()
    d = _loop_distances(x, squared)
    n = len(y)
    per_anchor = []
    for a in range(n):
        hardest_pos, hardest_neg = None, None
        for p in range(n):
            if p != a and y[p] == y[a] and (hardest_pos is None or d[a][p] > hardest_pos):
                hardest_pos = d[a][p]
        for neg in range(n):
            if y[neg] != y[a] and (hardest_neg is None or d[a][neg] < hardest_neg):
                hardest_neg = d[a][neg]
        if hardest_pos is None or hardest_neg is None:
            continue  # anchor 7 (singleton) is skipped
        per_anchor.append(max(0.0, hardest_pos - hardest_neg + margin))
    assert len(per_anchor) == n - 1
    if reduction == "mean_nonzero":
        per_anchor = [v for v in per_anchor if v > 0]
    expected = sum(per_anchor) / len(per_anchor)
    got = BatchHardTripletLoss(margin=margin, squared=squared, reduction=reduction)(x, labels).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_supcon_matches_loop_oracle():
    x, labels = _tiny_batch()
    y = labels.tolist()
    t = 0.1
    rows = F.normalize(x.detach().double(), dim=1).tolist()
    n = len(y)
    s = [[sum(a * b for a, b in zip(rows[i], rows[j])) / t for j in range(n)] for i in range(n)]
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        log_den = math.log(sum(math.exp(s[i][k]) for k in range(n) if k != i))
        per_anchor.append(-sum(s[i][p] - log_den for p in positives) / len(positives))
    expected = sum(per_anchor) / len(per_anchor)
    assert SupConLoss(temperature=t)(x, labels).item() == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# hand-computed case: 4 unit vectors in 2D
# --------------------------------------------------------------------------------------------
#   x0 = (1, 0)     label 0        squared distances: d01 = 0.8, d02 = 0.4, d03 = 4.0,
#   x1 = (0.6, 0.8) label 0                           d12 = 2.0, d13 = 3.2, d23 = 3.6
#   x2 = (0.8,-0.6) label 1        cosines:           c01 = 0.6, c02 = 0.8, c03 = -1,
#   x3 = (-1, 0)    label 1                           c12 = 0,   c13 = -0.6, c23 = -0.8

HAND_X = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, -0.6], [-1.0, 0.0]])
HAND_Y = torch.tensor([0, 0, 1, 1])


def test_hand_computed_batch_hard():
    r = math.sqrt
    # Euclidean, margin 0.2. Per anchor: hardest positive - hardest negative + margin:
    #   a0: d01 - d02 + .2 = .894427 - .632456 + .2 = 0.461971
    #   a1: d10 - d12 + .2 = .894427 - 1.414214 + .2 < 0  -> 0
    #   a2: d23 - d20 + .2 = 1.897367 - .632456 + .2 = 1.464911
    #   a3: d32 - d31 + .2 = 1.897367 - 1.788854 + .2 = 0.308513
    total = (r(0.8) - r(0.4) + 0.2) + (r(3.6) - r(0.4) + 0.2) + (r(3.6) - r(3.2) + 0.2)
    assert total / 4 == pytest.approx(0.558849, abs=1e-6)
    assert total / 3 == pytest.approx(0.745132, abs=1e-6)
    loss = BatchHardTripletLoss(margin=0.2)
    assert loss(HAND_X, HAND_Y).item() == pytest.approx(0.558849, abs=1e-6)
    loss = BatchHardTripletLoss(margin=0.2, reduction="mean_nonzero")
    assert loss(HAND_X, HAND_Y).item() == pytest.approx(0.745132, abs=1e-6)
    # Seed setting (squared, margin 0.5): a0: .8-.4+.5 = .9, a1: .8-2+.5 < 0, a2: 3.6-.4+.5 = 3.7,
    # a3: 3.6-3.2+.5 = .9  ->  mean = 5.5 / 4 = 1.375
    loss = BatchHardTripletLoss(margin=0.5, squared=True)
    assert loss(HAND_X, HAND_Y).item() == pytest.approx(1.375, abs=1e-6)


def test_hand_computed_semi_hard():
    r = math.sqrt
    # Euclidean, margin 0.6: the semi-hard triplets (d_ap < d_an < d_ap + .6) are
    #   (a1, p0, n2): .894427 < 1.414214 < 1.494427  -> .894427 - 1.414214 + .6 = 0.080213
    #   (a3, p2, n0): 1.897367 < 2 < 2.497367         -> 1.897367 - 2 + .6        = 0.497367
    # every other triplet has d_an < d_ap or d_an > d_ap + .6  ->  mean = 0.288790
    expected = ((r(0.8) - r(2.0) + 0.6) + (r(3.6) - 2.0 + 0.6)) / 2
    assert expected == pytest.approx(0.288790, abs=1e-6)
    assert SemiHardTripletLoss(margin=0.6)(HAND_X, HAND_Y).item() == pytest.approx(0.288790, abs=1e-6)
    # margin 0.2: only (a3, p2, n0) -> 1.897367 - 2 + .2 = 0.097367
    assert SemiHardTripletLoss(margin=0.2)(HAND_X, HAND_Y).item() == pytest.approx(0.097367, abs=1e-6)
    # squared, margin 0.5: only (a3, p2, n0): 3.6 < 4.0 < 4.1 -> 3.6 - 4 + .5 = 0.1
    loss = SemiHardTripletLoss(margin=0.5, squared=True)
    assert loss(HAND_X, HAND_Y).item() == pytest.approx(0.1, abs=1e-6)


def test_hand_computed_supcon():
    e = math.exp
    # temperature 1, logits = cosines; one positive per anchor (plain InfoNCE):
    l0 = -math.log(e(0.6) / (e(0.6) + e(0.8) + e(-1.0)))
    l1 = -math.log(e(0.6) / (e(0.6) + e(0.0) + e(-0.6)))
    l2 = -math.log(e(-0.8) / (e(0.8) + e(0.0) + e(-0.8)))
    l3 = -math.log(e(-0.8) / (e(-1.0) + e(-0.6) + e(-0.8)))
    expected = (l0 + l1 + l2 + l3) / 4
    assert expected == pytest.approx(1.178434, abs=1e-6)
    assert SupConLoss(temperature=1.0)(HAND_X, HAND_Y).item() == pytest.approx(1.178434, abs=1e-6)


# --------------------------------------------------------------------------------------------
# degenerate batches
# --------------------------------------------------------------------------------------------

ALL_LOSSES = [
    SemiHardTripletLoss(),
    SemiHardTripletLoss(squared=True),
    BatchHardTripletLoss(),
    BatchHardTripletLoss(squared=True, reduction="mean_nonzero"),
    SupConLoss(),
]
LOSS_IDS = ["semi", "semi-sq", "bh", "bh-sq-nonzero", "supcon"]


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize(
    "labels",
    [torch.arange(6), torch.zeros(6, dtype=torch.long), torch.tensor([3])],
    ids=["all-distinct", "all-equal", "single"],
)
def test_degenerate_batch_is_connected_zero(loss_fn, labels):
    x = F.normalize(torch.randn(labels.shape[0], 8, generator=torch.Generator().manual_seed(0)), dim=1)
    x.requires_grad_()
    loss = loss_fn(x, labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad == 0).all()


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=LOSS_IDS)
def test_duplicate_embeddings_give_finite_gradients(loss_fn):
    # Identical embeddings (distance exactly 0) must not produce NaN through sqrt/cdist.
    x = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    x = torch.cat([x, x]).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    loss = loss_fn(x, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# low precision inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=LOSS_IDS)
def test_fp16_input(loss_fn):
    g = torch.Generator().manual_seed(1)
    labels = _pk_labels()
    x32 = _embeddings(labels, g, spread=0.8).detach()
    x16 = x32.half().requires_grad_()
    loss16 = loss_fn(x16, labels)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    # The loss upcasts first: identical to the fp32 loss of the rounded input ...
    assert torch.allclose(loss16, loss_fn(x16.detach().float(), labels), atol=1e-6, rtol=1e-6)
    # ... and close to the fp32 loss of the unrounded input.
    assert torch.allclose(loss16, loss_fn(x32, labels), atol=1e-3, rtol=1e-2)
    loss16.backward()
    assert x16.grad.dtype == torch.float16 and torch.isfinite(x16.grad).all()


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=LOSS_IDS)
def test_fp16_large_unnormalised_input_does_not_overflow(loss_fn):
    # |x|^2 ~ 1e6 overflows fp16 (max 65504); the losses normalise in fp32.
    g = torch.Generator().manual_seed(2)
    labels = _pk_labels()
    x = _embeddings(labels, g, spread=0.8).detach()
    big = (x * 400).half()
    loss = loss_fn(big, labels)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, loss_fn(big.float(), labels), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=LOSS_IDS)
def test_bf16_under_cpu_autocast(loss_fn):
    g = torch.Generator().manual_seed(4)
    labels = _pk_labels()
    features = torch.randn(labels.shape[0], 24, generator=g)
    head = torch.nn.Linear(24, 16)
    with torch.no_grad():
        head.weight.copy_(0.2 * torch.randn(16, 24, generator=g))
        head.bias.copy_(0.1 * torch.randn(16, generator=g))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = F.normalize(head(features), dim=1)
        assert emb.dtype == torch.bfloat16  # the model output really is low precision
        loss = loss_fn(emb, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Autocast is disabled inside: same value as fp32 arithmetic on the bf16 embeddings ...
    reference = loss_fn(emb.detach().float(), labels)
    assert torch.allclose(loss, reference, atol=1e-6, rtol=1e-6)
    # ... and close to the all-fp32 pipeline.
    with torch.no_grad():
        full = loss_fn(F.normalize(head(features), dim=1), labels)
    assert torch.allclose(loss, full, atol=2e-2, rtol=5e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_registry_names():
    assert LOSSES == {
        "semi_hard": SemiHardTripletLoss,
        "batch_hard": BatchHardTripletLoss,
        "infonce": SupConLoss,
    }
    for name, cls in LOSSES.items():
        assert isinstance(create_loss(name), cls)
        assert cls.__doc__ and "loss" in cls.__doc__ and "=" in cls.__doc__


def test_create_loss_ignores_none_kwargs():
    loss = create_loss("semi_hard", margin=None, squared=None)
    assert (loss.margin, loss.squared) == (0.2, False)
    loss = create_loss("batch_hard", margin=0.5, squared=True, reduction=None)
    assert (loss.margin, loss.squared, loss.reduction) == (0.5, True, "mean")
    loss = create_loss("infonce", temperature=None)
    assert loss.temperature == 0.07
    assert create_loss("infonce", temperature=0.1).temperature == 0.1


def test_create_loss_unknown_name_lists_choices():
    with pytest.raises(InputError) as info:
        create_loss("arcface")
    message = str(info.value)
    assert "unknown loss 'arcface'" in message and "\n" not in message
    for name in ("semi_hard", "batch_hard", "infonce"):
        assert name in message


@pytest.mark.parametrize(
    "name,kwargs,fragment",
    [
        ("semi_hard", {"temperature": 0.1}, "temperature"),
        ("infonce", {"margin": 0.2}, "margin"),
        ("batch_hard", {"reduction": "sum"}, "reduction"),
        ("semi_hard", {"margin": 0.0}, "margin"),
        ("batch_hard", {"margin": -1.0}, "margin"),
        ("infonce", {"temperature": 0}, "temperature"),
        ("batch_hard", {"squared": "yes"}, "squared"),
    ],
)
def test_create_loss_rejects_bad_options(name, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        create_loss(name, **kwargs)


# --------------------------------------------------------------------------------------------
# cross-batch memory (XBM)
# --------------------------------------------------------------------------------------------


def _xbm_loop_oracle(batches, margin: float, memory_size: int) -> list[float]:
    """Batch-hard over batch ∪ memory with explicit loops; memory = the last ``memory_size``
    normalised rows of earlier batches."""
    memory: list[tuple[list[float], int]] = []
    values = []
    for x, labels in batches:
        rows = F.normalize(x.detach().double(), dim=1).tolist()
        y = labels.tolist()
        candidates = list(zip(rows, y)) + memory
        per_anchor = []
        for a, (row, label) in enumerate(zip(rows, y)):
            dists = [math.dist(row, c) for c, _ in candidates]
            pos = [d for j, (d, (_, cl)) in enumerate(zip(dists, candidates)) if j != a and cl == label]
            neg = [d for d, (_, cl) in zip(dists, candidates) if cl != label]
            if pos and neg:
                per_anchor.append(max(0.0, max(pos) - min(neg) + margin))
        values.append(sum(per_anchor) / len(per_anchor))
        memory = (list(zip(rows, y)) + memory)[:memory_size]
    return values


def test_cross_batch_memory_matches_loop_oracle():
    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(6, 5, generator=generator), torch.tensor(labels))
        for labels in ([0, 0, 1, 1, 2, 2], [1, 1, 3, 3, 4, 4], [0, 0, 4, 4, 5, 5], [5, 5, 6, 6, 1, 1])
    ]
    xbm = CrossBatchMemory(BatchHardTripletLoss(margin=0.2), memory_size=8)
    got = [xbm(x, labels).item() for x, labels in batches]
    assert got == pytest.approx(_xbm_loop_oracle(batches, 0.2, 8), abs=1e-6)
    assert xbm.memory.shape == (8, 5) and xbm.memory_labels.tolist() == [5, 5, 6, 6, 1, 1, 0, 0]
    # The memory changes the loss (it holds harder negatives than the batch alone) ...
    assert got[1] != pytest.approx(BatchHardTripletLoss(margin=0.2)(*batches[1]).item(), abs=1e-6)
    # ... and after reset the loss is the plain batch's again.
    xbm.reset()
    assert xbm(*batches[2]).item() == pytest.approx(BatchHardTripletLoss(margin=0.2)(*batches[2]).item())


def test_cross_batch_memory_gradient_flows_through_the_batch_only():
    x = torch.randn(4, 3, requires_grad=True)
    xbm = CrossBatchMemory(SupConLoss(temperature=0.1), memory_size=16)
    xbm(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))
    xbm(x, torch.tensor([0, 0, 1, 1])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not xbm.memory.requires_grad


def test_cross_batch_memory_refuses_semi_hard_and_bad_sizes():
    with pytest.raises(InputError, match="cannot mine a cross-batch memory"):
        CrossBatchMemory(SemiHardTripletLoss(), 8)
    with pytest.raises(InputError, match="memory_size"):
        CrossBatchMemory(BatchHardTripletLoss(), 0)
