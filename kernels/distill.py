"""Distillation term: row statistics, per-row loss and its gradient, streamed over column
tiles so the B x B logits never exist in memory.

Student logits ``s_ij = (x_i . x_j) rx_i rx_j``, teacher logits ``t_ij = t_i . t_j``; only
``j != i`` takes part. Targets ``q_ij = exp(t_ij * teacher_scale - lse_t_i)``. With ``thr``
[B, G-1] and ``qbar`` [B, G] the "expected" Group-P shuffle applies,
``q~_ij = qbar[i, group_i(j)]`` with ``group_i(j) = #{g : t_ij < thr[i, g]}``; without them
``q~ = q``. Every scale must be positive (the running maximum of ``t`` serves both of its
logsumexps).
"""
import os

import torch
import triton
import triton.language as tl

from .tiles import dot_tile
from .utils import dot_precision, unit_stride_rows


@triton.jit
def _logit_tiles(
    p_x,  # [B, D] student rows, raw
    p_rx,  # [B] fp32 inverse norms
    p_t,  # [B, Dt] teacher rows, normalised and weighted
    s_x, s_t, o_m, o_n, m_m, m_n, D, Dt,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    PREC_X: tl.constexpr, PREC_T: tl.constexpr,
):
    """Student cosines ``s`` and teacher logits ``t`` of rows ``o_m`` against columns ``o_n``,
    both [BM, BN] fp32 (diagonal and out-of-range entries included; callers mask them)."""
    b_s = dot_tile(p_x, p_x, o_m, m_m, o_n, m_n, D, s_x, s_x, BD, PREC_X)  # [BM, BN]
    b_rxm = tl.load(p_rx + o_m, mask=m_m, other=0.0)
    b_rxn = tl.load(p_rx + o_n, mask=m_n, other=0.0)
    b_s = b_s * b_rxm[:, None] * b_rxn[None, :]
    b_t = dot_tile(p_t, p_t, o_m, m_m, o_n, m_n, Dt, s_t, s_t, BDT, PREC_T)  # [BM, BN]
    return b_s, b_t


@triton.jit
def _targets(
    b_t,  # [BM, BN] teacher logits
    o_r, m_r,  # [BM, 1] or [1, BN]: rows owning the targets (either axis of the tile) and mask
    p_lse_t,  # [B] teacher logsumexps
    p_thr,  # [B, G-1] group thresholds
    p_qbar,  # [B, G] mean target of each group
    s_thr, s_qbar, n_thr, teacher_scale,
    SHUFFLE: tl.constexpr,
):
    """Targets ``q~`` [BM, BN] fp32 of the rows ``o_r`` (row side or column side of ``b_t``)."""
    if SHUFFLE:
        # G-1 is small and runtime: one compare per threshold, no [BM, BN, G] intermediate.
        b_grp = tl.zeros(b_t.shape, dtype=tl.int32)
        for i_g in range(0, n_thr):
            b_thr = tl.load(p_thr + o_r * s_thr + i_g, mask=m_r, other=float("-inf"))
            b_grp += (b_t < b_thr).to(tl.int32)
        b_q = tl.load(p_qbar + o_r * s_qbar + b_grp, mask=m_r, other=0.0)  # gather, cache-resident
    else:
        b_lse = tl.load(p_lse_t + o_r, mask=m_r, other=0.0)
        b_q = tl.exp(b_t * teacher_scale - b_lse)
    return b_q


@triton.jit
def _distill_row_stats_kernel(
    p_x,  # [B, D] student rows, raw
    p_rx,  # [B] fp32 inverse norms
    p_t,  # [B, Dt] teacher rows
    p_out,  # [5, B] fp32: lse_s, lse_t, lse_g, t_min, t_max
    s_x, s_t, B, D, Dt,
    student_scale, teacher_scale, grouping_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    PREC_X: tl.constexpr, PREC_T: tl.constexpr,
):
    """Online logsumexps of s and t (two scales) and min / max of t for rows of block I."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    b_ms = tl.full([BM], float("-inf"), dtype=tl.float32)  # running max of s * student_scale
    b_tmax = tl.full([BM], float("-inf"), dtype=tl.float32)  # running max of t (both t scales)
    b_tmin = tl.full([BM], float("inf"), dtype=tl.float32)
    b_ls = tl.zeros([BM], dtype=tl.float32)
    b_lt = tl.zeros([BM], dtype=tl.float32)
    b_lg = tl.zeros([BM], dtype=tl.float32)
    for i_n in range(0, tl.cdiv(B, BN)):
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < B
        b_s, b_t = _logit_tiles(p_x, p_rx, p_t, s_x, s_t, o_m, o_n, m_m, m_n, D, Dt,
                                BM, BN, BD, BDT, PREC_X, PREC_T)
        m_valid = (o_m[:, None] != o_n[None, :]) & m_n[None, :]
        b_s = tl.where(m_valid, b_s * student_scale, float("-inf"))
        b_tmin = tl.minimum(b_tmin, tl.min(tl.where(m_valid, b_t, float("inf")), axis=1))
        b_t = tl.where(m_valid, b_t, float("-inf"))
        b_ms_new = tl.maximum(b_ms, tl.max(b_s, axis=1))
        b_tmax_new = tl.maximum(b_tmax, tl.max(b_t, axis=1))
        # Rows with nothing valid yet keep a finite reference so exp never sees -inf - -inf.
        b_ms_ref = tl.where(b_ms_new == float("-inf"), 0.0, b_ms_new)
        b_tmax_ref = tl.where(b_tmax_new == float("-inf"), 0.0, b_tmax_new)
        b_ls = b_ls * tl.exp(b_ms - b_ms_ref) + tl.sum(tl.exp(b_s - b_ms_ref[:, None]), axis=1)
        b_dt = b_t - b_tmax_ref[:, None]
        b_lt = (b_lt * tl.exp((b_tmax - b_tmax_ref) * teacher_scale)
                + tl.sum(tl.exp(b_dt * teacher_scale), axis=1))
        b_lg = (b_lg * tl.exp((b_tmax - b_tmax_ref) * grouping_scale)
                + tl.sum(tl.exp(b_dt * grouping_scale), axis=1))
        b_ms = b_ms_new
        b_tmax = b_tmax_new
    # A row without any valid column (B == 1) gets lse = 0 + log(0) = -inf.
    b_ms = tl.where(b_ms == float("-inf"), 0.0, b_ms)
    b_tref = tl.where(b_tmax == float("-inf"), 0.0, b_tmax)
    tl.store(p_out + o_m, b_ms + tl.log(b_ls), mask=m_m)
    tl.store(p_out + B + o_m, b_tref * teacher_scale + tl.log(b_lt), mask=m_m)
    tl.store(p_out + 2 * B + o_m, b_tref * grouping_scale + tl.log(b_lg), mask=m_m)
    tl.store(p_out + 3 * B + o_m, b_tmin, mask=m_m)
    tl.store(p_out + 4 * B + o_m, b_tmax, mask=m_m)


@triton.jit
def _distill_fwd_kernel(
    p_x,  # [B, D] student rows, raw
    p_rx,  # [B] fp32 inverse norms
    p_t,  # [B, Dt] teacher rows
    p_lse_s,  # [B] student logsumexps
    p_lse_t,  # [B] teacher logsumexps
    p_thr,  # [B, G-1] group thresholds (unused without SHUFFLE)
    p_qbar,  # [B, G] group mean targets (unused without SHUFFLE)
    p_loss,  # [B] fp32 loss rows
    s_x, s_t, s_thr, s_qbar, B, D, Dt, n_thr,
    student_scale, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    PREC_X: tl.constexpr, PREC_T: tl.constexpr, SHUFFLE: tl.constexpr,
):
    """loss_i = lse_s_i - student_scale * sum_j q~_ij s_ij for rows of block I."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    b_cross = tl.zeros([BM], dtype=tl.float32)  # sum_j q~_ij s_ij
    for i_n in range(0, tl.cdiv(B, BN)):
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < B
        b_s, b_t = _logit_tiles(p_x, p_rx, p_t, s_x, s_t, o_m, o_n, m_m, m_n, D, Dt,
                                BM, BN, BD, BDT, PREC_X, PREC_T)
        b_q = _targets(b_t, o_m[:, None], m_m[:, None], p_lse_t, p_thr, p_qbar,
                       s_thr, s_qbar, n_thr, teacher_scale, SHUFFLE)
        m_valid = (o_m[:, None] != o_n[None, :]) & m_n[None, :]
        b_cross += tl.sum(tl.where(m_valid, b_q * b_s, 0.0), axis=1)
    b_lse_s = tl.load(p_lse_s + o_m, mask=m_m, other=0.0)
    tl.store(p_loss + o_m, b_lse_s - student_scale * b_cross, mask=m_m)


@triton.jit
def _distill_bwd_kernel(
    p_x,  # [B, D] student rows, raw
    p_rx,  # [B] fp32 inverse norms
    p_t,  # [B, Dt] teacher rows
    p_lse_s,  # [B] student logsumexps
    p_lse_t,  # [B] teacher logsumexps
    p_thr,  # [B, G-1] group thresholds (unused without SHUFFLE)
    p_qbar,  # [B, G] group mean targets (unused without SHUFFLE)
    p_grad,  # [B] fp32 dL/dloss_rows
    p_du,  # [B, D] fp32 dL/du
    s_x, s_t, s_thr, s_qbar, s_du, B, D, Dt, n_thr,
    student_scale, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    BDO: tl.constexpr, PREC_X: tl.constexpr, PREC_T: tl.constexpr,
    SHUFFLE: tl.constexpr, RESCALE: tl.constexpr,
):
    """du[I, chunk o] = sum_J (G_IJ + G_JI^T) @ u[J, chunk o], u = x * rx."""
    # Program (I, o) owns du[I, o-th BDO features]: it recomputes every s_IJ / t_IJ tile
    # (as many times as there are feature splits) and accumulates without atomics.
    i_m = tl.program_id(0).to(tl.int64)
    i_o = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_o = i_o * BDO + tl.arange(0, BDO)
    m_o = o_o < D
    b_lse_m = tl.load(p_lse_s + o_m, mask=m_m, other=0.0)
    b_grad_m = tl.load(p_grad + o_m, mask=m_m, other=0.0)
    b_du = tl.zeros([BM, BDO], dtype=tl.float32)
    for i_n in range(0, tl.cdiv(B, BN)):
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < B
        b_s, b_t = _logit_tiles(p_x, p_rx, p_t, s_x, s_t, o_m, o_n, m_m, m_n, D, Dt,
                                BM, BN, BD, BDT, PREC_X, PREC_T)
        b_lse_n = tl.load(p_lse_s + o_n, mask=m_n, other=0.0)
        b_grad_n = tl.load(p_grad + o_n, mask=m_n, other=0.0)
        b_rx_n = tl.load(p_rx + o_n, mask=m_n, other=0.0)
        # Row side G_IJ (stats of rows I) and column side G_JI^T (stats of rows J, same s, t).
        b_q_mn = _targets(b_t, o_m[:, None], m_m[:, None], p_lse_t, p_thr, p_qbar,
                          s_thr, s_qbar, n_thr, teacher_scale, SHUFFLE)
        b_q_nm = _targets(b_t, o_n[None, :], m_n[None, :], p_lse_t, p_thr, p_qbar,
                          s_thr, s_qbar, n_thr, teacher_scale, SHUFFLE)
        b_g = (b_grad_m[:, None] * (tl.exp(b_s * student_scale - b_lse_m[:, None]) - b_q_mn)
               + b_grad_n[None, :] * (tl.exp(b_s * student_scale - b_lse_n[None, :]) - b_q_nm))
        m_valid = (o_m[:, None] != o_n[None, :]) & m_n[None, :]
        b_g = tl.where(m_valid, b_g * student_scale, 0.0)
        b_xn = tl.load(p_x + o_n[:, None] * s_x + o_o[None, :],
                       mask=m_n[:, None] & m_o[None, :], other=0.0)  # [BN, BDO]
        b_un = (b_xn.to(tl.float32) * b_rx_n[:, None]).to(b_xn.dtype)  # |u| <= 1 fits fp16
        if RESCALE:
            # fp16: scale each factor row to max 1 so small entries do not underflow.
            b_r = tl.max(tl.abs(b_g), axis=1)
            b_r = tl.where(b_r > 0, b_r, 1.0)
            b_gn = (b_g / b_r[:, None]).to(b_xn.dtype)
            # [BM, BN] @ [BN, BDO] -> [BM, BDO]
            b_du += b_r[:, None] * tl.dot(b_gn, b_un, input_precision=PREC_X)
        else:
            b_du = tl.dot(b_g.to(b_xn.dtype), b_un, b_du,
                          input_precision=PREC_X)  # [BM, BN] @ [BN, BDO] -> [BM, BDO]
    tl.store(p_du + o_m[:, None] * s_du + o_o[None, :], b_du, mask=m_m[:, None] & m_o[None, :])


def _blocks(B: int) -> dict:
    """Row, column and feature blocks of the streaming passes. The interpreter is fastest on
    large blocks. On a GPU a row block shrinks to 16..64 rows so that mid-sized batches still
    give ~128 programs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        bm = min(128, max(16, triton.next_power_of_2(B)))
        return dict(BM=bm, BN=bm, BD=64, BDT=64, num_warps=4)
    bm = min(64, max(16, triton.next_power_of_2(triton.cdiv(B, 128))))
    return dict(BM=bm, BN=64, BD=64, BDT=64, num_warps=4)


def _bwd_blocks(B: int, D: int) -> dict:
    """``_blocks`` plus BDO, the output feature chunk of one backward program (at most 256;
    64 under the interpreter so that small test shapes still take several chunks)."""
    blocks = _blocks(B)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(blocks, BDO=64)
    bdo = min(256, max(16, triton.next_power_of_2(D)))
    return dict(blocks, BDO=bdo, num_warps=8 if blocks["BM"] * bdo > 8192 else 4)


def _prepare(x, rx, t):
    """Unit feature strides, a contiguous ``rx`` and the dot precisions of x and t."""
    x, t = unit_stride_rows(x), unit_stride_rows(t)
    return x, rx.contiguous(), t, dict(PREC_X=dot_precision(x.dtype), PREC_T=dot_precision(t.dtype))


def _groups(thr, qbar, fallback):
    """(thr, qbar, s_thr, s_qbar, n_thr, SHUFFLE); ``fallback`` stands in for absent pointers."""
    if thr is None:
        return fallback, fallback, 0, 0, 0, False
    thr, qbar = unit_stride_rows(thr), unit_stride_rows(qbar)
    assert qbar.shape[1] == thr.shape[1] + 1, "qbar must have one more column than thr"
    return thr, qbar, thr.stride(0), qbar.stride(0), thr.shape[1], True


def distill_row_stats(x, rx, t, student_scale, teacher_scale, grouping_scale):
    """One streaming pass. ``x`` [B, D], ``rx`` [B] fp32, ``t`` [B, Dt]. Returns five fp32 [B]
    vectors: lse_s, lse_t, lse_g (logsumexps over j != i of s * student_scale, t * teacher_scale,
    t * grouping_scale) and t_min, t_max (min / max over j != i of t)."""
    x, rx, t, prec = _prepare(x, rx, t)
    B, D = x.shape
    blocks = _blocks(B)
    out = torch.empty((5, B), device=x.device, dtype=torch.float32)
    _distill_row_stats_kernel[(triton.cdiv(B, blocks["BM"]),)](
        x, rx, t, out, x.stride(0), t.stride(0), B, D, t.shape[1],
        float(student_scale), float(teacher_scale), float(grouping_scale), **blocks, **prec)
    return tuple(out.unbind(0))


def distill_fwd(x, rx, t, lse_s, lse_t, student_scale, teacher_scale, thr=None, qbar=None):
    """loss_rows [B] fp32: ``lse_s_i - student_scale * sum_{j != i} q~_ij s_ij``, i.e. the
    cross-entropy of q~ against the student's softmax. ``thr`` [B, G-1], ``qbar`` [B, G] fp32
    select the shuffled targets; both None gives q~ = q."""
    x, rx, t, prec = _prepare(x, rx, t)
    lse_s, lse_t = lse_s.contiguous(), lse_t.contiguous()
    thr, qbar, s_thr, s_qbar, n_thr, shuffle = _groups(thr, qbar, lse_t)
    B, D = x.shape
    blocks = _blocks(B)
    loss = torch.empty(B, device=x.device, dtype=torch.float32)
    _distill_fwd_kernel[(triton.cdiv(B, blocks["BM"]),)](
        x, rx, t, lse_s, lse_t, thr, qbar, loss, x.stride(0), t.stride(0), s_thr, s_qbar,
        B, D, t.shape[1], n_thr, float(student_scale), float(teacher_scale),
        **blocks, **prec, SHUFFLE=shuffle)
    return loss


def distill_bwd(x, rx, t, lse_s, lse_t, student_scale, teacher_scale, grad_rows, thr=None,
                qbar=None):
    """du [B, D] fp32: gradient of ``sum_i grad_rows_i * loss_rows_i`` w.r.t. ``u = x * rx``,
    ``du_i = sum_j (G_ij + G_ji) u_j`` with ``G_ij = student_scale * grad_rows_i * (p_ij - q~_ij)``
    off the diagonal. The grid is (row blocks, feature chunks of BDO <= 256): D <= 256 needs
    one pass; D = 768 recomputes the s / t tiles three times, which buys a register-resident
    [BM, BDO] accumulator and more programs at small B."""
    x, rx, t, prec = _prepare(x, rx, t)
    lse_s, lse_t, grad_rows = lse_s.contiguous(), lse_t.contiguous(), grad_rows.contiguous()
    thr, qbar, s_thr, s_qbar, n_thr, shuffle = _groups(thr, qbar, lse_t)
    B, D = x.shape
    blocks = _bwd_blocks(B, D)
    du = torch.empty((B, D), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(B, blocks["BM"]), triton.cdiv(D, blocks["BDO"]))
    _distill_bwd_kernel[grid](
        x, rx, t, lse_s, lse_t, thr, qbar, grad_rows, du, x.stride(0), t.stride(0), s_thr,
        s_qbar, du.stride(0), B, D, t.shape[1], n_thr, float(student_scale), float(teacher_scale),
        **blocks, **prec, SHUFFLE=shuffle, RESCALE=x.dtype == torch.float16)
    return du
