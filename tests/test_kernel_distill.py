"""kernels/distill.py against naive float64 PyTorch formulas (SPEC sections 2-6), and its random
shuffle against distillcse.shuffle's definition."""
import math
import re

import pytest
import torch

import distillcse

from conftest import DEVICE, device_key

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from distillcse.kernels import utils  # noqa: E402
from distillcse.kernels.distill import _group_permutation  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
STUDENT, TEACHER, GROUPING = 1 / 0.025, 1 / 0.0125, 1 / 0.7
N_GROUPS = 10
BIG = 1 << 30  # one slab for the row statistics at these sizes


def _inputs(B, D, Dt, dtype, device, *, teacher="raw", t_dtype=None, zero_row=False,
            zero_teacher_row=False, strided=False, seed=0):
    """Student rows x [B, D] and inverse norms rx [B]; teacher rows t [B, Dt] in ``t_dtype``
    (x's by default) and inverse norms rt [B] fp32: one teacher's raw rows with norms spread
    over 1/5..5 (``teacher="raw"``), or two of weight 1/2 as the backend passes them
    (``"concatenated"``: unit rows side by side, rt = 1). ``strided``: x and t column slices of
    wider tensors (row strides D + 7 and Dt + 5), rx and rt of stride 2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    k = Dt // 2
    e1 = x[:, :1].repeat(1, k) + torch.randn(B, k, generator=gen)  # teacher 1 agrees a little
    e2 = torch.randn(B, Dt - k, generator=gen)
    if teacher == "raw":
        t = torch.cat([e1, e2], dim=1) * 5.0 ** (2 * torch.rand(B, 1, generator=gen) - 1)
    else:
        t = torch.cat([e / e.norm(dim=1, keepdim=True) for e in (e1, e2)], dim=1) * math.sqrt(0.5)
    if zero_row:
        x[B // 2] = 0.0
    if zero_teacher_row:
        t[B // 3] = 0.0
    x, t = x.to(dtype), t.to(t_dtype or dtype)
    rx = 1.0 / x.float().norm(dim=1).clamp_min(1e-8)
    rt = 1.0 / t.float().norm(dim=1).clamp_min(1e-8) if teacher == "raw" else torch.ones(B)
    x, rx, t, rt = (v.to(device) for v in (x, rx, t, rt))
    if strided:  # views made on the device (a copy there would be contiguous)
        x = torch.cat([x, x.new_ones(B, 7)], dim=1)[:, :D]
        t = torch.cat([t.new_ones(B, 3), t, t.new_ones(B, 2)], dim=1)[:, 3:3 + Dt]
        rx, rt = (torch.stack([r, torch.ones_like(r)], dim=1)[:, 0] for r in (rx, rt))
        assert not any(v.is_contiguous() for v in (x, t, rx, rt))
    return x, rx, t, rt


def _teacher_logits(t, rt):
    """float64 t_ij = (t_i . t_j) rt_i rt_j [B, B]."""
    v = t.double() * rt.double()[:, None]
    return v @ v.T


def _logits(x, rx, t, rt):
    """float64 (u, s, t, off-diagonal mask)."""
    u = x.double() * rx.double()[:, None]
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return u, u @ u.T, _teacher_logits(t, rt), off


def _groups(tt):
    """(thr [B, G-1], qbar [B, G]) in fp32 from float64 teacher logits ``tt`` [B, B]: thresholds
    halfway between neighbouring sorted off-diagonal t (so fp32 rounding of t cannot move an
    entry across), qbar = group means of q."""
    B = tt.shape[0]
    off = ~torch.eye(B, dtype=torch.bool, device=tt.device)
    vals = tt[off].view(B, B - 1).sort(dim=1, descending=True).values
    ext = torch.cat([vals[:, :1] + 0.5, vals, vals[:, -1:] - 0.5], dim=1)  # [B, B + 1]
    cut = [min(B - 1, (g + 1) * (B - 1) // N_GROUPS) for g in range(N_GROUPS - 1)]
    thr = torch.stack([(ext[:, c] + ext[:, c + 1]) / 2 for c in cut], dim=1).float()
    q = torch.softmax((TEACHER * tt).masked_fill(~off, -math.inf), dim=1)
    grp = (tt[:, :, None] < thr.double()[:, None, :]).sum(-1)
    onehot = torch.nn.functional.one_hot(grp, N_GROUPS).double() * off[:, :, None]
    qbar = (q[:, :, None] * onehot).sum(1) / onehot.sum(1).clamp_min(1)
    return thr, qbar.float()


def _through_unit_rows(du, x):
    """float64 dL/dx from dL/du for u = x / max(|x|, 1e-8)."""
    x = x.double().cpu()
    r = 1.0 / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    u = x * r
    return r * (du - u * (u * du).sum(1, keepdim=True))


def _reference(x, rx, t, rt, thr=None, qbar=None):
    """float64 (lse_s, lse_t, lse_g, t_min, t_max, loss_rows, dx = d(sum loss_rows)/dx) from
    B x B matrices."""
    u, s, tt, off = _logits(x, rx, t, rt)
    neg = lambda a: a.masked_fill(~off, -math.inf)  # noqa: E731
    lse_s, lse_t, lse_g = (torch.logsumexp(neg(c * m), 1)
                           for c, m in ((STUDENT, s), (TEACHER, tt), (GROUPING, tt)))
    t_min = tt.masked_fill(~off, math.inf).min(1).values
    t_max = neg(tt).max(1).values
    if thr is None:
        q = torch.softmax(neg(TEACHER * tt), dim=1)
    else:
        grp = (tt[:, :, None] < thr.double()[:, None, :]).sum(-1)
        q = qbar.double().gather(1, grp).masked_fill(~off, 0.0)
    u = u.detach().requires_grad_()
    log_p = torch.log_softmax(neg(STUDENT * (u @ u.T)), dim=1).masked_fill(~off, 0.0)
    loss_rows = -(q * log_p).sum(1)
    loss_rows.sum().backward()
    return lse_s, lse_t, lse_g, t_min, t_max, loss_rows.detach(), _through_unit_rows(u.grad.cpu(), x).to(u.device)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(name, out, ref, tol, dtype=torch.float32):
    assert out.shape == ref.shape and out.dtype == dtype, name
    assert torch.isfinite(out).all(), f"{name} has non-finite entries (unwritten output?)"
    assert _rel(out, ref) <= tol, f"{name}: relative error {_rel(out, ref):.2e} > {tol:.0e}"


def _run_and_check(x, rx, t, rt, shuffle, tol, **kw):
    from distillcse.kernels.distill import distill_loss_and_grad, distill_row_stats

    thr, qbar = _groups(_teacher_logits(t, rt)) if shuffle == "expected" else (None, None)
    tables = (thr, qbar)
    if kw.pop("strided_groups", False) and shuffle == "expected":  # column slices of wider tensors
        tables = tuple(torch.cat([a, a.new_full((len(a), 3), 7.0)], 1)[:, :a.shape[1]] for a in tables)
    stats = distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    loss, dx = distill_loss_and_grad(x, rx, t, rt, stats[0], stats[1], STUDENT, TEACHER, shuffle=shuffle,
                                     thr=tables[0], qbar=tables[1], budget_bytes=kw.pop("budget_bytes", 1 << 20),
                                     **kw)
    refs = _reference(x, rx, t, rt, thr, qbar)
    names = ("lse_s", "lse_t", "lse_g", "t_min", "t_max", "loss_rows", "dx")
    for name, out, ref in zip(names, (*stats, loss, dx), refs):
        _check(name, out, ref, tol, dtype=x.dtype if name == "dx" else torch.float32)


@pytest.mark.parametrize("shuffle", ["none", "expected"])
@pytest.mark.parametrize("teacher", ["raw", "concatenated"])
@pytest.mark.parametrize("B,D,Dt", [(37, 48, 32), (130, 96, 80)])
def test_distill_matches_naive(B, D, Dt, teacher, shuffle, device):
    x, rx, t, rt = _inputs(B, D, Dt, torch.float32, device, teacher=teacher)
    _run_and_check(x, rx, t, rt, shuffle, TOL[torch.float32])


@pytest.mark.parametrize("shuffle", ["none", "expected"])
def test_distill_slabs_and_chunks(shuffle, device):
    """Three slabs (64 + 64 + 2 rows) of three column chunks give the same loss and gradient."""
    x, rx, t, rt = _inputs(130, 96, 80, torch.float32, device)
    _run_and_check(x, rx, t, rt, shuffle, TOL[torch.float32], budget_bytes=130 * 4 * 64, chunks=3)


@pytest.mark.parametrize("shuffle", ["none", "expected"])
def test_distill_noncontiguous_zero_rows(shuffle, device):
    """Strided x, rx and rt, teacher rows sliced out of a wider tensor (row stride Dt + 5), an
    all-zero student row and an all-zero teacher row (rt = 1e8, t = 0 on its row and column);
    with shuffle expected, thr and qbar sliced out of wider tensors too (row strides G + 2, G + 3)."""
    x, rx, t, rt = _inputs(37, 48, 32, torch.float32, device, zero_row=True, zero_teacher_row=True, strided=True)
    assert t.stride() == (32 + 5, 1)
    _run_and_check(x, rx, t, rt, shuffle, TOL[torch.float32], strided_groups=True)


@pytest.mark.parametrize("shuffle", ["none", "expected"])
@pytest.mark.parametrize("dtype,t_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float32)],
                         ids=["fp16-fp32", "fp32-fp16", "bf16-fp32"])
def test_distill_teacher_in_another_dtype(dtype, t_dtype, shuffle, device):
    """One teacher's raw rows in their own dtype, not the student's: each dot at its operands'
    precision. The float64 reference reads the same rounded rows, so the student's dtype alone
    sets the tolerance (dx is stored in it)."""
    x, rx, t, rt = _inputs(130, 96, 80, dtype, device, t_dtype=t_dtype, zero_teacher_row=True)
    _run_and_check(x, rx, t, rt, shuffle, TOL[dtype])


@pytest.mark.parametrize("shuffle", ["none", "expected"])
def test_distill_two_rows(shuffle, device):
    """B = 2: one column per row, q~ = 1, so the loss and du vanish up to rounding."""
    x, rx, t, rt = _inputs(2, 48, 32, torch.float32, device)
    from distillcse.kernels.distill import distill_loss_and_grad, distill_row_stats

    thr, qbar = _groups(_teacher_logits(t, rt)) if shuffle == "expected" else (None, None)
    stats = distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    loss, dx = distill_loss_and_grad(x, rx, t, rt, stats[0], stats[1], STUDENT, TEACHER, shuffle=shuffle,
                                     thr=thr, qbar=qbar, budget_bytes=1 << 20)
    refs = _reference(x, rx, t, rt, thr, qbar)
    for name, out, ref in zip(("lse_s", "lse_t", "lse_g", "t_min", "t_max"), stats, refs):
        _check(name, out, ref, TOL[torch.float32])
    # Loss and dx are 0 in exact arithmetic: bound them by fp32 rounding of the logits.
    assert loss.abs().max().item() <= 1e-5 * STUDENT, "loss_rows"
    assert dx.shape == (2, 48) and torch.isfinite(dx).all(), "dx"
    assert (dx.abs().max() / rx.max()).item() <= 2e-5 * STUDENT, "dx"


@pytest.mark.parametrize("B", [37, 130])
def test_distill_small_row_losses_keep_their_precision(B, device):
    """A student close to its teacher: row losses down to ~5e-4, where lse_s and the sum of q l
    are both near STUDENT = 40. Each row's loss sums q (lse_s - l) term by term, so it is within
    2 eps STUDENT of float64 (computed as their difference, it was 5.6 and 7.7 eps STUDENT off)."""
    from distillcse.kernels.distill import distill_loss_and_grad, distill_row_stats

    gen = torch.Generator().manual_seed(1)
    t = torch.randn(B, 48, generator=gen)
    x = t + 0.05 * torch.randn(B, 48, generator=gen)
    rx, rt = 1 / x.norm(dim=1), 1 / t.norm(dim=1)
    x, rx, t, rt = (v.to(device) for v in (x, rx, t, rt))
    stats = distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    loss, _ = distill_loss_and_grad(x, rx, t, rt, stats[0], stats[1], STUDENT, TEACHER, budget_bytes=1 << 20)
    ref = _reference(x, rx, t, rt)[5]
    assert ref.min().item() < 1e-3  # small rows, where the difference's rounding shows
    err = (loss.double() - ref).abs().max().item()
    assert err <= 2 * torch.finfo(torch.float32).eps * STUDENT, f"row loss {err:.2e} off"


@pytest.mark.parametrize("shuffle", ["none", "random"])
def test_distill_row_statistics_of_any_stride(shuffle, device):
    """lse_s and lse_t as views of stride 2 (the kernels read them at stride 1, as every row's
    and column's statistic): the loss and dx of the contiguous ones, bit for bit."""
    from distillcse.kernels.distill import distill_loss_and_grad, distill_row_stats
    from distillcse.kernels.group_partition import group_thresholds

    x, rx, t, rt = _inputs(37, 48, 32, torch.float32, device, seed=1)
    lse_s, lse_t, lse_g, t_min, t_max = distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    kw = dict(shuffle=shuffle, budget_bytes=1 << 20)
    if shuffle == "random":
        kw.update(thr=group_thresholds(t, rt, lse_g, t_min, t_max, GROUPING, group_p=0.2), step_seed=SEED)
    strided = [torch.stack([a, torch.full_like(a, 7.0)], dim=1)[:, 0] for a in (lse_s, lse_t)]
    assert not any(a.is_contiguous() for a in strided)
    loss, dx = distill_loss_and_grad(x, rx, t, rt, lse_s, lse_t, STUDENT, TEACHER, **kw)
    loss_strided, dx_strided = distill_loss_and_grad(x, rx, t, rt, *strided, STUDENT, TEACHER, **kw)
    assert torch.equal(loss_strided, loss) and torch.equal(dx_strided, dx)


def test_distill_loss_only_slabs_take_no_factors(device, monkeypatch):
    """Without the gradient a slab entry is the two fp32 dots alone (8 bytes, no factors), so a
    budget of 128 rows of them at B = 130 runs slabs of 128 rows (then 2), where the gradient's
    12 bytes an entry take 64-row slabs; the loss rows are the same."""
    from distillcse.kernels import distill

    x, rx, t, rt = _inputs(130, 48, 32, torch.float32, device)
    lse_s, lse_t = distill.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)[:2]
    gemms, matmul = [], distill.matmul_f32
    monkeypatch.setattr(distill, "matmul_f32", lambda a, b, **kw: gemms.append(a.shape[0]) or matmul(a, b, **kw))
    budget = 130 * 8 * 128
    loss_only, none = distill.distill_loss_and_grad(x, rx, t, rt, lse_s, lse_t, STUDENT, TEACHER,
                                                    budget_bytes=budget, need_grad=False)
    assert none is None and gemms == [128, 128, 2, 2]
    gemms.clear()
    loss, _ = distill.distill_loss_and_grad(x, rx, t, rt, lse_s, lse_t, STUDENT, TEACHER, budget_bytes=budget)
    assert gemms[:3] == [64, 64, 64] or not utils.interpreter_blocks()  # two dots and the row side's GEMM
    torch.testing.assert_close(loss_only, loss, rtol=1e-6, atol=1e-6)


def test_lse_s_may_be_left_out_with_the_random_shuffle_only(device):
    """``lse_s=None`` (each slab's own, from its dots) serves the random shuffle alone: the other
    shuffles' column side reads every row's, so they refuse it with a clear error instead of
    reading an unset buffer."""
    from distillcse.kernels.distill import distill_loss_and_grad

    x, rx, t, rt = _inputs(37, 48, 32, torch.float32, device)
    thr, qbar = _groups(_teacher_logits(t, rt))
    for shuffle in ("none", "expected"):
        with pytest.raises(AssertionError, match="lse_s is needed for every column's gradient but with shuffle random"):
            distill_loss_and_grad(x, rx, t, rt, None, torch.zeros(37), STUDENT, TEACHER, shuffle=shuffle, thr=thr,
                                  qbar=qbar, budget_bytes=1 << 20)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shuffle", ["none", "expected"])
def test_distill_half_precision(dtype, shuffle, device):
    # A zero row's gradient is 1e8 (1 / eps) times O(1): beyond fp16's range (inf), not bf16's.
    x, rx, t, rt = _inputs(130, 96, 80, dtype, device, zero_row=dtype == torch.bfloat16)
    _run_and_check(x, rx, t, rt, shuffle, TOL[dtype])


# shuffle="random": against float64 PyTorch built on distillcse.shuffle's definition.

SEED = 0x1234_5678_9ABC


def _random_reference(x, rx, t, rt, grouping, step_seed):
    """float64 loss rows and dx = d(sum_i loss_i)/dx with the targets of shuffled_targets."""
    from distillcse.shuffle import shuffled_targets

    B = x.shape[0]
    u = x.double().cpu() * rx.double().cpu()[:, None]
    s = u @ u.T
    tt = _teacher_logits(t.cpu(), rt.cpu())
    q_tilde = shuffled_targets(tt, torch.arange(B), teacher_temperature=1 / TEACHER,
                               grouping_temperature=1 / GROUPING, shuffle="random",
                               step_seed=step_seed, **grouping)
    off = ~torch.eye(B, dtype=torch.bool)
    logits = torch.where(off, s * STUDENT, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - STUDENT * (q_tilde * torch.where(off, s, 0.0)).sum(1)
    g = torch.where(off, STUDENT * (torch.softmax(logits, dim=1) - q_tilde), 0.0)
    return loss, _through_unit_rows((g + g.T) @ u, x)


def _run_random(x, rx, t, rt, grouping, seed=SEED, slab_lse=True, **kw):
    """The random shuffle as the triton backend runs it: the student's logsumexps from each
    slab's own dots (``slab_lse``), or from the row statistics."""
    from distillcse.kernels.distill import distill_loss_and_grad, distill_row_stats
    from distillcse.kernels.group_partition import group_thresholds

    student = (None, None) if slab_lse else (x, rx)
    lse_s, lse_t, lse_g, t_min, t_max = distill_row_stats(*student, t, rt, STUDENT, TEACHER, GROUPING,
                                                          budget_bytes=BIG)
    thr = group_thresholds(t, rt, lse_g, t_min, t_max, GROUPING, **grouping)
    return distill_loss_and_grad(x, rx, t, rt, lse_s, lse_t, STUDENT, TEACHER, shuffle="random", thr=thr,
                                 step_seed=seed, **kw)


@pytest.mark.parametrize("grouping", [dict(group_p=0.1, group_size=None), dict(group_p=0.25, group_size=None),
                                      dict(group_p=1.0, group_size=None), dict(group_p=None, group_size=6)],
                         ids=["p0.1", "p0.25", "one-group", "size6"])
@pytest.mark.parametrize("B,D,Dt,budget,chunks", [(37, 48, 32, 1 << 20, 1), (130, 96, 80, 130 * 8 * 64, 3),
                                                  (130, 96, 80, 180_000, 3)],
                         ids=["one-slab", "three-slabs-three-chunks", "two-gradient-slabs"])
def test_random_matches_the_shuffle_definition(B, D, Dt, budget, chunks, grouping, device):
    # Not seed 0: two of its logits (row 37) lie 2.4e-8 apart, under fp32's resolution, right
    # at a group boundary, where the kernel's fp32 and the reference's float64 order them apart.
    x, rx, t, rt = _inputs(B, D, Dt, torch.float32, device, seed=1)
    kernel_grouping = dict(group_p=grouping["group_p"] or 0.1, group_size=grouping["group_size"])
    loss, dx = _run_random(x, rx, t, rt, kernel_grouping, budget_bytes=budget, chunks=chunks)
    ref_loss, ref_dx = _random_reference(x, rx, t, rt, grouping, SEED)
    assert ((loss.cpu().double() - ref_loss).abs().max() / ref_loss.abs().max()).item() < 1e-5
    assert ((dx.cpu().double() - ref_dx).norm() / ref_dx.norm()).item() < 1e-5


def test_random_slabs():
    """The random shuffle's dot slabs take half the budget, its gradient slabs (a multiple of
    them) the rest; "two-gradient-slabs" above runs (64, 128) at B = 130 (dot slabs 64, 64 | 2)."""
    from distillcse.kernels.distill import _random_slabs

    assert _random_slabs(65536, 65536, 80 << 20, 2, 32) == (64, 320)  # bf16 at B = 65,536: 205 accumulations
    assert _random_slabs(130, 130, 180_000, 4, 64) == (64, 128)
    assert _random_slabs(130, 130, 1000, 4, 64) == (64, 64)  # a tiny budget: one row block each
    assert _random_slabs(100, 100, 1 << 30, 2, 32) == (100, 100)  # everything in one slab
    # a shard of 8,192 rows with shuffle expected: no compact targets, so the factors get more
    assert _random_slabs(65536, 8192, 80 << 20, 2, 32, compact=False) == (64, 384)


def test_random_student_logsumexp_from_the_slabs(device):
    """The slab rows' lse_s from the count kernel's chunks (three slabs, three chunks: the
    triton backend's way) or from the row statistics: the same loss and gradient, up to fp32
    summation order; and the statistics without the student give the same teacher statistics."""
    from distillcse.kernels.distill import distill_row_stats

    x, rx, t, rt = _inputs(130, 96, 80, torch.float32, device, seed=1)
    grouping = dict(group_p=0.1, group_size=None)
    kw = dict(budget_bytes=130 * 8 * 64, chunks=3)
    slab_loss, slab_dx = _run_random(x, rx, t, rt, grouping, **kw)
    loss, dx = _run_random(x, rx, t, rt, grouping, slab_lse=False, **kw)
    torch.testing.assert_close(slab_loss, loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slab_dx, dx, rtol=1e-5, atol=1e-6)
    full = distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    teacher_only = distill_row_stats(None, None, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    assert teacher_only[0] is None and all(torch.equal(a, b) for a, b in zip(full[1:], teacher_only[1:]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_random_half_precision(dtype, device):
    """16-bit rows: the gradient accumulates in dx (hi) with an int8 lo beside it, over three
    slabs (the budget leaves the slabs half of it after lo)."""
    x, rx, t, rt = _inputs(130, 96, 80, dtype, device, seed=1)
    grouping = dict(group_p=0.1, group_size=None)
    budget = 130 * 96 + 130 * 4 * 64  # lo, then slabs of 64 rows (bf16 factors and targets)
    loss, dx = _run_random(x, rx, t, rt, grouping, budget_bytes=budget, chunks=3)
    ref_loss, ref_dx = _random_reference(x, rx, t, rt, grouping, SEED)
    assert dx.dtype == dtype and torch.isfinite(dx).all()
    assert ((loss.cpu().double() - ref_loss).abs().max() / ref_loss.abs().max()).item() < TOL[dtype] / 4
    assert ((dx.cpu().double() - ref_dx).norm() / ref_dx.norm()).item() < TOL[dtype] / 2


def test_random_warns_when_its_accumulation_traffic_is_huge(device, monkeypatch):
    """The column side's traffic, (B / R) B D x 2 x 3 bytes for fp16 rows (hi + lo), is announced
    with the numbers and the way out (the expected shuffle); below the threshold nothing is said.
    A shard's (any shuffle's) names its shuffle and rows, and not that way out."""
    import warnings

    from distillcse.kernels import distill

    x, rx, t, rt = _inputs(130, 96, 80, torch.float16, device, seed=1)
    grouping = dict(group_p=0.1, group_size=None)
    budget = 130 * 96 + 130 * 4 * 64  # lo, then slabs of 64 rows: 3 slabs
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _run_random(x, rx, t, rt, grouping, budget_bytes=budget)
    monkeypatch.setattr(distill, "RANDOM_TRAFFIC_WARN_BYTES", 3 * 130 * 96 * 6 - 1)
    announced = r'shuffle="random" at B=130 .* runs (\d+) slabs of (\d+) rows.*distillcse.set_chunk_budget'
    with pytest.warns(UserWarning, match=announced) as caught:
        _run_random(x, rx, t, rt, grouping, budget_bytes=budget)
    slabs, rows = map(int, re.search(announced, str(caught[0].message), re.S).groups())
    # the whole batch: no shard named, and the expected shuffle offered as the way out
    assert "shard" not in str(caught[0].message) and 'or use shuffle="expected"' in str(caught[0].message)
    assert (slabs, rows) == (3, 64) or not utils.interpreter_blocks()  # (the GPU's blocks: 5 slabs of 32 rows)
    assert (slabs - 1) * rows < 130 <= slabs * rows
    # a shard accumulates whatever its shuffle, and another shuffle would not help it
    monkeypatch.setattr(distill, "RANDOM_TRAFFIC_WARN_BYTES", 0)
    with pytest.warns(UserWarning, match=r'shuffle="expected" at B=130 on a shard of 65 rows') as caught:
        distillcse.distill_loss(x.detach().requires_grad_(), t, shuffle="expected", rows=(0, 65), backend="triton")
    assert 'or use shuffle="expected"' not in str(caught[0].message)


def test_random_traffic_warning_counts_the_gradient_slabs(device, monkeypatch):
    """The accumulation runs once per gradient slab (several dot slabs' factors), so the traffic
    announced is (B / R_grad) B D x 2 x 4 bytes for fp32 rows, with R_grad's slabs named: fp32
    rows at B = 130 in 180,000 bytes run dot slabs of 64 rows in gradient slabs of 128 (two
    accumulations, not three). At that traffic exactly nothing is said; a byte below, it is."""
    import warnings

    from distillcse.kernels import distill

    x, rx, t, rt = _inputs(130, 96, 80, torch.float32, device, seed=1)
    grouping = dict(group_p=0.1, group_size=None)
    BM = distill._slab_blocks(130, "random")[1]["BM"]
    R, R_grad = distill._random_slabs(130, 130, 180_000, 4, BM)
    assert R < R_grad < 130, (R, R_grad)  # the case tests nothing unless the two differ
    traffic = utils.cdiv(130, R_grad) * 130 * 96 * 2 * 4
    monkeypatch.setattr(distill, "RANDOM_TRAFFIC_WARN_BYTES", traffic)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _run_random(x, rx, t, rt, grouping, budget_bytes=180_000)
    monkeypatch.setattr(distill, "RANDOM_TRAFFIC_WARN_BYTES", traffic - 1)
    with pytest.warns(UserWarning, match=rf"runs {utils.cdiv(130, R_grad)} slabs of {R_grad} rows"):
        _run_random(x, rx, t, rt, grouping, budget_bytes=180_000)


@pytest.mark.parametrize("row_scale", [False, True], ids=["", "row_scale"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_accumulator_sums_like_fp32(dtype, row_scale, device):
    """``accumulate_slab`` over 60 slabs: the column side onto every row, each slab's own side
    onto its rows (with ``row_scale``, row j's sum times 2^-k_j, as fp16's lifted rows take it;
    a [B] view of stride 2).
    hi (dx's 16-bit dtype) + int8 lo carries 8 bits more than hi (the rounding of 60 sums:
    ~2^-13 of the largest entry in bf16, 2^-16 in fp16), where rounding the sum to the 16-bit
    dtype after every slab (hi alone) is far worse."""
    from distillcse.kernels.distill import LO_FORMATS, accumulate_slab

    B, D, R, slabs = 150, 40, 24, 60
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g).to(dtype)
    rx = (1.0 / x.float().norm(dim=1)).to(device)
    u = x.double() * rx.double().cpu()[:, None]
    hi = torch.zeros(B, D, dtype=dtype, device=device)
    lo = None if dtype == torch.float32 else torch.zeros(B, D, dtype=torch.int8, device=device)
    exact = torch.zeros(B, D, dtype=torch.float64)
    hi_alone = torch.zeros(B, D, dtype=dtype)
    m_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    scales = torch.exp2(-torch.randint(0, 13, (B,), generator=g).float()) if row_scale else torch.ones(B)
    row_scales = torch.stack([scales, -scales], 1).to(device)[:, 0]  # a view of stride 2 (made on the device)
    for s in range(slabs):
        row0 = (s * 37) % (B - R + 5)  # the last slabs are ragged: rows past B are not there
        rows = min(R, B - row0)
        m = (torch.randn(rows, B, generator=g) * 10 ** torch.empty(rows, 1).uniform_(-2, 1, generator=g)).to(m_dtype)
        own = torch.randn(rows, D, generator=g)
        update = m.double().T @ u[row0:row0 + rows]
        update[row0:row0 + rows] += own.double() * rx.double().cpu()[row0:row0 + rows, None]
        update *= scales.double()[:, None]
        exact += update
        hi_alone = (hi_alone.double() + update).to(dtype)
        accumulate_slab(hi, lo, m.to(device), x.to(device), rx, own.to(device), row0,
                        row_scales if row_scale else None)
    total = hi.double().cpu()
    if lo is not None:  # lo counts 1/256 of hi's ulp; exponents below EMIN share EMIN's unit
        mant, emin = LO_FORMATS[dtype]
        exponent = ((hi.float().cpu().view(torch.int32) >> 23) & 0xFF) - 127
        total += lo.double().cpu() * torch.pow(2.0, (exponent.clamp_min(emin) - mant - 8).double())
    scale = exact.abs().amax(dim=1, keepdim=True)  # per row: rows of 2^-12 hold their own 8 extra bits
    error = ((total - exact).abs() / scale).max()
    assert error < {torch.bfloat16: 2 ** -12, torch.float16: 2 ** -15, torch.float32: 2 ** -20}[dtype]
    if lo is not None:
        assert ((hi_alone.double() - exact).abs() / scale).max() > 30 * error


def test_accumulator_below_fp16s_normal_range(device):
    """fp16 sums under 2^-14, where hi is subnormal or zero: their lo counts 2^-32 (EMIN's unit,
    1/256 of the smallest normal's ulp), so the sum keeps the dot's ~16 bits; a unit from hi's
    own exponent would pass int8's range (or, at hi = 0, 2^k's) and lose most of them. Read
    back as unit_rows_backward reads it, into an fp32 gradient."""
    from distillcse.kernels.distill import accumulate_slab, unit_rows_backward

    B, D, R = 40, 16, 8
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, D, generator=g).half()
    rx = 1.0 / x.float().norm(dim=1)
    u = x.double() * rx.double()[:, None]
    hi = torch.zeros(B, D, dtype=torch.float16, device=device)
    lo = torch.zeros(B, D, dtype=torch.int8, device=device)
    exact = torch.zeros(B, D, dtype=torch.float64)
    for s in range(12):
        row0 = (s * 11) % (B - R + 1)
        m = (torch.randn(R, B, generator=g) * 2.0 ** -18).to(torch.bfloat16)
        own = torch.randn(R, D, generator=g) * 2.0 ** -18
        exact += m.double().T @ u[row0:row0 + R]
        exact[row0:row0 + R] += own.double() * rx.double()[row0:row0 + R, None]
        accumulate_slab(hi, lo, m.to(device), x.to(device), rx.to(device), own.to(device), row0)
    assert exact.abs().max() < 2 ** -14
    out = torch.empty(B, D, device=device)
    unit_rows_backward(hi, x.to(device), rx.to(device), out, lo=lo, scaled=True)
    ref = exact - u * (u * exact).sum(1, keepdim=True)  # rx du through u = x rx
    assert ((out.double().cpu() - ref).abs().max() / ref.abs().max()).item() < 2 ** -13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("form", ["du", "scaled-in-place"])
def test_unit_rows_backward_is_the_chain_rule(dtype, form, device):
    """``unit_rows_backward`` against autograd of ``u = x / max(|x|, eps)`` in float64, row by
    row: rows of stride D + 3, D = 200 over two feature blocks, two rows shorter than eps (but in
    fp16). "du": fp32 dL/du into a new buffer; "scaled-in-place": the random shuffle's
    accumulator (rx du, as hi + int8 lo for 16-bit x) turned into dL/dx where it lies."""
    from distillcse.kernels.distill import accumulate_slab, unit_rows_backward

    R, D = 45, 200
    g = torch.Generator().manual_seed(4)
    x = torch.randn(R, D + 3, generator=g)
    if dtype != torch.float16:  # whose range holds neither such rows nor their gradients (du / eps)
        x[[3, 7]] *= 1e-10  # rows shorter than eps: u = x / eps, no projection
    x = x.to(dtype)[:, :D]
    rx = 1.0 / x.float().norm(dim=1).clamp_min(1e-8)
    du = torch.randn(R, D, generator=g) * 10 ** torch.empty(R, 1).uniform_(-2, 1, generator=g)
    xd = x.double().requires_grad_()
    (xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-8)).backward(du.double())
    exact = xd.grad
    if form == "du":
        out = torch.empty(R, D, dtype=dtype, device=device)
        unit_rows_backward(du.to(device), x.to(device), rx.to(device), out)
    else:  # the accumulator holds rx du: one slab whose factors are zero, du all on the own side
        out = torch.zeros(R, D, dtype=dtype, device=device)
        lo = None if dtype == torch.float32 else torch.zeros(R, D, dtype=torch.int8, device=device)
        m = torch.zeros(R, R, dtype=torch.float32 if lo is None else torch.bfloat16, device=device)
        accumulate_slab(out, lo, m, x.to(device), rx.to(device), du.to(device), 0)
        unit_rows_backward(out, x.to(device), rx.to(device), out, lo=lo, scaled=True)
    error = ((out.double().cpu() - exact).abs().amax(1) / exact.abs().amax(1)).max()  # row by row
    assert error < {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unit_rows_backward_projects_rows_just_longer_than_eps(dtype, device):
    """Rows of |x| = 2e-8, 1e-6 and 1e-5 (|x|^2 above eps^2 = 1e-16, far below eps) are unit rows
    like any other: their gradient has the projection ``rx (du - u (u . du))``; only the row
    shorter than eps (1e-10) has none. A threshold on |x|^2 at eps or a larger eps fails here."""
    from distillcse.kernels.distill import unit_rows_backward

    R, D = 6, 48
    g = torch.Generator().manual_seed(6)
    x = torch.randn(R, D, generator=g)
    x = (x / x.norm(dim=1, keepdim=True) * torch.tensor([2e-8, 1e-6, 1e-5, 1.0, 3.0, 1e-10])[:, None]).to(dtype)
    rx = 1.0 / x.float().norm(dim=1).clamp_min(1e-8)
    du = torch.randn(R, D, generator=g)
    xd = x.double().requires_grad_()
    (xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-8)).backward(du.double())
    out = torch.empty(R, D, dtype=dtype, device=device)
    unit_rows_backward(du.to(device), x.to(device), rx.to(device), out)
    error = (out.double().cpu() - xd.grad).abs().amax(1) / xd.grad.abs().amax(1)  # row by row
    assert error.max().item() < {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype], error


@pytest.mark.parametrize("teacher", ["concatenated", "fp16-strided-zero-row"])
def test_random_other_teacher_rows(teacher, device):
    """Two teachers' unit rows (rt = 1); one fp16 teacher sliced out of a wider tensor with an
    all-zero row, under an fp32 student."""
    kw = dict(teacher="concatenated") if teacher == "concatenated" else dict(
        t_dtype=torch.float16, strided=True, zero_teacher_row=True)
    x, rx, t, rt = _inputs(61, 40, 24, torch.float32, device, **kw)
    grouping = dict(group_p=0.2, group_size=None)
    loss, dx = _run_random(x, rx, t, rt, grouping, budget_bytes=1 << 20)
    ref_loss, ref_dx = _random_reference(x, rx, t, rt, grouping, SEED)
    assert ((loss.cpu().double() - ref_loss).abs().max() / ref_loss.abs().max()).item() < 1e-5
    assert ((dx.cpu().double() - ref_dx).norm() / ref_dx.norm()).item() < 1e-5


def test_random_groups_where_a_threshold_is_a_value_of_the_row(device):
    """Row 0's logits at a group boundary one ulp apart (adjacent fp32 values): no float lies
    between them, so the threshold is the upper value itself (``group_partition._mid_gap``), and
    only a strict ``t < thr`` keeps it out of the lower group, in the random shuffle's groups as
    in the expected mode's. Row 0's teacher is e_0 and every rt is 1: t_0j is row j's first
    feature, exactly, in the kernels and in float64."""
    from distillcse.kernels.distill import distill_row_stats
    from distillcse.kernels.group_partition import group_thresholds

    B, D, Dt, size = 37, 48, 32, 6
    x, rx, _, _ = _inputs(B, D, Dt, torch.float32, "cpu", seed=1)
    gen = torch.Generator().manual_seed(2)
    a = (torch.rand(B - 1, generator=gen) * 1.6 - 0.8).sort(descending=True).values
    a[size] = torch.nextafter(a[size - 1], torch.tensor(-1.0))  # ranks size - 1 and size: one ulp apart
    a = a[torch.randperm(B - 1, generator=gen)]  # in no particular column order
    w = torch.randn(B - 1, Dt - 1, generator=gen)
    w = w / w.norm(dim=1, keepdim=True) * (1 - a[:, None] ** 2).sqrt()
    t = torch.zeros(B, Dt)
    t[0, 0] = 1.0
    t[1:, 0], t[1:, 1:] = a, w
    x, rx, t, rt = (v.to(device) for v in (x, rx, t, torch.ones(B)))
    grouping = dict(group_p=None, group_size=size)
    _, _, lse_g, t_min, t_max = distill_row_stats(None, None, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    thr = group_thresholds(t, rt, lse_g, t_min, t_max, GROUPING, **grouping)
    assert thr[0, 0].item() in a.tolist(), "the threshold is not a value of row 0: the case tests nothing"
    loss, dx = _run_random(x, rx, t, rt, grouping, budget_bytes=1 << 20)
    ref_loss, ref_dx = _random_reference(x, rx, t, rt, grouping, SEED)
    assert ((loss.cpu().double() - ref_loss).abs().max() / ref_loss.abs().max()).item() < 1e-5
    assert ((dx.cpu().double() - ref_dx).norm() / ref_dx.norm()).item() < 1e-5


def test_random_without_grad_and_other_seeds(device):
    x, rx, t, rt = _inputs(61, 40, 24, torch.float32, device, strided=True)
    grouping = dict(group_p=0.2, group_size=None)
    loss, _ = _run_random(x, rx, t, rt, grouping, budget_bytes=1 << 20)
    loss_only, none = _run_random(x, rx, t, rt, grouping, budget_bytes=1 << 20, need_grad=False)
    assert none is None and torch.equal(loss, loss_only)
    again, _ = _run_random(x, rx, t, rt, grouping, budget_bytes=1 << 20)
    other, _ = _run_random(x, rx, t, rt, grouping, seed=SEED + 1, budget_bytes=1 << 20)
    assert torch.equal(loss, again) and not torch.equal(loss, other)


@triton.jit
def _sigma_kernel(p_x, p_n, p_key, p_h, p_b, p_rounds, p_out, N, BLOCK: tl.constexpr):
    """The kernels' sigma, elementwise over int32 inputs (key as uint32 bits)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    x = tl.load(p_x + o, mask=m, other=0).to(tl.uint32)
    n = tl.load(p_n + o, mask=m, other=1).to(tl.uint32)
    key = tl.load(p_key + o, mask=m, other=0).to(tl.uint32, bitcast=True)
    h = tl.load(p_h + o, mask=m, other=0).to(tl.uint32)
    b = tl.load(p_b + o, mask=m, other=1).to(tl.uint32)
    rounds = tl.load(p_rounds + o, mask=m, other=0)
    tl.store(p_out + o, _group_permutation(x, n, key, h, b, rounds).to(tl.int32), mask=m)


def test_kernel_permutation_is_the_torch_definition():
    from distillcse.shuffle import feistel_shape, group_keys, group_permutation

    # up to 2^30 (b = 2^15 there: the odd rounds' multiply-high spans 48 bits)
    n = torch.tensor([1, 2, 3, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4099, 65537, 2**29 + 3, 2**30 - 1,
                      2**30]).repeat_interleave(64)
    x = (torch.rand(n.shape, generator=torch.Generator().manual_seed(0)) * n).long()
    key = group_keys(SEED, torch.arange(len(n)), torch.arange(len(n)) % 7)
    h, b, rounds = feistel_shape(n)
    key_bits = torch.where(key >= 2**31, key - 2**32, key)
    as_i32 = lambda v: v.to(torch.int32).to(DEVICE)  # noqa: E731
    out = torch.empty(len(n), dtype=torch.int32, device=DEVICE)
    _sigma_kernel[(triton.cdiv(len(n), 128),)](
        as_i32(x), as_i32(n), as_i32(key_bits), as_i32(h), as_i32(b), as_i32(rounds), out, len(n), BLOCK=128)
    assert torch.equal(out.cpu().long(), group_permutation(x, n, key))


@pytest.mark.parametrize("key_on_device", [False, True])
@pytest.mark.parametrize("row0,step_seed", [(0, SEED), (2**32 - 20, 2**64 - 12345)])
def test_permutation_tables_are_the_torch_definition(row0, step_seed, key_on_device):
    """``first`` and ``perm`` of the kernel against ``distillcse.shuffle`` in int64 torch: odd
    R, C, G, empty groups, groups past SMALL_DOMAIN, row indices that wrap at 2^32, seeds
    with both halves' top bits set; the key as an int or as the [1] int64 tensor that a CUDA
    graph's capture draws (its 64 bits)."""
    from distillcse.kernels.distill import _permutation_tables
    from distillcse.shuffle import feistel_shape, group_keys

    R, C, G = 37, 5, 11
    counts = torch.randint(0, 90, (R, C, G), generator=torch.Generator().manual_seed(3))
    counts[:, :, 4] = 0  # an empty group
    counts[0] = 0
    counts[0, :, 0] = 130  # one group of 650 members
    key = device_key(step_seed) if key_on_device else step_seed
    first, perm = _permutation_tables(counts.to(torch.int32).to(DEVICE), row0, key)
    sizes = counts.sum(1)
    starts = sizes.cumsum(-1) - sizes
    ref_first = counts.cumsum(1) - counts + starts[:, None, :]
    keys = group_keys(step_seed, (row0 + torch.arange(R))[:, None], torch.arange(G)[None, :])
    ref_perm = torch.stack([starts, sizes, *feistel_shape(sizes), torch.where(keys >= 2**31, keys - 2**32, keys)])
    assert first.dtype == perm.dtype == torch.int32
    assert torch.equal(first.cpu().long(), ref_first)
    assert torch.equal(perm.cpu().long(), ref_perm)


@pytest.mark.parametrize("m_dtype", [torch.float32, torch.bfloat16])
def test_accumulate_slab_grid_within_cudas_limits(monkeypatch, m_dtype):
    """At B = 2^23 + 5 rows and the GPU's blocks (BJ = 64 rows for fp32 M, 128 for bf16) the
    accumulator's 131,073 or 65,537 row blocks pass the 65,535 CUDA allows on a grid's second
    axis (a launch error from B = 4,194,241 in fp32): the WIDE variant's third axis carries the
    rest; at B = 65,536 the common variant, as before."""
    from distillcse.kernels import distill, utils

    monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, kwargs))

    monkeypatch.setattr(distill, "_accumulate_slab_kernel", Recorder())
    D = 300
    for B in (2**23 + 5, 65_536):
        hi = torch.zeros(B, 1).expand(B, D)  # shapes only: nothing is launched
        distill.accumulate_slab(hi, None, torch.zeros(1, B, dtype=m_dtype), hi, torch.zeros(B), torch.zeros(1, D), 0)
    for (grid, blocks), B in zip(launches, (2**23 + 5, 65_536)):
        row_blocks = utils.cdiv(B, blocks["BJ"])
        assert grid[0] == utils.cdiv(D, blocks["BD"]) and max(grid[1:]) <= 65_535 and grid[1] * grid[2] >= row_blocks
        assert blocks["WIDE"] == (row_blocks > 65_535) == (B > 2**23)


def test_wide_accumulator_grid_is_the_common_one(monkeypatch, device):
    """The WIDE variant (row blocks over two grid axes; here at most 2 on the second: 5 row blocks
    of 128 as (1, 2, 3) programs under the interpreter, the last past B; the axes' sizes differ,
    so a row index from the third's would skip blocks) adds what the common one adds, bit for bit."""
    from distillcse.kernels import distill

    B, D, R = 520, 40, 24
    g = torch.Generator().manual_seed(6)
    x = torch.randn(B, D, generator=g).to(device)
    rx = 1.0 / x.norm(dim=1)
    m, own = torch.randn(R, B, generator=g).to(device), torch.randn(R, D, generator=g).to(device)
    common, wide = torch.zeros(B, D, device=device), torch.zeros(B, D, device=device)
    distill.accumulate_slab(common, None, m, x, rx, own, 100)
    monkeypatch.setattr(distill, "GRID_AXIS_MAX", 2)
    distill.accumulate_slab(wide, None, m, x, rx, own, 100)
    assert torch.equal(wide, common) and common.abs().min() > 0
