"""kernels/contrastive.py against a naive float64 PyTorch InfoNCE (SPEC section 1)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, requires_triton

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from distillcse.kernels.tiles import log1p_unit  # noqa: E402

pytestmark = requires_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SCALE = 1 / 0.05


@triton.jit
def _log1p_unit_kernel(p_u, p_y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(p_y + o, log1p_unit(tl.load(p_u + o)))


def _inv_norm(a):
    return 1.0 / a.float().norm(dim=1).clamp_min(1e-8)


def _reference(x, y, scale, grad_rows):
    """float64: (loss_rows, lse, dx, dy) by normalise, matmul, logsumexp and autograd."""
    B = x.shape[0]
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    ux = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    uy = y / y.norm(dim=1, keepdim=True).clamp_min(1e-8)
    logits = scale * ux @ uy.T
    lse = torch.logsumexp(logits, dim=1)
    loss_rows = lse - logits[:, :B].diagonal()
    (grad_rows.double() * loss_rows).sum().backward()
    return loss_rows.detach(), lse.detach(), x.grad, y.grad


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


BUDGET = 1 << 30  # one slab for the tests' sizes


def _check(x, y, grad_rows, tol, budget=BUDGET, scale=SCALE):
    """Loss rows, lse, dx and dy against float64; the forward without dx must agree with the
    one with it (``budget``: the slab buffers' bytes, both passes). With hard negatives (y's
    rows past B), y also goes in as two blocks, z2 and the hard negatives (``_column_blocks``):
    dy then comes back as their two gradients."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    B = x.shape[0]
    rx, ry = _inv_norm(x), _inv_norm(y)
    refs = _reference(x, y, scale, grad_rows)
    for ys in [y] + ([(y[:B].clone(), y[B:].clone())] if y.shape[0] > B else []):  # apart: no read past a block
        grad_in = grad_rows.clone()
        loss, stats, dx = contrastive_fwd(x, rx, ys, ry, scale, grad_rows, budget_bytes=budget)
        assert torch.equal(grad_rows, grad_in), "grad_rows changed"
        loss_only, stats_only, no_dx = contrastive_fwd(x, rx, ys, ry, scale, budget_bytes=budget)
        assert no_dx is None
        for name, a, b in (("loss_rows", loss_only, loss), ("stats", stats_only, stats)):  # the same sums, dx or not
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name} without dx")
        lse = stats[0]
        dy = contrastive_bwd_dy(x, rx, ys, ry, stats, scale, grad_rows, budget_bytes=budget)
        if isinstance(ys, tuple):
            assert isinstance(dy, tuple) and [d.shape for d in dy] == [v.shape for v in ys], "a gradient per block"
            dy = torch.cat(dy)
        dtypes = (torch.float32, torch.float32, x.dtype, x.dtype)
        for name, out, ref, dtype in zip(("loss_rows", "lse", "dx", "dy"), (loss, lse, dx, dy), refs, dtypes):
            ref = ref.to(dtype).double()  # the best an output of this dtype can hold (fp16 underflows)
            assert out.shape == ref.shape and out.dtype == dtype, name
            assert torch.isfinite(out).all(), f"{name} has non-finite entries (unwritten output?)"
            assert _rel(out, ref) <= tol, f"{name}: relative error {_rel(out, ref):.2e} > {tol:.0e} ({type(ys)})"


def _views(B, n_hard, D, dtype, device, seed=0, noise=3.0):
    """Positives z1 + noise * N(0, 1): noise 3 puts cos(z1_i, z2_i) near 0.3, so the losses are
    O(1) (``test_near_perfect_positives`` takes small noise)."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, D, generator=gen)
    y = torch.cat([z1 + noise * torch.randn(B, D, generator=gen), torch.randn(n_hard, D, generator=gen)])
    return z1.to(device, dtype), y.to(device, dtype)


def _opposed_views(B, n_hard, D, seed):
    """fp32 rows spread around a vector v, columns (z2, then the hard negatives) around -v:
    every cosine below -0.85, each logit near -scale."""
    gen = torch.Generator().manual_seed(seed)
    v = 8.0 * torch.randn(D, generator=gen)
    x, y = v + 2.0 * torch.randn(B, D, generator=gen), 2.0 * torch.randn(B + n_hard, D, generator=gen) - v
    assert (F.normalize(x, dim=1) @ F.normalize(y, dim=1).T).max() < -0.85
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_hard", [0, 23])
@pytest.mark.parametrize("B, D", [(37, 48), (130, 96)])
def test_odd_shapes(B, D, n_hard, dtype, device):
    x, y = _views(B, n_hard, D, dtype, device)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [48, 200])
def test_random_grad_rows_and_non_contiguous(D, dtype, device):
    """Row stride 3 D (the GEMMs and kernels read the rows in place)."""
    B, n_hard = 37, 23
    x, y = _views(B, n_hard, 3 * D, dtype, device, seed=1)
    x, y = x[:, 5 : 5 + D], y[:, D : 2 * D]  # row stride 3 D, feature stride 1
    assert not x.is_contiguous() and not y.is_contiguous()
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(2)).to(device)
    _check(x, y, grad_rows, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_scale", [1e-4, -1e-4, 65536.0])
def test_grad_rows_magnitude(grad_scale, dtype, device):
    """Tiny (mean over a big batch) and loss-scaled upstream gradients: g_i enters the 16-bit
    factors of both GEMMs, so it must neither underflow nor overflow there (bf16: fp32's range; the
    fp16 outputs of the tiny case are themselves subnormal: compared with the reference in fp16).
    Negative ones too (a maximised loss): the column factors' g_i / g_max takes g_max = max |g_i|."""
    B = 37
    x, y = _views(B, 23, 48, dtype, device, seed=7)
    _check(x, y, torch.full((B,), grad_scale / B, device=device), TOL[dtype])


def test_zero_grad_rows(device):
    """Upstream gradients all 0 (a term weighted 0): dx and dy are 0, not the 0 / 0 of g_i / g_max."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    B = 37
    x, y = _views(B, 23, 48, torch.float32, device, seed=8)  # [37, 48], [60, 48]
    rx, ry, grad_rows = _inv_norm(x), _inv_norm(y), torch.zeros(B, device=device)
    _, stats, dx = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, budget_bytes=BUDGET)
    dy = contrastive_bwd_dy(x, rx, y, ry, stats, SCALE, grad_rows, budget_bytes=BUDGET)
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dy, torch.zeros_like(y))


def test_launchers_refuse_inconsistent_inputs(device):
    """The launchers' guards: y's blocks in another dtype than x, a single column (no negative),
    a shard whose positives would run past z2 (y's first block) into the hard negatives (N alone
    has room for them), inverse norms not fp32, upstream gradients of another length than x's
    rows, and ``add_to`` without ``grad_rows`` are refused, not computed into wrong losses."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    B = 37
    x, y = _views(B, 23, 48, torch.float32, device, seed=27)  # [37, 48], [60, 48]
    rx, ry = _inv_norm(x), _inv_norm(y)
    blocks, grad_rows = (y[:B], y[B:]), torch.full((B,), 1.0 / B, device=device)
    with pytest.raises(AssertionError, match="share a dtype"):
        contrastive_fwd(x, rx, (y[:B], y[B:].double()), ry, SCALE, budget_bytes=BUDGET)
    with pytest.raises(AssertionError, match="N >= 2"):
        contrastive_fwd(x[:1], rx[:1], y[:1], ry[:1], SCALE, budget_bytes=BUDGET)
    _, stats, _ = contrastive_fwd(x, rx, blocks, ry, SCALE, budget_bytes=BUDGET)
    shard = slice(30, B)  # 7 rows: from diag0 = 31 the last one's positive would be y's row 37
    contrastive_bwd_dy(x[shard], rx[shard], blocks, ry, stats[:, shard], SCALE, grad_rows[shard],
                       budget_bytes=BUDGET, diag0=30)
    with pytest.raises(AssertionError, match="its first block"):
        contrastive_bwd_dy(x[shard], rx[shard], blocks, ry, stats[:, shard], SCALE, grad_rows[shard],
                           budget_bytes=BUDGET, diag0=31)
    with pytest.raises(AssertionError):
        contrastive_fwd(x, rx.half(), y, ry, SCALE, budget_bytes=BUDGET)
    with pytest.raises(AssertionError):
        contrastive_fwd(x, rx, y, ry, SCALE, torch.cat([grad_rows, grad_rows[:3]]), budget_bytes=BUDGET)
    with pytest.raises(AssertionError, match="add_to needs grad_rows"):
        contrastive_fwd(x, rx, y, ry, SCALE, budget_bytes=BUDGET, add_to=torch.zeros_like(x))


def _strided(v):
    """v's values at stride 2, NaN between them (read at stride 1, they give NaN)."""
    return torch.stack([v, torch.full_like(v, float("nan"))], 1)[:, 0]


def test_norms_and_grad_rows_of_any_stride(device):
    """rx, ry and grad_rows as views of stride 2 (the kernels read them at stride 1, so the
    launchers make them contiguous): the loss, statistics and gradients of contiguous ones, bit for bit."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    B = 37
    x, y = _views(B, 23, 48, torch.float32, device, seed=9)  # [37, 48], [60, 48]
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(10)).to(device)
    outs = []
    for r_x, r_y, g in ((rx, ry, grad_rows), (_strided(rx), _strided(ry), _strided(grad_rows))):
        loss, stats, dx = contrastive_fwd(x, r_x, y, r_y, SCALE, g, budget_bytes=BUDGET)
        outs.append((loss, stats, dx, contrastive_bwd_dy(x, r_x, y, r_y, stats, SCALE, g, budget_bytes=BUDGET)))
    for name, contiguous, strided in zip(("loss_rows", "stats", "dx", "dy"), *outs):
        assert torch.equal(strided, contiguous), name


def test_fp16_unit_rows_copied_in_steps(monkeypatch, device):
    """fp16's copy of the unit rows (``_factor_rows``) goes UNIT_COPY_ROWS rows a step, here 16:
    x's 37 rows, y's 60 and its blocks' 37 and 23 in several steps, the last ragged."""
    from distillcse.kernels import contrastive

    monkeypatch.setattr(contrastive, "UNIT_COPY_ROWS", 16)
    B = 37
    x, y = _views(B, 23, 48, torch.float16, device, seed=11)  # [37, 48], [60, 48]
    _check(x, y, torch.full((B,), 1.0 / B, device=device), TOL[torch.float16])


@pytest.mark.parametrize("noise", [0.3, 0.01])
def test_near_perfect_positives(noise, device):
    """Losses of ~3e-6 (P_ii = 1 - 3e-6): loss_i = -log P_ii and the gradients' P_ii - 1 come from
    the off-diagonal sum, not as a difference from 1 (which left 1e-2 relative errors in fp32)."""
    B = 130
    x, y = _views(B, 23, 96, torch.float32, device, seed=10, noise=noise)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 5e-5)


@pytest.mark.parametrize("noise", [0.7, 1.0])
def test_near_perfect_positives_in_two_passes(noise, device):
    """The same past the one pass's largest scale (40, fp32: two passes): the second pass's
    diagonal factor P_ii - 1 is also -(the off-diagonal sum), not exp(s_ii - lse_i) - 1 (row
    losses 2e-12..5e-6 here; at scale 100 the float64 reference itself rounds them to 0)."""
    from distillcse.kernels.contrastive import one_pass

    scale, B = 40.0, 37
    assert not one_pass(torch.float32, scale)
    x, y = _views(B, 23, 96, torch.float32, device, seed=10, noise=noise)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 5e-5, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1 / 32, 0.01])
@pytest.mark.parametrize("opposed", [False, True])
def test_one_pass_and_two(opposed, temperature, dtype, device):
    """The row kernel's one pass (logits shifted by the scale) at its largest scale, 32, and two
    passes beyond it (100) and for fp16; ``opposed``: every cosine below -0.85, each logit near
    -scale, the one pass's exp(s - scale) near exp(-64), its smallest."""
    from distillcse.kernels.contrastive import ONE_PASS_MAX_SCALE, one_pass

    assert one_pass(dtype, 1 / temperature) == (dtype != torch.float16 and 1 / temperature <= ONE_PASS_MAX_SCALE)
    B, n_hard = 130, 23
    x, y = _views(B, n_hard, 96, torch.float32, "cpu", seed=13, noise=10.0)  # losses O(1) at scale 100
    if opposed:
        x, y = _opposed_views(B, n_hard, 96, seed=14)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(15)).to(device)
    _check(x.to(device, dtype), y.to(device, dtype), grad_rows, TOL[dtype], scale=1 / temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_passes_where_every_exp_underflows(dtype, device):
    """Scale 128 (two passes) with every cosine below -0.85: every logit is below -108, where
    exp underflows fp32 to 0, so the sums hold only by the shift of the rows' running maxima,
    which start at -inf (a start at 0 is never raised by logits all below 0)."""
    B, n_hard = 37, 23
    x, y = _opposed_views(B, n_hard, 48, seed=16)  # [37, 48], [60, 48]
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(17)).to(device)
    _check(x.to(device, dtype), y.to(device, dtype), grad_rows, TOL[dtype], scale=128.0)


def test_two_passes_where_the_positive_towers_over_the_negatives(device):
    """Scale 128 (two passes) with near-copies for positives in D = 256: each row's positive
    logit is over 100 above all its negatives, so the running maxima must take the diagonal
    too: shifted by the negatives' maximum alone, exp(s_ii - m_i) overflows fp32 (past 88.7)
    and lse_i with it. lse_i is s_ii to fp32's precision; the loss and the gradients, ~exp(-100)
    in float64, underflow to (nearly) 0 but stay finite."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    B, scale = 37, 128.0
    x, y = _views(B, 23, 256, torch.float32, device, seed=28, noise=0.01)  # [37, 256], [60, 256]
    cos = F.normalize(x.double(), dim=1) @ F.normalize(y.double(), dim=1).T
    positives = cos[:, :B].diagonal().clone()
    cos[:, :B].diagonal().fill_(-1.0)
    assert scale * (positives - cos.amax(1)).min() > 100.0
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(29)).to(device)
    loss, stats, dx = contrastive_fwd(x, rx, y, ry, scale, grad_rows, budget_bytes=BUDGET)
    dy = contrastive_bwd_dy(x, rx, y, ry, stats, scale, grad_rows, budget_bytes=BUDGET)
    lse = torch.logsumexp(scale * F.normalize(x.double(), dim=1) @ F.normalize(y.double(), dim=1).T, 1)
    assert _rel(stats[0], lse) <= 2e-6
    assert (loss >= 0).all() and loss.max() < 1e-38
    for name, g in (("dx", dx), ("dy", dy)):
        assert torch.isfinite(g).all() and g.abs().max() < 1e-30, name


def test_feature_stride_not_one(device):
    B, D = 37, 48
    x, y = _views(B, 0, D, torch.float32, device, seed=3)
    _check(x.T.contiguous().T, y.T.contiguous().T, torch.full((B,), 2.0 / B, device=device), 1e-5)


def test_zero_rows(device):
    B, n_hard, D = 37, 23, 48
    x, y = _views(B, n_hard, D, torch.float32, device, seed=4)
    x[3] = 0.0  # rx = 1e8, every cosine of row 3 is 0
    y[5] = 0.0  # a zero positive
    y[B + 7] = 0.0  # a zero hard negative
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 1e-5)


@pytest.mark.parametrize("blocks", ["interpreter", "gpu"])
def test_one_row_past_whole_blocks(blocks, monkeypatch, device):
    """B = 129 = 2 * 64 + 1 = 128 + 1 rows: one past whole blocks of the interpreter's row kernel
    (64 rows a program) and column kernel (128 rows a block), and the GPU's (one row a program,
    512 rows a block); the grids' last program holds the single row, whose loss, statistics and
    gradients must be there like the others' (the other tests' row counts, 37, 130, a shard's 56,
    are covered by a grid sized for one row fewer: it is 2 or more rows past whole blocks)."""
    from distillcse.kernels import utils

    if blocks == "gpu":
        monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    B = 129
    x, y = _views(B, 8, 48, torch.float32, device, seed=24)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(25)).to(device)
    _check(x, y, grad_rows, 1e-5)


@pytest.mark.parametrize("n_hard", [0, 3])
@pytest.mark.parametrize("D", [48, 200])
def test_two_rows(D, n_hard, device):
    x, y = _views(2, n_hard, D, torch.float32, device, seed=5, noise=10.0)
    _check(x, y, torch.tensor([0.5, -1.5], device=device), 1e-5)


def test_log1p_unit_matches_float64(device):
    """``tiles.log1p_unit`` (a row's loss ``log1p(l / e_ii)`` while P_ii > 1/2) against float64
    log1p of the same fp32 u, over [0, 1] and on both sides of the switch at 2^-6: below it the
    series (arithmetic alone: two roundings of 2^-24, the 1 - v and the product, plus the
    truncation u^4 / 5 < 1.2e-8 and the inner roundings scaled by u: < 1.35e-7 relative, so a
    coefficient off by 1/20 shows; measured 8.9e-8 here), above it Goldberg's
    quotient (a plain log(1 + u) is up to 2^-18 off there). The interpreter's log is numpy's; on
    a GPU Triton 3.6's fp32 ``tl.log`` is libdevice's ``logf`` (its fma polynomial is in the
    sm_90 PTX of this kernel), within an ulp or two, and the quotient's ``div.full`` within two."""
    u = torch.cat([torch.tensor([0.0, 2.0 ** -6 * (1 - 2.0 ** -24), 2.0 ** -6, 1.0]),
                   2.0 ** torch.linspace(-30.0, 0.0, 4092, dtype=torch.float64)]).float()
    y = torch.empty(u.shape, device=device)
    _log1p_unit_kernel[(1,)](u.to(device), y, N=u.numel())
    ref = torch.log1p(u.double())
    err = (y.cpu().double() - ref).abs() / ref.clamp_min(1e-300)
    series = u < 2.0 ** -6
    assert y[0].item() == 0.0
    assert err[series].max().item() < 1.5e-7, f"series: {err[series].max().item():.2e}"
    assert err[~series].max().item() < 1e-6, f"log: {err[~series].max().item():.2e}"


@pytest.mark.parametrize("D", [5, 300])
def test_feature_dims(D, device):
    """D below a GEMM's usual tile (5) and not a multiple of one (300)."""
    B = 37
    x, y = _views(B, 23, D, torch.float32, device, seed=6)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("slab", [32, 64])
def test_several_slabs(slab, dtype, device):
    """Budgets of ``slab`` rows (and columns) a slab: B = 130 rows in 5 or 3 row slabs (the
    last ragged), N = 153 columns in 5 or 3 column slabs, hard negatives in the last ones; the
    row kernel's columns and the column kernel's rows span several blocks."""
    from distillcse.kernels.contrastive import SLAB_STEP
    from distillcse.kernels.utils import slab_rows

    B, n_hard = 130, 23
    entry = 4 + dtype.itemsize
    budget = slab * (B + n_hard) * entry  # slab rows of N entries; the columns' rows (B entries) fit more
    assert slab_rows(B, B + n_hard, budget, entry, SLAB_STEP) == slab
    assert slab_rows(B + n_hard, B, budget, entry, SLAB_STEP) == slab  # rounded down to the step
    x, y = _views(B, n_hard, 96, dtype, device, seed=11)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(12)).to(device)
    _check(x, y, grad_rows, TOL[dtype], budget=budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_column_blocks_of_a_shard(dtype, device):
    """A shard's rows (start 41: the positives' diagonal at ``diag0``) against the columns as
    two blocks, in several column slabs, against float64: the loss, dx (its rows only; with
    ``add_to``, the other rows left as they are) and dy; ``blocks_needed`` computes only the
    blocks asked for (a frozen bank of hard negatives: no gradient, no work)."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    B, n_hard, D, start, stop = 130, 23, 48, 41, 97
    x, y = _views(B, n_hard, D, dtype, device, seed=21)
    blocks = (y[:B].clone(), y[B:].clone())
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.randn(stop - start, generator=torch.Generator().manual_seed(22)).to(device)
    xd, yd = x.double().requires_grad_(), y.double().requires_grad_()
    logits = SCALE * F.normalize(xd[start:stop], dim=1) @ F.normalize(yd, dim=1).T
    loss_rows = torch.logsumexp(logits, 1) - logits[:, start:stop].diagonal()
    (grad_rows.double() * loss_rows).sum().backward()
    budget = 32 * B * (4 + dtype.itemsize)  # 32-column slabs: 5 for z2, 1 for the hard negatives
    loss, stats, _ = contrastive_fwd(x, rx, blocks, ry, SCALE, budget_bytes=budget, rows=(start, stop))
    assert _rel(loss, loss_rows.detach()) <= TOL[dtype]
    grad_all = torch.zeros(B, device=device).index_copy_(0, torch.arange(start, stop, device=device), grad_rows)
    _, _, dx = contrastive_fwd(x, rx, blocks, ry, SCALE, grad_all, budget_bytes=budget, rows=(start, stop))
    assert _rel(dx, xd.grad.to(dtype).double()) <= TOL[dtype] and not dx[:start].any() and not dx[stop:].any()
    other = torch.randn(B, D, generator=torch.Generator().manual_seed(23)).to(device, dtype)  # another term's dx
    _, _, summed = contrastive_fwd(x, rx, blocks, ry, SCALE, grad_all, budget_bytes=budget, rows=(start, stop),
                                   add_to=other.clone(), add_scale=0.5)
    want = xd.grad[start:stop] + 0.5 * other[start:stop].double()
    assert _rel(summed[start:stop], want.to(dtype).double()) <= TOL[dtype]
    assert torch.equal(summed[:start], other[:start]) and torch.equal(summed[stop:], other[stop:])
    full = contrastive_bwd_dy(x[start:stop], rx[start:stop], blocks, ry, stats, SCALE, grad_rows,
                              budget_bytes=budget, diag0=start)
    for got, want in zip(full, (yd.grad[:B], yd.grad[B:])):
        assert got.dtype == dtype and _rel(got, want.to(dtype).double()) <= TOL[dtype]
    for needed in ((True, False), (False, True)):
        some = contrastive_bwd_dy(x[start:stop], rx[start:stop], blocks, ry, stats, SCALE, grad_rows,
                                  budget_bytes=budget, diag0=start, blocks_needed=needed)
        for got, whole, asked in zip(some, full, needed):
            assert (got is None) != asked and (got is None or torch.equal(got, whole))


def test_column_factors_grid_within_cudas_limits(monkeypatch):
    """At B = 2^25 + 3 rows (past 65,535 row blocks of BB = 512: a second grid axis of row blocks
    is a launch error from B = 33,553,921) and the GPU's blocks, the column kernel's first
    launch is one axis of programs (CUDA allows 2^31 - 1 there), one for every (column block,
    row block). Shapes only: the GEMMs, the buffers and the kernels are stand-ins."""
    from distillcse.kernels import contrastive, utils

    class Launched(Exception):
        pass

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs))
                raise Launched  # the first slab's launch is all this test reads

            return launch

    monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    monkeypatch.setattr(contrastive, "_column_factors_kernel", Recorder())
    monkeypatch.setattr(contrastive, "matmul_f32", lambda a, b, out: out)
    monkeypatch.setattr(contrastive, "slab_buffer",
                        lambda rows, cols, device, dtype=torch.float32: torch.zeros(rows, 1, dtype=dtype).expand(rows, cols))
    B, D = 2**25 + 3, 2
    rows, inv = torch.zeros(1, D, dtype=torch.bfloat16).expand(B, D), torch.ones(1).expand(B)
    budget = 16 << 30  # 85 columns' [B] dots and factors fit: slabs of 64
    with pytest.raises(Launched):
        contrastive.contrastive_bwd_dy(rows, inv, rows, inv, torch.zeros(2, B), SCALE, inv, budget_bytes=budget)
    (grid, blocks), = launches
    assert len(grid) == 1 and grid[0] == utils.cdiv(64, blocks["BC"]) * utils.cdiv(B, blocks["BB"]) < 2**31
    assert utils.cdiv(B, blocks["BB"]) > utils.GRID_AXIS_MAX


@pytest.mark.parametrize("rows, width, budget, entry, expected", [
    (65536, 65536, 128 << 20, 6, 320),  # the forward at the default budget: 341 rows fit, in steps of 32
    (65536, 65536, 64 << 20, 6, 160),  # the backward: half the budget
    (65536, 65536, 128 << 20, 4, 512),  # the loss alone (no factors)
    (4096, 4096, 128 << 20, 6, 4096),  # all rows fit: one slab
    (1 << 20, 1 << 20, 128 << 20, 6, 32),  # a budget below one step: one step
    (20, 1 << 20, 1 << 20, 6, 20),  # ... but never more rows than there are
    (40, 10, 40 * 10 * 4, 4, 40),  # all rows fit exactly: all of them, not rounded down to the step
    (100, 10, 64 * 10 * 4 - 1, 4, 32),  # a byte short of 64 rows: 63 fit, so one step (never over the budget)
])
def test_slab_rows(rows, width, budget, entry, expected):
    from distillcse.kernels.contrastive import SLAB_STEP
    from distillcse.kernels.utils import slab_rows

    assert slab_rows(rows, width, budget, entry, SLAB_STEP) == expected


def _gemm_copies(M, K, N):
    """Bytes of the k-slice fp32 copies of a [M, K] x [K, N] ``matmul_f32`` on the CPU ([M, k] and
    [k, N], k = min(64, K); a GPU's one cuBLAS call makes none)."""
    return min(64, K) * (M + N) * 4


SCALARS = 1024  # bytes a bound leaves to 1-element tensors (g_max) and a shard's [2, n] statistics


@pytest.mark.parametrize("grad", [False, True])
def test_slab_buffers_within_budget(grad):
    """Counted allocation by allocation (``TensorMemory``): the forward's extra memory is its
    outputs (loss, stats, dx and the rows' gradient scale), one slab's dots (of ``rows`` rows) and
    factors within the budget and its [R, D] fp32 rows; the backward's, dy, the slab buffers and
    [C, D] fp32 rows; nothing B x N, and no copy of the bf16 rows (fp16 alone copies its unit rows)."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd
    from distillcse.tensor_memory import TensorMemory

    B, n_hard, D = 260, 40, 32
    N = B + n_hard
    x, y = _views(B, n_hard, D, torch.bfloat16, DEVICE, seed=13)
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.full((B,), 1.0 / B, device=DEVICE) if grad else None
    budget = 64 * N * 6  # 64 rows a slab with factors, 96 without (4 bytes an entry)
    with TensorMemory() as mem:
        loss, stats, dx = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, budget_bytes=budget)
    outputs = B * 4 * 3 + (B * D * 2 + B * 4 if grad else 0)
    rows = 64 if grad else 96
    assert mem.largest[:2] == (rows * N * 4, (rows, N))  # the dots' slab
    # one GEMM's copies at a time: the dots x y^T, then the factors times y
    gemms = max(_gemm_copies(rows, D, N), _gemm_copies(rows, N, D) if grad else 0)
    bound = outputs + budget + (rows * D * 4 if grad else 0) + gemms + SCALARS
    assert mem.peak <= bound, (mem.peak, bound, mem.at_peak[:6])
    if not grad:
        return
    with TensorMemory() as mem:
        contrastive_bwd_dy(x, rx, y, ry, stats, SCALE, grad_rows, budget_bytes=budget)
    cols = 64  # [C, B] slabs of 6-byte entries: 64 N / B = 73 columns fit, in steps of 32
    bound = N * D * 2 + cols * B * 6 + cols * D * 4 + max(_gemm_copies(cols, D, B), _gemm_copies(cols, B, D)) + SCALARS
    assert mem.peak <= bound, (mem.peak, bound, mem.at_peak[:6])


def test_padded_slab_buffers_within_budget(monkeypatch):
    """With every slab padded (``PAD_MIN_COLS`` 0: rows of aligned(N) = 160 entries for N = 153,
    columns of aligned(B) = 144 for B = 130), the slab heights count the padded rows: a budget
    that holds 64 unpadded slab rows (columns) of dots and factors holds 32 padded ones, and the
    buffers stay within it."""
    from distillcse.kernels import utils
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd
    from distillcse.tensor_memory import TensorMemory

    monkeypatch.setattr(utils, "PAD_MIN_COLS", 0)
    B, n_hard, D = 130, 23, 32
    N = B + n_hard
    x, y = _views(B, n_hard, D, torch.bfloat16, DEVICE, seed=26)
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.full((B,), 1.0 / B, device=DEVICE)
    budget = 64 * N * 6  # 64 unpadded rows (and columns: 64 (6 B + 4 D) fit too), 61 padded rows
    assert 64 * (6 * B + 4 * D) <= budget < 64 * (6 * utils.aligned(B) + 4 * D)
    with TensorMemory() as mem:
        _, stats, _ = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, budget_bytes=budget)
    assert mem.largest[:2] == (32 * 160 * 4, (32, 160))  # the dots' slab, the factors' beside it
    with TensorMemory() as mem:
        contrastive_bwd_dy(x, rx, y, ry, stats, SCALE, grad_rows, budget_bytes=budget)
    assert mem.largest[:2] == (32 * 144 * 4, (32, 144))
    assert 32 * (144 * 6 + 4 * D) <= budget


def test_slab_buffers_of_a_shard():
    """A shard of n = 8 rows (``rows=``; D = 256, bf16), counted as above: the forward's slab holds
    the shard's rows, not the batch's, and the backward's column slabs count each column's [D] fp32
    row of du with its n dots and factors (a shard's few rows make that row the larger part)."""
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd
    from distillcse.tensor_memory import TensorMemory

    B, n_hard, D, start, stop = 130, 23, 256, 41, 49
    N, n = B + n_hard, stop - start
    x, y = _views(B, n_hard, D, torch.bfloat16, DEVICE, seed=14)
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.full((B,), 1.0 / B, device=DEVICE)
    budget = 64 * (n * 6 + D * 4)  # 64 columns a backward slab; the forward's 8 rows fit
    with TensorMemory() as mem:
        _, stats, _ = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, budget_bytes=budget, rows=(start, stop))
    outputs = B * 4 * 4 + B * D * 2  # loss, stats, the gradient scale, dx (its rows outside the shard 0)
    bound = outputs + n * N * 6 + n * D * 4 + max(_gemm_copies(n, D, N), _gemm_copies(n, N, D)) + SCALARS
    assert mem.peak <= bound, (mem.peak, bound, mem.at_peak[:6])
    with TensorMemory() as mem:
        contrastive_bwd_dy(x[start:stop], rx[start:stop], y, ry, stats, SCALE, grad_rows[start:stop],
                           budget_bytes=budget, diag0=start)
    cols = 64
    bound = N * D * 2 + cols * (n * 6 + D * 4) + max(_gemm_copies(cols, D, n), _gemm_copies(cols, n, D)) + SCALARS
    assert mem.peak <= bound, (mem.peak, bound, mem.at_peak[:6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_adds_another_gradient_in_place(dtype, device):
    """``add_to``: dx is written into the given tensor as dx + add_scale * its values."""
    from distillcse.kernels.contrastive import contrastive_fwd

    B, D = 37, 200
    x, y = _views(B, 23, D, dtype, device, seed=2)
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.full((B,), 1.0 / B, device=device)
    budget = 32 * 60 * 6  # two slabs: 32 rows, then 5
    loss, _, dx = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, budget_bytes=budget)
    other = torch.randn(B, D, generator=torch.Generator().manual_seed(3)).to(device, dtype) * dx.double().abs().max().item()
    want = dx.double() + 0.3 * other.double()
    buffer = other.clone()
    loss_again, _, dx_sum = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, budget_bytes=budget,
                                            add_to=buffer, add_scale=0.3)
    assert dx_sum.data_ptr() == buffer.data_ptr()
    assert torch.equal(loss_again, loss)
    assert _rel(dx_sum, want) <= (1e-6 if dtype == torch.float32 else 2e-3)

def test_hard_negatives_time_script(capsys):
    """``benchmarks/hard_negatives_time.py`` (the GPU check of hard negatives' cost) runs and
    prints a row of figures for each H (off CUDA the memory is counted: the hard negatives'
    gradient and the slabs; frozen, no gradient for them); a bad option is a clear error."""
    from conftest import benchmark_module

    benchmark_module("hard_negatives_time").main(["--B", "70", "--D", "64", "--hard", "0", "200", "--dtype", "float32"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r[0].strip() for r in rows[2:]] == ["0", "200"]
    for cells in rows[2:]:
        figures = [float(cells[i]) for i in (1, 2, 5, 6)] + ([float(cells[3]), float(cells[4])]
                                                              if cells[0].strip() != "0" else [])
        assert all(f > 0 for f in figures)
    trained, frozen = float(rows[3][2]), float(rows[3][4])
    assert (trained - frozen) * 2**20 >= 0.99 * 200 * 64 * 4  # the hard negatives' fp32 gradient (4-digit MiB)
    for bad, says in ((["--hard", "-1"], "expected a number >= 0, got -1"), (["--B", "1"], "expected a number >= 2")):
        with pytest.raises(SystemExit):
            benchmark_module("hard_negatives_time").main(bad)
        assert says in capsys.readouterr().err
