"""InfoNCE contrastive term (SPEC section 1), forward and backward, never materialising B x N.

``c_ij = (x_i . y_j) rx_i ry_j`` for ``i < B``, ``j < N``: rows ``0..B-1`` of ``y`` are the
second view, rows ``B..N-1`` hard negatives. With ``scale = 1 / temperature``:
  forward   ``lse_i = logsumexp_j(scale c_ij)``, ``loss_i = lse_i - scale c_ii``;
  backward  ``P_ij = exp(scale c_ij - lse_i)`` recomputed tile by tile from the saved ``lse``
            (flash-attention-2 style: a row-block kernel for ``du_x``, a column-block kernel
            for ``du_y``, no atomics).
"""
import os

import torch
import triton
import triton.language as tl

from .tiles import dot_tile
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
    """scale * c_ij for a [BM, BN] tile, the dot accumulated over D in chunks of BD.
    Every kernel builds its tiles here, in this orientation and with the same BD, so the
    backward's P is consistent with the forward's lse (P_ii - 1 is ill-conditioned otherwise)."""
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
    loss,  # [B] fp32 out: lse_i - scale * c_ii
    lse,  # [B] fp32 out: logsumexp_j(scale * c_ij)
    B, N, D, s_x, s_y, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per block of BM rows; column tiles of y are streamed with an online logsumexp."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B

    b_max = tl.full([BM], float("-inf"), dtype=tl.float32)  # running max of scale * c_ij
    b_sum = tl.zeros([BM], dtype=tl.float32)  # running sum of exp(scale * c_ij - b_max)
    b_diag = tl.zeros([BM], dtype=tl.float32)  # scale * c_ii
    for i_n in range(0, N, BN):
        o_n = i_n + tl.arange(0, BN).to(tl.int64)
        m_n = o_n < N
        b_s = _logits_tile(x, rx, y, ry, o_m, m_m, o_n, m_n, D, s_x, s_y, scale, BD, PRECISION)  # [BM, BN]
        b_diag += tl.sum(tl.where(o_m[:, None] == o_n[None, :], b_s, 0.0), 1)
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))

        b_max_new = tl.maximum(b_max, tl.max(b_s, 1))
        # a row whose entries so far are all -inf keeps max -inf: subtract 0 instead (no NaN)
        b_shift = tl.where(b_max_new == float("-inf"), 0.0, b_max_new)
        b_sum = b_sum * tl.exp(b_max - b_shift) + tl.sum(tl.exp(b_s - b_shift[:, None]), 1)
        b_max = b_max_new

    b_log_sum = tl.log(b_sum)
    tl.store(lse + o_m, b_max + b_log_sum, mask=m_m)
    # (max - diag) first: exactly 0 when the positive is the row maximum, which keeps small losses
    tl.store(loss + o_m, (b_max - b_diag) + b_log_sum, mask=m_m)


# Backward, handling of the feature dim D (1..4096): the [BM, BD] (or [BN, BD]) output
# accumulator cannot hold all of D in registers, so the output features are split over grid
# axis 1 in chunks of BD and every split recomputes its similarity tiles over the full D
# (in chunks of BD too). That costs (ceil(D / BD) + 1) GEMMs per kernel instead of 2, but
# keeps each accumulator in registers, needs no atomics, and for the small batches this loss
# sees (B ~ 64..1024) the extra programs are what fills the GPU. With BD = 128, D = 768 is
# 6 splits.


@triton.jit
def _contrastive_bwd_dx_kernel(
    x,  # [B, D] any float dtype, row stride s_x
    rx,  # [B] fp32
    y,  # [N, D] same dtype as x, row stride s_y
    ry,  # [N] fp32
    lse,  # [B] fp32, from the forward
    g,  # [B] fp32 dL/dloss_i
    dx,  # [B, D] fp32 out, row stride s_dx
    B, N, D, s_x, s_y, s_dx, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """du_x_i = scale g_i sum_j (P_ij - [i == j]) u_y_j for BM rows and BD output features."""
    i_m = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_lse = tl.load(lse + o_m, mask=m_m, other=0.0)

    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    for i_n in range(0, N, BN):
        o_n = i_n + tl.arange(0, BN).to(tl.int64)
        m_n = o_n < N
        b_s = _logits_tile(x, rx, y, ry, o_m, m_m, o_n, m_n, D, s_x, s_y, scale, BD, PRECISION)  # [BM, BN]
        b_p = tl.exp(b_s - b_lse[:, None])
        b_p = tl.where(m_n[None, :], b_p, 0.0)
        b_ds = b_p - tl.where(o_m[:, None] == o_n[None, :], 1.0, 0.0)  # [BM, BN] in [-1, 1]

        p_y = y + o_n[:, None] * s_y + o_d[None, :]  # [BN, BD]
        b_y = tl.load(p_y, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_ry = tl.load(ry + o_n, mask=m_n, other=0.0)
        b_uy = (b_y.to(tl.float32) * b_ry[:, None]).to(b_y.dtype)  # u_y, |u_y| <= 1
        # [BM, BN] @ [BN, BD] -> [BM, BD]
        b_acc = tl.dot(b_ds.to(b_y.dtype), b_uy, b_acc, input_precision=PRECISION)

    b_g = tl.load(g + o_m, mask=m_m, other=0.0)
    p_dx = dx + o_m[:, None] * s_dx + o_d[None, :]  # [BM, BD]
    tl.store(p_dx, b_acc * (scale * b_g)[:, None], mask=m_m[:, None] & m_d[None, :])


@triton.jit
def _contrastive_bwd_dy_kernel(
    x,  # [B, D] any float dtype, row stride s_x
    rx,  # [B] fp32
    y,  # [N, D] same dtype as x, row stride s_y
    ry,  # [N] fp32
    lse,  # [B] fp32, from the forward
    g,  # [B] fp32 dL/dloss_i
    dy,  # [N, D] fp32 out, row stride s_dy
    B, N, D, s_x, s_y, s_dy, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr,
):
    """du_y_j = scale sum_i g_i (P_ij - [i == j]) u_x_i for BN rows of y and BD output features."""
    i_n = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D

    # g_i enters the (possibly fp16) dot operand: divide it by max_i |g_i| there and multiply
    # back in fp32 at the end, so that g = 1/B or a loss-scaled g neither underflows nor overflows.
    b_gmax = tl.zeros([BM], dtype=tl.float32)
    for i_m in range(0, B, BM):
        o_m = i_m + tl.arange(0, BM)
        b_gmax = tl.maximum(b_gmax, tl.abs(tl.load(g + o_m, mask=o_m < B, other=0.0)))
    g_max = tl.max(b_gmax, 0)
    g_max = tl.where(g_max > 0.0, g_max, 1.0)

    b_acc = tl.zeros([BN, BD], dtype=tl.float32)
    for i_m in range(0, B, BM):
        o_m = i_m + tl.arange(0, BM).to(tl.int64)
        m_m = o_m < B
        b_s = _logits_tile(x, rx, y, ry, o_m, m_m, o_n, m_n, D, s_x, s_y, scale, BD, PRECISION)  # [BM, BN]
        b_lse = tl.load(lse + o_m, mask=m_m, other=0.0)
        b_g = tl.load(g + o_m, mask=m_m, other=0.0)
        b_p = tl.exp(b_s - b_lse[:, None])
        b_p = tl.where(m_m[:, None], b_p, 0.0)
        b_ds = b_p - tl.where(o_m[:, None] == o_n[None, :], 1.0, 0.0)  # [BM, BN]
        b_ds = b_ds * (b_g / g_max)[:, None]

        p_x = x + o_m[:, None] * s_x + o_d[None, :]  # [BM, BD]
        b_x = tl.load(p_x, mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_rx = tl.load(rx + o_m, mask=m_m, other=0.0)
        b_ux = (b_x.to(tl.float32) * b_rx[:, None]).to(b_x.dtype)  # u_x, |u_x| <= 1
        b_dst = tl.trans(b_ds.to(b_x.dtype))  # [BN, BM]
        b_acc = tl.dot(b_dst, b_ux, b_acc, input_precision=PRECISION)  # [BN, BM] @ [BM, BD] -> [BN, BD]

    p_dy = dy + o_n[:, None] * s_dy + o_d[None, :]  # [BN, BD]
    tl.store(p_dy, b_acc * (scale * g_max), mask=m_n[:, None] & m_d[None, :])


def _config(D: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options, the same for forward and backward so that both
    accumulate the logits in the same order.

    GPU: 64 x 64 tiles, BD = 128 features at most (D = 768 gives 6 backward splits), 8 warps,
    2 pipeline stages for 4-byte inputs and 3 for 2-byte ones: at most 128 KiB of shared
    memory (fits sm_80 too) and, compiled offline for sm_90, no register spills except a few
    bytes for fp32 "ieee" dots at BD = 64. Under the interpreter every block op costs Python
    overhead, so blocks are as large as D allows.
    """
    BD = triton.next_power_of_2(max(D, 16))
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BM=64, BN=64, BD=min(BD, 256))
    return dict(BM=64, BN=64, BD=min(BD, 128), num_warps=8, num_stages=2 if dtype.itemsize == 4 else 3)


def _check(x, rx, y, ry):
    assert x.dim() == 2 and y.dim() == 2 and x.shape[1] == y.shape[1], "x [B, D], y [N, D]"
    assert x.dtype == y.dtype, "x and y must share a dtype"
    assert y.shape[0] >= x.shape[0], "N >= B: rows 0..B-1 of y are the positives"
    assert rx.shape == (x.shape[0],) and ry.shape == (y.shape[0],)
    assert rx.dtype == ry.dtype == torch.float32
    return unit_stride_rows(x), rx.contiguous(), unit_stride_rows(y), ry.contiguous()


def contrastive_fwd(x, rx, y, ry, scale):
    """x [B, D], rx [B], y [N, D], ry [N]; returns (loss_rows [B], lse [B]), both fp32:
    lse_i = logsumexp_{j<N}(scale c_ij), loss_rows_i = lse_i - scale c_ii."""
    x, rx, y, ry = _check(x, rx, y, ry)
    (B, D), N = x.shape, y.shape[0]
    loss = torch.empty(B, device=x.device, dtype=torch.float32)
    lse = torch.empty(B, device=x.device, dtype=torch.float32)
    cfg = _config(D, x.dtype)
    _contrastive_fwd_kernel[(triton.cdiv(B, cfg["BM"]),)](
        x, rx, y, ry, loss, lse, B, N, D, x.stride(0), y.stride(0), float(scale),
        PRECISION=dot_precision(x.dtype), **cfg,
    )
    return loss, lse


def contrastive_bwd(x, rx, y, ry, lse, scale, grad_rows):
    """Gradients of L = sum_i grad_rows_i loss_rows_i w.r.t. u_x = x rx and u_y = y ry.

    x [B, D], rx [B], y [N, D], ry [N], lse [B] (from ``contrastive_fwd``), grad_rows [B] fp32;
    returns (du_x [B, D], du_y [N, D]), both fp32.
    """
    x, rx, y, ry = _check(x, rx, y, ry)
    (B, D), N = x.shape, y.shape[0]
    lse, grad_rows = lse.float().contiguous(), grad_rows.float().contiguous()
    dx = torch.empty(B, D, device=x.device, dtype=torch.float32)
    dy = torch.empty(N, D, device=x.device, dtype=torch.float32)
    cfg = _config(D, x.dtype)
    precision = dot_precision(x.dtype)
    _contrastive_bwd_dx_kernel[(triton.cdiv(B, cfg["BM"]), triton.cdiv(D, cfg["BD"]))](
        x, rx, y, ry, lse, grad_rows, dx, B, N, D, x.stride(0), y.stride(0), dx.stride(0), float(scale),
        PRECISION=precision, **cfg,
    )
    _contrastive_bwd_dy_kernel[(triton.cdiv(N, cfg["BN"]), triton.cdiv(D, cfg["BD"]))](
        x, rx, y, ry, lse, grad_rows, dy, B, N, D, x.stride(0), y.stride(0), dy.stride(0), float(scale),
        PRECISION=precision, **cfg,
    )
    return dx, dy
