"""Tile and maths helpers shared by the kernels."""
import triton
import triton.language as tl

# cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps)), eps = 1e-8 (SPEC): a row with |a|^2 below this
# is divided by eps, so its gradient has no projection (I - u u^T)
EPS_SQUARED = tl.constexpr(1e-16)


@triton.jit
def dot_tile(
    p_a,  # [R, K] rows a_i, row stride s_a, unit feature stride
    p_b,  # [C, K] rows b_j, row stride s_b, unit feature stride
    o_m, m_m,  # [BM] row offsets into a and mask
    o_n, m_n,  # [BN] row offsets into b and mask
    K, s_a, s_b,
    BK: tl.constexpr, PRECISION: tl.constexpr,
):
    """``a_i . b_j`` for a [BM, BN] tile, accumulated in fp32 over K in chunks of BK (masked
    entries are 0): the pairwise thresholds' teacher logits (every other streaming kernel reads
    cuBLAS dots through ``slab_tile``). The row offsets times the strides in int64 (a view's row
    stride may put a row past 2^31 elements), whatever the callers' offsets are."""
    b_acc = tl.zeros([o_m.shape[0], o_n.shape[0]], dtype=tl.float32)
    o_a = o_m[:, None].to(tl.int64) * s_a  # [BM, 1]
    o_b = o_n[None, :].to(tl.int64) * s_b  # [1, BN]
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(p_a + o_a + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_bt = tl.load(p_b + o_b + o_k[:, None], mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
        b_acc = tl.dot(b_a, b_bt, b_acc, input_precision=PRECISION)  # [BM, BK] @ [BK, BN] -> [BM, BN]
    return b_acc


@triton.jit
def log1p_unit(u):
    """log(1 + u) for 0 <= u <= 1 to about fp32's relative precision (Triton has no log1p):
    four terms of the series below 2^-6 (error < u^4 / 5 relative), above it Goldberg's
    ``log(w) u / (w - 1)`` with w = 1 + u rounded (the quotient undoes w's rounding, which a
    plain log(w) would keep: up to 2^-18 relative). For a loss -log P = log1p((1 - P) / P) that
    stays precise as P -> 1."""
    b_series = u * (1.0 - u * (0.5 - u * (1.0 / 3.0 - 0.25 * u)))
    w = 1.0 + u
    return tl.where(u < 0.015625, b_series, tl.log(w) * (u / tl.where(u < 0.015625, 1.0, w - 1.0)))


@triton.jit
def slab_tile(
    p_dots,  # fp32 raw dots of the slab rows (cuBLAS): row r's column n at p_dots + r ld + n
    p_r,  # [B] fp32 inverse norms
    o_r, o_m, m_m,  # [BM] slab rows, their batch rows (int64) and mask
    o_n, m_n,  # [BN] columns and mask
    m_ld,  # [BN] the columns a load may read: an aligned bound (``utils.slab_buffer``), so it is vectorised
    ld,  # the row stride, a multiple of 16
):
    """``dots[o_r, o_n] r_m r_n`` [BM, BN] fp32, 0 where masked: a slab's cosines (student) or
    teacher logits, in the one operation order every slab kernel uses. What ``m_ld`` reads past
    ``m_n`` must be finite (the masked norm ``r_n = 0`` zeroes it): ``utils.slab_buffer`` zeroes
    the columns past the batch."""
    b_dot = tl.load(p_dots + o_r[:, None] * ld + o_n[None, :], mask=m_m[:, None] & m_ld[None, :], other=0.0)
    b_rm = tl.load(p_r + o_m, mask=m_m, other=0.0)
    b_rn = tl.load(p_r + o_n, mask=m_n, other=0.0)
    return b_dot * b_rm[:, None] * b_rn[None, :]
