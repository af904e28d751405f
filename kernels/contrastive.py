"""InfoNCE contrastive term (SPEC section 1), forward and backward, in row and column slabs.

``c_ij = (x_i . y_j) rx_i ry_j`` for ``i < B``, ``j < N``: rows ``0..B-1`` of ``y`` are the
second view, rows ``B..N-1`` hard negatives; y may come as those two blocks, which the GEMMs
read where they are (into and out of column ranges of the slabs: no [N, D] concatenation).
With ``scale = 1 / temperature``, ``s = scale c``, ``P_ij = exp(s_ij - lse_i)``, ``g`` the
upstream gradient of the row losses:
  forward   per slab of R rows, cuBLAS writes the raw dots ``x[slab] y^T`` [R, N] in fp32 and
            ``_row_factors_kernel`` takes ``lse_i``, the loss and ``1 - P_ii`` from them,
            and writes the factors ``M_ij = (P_ij - [i == j]) ry_j`` [R, N]; one more GEMM,
            ``M y``, times ``scale g_i`` is the slab rows' ``du_x``, which
            ``unit_rows_backward`` takes through ``u = x rx``. For bf16 and fp32 at
            ``scale <= ONE_PASS_MAX_SCALE`` (``one_pass``) the kernel reads the dots once: the
            logits shifted by ``scale`` (no row maximum needed), the factors unnormalised
            (``L_i M_ij``, ``L_i`` the row's sum) and ``1 / L_i`` moved into the row scale.
  backward  per slab of C columns of y, cuBLAS writes ``y[slab] x^T`` [C, B], and the
            elementwise ``_column_factors_kernel`` writes ``M'_ji = (g_i / g_max) (P_ij - [i == j]) rx_i``
            from the saved ``lse`` (the diagonal's ``1 - P_ii`` saved too: no cancellation);
            ``M' x`` times ``scale g_max`` is the slab's ``du_y``.
Four GEMM-equivalents (1 = one B x N x D product), all cuBLAS at its own rate (the fused
kernels this design replaced ran at ~24% of it on an H200, benchmarks/session_log.md, Session 13),
and memory-bound passes over the slab buffers: the row kernel reads the dots once (twice for
fp16 or a larger scale) and writes the factors (6 bytes an entry in 16 bits, 10 with two
reads), the column kernel reads once and writes (6). The
B x N logits never exist whole: the slab buffers stay within the caller's ``budget_bytes``.
The factors take the inputs' dtype (fp32 GEMMs follow PyTorch's TF32 switch, as
``dot_precision`` does). fp16 cannot hold ``P_ij ry_j`` for every row norm, so for fp16 the
second GEMMs take a copy of the unit rows ``y ry`` (``x rx``) and the factors leave the norms
out (``RAW`` false); bf16 and fp32 have fp32's range and take the raw rows.
"""

import torch
import triton
import triton.language as tl

from . import utils
from .distill import unit_rows_backward
from .tiles import log1p_unit
from .utils import aligned, cdiv, matmul_f32, slab_buffer, slab_rows, unit_stride_rows

SLAB_STEP = 32  # slab rows (columns) come in multiples of this, when the budget cuts them
UNIT_COPY_ROWS = 4096  # rows a step of fp16's unit-row copy
# The row kernel's one pass shifts the logits by scale: exp(s - scale) >= exp(-2 scale) = 1.6e-28
# at this scale (temperature 1/32), leaving 10 decades of fp32's (and bf16's) normal range for ry_j
ONE_PASS_MAX_SCALE = 32.0


@triton.jit
def _row_factors_kernel(
    dots,  # [R, N] fp32 raw dots x_r . y_j of the slab rows, row stride ld (``utils.slab_buffer``)
    rx,  # [B] fp32 inverse norms
    ry,  # [N] fp32 inverse norms
    loss,  # [B] fp32 out: lse_i - s_ii
    stats,  # [2, B] fp32 out: lse_i and 1 - P_ii = sum_{j != i} P_ij
    row_scale,  # [B] fp32 in/out (GRAD and ONE_PASS): the rows' gradient scale, divided by L_i
    fac,  # [R, N] out (GRAD), factor dtype, row stride ld: M_ij = (P_ij - [i == j]) (ry_j if RAW),
    #       with ONE_PASS L_i times that
    row0, R, B, N, ld, scale,
    BR: tl.constexpr, BN: tl.constexpr, GRAD: tl.constexpr, RAW: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """Rows ``i = row0 + o_r`` (BR slab rows a program): the sums ``l_i`` over ``j != i`` and
    ``L_i = l_i + e_ii`` of ``e_ij = exp(s_ij - m_i)``, then lse_i, the loss and ``1 - P_ii = l_i / L_i``
    (the diagonal's ``P_ii - 1 = -l_i / L_i``, without cancellation).
    ONE_PASS: m_i = scale, the largest logit a cosine gives (``one_pass``: then no e_ij
    underflows), so the factors go out in the same pass, unnormalised (``L_i M_ij``, the
    diagonal's ``-l_i`` once the row is summed), and ``row_scale_i`` is divided by L_i: one
    read of the dots. Otherwise an online logsumexp (per lane, the maximum over all columns),
    then with GRAD a second pass writing the factors. Loads and stores run under the rows' mask
    and the aligned bound ld only (vectorised; the padding's dots are 0, its factors written 0),
    the diagonal and the columns past N by selects."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR] slab-local rows
    m_r = o_r < R
    o_i = row0 + o_r  # [BR] batch rows
    p_dots = dots + o_r[:, None] * ld  # [BR, 1]
    p_fac = fac + o_r[:, None] * ld
    b_cx = scale * tl.load(rx + o_i, mask=m_r, other=0.0)  # [BR]
    b_ryi = tl.load(ry + o_i, mask=m_r, other=0.0)
    b_sii = b_cx * tl.load(dots + o_r * ld + o_i, mask=m_r, other=0.0) * b_ryi
    if ONE_PASS:
        b_sum = tl.zeros([BR, BN], dtype=tl.float32)  # per-lane sums of e_ij, j != i
        for j0 in range(0, N, BN):
            o_n = j0 + tl.arange(0, BN).to(tl.int64)
            m_ld = m_r[:, None] & (o_n < ld)[None, :]  # (the diagonal in it made them element by element, sm_90a)
            b_ry = tl.load(ry + o_n, mask=o_n < N, other=0.0)
            b_s = b_cx[:, None] * tl.load(p_dots + o_n[None, :], mask=m_ld, other=0.0) * b_ry[None, :]
            b_e = tl.where(m_ld & (o_n < N)[None, :] & (o_n[None, :] != o_i[:, None]), tl.exp(b_s - scale), 0.0)
            b_sum += b_e
            if GRAD:
                if RAW:
                    b_e = b_e * b_ry[None, :]
                tl.store(p_fac + o_n[None, :], b_e.to(fac.dtype.element_ty), mask=m_ld)  # the diagonal: 0, then below
        b_m = tl.where(m_r, scale, 0.0)
        b_l = tl.sum(b_sum, 1)
    else:
        b_max = tl.full([BR, BN], float("-inf"), dtype=tl.float32)  # per-lane running maxima
        b_sum = tl.zeros([BR, BN], dtype=tl.float32)  # per-lane sums of exp(s_ij - b_max), j != i
        for j0 in range(0, N, BN):
            o_n = j0 + tl.arange(0, BN).to(tl.int64)
            m = m_r[:, None] & (o_n < N)[None, :]
            b_ry = tl.load(ry + o_n, mask=o_n < N, other=0.0)
            b_s = b_cx[:, None] * tl.load(p_dots + o_n[None, :], mask=m_r[:, None] & (o_n < ld)[None, :],
                                          other=0.0) * b_ry[None, :]
            b_s = tl.where(m, b_s, float("-inf"))
            b_new = tl.maximum(b_max, b_s)
            b_shift = tl.where(b_new == float("-inf"), 0.0, b_new)  # lanes without a column yet: no NaN
            b_e = tl.where(o_n[None, :] == o_i[:, None], 0.0, tl.exp(b_s - b_shift))
            b_sum = b_sum * tl.exp(b_max - b_shift) + b_e
            b_max = b_new
        b_m = tl.max(b_max, 1)  # [BR] >= s_ii, finite on valid rows (B >= 2: every row has a column)
        b_m = tl.where(m_r, b_m, 0.0)
        b_l = tl.sum(b_sum * tl.exp(b_max - b_m[:, None]), 1)
    b_eii = tl.exp(b_sii - b_m)
    b_total = b_l + b_eii
    b_log_total = tl.log(b_total)
    b_lse = b_m + b_log_total
    b_miss = b_l / b_total
    tl.store(stats + o_i, b_lse, mask=m_r)
    tl.store(stats + B + o_i, b_miss, mask=m_r)
    # loss_i = -log P_ii = log1p(l_i / e_ii) while P_ii > 1/2, so that small losses keep their
    # relative precision; beyond, (m_i - s_ii) + log L_i (no division by an underflowed e_ii)
    b_loss = tl.where(b_l < b_eii, log1p_unit(tl.minimum(b_l / b_eii, 1.0)), (b_m - b_sii) + b_log_total)
    tl.store(loss + o_i, b_loss, mask=m_r)
    if GRAD:
        if ONE_PASS:  # the diagonal L_i (P_ii - 1) = -l_i; the GEMM's row i then times 1 / L_i
            b_d = -b_l
            if RAW:
                b_d = b_d * b_ryi
            tl.debug_barrier()  # the loop's 0 on the diagonal (another thread's store) lands first
            tl.store(fac + o_r * ld + o_i, b_d.to(fac.dtype.element_ty), mask=m_r)
            tl.store(row_scale + o_i, tl.load(row_scale + o_i, mask=m_r, other=0.0) / b_total, mask=m_r)
        else:
            for j0 in range(0, N, BN):
                o_n = j0 + tl.arange(0, BN).to(tl.int64)
                m = m_r[:, None] & (o_n < N)[None, :]
                m_ld = m_r[:, None] & (o_n < ld)[None, :]
                b_ry = tl.load(ry + o_n, mask=o_n < N, other=0.0)
                b_s = b_cx[:, None] * tl.load(p_dots + o_n[None, :], mask=m_ld, other=0.0) * b_ry[None, :]
                b_p = tl.exp(tl.where(m, b_s, float("-inf")) - b_lse[:, None])  # masked lanes 0, not exp(-lse)
                b_p = tl.where(o_n[None, :] == o_i[:, None], -b_miss[:, None], b_p)  # P_ij - [i == j]
                if RAW:
                    b_p = b_p * b_ry[None, :]
                tl.store(p_fac + o_n[None, :], b_p.to(fac.dtype.element_ty), mask=m_ld)


@triton.jit
def _column_factors_kernel(
    dots,  # [C, B] fp32 raw dots y_j . x_i of the slab columns, row stride ld (``utils.slab_buffer``)
    rx,  # [B] fp32 inverse norms
    ry,  # [N] fp32 inverse norms
    stats,  # [2, B] fp32 from the forward: lse_i and 1 - P_ii
    g,  # [B] fp32 dL/dloss_i
    g_max,  # [1] fp32 max_i |g_i| (1 if all are 0)
    fac,  # [C, B] out, factor dtype, row stride ld: M'_ji = (g_i / g_max) (P_ij - [diag0 + i == j]) (rx_i if RAW)
    col0, C, B, ld, scale, diag0,
    BC: tl.constexpr, BB: tl.constexpr, RAW: tl.constexpr,
):
    """A [BC, BB] block of the factors of columns ``col0 + [0, C)`` against rows i, row i's
    positive the column ``diag0 + i`` (a shard of the batch's rows from ``diag0`` on);
    elementwise. A 1-D grid, column blocks fastest: B / BB row blocks on a second axis would
    pass the 65,535 programs CUDA allows there from B = 33,553,921 (BB = 512)."""
    col_blocks = tl.cdiv(C, BC)
    o_c = (tl.program_id(0) % col_blocks).to(tl.int64) * BC + tl.arange(0, BC)  # slab-local columns
    o_i = (tl.program_id(0) // col_blocks).to(tl.int64) * BB + tl.arange(0, BB)
    m_c, m_i = o_c < C, o_i < B
    m = m_c[:, None] & m_i[None, :]
    b_ry = tl.load(ry + col0 + o_c, mask=m_c, other=0.0)
    b_rx = tl.load(rx + o_i, mask=m_i, other=0.0)
    b_lse = tl.load(stats + o_i, mask=m_i, other=0.0)
    b_miss = tl.load(stats + B + o_i, mask=m_i, other=0.0)
    b_coef = tl.load(g + o_i, mask=m_i, other=0.0) / tl.load(g_max)  # |g_i / g_max| <= 1: no range issue
    if RAW:
        b_coef = b_coef * b_rx
    p = o_c[:, None] * ld + o_i[None, :]
    m_ld = m_c[:, None] & (o_i < ld)[None, :]  # loads and stores under the aligned bound (the padding: 0)
    b_s = scale * tl.load(dots + p, mask=m_ld, other=0.0) * b_ry[:, None] * b_rx[None, :]
    b_p = tl.exp(tl.where(m, b_s, float("-inf")) - b_lse[None, :])  # masked lanes 0, not exp(-lse)
    b_p = tl.where(col0 + o_c[:, None] == diag0 + o_i[None, :], -b_miss[None, :], b_p)  # P_ij - [i == j]
    tl.store(fac + p, (b_coef[None, :] * b_p).to(fac.dtype.element_ty), mask=m_ld)


def _factor_rows(v, r):
    """(rows, RAW) of a slab's second GEMM, whose factors take v's dtype: the raw rows v
    themselves (the factors then carry the norms: RAW), or for fp16 a copy of the unit rows
    ``v r`` (|u| <= 1), as fp16 factors could not hold ``P_ij r_j`` for every row norm (made in
    row chunks: no fp32 copy of v)."""
    if v.dtype != torch.float16:
        return v, True
    u = torch.empty_like(v)
    for r0 in range(0, v.shape[0], UNIT_COPY_ROWS):
        rows = slice(r0, r0 + UNIT_COPY_ROWS)
        torch.mul(v[rows], r[rows, None], out=u[rows])  # fp32 products, rounded once to v's dtype
    return u, False


def one_pass(dtype, scale) -> bool:
    """Whether the row kernel takes the loss and the factors in one read of the dots (shifted by
    ``scale``, the largest logit: ``_row_factors_kernel``): for ``scale <= ONE_PASS_MAX_SCALE``
    and factors with fp32's range (not fp16, whose unnormalised factors would underflow)."""
    return dtype != torch.float16 and float(scale) <= ONE_PASS_MAX_SCALE


def _blocks() -> dict:
    """Launch keywords: the row kernel streams BN columns a step for BR rows (memory-bound; on
    a GPU one row a program, so that a slab of a few hundred rows still fills the SMs); the
    column kernel's [BC, BB] blocks run along the rows' contiguous axis. Under the interpreter,
    many rows a program (each program is Python time) and columns narrow enough that the
    tests' rows take several steps."""
    if utils.interpreter_blocks():
        return dict(rows=dict(BR=64, BN=128), cols=dict(BC=32, BB=128))
    return dict(rows=dict(BR=1, BN=2048, num_warps=8), cols=dict(BC=8, BB=512, num_warps=4))


def _column_blocks(y):
    """y's blocks, [(col0, block [N_k, D])]: y is one [N, D] tensor, or a sequence of blocks whose
    rows are y's side by side (z2, then the hard negatives: no [N, D] concatenation)."""
    blocks, col0 = [], 0
    for block in ((y,) if isinstance(y, torch.Tensor) else y):
        blocks.append((col0, unit_stride_rows(block)))
        col0 += block.shape[0]
    return blocks


def _check(x, rx, y, ry, diag0=0):
    """(x, rx, y's blocks ``_column_blocks``, ry, N)."""
    blocks = _column_blocks(y)
    N = sum(block.shape[0] for _, block in blocks)
    assert x.dim() == 2 and all(b.dim() == 2 and b.shape[1] == x.shape[1] for _, b in blocks), "x [B, D], y [N, D]"
    assert all(b.dtype == x.dtype for _, b in blocks), "x and y must share a dtype"
    assert x.shape[0] >= 1 and N >= max(2, diag0 + x.shape[0]) and blocks[0][1].shape[0] >= diag0 + x.shape[0], \
        "N >= diag0 + B, N >= 2: rows diag0..diag0+B-1 of y (its first block) are the positives"
    assert rx.shape == (x.shape[0],) and ry.shape == (N,)
    assert rx.dtype == ry.dtype == torch.float32
    return unit_stride_rows(x), rx.contiguous(), blocks, ry.contiguous(), N


def contrastive_fwd(x, rx, y, ry, scale, grad_rows=None, *, budget_bytes, add_to=None, add_scale=0.0, rows=None):
    """x [B, D], rx [B], y [N, D] (or its column blocks, ``_column_blocks``), ry [N]; returns
    (loss_rows [B], stats [2, B], dx): fp32
    ``loss_rows_i = lse_i - scale c_ii``, ``stats`` = (``lse_i = logsumexp_{j<N}(scale c_ij)``,
    ``1 - P_ii``) for ``contrastive_bwd_dy``, and with ``grad_rows`` [B] fp32 the gradient of
    ``sum_i grad_rows_i loss_rows_i`` w.r.t. the raw rows x, through ``u_x = x rx``
    (``rx = 1 / max(|x|, eps)``), in x's dtype, accumulated in fp32 (None without
    ``grad_rows``). With ``add_to`` (a [B, D] tensor in x's dtype, feature stride 1, another
    term's gradient), dx is ``add_to`` itself, overwritten with dx + add_scale add_to.
    ``rows=(start, stop)``: those rows only (a shard): loss_rows and stats are theirs, [stop - start]
    and [2, stop - start], and only those rows of dx are computed (dx's others are 0; add_to's
    are left as they are).
    Extra memory besides dx: the [R, N] slab buffers within ``budget_bytes`` (at least
    ``SLAB_STEP`` rows), [R, D] fp32 (twice with several blocks of y), and for fp16 a copy of
    y's unit rows.
    """
    x, rx, blocks, ry, N = _check(x, rx, y, ry)
    B, D = x.shape
    start, stop = (0, B) if rows is None else rows
    loss = torch.empty(B, device=x.device, dtype=torch.float32)
    stats = torch.empty(2, B, device=x.device, dtype=torch.float32)
    dx = None
    if grad_rows is not None:
        row_scale = float(scale) * grad_rows.float().contiguous()  # du_x_i = scale g_i (M y)_i; a new tensor
        assert row_scale.shape == (B,)
        if add_to is None:
            dx = (torch.empty if (start, stop) == (0, B) else torch.zeros)(B, D, device=x.device, dtype=x.dtype)
        else:
            assert add_to.shape == (B, D) and add_to.dtype == x.dtype and add_to.stride(-1) == 1
            dx = add_to
        factor_rows = [(col0, *_factor_rows(block, ry[col0:col0 + block.shape[0]])) for col0, block in blocks]
        raw = factor_rows[0][2]  # (every block's: one dtype)
    else:
        assert add_to is None, "add_to needs grad_rows"
        raw = True
    R = slab_rows(stop - start, aligned(N), budget_bytes, 4 + (x.element_size() if dx is not None else 0), SLAB_STEP)
    dots = slab_buffer(R, N, x.device)
    fac = slab_buffer(R, N, x.device, x.dtype) if dx is not None else dots
    if dx is not None:  # a slab's dL/du_x, and a later block's share of it: PyTorch's fp32-output
        # GEMM (``out_dtype``) adds only a matrix of the inputs' dtype, so the share goes apart
        du = torch.empty(R, D, device=x.device, dtype=torch.float32)
        du_block = torch.empty_like(du) if len(blocks) > 1 else None
    blocks_kw = _blocks()["rows"]
    for row0 in range(start, stop, R):
        rows = slice(row0, min(row0 + R, stop))
        n = rows.stop - row0
        for col0, block in blocks:
            matmul_f32(x[rows], block.T, out=dots[:n, col0:col0 + block.shape[0]])
        _row_factors_kernel[(cdiv(n, blocks_kw["BR"]),)](
            dots, rx, ry, loss, stats, row_scale if dx is not None else loss, fac, row0, n, B, N, dots.stride(0),
            float(scale),
            GRAD=dx is not None, RAW=raw, ONE_PASS=one_pass(x.dtype, scale), **blocks_kw)
        if dx is not None:  # (with one pass, the factors are L_i M and row_scale holds scale g_i / L_i)
            for k, (col0, v, _) in enumerate(factor_rows):  # [n, D] fp32: dL/du_x of the slab rows, up to scale g_i
                matmul_f32(fac[:n, col0:col0 + v.shape[0]], v, out=du[:n] if k == 0 else du_block[:n])
                if k:
                    du[:n] += du_block[:n]
            unit_rows_backward(du[:n], x[rows], rx[rows], dx[rows], row_scale=row_scale[rows],
                               add_scale=None if add_to is None else add_scale)
    return loss[start:stop], stats[:, start:stop], dx


def contrastive_bwd_dy(x, rx, y, ry, stats, scale, grad_rows, *, budget_bytes, diag0=0, blocks_needed=None):
    """Gradient of L = sum_i grad_rows_i loss_rows_i w.r.t. the raw rows y, through u_y = y ry:
    x [B, D], rx [B], y [N, D] (or its column blocks: then a tuple of their gradients), ry [N],
    stats [2, B] (from ``contrastive_fwd``), grad_rows [B] fp32; returns dy [N, D] in y's dtype,
    accumulated in fp32. ``diag0``: x is a shard of the batch's rows from ``diag0`` on (row i's
    positive is y's row diag0 + i). ``blocks_needed`` (a bool a block): the blocks whose
    gradient is computed, None in place of the others' (a column's gradient needs only its own
    dots and the rows' saved statistics). Extra memory besides dy: the [C, B] slab buffers and
    [C, D] fp32 within ``budget_bytes``, and for fp16 a copy of x's unit rows."""
    x, rx, blocks, ry, N = _check(x, rx, y, ry, diag0)
    B, D = x.shape
    assert stats.shape == (2, B) and stats.dtype == torch.float32
    stats, grad_rows = stats.contiguous(), grad_rows.float().contiguous()
    g_max = grad_rows.abs().amax().reshape(1)
    g_max = torch.where(g_max > 0, g_max, 1.0)
    if blocks_needed is None:
        blocks_needed = [True] * len(blocks)
    assert len(blocks_needed) == len(blocks) and any(blocks_needed)
    dys = [torch.empty_like(block, memory_format=torch.contiguous_format) if needed else None
           for (_, block), needed in zip(blocks, blocks_needed)]
    # a column's [B] dots and factors and its [D] fp32 du: a shard's few rows make C large
    C = slab_rows(N, 1, budget_bytes, aligned(B) * (4 + x.element_size()) + 4 * D, SLAB_STEP)
    dots = slab_buffer(C, B, x.device)
    fac = slab_buffer(C, B, x.device, x.dtype)
    du = torch.empty(C, D, device=x.device, dtype=torch.float32)  # a slab's dL/du_y
    v, raw = _factor_rows(x, rx)
    dy_scale = float(scale) * g_max  # du_y = scale g_max (M' x)
    blocks_kw = _blocks()["cols"]
    for (block0, block), dy in zip(blocks, dys):
        if dy is None:
            continue
        for col0 in range(0, block.shape[0], C):
            cols = slice(col0, min(col0 + C, block.shape[0]))
            n = cols.stop - col0
            matmul_f32(block[cols], x.T, out=dots[:n])
            _column_factors_kernel[(cdiv(n, blocks_kw["BC"]) * cdiv(B, blocks_kw["BB"]),)](
                dots, rx, ry, stats, grad_rows, g_max, fac, block0 + col0, n, B, dots.stride(0), float(scale), diag0,
                RAW=raw, **blocks_kw)
            matmul_f32(fac[:n], v, out=du[:n])  # [n, D] fp32: the slab columns' dL/du_y, up to scale g_max
            unit_rows_backward(du[:n], block[cols], ry[block0 + col0:block0 + cols.stop], dy[cols],
                               row_scale=dy_scale)
    return dys[0] if isinstance(y, torch.Tensor) else tuple(dys)
