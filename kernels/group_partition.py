"""Group-P partition of the teacher's rows (SPEC sections 4 and 5) without sorting and
without B x B memory.

Row i's off-diagonal teacher logits ``t_ij = t_i . t_j`` are split into G groups. With the
mass function ``F_i(x) = sum_{j != i, t_ij >= x} pi_ij`` (``pi`` the softmax at the grouping
scale) and the count ``N_i(x) = #{j != i : t_ij >= x}``, an element of value v lies in group
>= g iff the predicate ``floor(F_i(v) / P) >= g`` (by mass) or ``N_i(v) - 1 >= g * S`` (fixed
size) holds. Both are monotone in v, so boundary g is a threshold ``thr[i, g-1]``:
``t_ij`` is in group >= g iff ``t_ij < thr[i, g-1]``, and ``group_i(j) = #{g : t_ij < thr[i, g]}``.

``group_thresholds`` finds every threshold by a bracketing search, one streaming kernel launch
per pass. Per (row, boundary) it keeps
  ``lo``  a value of the row whose predicate holds,
  ``hd``  a value of the row such that every x > hd fails the predicate,
  ``hu``  a bound above hd with no value of the row strictly between hd and hu,
  ``meas_lo``, ``meas_hi``  the measure (mass F, or count N) at lo and just above hd.
Each pass evaluates F or N at two points of (lo, hd]: the measure-linear interpolation point
and the midpoint, and "snaps" the new bracket to values of the row (``min{t >= x}`` for a
passing x, ``max{t < x}`` for a failing one). The distinct values in [lo, hd] decrease every
pass and the range at least halves. A (row, boundary) is done when lo == hd, the largest value
in group >= g; ``thr = (hd + hu) / 2`` sits in the middle of the gap above it, so that a kernel
recomputing ``t_ij`` in another summation order still classifies every entry the same way.
``group_means`` then averages the targets ``q_ij`` over each group in one pass.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .tiles import dot_tile
from .utils import dot_precision, unit_stride_rows

MAX_BOUNDARIES = 63  # G - 1: the boundary axis is a register dimension of the search
MAX_PASSES = 64  # safety cap; measured under the interpreter: 5-10 passes at B = 130, 9-12 at B = 2000
STATS_MARGIN = 1e-3  # the bracket starts at [t_min - margin, t_max + margin]: the row statistics
# may come from another summation order or precision (the search itself never needs them exact)


@triton.jit
def _predicate(b_m, b_g, group_p, group_size, FIXED: tl.constexpr):
    """Whether a point whose measure is b_m [BM, BG] lies in group >= b_g [1, BG]."""
    if FIXED:
        return b_m - 1 >= b_g * group_size
    else:
        return tl.floor(b_m / group_p) >= b_g.to(tl.float32)


@triton.jit
def _group_search_pass_kernel(
    p_t,  # [B, Dt] teacher rows, row stride s_t
    p_lse,  # [B] fp32 logsumexp_{j != i}(t_ij * grouping_scale) (unused when FIXED)
    p_lo,  # [B, G1] fp32 in/out, row stride G1
    p_hd,  # [B, G1] fp32 in/out
    p_hu,  # [B, G1] fp32 in/out
    p_mlo,  # [B, G1] in/out: F (fp32) or N (int32) at lo
    p_mhi,  # [B, G1] in/out: F or N just above hd
    p_thr,  # [B, G1] fp32 out: (hd + hu) / 2, rounded into (hd, hu], written every pass
    B, Dt, G1, s_t, grouping_scale, group_p, group_size,
    FIXED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BG: tl.constexpr, PRECISION: tl.constexpr,
):
    """One pass of the bracketing search for BM rows and all G1 boundaries."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_g = tl.arange(0, BG)
    b_g = (o_g + 1)[None, :]  # [1, BG] boundary index g = 1..G1
    m_s = m_m[:, None] & (o_g < G1)[None, :]
    p_s = o_m[:, None] * G1 + o_g[None, :]  # [BM, BG] offsets into the state
    # Padding loads lo = hd = 0: inactive.
    b_lo = tl.load(p_lo + p_s, mask=m_s, other=0.0)
    b_hd = tl.load(p_hd + p_s, mask=m_s, other=0.0)
    b_hu = tl.load(p_hu + p_s, mask=m_s, other=0.0)
    b_act = b_lo < b_hd
    if tl.sum(b_act.to(tl.int32)) > 0:  # skip row blocks whose search is over
        b_mlo = tl.load(p_mlo + p_s, mask=m_s, other=0)
        b_mhi = tl.load(p_mhi + p_s, mask=m_s, other=0)

        # Two points in (lo, hd]: the midpoint (hd itself if lo, hd are adjacent floats) and
        # the point where the measure, linear between (lo, m_lo) and (hd, m_hi), hits the target.
        b_mid = b_lo + (b_hd - b_lo) * 0.5
        b_mid = tl.where(b_mid > b_lo, b_mid, b_hd)
        if FIXED:
            b_target = (b_g * group_size + 1).to(tl.float32)
            b_span = tl.maximum(b_mlo - b_mhi, 1).to(tl.float32)
        else:
            b_target = b_g.to(tl.float32) * group_p
            b_span = tl.maximum(b_mlo - b_mhi, 1e-30)
        b_int = b_lo + (b_hd - b_lo) * ((b_mlo.to(tl.float32) - b_target) / b_span)
        b_int = tl.where(b_int > b_lo, tl.minimum(b_int, b_hd), b_mid)
        b_xa = tl.minimum(b_int, b_mid)
        b_xb = tl.maximum(b_int, b_mid)

        if FIXED:
            b_ma = tl.zeros([BM, BG], dtype=tl.int32)
        else:
            b_ma = tl.zeros([BM, BG], dtype=tl.float32)
            b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
        b_mb = b_ma  # measure at xa / xb
        b_ua = tl.full([BM, BG], float("inf"), dtype=tl.float32)  # min{t >= xa}
        b_ub = b_ua  # min{t >= xb}
        b_la = tl.full([BM, BG], float("-inf"), dtype=tl.float32)  # max{t < xa}
        b_lb = b_la  # max{t < xb}
        for i_n in range(0, tl.cdiv(B, BN)):
            o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
            m_n = o_n < B
            b_t = dot_tile(p_t, p_t, o_m, m_m, o_n, m_n, Dt, s_t, s_t, BD, PRECISION)  # [BM, BN]
            m_v = (o_m[:, None] != o_n[None, :]) & m_n[None, :]
            if FIXED:
                b_w = m_v.to(tl.int32)
            else:
                b_w = tl.where(m_v, tl.exp(b_t * grouping_scale - b_lse[:, None]), 0.0)
            b_t3 = b_t[:, :, None]  # [BM, BN, 1]
            b_w3 = b_w[:, :, None]
            m_v3 = m_v[:, :, None]
            m_a = m_v3 & (b_t3 >= b_xa[:, None, :])  # [BM, BN, BG]
            m_b = m_v3 & (b_t3 >= b_xb[:, None, :])
            b_ma += tl.sum(tl.where(m_a, b_w3, 0), axis=1)
            b_mb += tl.sum(tl.where(m_b, b_w3, 0), axis=1)
            b_ua = tl.minimum(b_ua, tl.min(tl.where(m_a, b_t3, float("inf")), axis=1))
            b_ub = tl.minimum(b_ub, tl.min(tl.where(m_b, b_t3, float("inf")), axis=1))
            b_la = tl.maximum(b_la, tl.max(tl.where(m_v3 & ~m_a, b_t3, float("-inf")), axis=1))
            b_lb = tl.maximum(b_lb, tl.max(tl.where(m_v3 & ~m_b, b_t3, float("-inf")), axis=1))

        # Keep the tightest bracket: both pass, xa passes and xb fails, or both fail.
        m_pb = _predicate(b_mb, b_g, group_p, group_size, FIXED)
        m_pa = _predicate(b_ma, b_g, group_p, group_size, FIXED) & ~m_pb
        m_fa = ~m_pa & ~m_pb
        b_lo_new = tl.minimum(tl.where(m_pb, b_ub, tl.where(m_pa, b_ua, b_lo)), b_hd)
        b_mlo = tl.where(m_pb, b_mb, tl.where(m_pa, b_ma, b_mlo))
        b_hd_new = tl.maximum(tl.where(m_pa, b_lb, tl.where(m_fa, b_la, b_hd)), b_lo)
        b_hu_new = tl.minimum(tl.where(m_pa, b_ub, tl.where(m_fa, b_ua, b_hu)), b_hu)
        b_mhi = tl.where(m_pa, b_mb, tl.where(m_fa, b_ma, b_mhi))
        b_lo = tl.where(b_act, b_lo_new, b_lo)
        b_hd = tl.where(b_act, b_hd_new, b_hd)
        b_hu = tl.where(b_act, b_hu_new, b_hu)
        tl.store(p_lo + p_s, b_lo, mask=m_s)
        tl.store(p_hd + p_s, b_hd, mask=m_s)
        tl.store(p_hu + p_s, b_hu, mask=m_s)
        tl.store(p_mlo + p_s, b_mlo, mask=m_s)
        tl.store(p_mhi + p_s, b_mhi, mask=m_s)
    b_thr = b_hd + (b_hu - b_hd) * 0.5
    tl.store(p_thr + p_s, tl.where(b_thr > b_hd, b_thr, b_hu), mask=m_s)


@triton.jit
def _group_means_kernel(
    p_t,  # [B, Dt] teacher rows, row stride s_t
    p_lse,  # [B] fp32 logsumexp_{j != i}(t_ij * teacher_scale)
    p_thr,  # [B, G-1] fp32, row stride s_thr
    p_qbar,  # [B, G] fp32 out, contiguous
    B, Dt, G, s_t, s_thr, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BG: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Sum and count of q_ij per group for BM rows, streamed over column tiles."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_g = tl.arange(0, BG)
    # thresholds of the padding boundaries are -inf: no t is below them
    b_thr = tl.load(p_thr + o_m[:, None] * s_thr + o_g[None, :],
                    mask=m_m[:, None] & (o_g < G - 1)[None, :], other=float("-inf"))  # [BM, BG]
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    b_sum = tl.zeros([BM, BG], dtype=tl.float32)
    b_cnt = tl.zeros([BM, BG], dtype=tl.int32)
    for i_n in range(0, tl.cdiv(B, BN)):
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < B
        b_t = dot_tile(p_t, p_t, o_m, m_m, o_n, m_n, Dt, s_t, s_t, BD, PRECISION)  # [BM, BN]
        m_v = (o_m[:, None] != o_n[None, :]) & m_n[None, :]
        b_q = tl.exp(b_t * teacher_scale - b_lse[:, None])
        b_grp = tl.sum((b_t[:, :, None] < b_thr[:, None, :]).to(tl.int32), axis=2)  # [BM, BN]
        m_in = m_v[:, :, None] & (b_grp[:, :, None] == o_g[None, None, :])  # [BM, BN, BG]
        b_sum += tl.sum(tl.where(m_in, b_q[:, :, None], 0.0), axis=1)
        b_cnt += tl.sum(m_in.to(tl.int32), axis=1)
    b_qbar = tl.where(b_cnt > 0, b_sum / tl.maximum(b_cnt, 1).to(tl.float32), 0.0)
    tl.store(p_qbar + o_m[:, None] * G + o_g[None, :], b_qbar,
             mask=m_m[:, None] & (o_g < G)[None, :])


def _blocks() -> dict:
    """Row, column and feature blocks. Under the interpreter large blocks run fastest. On a GPU
    the [BM, BN, BG] intermediates and the FMA dot's operands share the registers: 16 x 16
    tiles, BD = 32 and 8 warps compile for sm_90 without spills up to BG = 32 (about 230
    registers; BG = 64 spills under 100 bytes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BM=64, BN=64, BD=64)
    return dict(BM=16, BN=16, BD=32, num_warps=8)


def num_groups(B, group_p=0.1, group_size=None) -> int:
    """G: ``ceil(1 / group_p)`` groups by mass, or ``ceil((B - 1) / group_size)`` of fixed size
    (at least 1)."""
    if group_size is not None:
        if int(group_size) < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size}")
        return max(1, -(-(B - 1) // int(group_size)))
    if not 0.0 < group_p <= 1.0:
        raise ValueError(f"group_p must lie in (0, 1], got {group_p}")
    return max(1, math.ceil(1.0 / group_p))


def group_thresholds(t, lse_g, t_min, t_max, grouping_scale, *, group_p=0.1, group_size=None):
    """thr [B, G-1] fp32 (shape [B, 0] when G == 1): ``t_ij`` (j != i) is in group >= g iff
    ``t_ij < thr[i, g-1]``; thr is non-increasing in g. ``t`` [B, Dt] teacher rows (normalised,
    weighted, concatenated); ``lse_g``, ``t_min``, ``t_max`` fp32 [B] row statistics over j != i.
    ``group_size``, when given, selects the fixed-size variant (``lse_g`` is then unused).
    One launch per search pass and one host sync per pass."""
    t = unit_stride_rows(t)
    B, Dt = t.shape
    G = num_groups(B, group_p, group_size)
    if G - 1 > MAX_BOUNDARIES:
        knob = "group_size" if group_size is not None else "group_p"
        raise ValueError(f"Group-P with {G} groups (B={B}, group_p={group_p}, group_size="
                         f"{group_size}): at most {MAX_BOUNDARIES + 1} are supported; raise {knob}")
    G1 = G - 1
    thr = torch.empty((B, G1), device=t.device, dtype=torch.float32)
    if G1 == 0:
        return thr
    if B < 2:  # no off-diagonal entry: any threshold is right
        return thr.zero_()
    fixed = group_size is not None
    t_min, t_max = t_min.float(), t_max.float()
    lo = (t_min - STATS_MARGIN * (1.0 + t_min.abs()))[:, None].repeat(1, G1)
    hd = (t_max + STATS_MARGIN * (1.0 + t_max.abs()))[:, None].repeat(1, G1)
    hu = hd.clone()
    if fixed:
        meas_lo = torch.full((B, G1), B - 1, device=t.device, dtype=torch.int32)
        meas_hi = torch.zeros((B, G1), device=t.device, dtype=torch.int32)
    else:
        meas_lo = torch.ones((B, G1), device=t.device, dtype=torch.float32)
        meas_hi = torch.zeros((B, G1), device=t.device, dtype=torch.float32)
    BG = max(2, triton.next_power_of_2(G1))
    cfg = _blocks()
    grid = (triton.cdiv(B, cfg["BM"]),)
    lse_g = lse_g.float().contiguous()
    for _ in range(MAX_PASSES):
        _group_search_pass_kernel[grid](
            t, lse_g, lo, hd, hu, meas_lo, meas_hi, thr, B, Dt, G1, t.stride(0),
            float(grouping_scale), float(group_p), int(group_size or 0),
            FIXED=fixed, BG=BG, PRECISION=dot_precision(t.dtype), **cfg)
        if not bool((lo < hd).any()):
            return thr
    raise RuntimeError(f"group_thresholds: search not converged after {MAX_PASSES} passes "
                       "(non-finite teacher logits?)")


def group_means(t, lse_t, thr, teacher_scale):
    """qbar [B, G] fp32: ``qbar[i, g]`` = mean of ``q_ij = exp(t_ij * teacher_scale - lse_t_i)``
    over the members j (j != i) of group g of row i, 0 for an empty group; groups from ``thr``
    [B, G-1] as returned by ``group_thresholds``. One pass."""
    t = unit_stride_rows(t)
    B, Dt = t.shape
    G = thr.shape[1] + 1
    thr = unit_stride_rows(thr.float())
    qbar = torch.empty((B, G), device=t.device, dtype=torch.float32)
    BG = max(2, triton.next_power_of_2(G))
    cfg = _blocks()
    _group_means_kernel[(triton.cdiv(B, cfg["BM"]),)](
        t, lse_t.float().contiguous(), thr, qbar, B, Dt, G, t.stride(0), thr.stride(0),
        float(teacher_scale), BG=BG, PRECISION=dot_precision(t.dtype), **cfg)
    return qbar
