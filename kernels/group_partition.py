"""Group-P partition of the teacher's rows (SPEC sections 4 and 5) without sorting and
without B x B memory.

Row i's off-diagonal teacher logits ``t_ij = (t_i . t_j) rt_i rt_j`` (raw rows, fp32 inverse
norms: ``teacher_logits``) are split into G groups. With the mass function
``F_i(x) = sum_{j != i, t_ij >= x} pi_ij`` (``pi`` the softmax at the grouping scale) and the
count ``N_i(x) = #{j != i : t_ij >= x}``, an element of value v lies in group >= g iff the
predicate ``floor(F_i(v) / P) >= g`` (by mass) or ``N_i(v) - 1 >= g * S`` (fixed size)
holds. Both are monotone in v, so boundary g is a threshold ``thr[i, g-1]``: ``t_ij`` is in
group >= g iff ``t_ij < thr[i, g-1]``, and ``group_i(j) = #{g : t_ij < thr[i, g]}``.

``group_thresholds`` finds every threshold in a few passes over the teacher's columns (per
pass and row chunk: ``_place_kernel`` puts the probe points and windows, the streaming
``_group_probe_kernel`` evaluates them, ``_narrow_kernel`` and ``_settle_kernel`` update the
brackets; one host sync per pass, to drop the rows that are done). Per (row, boundary) the
search keeps a bracket ([B, G - 1] tensors):
  ``lo``  a value of the row whose predicate holds (at first a bound below the row),
  ``hd``  a value of the row such that every x > hd fails (at first a bound above the row),
  ``hu``  the smallest value of the row above hd (or that bound),
  ``meas_lo``, ``meas_hi``  the measure (mass F, or count N) at lo and just above hd.
A pass evaluates the measure at BP probe points per row together with the row's values next
to each point (``min{t >= x}``, ``max{t < x}``), which "snap" the brackets to row values, and
collects every value of the row inside one window per (row, boundary) (into one buffer per
row, which ``_split_windows`` then splits by window):
  * pass 1: probe points on a uniform grid over [t_min, t_max], shared by all boundaries;
    windows only when the whole row fits in the buffer; without them, the measure alone (the
    brackets end at grid points, a third of the work of snapping);
  * later passes: the window holds about ``FILL * BUFFER`` values around the inverse-cubic
    estimate of where the measure crosses the boundary (from the probe points around the
    crossing), its top is a probe point (so the measure above the window is known), and
    further probe points sit at its bottom and at ``OUTER``-fold distances beyond.
A window that contains the answer and at most ``BUFFER`` values settles its boundary
(``_settle_kernel``, no sort): each value's measure is the measure at the window's top plus
the weights of the window's values >= it, and the answer is the largest value whose measure
passes. A (row, boundary) is done when
lo == hd, the largest value in group >= g; ``thr = (hd + hu) / 2`` sits in the middle of the
gap above it, so that a kernel computing ``t_ij`` in another summation order (cuBLAS for
other rows, Triton's dots, or the transposed entry ``t_ji``) still classifies every entry the
same way. Every value is ``dot * rt_i * rt_j``: the probe and group-means kernels take the
dots of their rows from cuBLAS (``matmul_f32``, fp32 [rows, B] slabs within the budget,
read by ``tiles.slab_tile``), the pairwise kernel and the row statistics compute them with
Triton (``teacher_logits``), so two kernels' values can differ only where their dots sum in
another order. On real MiniLM sentence embeddings the search takes
2-4 passes from B = 256 to 65,536 (``benchmarks/group_search_passes.py``).
Up to ``PAIRWISE_MAX_B`` rows ``group_thresholds`` takes another way, with no host
bookkeeping: ``_pairwise_brackets_kernel`` computes every value's exact measure by comparing
it with every other value of its row (B^3 comparisons, the column tiles' dots recomputed per
tile of values), and per boundary the largest value that passes (hd) and the smallest that
fails (hu) with atomics; thr is again mid-gap. Two launches and two fills, no host sync,
extra memory [B, G - 1].
Thresholds put every column of a tie (equal values: the same sentence twice in a batch) in one
group, the group of the last of them; the ranking of the torch backend (a stable sort) puts
them in column order, and where a tie straddles a boundary that splits it. ``tie_cuts`` gives
the pairwise thresholds that ranking: per (row, boundary) a cut column and a lower threshold
mid-gap below the tie, which the columns before the cut compare with (``_tie_cuts_kernel``:
one sweep over the columns, and a second for a row block with a split tie). The search does
without (README, "Where the backends differ").
``group_means`` averages the targets ``q_ij`` over each group in one pass over row slabs;
the search does without that pass and without its own first one where it can:
``group_thresholds(means=...)`` averages each row from the teacher dots of the pass that
finishes it (``_KernelProbes.after_chunk``), and ``grid_pass`` lets the row statistics'
slabs (``distill.distill_row_stats(grid=...)``) carry the first pass on their teacher dots.
"""
import math

import torch
import triton
import triton.language as tl

from . import utils
from .tiles import dot_tile, slab_tile
from .utils import (SPLIT_PROGRAMS, aligned, cdiv, dot_precision, matmul_f32, next_pow2, slab_buffer, slab_rows,
                    unit_stride_rows)

MAX_BOUNDARIES = 63  # G - 1: the boundary axis is a register dimension of the bookkeeping kernels
MAX_PASSES = 64  # safety cap; measured on real embeddings: 2-4 passes
GRID_LANES = 32  # probe points of the first pass (64: as many teacher GEMMs, 1.6x the compares; grid_lanes.py)
BUFFER = 256  # values collected per (row, boundary) and pass
FILL = 0.8  # a window aims at FILL * BUFFER values
OUTER = 3.0  # probe points beyond a window sit at OUTER**k half-widths from its centre
CHUNK_VALUES = 1 << 24  # a launch that collects covers at most this many buffer slots
MIN_CHUNK_ROWS = 64  # a row chunk under a memory budget has at least this many rows
PROBE_POINTS = 32  # probe points a program of the probe kernel measures at (more: another sweep)
PROBE_POINTS_SNAP = 16  # ... and snaps at (three accumulators a point)
MEANS_GROUPS = 16  # groups the group-means kernel accumulates at once, in registers (more: another sweep)
PAIRWISE_MAX_B = 1024  # "auto" compares every pair up to this B (B^3 work; see benchmarks/NOTES.md)
STATS_MARGIN = 1e-3  # the bracket starts at [t_min - margin, t_max + margin]: the row statistics
# may come from another summation order or precision (the search itself never needs them exact)


@triton.jit
def teacher_logits(
    p_t,  # [B, Dt] teacher rows, raw (any float dtype), row stride s_t, unit feature stride
    p_rt,  # [B] fp32 inverse norms (ones for pre-normalised rows)
    o_m, m_m,  # [BM] rows (int64) and mask
    o_n, m_n,  # [BN] columns and mask
    Dt, s_t,
    BDT: tl.constexpr, PREC_T: tl.constexpr,
):
    """Teacher logits ``t_ij = (t_i . t_j) rt_i rt_j`` of rows o_m against columns o_n, [BM, BN]
    fp32 (masked entries 0), with Triton dots: the pairwise kernel's (the other kernels read
    cuBLAS dots, see the module docstring)."""
    b_t = dot_tile(p_t, p_t, o_m, m_m, o_n, m_n, Dt, s_t, s_t, BDT, PREC_T)  # [BM, BN]
    b_rt_m = tl.load(p_rt + o_m, mask=m_m, other=0.0)
    b_rt_n = tl.load(p_rt + o_n, mask=m_n, other=0.0)
    return b_t * b_rt_m[:, None] * b_rt_n[None, :]


@triton.jit
def _group_probe_kernel(
    p_dots,  # [R, B] fp32 raw teacher dots t_r . t_j of the launch's rows (cuBLAS), row stride ld (``slab_buffer``)
    p_rt,  # [B] fp32 inverse norms
    p_lse,  # [B] fp32 logsumexp_{j != i}(t_ij * grouping_scale) (unused when FIXED)
    p_rows,  # [R] int64 rows evaluated by this launch
    p_x,  # [R, BP] fp32 probe points
    p_meas,  # [S, R, BP] out: F (fp32) or N (int32) at each probe point over split S's columns
    p_above,  # [S, R, BP] fp32 out (SNAP): min{t >= x} (inf if none)
    p_below,  # [S, R, BP] fp32 out (SNAP): max{t < x} (-inf if none)
    p_wlo,  # [R, G1] fp32 window [wlo, whi) per boundary, NaN for none (read when COLLECT)
    p_whi,  # [R, G1] fp32
    p_count,  # [R] int32 in/out, zeroed by the caller: the row's values found inside any window
    p_buf,  # [R, CR] fp32 out: the first CR of them, in no particular order (``_split_windows``)
    R, B, ld, CR, tiles_per_split, grouping_scale,
    FIXED: tl.constexpr, SNAP: tl.constexpr, COLLECT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BP: tl.constexpr, NP: tl.constexpr, G1: tl.constexpr,
):
    """Measure (and with SNAP the snaps) at the NP probe points p0 .. p0 + NP - 1 (p0 = NP *
    program_id(2)) of BM rows over one split of the columns, and (COLLECT, in the first point
    block) the row values inside any boundary's window into one buffer per row (a window test
    per boundary, unrolled, and one atomic per value found: per-window atomics and stores cost
    ~19 instructions an entry and boundary, sm_90a, and a loop over the boundaries carrying the
    test's mask ~14), the logits read from the rows' cuBLAS dots. Each point keeps its measure
    (and snaps) in [BM, BN] accumulators of its own (tuples), reduced over the columns once at
    the end: per entry and point a compare, then a select and an add (and a select and a min /
    max per snap), no row reduction in the loop (reducing every tile cost ~2.8 instructions an
    entry per reduction, sm_90a)."""
    i_m, i_s = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    p0 = tl.program_id(2) * NP
    o_r = i_m * BM + tl.arange(0, BM)
    m_r = o_r < R
    o_m = tl.load(p_rows + o_r, mask=m_r, other=0)
    if not FIXED:
        b_lse = tl.load(p_lse + o_m, mask=m_r, other=0.0)
    xs = ()  # [BM] each
    meas = ()  # [BM, BN] each, and with SNAP above and below
    above = ()
    below = ()
    for k in tl.static_range(NP):
        xs = xs + (tl.load(p_x + o_r * BP + p0 + k, mask=m_r & (p0 + k < BP), other=float("nan")),)
        meas = meas + (tl.zeros([BM, BN], dtype=tl.int32 if FIXED else tl.float32),)
        if SNAP:
            above = above + (tl.full([BM, BN], float("inf"), dtype=tl.float32),)
            below = below + (tl.full([BM, BN], float("-inf"), dtype=tl.float32),)
    i_first = i_s * tiles_per_split
    for i_n in range(i_first, tl.minimum(i_first + tiles_per_split, tl.cdiv(B, BN))):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < B
        b_t = slab_tile(p_dots, p_rt, o_r, o_m, m_r, o_n, m_n, o_n < ld, ld)  # [BM, BN]
        m_v = (o_m[:, None] != o_n[None, :]) & m_n[None, :]
        if FIXED:
            b_w = m_v.to(tl.int32)
        else:
            b_w = tl.where(m_v, tl.exp(b_t * grouping_scale - b_lse[:, None]), 0.0)
        b_t = tl.where(m_v, b_t, float("-inf"))  # the diagonal and padding: below every point and window
        new_meas = ()
        new_above = ()
        new_below = ()
        for k in tl.static_range(NP):
            m_ge = b_t >= xs[k][:, None]
            new_meas = new_meas + (meas[k] + tl.where(m_ge, b_w, 0),)
            if SNAP:
                new_above = new_above + (tl.minimum(above[k], tl.where(m_ge, b_t, float("inf"))),)
                new_below = new_below + (tl.maximum(below[k], tl.where(m_ge, float("-inf"), b_t)),)
        meas = new_meas
        if SNAP:
            above = new_above
            below = new_below
        if COLLECT and p0 == 0:
            m_in = b_t != b_t  # [BM, BN] False (b_t is never NaN): inside some window
            for g in tl.static_range(G1):
                b_wlo = tl.load(p_wlo + o_r * G1 + g, mask=m_r, other=float("nan"))  # NaN: nothing is inside
                b_whi = tl.load(p_whi + o_r * G1 + g, mask=m_r, other=float("nan"))
                m_in |= (b_t >= b_wlo[:, None]) & (b_t < b_whi[:, None])
            p_cnt = p_count + o_r[:, None] + tl.zeros([BM, BN], dtype=tl.int64)
            b_slot = tl.atomic_add(p_cnt, 1, mask=m_in, sem="relaxed")
            tl.store(p_buf + o_r[:, None] * CR + b_slot, b_t, mask=m_in & (b_slot < CR))
    o_out = (i_s * R + o_r) * BP + p0  # [BM] lane p0 of the rows' results
    for k in tl.static_range(NP):
        m_out = m_r & (p0 + k < BP)
        tl.store(p_meas + o_out + k, tl.sum(meas[k], axis=1), mask=m_out)
        if SNAP:
            tl.store(p_above + o_out + k, tl.min(above[k], axis=1), mask=m_out)
            tl.store(p_below + o_out + k, tl.max(below[k], axis=1), mask=m_out)


@triton.jit
def _split_windows_kernel(
    p_row_buf,  # [R, CR] fp32 the values the probe kernel found inside any window of each row
    p_row_count,  # [R] int32 how many it found (may exceed CR)
    p_wlo, p_whi,  # [R, G1] fp32 the windows [wlo, whi), NaN for none
    p_count,  # [R, G1] int32 out, zeroed by the caller: values in each window (> C: too many)
    p_buf,  # [R, G1, C] fp32 out: the first C of them, in no particular order
    R, G1, C, CR,
    BR: tl.constexpr, BV: tl.constexpr,
):
    """BR rows' collected values (one block of BV each) into the buffers of the windows they lie
    in (a value in two overlapping windows goes to both). A row whose values overflowed its
    buffer (count > CR) holds an arbitrary part of them: its windows stay empty, and an empty
    window settles nothing."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_r = o_r < R
    b_n = tl.load(p_row_count + o_r, mask=m_r, other=0)
    m_v = (m_r & (b_n <= CR))[:, None] & (o_v[None, :] < b_n[:, None])
    b_v = tl.load(p_row_buf + o_r[:, None] * CR + o_v[None, :], mask=m_v, other=float("nan"))  # [BR, BV]
    for g in range(0, G1):
        o_rg = o_r * G1 + g
        b_wlo = tl.load(p_wlo + o_rg, mask=m_r, other=float("nan"))
        b_whi = tl.load(p_whi + o_rg, mask=m_r, other=float("nan"))
        m_in = (b_v >= b_wlo[:, None]) & (b_v < b_whi[:, None])  # NaN (no value, no window): False
        p_cnt = p_count + o_rg[:, None] + tl.zeros([BR, BV], dtype=tl.int64)
        b_slot = tl.atomic_add(p_cnt, 1, mask=m_in, sem="relaxed")
        tl.store(p_buf + o_rg[:, None] * C + b_slot, b_v, mask=m_in & (b_slot < C))


@triton.jit
def _edge(edges, lows, cuts, k: tl.constexpr, o_n, TIES: tl.constexpr):
    """Threshold k of ``_group_means_kernel``'s block at columns o_n [BN]: [BM, 1], or with TIES
    [BM, BN] (the columns before a row's cut take its lower threshold)."""
    b_edge = edges[k][:, None]
    if TIES:
        b_edge = tl.where(o_n[None, :] < cuts[k][:, None], lows[k][:, None], b_edge)
    return b_edge


@triton.jit
def _group_means_kernel(
    p_dots,  # [R, B] fp32 raw teacher dots t_r . t_j of the rows (cuBLAS), row stride ld (``slab_buffer``)
    p_rt,  # [B] fp32 inverse norms
    p_lse,  # [B] fp32 logsumexp_{j != i}(t_ij * teacher_scale)
    p_rows,  # [R] int64 the dots' rows
    p_done,  # [R] int8: the rows to average (the others are skipped)
    p_thr,  # [R, G-1] fp32 the rows' thresholds, row stride s_thr
    p_low, p_cut,  # [R, G-1] fp32, int32 their tie cuts (TIES: ``tie_cuts``), row stride s_thr
    p_sum,  # [R, S, G] fp32 out: each column split's sums of q per row and group
    p_count,  # [R, S, G] int32 out: ... and member counts
    R, B, ld, G, s_thr, tiles_per_split, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, NG: tl.constexpr, TIES: tl.constexpr,
):
    """Sum and count of q_ij over the NG groups g0 .. g0 + NG - 1 (g0 = NG * program_id(1)) of
    BM rows, streamed over the column tiles of split program_id(2) (none when no row of the
    block is to be averaged); ``_group_means_merge_kernel`` adds the splits up. Group g holds
    ``thr[g] <= t < thr[g-1]`` (thr[-1] = inf, thr[G-1] = -inf); each group keeps its sum and
    count in a [BM, BN] accumulator of its own (a tuple), reduced over the columns once at the
    end: per entry and group a compare, a select and two adds, no row reduction in the loop
    (reducing every tile cost ~2.8 instructions an entry per sum, sm_90a)."""
    o_r = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    g0 = tl.program_id(1) * NG
    i_s = tl.program_id(2)
    m_m = o_r < R
    o_m = tl.load(p_rows + o_r, mask=m_m, other=0)
    m_m &= tl.load(p_done + o_r, mask=m_m, other=0) != 0
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    edges = ()  # [BM] each: the NG + 1 thresholds around the block's groups
    lows = ()  # ... their tie cuts' lower thresholds and cut columns (TIES)
    cuts = ()
    for k in tl.static_range(NG + 1):
        b = g0 + k - 1
        m_b = m_m & (b >= 0) & (b < G - 1)
        b_thr = tl.load(p_thr + o_r * s_thr + b, mask=m_b, other=0.0)
        edges = edges + (tl.where(b < 0, float("inf"), tl.where(b < G - 1, b_thr, float("-inf"))),)
        if TIES:
            lows = lows + (tl.load(p_low + o_r * s_thr + b, mask=m_b, other=0.0),)
            cuts = cuts + (tl.load(p_cut + o_r * s_thr + b, mask=m_b, other=0),)
    sums = ()
    counts = ()
    for k in tl.static_range(NG):
        sums = sums + (tl.zeros([BM, BN], dtype=tl.float32),)
        counts = counts + (tl.zeros([BM, BN], dtype=tl.int32),)
    tile0 = i_s * tiles_per_split
    tile1 = tl.where(tl.max(m_m.to(tl.int32), axis=0) > 0, tl.minimum(tile0 + tiles_per_split, tl.cdiv(B, BN)), 0)
    for i_n in range(tile0, tile1):
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < B
        b_t = slab_tile(p_dots, p_rt, o_r, o_m, m_m, o_n, m_n, o_n < ld, ld)  # [BM, BN]
        b_q = tl.exp(b_t * teacher_scale - b_lse[:, None])
        b_t = tl.where((o_m[:, None] != o_n[None, :]) & m_n[None, :], b_t, float("nan"))  # in no group
        m_below = b_t < _edge(edges, lows, cuts, 0, o_n, TIES)
        new_sums = ()
        new_counts = ()
        for k in tl.static_range(NG):
            m_next = b_t < _edge(edges, lows, cuts, k + 1, o_n, TIES)
            m_g = m_below & ~m_next  # thr[g] <= t < thr[g - 1]
            new_sums = new_sums + (sums[k] + tl.where(m_g, b_q, 0.0),)
            new_counts = new_counts + (counts[k] + m_g.to(tl.int32),)
            m_below = m_next
        sums = new_sums
        counts = new_counts
    p_out = (o_r * tl.num_programs(2) + i_s) * G + g0
    for k in tl.static_range(NG):
        m_out = m_m & (g0 + k < G)
        tl.store(p_sum + p_out + k, tl.sum(sums[k], axis=1), mask=m_out)
        tl.store(p_count + p_out + k, tl.sum(counts[k], axis=1), mask=m_out)


@triton.jit
def _group_means_merge_kernel(
    p_sum,  # [R, S, G] fp32: _group_means_kernel's sums per column split
    p_count,  # [R, S, G] int32: ... and counts
    p_rows,  # [R] int64 the rows
    p_done,  # [R] int8: the rows to average (the others are left as they are)
    p_qbar,  # [B, G] fp32 out, contiguous
    R, G, n_splits,
    BR: tl.constexpr, BS: tl.constexpr, BG: tl.constexpr,
):
    """``qbar`` of BR rows: the splits' sums and counts added in split order, BS splits a
    [BR, BS, BG] block (deterministic; a few loads, not a chain of S), the mean of each group,
    0 for an empty one."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_s = tl.arange(0, BS)
    o_g = tl.arange(0, BG)
    m_r = o_r < R
    m_r &= tl.load(p_done + o_r, mask=m_r, other=0) != 0
    m_blk = m_r[:, None, None] & (o_g < G)[None, None, :]
    o_blk = (o_r[:, None, None] * n_splits + o_s[None, :, None]) * G + o_g[None, None, :]  # [BR, BS, BG]
    b_sum = tl.zeros([BR, BG], dtype=tl.float32)
    b_count = tl.zeros([BR, BG], dtype=tl.int32)
    for s0 in range(0, n_splits, BS):
        m = m_blk & (s0 + o_s < n_splits)[None, :, None]
        b_sum += tl.sum(tl.load(p_sum + o_blk + s0 * G, mask=m, other=0.0), axis=1)
        b_count += tl.sum(tl.load(p_count + o_blk + s0 * G, mask=m, other=0), axis=1)
    b_qbar = tl.where(b_count > 0, b_sum / tl.maximum(b_count, 1).to(tl.float32), 0.0)
    o_m = tl.load(p_rows + o_r, mask=m_r, other=0)
    tl.store(p_qbar + o_m[:, None] * G + o_g[None, :], b_qbar, mask=m_r[:, None] & (o_g < G)[None, :])


@triton.jit
def _block_rows(i_m, BM: tl.constexpr, row0, row_end, B, SHARD: tl.constexpr):
    """(rows o_m [BM], mask) of row block i_m: of the batch, or with SHARD of rows row0 .. row_end - 1
    (a constexpr, so that the whole batch's build is the one without the offset)."""
    if SHARD:
        o_m = row0 + i_m * BM + tl.arange(0, BM)
        m_m = o_m < row_end
    else:
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < B
    return o_m, m_m


@triton.jit
def _pairwise_brackets_kernel(
    p_t,  # [B, Dt] teacher rows, row stride s_t
    p_rt,  # [B] fp32 inverse norms
    p_lse,  # [B] fp32 logsumexp_{j != i}(t_ij * grouping_scale) (unused when FIXED)
    p_hd,  # [B, G1] fp32 in/out, -inf at first: max of row i's values in group >= g
    p_hu,  # [B, G1] fp32 in/out, +inf at first: min of row i's values in group < g
    row0, row_end, B, Dt, G1, s_t, group_size, group_p, grouping_scale,
    FIXED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BG: tl.constexpr,
    PRECISION: tl.constexpr, SHARD: tl.constexpr,
):
    """The exact measure of every value in a [BM, BN] tile of t (rows o_m, from row0 below
    row_end with SHARD; columns o_n), by
    comparing it with every value of its row, one [BM, BN, BN] tile at a time; then, per
    boundary, the tile's largest value that passes and smallest that fails, merged into hd and
    hu with atomics. The column tiles have the tile's shape, so the one holding o_n recomputes
    its values bit for bit: each value counts its own weight."""
    i_m, i_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_m, m_m = _block_rows(i_m, BM, row0, row_end, B, SHARD)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < B
    b_tn = teacher_logits(p_t, p_rt, o_m, m_m, o_n, m_n, Dt, s_t, BD, PRECISION)  # [BM, BN]
    m_vn = (o_m[:, None] != o_n[None, :]) & m_n[None, :] & m_m[:, None]
    if FIXED:
        b_meas = tl.zeros([BM, BN], dtype=tl.int32)
    else:
        b_meas = tl.zeros([BM, BN], dtype=tl.float32)
        b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    for i_k in range(0, tl.cdiv(B, BN)):
        o_k = i_k * BN + tl.arange(0, BN)
        m_k = o_k < B
        b_tk = teacher_logits(p_t, p_rt, o_m, m_m, o_k, m_k, Dt, s_t, BD, PRECISION)  # [BM, BN]
        m_vk = (o_m[:, None] != o_k[None, :]) & m_k[None, :]
        if FIXED:
            b_wk = m_vk.to(tl.int32)
        else:
            b_wk = tl.where(m_vk, tl.exp(b_tk * grouping_scale - b_lse[:, None]), 0.0)
        m_ge = b_tk[:, None, :] >= b_tn[:, :, None]  # [BM, BN (value), BN (k)]
        b_meas += tl.sum(tl.where(m_ge, b_wk[:, None, :], 0), axis=2)
    o_g = tl.arange(0, BG)
    g = o_g + 1  # [BG] boundary
    if FIXED:
        holds = (b_meas - 1)[:, :, None] >= (g * group_size)[None, None, :]  # [BM, BN, BG]
    else:
        holds = tl.floor(b_meas / group_p)[:, :, None] >= g.to(tl.float32)[None, None, :]
    b_t3 = b_tn[:, :, None]
    m_v3 = m_vn[:, :, None]
    b_hd = tl.max(tl.where(holds & m_v3, b_t3, float("-inf")), axis=1)  # [BM, BG]
    b_hu = tl.min(tl.where(~holds & m_v3, b_t3, float("inf")), axis=1)
    o_out = o_m[:, None] * G1 + o_g[None, :]
    m_out = m_m[:, None] & (o_g < G1)[None, :]
    tl.atomic_max(p_hd + o_out, b_hd, mask=m_out, sem="relaxed")
    tl.atomic_min(p_hu + o_out, b_hu, mask=m_out, sem="relaxed")


@triton.jit
def _tie_cuts_kernel(
    p_t,  # [B, Dt] teacher rows, row stride s_t
    p_rt,  # [B] fp32 inverse norms
    p_lse,  # [B] fp32 logsumexp_{j != i}(t_ij * grouping_scale) (unused when FIXED)
    p_t_min, p_t_max,  # [B] fp32 row statistics (j != i)
    p_thr,  # [B, G1] fp32 thresholds
    p_low,  # [B, G1] fp32 out: the lower threshold of the columns before the cut (thr where none)
    p_cut,  # [B, G1] int32 out: the cut column (0: none)
    row0, row_end, B, Dt, G1, s_t, group_size, group_p, grouping_scale, margin,
    FIXED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BG: tl.constexpr,
    PRECISION: tl.constexpr, SHARD: tl.constexpr,
):
    """Tie cuts of BM rows (from row0 below row_end with SHARD; ``tie_cuts``). Sweep 1 over the columns: per boundary, the largest
    value below the threshold (hd, the tie's value), how many columns hold it (n), the largest
    value below it and the measure above the threshold. The ranking puts the tie's k-th column
    (column order) at measure ``above + k w``, so its first ``k`` columns (those whose measure
    fails the boundary's predicate, at most n - 1: the last one passes) belong above the
    boundary. Sweep 2, only for a block with such a split tie: the column of the tie's
    (k + 1)-th member, the cut."""
    o_m, m_m = _block_rows(tl.program_id(0).to(tl.int64), BM, row0, row_end, B, SHARD)
    o_g = tl.arange(0, BG)
    m_out = m_m[:, None] & (o_g < G1)[None, :]
    o_out = o_m[:, None] * G1 + o_g[None, :]
    b_thr = tl.load(p_thr + o_out, mask=m_out, other=float("-inf"))  # [BM, BG]
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    b_hd = tl.full([BM, BG], float("-inf"), dtype=tl.float32)
    b_prev = tl.full([BM, BG], float("-inf"), dtype=tl.float32)
    b_n = tl.zeros([BM, BG], dtype=tl.int32)
    if FIXED:
        b_above = tl.zeros([BM, BG], dtype=tl.int32)
    else:
        b_above = tl.zeros([BM, BG], dtype=tl.float32)
    for i_n in range(0, tl.cdiv(B, BN)):
        o_n = i_n * BN + tl.arange(0, BN)
        m_n = o_n < B
        b_t = teacher_logits(p_t, p_rt, o_m, m_m, o_n, m_n, Dt, s_t, BD, PRECISION)  # [BM, BN]
        m_v = (o_m[:, None] != o_n[None, :]) & m_n[None, :] & m_m[:, None]
        if FIXED:
            b_w = m_v.to(tl.int32)
        else:
            b_w = tl.where(m_v, tl.exp(b_t * grouping_scale - b_lse[:, None]), 0.0)
        b_t3 = b_t[:, :, None]  # [BM, BN, 1] against [BM, 1, BG]
        m_v3 = m_v[:, :, None]
        b_above += tl.sum(tl.where(m_v3 & (b_t3 >= b_thr[:, None, :]), b_w[:, :, None], 0), axis=1)
        b_v = tl.where(m_v3 & (b_t3 < b_thr[:, None, :]), b_t3, float("-inf"))  # [BM, BN, BG]
        b_top = tl.max(b_v, axis=1)  # [BM, BG] the tile's largest value below thr, its count, the next
        b_cnt = tl.sum(((b_v == b_top[:, None, :]) & (b_v > float("-inf"))).to(tl.int32), axis=1)
        b_next = tl.max(tl.where(b_v < b_top[:, None, :], b_v, float("-inf")), axis=1)
        b_new = tl.maximum(b_hd, b_top)
        b_prev = tl.maximum(tl.where(b_hd < b_new, b_hd, b_prev), tl.where(b_top < b_new, b_top, b_next))
        b_n = tl.where(b_hd == b_new, b_n, 0) + tl.where(b_top == b_new, b_cnt, 0)
        b_hd = b_new
    # k: the tie's columns whose measure fails the boundary, in [0, n - 1]
    g = o_g[None, :] + 1
    if FIXED:
        b_k = g * group_size - b_above
    else:
        b_w = tl.exp(b_hd * grouping_scale - b_lse[:, None])  # each tied column's weight
        b_kf = tl.ceil((g.to(tl.float32) * group_p - b_above) / tl.where(b_n >= 2, b_w, 1.0)) - 1.0
        b_k = tl.maximum(tl.minimum(b_kf, (b_n - 1).to(tl.float32)), 0.0).to(tl.int32)  # (w 0: n - 1)
        # the estimate corrected against the predicate itself (one step each way)
        b_k = tl.where((b_k >= 1) & _holds(b_above + b_k.to(tl.float32) * b_w, g, group_size, group_p, FIXED),
                       b_k - 1, b_k)
        b_k = tl.where((b_k < b_n - 1)
                       & ~_holds(b_above + (b_k + 1).to(tl.float32) * b_w, g, group_size, group_p, FIXED),
                       b_k + 1, b_k)
    b_k = tl.where(m_out & (b_n >= 2), tl.maximum(tl.minimum(b_k, b_n - 1), 0), 0)
    b_cut = tl.zeros([BM, BG], dtype=tl.int32)
    if tl.max(tl.max(b_k, axis=1), axis=0) > 0:  # sweep 2: the (k + 1)-th tied column, in column order
        b_seen = tl.zeros([BM, BG], dtype=tl.int32)
        b_cut = tl.full([BM, BG], 2147483647, dtype=tl.int32)
        for i_n in range(0, tl.cdiv(B, BN)):
            o_n = i_n * BN + tl.arange(0, BN)
            m_n = o_n < B
            b_t = teacher_logits(p_t, p_rt, o_m, m_m, o_n, m_n, Dt, s_t, BD, PRECISION)  # bit for bit sweep 1's
            m_v = (o_m[:, None] != o_n[None, :]) & m_n[None, :] & m_m[:, None]
            m_tie = (m_v[:, :, None] & (b_t[:, :, None] == b_hd[:, None, :])).to(tl.int32)  # [BM, BN, BG]
            b_pos = b_seen[:, None, :] + tl.cumsum(m_tie, axis=1)  # each tied column's place, from 1
            m_hit = (m_tie > 0) & (b_pos == b_k[:, None, :] + 1)
            b_cut = tl.minimum(b_cut, tl.min(tl.where(m_hit, o_n[None, :, None], 2147483647), axis=1))
            b_seen += tl.sum(m_tie, axis=1)
        b_cut = tl.where(b_k > 0, b_cut, 0)
    b_t_min = tl.load(p_t_min + o_m, mask=m_m, other=0.0)[:, None]
    b_t_max = tl.load(p_t_max + o_m, mask=m_m, other=0.0)[:, None]
    b_low = tl.where(b_k > 0, _mid_gap(b_prev, b_hd, b_t_min, b_t_max, margin), b_thr)
    tl.store(p_low + o_out, b_low, mask=m_out)
    tl.store(p_cut + o_out, b_cut, mask=m_out)


@triton.jit
def _mid_gap(hd, hu, t_min, t_max, margin):
    """thr in the middle of the gap (hd, hu) (hu itself where the gap has no float inside); for
    the pairwise brackets, where no value of the row passes hd is a bound below the row, where
    every value passes hu is a bound above it (the search's brackets start at those bounds)."""
    hd = tl.where(hd > float("-inf"), hd, t_min - margin * (1.0 + tl.abs(t_min)))
    hu = tl.where(hu < float("inf"), hu, t_max + margin * (1.0 + tl.abs(t_max)))
    mid = hd + (hu - hd) * 0.5
    return tl.where(mid > hd, mid, hu)


@triton.jit
def _thresholds_from_brackets_kernel(
    p_hd, p_hu,  # [B, G1] fp32 (the pairwise kernel's, or the search's when done)
    p_t_min, p_t_max,  # [B] fp32 row statistics (j != i)
    p_thr,  # [B, G1] fp32 out
    N, G1, margin,
    BLOCK: tl.constexpr,
):
    """thr = ``_mid_gap`` of N (row, boundary) pairs."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_hd = tl.load(p_hd + o, mask=m, other=0.0)
    b_hu = tl.load(p_hu + o, mask=m, other=0.0)
    b_t_min = tl.load(p_t_min + o // G1, mask=m, other=0.0)
    b_t_max = tl.load(p_t_max + o // G1, mask=m, other=0.0)
    tl.store(p_thr + o, _mid_gap(b_hd, b_hu, b_t_min, b_t_max, margin), mask=m)


@triton.jit
def _grid_points_kernel(
    p_t_min, p_t_max,  # [B] fp32 row statistics (j != i)
    p_x,  # [B, BP] fp32 out: rows row0 .. row0 + R
    row0, R, margin,
    BR: tl.constexpr, BP: tl.constexpr,
):
    """The grid pass's BP probe points of R rows: uniform over (lo, hd], the bracket ``_search``
    starts from (``_initial_brackets``, ``_grid_points``: the same operations)."""
    o_m = row0 + tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_m = o_m < row0 + R
    t_min = tl.load(p_t_min + o_m, mask=m_m, other=0.0)
    t_max = tl.load(p_t_max + o_m, mask=m_m, other=0.0)
    lo = t_min - margin * (1.0 + tl.abs(t_min))
    hd = t_max + margin * (1.0 + tl.abs(t_max))
    o_p = tl.arange(0, BP)
    x = hd[:, None] - (hd - lo)[:, None] * ((BP - 1 - o_p).to(tl.float32) / BP)[None, :]
    tl.store(p_x + o_m[:, None] * BP + o_p[None, :], x, mask=m_m[:, None])


@triton.jit
def _settled_rows_kernel(
    p_rows,  # [R] int64 rows of a search chunk
    p_lo, p_hd, p_hu,  # [B, G1] fp32 the search's brackets
    p_t_min, p_t_max,  # [B] fp32 row statistics (j != i)
    p_thr,  # [R, G1] fp32 out: the rows' thresholds (meaningful where done)
    p_done,  # [R] int8 out: 1 where every boundary of the row is settled (lo == hd)
    R, G1, margin,
    BR: tl.constexpr, BG: tl.constexpr,
):
    """Which rows of a chunk the search has finished, and their thresholds (``_mid_gap``)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_row = tl.load(p_rows + o_r, mask=m_r, other=0)
    o_g = tl.arange(0, BG)
    m = m_r[:, None] & (o_g < G1)[None, :]
    o_state = o_row[:, None] * G1 + o_g[None, :]
    lo = tl.load(p_lo + o_state, mask=m, other=0.0)
    hd = tl.load(p_hd + o_state, mask=m, other=0.0)
    hu = tl.load(p_hu + o_state, mask=m, other=0.0)
    t_min = tl.load(p_t_min + o_row, mask=m_r, other=0.0)[:, None]
    t_max = tl.load(p_t_max + o_row, mask=m_r, other=0.0)[:, None]
    tl.store(p_thr + o_r[:, None] * G1 + o_g[None, :], _mid_gap(hd, hu, t_min, t_max, margin), mask=m)
    n_open = tl.sum((m & (lo < hd)).to(tl.int32), axis=1)
    tl.store(p_done + o_r, (n_open == 0).to(tl.int8), mask=m_r)


def _logit_blocks() -> dict:
    """Blocks of the group-means kernel, which reads the cuBLAS teacher dots of its rows:
    [16, 64] tiles, 8 warps, where its 2 x MEANS_GROUPS accumulators fit the registers (sm_90a:
    173 registers at 10 groups, 242 at 16; [32, 64] spills at 10). The interpreter pays per
    block op: there larger tiles."""
    if utils.interpreter_blocks():
        return dict(BM=64, BN=128)
    return dict(BM=16, BN=64, num_warps=8)


def _probe_blocks(snap) -> dict:
    """Blocks of the probe kernel: [BM, 64] tiles, 8 warps, and NP probe points a program, so
    that the points' [BM, BN] accumulators fit the registers: 32 measuring (16 rows: 4 entries a
    thread, 128 registers of accumulators) or 16 snapping (3 accumulators a point: 8 rows). The
    interpreter pays per block op: there larger tiles, the same points."""
    NP = PROBE_POINTS_SNAP if snap else PROBE_POINTS
    if utils.interpreter_blocks():
        return dict(BM=64, BN=128, NP=NP)
    return dict(BM=8 if snap else 16, BN=64, NP=NP, num_warps=8)


def _pairwise_blocks() -> dict:
    """Blocks of the pairwise kernel: its [BM, BN, BN] comparison tile and the closing
    [BM, BN, BG] one share the registers with the two dots' operands."""
    if utils.interpreter_blocks():
        return dict(BM=64, BN=64, BD=64)
    return dict(BM=16, BN=32, BD=32, num_warps=8)


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


def group_thresholds(t, rt, lse_g, t_min, t_max, grouping_scale, *, group_p=0.1, group_size=None,
                     budget_bytes=None, method="auto", means=None, grid=None, rows=None):
    """thr [B, G-1] fp32 (shape [B, 0] when G == 1): ``t_ij`` (j != i) is in group >= g iff
    ``t_ij < thr[i, g-1]``; thr is non-increasing in g. ``t`` [B, Dt] teacher rows (fp16, bf16
    or fp32) and ``rt`` [B] fp32 their inverse norms (``teacher_logits``); ``lse_g``, ``t_min``,
    ``t_max`` fp32 [B] row statistics over j != i.
    ``group_size``, when given, selects the fixed-size variant (``lse_g`` is then unused).
    ``method``: "search" (a few passes, each a few launches per row chunk and one host sync;
    ``budget_bytes`` bounds a row chunk's temporaries: ``_row_bytes``, None: chunks of at most
    ``CHUNK_VALUES`` slots), "pairwise" (two launches that compare every pair of a row's
    values: B^3 comparisons, no host sync, extra memory [B, G-1]), or "auto": pairwise up to
    ``PAIRWISE_MAX_B`` rows.
    With ``means`` = (``lse_t`` [B] fp32, ``teacher_scale``), returns ``(thr, qbar)``, qbar
    [B, G] the group means of ``group_means``: the search takes them from the teacher dots of
    the pass that finishes each row (no pass of their own), the other ways by ``group_means``.
    ``grid``: the search's first pass, done already (``grid_pass``; None where it returns None).
    ``rows=(start, stop)``: those rows' thresholds (and means) only, a shard's (the statistics
    need only its rows; the other rows of thr and qbar are not meaningful)."""
    if method not in ("auto", "search", "pairwise"):
        raise ValueError(f'method must be "auto", "search" or "pairwise", got {method!r}')
    t = unit_stride_rows(t)
    B, Dt = t.shape
    rows = (0, B) if rows is None else rows
    G = num_groups(B, group_p, group_size)
    if G - 1 > MAX_BOUNDARIES:
        knob = "group_size" if group_size is not None else "group_p"
        raise ValueError(f"Group-P with {G} groups (B={B}, group_p={group_p}, group_size="
                         f"{group_size}): at most {MAX_BOUNDARIES + 1} are supported; raise {knob}")
    lse_g = lse_g.float().contiguous()
    if G == 1:
        thr = torch.empty((B, 0), device=t.device, dtype=torch.float32)
    elif B < 2:  # no off-diagonal entry: any threshold is right
        thr = torch.zeros((B, G - 1), device=t.device, dtype=torch.float32)
    elif not searches(B, method):
        thr = _pairwise_thresholds(t, rt.contiguous(), lse_g, t_min, t_max, float(grouping_scale), G - 1,
                                   group_p, group_size, rows)
    else:
        probes = _KernelProbes(t, rt.contiguous(), lse_g, float(grouping_scale), G - 1, group_size is not None,
                               budget_bytes, means)
        thr = _search(probes, t_min, t_max, lse_g, grouping_scale, G - 1, B, group_p, group_size,
                      budget_bytes=budget_bytes, row_values=aligned(B) + Dt,  # a row's dots, its gathered t row
                      after_chunk=probes.after_chunk, grid=grid, rows=rows)
        if means is not None:
            return thr, probes.qbar
    if means is None:
        return thr
    return thr, group_means(t, rt, means[0], thr, means[1], budget_bytes=budget_bytes, rows=rows)


def _pairwise_thresholds(t, rt, lse_g, t_min, t_max, grouping_scale, G1, group_p, group_size, rows):
    """thr [B, G1] of the rows (start, stop) by ``_pairwise_brackets_kernel`` (every value's exact
    measure) and ``_thresholds_from_brackets_kernel``: two launches, no host sync."""
    B, Dt = t.shape
    start, stop = rows
    hd = torch.full((B, G1), -math.inf, device=t.device, dtype=torch.float32)
    hu = torch.full((B, G1), math.inf, device=t.device, dtype=torch.float32)
    cfg = _pairwise_blocks()
    _pairwise_brackets_kernel[(cdiv(stop - start, cfg["BM"]), cdiv(B, cfg["BN"]))](
        t, rt, lse_g, hd, hu, start, stop, B, Dt, G1, t.stride(0), group_size or 0,
        1.0 if group_size is not None else group_p, grouping_scale, FIXED=group_size is not None, BG=max(2, next_pow2(G1)),
        PRECISION=dot_precision(t.dtype), SHARD=rows != (0, B), **cfg)
    return _thresholds_from_brackets(hd, hu, t_min, t_max)


def tie_cuts(t, rt, lse_g, t_min, t_max, thr, grouping_scale, *, group_p=0.1, group_size=None, rows=None):
    """Tied values in column order (the torch backend's stable sort) for thresholds ``thr``
    [B, G1] (arguments as in ``group_thresholds``): ``(low, cut)`` [B, G1] fp32 and int32. The
    thresholds alone put every column of a tie in one group; where a tie straddles boundary g
    (the same sentence twice in a batch), its columns before ``cut[i, g]`` belong above the
    boundary, so entry (i, j) is in group > g iff ``t_ij < (low if j < cut else thr)[i, g]``,
    ``low`` mid-gap below the tie (``cut`` 0: no split, ``low`` = thr). One launch, no host
    sync: a sweep over the columns per row block (Triton dots, ``teacher_logits``), and a second
    for a block with a split tie; B^2 Dt work, the pairwise thresholds' way only.
    ``rows=(start, stop)``: those rows' cuts only (the other rows are not meaningful)."""
    t = unit_stride_rows(t)
    B, Dt = t.shape
    start, stop = (0, B) if rows is None else rows
    G1 = thr.shape[1]
    low = torch.empty((B, G1), device=t.device, dtype=torch.float32)
    cut = torch.empty((B, G1), device=t.device, dtype=torch.int32)
    if G1 == 0 or B < 2:
        return low.copy_(thr), cut.zero_()
    cfg = _pairwise_blocks()
    _tie_cuts_kernel[(cdiv(stop - start, cfg["BM"]),)](
        t, rt.contiguous(), lse_g.float().contiguous(), t_min.float().contiguous(), t_max.float().contiguous(),
        thr.float().contiguous(), low, cut, start, stop, B, Dt, G1, t.stride(0), group_size or 0,
        1.0 if group_size is not None else group_p, float(grouping_scale), STATS_MARGIN,
        FIXED=group_size is not None, BG=max(2, next_pow2(G1)), PRECISION=dot_precision(t.dtype),
        SHARD=(start, stop) != (0, B), **cfg)
    return low, cut


def _thresholds_from_brackets(hd, hu, t_min, t_max):
    """thr [B, G1] mid-gap between hd and hu [B, G1] (``_thresholds_from_brackets_kernel``)."""
    thr = torch.empty_like(hd)
    _thresholds_from_brackets_kernel[(cdiv(thr.numel(), 1024),)](
        hd, hu, t_min.float().contiguous(), t_max.float().contiguous(), thr, thr.numel(), thr.shape[1],
        STATS_MARGIN, BLOCK=1024)
    return thr


def _row_bytes(G1, lanes, collect):
    """Bytes of host temporaries per row of a search pass with ``lanes`` probe points and G1
    boundaries, collecting or not (an upper estimate, measured with ``distillcse.tensor_memory``
    in ``tests/test_memory_plan.py``): the points and what the probe kernel returns at them, the
    windows and the measures at their tops, and the collected values (each row's, then each
    window's)."""
    return 32 * lanes + 48 * G1 + (8 * BUFFER * G1 + 4 if collect else 0)


class _KernelProbes:
    """``evaluate(rows, x, windows, snap)`` for ``_search`` by ``_group_probe_kernel`` on the
    teacher rows ``t`` [B, Dt] (unit feature stride) and their inverse norms ``rt`` [B]: rows
    [R] int64, x [R, BP] probe points, windows None or (wlo, whi) [R, G1] -> the measure
    [R, BP], with ``snap`` min{t >= x} and max{t < x} [R, BP] (else None, None) and, with
    windows, count [R, G1] and buffer [R, G1, BUFFER]. The rows' teacher dots [R, B] come from
    cuBLAS in fp32 (``_search`` sizes the chunks for them); the per-split partial results take
    at most a quarter of ``budget_bytes``.

    With ``means`` (``lse_t`` [B] fp32, ``teacher_scale``), ``after_chunk`` also writes the
    group means ``qbar`` [B, G] (as ``group_means``) of the rows the chunk finished, from the
    dots the chunk was evaluated on: the search's last pass over a row is its means pass too."""

    def __init__(self, t, rt, lse_g, grouping_scale, G1, fixed, budget_bytes=None, means=None):
        self.t, self.rt, self.lse_g, self.grouping_scale = t, rt, lse_g, grouping_scale
        self.G1, self.fixed, self.budget_bytes = G1, fixed, budget_bytes
        self.dots = None  # the last chunk's, kept for its means
        self.qbar = self.lse_t = None
        if means is not None:
            self.lse_t, self.teacher_scale = means[0].float().contiguous(), float(means[1])
            self.qbar = torch.empty((t.shape[0], G1 + 1), device=t.device, dtype=torch.float32)

    def __call__(self, rows, x, windows, snap, dots=None, out=None):
        """(``dots``: the rows' teacher dots [R, B] fp32 if already computed; ``out``: a contiguous
        [R, BP] tensor of the measure's dtype to write the measure into.)"""
        t, G1, cfg = self.t, self.G1, _probe_blocks(snap)
        R, BP = x.shape
        NP = min(BP, cfg.pop("NP"))  # points a program; the point blocks sweep the dots again
        self.dots = None  # the previous chunk's
        if dots is None:
            dots = matmul_f32(t[rows], t.T, out=slab_buffer(R, t.shape[0], t.device))  # [R, B] fp32
        blocks = cdiv(R, cfg["BM"]) * cdiv(BP, NP)
        # splits: a power of two (utils.column_splits); their partial measures are summed by one op
        n_tiles = cdiv(t.shape[0], cfg["BN"])
        splits = utils.column_splits(n_tiles, blocks, SPLIT_PROGRAMS)
        while self.budget_bytes is not None and splits > 1 and 12 * splits * R * BP > self.budget_bytes // 4:
            splits //= 2
        if out is not None and splits == 1:
            meas = out[None]  # the kernel's one split writes the answer
        else:
            meas = torch.empty((splits, R, BP), device=t.device, dtype=torch.int32 if self.fixed else torch.float32)
        above = below = meas  # not written without snaps
        if snap:
            above = torch.empty((splits, R, BP), device=t.device, dtype=torch.float32)
            below = torch.empty_like(above)
        if windows is None:
            wlo = whi = count = buf = x  # not read
        else:
            wlo, whi = windows
            count = torch.zeros(R, device=t.device, dtype=torch.int32)
            buf = torch.empty((R, G1 * BUFFER), device=t.device, dtype=torch.float32)
        _group_probe_kernel[(cdiv(R, cfg["BM"]), splits, cdiv(BP, NP))](
            dots, self.rt, self.lse_g, rows, x, meas, above, below, wlo, whi, count, buf,
            R, t.shape[0], dots.stride(0), G1 * BUFFER, cdiv(n_tiles, splits), self.grouping_scale,
            FIXED=self.fixed, SNAP=snap, COLLECT=windows is not None, BP=BP, NP=NP, G1=G1, **cfg)
        if windows is not None:
            count, buf = _split_windows(count, buf, wlo, whi)
        self.dots = dots if self.qbar is not None and windows is not None else None  # only windows finish rows
        # one op (a fixed order for the shape), not a tree of log2(splits) adds: ~8 launches fewer a chunk
        meas = meas[0] if splits == 1 else torch.sum(meas, 0, dtype=meas.dtype, out=out)
        if not snap:
            return meas, None, None, count, buf
        return meas, above.amin(0), below.amax(0), count, buf

    def after_chunk(self, rows, state, t_min, t_max):
        """The group means of the chunk's rows that the search has finished (``_settled_rows_kernel``
        then ``_group_means_kernel`` on the chunk's dots, which it then lets go)."""
        dots, self.dots = self.dots, None
        if dots is None:
            return
        R, G1 = len(rows), self.G1
        thr = torch.empty((R, G1), device=rows.device, dtype=torch.float32)
        done = torch.empty(R, device=rows.device, dtype=torch.int8)
        BR = 256 if utils.interpreter_blocks() else 32
        _settled_rows_kernel[(cdiv(R, BR),)](
            rows, state["lo"], state["hd"], state["hu"], t_min, t_max, thr, done, R, G1, STATS_MARGIN,
            BR=BR, BG=max(2, next_pow2(G1)))
        _means_launch(dots, self.rt, self.lse_t, rows, done, thr, self.qbar, self.teacher_scale,
                      max_bytes=None if self.budget_bytes is None else self.budget_bytes // 4)


def _split_windows(row_count, row_buf, wlo, whi):
    """(count [R, G1] int32, buf [R, G1, BUFFER] fp32): each window's values from its row's
    collection (``row_count`` [R], ``row_buf`` [R, G1 * BUFFER]; ``_split_windows_kernel``)."""
    (R, G1), CR = wlo.shape, row_buf.shape[1]
    count = torch.zeros((R, G1), device=wlo.device, dtype=torch.int32)
    buf = torch.empty((R, G1, BUFFER), device=wlo.device, dtype=torch.float32)
    BR, BV = (64, 512) if utils.interpreter_blocks() else (8, 128)
    _split_windows_kernel[(cdiv(R, BR), cdiv(CR, BV))](
        row_buf, row_count, wlo, whi, count, buf, R, G1, BUFFER, CR, BR=BR, BV=BV, num_warps=4)
    return count, buf


def _initial_brackets(t_min, t_max):
    """(lo, hd) [R] fp32: bounds just below and above each row's values ([R] statistics, which
    may come from another summation order or precision: ``STATS_MARGIN``)."""
    return t_min - STATS_MARGIN * (1.0 + t_min.abs()), t_max + STATS_MARGIN * (1.0 + t_max.abs())


def _grid_points(lo, hd):
    """The grid pass's probe points [R, GRID_LANES]: uniform over [lo, hd] ([R, 1]), hd the last."""
    j = torch.arange(GRID_LANES, device=lo.device, dtype=torch.float32)
    return hd - (hd - lo) * ((GRID_LANES - 1 - j) / GRID_LANES)


def searches(B, method="auto"):
    """Whether ``group_thresholds`` finds B rows' thresholds by the search (else pairwise)."""
    return method == "search" or (method == "auto" and B > PAIRWISE_MAX_B)


class GridPass:
    """The search's first pass (the measure at GRID_LANES points uniform over each row's range,
    no windows) on teacher dots computed elsewhere: ``distill.distill_row_stats(grid=...)``
    calls it per slab of rows with the slab's teacher dots and statistics, then
    ``group_thresholds(grid=...)`` starts from its results, one sweep of teacher GEMMs fewer.
    Extra memory: the points and measures [B, GRID_LANES], the rows' indices [B]. Make it with
    ``grid_pass``."""

    def __init__(self, t, rt, grouping_scale, G1, fixed, budget_bytes):
        B = t.shape[0]
        self.probe_args = (t, rt, float(grouping_scale), G1, fixed, budget_bytes)
        self.x = torch.empty((B, GRID_LANES), device=t.device, dtype=torch.float32)
        self.meas = torch.empty((B, GRID_LANES), device=t.device, dtype=torch.int32 if fixed else torch.float32)
        self.rows = torch.arange(B, device=t.device)  # a slab's rows are a slice of it: no op a slab

    def __call__(self, row0, dots, lse_g, t_min, t_max):
        """The rows row0 .. row0 + n from their raw teacher dots ``dots`` [n, B] fp32 (``t[rows] t^T``
        as ``matmul_f32`` writes them, in a slab ``slab_tile`` reads) and their statistics
        (``lse_g``, ``t_min``, ``t_max`` [B] fp32, set for those rows)."""
        n = dots.shape[0]
        rows = self.rows[row0:row0 + n]
        BR = 256 if utils.interpreter_blocks() else 32
        _grid_points_kernel[(cdiv(n, BR),)](t_min, t_max, self.x, row0, n, STATS_MARGIN, BR=BR, BP=GRID_LANES)
        x = self.x[row0:row0 + n]
        t, rt, scale, G1, fixed, budget_bytes = self.probe_args
        probes = _KernelProbes(t, rt, lse_g.contiguous(), scale, G1, fixed, budget_bytes)
        probes(rows, x, None, False, dots=dots, out=self.meas[row0:row0 + n])


def grid_pass(t, rt, grouping_scale, *, group_p=0.1, group_size=None, budget_bytes=None, method="auto"):
    """A ``GridPass`` for ``group_thresholds`` of these teacher rows (arguments as there), or None
    where it finds the thresholds another way or its first pass collects whole rows."""
    B = t.shape[0]
    G = num_groups(B, group_p, group_size)
    if not searches(B, method) or not 1 < G <= MAX_BOUNDARIES + 1 or B - 1 <= FILL * BUFFER:
        return None
    return GridPass(unit_stride_rows(t), rt.contiguous(), grouping_scale, G - 1, group_size is not None,
                    budget_bytes)


def _search(evaluate, t_min, t_max, lse_g, grouping_scale, G1, B, group_p, group_size, trace=None,
            budget_bytes=None, row_values=0, after_chunk=None, grid=None, rows=None):
    """thr [R, G1] for R rows whose values are seen through ``evaluate`` (see ``_KernelProbes``;
    rows index t_min), in row chunks of at most ``CHUNK_VALUES`` collection slots, as many
    4-byte values of ``evaluate``'s own a row (``row_values``: the kernel probes' teacher dots
    and the row itself),
    and (when given) ``budget_bytes`` of temporaries. ``trace``, a list, receives per pass
    (fraction of (row, boundary) pairs still open, fraction of rows evaluated, probe points per row);
    ``after_chunk(rows, state, t_min, t_max)``, if given, is called after each row chunk's pass;
    a row leaves the search only after a pass with windows then (the only passes that can
    finish it, whose dots ``after_chunk`` may use). ``grid``: a ``GridPass`` that has seen
    every row searched, the first pass's points and measures. ``rows=(start, stop)``: search
    those rows only (default all)."""
    fixed = group_size is not None
    dev = t_min.device
    t_min, t_max = t_min.float().contiguous(), t_max.float().contiguous()
    lo, hd = _initial_brackets(t_min, t_max)
    lo, hd = lo[:, None].repeat(1, G1), hd[:, None].repeat(1, G1)
    if fixed:
        meas_lo = torch.full_like(lo, B - 1, dtype=torch.int32)
        meas_hi = torch.zeros_like(lo, dtype=torch.int32)
    else:
        meas_lo, meas_hi = torch.ones_like(lo), torch.zeros_like(lo)
    state = dict(lo=lo, hd=hd, hu=hd.clone(), meas_lo=meas_lo, meas_hi=meas_hi,
                 est=torch.full_like(lo, math.nan), dx_dm=torch.full_like(lo, math.nan))
    rule = dict(G1=G1, group_size=group_size or 0, group_p=1.0 if fixed else float(group_p),
                scale=float(grouping_scale), FIXED=fixed)
    lse_g = lse_g.float().contiguous()
    lanes = max(16, next_pow2(G1))
    start, stop = (0, len(t_min)) if rows is None else rows
    rows = torch.arange(start, stop, device=dev)
    for i_pass in range(MAX_PASSES):
        collect = i_pass > 0 or B - 1 <= FILL * BUFFER
        from_grid = i_pass == 0 and grid is not None
        values = 0 if from_grid else row_values  # the grid's pass evaluates nothing: no dots, no row
        chunk = max(1, CHUNK_VALUES // (G1 * BUFFER)) if collect else len(rows)
        # at least MIN_CHUNK_ROWS rows: a launch fills a few row blocks
        if values:
            chunk = min(chunk, max(MIN_CHUNK_ROWS, CHUNK_VALUES // values))
        if budget_bytes is not None:
            per_row = _row_bytes(G1, GRID_LANES if i_pass == 0 else lanes, collect) + 4 * values
            chunk = min(chunk, max(MIN_CHUNK_ROWS, (budget_bytes - budget_bytes // 4) // per_row))  # 1/4: the splits'
        for r in rows.split(chunk):
            points = _search_chunk(state, r, i_pass, collect,
                                   (lambda r, x, w, s: (grid.meas[r],) + (None,) * 4) if from_grid else evaluate,
                                   rule, lanes, lse_g, grid.x[r] if from_grid else None)
            if after_chunk is not None and collect:
                after_chunk(r, state, t_min, t_max)
        is_open = state["lo"][start:stop] < state["hd"][start:stop]
        if trace is not None:
            trace.append((is_open.float().mean().item(), len(rows) / (stop - start), points))
        if after_chunk is None or collect:
            rows = is_open.any(1).nonzero()[:, 0]  # the pass's host sync
            rows = rows + start if start else rows
        if len(rows) == 0:
            return _thresholds_from_brackets(state["hd"], state["hu"], t_min, t_max)
    raise RuntimeError(f"group_thresholds: search not converged after {MAX_PASSES} passes "
                       "(non-finite teacher logits?)")


def _search_chunk(state, r, i_pass, collect, evaluate, rule, lanes, lse, grid_points=None):
    """One pass over the rows r [R] (``state`` [B, G1] tensors updated in place by
    ``_narrow_kernel`` and ``_settle_kernel``; the chunk's temporaries die on return); returns
    the probe points per row. ``lse`` [B] fp32; ``grid_points`` the first pass's, if given."""
    R, G1 = len(r), rule["G1"]
    BG = max(8, next_pow2(G1))  # Triton 3.6 cannot build _place_kernel for sm_90 at BG <= 4
    if i_pass == 0:  # a uniform grid over [lo, hd], the same for every boundary
        x = _grid_points(state["lo"][r, :1], state["hd"][r, :1]) if grid_points is None else grid_points
        windows = (state["lo"][r], state["hd"][r]) if collect else None  # [lo0, hd0): the whole row
        top = torch.full((R, G1), GRID_LANES - 1, device=r.device, dtype=torch.int32)
    else:
        x = torch.empty((R, lanes), device=r.device, dtype=torch.float32)
        windows = tuple(torch.empty((R, G1), device=r.device, dtype=torch.float32) for _ in range(2))
        top = torch.empty((R, G1), device=r.device, dtype=torch.int32)
        BR = _book_rows(lanes)
        _place_kernel[(cdiv(R, BR),)](
            r, lse, *(state[k] for k in STATE), x, *windows, top, R, FILL * BUFFER, OUTER, **rule, BR=BR, BP=lanes,
            BG=BG)
    # the grid pass without windows measures only (a third of the work of also snapping to
    # the row's values next to each point, which only tighten the brackets a little there)
    snap = windows is not None
    meas, above, below, count, buf = evaluate(r, x, windows, snap)
    m_top = torch.empty((R, G1), device=r.device, dtype=meas.dtype)  # the measure at each window's top
    u_top = torch.empty((R, G1), device=r.device, dtype=torch.float32)  # the smallest value >= the top
    BR = _book_rows(x.shape[1])
    _narrow_kernel[(cdiv(R, BR),)](
        r, x, meas.contiguous(), *((above.contiguous(), below.contiguous()) if snap else (x, x)), top,
        x if windows is None else windows[1], m_top, u_top, lse, *(state[k] for k in STATE), R, **rule,
        SNAP=snap, SETTLE=windows is not None, BR=BR, BP=x.shape[1], BG=BG)
    if windows is not None:
        # GPU: 4 pairs, 32 x 32 comparisons a step ([4, 32, 32] over 128 threads); the interpreter
        # pays per program, so there a program takes 256 pairs
        BS, BC = (256, 64) if utils.interpreter_blocks() else (4, 32)
        _settle_kernel[(cdiv(R * G1, BS),)](
            buf, count, m_top, u_top, windows[0], r, lse, state["lo"], state["hd"], state["hu"],
            R * G1, G1, BUFFER, rule["group_size"], rule["group_p"], rule["scale"], FIXED=rule["FIXED"], BS=BS,
            BC=min(BC, next_pow2(BUFFER)), num_warps=4)
    return x.shape[1]


STATE = ("lo", "hd", "hu", "meas_lo", "meas_hi", "est", "dx_dm")  # the search's [B, G1] state, in kernel order


def _book_rows(BP):
    """Rows per program of the bookkeeping kernels: their largest tile is the [BR, BP, BP] that
    ranks the probe points (BP >= BG), at most 8K values (sm_90a, 4 warps, G - 1 = 9: the
    narrowing kernel at BP = 32 spilled 40-104 B with 16 rows, 16K values); the interpreter pays
    per program: there 256 rows."""
    return 256 if utils.interpreter_blocks() else max(1, min(16, 8192 // (BP * BP)))


@triton.jit
def _next_up(x):
    """The smallest fp32 above each finite x (``torch.nextafter(x, inf)``)."""
    bits = x.to(tl.int32, bitcast=True)
    up = tl.where(x > 0, bits + 1, bits - 1)  # sign and magnitude: below zero the magnitude shrinks
    return tl.where(x == 0, tl.full(x.shape, 1, tl.int32), up).to(tl.float32, bitcast=True)


@triton.jit
def _expm1(x):
    """exp(x) - 1 to about fp32's relative precision (Kahan: the quotient undoes exp's rounding)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(tl.where(u == 1.0, 2.0, u))))


@triton.jit
def _log1p(z):
    """log(1 + z) for z > -1 to about fp32's relative precision (Goldberg: w = 1 + z rounded, the
    quotient undoes its rounding); about -87 for z <= -1, finite, where the search's estimate
    only needs "far"."""
    w = 1.0 + z
    return tl.where(w == 1.0, z, tl.log(tl.maximum(w, 1e-38)) * (z / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _passed(m, G1, group_size, group_p, FIXED: tl.constexpr):
    """Number of boundaries whose predicate a measure m satisfies, in [0, G1] (int32)."""
    if FIXED:
        q = (m - 1) // group_size  # below 0 only for m = 0, clamped either way
    else:
        q = tl.floor(m / group_p).to(tl.int32)
    return tl.minimum(tl.maximum(q, 0), G1)


@triton.jit
def _holds(m, g, group_size, group_p, FIXED: tl.constexpr):
    """Whether a value whose measure is m lies in group >= g."""
    if FIXED:
        holds = m - 1 >= g * group_size
    else:
        holds = tl.floor(m / group_p) >= g.to(tl.float32)
    return holds


@triton.jit
def _weight(v, lse, scale, FIXED: tl.constexpr):
    """Measure carried by one value v of a row (lse broadcast to v)."""
    if FIXED:
        w = tl.full(v.shape, 1, tl.int32)
    else:
        w = tl.exp(v * scale - lse)
    return w


@triton.jit
def _target(g, group_size, group_p, FIXED: tl.constexpr):
    """The measure at which boundary g starts to hold (fp32)."""
    if FIXED:
        y = (g * group_size + 1).to(tl.float32)
    else:
        y = g.to(tl.float32) * group_p
    return y


@triton.jit
def _lagrange(y, m_i, m_a, m_b, m_c):
    """The Lagrange basis polynomial of node i (the other nodes a, b, c) at y, and its derivative."""
    f_a = (y - m_a) / (m_i - m_a)
    f_b = (y - m_b) / (m_i - m_b)
    f_c = (y - m_c) / (m_i - m_c)
    return f_a * f_b * f_c, f_b * f_c / (m_i - m_a) + f_a * f_c / (m_i - m_b) + f_a * f_b / (m_i - m_c)


@triton.jit
def _inverse_cubic(xs, ms, i_pass, y, BP: tl.constexpr):
    """x where the measure reaches y [BR, BG] and -dx/dm there, from the cubic x(m) through the
    sorted probe points (xs, ms [BR, BP]) i_pass - 1 .. i_pass + 2, in fp64 (NaN unless their
    measures strictly decrease and the estimate falls between the middle two)."""
    valid = (i_pass >= 1) & (i_pass + 2 < BP)
    i0 = tl.minimum(tl.maximum(i_pass - 1, 0), BP - 1)
    i1 = tl.minimum(tl.maximum(i_pass, 0), BP - 1)
    i2 = tl.minimum(i_pass + 1, BP - 1)
    i3 = tl.minimum(i_pass + 2, BP - 1)
    x0, x1 = tl.gather(xs, i0, axis=1).to(tl.float64), tl.gather(xs, i1, axis=1).to(tl.float64)
    x2, x3 = tl.gather(xs, i2, axis=1).to(tl.float64), tl.gather(xs, i3, axis=1).to(tl.float64)
    m0, m1 = tl.gather(ms, i0, axis=1).to(tl.float64), tl.gather(ms, i1, axis=1).to(tl.float64)
    m2, m3 = tl.gather(ms, i2, axis=1).to(tl.float64), tl.gather(ms, i3, axis=1).to(tl.float64)
    valid &= (m0 > m1) & (m1 > m2) & (m2 > m3)
    # elsewhere distinct stand-in nodes: no division by zero (the interpreter warns of it)
    m0, m1 = tl.where(valid, m0, 3.0), tl.where(valid, m1, 2.0)
    m2, m3 = tl.where(valid, m2, 1.0), tl.where(valid, m3, 0.0)
    y = y.to(tl.float64)
    b0, d0 = _lagrange(y, m0, m1, m2, m3)
    b1, d1 = _lagrange(y, m1, m0, m2, m3)
    b2, d2 = _lagrange(y, m2, m0, m1, m3)
    b3, d3 = _lagrange(y, m3, m0, m1, m2)
    est = x0 * b0 + x1 * b1 + x2 * b2 + x3 * b3
    slope = x0 * d0 + x1 * d1 + x2 * d2 + x3 * d3
    valid &= (est >= x1) & (est <= x2) & (slope < 0)
    return tl.where(valid, est, float("nan")).to(tl.float32), tl.where(valid, -slope, float("nan")).to(tl.float32)


@triton.jit
def _state_tiles(p_rows, p_lse, p_lo, p_hd, p_hu, p_mlo, p_mhi, R, G1, BR: tl.constexpr, BG: tl.constexpr):
    """Offsets [BR, BG] of a program's (row, boundary) pairs in the chunk and in the state, their
    mask, the rows' lse [BR, 1] and the state's brackets there (padding: an empty bracket)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    o_row = tl.load(p_rows + o_r, mask=m_r, other=0)
    o_g = tl.arange(0, BG)
    m = m_r[:, None] & (o_g < G1)[None, :]
    o_chunk = o_r[:, None] * G1 + o_g[None, :]
    o_state = o_row[:, None] * G1 + o_g[None, :]
    b_lse = tl.load(p_lse + o_row, mask=m_r, other=0.0)[:, None]
    lo = tl.load(p_lo + o_state, mask=m, other=0.0)
    hd = tl.load(p_hd + o_state, mask=m, other=0.0)
    hu = tl.load(p_hu + o_state, mask=m, other=0.0)
    m_lo = tl.load(p_mlo + o_state, mask=m, other=0)
    m_hi = tl.load(p_mhi + o_state, mask=m, other=0)
    return o_r, m_r, o_g, m, o_chunk, o_state, b_lse, lo, hd, hu, m_lo, m_hi


@triton.jit
def _place_kernel(
    p_rows,  # [R] int64 rows of the chunk
    p_lse,  # [B] fp32 (by mass)
    p_lo, p_hd, p_hu, p_mlo, p_mhi, p_est, p_dxdm,  # [B, G1] the search's state (STATE)
    p_x,  # [R, BP] fp32 out: probe points
    p_wlo, p_whi,  # [R, G1] fp32 out: windows [wlo, whi) (wlo NaN where the pair is done)
    p_top,  # [R, G1] int32 out: lane of each window's top (whi)
    R, fill, outer, G1, group_size, group_p, scale,
    FIXED: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, BG: tl.constexpr,
):
    """Probe points and windows of a later pass for BR rows: the row's BP points shared out
    among its open boundaries in order; each boundary's first point is its window's top, the
    others sit at its bottom and at ``outer``-fold distances beyond, around the inverse cubic's
    estimate of the crossing or, without one, where a uniform density of values (weights
    exp(scale t) when by mass) puts it; a bracket of surely at most ``fill`` values is
    collected whole, its points spread evenly from hd down."""
    o_r, m_r, o_g, m, o_chunk, o_state, b_lse, lo, hd, hu, m_lo, m_hi = _state_tiles(
        p_rows, p_lse, p_lo, p_hd, p_hu, p_mlo, p_mhi, R, G1, BR, BG)
    est = tl.load(p_est + o_state, mask=m, other=float("nan"))
    dx_dm = tl.load(p_dxdm + o_state, mask=m, other=float("nan"))
    g = o_g[None, :] + 1
    is_open = (lo < hd) & m
    n_open = tl.maximum(tl.sum(is_open.to(tl.int32), axis=1), 1)[:, None]  # [BR, 1]
    rank = tl.cumsum(is_open.to(tl.int32), axis=1) - 1
    per = tl.where(is_open, BP // n_open + (rank < BP % n_open).to(tl.int32), 0)  # points of each boundary
    end = tl.cumsum(per, axis=1)
    o_l = tl.arange(0, BP)
    owner = tl.sum((end[:, None, :] <= o_l[None, :, None]).to(tl.int32), axis=2)  # [BR, BP]
    owner = tl.minimum(owner, G1 - 1)
    top = tl.minimum(end - per, BP - 1)  # each boundary's first point: its window's top
    j = o_l[None, :] - tl.gather(top, owner, axis=1)  # index of a point among its boundary's
    # values in the bracket and where the target lies (fraction from the top)
    width = hd - lo
    y = _target(g, group_size, group_p, FIXED)
    if FIXED:
        n = (m_lo - m_hi).to(tl.float32)
        n_max = n
        frac = (y - m_hi.to(tl.float32)) / tl.maximum(n, 1.0)
    else:
        mass = tl.maximum(m_lo - m_hi, 1e-30)
        sw = tl.maximum(scale * width, 1e-30)
        decay = _expm1(-sw)
        frac = -_log1p((y - m_hi) / mass * decay) / sw
        n = mass * sw / tl.maximum(_weight(hd, b_lse, scale, FIXED) * -decay, 1e-38)
        n_max = mass / _weight(lo, b_lse, scale, FIXED)  # every value of the bracket weighs at least w(lo)
    n = tl.maximum(n, 1.0)
    centre = tl.where(est != est, hd - tl.minimum(tl.maximum(frac, 0.0), 1.0) * width, est)
    centre = tl.minimum(tl.maximum(centre, lo), hd)
    # distance between neighbouring values: the bracket's mean, or less where the inverse
    # cubic's slope says the values are denser around the centre
    mean_spacing = width / n
    if FIXED:
        local = dx_dm
    else:
        local = dx_dm * _weight(centre, b_lse, scale, FIXED)
    spacing = tl.where(local < mean_spacing, local, mean_spacing)
    half = (fill / 2) * spacing
    # Windows end mid-gap above hd at the latest and reach a mean spacing below lo: the values
    # at the bracket's ends were computed in earlier passes and may differ from this pass's by
    # rounding. A bracket of surely at most ``fill`` values is collected whole.
    whole = n_max <= fill
    gap_mid = hd + (hu - hd) * 0.5
    gap_mid = tl.where(gap_mid > hd, gap_mid, hu)
    x_top = tl.where(whole | (centre + half >= gap_mid), gap_mid, centre + half)
    wlo = lo - mean_spacing
    wlo = tl.where(whole, wlo, tl.maximum(centre - half, wlo))
    # points: the top, then the window's bottom and outer**k half-widths above and below; a
    # bracket collected whole spreads them evenly from hd down
    sign = tl.where(j % 2 == 1, -1.0, 1.0)
    x_focus = tl.gather(centre, owner, axis=1) + tl.gather(half, owner, axis=1) * sign * tl.exp(
        (j // 2).to(tl.float32) * tl.log(outer))
    per_o = tl.gather(per, owner, axis=1)
    x_even = tl.gather(hd, owner, axis=1) - tl.gather(width, owner, axis=1) * (j - 1).to(tl.float32) / tl.maximum(
        per_o - 1, 1).to(tl.float32)
    x = tl.where(tl.gather(whole.to(tl.int32), owner, axis=1) != 0, x_even, x_focus)
    x = tl.minimum(tl.maximum(x, tl.gather(_next_up(lo), owner, axis=1)), tl.gather(hd, owner, axis=1))
    x = tl.where(j == 0, tl.gather(x_top, owner, axis=1), x)
    tl.store(p_x + o_r[:, None] * BP + o_l[None, :], x, mask=m_r[:, None])
    tl.store(p_wlo + o_chunk, tl.where(is_open, wlo, float("nan")), mask=m)
    tl.store(p_whi + o_chunk, x_top, mask=m)
    tl.store(p_top + o_chunk, top, mask=m)


@triton.jit
def _narrow_kernel(
    p_rows,  # [R] int64 rows of the chunk
    p_x,  # [R, BP] fp32 probe points
    p_meas,  # [R, BP] the measure at them (fp32, int32 when FIXED)
    p_above, p_below,  # [R, BP] fp32 min{t >= x}, max{t < x} (read when SNAP)
    p_top,  # [R, G1] int32 lane of each window's top (read when SETTLE)
    p_whi,  # [R, G1] fp32 window tops (read when SETTLE)
    p_mtop, p_utop,  # [R, G1] out (when SETTLE): measure at the window's top, smallest value >= it
    p_lse,  # [B] fp32 (by mass)
    p_lo, p_hd, p_hu, p_mlo, p_mhi, p_est, p_dxdm,  # [B, G1] the search's state (STATE), updated where open
    R, G1, group_size, group_p, scale,
    FIXED: tl.constexpr, SNAP: tl.constexpr, SETTLE: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr,
    BG: tl.constexpr,
):
    """Brackets of BR rows shrunk by the probe points (all of a row's points serve all its
    boundaries), the check whether a new hd itself passes, and the estimate of each crossing.
    Without SNAP (no row values beside the points; SETTLE needs them) the bracket ends become
    the points themselves: lo the last point that passes, hd the float below the first that
    fails (every value above hd is >= that point, whose measure is meas_hi) and hu that point."""
    o_r, m_r, o_g, m, o_chunk, o_state, b_lse, lo, hd, hu, m_lo, m_hi = _state_tiles(
        p_rows, p_lse, p_lo, p_hd, p_hu, p_mlo, p_mhi, R, G1, BR, BG)
    g = o_g[None, :] + 1
    o_l = tl.arange(0, BP)
    o_rl = o_r[:, None] * BP + o_l[None, :]
    x = tl.load(p_x + o_rl, mask=m_r[:, None], other=0.0)
    meas = tl.load(p_meas + o_rl, mask=m_r[:, None], other=0)
    if SNAP:
        above = tl.load(p_above + o_rl, mask=m_r[:, None], other=0.0)
        below = tl.load(p_below + o_rl, mask=m_r[:, None], other=0.0)
    if SETTLE:
        top = tl.load(p_top + o_chunk, mask=m, other=0)
        u_top = tl.gather(above, top, axis=1)
        u_top = tl.where(u_top < float("inf"), u_top, tl.load(p_whi + o_chunk, mask=m, other=0.0))
        tl.store(p_mtop + o_chunk, tl.gather(meas, top, axis=1), mask=m)
        tl.store(p_utop + o_chunk, u_top, mask=m)
    # the points in increasing order (ties by lane): each lane's rank, then the lane of each rank
    x_l, x_k = x[:, :, None], x[:, None, :]  # [BR, BP (lane l), BP (lane k)]
    before = (x_k < x_l) | ((x_k == x_l) & (o_l[None, None, :] < o_l[None, :, None]))  # k sorts before l
    rank = tl.sum(before.to(tl.int32), axis=2)  # [BR, BP]
    order = tl.sum(tl.where(rank[:, :, None] == o_l[None, None, :], o_l[None, :, None], 0), axis=1)
    xs = tl.gather(x, order, axis=1)
    ms = tl.gather(meas, order, axis=1)
    # last point that passes boundary g: the passed counts are non-increasing along xs
    passed = _passed(ms, G1, group_size, group_p, FIXED)  # [BR, BP]
    i_pass = tl.sum((passed[:, None, :] >= g[:, :, None]).to(tl.int32), axis=2) - 1  # [BR, BG]
    i_a = tl.maximum(i_pass, 0)
    i_b = tl.minimum(i_pass + 1, BP - 1)
    m_a, m_b = tl.gather(ms, i_a, axis=1), tl.gather(ms, i_b, axis=1)
    if SNAP:  # the row's values next to the points
        us, ls = tl.gather(above, order, axis=1), tl.gather(below, order, axis=1)
        u_a, l_b, u_b = tl.gather(us, i_a, axis=1), tl.gather(ls, i_b, axis=1), tl.gather(us, i_b, axis=1)
    else:  # the points
        u_a, u_b = tl.gather(xs, i_a, axis=1), tl.gather(xs, i_b, axis=1)
        l_b = -_next_up(-u_b)
    raise_lo = (i_pass >= 0) & (u_a > lo)
    new_lo = tl.where(raise_lo, tl.minimum(u_a, hd), lo)
    new_mlo = tl.where(raise_lo, m_a, m_lo)
    lower_hd = (i_pass + 1 < BP) & (l_b < hd)
    new_hd = tl.where(lower_hd, tl.maximum(l_b, new_lo), hd)
    new_hu = tl.where(lower_hd, tl.minimum(u_b, hu), hu)
    new_mhi = tl.where(lower_hd, m_b, m_hi)
    if SNAP:  # a new hd (a row value) whose own weight lifts the measure over the boundary is the answer
        m_hd = new_mhi + _weight(new_hd, b_lse, scale, FIXED)
        hd_holds = lower_hd & (new_lo < new_hd) & _holds(m_hd, g, group_size, group_p, FIXED)
        new_lo = tl.where(hd_holds, new_hd, new_lo)
        new_mlo = tl.where(hd_holds, m_hd, new_mlo)
    est, dx_dm = _inverse_cubic(xs, ms, i_pass, _target(g, group_size, group_p, FIXED), BP)
    active = m & (lo < hd)
    tl.store(p_lo + o_state, new_lo, mask=active)
    tl.store(p_hd + o_state, new_hd, mask=active)
    tl.store(p_hu + o_state, new_hu, mask=active)
    tl.store(p_mlo + o_state, new_mlo, mask=active)
    tl.store(p_mhi + o_state, new_mhi, mask=active)
    tl.store(p_est + o_state, est, mask=active)
    tl.store(p_dxdm + o_state, dx_dm, mask=active)


@triton.jit
def _settle_kernel(
    p_buf,  # [P, C] fp32: each (chunk row, boundary) pair's collected values, in no order
    p_count,  # [P] int32 values found in the window (may exceed C)
    p_mtop,  # [P] measure at the window's top (fp32, int32 when FIXED)
    p_utop,  # [P] fp32 smallest row value >= the top
    p_wlo,  # [P] fp32 window bottom, NaN for none
    p_rows,  # [P / G1] int64 rows of the chunk
    p_lse,  # [B] fp32 (by mass)
    p_lo, p_hd, p_hu,  # [B, G1] fp32 the search's brackets, replaced where the window settles
    P, G1, C, group_size, group_p, scale,
    FIXED: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
):
    """For BS (row, boundary g) pairs: the measure at each collected value v is m_top plus the
    weights of the collected values >= v (every pair compared, BC x BC at a time: no sort, ties
    share a measure as in the definition); the answer is the largest value whose measure passes
    boundary g, taken when the window held every value (count <= C) and its top fails."""
    o_p = tl.program_id(0).to(tl.int64) * BS + tl.arange(0, BS)
    m_p = o_p < P
    g = (o_p % G1 + 1).to(tl.int32)  # [BS] boundary
    o_row = tl.load(p_rows + o_p // G1, mask=m_p, other=0)
    b_count = tl.load(p_count + o_p, mask=m_p, other=0)
    b_n = tl.where(b_count <= C, b_count, 0)  # values to read: none where the window held too many
    n = tl.max(b_n, 0)
    b_mtop = tl.load(p_mtop + o_p, mask=m_p, other=0)
    if not FIXED:
        b_lse = tl.load(p_lse + o_row, mask=m_p, other=0.0)
    v_star = tl.full([BS], float("-inf"), dtype=tl.float32)
    for k0 in range(0, n, BC):
        o_k = k0 + tl.arange(0, BC)
        m_k = m_p[:, None] & (o_k[None, :] < b_n[:, None])
        b_vk = tl.load(p_buf + o_p[:, None] * C + o_k[None, :], mask=m_k, other=float("-inf"))  # [BS, BC]
        b_m = tl.zeros([BS, BC], dtype=tl.int32 if FIXED else tl.float32) + b_mtop[:, None]
        for l0 in range(0, n, BC):
            o_l = l0 + tl.arange(0, BC)
            m_l = m_p[:, None] & (o_l[None, :] < b_n[:, None])
            b_vl = tl.load(p_buf + o_p[:, None] * C + o_l[None, :], mask=m_l, other=float("-inf"))
            if FIXED:
                b_wl = m_l.to(tl.int32)
            else:
                b_wl = tl.where(m_l, tl.exp(b_vl * scale - b_lse[:, None]), 0.0)
            b_m += tl.sum(tl.where(b_vl[:, None, :] >= b_vk[:, :, None], b_wl[:, None, :], 0), axis=2)
        holds = _holds(b_m, g[:, None], group_size, group_p, FIXED)
        v_star = tl.maximum(v_star, tl.max(tl.where(holds & m_k, b_vk, float("-inf")), axis=1))
    v_up = tl.full([BS], float("inf"), dtype=tl.float32)
    for k0 in range(0, n, BC):
        o_k = k0 + tl.arange(0, BC)
        m_k = m_p[:, None] & (o_k[None, :] < b_n[:, None])
        b_vk = tl.load(p_buf + o_p[:, None] * C + o_k[None, :], mask=m_k, other=float("-inf"))
        v_up = tl.minimum(v_up, tl.min(tl.where(b_vk > v_star[:, None], b_vk, float("inf")), axis=1))
    top_holds = _holds(b_mtop, g, group_size, group_p, FIXED)
    b_wlo = tl.load(p_wlo + o_p, mask=m_p, other=float("nan"))
    found = (v_star > float("-inf")) & ~top_holds & (b_wlo == b_wlo) & m_p  # a value read: count <= C
    v_up = tl.where(v_up < float("inf"), v_up, tl.load(p_utop + o_p, mask=m_p, other=0.0))
    o_state = o_row * G1 + g - 1
    tl.store(p_lo + o_state, v_star, mask=found)
    tl.store(p_hd + o_state, v_star, mask=found)
    tl.store(p_hu + o_state, v_up, mask=found)


def group_means(t, rt, lse_t, thr, teacher_scale, *, budget_bytes=None, ties=None, rows=None):
    """qbar [B, G] fp32: ``qbar[i, g]`` = mean of ``q_ij = exp(t_ij * teacher_scale - lse_t_i)``
    over the members j (j != i) of group g of row i, 0 for an empty group; ``t``, ``rt`` as in
    ``group_thresholds``, groups from its ``thr`` [B, G-1] (and ``tie_cuts``' ``ties``, if
    given). One pass over row slabs whose fp32 teacher dots (cuBLAS) fit ``budget_bytes``
    (None: ``CHUNK_VALUES`` entries). ``rows=(start, stop)``: those rows' means only."""
    t = unit_stride_rows(t)
    B, Dt = t.shape
    start, stop = (0, B) if rows is None else rows
    G = thr.shape[1] + 1
    thr = thr.float().contiguous()
    low, cut = (thr, thr) if ties is None else (a.contiguous() for a in ties)
    rt, lse_t = rt.contiguous(), lse_t.float().contiguous()
    qbar = torch.empty((B, G), device=t.device, dtype=torch.float32)
    budget = 4 * CHUNK_VALUES if budget_bytes is None else budget_bytes
    R = slab_rows(stop - start, aligned(B), budget - budget // 16, 4, _logit_blocks()["BM"])  # 1/16: the splits' sums
    dots = slab_buffer(R, B, t.device)
    every_row = torch.arange(B, device=t.device)
    every = torch.ones(R, device=t.device, dtype=torch.int8)
    for row0 in range(start, stop, R):
        n = min(R, stop - row0)
        matmul_f32(t[row0:row0 + n], t.T, out=dots[:n])
        part = slice(row0, row0 + n)
        _means_launch(dots, rt, lse_t, every_row[part], every, thr[part], qbar, teacher_scale, max_bytes=budget // 16,
                      ties=None if ties is None else (low[part], cut[part]))
    return qbar


def _means_launch(dots, rt, lse_t, rows, done, thr, qbar, teacher_scale, max_bytes=None, ties=None):
    """``_group_means_kernel`` over the rows [R] whose teacher dots are ``dots`` [>= R, B] fp32,
    for those with ``done`` [R] int8 set, in column splits (``utils.column_splits``) whose
    partial sums and counts (8 S R G bytes, at most ``max_bytes``) ``_group_means_merge_kernel``
    adds up; thr [R, G-1] (unit column stride), qbar [B, G]; ``ties`` (low, cut) [R, G-1] with
    thr's strides, or None."""
    cfg = _logit_blocks()
    R, (B, G) = len(rows), qbar.shape
    sweeps = cdiv(G, MEANS_GROUPS)  # the groups in as few, even blocks (one sweep of the dots each)
    n_tiles = cdiv(B, cfg["BN"])
    splits = utils.column_splits(n_tiles, cdiv(R, cfg["BM"]) * sweeps, SPLIT_PROGRAMS)
    while max_bytes is not None and splits > 1 and 8 * splits * R * G > max_bytes:
        splits //= 2
    sums = torch.empty((R, splits, G), device=dots.device, dtype=torch.float32)
    counts = torch.empty((R, splits, G), device=dots.device, dtype=torch.int32)
    _group_means_kernel[(cdiv(R, cfg["BM"]), sweeps, splits)](
        dots, rt, lse_t, rows, done, thr, *((thr, thr) if ties is None else ties), sums, counts, R, B,
        dots.stride(0), G, thr.stride(0), cdiv(n_tiles, splits), float(teacher_scale), NG=cdiv(G, sweeps),
        TIES=ties is not None, **cfg)
    BG = max(2, next_pow2(G))
    BR = 64 if utils.interpreter_blocks() else 8
    BS = max(1, 2048 // (BR * BG))  # [BR, BS, BG] blocks of 2K sums (and counts)
    _group_means_merge_kernel[(cdiv(R, BR),)](
        sums, counts, rows, done, qbar, R, G, splits, BR=BR, BS=BS, BG=BG, num_warps=4)
