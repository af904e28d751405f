"""The public losses: reference vs torch backend at float64, hand-computed cases, gradcheck,
random-shuffle properties, seeds, chunking and the module."""
import math
from types import SimpleNamespace

import pytest
import torch

import distillcse
from conftest import DEVICE, requires_triton
from distillcse import api, reference
from distillcse.shuffle import group_keys, group_permutation, shuffled_targets
from distillcse.tensor_memory import TensorMemory

F64 = torch.float64


def make_batch(B=37, D=48, dims=(32,), Bh=0, seed=0, dtype=F64):
    """Student views and K teachers whose cosines are positive and clustered, like real ones."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, D, generator=g, dtype=dtype)
    z2 = z1 + 0.3 * torch.randn(B, D, generator=g, dtype=dtype)
    teachers = [torch.randn(1, d, generator=g, dtype=dtype) + 0.8 * torch.randn(B, d, generator=g, dtype=dtype)
                for d in dims]
    hard = torch.randn(Bh, D, generator=g, dtype=dtype) if Bh else None
    return z1, z2, teachers, hard


def loss_and_grads(backend, z1, z2, teachers, hard, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (z1, z2) + ((hard,) if hard is not None else ())]
    loss = distillcse.distillcse_loss(leaves[0], leaves[1], teachers, hard_negatives=leaves[2] if hard is not None else None,
                                      backend=backend, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def rel_err(a, b, floor=1e-6):
    """||a - b|| / ||b||, with ||b|| floored (a loss or gradient of 1e-14 is zero here)."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def assert_torch_matches_reference(z1, z2, teachers, hard, **kw):
    """The torch backend's loss within 1e-12 and its gradients within 1e-9 of the reference's (float64)."""
    ref_loss, ref_grads = loss_and_grads("reference", z1, z2, teachers, hard, **kw)
    loss, grads = loss_and_grads("torch", z1, z2, teachers, hard, **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 1e-12
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-9


@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
@pytest.mark.parametrize("B,D,dims,Bh", [(37, 48, (32,), 0), (37, 48, (32, 20, 40), 11), (130, 96, (64,), 0), (2, 5, (3,), 0)])
def test_torch_backend_matches_reference(shuffle, B, D, dims, Bh):
    z1, z2, teachers, hard = make_batch(B, D, dims, Bh)
    # At B = 2 the default temperature saturates the softmax (loss ~1e-8); use a soft one.
    kw = dict(shuffle=shuffle, seed=7, temperature=1.0 if B == 2 else 0.05)
    if shuffle == "random":
        # Same distribution, different draws: compare with the random shuffle removed from
        # both (group_size=1 gives singleton groups, where random == none exactly).
        kw["group_size"] = 1
    assert_torch_matches_reference(z1, z2, teachers, hard, **kw)


@pytest.mark.parametrize("group_p,group_size,gtemp", [(0.1, None, 1.0), (0.3, None, 1.0), (0.25, None, 0.1), (None, 4, 1.0)])
def test_expected_groupings_match_reference(group_p, group_size, gtemp):
    z1, z2, teachers, _ = make_batch(61, 40, (24, 24))
    kw = dict(shuffle="expected", group_size=group_size, grouping_temperature=gtemp, teacher_weights=[0.25, 0.75])
    if group_p is not None:
        kw["group_p"] = group_p
    assert_torch_matches_reference(z1, z2, teachers, None, **kw)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_teacher_weights_may_be_a_tensor(backend):
    """The weights as a list, a tensor or a list of one-element tensors; the teachers as a list or a tuple."""
    z1, z2, teachers, _ = make_batch(21, 16, (12, 8))
    kw = dict(shuffle="expected", backend=backend)
    as_list = distillcse.distill_loss(z1, teachers, teacher_weights=[0.25, 0.75], **kw)
    as_tensor = distillcse.distill_loss(z1, teachers, teacher_weights=torch.tensor([0.25, 0.75]), **kw)
    as_scalars = distillcse.distill_loss(z1, teachers, teacher_weights=[torch.tensor(0.25), torch.tensor([0.75])], **kw)
    as_tuple = distillcse.distill_loss(z1, tuple(teachers), teacher_weights=[0.25, 0.75], **kw)
    uniform = distillcse.distill_loss(z1, teachers, **kw)
    assert as_tensor.item() == as_list.item() == as_scalars.item() == as_tuple.item()
    assert abs(as_list.item() - uniform.item()) > 1e-6


def test_reference_default_teacher_weights_are_uniform():
    """The reference's own default (its functions called directly; the API always passes the
    weights): 1/K each, t the mean of the teachers' cosines."""
    z1, _, teachers, _ = make_batch(21, 16, (12, 8))
    cos = [reference.cosine_matrix(e, e) for e in teachers]
    torch.testing.assert_close(reference.teacher_logits(teachers), (cos[0] + cos[1]) / 2, rtol=1e-15, atol=0)
    kw = dict(shuffle="expected")
    assert reference.distill_loss(z1, teachers, **kw) == reference.distill_loss(z1, teachers, teacher_weights=[0.5, 0.5], **kw)


def test_reference_defaults_are_the_spec():
    """The reference's own defaults (its functions called directly, as the tests do; the API
    passes every keyword) are SPEC.md's: tau = 0.05, tau_s = 0.025, tau_t = 0.0125, P = 0.1,
    no group size, grouping temperature 1 and the random shuffle."""
    z1, z2, teachers, _ = make_batch(37, 16, (12,))
    spec = dict(student_temperature=0.025, teacher_temperature=0.0125, group_p=0.1, group_size=None,
                grouping_temperature=1.0)
    assert reference.contrastive_loss(z1, z2) == reference.contrastive_loss(z1, z2, temperature=0.05)
    assert reference.distill_loss(z1, teachers, shuffle="expected") == \
        reference.distill_loss(z1, teachers, shuffle="expected", **spec)
    seeded = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert reference.distill_loss(z1, teachers, generator=seeded()) == \
        reference.distill_loss(z1, teachers, shuffle="random", generator=seeded(), **spec)
    t = reference.teacher_logits(teachers).fill_diagonal_(-math.inf).sort(dim=-1, descending=True).values[:, :-1]
    assert torch.equal(reference.group_ids(t), reference.group_ids(t, 0.1, None, 1.0))


@pytest.mark.parametrize("group_p,group_size,gtemp", [(0.3, None, 1.0), (0.1, None, 0.2), (None, 4, 1.0)])
def test_group_ids_are_the_spec_formula(group_p, group_size, gtemp):
    """SPEC section 4 in plain Python floats against ``reference.group_ids``, which the torch
    backend's targets share (so reference vs torch cannot see a mistake in it): the inclusive
    cumulative softmax at the grouping temperature, floor(c / P) capped at G - 1 = ceil(1 / P) - 1
    (P = 0.3: four groups, the last holding c in [0.9, 1]), or floor(r / group_size)."""
    g = torch.Generator().manual_seed(2)
    t = (2 * torch.rand(5, 36, generator=g, dtype=F64) - 1).sort(dim=-1, descending=True).values
    got = reference.group_ids(t, group_p or 0.1, group_size, gtemp).tolist()
    for row, ids in zip(t.tolist(), got):
        if group_size is not None:
            want = [r // group_size for r in range(len(row))]
        else:
            e = [math.exp((v - row[0]) / gtemp) for v in row]
            c = [sum(e[:r + 1]) / sum(e) for r in range(len(e))]
            want = [min(math.floor(x / group_p), math.ceil(1 / group_p) - 1) for x in c]
        assert ids == want
        assert len(set(want)) >= 4 and max(want.count(k) for k in set(want)) > 1  # several groups, not singletons


def test_reference_ranks_tied_teacher_values_in_column_order():
    """Copied sentences tie in every teacher row; where a tie straddles a group boundary the
    reference ranks it in column order (its stable sort), as the torch backend and the kernels
    do, so the expected targets agree (an unstable sort moved the loss 0.2-1%)."""
    z1, z2, teachers, _ = make_batch(37, 16, (12,))
    teachers[0][28:] = teachers[0][:9]
    for grouping in (dict(group_size=4), dict(group_p=0.1)):
        assert_torch_matches_reference(z1, z2, teachers, None, shuffle="expected", **grouping)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_zero_teacher_weight_leaves_that_teacher_out(backend):
    """Weights are >= 0 (SPEC.md), not > 0: [1, 0] is the first teacher alone."""
    z1, _, teachers, _ = make_batch(21, 16, (12, 8))
    kw = dict(shuffle="expected", backend=backend)
    assert distillcse.distill_loss(z1, teachers, teacher_weights=[1.0, 0.0], **kw).item() == pytest.approx(
        distillcse.distill_loss(z1, teachers[:1], **kw).item(), rel=1e-12)


def test_auto_backend(monkeypatch):
    """"auto": the kernels for a whole batch of CUDA fp16 / bf16 / fp32 tensors with triton
    installed, else the torch backend (CPU, float64, a shard of the rows, no triton)."""
    cuda = lambda dtype: SimpleNamespace(is_cuda=True, dtype=dtype, shape=(8, 6))  # noqa: E731 (no GPU needed)
    monkeypatch.setattr(api, "_triton_importable", lambda: True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert api.resolve_backend("auto", cuda(dtype)) == api.resolve_backend("auto", cuda(dtype), (0, 8)) == "triton"
    assert api.resolve_backend("auto", cuda(F64)) == "torch"
    assert api.resolve_backend("auto", cuda(torch.float32), (0, 4)) == "torch"
    assert api.resolve_backend("auto", torch.randn(8, 6)) == "torch"
    monkeypatch.setattr(api, "_triton_importable", lambda: False)
    assert api.resolve_backend("auto", cuda(torch.float32)) == "torch"


def test_contrastive_hand_computed_b2():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    z2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=F64)
    tau, r = 0.05, 1 / math.sqrt(2)
    row1 = math.log(math.exp(1 / tau) + math.exp(r / tau)) - 1 / tau
    row2 = math.log(math.exp(0.0) + math.exp(r / tau)) - r / tau
    for backend in ("reference", "torch"):
        loss = distillcse.contrastive_loss(z1, z2, temperature=tau, backend=backend)
        assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-12)


def test_contrastive_hand_computed_b2_where_a_negative_is_closer():
    """Both rows' negative is closer than their positive (P_ii < 1/2, away from the log1p
    branch, and the row's max is not the positive): loss_i = logsumexp_j(c_ij / tau) - c_ii / tau."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    z2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=F64)
    tau, r = 0.05, 1 / math.sqrt(2)
    row1 = math.log(math.exp(0.0) + math.exp(r / tau)) - 0.0
    row2 = math.log(math.exp(1 / tau) + math.exp(r / tau)) - r / tau
    for backend in ("reference", "torch"):
        loss = distillcse.contrastive_loss(z1, z2, temperature=tau, backend=backend)
        assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-12)


def test_distill_b2_is_zero():
    # One off-diagonal entry per row: the target and the student distribution are both 1.
    z1, _, teachers, _ = make_batch(2, 4, (3,))
    for backend in ("reference", "torch"):
        assert distillcse.distill_loss(z1, teachers, backend=backend).item() == pytest.approx(0.0, abs=1e-12)



def test_distill_leaves_the_diagonal_out_at_any_student_temperature():
    """j != i at any temperature (the diagonal's logit -inf, not a large negative number): at
    tau_s = 1e8 every |s_ij| / tau_s <= 1e-8, so p is uniform over the B - 1 other columns and
    the loss is log(B - 1) within 1e-8 whatever q is; a diagonal left in would give log B."""
    z1, _, teachers, _ = make_batch(9, 16, (12,))  # B = 9
    for backend in ("reference", "torch"):
        loss = distillcse.distill_loss(z1, teachers, student_temperature=1e8, shuffle="none", backend=backend)
        assert loss.item() == pytest.approx(math.log(8), abs=1e-7)

def _softmax2(a, b):
    m = max(a, b)
    ea, eb = math.exp(a - m), math.exp(b - m)
    return ea / (ea + eb), eb / (ea + eb)


@pytest.mark.parametrize("group_p,expected_same_group,grouping_temperature",
                         [(0.1, False, 1.0), (0.5, True, 1.0), (0.5, True, 1e30)])
def test_distill_hand_computed_b3(group_p, expected_same_group, grouping_temperature):
    # B = 3: each row has two off-diagonal entries. With P = 0.5 both fall in the last group
    # (c_1 = pi_1 >= 0.5), so the expected targets are (1/2, 1/2); with P = 0.1 they stay q.
    # At grouping temperature 1e30 the masses are exactly 1/2 each: c = (0.5, 1.0) exactly, and
    # only the clamp min(floor(c / P), G - 1) keeps the second entry in the first one's group.
    s = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]], dtype=F64)
    t = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.6, 0.8]], dtype=F64)
    tau_s, tau_t = 0.025, 0.0125
    total = 0.0
    for i in range(3):
        j, k = [c for c in range(3) if c != i]
        cs = lambda a, b: float(s[a] @ s[b])  # noqa: E731 (unit rows)
        ct = lambda a, b: float(t[a] @ t[b])  # noqa: E731
        p_j, p_k = _softmax2(cs(i, j) / tau_s, cs(i, k) / tau_s)
        q_j, q_k = _softmax2(ct(i, j) / tau_t, ct(i, k) / tau_t)
        if expected_same_group:
            q_j = q_k = 0.5
        total += -(q_j * math.log(p_j) + q_k * math.log(p_k))
    for backend in ("reference", "torch"):
        loss = distillcse.distill_loss(s, t, shuffle="expected", group_p=group_p,
                                       grouping_temperature=grouping_temperature, backend=backend)
        assert loss.item() == pytest.approx(total / 3, rel=1e-10)


def test_gradcheck_torch_backend():
    z1, z2, teachers, hard = make_batch(9, 6, (5, 4), Bh=3)
    leaves = [x.clone().requires_grad_() for x in (z1, z2, hard)]

    def f(a, b, h):
        return distillcse.distillcse_loss(a, b, teachers, hard_negatives=h, shuffle="random", seed=1,
                                          group_p=0.3, backend="torch")
    assert torch.autograd.gradcheck(f, leaves)


def _group_of_each_column(t_row, i, group_p):
    """Group of each column of one teacher row, via the reference grouping."""
    t = t_row.clone()
    t[i] = float("-inf")
    t_sorted, idx = torch.sort(t, descending=True)
    groups = reference.group_ids(t_sorted[None, :-1], group_p)[0]
    out = torch.full_like(idx, -1)
    out[idx[:-1]] = groups
    return out


def test_random_pairing_stays_within_groups():
    _, _, teachers, _ = make_batch(53, 8, (16,))
    T = torch.nn.functional.normalize(teachers[0], dim=-1)
    t = T @ T.T
    rows = torch.arange(53)
    opts = dict(teacher_temperature=0.0125, grouping_temperature=1.0, group_p=0.2, group_size=None)
    q = shuffled_targets(t, rows, shuffle="none", **opts)
    moved = 0
    for seed in range(3):
        q_tilde = shuffled_targets(t, rows, shuffle="random", step_seed=seed, **opts)
        for i in range(53):
            groups = _group_of_each_column(t[i], i, 0.2)
            assert q_tilde[i, i] == 0
            for g in groups.unique().tolist():
                if g < 0:
                    continue
                cols = groups == g
                assert torch.allclose(q_tilde[i, cols].sort().values, q[i, cols].sort().values, rtol=1e-12, atol=0)
            moved += int((q_tilde[i] != q[i]).sum())
    assert moved > 0  # the shuffle does permute


def test_random_shuffle_keys_each_group_by_its_id_past_empty_groups():
    """SPEC section 5 keys a group's permutation by hash(seed, row, group) with the group's id.
    Where a row's top logits hold more than group_p of the mass, the ids skip the empty groups,
    and the [R, G] tables' dense numbering differs from them: the keys take the ids (as the
    kernels' tables do), checked against the definition written out column by column."""
    g = torch.Generator().manual_seed(6)
    B, seed, rows = 14, 77, torch.tensor([3, 0, 9, 13])
    t = torch.randn(len(rows), B, generator=g, dtype=F64)
    t[:, 5] += 3.0                                                 # a top column holding most of the mass
    opts = dict(teacher_temperature=0.5, grouping_temperature=0.5, group_p=0.15, group_size=None)
    got = shuffled_targets(t, rows, shuffle="random", step_seed=seed, **opts)
    q = shuffled_targets(t, rows, shuffle="none", **opts)
    skipped = 0
    for r, row in enumerate(rows.tolist()):
        masked = t[r].clone()
        masked[row] = float("-inf")
        t_sorted, idx = torch.sort(masked, descending=True, stable=True)
        ids = reference.group_ids(t_sorted[None, :-1], opts["group_p"], None, opts["grouping_temperature"])[0]
        group_of = {int(c): int(i) for c, i in zip(idx[:-1], ids)}
        skipped += len(set(group_of.values())) < max(group_of.values()) + 1
        want = torch.zeros(B, dtype=F64)
        for gid in set(group_of.values()):
            members = sorted(c for c, i in group_of.items() if i == gid)   # ranked in column order
            key = group_keys(seed, torch.tensor(row), torch.tensor(gid))
            n = torch.tensor(len(members))
            for rank, c in enumerate(members):
                want[c] = q[r, members[int(group_permutation(torch.tensor(rank), n, key))]]
        torch.testing.assert_close(got[r], want, rtol=1e-12, atol=0, msg=f"row {row}")
    assert skipped >= 2                                            # rows whose group ids skip empty groups


def test_random_mode_averages_to_expected():
    z1, _, teachers, _ = make_batch(11, 8, (6,))
    kw = dict(group_p=0.25, backend="torch")
    expected = distillcse.distill_loss(z1, teachers, shuffle="expected", **kw).item()
    for backend in ("torch", "reference"):
        samples = torch.tensor([distillcse.distill_loss(z1, teachers, shuffle="random", seed=s, **dict(kw, backend=backend)).item()
                                for s in range(400)], dtype=F64)
        stderr = samples.std().item() / math.sqrt(len(samples))
        assert samples.std().item() > 0
        assert abs(samples.mean().item() - expected) < 5 * stderr + 1e-12


def test_reference_random_shuffle_draws_every_permutation_of_a_group_uniformly():
    """SPEC section 5: phi_i is a uniformly random permutation of each group. At B = 4 and
    group_p = 1 (one group) row 0's three targets are permuted; its share of the loss takes one
    of 3! = 6 values, one per permutation, each drawn 1/6 of the time (chi-square). The
    average over draws cannot see this: any shuffle whose marginals are uniform (a random
    cyclic shift: 3 of the 6) has the expected mode as its mean."""
    z1, _, teachers, _ = make_batch(4, 6, (5,))
    g = torch.Generator().manual_seed(11)
    draws = 900
    values = [round(reference.distill_loss(z1, teachers, group_p=1.0, generator=g, rows=(0, 1)).item(), 12)
              for _ in range(draws)]
    counts = torch.tensor([values.count(v) for v in set(values)], dtype=F64)
    assert len(counts) == 6, sorted(set(values))
    chi2 = ((counts - draws / 6) ** 2 / (draws / 6)).sum().item()
    assert chi2 < 25.74  # chi-square's 1 - 1e-4 quantile at df = 5: p < 1e-4 under uniformity


def test_same_seed_same_result_and_generator_seed():
    z1, z2, teachers, _ = make_batch(37, 16, (12,))
    a = loss_and_grads("torch", z1, z2, teachers, None, seed=123)
    b = loss_and_grads("torch", z1, z2, teachers, None, seed=123)
    c = loss_and_grads("torch", z1, z2, teachers, None, seed=124)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    assert not torch.equal(a[0], c[0])
    g1 = loss_and_grads("torch", z1, z2, teachers, None, seed=torch.Generator().manual_seed(5))
    g2 = loss_and_grads("torch", z1, z2, teachers, None, seed=torch.Generator().manual_seed(5))
    assert torch.equal(g1[0], g2[0])
    r1 = distillcse.distill_loss(z1, teachers, seed=9, backend="reference")
    r2 = distillcse.distill_loss(z1, teachers, seed=9, backend="reference")
    assert torch.equal(r1, r2)


def test_module_draws_a_fresh_reproducible_shuffle_each_call():
    z1, z2, teachers, _ = make_batch(37, 16, (12,))
    first = distillcse.DistillCSELoss(seed=5, backend="torch")
    second = distillcse.DistillCSELoss(seed=5, backend="torch")
    a = [first(z1, z2, teachers).item() for _ in range(3)]
    b = [second(z1, z2, teachers).item() for _ in range(3)]
    assert a == b and len(set(a)) == 3
    assert repr(first) == "DistillCSELoss(seed=5, backend='torch')"  # the seed given, not its generator


def test_chunking_does_not_change_results():
    z1, z2, teachers, hard = make_batch(70, 24, (16, 8), Bh=5)
    whole = loss_and_grads("torch", z1, z2, teachers, hard, shuffle="random", seed=4)
    with distillcse.chunk_budget(0.001):  # ~1 KiB: one row per chunk
        rows = loss_and_grads("torch", z1, z2, teachers, hard, shuffle="random", seed=4)
    assert rel_err(rows[0], whole[0]) < 1e-13
    for g, w in zip(rows[1], whole[1]):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
def test_shares_in_ragged_chunks_are_the_unchunked_shares(shuffle):
    """A share of the rows that the chunk budget cuts into chunks with a shorter last one (here
    19 rows in 15 + 4, 11 + 8, 7 + 7 + 5 or 2-row chunks) has the loss and gradients of the same
    share in one chunk: its last chunk stops at the share's end, not at the batch's (rows past
    it would add their gradients to the share's)."""
    z1, z2, teachers, hard = make_batch(37, 24, (16, 20), Bh=5)
    for rows in ((0, 6), (6, 25), (25, 37)):
        kw = dict(shuffle=shuffle, seed=3, group_p=0.2, rows=rows)
        whole = loss_and_grads("torch", z1, z2, teachers, hard, **kw)
        with distillcse.chunk_budget(0.02):  # 20,971 bytes
            chunked = loss_and_grads("torch", z1, z2, teachers, hard, **kw)
        assert rel_err(chunked[0], whole[0]) < 1e-13
        for g, w in zip(chunked[1], whole[1]):
            assert rel_err(g, w) < 1e-12


def test_a_chunk_budget_below_one_teacher_row():
    """A budget smaller than one row's temporaries (104 bytes; a 48-wide teacher row's are 1,152)
    still writes the teachers' unit rows a row at a time: the same loss and gradients."""
    z1, z2, teachers, hard = make_batch(21, 16, (48, 40), Bh=3)
    whole = loss_and_grads("torch", z1, z2, teachers, hard, shuffle="expected")
    with distillcse.chunk_budget(1e-4):
        rows = loss_and_grads("torch", z1, z2, teachers, hard, shuffle="expected")
    assert rel_err(rows[0], whole[0]) < 1e-13
    for g, w in zip(rows[1], whole[1]):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_contrastive_gradients_with_z1_frozen(backend):
    """z1 frozen (a cached or teacher-side view) and z2, the hard negatives trainable: their
    gradients are computed all the same (float64 autograd of SPEC's formula, within 1e-9)."""
    z1, z2, _, hard = make_batch(37, 48, (32,), Bh=5)  # z1 [37, 48] without requires_grad
    leaves = [x.clone().requires_grad_() for x in (z2, hard)]
    loss = distillcse.contrastive_loss(z1, *leaves[:1], hard_negatives=leaves[1], backend=backend)
    grads = torch.autograd.grad(loss, leaves)
    y = torch.nn.functional.normalize(torch.cat(leaves), dim=-1)
    logits = torch.nn.functional.normalize(z1, dim=-1) @ y.T / 0.05  # [37, 42]
    want = torch.nn.functional.cross_entropy(logits, torch.arange(37))
    for g, w in zip(grads, torch.autograd.grad(want, leaves)):
        assert rel_err(g, w) < 1e-9


def test_zero_vectors_behave_like_cosine_similarity():
    z1, z2, teachers, _ = make_batch(9, 6, (5,))
    z1[3] = 0
    teachers[0][4] = 0
    cos = torch.nn.functional.cosine_similarity(z1[:, None], z2[None], dim=-1)
    assert torch.allclose(reference.cosine_matrix(z1, z2), cos)
    for backend in ("reference", "torch"):
        loss, grads = loss_and_grads(backend, z1, z2, teachers, None, shuffle="expected")
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert rel_err(loss_and_grads("torch", z1, z2, teachers, None, shuffle="expected")[0],
                   loss_and_grads("reference", z1, z2, teachers, None, shuffle="expected")[0]) < 1e-12


def test_cosine_clamps_each_norm_at_eps_1e_8():
    """SPEC's ``cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps))`` with eps = 1e-8 exactly: a row
    of norm 1e-6 (above eps) keeps its true cosines, one of norm 1e-12 (below) is divided by
    1e-8, on both sides of the matrix. The zero-row test cannot see eps: 0 / eps is 0 for any."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.nn.functional.normalize(torch.randn(n, 6, generator=g, dtype=F64), dim=-1) for n in (5, 7))
    cos = a @ b.T
    scale_a = torch.tensor([1.0, 1e-6, 1e-12, 2.0, 1e-9], dtype=F64)[:, None]
    scale_b = torch.tensor([1e-12, 1e-6, 3.0, 1.0, 1e-7, 1e-10, 1.0], dtype=F64)[:, None]
    want = cos * (scale_a / scale_a.clamp_min(1e-8)) * (scale_b / scale_b.clamp_min(1e-8)).T
    torch.testing.assert_close(reference.cosine_matrix(scale_a * a, scale_b * b), want, rtol=1e-13, atol=0)
    assert want[2, 2].item() == pytest.approx(1e-4 * cos[2, 2].item(), rel=1e-13)  # 1e-12 / 1e-8


def test_distillcse_loss_defaults_are_the_spec():
    """Every default of the three functions and the module is SPEC.md's."""
    z1, z2, teachers, _ = make_batch(37, 16, (12,))
    explicit = dict(temperature=0.05, distill_weight=1.0, student_temperature=0.025, teacher_temperature=0.0125,
                    group_p=0.1, group_size=None, grouping_temperature=1.0, shuffle="random", seed=3)
    distill = {k: v for k, v in explicit.items() if k not in ("temperature", "distill_weight")}
    for backend in ("reference", "torch"):
        assert distillcse.contrastive_loss(z1, z2, backend=backend).item() == \
            distillcse.contrastive_loss(z1, z2, temperature=0.05, backend=backend).item()
        assert distillcse.distill_loss(z1, teachers, seed=3, backend=backend).item() == \
            distillcse.distill_loss(z1, teachers, backend=backend, **distill).item()
        default = distillcse.distillcse_loss(z1, z2, teachers, seed=3, backend=backend)
        assert default.item() == distillcse.distillcse_loss(z1, z2, teachers, backend=backend, **explicit).item()
        module = distillcse.DistillCSELoss(shuffle="expected", backend=backend)(z1, z2, teachers)
        assert module.item() == distillcse.distillcse_loss(z1, z2, teachers, backend=backend,
                                                           **dict(explicit, shuffle="expected")).item()


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=requires_triton)])
def test_default_teacher_weights_average_the_teachers(backend):
    """The default weights are 1 / K: K copies of one teacher average to that teacher's cosines."""
    z1, _, teachers, _ = make_batch(21, 16, (12,))
    z1, teachers = z1.float().to(DEVICE), [t.float().to(DEVICE) for t in teachers]
    kw = dict(shuffle="expected", backend=backend)
    one = distillcse.distill_loss(z1, teachers, **kw)
    two = distillcse.distill_loss(z1, teachers * 2, **kw)
    assert two.item() == pytest.approx(one.item(), rel=1e-5)


def test_distill_only_and_weight():
    z1, z2, teachers, _ = make_batch(21, 8, (6,))
    kd = distillcse.distill_loss(z1, teachers, shuffle="none", backend="torch")
    cl = distillcse.contrastive_loss(z1, z2, backend="torch")
    both = distillcse.distillcse_loss(z1, z2, teachers, shuffle="none", distill_weight=0.5, backend="torch")
    only = distillcse.distillcse_loss(z1, z2, teachers, shuffle="none", distill_only=True, backend="torch")
    assert both.item() == pytest.approx(cl.item() + 0.5 * kd.item(), rel=1e-12)
    assert only.item() == pytest.approx(kd.item(), rel=1e-12)
    half = distillcse.distillcse_loss(z1, z2, teachers, shuffle="none", distill_only=True, distill_weight=0.5,
                                      backend="torch")
    assert half.item() == pytest.approx(0.5 * kd.item(), rel=1e-12)


def test_deterministic_shuffles_leave_torchs_generator_alone():
    """shuffle="none" / "expected" draw no shuffle key: torch's global RNG (the model's dropout)
    is where it was; the random shuffle draws its key there."""
    z1, z2, teachers, _ = make_batch(21, 8, (6,))
    state = torch.get_rng_state()
    for backend in ("reference", "torch"):
        for shuffle in ("none", "expected"):
            distillcse.distillcse_loss(z1, z2, teachers, shuffle=shuffle, backend=backend)
            assert torch.equal(torch.get_rng_state(), state)
    distillcse.distill_loss(z1, teachers, backend="torch")
    assert not torch.equal(torch.get_rng_state(), state)


def test_half_precision_inputs_on_torch_backend():
    z1, z2, teachers, _ = make_batch(37, 48, (32,))
    ref = distillcse.distillcse_loss(z1, z2, teachers, shuffle="expected", backend="reference")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        a, b = z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_()
        loss = distillcse.distillcse_loss(a, b, [t.to(dtype) for t in teachers], shuffle="expected", backend="torch")
        loss.backward()
        assert a.grad.dtype == dtype and torch.isfinite(a.grad.float()).all()
        assert abs(loss.item() - ref.item()) / ref.item() < (1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_computes_half_precision_inputs_in_fp32(dtype):
    """The reference backend takes fp16 / bf16 inputs in fp32, as the others accumulate: an fp32
    loss equal to the float64 one on the same rounded inputs, and an all-zero row's cosines 0.
    It computed in the inputs' dtype: 2e-4 to 5e-4 off, and in fp16 (where eps = 1e-8 is 0) a
    NaN contrastive term and a distillation of -0.0 (its nansum over NaN)."""
    z1, z2, teachers, hard = make_batch(37, 48, (32, 20), Bh=5)
    z1[4] = 0.0
    inputs = [x.to(dtype) for x in (z1, z2, hard)]
    teachers = [t.to(dtype) for t in teachers]
    want, want_grads = loss_and_grads("reference", *[x.double() for x in inputs[:2]], [t.double() for t in teachers],
                                      inputs[2].double(), shuffle="expected")
    loss, grads = loss_and_grads("reference", *inputs[:2], teachers, inputs[2], shuffle="expected")
    assert loss.dtype == torch.float32
    assert rel_err(loss.double(), want) < 1e-6
    rows = torch.arange(37) != 4  # the zero row's gradient is ~1/eps = 1e8: beyond fp16
    checked = 3 if dtype == torch.bfloat16 else 1  # fp16: z2's and the hard negatives' (~1e-8) are subnormal
    grads, want_grads = [grads[0][rows], *grads[1:checked]], [want_grads[0][rows], *want_grads[1:checked]]
    for grad, want_grad in zip(grads, want_grads):
        assert grad.dtype == dtype and rel_err(grad.double(), want_grad) < 1e-2

@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fp16_gradients_beyond_its_range_are_inf_not_nan(backend):
    """Rows of norm ~4e-6 in fp16 have gradients ~1e6, beyond fp16: z1's comes out +-Inf there, as
    on the triton backend, not NaN. Its two terms' gradients were each cast to fp16 and then
    summed, Inf - Inf."""
    g = torch.Generator().manual_seed(5)
    z1, z2 = ((1e-6 * torch.randn(8, 16, generator=g)).half().requires_grad_() for _ in range(2))
    t = torch.randn(8, 12, generator=g).half()
    loss = distillcse.distillcse_loss(z1, z2, t, shuffle="none", backend=backend)
    grad, = torch.autograd.grad(loss, z1)
    assert torch.isfinite(loss) and grad.isinf().any() and not grad.isnan().any()


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_group_permutation_is_uniform_over_all_permutations(n):
    # Chi-square over the n! permutations from 1000 n! keys: a poorly mixing network (8 Feistel
    # rounds instead of 24 gives total variation 0.06 at n = 5) lands in the thousands.
    keys = group_keys(2024, torch.arange(1000 * math.factorial(n)), torch.tensor(3))[:, None]
    x = torch.arange(n).expand(len(keys), n)
    perms = group_permutation(x, torch.full_like(x, n), keys)
    assert torch.equal(perms.sort(dim=1).values, x)
    codes = (perms * n ** torch.arange(n)).sum(1)
    counts = torch.unique(codes, return_counts=True)[1].double()
    assert len(counts) == math.factorial(n)
    expected = len(keys) / math.factorial(n)
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = math.factorial(n) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df) + 6  # p < 1e-4 under uniformity


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_autocast_leaves_the_loss_in_full_precision(backend):
    """Under torch.autocast the losses compute as they do outside it (the torch backend
    crashed: its chunks' bf16 products met fp32 buffers)."""
    g = torch.Generator().manual_seed(4)
    z1, z2, hn = (torch.randn(n, 16, generator=g).requires_grad_(True) for n in (20, 20, 5))
    t = [torch.randn(20, 8, generator=g), torch.randn(20, 12, generator=g)]
    want = distillcse.distillcse_loss(z1, z2, t, hard_negatives=hn, seed=1, backend=backend)
    want_grads = torch.autograd.grad(want, (z1, z2, hn))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distillcse.distillcse_loss(z1, z2, t, hard_negatives=hn, seed=1, backend=backend)
        terms = (distillcse.contrastive_loss(z1, z2, backend=backend),
                 distillcse.distill_loss(z1, t, seed=1, backend=backend))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want)
    for grad, want_grad in zip(torch.autograd.grad(loss, (z1, z2, hn)), want_grads):
        torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(terms[0], distillcse.contrastive_loss(z1, z2, backend=backend))
    torch.testing.assert_close(terms[1], distillcse.distill_loss(z1, t, seed=1, backend=backend))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_inside_torch_compile_the_losses_run_eagerly(backend):
    """A compiled step calling the losses gets the eager losses and gradients, and the compiler
    sees only the step's own work: the losses are a graph break (Inductor's CPU code failed to
    build on the torch backend's random shuffle). The recording compiler below runs each graph
    as it was traced."""
    g = torch.Generator().manual_seed(6)
    z1, z2, hn = (torch.randn(n, 16, generator=g) for n in (20, 20, 5))
    t = [torch.randn(20, 8, generator=g), torch.randn(20, 12, generator=g)]

    def step(a, b, h):
        e1, e2 = 2.0 * a, b + 0.5  # the step's own work, for the compiler to trace
        return (distillcse.distillcse_loss(e1, e2, t, hard_negatives=h, seed=5, backend=backend)
                + distillcse.contrastive_loss(e1, e2, backend=backend)
                + distillcse.distill_loss(e1, t, shuffle="expected", backend=backend)
                + distillcse.DistillCSELoss(seed=5, backend=backend)(e1, e2, t))

    traced = []

    def recording_compiler(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    results = []
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, backend=recording_compiler)):
        leaves = [x.clone().requires_grad_() for x in (z1, z2, hn)]
        loss = fn(*leaves)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    torch._dynamo.reset()
    assert traced and set(traced) <= {"<built-in function mul>", "<built-in function add>"}, traced
    for compiled, eager in zip(results[1], results[0]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=requires_triton)])
def test_a_tiny_group_p_costs_what_singleton_groups_do(backend):
    """group_p = 1e-7 allows 10^7 groups, of which at most B - 1 hold an entry (here every
    entry is its own group: the loss is plain distillation). The tables were [rows, G]: at
    B = 48 the torch backend held ~1 GiB (a 64 GB allocation at 1e-9), and the one-program
    kernel looped over every group for minutes; now they are numbered densely per row."""
    g = torch.Generator().manual_seed(6)
    z, t = torch.randn(48, 12, generator=g).to(DEVICE), torch.randn(48, 10, generator=g).to(DEVICE)
    plain = distillcse.distill_loss(z, t, shuffle="none", backend=backend)
    for shuffle in ("expected", "random"):
        with TensorMemory() as mem:
            loss = distillcse.distill_loss(z, t, group_p=1e-7, shuffle=shuffle, seed=2, backend=backend)
        torch.testing.assert_close(loss, plain)
        assert mem.peak < 2**20, (shuffle, mem.peak)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=requires_triton)])
def test_groupings_beyond_int64(backend):
    """Any group_p down to the smallest float gives singleton groups, and any group_size one group:
    the group ids are int64. Below group_p = 1e-19 every backend crashed deep inside (an int64
    overflow), and group_size >= 2^63 wrapped to a negative divisor: two groups, silently."""
    g = torch.Generator().manual_seed(7)
    z, t = torch.randn(48, 12, generator=g).to(DEVICE), torch.randn(48, 10, generator=g).to(DEVICE)
    plain = distillcse.distill_loss(z, t, shuffle="none", backend=backend)
    one_group = distillcse.distill_loss(z, t, group_p=1.0, shuffle="expected", backend=backend)
    for group_p in (1e-19, 1e-30, 5e-324):
        torch.testing.assert_close(distillcse.distill_loss(z, t, group_p=group_p, shuffle="expected",
                                                           backend=backend), plain)
    for group_size in (2**63 - 1, 2**63, 10**30):
        torch.testing.assert_close(distillcse.distill_loss(z, t, group_size=group_size, shuffle="expected",
                                                           backend=backend), one_group)


def test_module_state_dict_resumes_the_shuffle_sequence():
    """A checkpoint of DistillCSELoss(seed=int) holds its generator, so a resumed run draws the
    shuffles the uninterrupted one would have (its state_dict was empty)."""
    g = torch.Generator().manual_seed(8)
    z1, z2, t = (torch.randn(24, 10, generator=g) for _ in range(3))
    criterion = distillcse.DistillCSELoss(seed=5, backend="torch")
    first = criterion(z1, z2, t)
    state = criterion.state_dict()
    want = [criterion(z1, z2, t) for _ in range(2)]
    resumed = distillcse.DistillCSELoss(seed=5, backend="torch")
    resumed.load_state_dict(state)
    assert [resumed(z1, z2, t) for _ in range(2)] == want
    with pytest.raises(ValueError, match="has no generator seed"):
        distillcse.DistillCSELoss(backend="torch").load_state_dict(state)
    seeded = distillcse.DistillCSELoss(seed=5, backend="torch")  # a state without a generator leaves its own
    seeded.load_state_dict(distillcse.DistillCSELoss(backend="torch").state_dict())
    assert seeded(z1, z2, t) == first


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
def test_shares_of_a_partition_of_the_rows_sum_to_the_loss(backend, shuffle):
    """``rows=(start, stop)``: each of the three losses' shares over a partition of the rows (an
    empty share among them) sum to the whole batch's loss, terms and gradients (at float64, the
    random shuffle's rows keyed as in the whole batch)."""
    z1, z2, teachers, hard = make_batch(37, 24, (16, 20), Bh=5)
    cuts = [0, 6, 6, 25, 37]
    kw = dict(shuffle=shuffle, seed=3, group_p=0.2, backend=backend)
    calls = [(distillcse.distillcse_loss, (z1, z2, teachers), dict(kw, hard_negatives=hard, distill_weight=0.5)),
             (distillcse.contrastive_loss, (z1, z2), dict(backend=backend, hard_negatives=hard)),
             (distillcse.distill_loss, (z1, teachers), kw)]
    for loss_fn, (x, *rest), kwargs in calls:
        leaves = [x.detach().clone().requires_grad_()] + [r.detach().clone().requires_grad_() if torch.is_tensor(r) else r
                                                          for r in rest]
        grads_of = [v for v in leaves if torch.is_tensor(v)]
        whole = loss_fn(*leaves, **kwargs)
        whole_grads = torch.autograd.grad(whole, grads_of)
        shares = [loss_fn(*leaves, rows=(a, b), **kwargs) for a, b in zip(cuts[:-1], cuts[1:])]
        assert shares[1] == 0
        total = sum(shares)
        torch.testing.assert_close(total, whole, rtol=1e-13, atol=0, msg=loss_fn.__name__)
        for g, want in zip(torch.autograd.grad(total, grads_of), whole_grads):
            torch.testing.assert_close(g, want, rtol=1e-11, atol=1e-15, msg=loss_fn.__name__)
    _, terms = distillcse.distillcse_loss(z1, z2, teachers, return_terms=True, **kw)
    parts = [distillcse.distillcse_loss(z1, z2, teachers, rows=(a, b), return_terms=True, **kw)[1]
             for a, b in zip(cuts[:-1], cuts[1:])]
    for name in ("contrastive", "distill"):
        torch.testing.assert_close(sum(p[name] for p in parts), terms[name], rtol=1e-13, atol=0)
    if shuffle != "random":  # the module draws a new shuffle each call
        module = distillcse.DistillCSELoss(shuffle=shuffle, backend=backend)
        torch.testing.assert_close(module(z1, z2, teachers, rows=(0, 20)) + module(z1, z2, teachers, rows=(20, 37)),
                                   module(z1, z2, teachers), rtol=1e-13, atol=0)


def test_reference_int_seeds_use_all_64_bits():
    """The reference's CPU generator keeps a seed's low 32 bits: seeds 0, 2^32 and 2^40 drew one
    shuffle. Seeds past 32 bits are hashed to 32; those below are taken as they are."""
    z1, _, teachers, _ = make_batch(40, 16, (12,))
    kw = dict(shuffle="random", group_p=0.5, backend="reference")
    losses = [distillcse.distill_loss(z1, teachers, seed=s, **kw).item() for s in (0, 2**32, 2**40, 2**64 - 1)]
    assert len(set(losses)) == 4, losses
    g = torch.Generator().manual_seed(7)
    assert distillcse.distill_loss(z1, teachers, seed=7, **kw) == distillcse.distill_loss(z1, teachers, seed=g, **kw)


@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA torch.Generator needs a GPU")
def test_reference_takes_a_cuda_generator():
    """The reference's randperm calls run on the CPU: a CUDA generator seeds a CPU one with 62
    bits it draws (a CUDA generator handed to them raised). Same seed, same loss; each call
    advances the generator."""
    z1, _, teachers, _ = make_batch(40, 16, (12,))
    z1, teachers = z1.to(DEVICE), [e.to(DEVICE) for e in teachers]
    kw = dict(shuffle="random", group_p=0.5, backend="reference")
    seeded = lambda: torch.Generator(device=DEVICE).manual_seed(3)  # noqa: E731
    assert distillcse.distill_loss(z1, teachers, seed=seeded(), **kw) == distillcse.distill_loss(z1, teachers, seed=seeded(), **kw)
    g = seeded()
    assert len({distillcse.distill_loss(z1, teachers, seed=g, **kw).item() for _ in range(3)}) == 3
