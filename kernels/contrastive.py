"""InfoNCE contrastive term (SPEC section 1), forward and backward, never materialising B x N.

``c_ij = (x_i . y_j) rx_i ry_j`` for ``i < B``, ``j < N``: rows ``0..B-1`` of ``y`` are the
second view, rows ``B..N-1`` hard negatives. With ``scale = 1 / temperature``, ``s = scale c``:
  forward   ``lse_i = logsumexp_j(s_ij)``, ``loss_i = lse_i - s_ii``, and (with ``grad_rows``)
            dx, flash-attention-forward style: ``sum_j P_ij u_y_j`` accumulated against a
            running row maximum, so the row-side gradient costs no second pass;
  backward  dy only, ``P_ij = exp(s_ij - lse_i)`` recomputed tile by tile from the saved
            ``lse`` by a column-block kernel (no atomics), the diagonal's ``1 - P_ii`` saved
            from the forward's off-diagonal sum (no cancellation where P_ii is near 1).
Each program of the dx-writing forward and of the dy kernel holds up to 4 output blocks of
features (cost and register budget in the comment above ``_accumulate_rows``); gradients are
written w.r.t. the raw rows, the normalisation's backward fused.
"""

import torch
import triton
import triton.language as tl

from . import utils
from .tiles import dot_chunk, dot_tile, log1p_unit
from .utils import dot_precision, unit_stride_rows


@triton.jit
def _logits_tile(
    x,  # [B, D]
    rx,  # [B]
    y,  # [N, D]
    ry,  # [N]
    o_m, m_m,  # [BM] row offsets (int64) and mask
    o_n, m_n,  # [BN] column offsets (int64) and mask
    D, s_x, s_y, scale,
    BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """scale * c_ij for a [BM, BN] tile, the dot accumulated over D in chunks of BD: the dy
    kernel's tiles (the forward sums the same chunks in the same order through ``dot_chunk``
    and scales them in the same order). The dy kernel's P_ij = exp(s_ij - lse_i) then matches
    the forward's up to the rounding of a logit summed in another order, where its tile differs
    (relative ~|s| eps: no cancellation, as the diagonal's 1 - P_ii comes from the forward)."""
    b_dot = dot_tile(x, y, o_m, m_m, o_n, m_n, D, s_x, s_y, BD, PRECISION)  # [BM, BN]
    b_rx = tl.load(rx + o_m, mask=m_m, other=0.0)
    b_ry = tl.load(ry + o_n, mask=m_n, other=0.0)
    return scale * (b_dot * b_rx[:, None] * b_ry[None, :])


@triton.jit
def _contrastive_fwd_kernel(
    x,  # [B, D] any float dtype, row stride s_x
    rx,  # [B] fp32 inverse norms
    y,  # [N, D] same dtype as x, row stride s_y
    ry,  # [N] fp32 inverse norms
    loss,  # [B] fp32 out: lse_i - s_ii (written by feature split 0)
    stats,  # [2, B] fp32 out: lse_i = logsumexp_j(s_ij) and 1 - P_ii = sum_{j != i} P_ij (split 0)
    g,  # [B] fp32 dL/dloss_i (GRAD)
    dx,  # [B, D] out in x's dtype, row stride s_dx (GRAD; with ADD also in: a gradient to add)
    B, N, D, s_x, s_y, s_dx, scale, add_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BD_OUT: tl.constexpr, N_OUT: tl.constexpr,
    PRECISION: tl.constexpr, GRAD: tl.constexpr, ADD: tl.constexpr,
):
    """Row block i_m (grid axis 0): column tiles of y streamed with an online logsumexp. With
    GRAD, also dL/dx for the N_OUT BD_OUT output features of split i_d (grid axis 1), from
    du_x_i = scale g_i sum_j (P_ij - [i == j]) u_y_j. Against the running maximum m_i, the
    off-diagonal ``l_i = sum_{j != i} e_ij``, ``e_ij = exp(s_ij - m_i)``, ``a_i = sum_{j != i}
    e_ij u_y_j`` and ``sum_{j != i} e_ij s_ij`` are rescaled whenever m_i grows; with the total
    ``L_i = l_i + e_ii``, ``du_x_i = (scale g_i / L_i)(a_i - l_i u_y_i)``: the diagonal's
    ``P_ii - 1 = -l_i / L_i`` comes without cancellation. With ADD, ``add_scale`` times dx's
    incoming values are added (another term's gradient)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B

    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)  # m_i, the running max of s_ij
    b_sum = tl.zeros([BM], dtype=tl.float32)  # l_i
    b_diag = tl.zeros([BM], dtype=tl.float32)  # s_ii
    if GRAD:
        o_d = i_d * (N_OUT * BD_OUT) + tl.arange(0, BD_OUT)  # [BD_OUT] features of accumulator 0 (k: + k BD_OUT)
        b_radial = tl.zeros([BM], dtype=tl.float32)  # sum_{j != i} e_ij s_ij
        b_acc0 = tl.zeros([BM, BD_OUT], dtype=tl.float32)  # a_i
        if N_OUT > 1:
            b_acc1 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
        if N_OUT > 2:
            b_acc2 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
        if N_OUT > 3:
            b_acc3 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
    b_rx_m = tl.load(rx + o_m, mask=m_m, other=0.0)
    n_k = tl.cdiv(D, BD)
    b_dot = tl.zeros([BM, BN], dtype=tl.float32)
    # One loop over (column tile, feature chunk) pairs, the tile finished at its last chunk, not
    # a chunk loop (dot_tile) nested in the tile loop: compiled for sm_90a the nest emptied the
    # software pipeline at every tile (async_wait 0 in the GPU IR); the flat loop keeps the next
    # tile's first chunks in flight during this tile's softmax and products (not timed). The
    # dy kernel keeps the nest: flat, it spilled 120-170 B.
    for i_t in range(0, tl.cdiv(N, BN) * n_k):
        i_k = i_t % n_k
        o_n = (i_t // n_k) * BN + tl.arange(0, BN).to(tl.int64)
        m_n = o_n < N
        b_dot = dot_chunk(x, y, o_m, m_m, o_n, m_n, i_k, D, s_x, s_y, b_dot, BD, PRECISION)
        if i_k == n_k - 1:
            b_ry_n = tl.load(ry + o_n, mask=m_n, other=0.0)
            b_s = scale * (b_dot * b_rx_m[:, None] * b_ry_n[None, :])  # [BM, BN], as _logits_tile; 0 if masked
            b_dot = tl.zeros([BM, BN], dtype=tl.float32)
            m_diag = o_m[:, None] == o_n[None, :]
            b_diag += tl.sum(tl.where(m_diag, b_s, 0.0), 1)
            b_max_new = tl.maximum(b_max, tl.max(tl.where(m_n[None, :], b_s, float("-inf")), 1))
            # a row whose entries so far are all -inf keeps max -inf: subtract 0 instead (no NaN)
            b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
            b_alpha = tl.exp(b_max - b_shift)  # [BM] rescales what was summed against the old max
            b_e = tl.where(m_n[None, :] & ~m_diag, tl.exp(b_s - b_shift[:, None]), 0.0)  # [BM, BN] e_ij in [0, 1]
            b_sum = b_sum * b_alpha + tl.sum(b_e, 1)
            b_max = b_max_new
            if GRAD:
                b_radial = b_radial * b_alpha + tl.sum(b_e * b_s, 1)
                b_acc0 = _accumulate_rows(b_acc0 * b_alpha[:, None], b_e, y, b_ry_n, o_n, m_n, o_d, D, s_y,
                                          False, PRECISION)
                if N_OUT > 1:
                    b_acc1 = _accumulate_rows(b_acc1 * b_alpha[:, None], b_e, y, b_ry_n, o_n, m_n, o_d + BD_OUT, D,
                                              s_y, False, PRECISION)
                if N_OUT > 2:
                    b_acc2 = _accumulate_rows(b_acc2 * b_alpha[:, None], b_e, y, b_ry_n, o_n, m_n, o_d + 2 * BD_OUT, D,
                                              s_y, False, PRECISION)
                if N_OUT > 3:
                    b_acc3 = _accumulate_rows(b_acc3 * b_alpha[:, None], b_e, y, b_ry_n, o_n, m_n, o_d + 3 * BD_OUT, D,
                                              s_y, False, PRECISION)

    b_pos = tl.exp(b_diag - b_max)  # e_ii
    b_total = b_sum + b_pos  # L_i
    b_log_sum = tl.log(b_total)
    m_out = m_m & (i_d == 0)
    tl.store(stats + o_m, b_max + b_log_sum, mask=m_out)
    tl.store(stats + B + o_m, b_sum / b_total, mask=m_out)
    # loss_i = -log P_ii = log1p(l_i / e_ii) while P_ii > 1/2, so that small losses keep their
    # relative precision; beyond, (m_i - s_ii) + log L_i (no division by an underflowed e_ii)
    b_loss = tl.where(b_sum < b_pos, log1p_unit(tl.minimum(b_sum / b_pos, 1.0)), (b_max - b_diag) + b_log_sum)
    tl.store(loss + o_m, b_loss, mask=m_out)
    if GRAD:
        b_coef = scale * tl.load(g + o_m, mask=m_m, other=0.0) / b_total  # du_x = b_coef (a - l u_y_i)
        b_ry = tl.load(ry + o_m, mask=m_m, other=0.0)  # the positives y_i
        b_radial = (b_radial - b_sum * b_diag) / scale  # (u_x . du_x) / b_coef
        b_acc0 = b_acc0 - b_sum[:, None] * _unit_rows(y, b_ry, o_m, m_m, o_d, D, s_y)
        _store_grad_rows(dx, b_acc0, x, b_rx_m, b_coef, b_radial, o_m, m_m, o_d, D, s_x, s_dx, add_scale, ADD)
        if N_OUT > 1:
            b_acc1 = b_acc1 - b_sum[:, None] * _unit_rows(y, b_ry, o_m, m_m, o_d + BD_OUT, D, s_y)
            _store_grad_rows(dx, b_acc1, x, b_rx_m, b_coef, b_radial, o_m, m_m, o_d + BD_OUT, D, s_x, s_dx, add_scale,
                             ADD)
        if N_OUT > 2:
            b_acc2 = b_acc2 - b_sum[:, None] * _unit_rows(y, b_ry, o_m, m_m, o_d + 2 * BD_OUT, D, s_y)
            _store_grad_rows(dx, b_acc2, x, b_rx_m, b_coef, b_radial, o_m, m_m, o_d + 2 * BD_OUT, D, s_x, s_dx,
                             add_scale, ADD)
        if N_OUT > 3:
            b_acc3 = b_acc3 - b_sum[:, None] * _unit_rows(y, b_ry, o_m, m_m, o_d + 3 * BD_OUT, D, s_y)
            _store_grad_rows(dx, b_acc3, x, b_rx_m, b_coef, b_radial, o_m, m_m, o_d + 3 * BD_OUT, D, s_x, s_dx,
                             add_scale, ADD)


# Cost in GEMM-equivalents (1 = one B x N x D product, 2 B N D flops; counted, not timed: no
# GPU was available). The forward computes the [BM, BN] logits tiles over the full D (1); with
# GRAD it also multiplies the exps by the unit rows of y (1), and the dy kernel recomputes the
# tiles from lse (1) and multiplies by the unit rows of x (1). A program keeps N_OUT <= 4 fp32
# accumulators of [64, BD_OUT] in registers, so the D output features are split over grid axis
# 1 in S = ceil(D / (N_OUT BD_OUT)) chunks, and each split recomputes the logits: a gradient-
# writing kernel costs S + W / D, W = S N_OUT BD_OUT the padded feature count, and forward plus
# backward 2 (S + W / D) (before session 7 a loss-only forward, then a dx kernel: 1 more).
#                                                  D = 768              D = 384             D = 1024
#   one [64, 128] accumulator (sessions 1-2)         1 + 2 (6 + 1) = 15   1 + 2 (3 + 1) = 9   1 + 2 (8 + 1) = 19
#   bf16 / fp16, up to 4 x 128: a forward, dx, dy    1 + 2 (2 + 1) = 7    1 + 2 (1 + 1) = 5   1 + 2 (2 + 1) = 7
#   now, bf16 / fp16: dx in the forward, then dy     2 (2 + 1) = 6        2 (1 + 1) = 4       2 (2 + 1) = 6
#   now, fp32 with TF32 dots (up to 3 x 128)       6                    4                   2 (3 + 1.125) = 8.25
#   now, fp32 with "ieee" dots (FMA, 1 x 128)      2 (6 + 1) = 14       2 (3 + 1) = 8       2 (8 + 1) = 18
# The running-max rescale of the accumulators (N_OUT BD_OUT fp32 multiplies a row and tile) is
# CUDA-core work beside the tile's tensor-core products (~8% of their issue slots, not timed).
# Registers bound N_OUT (measured by compiling offline for sm_90a, benchmarks/compile_sm90.py):
# 3 or 4 accumulators of [64, 128] take 242-255 registers per thread at 8 warps without
# spilling in the nested-loop kernels (the flat forward: 255 and 4-28 B of spills in bf16 /
# fp16, results/compile-sm90/report.md), while one [64, 512] accumulator spills, 16 warps
# spill, and one split for all of D = 768 would need [64, 768] fp32 = 48K of an SM's 64K
# registers. Fewer splits also mean
# fewer programs: at D = 768 a kernel launches 2 B / 64 of them, so batches under ~4096 rows
# do not fill an H100's 132 SMs (predicted to cost little: such batches are small). No atomics:
# each program owns its output rows and features, so results are deterministic.
# The normalisation's backward, dL/dx = r (du - u (u . du)), is fused into the stores: u . du
# is a per-row sum of (P - [i == j]) s over the tiles each program already streams, so the
# kernels write the gradients w.r.t. the raw rows in their dtype and no fp32 [B, D] buffer
# exists (2 x 192 MiB at B = 65,536, D = 768). Offline sm_90 compile: see
# benchmarks/results/compile-sm90/report.md (the dy kernel's column sum of that product spills
# with fp32 dots: a GPU tuning item).


@triton.jit
def _accumulate_rows(
    b_acc,  # [BR, BD_OUT] fp32
    b_w,  # [BR, BS] fp32 weights, or [BS, BR] if TRANS_W
    v,  # [R, D] rows, row stride s_v
    b_r,  # [BS] fp32 inverse norms of the streamed rows
    o_s, m_s,  # [BS] streamed row offsets (int64) and mask
    o_d,  # [BD_OUT] output feature offsets (int64)
    D, s_v,
    TRANS_W: tl.constexpr, PRECISION: tl.constexpr,
):
    """b_acc + b_w @ u[o_s, o_d] with unit rows u = v r, the product in v's dtype: one output
    block of a gradient-writing kernel, BR the program's output rows, BS the rows it streams.
    (Transposing b_w here, after the load, keeps the fp32 FMA build of du_y from spilling.)"""
    p_v = v + o_s[:, None] * s_v + o_d[None, :]  # [BS, BD_OUT]
    b_v = tl.load(p_v, mask=m_s[:, None] & (o_d < D)[None, :], other=0.0)
    b_u = (b_v.to(tl.float32) * b_r[:, None]).to(b_v.dtype)  # |u| <= 1
    b_w = b_w.to(b_v.dtype)
    if TRANS_W:
        b_w = tl.trans(b_w)
    return tl.dot(b_w, b_u, b_acc, input_precision=PRECISION)  # [BR, BS] @ [BS, BD_OUT] -> [BR, BD_OUT]


@triton.jit
def _unit_rows(
    v,  # [R, D] rows, row stride s_v
    b_r,  # [BR] fp32 inverse norms of the rows o_r
    o_r, m_r,  # [BR] row offsets (int64) and mask
    o_d,  # [BD_OUT] feature offsets (int64)
    D, s_v,
):
    """Unit rows ``u = v r`` at rows o_r and features o_d, [BR, BD_OUT] fp32 (0 past D)."""
    b_v = tl.load(v + o_r[:, None] * s_v + o_d[None, :], mask=m_r[:, None] & (o_d < D)[None, :], other=0.0)
    return b_v.to(tl.float32) * b_r[:, None]


@triton.jit
def _store_grad_rows(
    out,  # [R, D] in v's dtype, row stride s_out
    b_acc,  # [BR, BD_OUT] fp32: du / b_coef, du = dL/du the gradient w.r.t. the unit rows
    v,  # [R, D] the raw rows, row stride s_v
    b_r,  # [BR] fp32 inverse norms of the output rows
    b_coef,  # [BR] fp32
    b_radial,  # [BR] fp32: (u . du) / b_coef over the whole row
    o_r, m_r,  # [BR] row offsets (int64) and mask
    o_d,  # [BD_OUT] feature offsets (int64)
    D, s_v, s_out,
    add_scale,  # fp32 scalar (ADD)
    ADD: tl.constexpr,
):
    """Stores dL/dv = r (du - u (u . du)) for a block of output rows, the normalisation's
    backward fused here (u . du is a per-row sum the kernels accumulate); features past D are
    masked. With ADD, ``add_scale`` times the values already in ``out`` are added (in place)."""
    m = m_r[:, None] & (o_d < D)[None, :]
    b_u = _unit_rows(v, b_r, o_r, m_r, o_d, D, s_v)
    b_dv = (b_r * b_coef)[:, None] * (b_acc - b_u * b_radial[:, None])
    p_out = out + o_r[:, None] * s_out + o_d[None, :]
    if ADD:
        b_dv += add_scale * tl.load(p_out, mask=m, other=0.0).to(tl.float32)
    tl.store(p_out, b_dv.to(out.dtype.element_ty), mask=m)


@triton.jit
def _contrastive_bwd_dy_kernel(
    x,  # [B, D] any float dtype, row stride s_x
    rx,  # [B] fp32
    y,  # [N, D] same dtype as x, row stride s_y
    ry,  # [N] fp32
    stats,  # [2, B] fp32 from the forward: lse_i and 1 - P_ii
    g,  # [B] fp32 dL/dloss_i
    dy,  # [N, D] out in y's dtype, row stride s_dy
    B, N, D, s_x, s_y, s_dy, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BD_OUT: tl.constexpr, N_OUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dL/dy_j through u_y = y ry, from du_y_j = scale sum_i g_i (P_ij - [i == j]) u_x_i, for BN
    rows of y (grid axis 0) and the N_OUT BD_OUT output features of split i_d (grid axis 1);
    rows of x streamed BM at a time. u_y_j . du_y_j = sum_i g_i (P_ij - [i == j]) s_ij."""
    i_n = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_d = i_d * (N_OUT * BD_OUT) + tl.arange(0, BD_OUT)  # [BD_OUT] features of accumulator 0; accumulator k: + k BD_OUT

    # g_i enters the (possibly fp16) dot operand: divide it by max_i |g_i| there and multiply
    # back in fp32 at the end, so that g = 1/B or a loss-scaled g neither underflows nor overflows.
    b_gmax = tl.zeros([BM], dtype=tl.float32)
    for i_m in range(0, B, BM):
        o_m = i_m + tl.arange(0, BM)
        b_gmax = tl.maximum(b_gmax, tl.abs(tl.load(g + o_m, mask=o_m < B, other=0.0)))
    g_max = tl.max(b_gmax, 0)
    g_max = tl.where(g_max > 0.0, g_max, 1.0)

    b_radial = tl.zeros([BN], dtype=tl.float32)  # sum_i (g_i / g_max) (P_ij - [i == j]) s_ij
    b_acc0 = tl.zeros([BN, BD_OUT], dtype=tl.float32)
    if N_OUT > 1:
        b_acc1 = tl.zeros([BN, BD_OUT], dtype=tl.float32)
    if N_OUT > 2:
        b_acc2 = tl.zeros([BN, BD_OUT], dtype=tl.float32)
    if N_OUT > 3:
        b_acc3 = tl.zeros([BN, BD_OUT], dtype=tl.float32)
    for i_m in range(0, B, BM):
        o_m = i_m + tl.arange(0, BM).to(tl.int64)
        m_m = o_m < B
        b_s = _logits_tile(x, rx, y, ry, o_m, m_m, o_n, m_n, D, s_x, s_y, scale, BD, PRECISION)  # [BM, BN]
        b_lse = tl.load(stats + o_m, mask=m_m, other=0.0)
        b_miss = tl.load(stats + B + o_m, mask=m_m, other=0.0)  # 1 - P_ii, from the forward's off-diagonal sum
        b_g = tl.load(g + o_m, mask=m_m, other=0.0)
        b_p = tl.exp(b_s - b_lse[:, None])
        b_p = tl.where(m_m[:, None], b_p, 0.0)
        b_ds = tl.where(o_m[:, None] == o_n[None, :], -b_miss[:, None], b_p)  # [BM, BN] P - [i == j]
        b_ds = b_ds * (b_g / g_max)[:, None]
        b_radial += tl.sum(b_ds * b_s, axis=0)  # masked rows have g = 0, so b_ds = 0
        b_rx = tl.load(rx + o_m, mask=m_m, other=0.0)
        # the transpose of b_ds: [BN, BM] @ [BM, BD_OUT] -> [BN, BD_OUT]
        b_acc0 = _accumulate_rows(b_acc0, b_ds, x, b_rx, o_m, m_m, o_d, D, s_x, True, PRECISION)
        if N_OUT > 1:
            b_acc1 = _accumulate_rows(b_acc1, b_ds, x, b_rx, o_m, m_m, o_d + BD_OUT, D, s_x, True, PRECISION)
        if N_OUT > 2:
            b_acc2 = _accumulate_rows(b_acc2, b_ds, x, b_rx, o_m, m_m, o_d + 2 * BD_OUT, D, s_x, True, PRECISION)
        if N_OUT > 3:
            b_acc3 = _accumulate_rows(b_acc3, b_ds, x, b_rx, o_m, m_m, o_d + 3 * BD_OUT, D, s_x, True, PRECISION)

    b_coef = tl.full([BN], scale * g_max, dtype=tl.float32)  # du_y = b_coef acc
    b_ry = tl.load(ry + o_n, mask=m_n, other=0.0)
    b_radial = b_radial / scale  # (u . du) / b_coef
    _store_grad_rows(dy, b_acc0, y, b_ry, b_coef, b_radial, o_n, m_n, o_d, D, s_y, s_dy, 0.0, False)
    if N_OUT > 1:
        _store_grad_rows(dy, b_acc1, y, b_ry, b_coef, b_radial, o_n, m_n, o_d + BD_OUT, D, s_y, s_dy, 0.0, False)
    if N_OUT > 2:
        _store_grad_rows(dy, b_acc2, y, b_ry, b_coef, b_radial, o_n, m_n, o_d + 2 * BD_OUT, D, s_y, s_dy, 0.0, False)
    if N_OUT > 3:
        _store_grad_rows(dy, b_acc3, y, b_ry, b_coef, b_radial, o_n, m_n, o_d + 3 * BD_OUT, D, s_y, s_dy, 0.0, False)


MAX_OUT_BLOCKS = 4  # accumulators per gradient-writing program (the kernels hold b_acc0..b_acc3)


def _output_blocks(D: int, max_block: int, max_blocks: int) -> dict:
    """BD_OUT and N_OUT of a gradient-writing program: the fewest feature splits that ``max_blocks``
    accumulators of ``BD_OUT`` features allow, then the fewest accumulators that cover D in that
    many splits (D = 768, blocks of 128: 2 splits of 3 blocks, not 2 of 4)."""
    BD_OUT = min(max_block, triton.next_power_of_2(max(D, 16)))  # tl.dot needs >= 16
    blocks = triton.cdiv(D, BD_OUT)
    splits = triton.cdiv(blocks, max_blocks)
    return dict(BD_OUT=BD_OUT, N_OUT=triton.cdiv(blocks, splits))


def _feature_splits(D: int, cfg: dict) -> int:
    """Grid axis 1 of a gradient-writing kernel: chunks of N_OUT BD_OUT output features."""
    return triton.cdiv(D, cfg["N_OUT"] * cfg["BD_OUT"])


def _config(D: int, dtype: torch.dtype) -> dict:
    """Launch keywords of the kernels: ``{"fwd": ..., "fwd_grad": ..., "dy": ...}`` (the forward
    without and with dx, the dy kernel).

    All share the K-chunk BD, and 16-bit inputs the logits tile (64 x 64; fp32 narrows the
    streamed side, below), so that the dy kernel sums each logit as the forward did. Since
    the diagonal's 1 - P_ii travels from the forward (``stats``), another tile or K-chunk
    would only change each off-diagonal P_ij by a logit's rounding: a tuned forward tile may
    differ from the dy kernel's (the GPU tests then say whether it holds; unchecked so far).
    The gradient-writing kernels add their output blocks (``_output_blocks``).

    GPU: BD = 128 (at most D), 8 warps, 3 pipeline stages for 2-byte inputs and 2 for 4-byte
    ones (at most 128 KiB of shared memory). Output blocks of 128, as many per program as
    compiled without spilling for sm_90a in the nested-loop kernels (benchmarks/compile_sm90.py;
    not timed): 4 for bf16 / fp16, 3 for fp32 with TF32 dots (4 spill), and 1 for fp32 with
    "ieee" dots (PyTorch's default "highest" matmul precision), which run on the FMA units with
    register-hungrier layouts. fp32 streams 32 columns in the dx-writing forward (chosen on the
    nested forward, where 64 spilled 12 B with TF32 and 1.5 KB with "ieee"; the flat one at 32:
    TF32 28 B, "ieee" none; bf16 / fp16 at 64: 4-28 B) and 32 rows in dy (64: 44 B, 1.8 KB;
    "ieee" also owns 32 rows there: 8 B left). All but "ieee" use wgmma. Rows whose stride is
    not a multiple of 16 elements (D = 300, say) load element by element and spill a little in
    every design, the previous one included: not tuned, as embedding widths are multiples of 64.
    Interpreter: every block op costs Python time, so the logits tiles are large (BD up to 256),
    while the output blocks are 32 wide so that the test shapes take 1..4 blocks and several splits.
    """
    BD = triton.next_power_of_2(max(D, 16))
    if utils.interpreter_blocks():
        tile = dict(BM=64, BN=64, BD=min(BD, 256))
        grad = dict(tile, **_output_blocks(D, 32, MAX_OUT_BLOCKS))
        return dict(fwd=tile, fwd_grad=grad, dy=grad)
    tile = dict(BM=64, BN=64, BD=min(BD, 128), num_warps=8, num_stages=2 if dtype.itemsize == 4 else 3)
    grad_tile = dy_tile = tile
    if dtype.itemsize == 2:  # output blocks per program that compile without spills, as above
        max_blocks = MAX_OUT_BLOCKS
    else:  # fp32: narrower streamed tiles, or the accumulators spill
        tf32 = dot_precision(dtype) == "tf32"
        max_blocks = 3 if tf32 else 1
        grad_tile = dict(tile, BN=32)
        dy_tile = dict(tile, BM=32) if tf32 else dict(tile, BM=32, BN=32)
    blocks = _output_blocks(D, 128, max_blocks)
    return dict(fwd=tile, fwd_grad=dict(grad_tile, **blocks), dy=dict(dy_tile, **blocks))


def _check(x, rx, y, ry):
    assert x.dim() == 2 and y.dim() == 2 and x.shape[1] == y.shape[1], "x [B, D], y [N, D]"
    assert x.dtype == y.dtype, "x and y must share a dtype"
    assert y.shape[0] >= x.shape[0], "N >= B: rows 0..B-1 of y are the positives"
    assert rx.shape == (x.shape[0],) and ry.shape == (y.shape[0],)
    assert rx.dtype == ry.dtype == torch.float32
    return unit_stride_rows(x), rx.contiguous(), unit_stride_rows(y), ry.contiguous()


def contrastive_fwd(x, rx, y, ry, scale, grad_rows=None, *, add_to=None, add_scale=0.0):
    """x [B, D], rx [B], y [N, D], ry [N]; returns (loss_rows [B], stats [2, B], dx): fp32
    ``loss_rows_i = lse_i - scale c_ii``, ``stats`` = (``lse_i = logsumexp_{j<N}(scale c_ij)``,
    ``1 - P_ii``) for ``contrastive_bwd_dy``, and with ``grad_rows`` [B] fp32 the gradient of
    ``sum_i grad_rows_i loss_rows_i`` w.r.t. the raw rows x, through ``u_x = x rx``
    (``rx = 1 / max(|x|, eps)``), in x's dtype, accumulated in fp32 (None without
    ``grad_rows``). With ``add_to`` (a contiguous [B, D] tensor in x's dtype, another term's
    gradient), dx is ``add_to`` itself, overwritten with dx + add_scale add_to.
    """
    x, rx, y, ry = _check(x, rx, y, ry)
    (B, D), N = x.shape, y.shape[0]
    loss = torch.empty(B, device=x.device, dtype=torch.float32)
    stats = torch.empty(2, B, device=x.device, dtype=torch.float32)
    cfgs = _config(D, x.dtype)
    if grad_rows is None:
        assert add_to is None, "add_to needs grad_rows"
        dx, cfg, splits = None, dict(cfgs["fwd"], BD_OUT=16, N_OUT=1), 1
    else:
        grad_rows = grad_rows.float().contiguous()
        assert grad_rows.shape == (B,)
        if add_to is None:
            dx = torch.empty(B, D, device=x.device, dtype=x.dtype)
        else:
            assert add_to.shape == (B, D) and add_to.dtype == x.dtype and add_to.is_contiguous()
            dx = add_to
        cfg = cfgs["fwd_grad"]
        splits = _feature_splits(D, cfg)
    _contrastive_fwd_kernel[(triton.cdiv(B, cfg["BM"]), splits)](
        x, rx, y, ry, loss, stats, loss if dx is None else grad_rows, loss if dx is None else dx,  # unread without dx
        B, N, D, x.stride(0), y.stride(0), D if dx is None else dx.stride(0), float(scale), float(add_scale),
        PRECISION=dot_precision(x.dtype), GRAD=dx is not None, ADD=add_to is not None, **cfg,
    )
    return loss, stats, dx


def contrastive_bwd_dy(x, rx, y, ry, stats, scale, grad_rows):
    """Gradient of L = sum_i grad_rows_i loss_rows_i w.r.t. the raw rows y, through u_y = y ry:
    x [B, D], rx [B], y [N, D], ry [N], stats [2, B] (from ``contrastive_fwd``), grad_rows [B]
    fp32; returns dy [N, D] in y's dtype, accumulated in fp32."""
    x, rx, y, ry = _check(x, rx, y, ry)
    (B, D), N = x.shape, y.shape[0]
    assert stats.shape == (2, B) and stats.dtype == torch.float32
    stats, grad_rows = stats.contiguous(), grad_rows.float().contiguous()
    dy = torch.empty(N, D, device=x.device, dtype=x.dtype)
    cfg = _config(D, x.dtype)["dy"]
    _contrastive_bwd_dy_kernel[(triton.cdiv(N, cfg["BN"]), _feature_splits(D, cfg))](
        x, rx, y, ry, stats, grad_rows, dy, B, N, D, x.stride(0), y.stride(0), dy.stride(0), float(scale),
        PRECISION=dot_precision(x.dtype), **cfg,
    )
    return dy
