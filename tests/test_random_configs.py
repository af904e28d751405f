"""The triton backend on configurations drawn at random (hypothesis, derandomised: the same draws
every run) against the float64 reference, with the torch backend in fp32 as the yardstick of
each case's conditioning (a saturated softmax leaves P_ii - 1 to cancellation in any fp32 code).
Widths >= 3 keep cosines from tying exactly; a draw whose float64 teacher row has two values
closer than fp32 resolves (``NEAR_TIE``) on either side of a group boundary is set aside: fp32
ranks them either way (as the spec allows for ties), and each way gives another loss."""
import pytest
import math

import torch

from conftest import DEVICE, requires_triton
from distillcse import reference
from test_losses import rel_err
from test_triton_backend import make_batch, round_trip, run

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

pytestmark = requires_triton


@st.composite
def configs(draw):
    B = draw(st.sampled_from([2, 3, 5, 17, 63, 64, 65, 66, 97, 129, 150]))
    K = draw(st.integers(1, 3))
    kw = dict(shuffle=draw(st.sampled_from(["none", "expected", "random"])), seed=draw(st.integers(0, 2**31)),
              temperature=draw(st.sampled_from([0.05, 0.5])), distill_weight=draw(st.sampled_from([1.0, 0.3])),
              distill_only=draw(st.booleans()) and B > 2)
    if draw(st.booleans()):
        kw.update(group_size=draw(st.sampled_from([1, 2, 5, 40])), group_p=draw(st.sampled_from([None, 0.1])))
    else:
        kw["group_p"] = draw(st.sampled_from([0.05, 0.1, 0.3, 0.7, 1.0]))
    kw["grouping_temperature"] = draw(st.sampled_from([1.0, 0.05, 3.0]))
    kw["teacher_temperature"] = draw(st.sampled_from([0.0125, 0.05, 1.0]))
    if K > 1 and draw(st.booleans()):
        w = [draw(st.floats(0.1, 1.0)) for _ in range(K)]
        kw["teacher_weights"] = [x / sum(w) for x in w]
    shape = dict(B=B, D=draw(st.sampled_from([3, 16, 33, 70, 130])),
                 dims=tuple(draw(st.sampled_from([3, 7, 24, 40])) for _ in range(K)),
                 Bh=draw(st.sampled_from([0, 0, 1, 9, 70])), seed=draw(st.integers(0, 1000)))
    return shape, kw


NEAR_TIE = 4e-6  # a few fp32 roundings of a cosine of <= 120 features


def _boundary_gap(teachers, kw):
    """The smallest gap between consecutive values of a float64 teacher row (descending) that
    fall in different Group-P groups."""
    t = reference.teacher_logits(teachers, kw.get("teacher_weights")).fill_diagonal_(-math.inf)
    v = t.sort(dim=1, descending=True).values[:, :-1]
    groups = reference.group_ids(v, kw.get("group_p") or 0.1, kw.get("group_size"), kw["grouping_temperature"])
    cut = groups[:, 1:] != groups[:, :-1]
    return (v[:, :-1] - v[:, 1:])[cut].min().item() if cut.any() else math.inf


def _errors(loss, grads, ref_loss, ref_grads):
    return [rel_err(loss, ref_loss, floor=1.0)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]


def _limits(inputs, ref, kw):
    """The triton backend's bounds on ``_errors`` against ``ref`` (a float64 run on the rounded
    inputs): 10 times the torch backend's own fp32 error, at least 2e-5 (B = 3, random: the
    torch backend's fp32 is 3.9e-5 off on z1). At B = 2, one column a row: the distillation
    gradient (z1's alone) is 0 in exact arithmetic, and the kernels' rounding of
    exp(s / tau_s - lse) - 1, ~eps / tau_s, times 1 / (tau_s B |z1_i|) a row (test_matches_reference):
    z1's error may be 16 times that (under a saturated contrastive softmax z1's gradient is small:
    B = 2, tau = 0.05, 70 hard negatives, 1e-3)."""
    limits = [max(2e-5, 10 * e) for e in _errors(*run("torch", inputs, torch.float32, "cpu", **kw), *ref)]
    if inputs[0].shape[0] == 2:
        student_scale = 1 / kw.get("student_temperature", 0.025)
        rounding = 16 * 2**-23 * student_scale**2 / 2 * (1 / inputs[0].norm(dim=1)).norm().item()
        limits[1] = max(limits[1], rounding / ref[1][0].norm().item())
    return limits


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(configs())
@hypothesis.example(config=(dict(B=3, D=16, dims=(3,), Bh=0, seed=0),  # found by 400 undirected draws
                            dict(shuffle="random", seed=1, temperature=0.5, distill_weight=1.0, distill_only=False,
                                 group_p=0.7, grouping_temperature=0.05, teacher_temperature=0.0125)))
@hypothesis.example(config=(dict(B=2, D=130, dims=(24, 7, 7), Bh=70, seed=317),  # found by 300 more
                            dict(shuffle="none", seed=455, temperature=0.05, distill_weight=1.0, distill_only=False,
                                 group_p=1.0, grouping_temperature=3.0, teacher_temperature=0.0125)))
@hypothesis.example(config=(dict(B=3, D=130, dims=(40,), Bh=0, seed=208),  # the one program's loss row as
                            dict(shuffle="none", seed=456, temperature=0.5, distill_weight=1.0,  # lse - sum q l:
                                 distill_only=False, group_p=0.3, grouping_temperature=3.0,  # 2.5e-5 off
                                 teacher_temperature=0.0125)))
def test_random_configurations_match_the_reference(config):
    shape, kw = config
    inputs = make_batch(shape["B"], shape["D"], shape["dims"], shape["Bh"], seed=shape["seed"])
    rounded = round_trip(inputs, torch.float32)
    hypothesis.assume(kw["shuffle"] == "none" or _boundary_gap(rounded[2], kw) > NEAR_TIE)
    # the random shuffle: the torch backend in float64 (it draws the same shuffle for a seed, the
    # reference its own)
    ref = run("torch" if kw["shuffle"] == "random" else "reference", rounded, torch.float64, "cpu", **kw)
    limits = _limits(inputs, ref, kw)
    errors = _errors(*run("triton", inputs, torch.float32, DEVICE, **kw), *ref)
    assert all(e <= limit for e, limit in zip(errors, limits)), (errors, limits)


@st.composite
def sharded_configs(draw):
    """A configuration of ``configs`` and a share of its rows, ``rows=(start, stop)``."""
    shape, kw = draw(configs())
    start = draw(st.integers(0, shape["B"] - 1))
    return shape, kw, (start, draw(st.integers(start + 1, shape["B"])))


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True, database=None,
                     phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(sharded_configs())
def test_random_shares_match_the_torch_backend(config):
    """A share of the rows (``distillcse.sharded_loss``'s) of a random configuration: its loss and
    gradients against the torch backend's share in float64 (which draws the same random shuffle),
    within 10 times that backend's own fp32 error; B = 2 as in the whole-batch test."""
    shape, kw, rows = config
    inputs = make_batch(shape["B"], shape["D"], shape["dims"], shape["Bh"], seed=shape["seed"])
    rounded = round_trip(inputs, torch.float32)
    hypothesis.assume(kw["shuffle"] == "none" or _boundary_gap(rounded[2], kw) > NEAR_TIE)
    ref = run("torch", rounded, torch.float64, "cpu", rows=rows, **kw)
    limits = _limits(inputs, ref, dict(kw, rows=rows))
    errors = _errors(*run("triton", inputs, torch.float32, DEVICE, rows=rows, **kw), *ref)
    assert all(e <= limit for e, limit in zip(errors, limits)), (errors, limits, rows)


def _exact_unit_rows(n, d, g):
    """[n, d] float64 rows of norm exactly 1 with entries multiples of 1/32 (integers m with
    sum m^2 = 32^2, the last four coordinates completing the sum as four squares): their unit
    rows, and the weighted unit rows of K = 4 teachers (sqrt(1/4) = 1/2), are exact in fp32, and
    so is every dot of them, in any order of summation."""
    rows = torch.zeros(n, d, dtype=torch.float64)
    for r in range(n):
        m, left = [], 32 * 32
        for x in torch.randn(d - 4, generator=g, dtype=torch.float64).tolist():
            a = max(-math.isqrt(left), min(math.isqrt(left), round(x * 32 / math.sqrt(d))))
            m.append(a)
            left -= a * a
        m += _four_squares(left)
        signs = torch.randint(0, 2, (4,), generator=g) * 2 - 1
        m[-4:] = [v * int(s) for v, s in zip(m[-4:], signs)]
        rows[r] = torch.tensor(m, dtype=torch.float64)[torch.randperm(d, generator=g)] / 32
    return rows


def _four_squares(n):
    """[a, b, c, e] with a^2 + b^2 + c^2 + e^2 = n (Lagrange: every n >= 0 has one)."""
    for a in range(math.isqrt(n), -1, -1):
        for b in range(min(a, math.isqrt(n - a * a)), -1, -1):
            for c in range(min(b, math.isqrt(n - a * a - b * b)), -1, -1):
                e2 = n - a * a - b * b - c * c
                if math.isqrt(e2) ** 2 == e2:
                    return [a, b, c, math.isqrt(e2)]
    raise AssertionError(n)


@st.composite
def copied_sentences(draw):
    """A batch whose teacher rows repeat: pairs of copies, one row many times over, or only five
    distinct rows (ties spanning several groups). Teacher rows of norm 1 with entries multiples
    of 1/32, one teacher or K = 4 of equal weight, so that every teacher logit is exact in fp32
    in every backend and copies tie exactly (rows merely rounded to 1/32 tie in a GEMM but not
    always in a matrix-vector product, whose sums run in another order by column)."""
    B = draw(st.sampled_from([40, 65, 97, 130]))
    K = draw(st.sampled_from([1, 4]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    z1 = torch.randn(B, 16, generator=g, dtype=torch.float64) + torch.randn(1, 16, generator=g, dtype=torch.float64)
    z2 = z1 + torch.randn(B, 16, generator=g, dtype=torch.float64)
    source = torch.arange(B)
    copies = draw(st.sampled_from(["pairs", "one row", "five rows"]))
    if copies == "pairs":
        n = draw(st.integers(1, B // 3))
        source[B - n:] = torch.arange(n)
    elif copies == "one row":
        source[B - draw(st.integers(5, B // 2)):] = 0
    else:
        source = torch.randint(0, 5, (B,), generator=g)
    teachers = [_exact_unit_rows(B, d, g)[source] for d in (8, 24, 8, 24)[:K]]
    kw = dict(shuffle=draw(st.sampled_from(["expected", "random"])), seed=draw(st.integers(0, 2**31)),
              grouping_temperature=draw(st.sampled_from([1.0, 0.05, 3.0])),
              teacher_temperature=draw(st.sampled_from([0.0125, 0.05, 1.0])))
    if draw(st.booleans()):
        kw["group_size"] = draw(st.sampled_from([1, 2, 4, 9, 40]))
    else:
        kw["group_p"] = draw(st.sampled_from([0.02, 0.1, 0.3, 0.7]))
    return (z1, z2, teachers, None), kw


@hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None,
                     phases=[hypothesis.Phase.generate], suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(copied_sentences())
def test_copied_sentences_rank_as_the_torch_backend(config):
    """Ties from repeated sentences, up to B = 1,024, rank in column order in the triton backend
    (the one program, the pairwise thresholds' tie cuts) as in the torch backend's stable sort:
    the same loss and gradients, against its float64 run within 10 times its own fp32 error."""
    inputs, kw = config
    ref = run("torch", round_trip(inputs, torch.float32), torch.float64, "cpu", **kw)  # teacher logits exact
    limits = _limits(inputs, ref, kw)
    errors = _errors(*run("triton", inputs, torch.float32, DEVICE, **kw), *ref)
    assert all(e <= limit for e, limit in zip(errors, limits)), (errors, limits)
