"""Distillation term (SPEC sections 3-6): row statistics, then the loss and its gradient,
over tiles and row slabs so that the B x B logits never exist in memory.

Student logits ``s_ij = (x_i . x_j) rx_i rx_j``, teacher logits ``t_ij = (t_i . t_j) rt_i rt_j``
(raw rows of any float dtype, fp32 inverse norms; every kernel here reads a row slab's cuBLAS
dots through ``tiles.slab_tile``); only ``j != i`` takes part. Targets
``q_ij = exp(t_ij * teacher_scale - lse_t_i)``, shuffled into ``q~`` within the Group-P groups
``group_i(j) = #{g : t_ij < thr[i, g]}`` (thresholds from ``group_partition.group_thresholds``;
with its ``tie_cuts``, the columns before ``cut[i, g]`` compare with ``low[i, g]`` instead):
  none      ``q~ = q``;
  expected  ``q~_ij = qbar[i, group_i(j)]`` (the group means: ``group_thresholds(means=...)``);
  random    ``q~_ij = q_ij'``, j' the member of j's group whose column-order rank is
            ``sigma(rank_i(j))``, ``sigma`` the keyed Feistel permutation that
            ``distillcse.shuffle`` defines (``_group_permutation`` is the same uint32 arithmetic).

1. ``distill_row_stats``: the logsumexps of s and t (two scales) and t's range, per slab of
   rows from their cuBLAS dots, online over column splits whose partial states a second
   kernel merges (a slab has a few row blocks; the splits give the GPU enough programs), and
   on the same teacher dots the Group-P search's first pass (``group_partition.grid_pass``).
   s and t are symmetric: a slab's GEMMs take only the columns from its first row on, and a
   row's earlier columns come from the slabs above it as their column side (running column
   states, merged slab by slab); t in whole rows where the search's first pass reads them.
   With shuffle random only t's: its column side never reads another row's lse_s (step 2).
2. ``distill_loss_and_grad``: per slab of R rows, cuBLAS writes the raw dots ``x[slab] x^T``
   and ``t[slab] t^T`` [R, B] in fp32, and a (row block, column chunk) grid reads their tiles
   and writes the gradient factors ``G_rj = student_scale (p_rj - q~_rj)`` to an [R, B] buffer
   and the loss's terms ``sum_j q~_rj (lse_s_r - l_rj)``, l = student_scale s (each difference
   before the sum: ``lse_s_r`` and ``sum_j q~_rj l_rj`` are both near student_scale, and their
   difference would lose their last bits). s is symmetric, so row r's
   gradient is ``sum_j (G_rj + G_jr) u_j``: with shuffle none or expected the kernel writes
   both sides (any row's targets are at hand) and one GEMM finishes the slab's rows; the
   random shuffle's ranks exist for the slab rows only, so there ``_accumulate_slab_kernel``
   adds ``G^T u[slab]`` (and the slab rows' own side) to every row of dx in place, once per
   gradient slab that holds several dot slabs' factors (``_random_slabs``): fp32 rows
   directly, 16-bit rows as hi (dx) + an int8 lo, about 16 significant bits, so that the
   column side's sum over the slabs needs 1 byte an entry beside dx instead of an fp32
   [B, D] buffer. Every GEMM takes the raw rows x (the factors carry rx_j), so no normalised
   copy of x exists. The loss and its gradient are computed together, so the backward
   recomputes nothing (the loss is linear in the upstream gradient). Extra memory besides
   the gradient: within ``budget_bytes`` (``tests/test_memory_plan.py`` counts it): 8 bytes an
   entry of the two dots' slabs, plus the factors and (random) the compact targets.
   The random shuffle needs each row's ranks in column order, so it runs two passes over the
   slab's teacher dots first: ``_group_counts_kernel`` (members of each group per column chunk,
   and the chunk's share of the slab rows' lse_s from the student dots) and
   ``_compact_targets_kernel`` (targets in group order, ``compact[r, start_g + rank] = q``),
   with ``_permutation_tables_kernel`` between them (group starts and sizes, each chunk's
   first position, each group's permutation parameters, the rows' lse_s).

Every scale must be positive (the running maximum of ``t`` serves both of its logsumexps).
"""
import warnings

import torch
import triton
import triton.language as tl

from . import utils
from ..shuffle import ROUNDS, SMALL_DOMAIN, SMALL_DOMAIN_ROUNDS
from .tiles import EPS_SQUARED, slab_tile
from .utils import (GRID_AXIS_MAX, aligned, cdiv, dot_precision, matmul_f32, next_pow2, seed_args, slab_buffer,
                    slab_rows, unit_stride_rows)

_GOLDEN = tl.constexpr(0x9E3779B1)
_SMALL_DOMAIN = tl.constexpr(SMALL_DOMAIN)
_SMALL_DOMAIN_ROUNDS = tl.constexpr(SMALL_DOMAIN_ROUNDS)
_ROUNDS = tl.constexpr(ROUNDS)
SHUFFLES = ("none", "expected", "random")  # the TARGETS constexpr of _distill_slab_kernel: their index


@triton.jit
def _update_lse(b_m, b_l, b_v, AXIS: tl.constexpr = 1):
    """Online logsumexp along ``AXIS`` of ``b_v`` [BM, BN] (-inf off the valid entries): running
    max ``b_m`` and sum ``b_l`` of exp(v - b_m), [BM] by rows (AXIS 1) or [BN] by columns (0)."""
    b_m_new = tl.maximum(b_m, tl.max(b_v, axis=AXIS))
    b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # no valid entry yet: exp never sees -inf - -inf
    return b_m_new, b_l * tl.exp(b_m - b_ref) + tl.sum(tl.exp(b_v - tl.expand_dims(b_ref, AXIS)), axis=AXIS)


@triton.jit
def _merge_lse(b_m, b_l, c_m, c_l):
    """Two partial states of ``_update_lse`` (the same rows, other columns) as one."""
    b_m_new = tl.maximum(b_m, c_m)
    b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    return b_m_new, b_l * tl.exp(b_m - b_ref) + c_l * tl.exp(c_m - b_ref)


@triton.jit
def _update_teacher_stats(
    b_tmax, b_lt, b_lg, b_tmin,  # [BM] (AXIS 1) or [BN] (AXIS 0) running statistics
    b_t,  # [BM, BN] t, -inf off the valid entries
    m_valid,  # [BM, BN]
    teacher_scale, grouping_scale, AXIS: tl.constexpr = 1,
):
    """Online update along ``AXIS`` (1: by rows, 0: by columns) of t's max ``b_tmax`` (one
    reference for both scales), the sums ``b_lt`` / ``b_lg`` of exp((t - b_tmax) * scale) at
    teacher_scale / grouping_scale, and t's min ``b_tmin``."""
    b_tmin = tl.minimum(b_tmin, tl.min(tl.where(m_valid, b_t, float("inf")), axis=AXIS))
    b_tmax_new = tl.maximum(b_tmax, tl.max(b_t, axis=AXIS))
    b_ref = tl.where(b_tmax_new == float("-inf"), 0.0, b_tmax_new)
    b_dt = b_t - tl.expand_dims(b_ref, AXIS)
    b_lt = b_lt * tl.exp((b_tmax - b_ref) * teacher_scale) + tl.sum(tl.exp(b_dt * teacher_scale), axis=AXIS)
    b_lg = b_lg * tl.exp((b_tmax - b_ref) * grouping_scale) + tl.sum(tl.exp(b_dt * grouping_scale), axis=AXIS)
    return b_tmax_new, b_lt, b_lg, b_tmin


@triton.jit
def _merge_teacher_stats(b_tmax, b_lt, b_lg, b_tmin, c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale):
    """Two partial states of ``_update_teacher_stats`` (the same rows, other columns) as one."""
    b_tmax_new = tl.maximum(b_tmax, c_tmax)
    b_ref = tl.where(b_tmax_new == float("-inf"), 0.0, b_tmax_new)
    b_lt = b_lt * tl.exp((b_tmax - b_ref) * teacher_scale) + c_lt * tl.exp((c_tmax - b_ref) * teacher_scale)
    b_lg = b_lg * tl.exp((b_tmax - b_ref) * grouping_scale) + c_lg * tl.exp((c_tmax - b_ref) * grouping_scale)
    return b_tmax_new, b_lt, b_lg, tl.minimum(b_tmin, c_tmin)


@triton.jit
def _empty_stats(N: tl.constexpr):
    """[N] states of ``_update_lse`` and ``_update_teacher_stats`` over no column (each merge's
    identity): s's max and sum, t's max, two sums, min."""
    b_neg = tl.full([N], float("-inf"), dtype=tl.float32)
    b_zero = tl.zeros([N], dtype=tl.float32)
    return b_neg, b_zero, b_neg, b_zero, b_zero, tl.full([N], float("inf"), dtype=tl.float32)


@triton.jit
def _load_states(p, m, plane, S: tl.constexpr, T: tl.constexpr):
    """The six planes of states at ``p``, ``plane`` apart (as ``_empty_stats``: s's max and sum
    with S, t's max, two sums and min with T), masked by ``m``; a masked or unloaded state is
    its merge's identity. Shaped as ``m``."""
    b_neg, b_zero = tl.full(m.shape, float("-inf"), tl.float32), tl.zeros(m.shape, tl.float32)
    b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin = b_neg, b_zero, b_neg, b_zero, b_zero, tl.full(m.shape, float("inf"),
                                                                                            tl.float32)
    if S:
        b_ms = tl.load(p, mask=m, other=float("-inf"))
        b_ls = tl.load(p + plane, mask=m, other=0.0)
    if T:
        b_tmax = tl.load(p + 2 * plane, mask=m, other=float("-inf"))
        b_lt = tl.load(p + 3 * plane, mask=m, other=0.0)
        b_lg = tl.load(p + 4 * plane, mask=m, other=0.0)
        b_tmin = tl.load(p + 5 * plane, mask=m, other=float("inf"))
    return b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin


@triton.jit
def _store_states(p, m, plane, b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin, S: tl.constexpr, T: tl.constexpr):
    """``_load_states``' inverse: s's two planes with S, t's four with T."""
    if S:
        tl.store(p, b_ms, mask=m)
        tl.store(p + plane, b_ls, mask=m)
    if T:
        tl.store(p + 2 * plane, b_tmax, mask=m)
        tl.store(p + 3 * plane, b_lt, mask=m)
        tl.store(p + 4 * plane, b_lg, mask=m)
        tl.store(p + 5 * plane, b_tmin, mask=m)


@triton.jit
def _row_stats_kernel(
    p_xs,  # [R, B - row0] fp32 raw student dots of the slab rows, columns row0.. (cuBLAS; [R, B] unless HALF_S),
    #        row stride ld (STUDENT)
    p_rx,  # [B] fp32 inverse norms (STUDENT)
    p_ts,  # [R, B - t_col0] fp32 raw teacher dots of the slab rows with columns t_col0.. (cuBLAS), row stride ld
    p_rt,  # [B] fp32 inverse norms
    p_part,  # [6, R, S] fp32 out: per column split, s's running max and sum (STUDENT), t's max, two sums, min
    p_cols,  # [P, NB, B] fp32 out (HALF_S or HALF_T): per row block, the column-side states of columns past the slab
    row0, R, B, ld, t_col0, tile0, tiles_per_split, col_plane, student_scale, teacher_scale, grouping_scale,
    BM: tl.constexpr, BN: tl.constexpr, STUDENT: tl.constexpr, HALF_S: tl.constexpr, HALF_T: tl.constexpr,
):
    """The statistics of BM slab rows over the column tiles of split program_id(1), online
    (``_update_lse``, ``_update_teacher_stats``); ``_row_stats_merge_kernel`` merges the
    S = num_programs(1) splits (a slab has a few row blocks: the splits give the GPU enough
    programs). s with HALF_S (and t with HALF_T, t_col0 = row0) is symmetric, so the slab has its
    dots with columns from row0 on only: the rows take those, and each tile's columns past the
    slab take the block's rows as their column side (planes 0-1 s's max and sum, 2-5 t's as in
    ``p_part``; ``_column_stats_merge_kernel`` folds them into the running column states).
    Without (a shard of the rows, or t with the search's grid pass) the slab has whole rows."""
    i_b = tl.program_id(0)
    o_r = i_b.to(tl.int64) * BM + tl.arange(0, BM)
    i_s = tl.program_id(1)
    o_m = row0 + o_r
    m_m = (o_r < R) & (o_m < B)
    b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin = _empty_stats(BM)
    split0 = tile0 + i_s * tiles_per_split
    for i_n in range(split0, tl.minimum(split0 + tiles_per_split, tl.cdiv(B, BN))):
        o_n = (i_n * BN + tl.arange(0, BN)).to(tl.int64)
        m_n = o_n < B
        m_upper = m_n & (o_n >= row0)  # [BN] columns whose symmetric dots the slab has
        m_ld = (o_n >= row0) & (o_n < ld)  # ... and what their rows hold past them (``slab_tile``)
        m_past = m_n & (o_n >= row0 + R)  # [BN] columns past the slab: their column side
        m_valid = (o_m[:, None] != o_n[None, :]) & m_m[:, None] & m_n[None, :]
        m_col = m_m[:, None] & m_past[None, :]
        p_c = p_cols + i_b * B + o_n
        if HALF_S:
            if i_n * BN + BN > row0:
                b_s = slab_tile(p_xs - row0, p_rx, o_r, o_m, m_m, o_n, m_upper, m_ld, ld) * student_scale
                b_ms, b_ls = _update_lse(b_ms, b_ls, tl.where(m_valid & m_upper[None, :], b_s, float("-inf")))
                if i_n * BN + BN > row0 + R:
                    c_ms, c_ls, _, _, _, _ = _empty_stats(BN)
                    c_ms, c_ls = _update_lse(c_ms, c_ls, tl.where(m_col, b_s, float("-inf")), 0)
                    tl.store(p_c, c_ms, mask=m_past)
                    tl.store(p_c + col_plane, c_ls, mask=m_past)
        elif STUDENT:  # whole rows
            b_s = slab_tile(p_xs, p_rx, o_r, o_m, m_m, o_n, m_n, o_n < ld, ld) * student_scale
            b_ms, b_ls = _update_lse(b_ms, b_ls, tl.where(m_valid, b_s, float("-inf")))
        if HALF_T:  # teacher logits (their half: t_col0 = row0)
            b_t = slab_tile(p_ts - row0, p_rt, o_r, o_m, m_m, o_n, m_upper, m_ld, ld)
        else:
            b_t = slab_tile(p_ts, p_rt, o_r, o_m, m_m, o_n, m_n, o_n < ld, ld)
        m_t = m_valid & m_upper[None, :] if HALF_T else m_valid
        b_tmax, b_lt, b_lg, b_tmin = _update_teacher_stats(
            b_tmax, b_lt, b_lg, b_tmin, tl.where(m_t, b_t, float("-inf")), m_t, teacher_scale, grouping_scale)
        if HALF_T:
            if i_n * BN + BN > row0 + R:
                _, _, c_tmax, c_lt, c_lg, c_tmin = _empty_stats(BN)
                c_tmax, c_lt, c_lg, c_tmin = _update_teacher_stats(
                    c_tmax, c_lt, c_lg, c_tmin, tl.where(m_col, b_t, float("-inf")), m_col, teacher_scale,
                    grouping_scale, 0)
                tl.store(p_c + 2 * col_plane, c_tmax, mask=m_past)
                tl.store(p_c + 3 * col_plane, c_lt, mask=m_past)
                tl.store(p_c + 4 * col_plane, c_lg, mask=m_past)
                tl.store(p_c + 5 * col_plane, c_tmin, mask=m_past)
    n_splits = tl.num_programs(1)
    p_o = p_part + o_r * n_splits + i_s
    _store_states(p_o, o_r < R, R * n_splits, b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin, STUDENT, True)


@triton.jit
def _lse_block(c_m, c_l):
    """[BR, BS] states of ``_update_lse`` (the same rows, other columns) as one [BR] state."""
    b_m = tl.max(c_m, axis=1)
    b_ref = tl.where(b_m == float("-inf"), 0.0, b_m)
    return b_m, tl.sum(c_l * tl.exp(c_m - b_ref[:, None]), axis=1)


@triton.jit
def _teacher_stats_block(c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale):
    """[BR, BS] states of ``_update_teacher_stats`` as one [BR] state."""
    b_tmax = tl.max(c_tmax, axis=1)
    b_ref = tl.where(b_tmax == float("-inf"), 0.0, b_tmax)
    b_dt = c_tmax - b_ref[:, None]
    return (b_tmax, tl.sum(c_lt * tl.exp(b_dt * teacher_scale), axis=1),
            tl.sum(c_lg * tl.exp(b_dt * grouping_scale), axis=1), tl.min(c_tmin, axis=1))


@triton.jit
def _row_stats_merge_kernel(
    p_part,  # [6, R, S] fp32: _row_stats_kernel's partial states
    p_state,  # [P, B] fp32: the running column-side states (HALF_S or HALF_T; planes as in p_part; unset at row0 0)
    p_out,  # [5, B] fp32 out: lse_s (STUDENT), lse_t, lse_g, t_min, t_max
    row0, R, B, n_splits, teacher_scale, grouping_scale,
    BR: tl.constexpr, BS: tl.constexpr, STUDENT: tl.constexpr, HALF_S: tl.constexpr, HALF_T: tl.constexpr,
):
    """The S partial states of BR slab rows merged in split order (deterministic), BS splits a
    block (a few loads, not a chain of S), then the rows' column side from the slabs before
    (the halves of s with HALF_S, and of t with HALF_T), then the statistics."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_s = tl.arange(0, BS)
    o_m = row0 + o_r
    m_m = (o_r < R) & (o_m < B)
    plane = R * n_splits
    b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin = _empty_stats(BR)
    for s0 in range(0, n_splits, BS):
        m = m_m[:, None] & (s0 + o_s < n_splits)[None, :]
        p_s = p_part + o_r[:, None] * n_splits + s0 + o_s[None, :]  # [BR, BS]
        c_ms, c_ls, c_tmax, c_lt, c_lg, c_tmin = _load_states(p_s, m, plane, STUDENT, True)
        c_tmax, c_lt, c_lg, c_tmin = _teacher_stats_block(c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale)
        b_tmax, b_lt, b_lg, b_tmin = _merge_teacher_stats(
            b_tmax, b_lt, b_lg, b_tmin, c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale)
        if STUDENT:
            c_ms, c_ls = _lse_block(c_ms, c_ls)
            b_ms, b_ls = _merge_lse(b_ms, b_ls, c_ms, c_ls)
    c_ms, c_ls, c_tmax, c_lt, c_lg, c_tmin = _load_states(p_state + o_m, m_m & (row0 > 0), B, HALF_S, HALF_T)
    if HALF_S:
        b_ms, b_ls = _merge_lse(b_ms, b_ls, c_ms, c_ls)
    if HALF_T:
        b_tmax, b_lt, b_lg, b_tmin = _merge_teacher_stats(
            b_tmax, b_lt, b_lg, b_tmin, c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale)
    # A row without any valid column (B == 1) gets lse = 0 + log(0) = -inf; lanes past R log 1.
    if STUDENT:
        b_ms = tl.where(b_ms == float("-inf"), 0.0, b_ms)
        tl.store(p_out + o_m, b_ms + tl.log(tl.where(m_m, b_ls, 1.0)), mask=m_m)
    b_tref = tl.where(b_tmax == float("-inf"), 0.0, b_tmax)
    b_lt, b_lg = tl.where(m_m, b_lt, 1.0), tl.where(m_m, b_lg, 1.0)
    tl.store(p_out + B + o_m, b_tref * teacher_scale + tl.log(b_lt), mask=m_m)
    tl.store(p_out + 2 * B + o_m, b_tref * grouping_scale + tl.log(b_lg), mask=m_m)
    tl.store(p_out + 3 * B + o_m, b_tmin, mask=m_m)
    tl.store(p_out + 4 * B + o_m, b_tmax, mask=m_m)


@triton.jit
def _column_stats_merge_kernel(
    p_cols,  # [P, NB, B] fp32: the slab's row blocks' column-side states (_row_stats_kernel)
    p_state,  # [P, B] fp32 in/out: the running column-side states over the slabs before row0 (unset at row0 0)
    row0, col0, NB, B, col_plane, teacher_scale, grouping_scale,
    BC: tl.constexpr, BB: tl.constexpr, HALF_S: tl.constexpr, HALF_T: tl.constexpr,
):
    """BC columns from col0 on (those past the slab of rows row0..) a program: their running
    states (none for the first slab), then the slab's NB row blocks in block order
    (deterministic), BB blocks a load."""
    o_c = col0 + tl.program_id(0).to(tl.int64) * BC + tl.arange(0, BC)
    m_c = o_c < B
    o_b = tl.arange(0, BB)
    p_c = p_state + o_c
    b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin = _load_states(p_c, m_c & (row0 > 0), B, HALF_S, HALF_T)
    for b0 in range(0, NB, BB):
        m = m_c[:, None] & (b0 + o_b < NB)[None, :]
        p_b = p_cols + (b0 + o_b)[None, :] * B + o_c[:, None]  # [BC, BB]
        c_ms, c_ls, c_tmax, c_lt, c_lg, c_tmin = _load_states(p_b, m, col_plane, HALF_S, HALF_T)
        if HALF_S:
            c_ms, c_ls = _lse_block(c_ms, c_ls)
            b_ms, b_ls = _merge_lse(b_ms, b_ls, c_ms, c_ls)
        if HALF_T:
            c_tmax, c_lt, c_lg, c_tmin = _teacher_stats_block(c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale)
            b_tmax, b_lt, b_lg, b_tmin = _merge_teacher_stats(
                b_tmax, b_lt, b_lg, b_tmin, c_tmax, c_lt, c_lg, c_tmin, teacher_scale, grouping_scale)
    _store_states(p_c, m_c, B, b_ms, b_ls, b_tmax, b_lt, b_lg, b_tmin, HALF_S, HALF_T)


@triton.jit
def _mix32(x):
    """The 32-bit finaliser of ``distillcse.shuffle._mix32`` on uint32 (multiplies wrap)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def _bit_length(b_v, BITS: tl.constexpr):
    """Bit length of non-negative uint32 values below 2^BITS."""
    b_n = tl.zeros(b_v.shape, dtype=tl.uint32)
    for i_bit in tl.static_range(BITS):
        b_n += ((b_v >> i_bit) != 0).to(tl.uint32)
    return b_n


@triton.jit
def _seed_halves(p_seed, seed_lo, seed_hi, SEED_PTR: tl.constexpr):
    """The shuffle key's 32-bit halves as uint32: the int32 scalars' bits, or with SEED_PTR the
    halves of the int64 at p_seed (a key drawn on the GPU inside a CUDA graph's capture, so that
    each replay reads the one it draws; ``utils.seed_args``)."""
    b_lo, b_hi = seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True)
    if SEED_PTR:
        b_seed = tl.load(p_seed)
        b_lo, b_hi = b_seed.to(tl.uint32), (b_seed >> 32).to(tl.uint32)  # truncations: the bits
    return b_lo, b_hi


@triton.jit
def _sigma_params(b_row, b_grp, b_n, seed_lo, seed_hi, BITS: tl.constexpr):
    """(key, h, b, rounds) of sigma for group b_grp of row b_row with b_n members (uint32, one
    shape; b_n < 2^BITS; seed halves uint32, ``_seed_halves``), as
    ``distillcse.shuffle.group_keys`` and ``feistel_shape`` compute them; rounds int32."""
    b_key = _mix32(b_row * 0x632BE5AB + b_grp * 0x7FEB352D + seed_lo)
    b_key = _mix32(b_key ^ seed_hi)
    b_h = _bit_length(tl.maximum(b_n, 1) - 1, BITS) >> 1
    b_b = (b_n + (tl.full(b_n.shape, 1, tl.uint32) << b_h) - 1) >> b_h
    b_rounds = tl.where(b_n < _SMALL_DOMAIN, _SMALL_DOMAIN_ROUNDS, _ROUNDS).to(tl.int32)
    return b_key, b_h, b_b, b_rounds


@triton.jit
def _feistel(x, key, h, b, rounds, max_rounds):
    """``distillcse.shuffle._feistel``: x, key, h, b uint32 and rounds int32 (even), one shape."""
    a_mask = (tl.full(x.shape, 1, tl.uint32) << h) - 1
    hi = x >> h
    lo = x & a_mask
    for i_pair in range(0, max_rounds // 2):
        active = 2 * i_pair < rounds
        r_even = tl.cast(2 * i_pair, tl.uint32) * _GOLDEN
        lo = tl.where(active, (lo + _mix32((hi ^ key) + r_even)) & a_mask, lo)
        r_odd = tl.cast(2 * i_pair + 1, tl.uint32) * _GOLDEN
        up = hi + tl.umulhi(_mix32((lo ^ key) + r_odd), b)
        hi = tl.where(active, tl.where(up >= b, up - b, up), hi)
    return (hi << h) | lo


@triton.jit
def _group_permutation(x, n, key, h, b, rounds):
    """``distillcse.shuffle.group_permutation``: sigma_key(x) for 0 <= x < n, all uint32 but
    rounds (int32), one shape. Cycle walking runs until every element is in range."""
    max_rounds = tl.max(rounds)
    y = _feistel(x, key, h, b, rounds, max_rounds)
    out = y >= n
    while tl.max(out.to(tl.int32)) > 0:
        y = tl.where(out, _feistel(y, key, h, b, rounds, max_rounds), y)
        out = y >= n
    return y


@triton.jit
def _row_threshold(p_thr, p_low, p_cut, s_thr, o_m, m_m, o_n, g, TIES: tl.constexpr):
    """Boundary g's threshold for rows o_m [BM] at columns o_n [BN]: [BM, 1], or with TIES
    [BM, BN] (``group_partition.tie_cuts``: the columns before a row's cut take its lower one)."""
    b_thr = tl.load(p_thr + o_m * s_thr + g, mask=m_m, other=float("-inf"))[:, None]
    if TIES:
        b_low = tl.load(p_low + o_m * s_thr + g, mask=m_m, other=float("-inf"))
        b_cut = tl.load(p_cut + o_m * s_thr + g, mask=m_m, other=0)
        b_thr = tl.where(o_n[None, :] < b_cut[:, None], b_low[:, None], b_thr)
    return b_thr


@triton.jit
def _column_threshold(p_thr, p_low, p_cut, s_thr, o_n, m_n, o_m, g, TIES: tl.constexpr):
    """``_row_threshold`` of the rows o_n [BN] (the transposed entries t_ji, j in o_n) at columns
    o_m [BM]: [1, BN], or with TIES [BM, BN]."""
    b_thr = tl.load(p_thr + o_n * s_thr + g, mask=m_n, other=float("-inf"))[None, :]
    if TIES:
        b_low = tl.load(p_low + o_n * s_thr + g, mask=m_n, other=float("-inf"))
        b_cut = tl.load(p_cut + o_n * s_thr + g, mask=m_n, other=0)
        b_thr = tl.where(o_m[:, None] < b_cut[None, :], b_low[None, :], b_thr)
    return b_thr


@triton.jit
def _teacher_groups(p_ts, p_rt, p_thr, p_low, p_cut, s_thr, o_r, o_m, m_m, o_n, m_n, m_ld, ld,
                    n_thr: tl.constexpr, TIES: tl.constexpr):
    """Teacher logits t [BM, BN] fp32 (from the slab's dots ``p_ts``) and group ids [BM, BN]
    int32 (-1 off the off-diagonal in-range entries): ``group = #{g : t < thr[row, g]}`` (the
    thresholds of ``_row_threshold``; the expected mode's select chain over the non-increasing
    thresholds gives the same groups)."""
    b_t = slab_tile(p_ts, p_rt, o_r, o_m, m_m, o_n, m_n, m_ld, ld)  # [BM, BN]
    b_grp = tl.zeros(b_t.shape, dtype=tl.int32)
    for i_g in tl.static_range(n_thr):
        b_grp += (b_t < _row_threshold(p_thr, p_low, p_cut, s_thr, o_m, m_m, o_n, i_g, TIES)).to(tl.int32)
    m_valid = (o_m[:, None] != o_n[None, :]) & m_m[:, None] & m_n[None, :]
    return b_t, tl.where(m_valid, b_grp, -1)


@triton.jit
def _group_word(b_grp, w: tl.constexpr):
    """Groups 4w .. 4w + 3 of a tile's entries (``b_grp`` [BM, BN], fewer than 256 columns) as
    one-hot counts packed in the 8-bit fields of an int32 (0 for the other groups), and each
    entry's field shift: a row sum or prefix sum of the word counts 4 groups at once."""
    tl.static_assert(b_grp.shape[1] < 256)
    b_shift = 8 * (b_grp - 4 * w)
    m_w = (b_shift >= 0) & (b_shift < 32)
    b_shift = tl.where(m_w, b_shift, 0)
    return tl.where(m_w, 1 << b_shift, 0), b_shift


@triton.jit
def _word_counts(b_one, w: tl.constexpr, n_groups: tl.constexpr, BG: tl.constexpr):
    """[BM, BG] int32: the tile's members of groups 4w .. 4w + 3 (a ``_group_word`` [BM, BN])
    in those groups' lanes, 0 in the others."""
    o_k = tl.arange(0, BG)[None, :] - 4 * w  # [1, BG] the lane's field in word w
    m_k = (o_k >= 0) & (o_k < 4) & (o_k + 4 * w < n_groups)
    b_tot = tl.sum(b_one, axis=1)[:, None]  # [BM, 1] the word's counts, packed
    return tl.where(m_k, (b_tot >> (8 * tl.where(m_k, o_k, 0))) & 255, 0)


@triton.jit
def _compact_positions(b_grp, b_next, n_groups: tl.constexpr, BG: tl.constexpr):
    """Compact positions [BM, BN] of a tile's members (``b_next`` [BM, BG]: the next free
    position of each group, advanced past this tile and returned). -1 for non-members. Ranks
    within a group come from one prefix sum per 4 groups (``_group_word``)."""
    o_g = tl.arange(0, BG)[None, :]  # [1, BG]
    b_pos = tl.full(b_grp.shape, -1, dtype=tl.int32)
    for w in tl.static_range((n_groups + 3) // 4):
        b_one, b_shift = _group_word(b_grp, w)
        b_seen = (tl.cumsum(b_one, axis=1) >> b_shift) & 255  # members so far, inclusive
        for g in tl.static_range(4 * w, min(4 * w + 4, n_groups)):
            b_at = tl.sum(tl.where(o_g == g, b_next, 0), axis=1)  # [BM] next position of group g
            b_pos = tl.where(b_grp == g, b_at[:, None] + b_seen - 1, b_pos)
        b_next += _word_counts(b_one, w, n_groups, BG)
    return b_pos, b_next


@triton.jit
def _slab_program(row0, B, R, BM: tl.constexpr):
    """(i_c, o_r, o_m, m_m) of a slab kernel's program: column chunk i_c (grid axis 1), slab
    rows o_r [BM] (block of grid axis 0), their batch rows o_m and mask."""
    i_m = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    o_r = i_m * BM + tl.arange(0, BM)
    o_m = row0 + o_r
    return i_c, o_r, o_m, (o_r < R) & (o_m < B)


@triton.jit
def _chunk_bounds(i_c, chunk_width, B, ld):
    """(col0, n_end, ld_end): column chunk i_c's first column, and the ends of its columns
    (``o_n < n_end``) and of those its loads and stores may touch (``o_n < ld_end``, past the
    batch into the slab's zero padding: a multiple of 16, so they are vectorised), one compare a
    column each."""
    col0 = i_c * chunk_width
    return col0, tl.minimum(col0 + chunk_width, B), tl.minimum(col0 + chunk_width, ld)


@triton.jit
def _group_counts_kernel(
    p_ts,  # [R, B] fp32 raw teacher dots of the slab rows, row stride ld (``utils.slab_buffer``, as every [R, B] here)
    p_rt,  # [B] fp32 inverse norms
    p_thr,  # [B, G-1] fp32 group thresholds
    p_low, p_cut,  # [B, G-1] fp32, int32 tie cuts (TIES; ``group_partition.tie_cuts``)
    p_counts,  # [R, C, G] int32 out: members of group g in chunk c of slab row r
    p_xs,  # [R, B] fp32 raw student dots of the slab rows (LSE)
    p_rx,  # [B] fp32 inverse norms (LSE)
    p_lse,  # [2, R, C] fp32 out (LSE): running max and sum of exp(s * student_scale - max) of chunk c
    row0, B, ld, s_thr, n_thr: tl.constexpr, chunk_width, n_chunks, R, student_scale,
    BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, LSE: tl.constexpr, TIES: tl.constexpr,
):
    """Members of each group per column chunk of BM slab rows and, with LSE, the chunk's share
    of the rows' student logsumexp (``_update_lse``; ``_permutation_tables_kernel`` merges the
    chunks): the random shuffle needs the slab rows' own only, so it reads them off the slab's
    dots instead of a pass of its own over the batch."""
    i_c, o_r, o_m, m_m = _slab_program(row0, B, R, BM)
    b_ms = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_ls = tl.zeros([BM], dtype=tl.float32)
    o_g = tl.arange(0, BG)[None, :]
    n_groups: tl.constexpr = n_thr + 1
    b_counts = tl.zeros([BM, BG], dtype=tl.int32)
    col0, n_end, ld_end = _chunk_bounds(i_c, chunk_width, B, ld)
    for i_n in range(0, tl.cdiv(chunk_width, BN)):
        o_n = col0 + i_n * BN + tl.arange(0, BN).to(tl.int64)
        m_n, m_ld = o_n < n_end, o_n < ld_end
        _, b_grp = _teacher_groups(p_ts, p_rt, p_thr, p_low, p_cut, s_thr, o_r, o_m, m_m, o_n, m_n, m_ld, ld, n_thr,
                                   TIES)
        for w in tl.static_range((n_groups + 3) // 4):
            b_counts += _word_counts(_group_word(b_grp, w)[0], w, n_groups, BG)
        if LSE:
            b_s = slab_tile(p_xs, p_rx, o_r, o_m, m_m, o_n, m_n, m_ld, ld)  # [BM, BN] cosines
            b_ms, b_ls = _update_lse(b_ms, b_ls, tl.where(b_grp >= 0, b_s * student_scale, float("-inf")))
    p_out = p_counts + (o_r[:, None] * n_chunks + i_c) * n_groups + o_g
    tl.store(p_out, b_counts, mask=m_m[:, None] & (o_g < n_groups))
    if LSE:
        tl.store(p_lse + o_r * n_chunks + i_c, b_ms, mask=m_m)
        tl.store(p_lse + (R + o_r) * n_chunks + i_c, b_ls, mask=m_m)


@triton.jit
def _permutation_tables_kernel(
    p_counts,  # [R, C, G] int32: members of group g in chunk c of slab row r
    p_first,  # [R, C, G] int32 out: compact position of chunk c's first member of group g
    p_perm,  # [6, R, G] int32 out: each group's sigma (start, size, h, b, rounds, key bits)
    p_seed,  # [1] int64: the shuffle key (SEED_PTR), else unread
    seed_lo, seed_hi,  # int32: the key's halves (without SEED_PTR)
    p_lse,  # [2, R, C] fp32: the count kernel's chunk states of s's logsumexp (LSE)
    p_lse_s,  # [B] fp32 out: the slab rows' student logsumexps (LSE)
    row0, R, n_chunks, n_groups,
    BR: tl.constexpr, BC: tl.constexpr, BG: tl.constexpr, SEED_PTR: tl.constexpr, LSE: tl.constexpr,
):
    """Group sizes and starts (groups in order), each chunk's first compact position, and the
    parameters of each group's permutation, for BR slab rows; with LSE their student
    logsumexps. The chunks go BC at a time ([BR, BC, BG] blocks): a slab has a few hundred
    chunks, and one chunk a load would make each pass a chain of that many memory latencies."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_c = tl.arange(0, BC)
    o_g = tl.arange(0, BG)
    m_r = o_r < R
    if LSE:  # the chunks' states, merged block by block in chunk order
        b_ms = tl.full([BR], float("-inf"), dtype=tl.float32)
        b_ls = tl.zeros([BR], dtype=tl.float32)
        for c0 in range(0, n_chunks, BC):
            m_c = m_r[:, None] & (c0 + o_c < n_chunks)[None, :]
            p_c = p_lse + o_r[:, None] * n_chunks + c0 + o_c[None, :]  # [BR, BC]
            c_ms, c_ls = _lse_block(tl.load(p_c, mask=m_c, other=float("-inf")),
                                    tl.load(p_c + R * n_chunks, mask=m_c, other=0.0))
            b_ms, b_ls = _merge_lse(b_ms, b_ls, c_ms, c_ls)
        b_ms = tl.where(b_ms == float("-inf"), 0.0, b_ms)  # a row without valid columns: -inf
        tl.store(p_lse_s + row0 + o_r, b_ms + tl.log(tl.where(m_r, b_ls, 1.0)), mask=m_r)
    m = m_r[:, None] & (o_g < n_groups)[None, :]
    o_blk = (o_r[:, None, None] * n_chunks + o_c[None, :, None]) * n_groups + o_g[None, None, :]  # [BR, BC, BG]
    m_blk = m_r[:, None, None] & (o_g < n_groups)[None, None, :]
    b_size = tl.zeros([BR, BG], dtype=tl.int32)
    for c0 in range(0, n_chunks, BC):
        m_c = m_blk & (c0 + o_c < n_chunks)[None, :, None]
        b_size += tl.sum(tl.load(p_counts + o_blk + c0 * n_groups, mask=m_c, other=0), axis=1)
    b_start = tl.cumsum(b_size, axis=1) - b_size
    b_next = b_start
    for c0 in range(0, n_chunks, BC):
        m_c = m_blk & (c0 + o_c < n_chunks)[None, :, None]
        b_counts = tl.load(p_counts + o_blk + c0 * n_groups, mask=m_c, other=0)  # [BR, BC, BG]
        tl.store(p_first + o_blk + c0 * n_groups, b_next[:, None, :] + tl.cumsum(b_counts, axis=1) - b_counts,
                 mask=m_c)
        b_next += tl.sum(b_counts, axis=1)
    b_row = tl.broadcast_to((row0 + o_r).to(tl.uint32)[:, None], [BR, BG])
    b_grp = tl.broadcast_to(o_g.to(tl.uint32)[None, :], [BR, BG])
    b_lo, b_hi = _seed_halves(p_seed, seed_lo, seed_hi, SEED_PTR)
    b_key, b_h, b_b, b_rounds = _sigma_params(b_row, b_grp, b_size.to(tl.uint32), b_lo, b_hi, 32)
    p_out = p_perm + o_r[:, None] * n_groups + o_g[None, :]
    plane = R * n_groups
    tl.store(p_out, b_start, mask=m)
    tl.store(p_out + plane, b_size, mask=m)
    tl.store(p_out + 2 * plane, b_h.to(tl.int32), mask=m)
    tl.store(p_out + 3 * plane, b_b.to(tl.int32), mask=m)
    tl.store(p_out + 4 * plane, b_rounds, mask=m)
    tl.store(p_out + 5 * plane, b_key.to(tl.int32, bitcast=True), mask=m)


@triton.jit
def _compact_targets_kernel(
    p_ts,  # [R, B] fp32 raw teacher dots of the slab rows
    p_rt,  # [B] fp32 inverse norms
    p_thr,  # [B, G-1] fp32
    p_low, p_cut,  # [B, G-1] fp32, int32 tie cuts (TIES)
    p_lse_t,  # [B] fp32 teacher logsumexps
    p_first,  # [R, C, G] int32: compact position of chunk c's first member of group g
    p_compact,  # [R, B] out (G's dtype): targets in group order (B-1 used)
    row0, B, ld, s_thr, n_thr: tl.constexpr, chunk_width, n_chunks, R, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, TIES: tl.constexpr,
):
    i_c, o_r, o_m, m_m = _slab_program(row0, B, R, BM)
    o_g = tl.arange(0, BG)[None, :]
    n_groups: tl.constexpr = n_thr + 1
    b_next = tl.load(p_first + (o_r[:, None] * n_chunks + i_c) * n_groups + o_g,
                     mask=m_m[:, None] & (o_g < n_groups), other=0)  # [BM, BG]
    col0, n_end, ld_end = _chunk_bounds(i_c, chunk_width, B, ld)
    for i_n in range(0, tl.cdiv(chunk_width, BN)):
        o_n = col0 + i_n * BN + tl.arange(0, BN).to(tl.int64)
        m_n, m_ld = o_n < n_end, o_n < ld_end
        b_t, b_grp = _teacher_groups(p_ts, p_rt, p_thr, p_low, p_cut, s_thr, o_r, o_m, m_m, o_n, m_n, m_ld, ld,
                                     n_thr, TIES)
        b_pos, b_next = _compact_positions(b_grp, b_next, n_groups, BG)
        b_lse_t = tl.load(p_lse_t + o_m, mask=m_m, other=0.0)
        b_q = tl.exp(b_t * teacher_scale - b_lse_t[:, None])  # q_ij [BM, BN]
        tl.store(p_compact + o_r[:, None] * ld + b_pos, b_q.to(p_compact.dtype.element_ty), mask=b_pos >= 0)


@triton.jit
def _distill_slab_kernel(
    p_xs,  # [R, B] fp32 raw student dots of the slab rows (cuBLAS)
    p_rx,  # [B] fp32 inverse norms
    p_ts,  # [R, B] fp32 raw teacher dots of the slab rows (cuBLAS)
    p_rt,  # [B] fp32 inverse norms
    p_thr,  # [B, G-1] fp32 (expected, random)
    p_low, p_cut,  # [B, G-1] fp32, int32 tie cuts (TIES)
    p_lse_s,  # [B] fp32 student logsumexps
    p_lse_t,  # [B] fp32 teacher logsumexps (none)
    p_qbar,  # [B, G] fp32 group means of q (expected)
    p_first,  # [R, C, G] int32, as in _compact_targets_kernel (random)
    p_compact,  # [R, B] targets in group order (random; G's dtype)
    p_perm,  # [6, R, G] int32: start, size, h, b, rounds, key (bits) of each group's sigma (random)
    p_nll,  # [R, C] fp32 out: sum over chunk c of q~_rj (lse_s_r - student_scale s_rj), -q~ log p
    p_grad,  # [R, B] out (G's dtype): M_rj = G_rj rx_j, or (G_rj + G_jr) rx_j with BOTH_SIDES; 0 on the diagonal
    row0, B, ld, s_thr, n_thr: tl.constexpr, chunk_width, n_chunks, R, student_scale, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, BG: tl.constexpr, TARGETS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, TIES: tl.constexpr, BOTH_SIDES: tl.constexpr,
):
    """Cross terms and gradient factors ``G_rj = student_scale (p_rj - q~_rj)`` of slab rows
    ``row0 + [0, R)``, block i_m of BM rows, column chunk i_c; ``TARGETS`` is the index of the
    shuffle in SHUFFLES. With shuffle none or expected, any row's targets can be evaluated here
    (O(B G) tables), so with BOTH_SIDES the factor also takes the column side ``G_jr`` (s and t
    are symmetric) and one GEMM gives the slab rows' whole gradient; the random shuffle's ranks
    exist for the slab rows only, and a shard of the batch's rows has its own rows' statistics
    only, so their column side is ``_accumulate_slab_kernel``'s GEMM."""
    i_c, o_r, o_m, m_m = _slab_program(row0, B, R, BM)
    o_g = tl.arange(0, BG)[None, :]
    n_groups: tl.constexpr = n_thr + 1
    if TARGETS == 2:
        b_next = tl.load(p_first + (o_r[:, None] * n_chunks + i_c) * n_groups + o_g,
                         mask=m_m[:, None] & (o_g < n_groups), other=0)  # [BM, BG]
    b_lse_s = tl.load(p_lse_s + o_m, mask=m_m, other=0.0)
    s_perm = R * n_groups  # stride between the tables of p_perm
    b_nll = tl.zeros([BM], dtype=tl.float32)
    col0, n_end, ld_end = _chunk_bounds(i_c, chunk_width, B, ld)
    for i_n in range(0, tl.cdiv(chunk_width, BN)):
        o_n = col0 + i_n * BN + tl.arange(0, BN).to(tl.int64)
        m_n, m_ld = o_n < n_end, o_n < ld_end
        if TARGETS == 0:
            b_t = slab_tile(p_ts, p_rt, o_r, o_m, m_m, o_n, m_n, m_ld, ld)  # [BM, BN]
            m_in = (o_m[:, None] != o_n[None, :]) & m_m[:, None] & m_n[None, :]
            b_lse_t = tl.load(p_lse_t + o_m, mask=m_m, other=0.0)
            b_qt = tl.exp(b_t * teacher_scale - b_lse_t[:, None])  # q [BM, BN]
        elif TARGETS == 1:  # q~ = qbar of the entry's group: a select per threshold (thr falls with g)
            b_t = slab_tile(p_ts, p_rt, o_r, o_m, m_m, o_n, m_n, m_ld, ld)  # [BM, BN]
            m_in = (o_m[:, None] != o_n[None, :]) & m_m[:, None] & m_n[None, :]
            b_qt = tl.zeros_like(b_t) + tl.load(p_qbar + o_m * n_groups, mask=m_m, other=0.0)[:, None]
            for g in tl.static_range(n_thr):
                b_thr = _row_threshold(p_thr, p_low, p_cut, s_thr, o_m, m_m, o_n, g, TIES)  # [BM, 1 or BN]
                b_qbar = tl.load(p_qbar + o_m * n_groups + g + 1, mask=m_m, other=0.0)
                b_qt = tl.where(b_t < b_thr, b_qbar[:, None], b_qt)
        else:
            _, b_grp = _teacher_groups(p_ts, p_rt, p_thr, p_low, p_cut, s_thr, o_r, o_m, m_m, o_n, m_n, m_ld, ld,
                                       n_thr, TIES)
            b_pos, b_next = _compact_positions(b_grp, b_next, n_groups, BG)
            m_in = b_pos >= 0
            # sigma's parameters of each member's group (non-members: size 1, so sigma(0) = 0)
            p_tab = p_perm + o_r[:, None] * n_groups + b_grp
            b_start = tl.load(p_tab, mask=m_in, other=0)
            b_size = tl.load(p_tab + s_perm, mask=m_in, other=1).to(tl.uint32)
            b_h = tl.load(p_tab + 2 * s_perm, mask=m_in, other=0).to(tl.uint32)
            b_b = tl.load(p_tab + 3 * s_perm, mask=m_in, other=1).to(tl.uint32)
            b_rounds = tl.load(p_tab + 4 * s_perm, mask=m_in, other=0)
            b_key = tl.load(p_tab + 5 * s_perm, mask=m_in, other=0).to(tl.uint32, bitcast=True)
            b_rank = tl.where(m_in, b_pos - b_start, 0).to(tl.uint32)
            b_partner = b_start + _group_permutation(b_rank, b_size, b_key, b_h, b_b, b_rounds).to(tl.int32)
            b_qt = tl.load(p_compact + o_r[:, None] * ld + b_partner, mask=m_in, other=0.0).to(tl.float32)  # q~

        b_s = slab_tile(p_xs, p_rx, o_r, o_m, m_m, o_n, m_n, m_ld, ld)  # cosines [BM, BN]
        b_rx_n = tl.load(p_rx + o_n, mask=m_n, other=0.0)
        b_nlp = b_lse_s[:, None] - b_s * student_scale  # -log p [BM, BN]
        b_p = tl.exp(-b_nlp)
        b_nll += tl.sum(tl.where(m_in, b_qt * b_nlp, 0.0), axis=1)
        if WRITE_GRAD:
            b_g = b_p - b_qt
            if BOTH_SIDES:  # the column side: row j's factor at column r (TARGETS < 2)
                b_lse_s_n = tl.load(p_lse_s + o_n, mask=m_n, other=0.0)
                if TARGETS == 0:
                    b_lse_t_n = tl.load(p_lse_t + o_n, mask=m_n, other=0.0)
                    b_qt_n = tl.exp(b_t * teacher_scale - b_lse_t_n[None, :])
                else:  # the columns' thresholds and means, [BN] per tile
                    b_qt_n = tl.zeros_like(b_t) + tl.load(p_qbar + o_n * n_groups, mask=m_n, other=0.0)[None, :]
                    for g in tl.static_range(n_thr):
                        b_thr_n = _column_threshold(p_thr, p_low, p_cut, s_thr, o_n, m_n, o_m, g, TIES)
                        b_qbar_n = tl.load(p_qbar + o_n * n_groups + g + 1, mask=m_n, other=0.0)
                        b_qt_n = tl.where(b_t < b_thr_n, b_qbar_n[None, :], b_qt_n)
                b_g += tl.exp(b_s * student_scale - b_lse_s_n[None, :]) - b_qt_n
            b_g = b_g * b_rx_n[None, :]  # M = G rx_j: the GEMMs take the raw rows (G u = M x)
            b_g = tl.where(m_in, student_scale * b_g, 0.0)
            tl.store(p_grad + o_r[:, None] * ld + o_n[None, :], b_g.to(p_grad.dtype.element_ty),
                     mask=m_m[:, None] & m_n[None, :])  # not m_ld: that took ~90 SASS more a tile (B = 144, sm_90a)
    tl.store(p_nll + o_r * n_chunks + i_c, b_nll, mask=m_m)


@triton.jit
def _lo_exponent(b_hi, MANT: tl.constexpr, EMIN: tl.constexpr):
    """k such that lo counts units of 2^k: 1/256 of the ulp of ``b_hi`` (fp32 values of a 16-bit
    format with MANT mantissa bits; exponents below EMIN share EMIN's unit)."""
    b_e = ((b_hi.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.maximum(b_e, EMIN) - MANT - 8


@triton.jit
def _pow2(b_k):
    """2^k as fp32 for integer k in [-126, 127]."""
    return ((b_k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _unpack(b_hi, b_lo, MANT: tl.constexpr, EMIN: tl.constexpr):
    """The accumulator's fp32 value ``hi + lo * unit(hi)`` (both as fp32)."""
    return b_hi + b_lo * _pow2(_lo_exponent(b_hi, MANT, EMIN))


@triton.jit
def _accumulate_slab_kernel(
    p_m,  # [R, B] slab factors (G's dtype): M_rj = G_rj rx_j of rows row0 + [0, R), row stride ld
    p_x,  # [B, D] student rows, raw
    p_rx,  # [B] fp32 inverse norms
    p_row_side,  # [R, D] fp32: (M x)_r, the slab rows' own side
    p_hi,  # [B, D] contiguous, x's dtype: the accumulator rx_j du_j (fp32: all of it)
    p_lo,  # [B, D] int8 (HAS_LO): the rest, in units of 1/256 of hi's ulp
    p_scale,  # [B] fp32 (ROW_SCALE): each row's factor on what it adds
    row0, R, B, ld, D, s_x,
    BJ: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, F32_DOT: tl.constexpr,
    HAS_LO: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr, ROW_SCALE: tl.constexpr, WIDE: tl.constexpr,
):
    """The random shuffle's gradient, one slab's share: every row j's column side
    ``sum_r M_rj (rx_r x_r)`` (rx_j du_j, since M carries rx_j), plus ``rx_r (M x)_r`` for the
    slab's own rows, added to the accumulator held as hi + lo: a 16-bit hi (dx itself) and an
    int8 lo, ~16 significant bits in 3 bytes an entry (fp32 hi alone for fp32 rows). With
    ROW_SCALE, row j adds p_scale_j times that (fp16 rows of small norm: rx_j du_j / c_j).
    Grid (feature blocks, row blocks): the programs of one strip of M run together (L2). CUDA
    takes at most 65,535 on a grid's second axis, which the row blocks pass from B = 4,194,241
    at BJ = 64: then (WIDE) a third axis carries them on (a variant of its own: the row index
    from program_id(1) alone keeps the common one at 211 registers in bf16, sm_90a; as a sum it
    takes 255 and spills). F32_DOT: fp32 operands (M in fp32)."""
    i_d = tl.program_id(0).to(tl.int64)
    if WIDE:
        i_j = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    else:
        i_j = tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    o_j = i_j * BJ + tl.arange(0, BJ)
    m_d, m_j = o_d < D, o_j < B
    b_acc = tl.zeros([BJ, BD], dtype=tl.float32)
    for k0 in range(0, R, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        m_k = o_k < R
        # under the aligned bound (vectorised): a column j >= B only feeds row j of the result, never stored
        b_m = tl.load(p_m + o_k[:, None] * ld + o_j[None, :], mask=m_k[:, None] & (o_j < ld)[None, :], other=0.0)
        b_rx = tl.load(p_rx + row0 + o_k, mask=m_k, other=0.0)
        b_x = tl.load(p_x + (row0 + o_k)[:, None] * s_x + o_d[None, :], mask=m_k[:, None] & m_d[None, :], other=0.0)
        b_u = b_x.to(tl.float32) * b_rx[:, None]  # unit rows u_r [BK, BD]
        if F32_DOT:
            b_acc = tl.dot(tl.trans(b_m.to(tl.float32)), b_u, b_acc, input_precision=PREC)
        else:  # u as two bf16 terms (~16 bits; M is exact in bf16): rounding u once would cost 8
            b_u_hi = b_u.to(b_m.dtype)
            b_u_lo = (b_u - b_u_hi.to(tl.float32)).to(b_m.dtype)
            b_acc = tl.dot(tl.trans(b_m), b_u_hi, b_acc, input_precision=PREC)
            b_acc = tl.dot(tl.trans(b_m), b_u_lo, b_acc, input_precision=PREC)
    m_own = m_j & (o_j >= row0) & (o_j < row0 + R)
    b_own = tl.load(p_row_side + (o_j - row0)[:, None] * D + o_d[None, :], mask=m_own[:, None] & m_d[None, :],
                    other=0.0)
    b_acc += b_own * tl.load(p_rx + o_j, mask=m_j, other=0.0)[:, None]
    if ROW_SCALE:
        b_acc *= tl.load(p_scale + o_j, mask=m_j, other=0.0)[:, None]
    o_out = o_j[:, None] * D + o_d[None, :]
    m_out = m_j[:, None] & m_d[None, :]
    b_hi = tl.load(p_hi + o_out, mask=m_out, other=0.0).to(tl.float32)
    if HAS_LO:
        b_lo = tl.load(p_lo + o_out, mask=m_out, other=0).to(tl.float32)
        b_sum = _unpack(b_hi, b_lo, MANT, EMIN) + b_acc
        b_hi = b_sum.to(p_hi.dtype.element_ty).to(tl.float32)  # to nearest
        b_lo = (b_sum - b_hi) * _pow2(-_lo_exponent(b_hi, MANT, EMIN))  # exact, |.| <= 128
        b_lo = tl.where(b_lo >= 0, b_lo + 0.5, b_lo - 0.5).to(tl.int32)
        tl.store(p_lo + o_out, tl.minimum(tl.maximum(b_lo, -127), 127).to(tl.int8), mask=m_out)
        tl.store(p_hi + o_out, b_hi.to(p_hi.dtype.element_ty), mask=m_out)
    else:
        tl.store(p_hi + o_out, b_hi + b_acc, mask=m_out)


@triton.jit
def _load_du(p_du, p_lo, o, m, HAS_LO: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr):
    """fp32 du at offsets o: p_du's own values, or the accumulator hi + lo (``_unpack``)."""
    b_du = tl.load(p_du + o, mask=m, other=0.0).to(tl.float32)
    if HAS_LO:
        b_du = _unpack(b_du, tl.load(p_lo + o, mask=m, other=0).to(tl.float32), MANT, EMIN)
    return b_du


@triton.jit
def _unit_rows_backward_kernel(
    p_du,  # [R, D] dL/du (fp32), or with HAS_LO the accumulator's hi (x's dtype)
    p_lo,  # [R, D] int8 (HAS_LO): hi's low part, du's row stride
    p_x,  # [R, D] raw rows
    p_rx,  # [R] fp32 inverse norms
    p_out,  # [R, D] dL/dx in its own dtype; may be p_du (each program reads its rows before writing them)
    p_scale,  # [R] fp32 (ROW_SCALE), row stride s_scale (0: one value for every row)
    R, D, s_du, s_x, s_out, s_scale, add_scale,
    SCALED: tl.constexpr, HAS_LO: tl.constexpr, ROW_SCALE: tl.constexpr, ADD: tl.constexpr,
    MANT: tl.constexpr, EMIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    """dL/dx through ``u = x rx``: ``rx (du - u (u . du))``; with SCALED du holds ``rx du``
    already, and the answer is ``du - u (u . du)``; with ROW_SCALE du's rows are multiplied by
    p_scale's values first; with ADD, ``add_scale`` times out's own values are added (in fp32,
    one rounding). Two passes over a block of BR rows: the dots ``x . du`` and ``|x|^2``, then
    the output. A row shorter than eps (``u = x / eps``) has no projection: ``rx du``."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < R
    b_rx = tl.load(p_rx + o_r, mask=m_r, other=0.0)
    b_out = b_rx  # the output's row factor: rx (c du - u (u . c du)) = c rx (du - u (u . du))
    if ROW_SCALE:
        b_out = b_rx * tl.load(p_scale + o_r * s_scale, mask=m_r, other=0.0)
    b_dot = tl.zeros([BR], dtype=tl.float32)
    b_nx = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_r[:, None] & (o_d < D)[None, :]
        b_du = _load_du(p_du, p_lo, o_r[:, None] * s_du + o_d[None, :], m, HAS_LO, MANT, EMIN)
        b_x = tl.load(p_x + o_r[:, None] * s_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_dot += tl.sum(b_du * b_x, axis=1)
        b_nx += tl.sum(b_x * b_x, axis=1)
    b_c = tl.where(b_nx >= EPS_SQUARED, b_rx * b_rx * b_dot, 0.0)[:, None]  # u (u . du) = x rx^2 (x . du)
    for d0 in range(0, D, BD):
        o_d = d0 + tl.arange(0, BD)
        m = m_r[:, None] & (o_d < D)[None, :]
        b_du = _load_du(p_du, p_lo, o_r[:, None] * s_du + o_d[None, :], m, HAS_LO, MANT, EMIN)
        b_x = tl.load(p_x + o_r[:, None] * s_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_dx = b_du - b_x * b_c
        if not SCALED:
            b_dx *= b_out[:, None]
        p_o = p_out + o_r[:, None] * s_out + o_d[None, :]
        if ADD:
            b_dx += add_scale * tl.load(p_o, mask=m, other=0.0).to(tl.float32)
        tl.store(p_o, b_dx.to(p_out.dtype.element_ty), mask=m)


def _fp32_dots(x_dtype, t_dtype):
    """(whether the student or the teacher is fp32, whether that fp32 tl.dot runs on FMAs:
    full precision, PyTorch's "highest")."""
    fp32 = torch.float32 in (x_dtype, t_dtype)
    return fp32, fp32 and dot_precision(torch.float32) == "ieee"


def _slab_blocks(B: int, shuffle: str, ties: bool = False):
    """(blocks of the random mode's count and compaction kernels, blocks of the slab kernel).
    They read the slab's cuBLAS dots, so no tile holds a dot's operands: memory- and ALU-bound
    tiles of [32, 128] at 8 warps, [32, 64] for the random shuffle's slab kernel (the
    permutation's state). sm_90a (``benchmarks/compile_sm90.py --what distill``, session 15, not
    timed; 10 groups): counts 168 registers, compaction 193-255, slab kernel 175 (none), 180
    (expected), 219 (random), no spills (at 64 groups counts spill 348 B, compaction 52 B); at
    4 warps they spilled 12-304 bytes (session 13). With tie cuts (``ties``: a [BM, BN] threshold
    per boundary) [32, 64] throughout: at [32, 128] the expected shuffle's slab kernel spilled
    236 B and the counts 4 B (bf16, session 21). Under the
    interpreter few large blocks run fastest. Column tiles must divide the chunk width (powers
    of two)."""
    if utils.interpreter_blocks():
        bm = min(64, max(16, next_pow2(B)))
        blocks = dict(BM=bm, BN=bm, num_warps=4)
        return blocks, blocks
    narrow = ties or shuffle == "random"
    slab = dict(BM=32, BN=64 if narrow else 128, num_warps=8)
    return dict(BM=32, BN=64 if ties else 128, num_warps=8), slab


def _prepare(x, rx, t, rt):
    """Unit feature strides, contiguous ``rx`` and ``rt``."""
    return unit_stride_rows(x), rx.contiguous(), unit_stride_rows(t), rt.contiguous()


def _stats_blocks() -> dict:
    """Blocks of the statistics kernel: [BM, BN] tiles of the slab's two dots, memory- and
    MUFU-bound (three exps an entry). Under the interpreter fewer, larger programs."""
    if utils.interpreter_blocks():
        return dict(BM=64, BN=128)
    return dict(BM=32, BN=128, num_warps=8)


def distill_row_stats(x, rx, t, rt, student_scale, teacher_scale, grouping_scale, *, budget_bytes, grid=None,
                      rows=None):
    """Per slab of rows, one pass over their fp32 cuBLAS dots in column splits
    (``utils.column_splits``), whose partial statistics are merged in a fixed order:
    deterministic. s and t are symmetric, so a slab takes its dots with the columns from its
    first row on, ``x[slab] x[row0:]^T`` (half the GEMMs of whole rows), and its rows' columns
    before it come from the slabs above as their column side, merged into running column
    states slab by slab. t likewise, except with ``grid``: the Group-P search's first pass
    (``group_partition.grid_pass``), which each slab's whole teacher rows feed once their
    statistics are known. Within ``budget_bytes``: the slabs' dots and column-side states (4
    bytes a column, state and row block, and the running ones), and with ``grid`` the pass's
    partial measures and the splits' partial states in a quarter of it (without, the states'
    at most 1.5 MiB or 1/16). ``x`` [B, D] or None, ``rx`` [B] fp32 (or None), ``t`` [B, Dt], ``rt`` [B]
    fp32. Returns five fp32 [B] vectors: lse_s (None without x), lse_t, lse_g (logsumexps over
    j != i of s * student_scale, t * teacher_scale, t * grouping_scale) and t_min, t_max
    (min / max over j != i of t). ``rows=(start, stop)``: those rows' statistics only (a shard;
    the others are 0), from their whole rows of dots (no halves: a shard's columns are every row)."""
    x, rx, t, rt = _prepare(x, rx, t, rt) if x is not None else (None, None, unit_stride_rows(t), rt.contiguous())
    B = t.shape[0]
    start, stop = (0, B) if rows is None else rows
    whole = (start, stop) == (0, B)
    student, half_t = x is not None, grid is None and whole
    half_s = student and whole
    blocks = _stats_blocks()
    BM, BN = blocks["BM"], blocks["BN"]
    planes = 6 if half_t else 2 if half_s else 0  # column-side states: s's 2 (planes 0-1), t's 4 (2-5)
    # the splits' states: 24 bytes a row and split; column_splits keeps splits x R under 2 x SPLIT_PROGRAMS x BM
    state_bytes = min(48 * utils.SPLIT_PROGRAMS * BM, budget_bytes // 16)
    # a slab row: its dots (8 bytes an entry, 4 without x), its block's share of the column-side states
    row_bytes = aligned(B) * (8 if student else 4) + cdiv(4 * planes * B, BM)
    slabs_bytes = budget_bytes - (budget_bytes // 4 if grid is not None else state_bytes) - 8 * planes * B
    # in multiples of 16 rows, not of a block (a slab's GEMMs read all B rows of x and t, whatever its
    # height); 16, so that a half's first column row0 keeps its loads aligned
    R = max(slab_rows(stop - start, row_bytes, slabs_bytes, 1, 16), min(stop - start, BM))
    NB = cdiv(R, BM)
    n_tiles = cdiv(B, BN)
    max_splits = utils.column_splits(n_tiles, NB)
    while max_splits > 1 and 24 * max_splits * R > state_bytes:
        max_splits //= 2
    # a slab's halves are [rows, B - row0] views of them: past a half, its rows hold zeros or the first slab's dots
    t_dots = slab_buffer(R, B, t.device)
    s_dots = slab_buffer(R, B, t.device) if student else t_dots
    partial = torch.empty((6, R, max_splits), device=t.device, dtype=torch.float32)
    if planes:  # per row block of the slab, the column-side states; their running merge over the slabs
        cols = torch.empty((planes, NB, B), device=t.device, dtype=torch.float32)
        state = torch.empty((planes, B), device=t.device, dtype=torch.float32)  # the first slab reads none
    else:
        cols = state = partial  # unread
    out = (torch.empty if whole else torch.zeros)((5, B), device=t.device, dtype=torch.float32)
    BR, BS = (64, 2) if utils.interpreter_blocks() else (16, 64)  # the merge's [BR, BS] blocks of states
    BC, BB = (64, 2) if utils.interpreter_blocks() else (128, 8)  # the column merge's [BC, BB] blocks
    flags = dict(STUDENT=student, HALF_S=half_s, HALF_T=half_t)
    for row0 in range(start, stop, R):
        rows = min(R, stop - row0)
        s_col0, t_col0 = (row0 if half_s else 0), (row0 if half_t else 0)
        s_slab, t_slab = s_dots[:rows, :B - s_col0], t_dots[:rows, :B - t_col0]
        if student:
            matmul_f32(x[row0:row0 + rows], x[s_col0:].T, out=s_slab)
        matmul_f32(t[row0:row0 + rows], t[t_col0:].T, out=t_slab)
        tile0 = t_col0 // BN  # tiles before it hold no dots of the slab
        splits = min(max_splits, utils.column_splits(n_tiles - tile0, cdiv(rows, BM)))
        _row_stats_kernel[(cdiv(rows, BM), splits)](
            s_slab, rt if rx is None else rx, t_slab, rt, partial, cols, row0, rows, B, t_dots.stride(0), t_col0,
            tile0, cdiv(n_tiles - tile0, splits), NB * B, float(student_scale), float(teacher_scale),
            float(grouping_scale), **flags, **blocks)
        _row_stats_merge_kernel[(cdiv(rows, BR),)](
            partial, state, out, row0, rows, B, splits, float(teacher_scale), float(grouping_scale), BR=BR, BS=BS,
            **flags, num_warps=4)
        if planes and row0 + rows < B:
            _column_stats_merge_kernel[(cdiv(B - row0 - rows, BC),)](
                cols, state, row0, row0 + rows, cdiv(rows, BM), B, NB * B, float(teacher_scale),
                float(grouping_scale), BC=BC, BB=BB, HALF_S=half_s, HALF_T=half_t, num_warps=4)
        if grid is not None:
            grid(row0, t_slab, out[2], out[3], out[4])
    return (out[0] if student else None,) + tuple(out[1:].unbind(0))


def _permutation_tables(counts, row0, step_seed, lse=None):
    """From the chunk counts [R, C, G] int32 of slab rows row0.. (``_permutation_tables_kernel``):
    ``first`` [R, C, G] (compact position of each chunk's first member of each group) and
    ``perm`` [6, R, G] int32, the parameters of each group's sigma (start, size, h, b, rounds,
    key bits), as ``distillcse.shuffle`` defines them for ``step_seed`` (64-bit: an int, or a [1]
    int64 tensor on the device, ``utils.seed_args``). With ``lse`` (the count kernel's chunk
    states [2, R, C] fp32, lse_s [B] fp32), also the slab rows' lse_s."""
    R, C, G = counts.shape
    first = torch.empty_like(counts)
    perm = torch.empty((6, R, G), device=counts.device, dtype=torch.int32)
    BG = max(2, next_pow2(G))
    BR = 64 if utils.interpreter_blocks() else 1  # a row a program: its chunks in one or a few loads
    BC = max(1, 4096 // (BR * BG))  # [BR, BC, BG] blocks of 4K counts
    *seed, seed_ptr = seed_args(step_seed, counts)
    states, lse_s = (perm, perm) if lse is None else lse
    _permutation_tables_kernel[(cdiv(R, BR),)](
        counts, first, perm, *seed, states, lse_s, row0, R, C, G, BR=BR, BC=BC, BG=BG,
        SEED_PTR=seed_ptr, LSE=lse is not None, num_warps=4)
    return first, perm


def unit_rows_backward(du, x, rx, out, *, lo=None, scaled=False, row_scale=None, add_scale=None):
    """dL/dx [R, D] into ``out`` (x's dtype; may be ``du``) from dL/du [R, D] for ``u = x rx``:
    ``rx (du - u (u . du))``, one launch, no temporaries. ``du`` is fp32, or with ``lo`` the
    accumulator hi + lo of :func:`accumulate_slab`. With ``scaled``, du holds ``rx du`` already
    (then ``rx du - u (u . rx du)`` is the answer). ``row_scale`` (fp32, [R] or one value)
    multiplies du's rows first. With ``add_scale``, ``add_scale`` times out's values are added
    (another term's gradient). Rows may have any stride, features stride 1."""
    R, D = x.shape
    assert du.stride(-1) == x.stride(-1) == out.stride(-1) == 1 and (lo is None or lo.stride() == du.stride())
    assert row_scale is None or (not scaled and row_scale.dtype == torch.float32 and row_scale.numel() in (1, R))
    mant, emin = LO_FORMATS.get(du.dtype, (0, 0))
    BR, BD = (64, 128) if utils.interpreter_blocks() else (8, 128)
    _unit_rows_backward_kernel[(cdiv(R, BR),)](
        du, du if lo is None else lo, x, rx, out, rx if row_scale is None else row_scale, R, D, du.stride(0),
        x.stride(0), out.stride(0), 0 if row_scale is None or row_scale.numel() == 1 else row_scale.stride(0),
        0.0 if add_scale is None else float(add_scale), SCALED=scaled, HAS_LO=lo is not None,
        ROW_SCALE=row_scale is not None, ADD=add_scale is not None, MANT=mant, EMIN=emin, BR=BR, BD=BD, num_warps=4)


LO_FORMATS = {torch.float16: (10, -14), torch.bfloat16: (7, -100)}  # hi's (MANT, EMIN) in _lo_exponent


def _accumulate_blocks(m_dtype, fma_dots):
    """Blocks of ``_accumulate_slab_kernel``: memory-bound (K = R is small), so wide tiles that
    read each strip of M once; smaller for fp32 "ieee" FMA dots."""
    if utils.interpreter_blocks():
        return dict(BJ=128, BK=64, BD=128, num_warps=4)
    if fma_dots:
        return dict(BJ=64, BK=16, BD=64, num_warps=4)
    return dict(BJ=128, BK=64 if m_dtype != torch.float32 else 32, BD=128, num_warps=8)


RANDOM_TRAFFIC_WARN_BYTES = 1e14  # ~30 s of HBM traffic on an H100


def _warn_accumulation_traffic(B, n, D, R, acc_bytes, budget_bytes, shuffle):
    """The random shuffle's gradient (any shuffle's in a shard of n < B rows) adds every slab's
    column side to all B rows: its traffic over n rows is (n / R) B D x 2 acc_bytes, with
    R ~ budget / B rows a slab, so it grows as n B^2 / budget. Warn where that alone would take
    minutes."""
    traffic = cdiv(n, R) * B * D * 2 * acc_bytes
    if traffic > RANDOM_TRAFFIC_WARN_BYTES:
        shard = f" on a shard of {n} rows" if n < B else ""
        way_out = "" if shard else (' or use shuffle="expected" (its deterministic expectation, O(B^2 D) at any '
                                    'budget)')
        warnings.warn(
            f'shuffle="{shuffle}" at B={B}{shard} with a {budget_bytes / 2**20:.3g} MiB chunk budget runs '
            f'{cdiv(n, R)} slabs of {R} rows, each adding to all {B} rows of the gradient: ~{traffic / 1e12:.3g} TB '
            f'of memory traffic (it grows as B^3 / budget). Raise the budget (distillcse.set_chunk_budget)'
            f'{way_out}.', stacklevel=4)


def _random_slabs(B, n, budget_bytes, grad_bytes, step, compact=True):
    """(R, R_grad): rows of the random shuffle's dot slabs and of its gradient slabs (a multiple
    of R, several dot slabs' factors). Each dot slab's GEMMs read all of x and t; each gradient
    slab's row-side GEMM reads all of x and its accumulation reads and writes all of dx (and lo),
    about twice those bytes. So the dots and compact targets (8 + grad_bytes an entry) take half
    the budget and the factors (grad_bytes an entry) the rest: at B = 65,536 bf16 in 80 MiB,
    64-row dot slabs in 320-row gradient slabs (205 accumulations instead of 683 of 96 rows).
    n: the rows the slabs cover (B, or a shard's); without ``compact`` (a shard's none or
    expected shuffle) a dot slab's entries have no compact targets: 8 bytes."""
    width = aligned(B)  # a slab row's entries (``utils.slab_buffer``)
    entry_bytes = 8 + (grad_bytes if compact else 0)
    R = slab_rows(n, width, budget_bytes // 2, entry_bytes, step)
    R_grad = (budget_bytes - R * width * entry_bytes) // (width * grad_bytes) // R * R
    return R, min(max(R, R_grad), cdiv(n, R) * R)


def _random_accumulator(x, budget_bytes):
    """(lo, slab budget) of the random shuffle's gradient. Its column side adds to every row once
    a slab, so dx accumulates in place: fp32 rows alone, 16-bit ones with an int8 ``lo`` [B, D]
    beside them (~16 significant bits in 3 bytes an entry). lo comes out of the budget, but the slabs
    keep at least half of it."""
    if x.dtype == torch.float32:
        return None, budget_bytes
    lo = torch.zeros(x.shape, device=x.device, dtype=torch.int8)
    return lo, max(budget_bytes - lo.numel(), budget_bytes // 2)


def accumulate_slab(hi, lo, m, x, rx, row_side, row0, row_scale=None):
    """``acc += M^T (rx x)[row0 : row0 + R]`` on every row, plus ``rx row_side`` on rows
    ``row0 + [0, R)`` (each row's sum times ``row_scale``, [B] fp32, if given); acc [B, D] is
    ``hi`` (x's dtype, contiguous) + ``lo`` (int8, or None for fp32 hi). ``m`` [R, B] (fp32 or
    bf16), ``x`` [B, D] raw rows, ``rx`` [B] fp32, ``row_side`` [R, D] fp32 contiguous."""
    B, D = hi.shape
    assert row_scale is None or (row_scale.shape == (B,) and row_scale.dtype == torch.float32)
    row_scale = None if row_scale is None else row_scale.contiguous()  # the kernel reads it at stride 1
    blocks = _accumulate_blocks(m.dtype, _fp32_dots(m.dtype, m.dtype)[1])
    mant, emin = LO_FORMATS.get(hi.dtype, (0, 0))
    row_blocks = cdiv(B, blocks["BJ"])
    _accumulate_slab_kernel[(cdiv(D, blocks["BD"]), min(row_blocks, GRID_AXIS_MAX), cdiv(row_blocks, GRID_AXIS_MAX))](
        m, x, rx, row_side, hi, hi if lo is None else lo, rx if row_scale is None else row_scale, row0, m.shape[0],
        B, m.stride(0), D, x.stride(0), PREC=dot_precision(m.dtype), F32_DOT=m.dtype == torch.float32,
        HAS_LO=lo is not None, MANT=mant, EMIN=emin, ROW_SCALE=row_scale is not None,
        WIDE=row_blocks > GRID_AXIS_MAX, **blocks)


def distill_loss_and_grad(x, rx, t, rt, lse_s, lse_t, student_scale, teacher_scale, *, shuffle="none",
                          thr=None, qbar=None, ties=None, step_seed=None, budget_bytes, need_grad=True, chunks=None,
                          rows=None, grad_scale=None):
    """Loss rows [B] fp32 and dx [B, D] in x's dtype (None without ``need_grad``):
    ``loss_i = sum_{j != i} q~_ij (lse_s_i - student_scale s_ij)`` and ``dx = d(sum_i loss_i)/dx``
    through ``u = x rx``.

    ``x`` [B, D] raw student rows, ``rx`` [B] fp32 inverse norms, ``t`` [B, Dt] raw teacher rows
    (fp16, bf16 or fp32, x's dtype or not), ``rt`` [B] fp32 their inverse norms, ``lse_s``,
    ``lse_t`` [B] fp32 (``distill_row_stats``); with shuffle random ``lse_s`` may be None: each
    slab's rows' then come from the slab's own dots (the count kernel, in chunks). ``shuffle`` "none"; "expected" with
    ``thr`` [B, G-1] and ``qbar`` [B, G]; or "random" with ``thr`` and ``step_seed`` (64-bit);
    ``ties`` (both shuffles): ``group_partition.tie_cuts``' (low, cut) for ``thr``, or None.
    Rows go in slabs whose [R, B] buffers fit ``budget_bytes`` (at least one row block);
    ``chunks`` (column chunks per slab row) defaults to enough programs to fill the GPU.
    Extra memory besides dx: at most ``budget_bytes`` (at least one row block per slab), plus
    [R, D] fp32 per slab; the random shuffle's gradient accumulates in dx, with an int8 [B, D]
    beside 16-bit rows (``_random_accumulator``), once per gradient slab of several dot slabs
    (``_random_slabs``).
    ``rows=(start, stop)``: a shard, those rows' losses [stop - start] and the gradient of their
    sum (all B rows of dx); the per-row inputs (lse_s, lse_t, thr, qbar, ties) need only its rows
    set. Its column side is accumulated as the random shuffle's is, whatever the shuffle.
    ``grad_scale`` [B] fp32: dx's rows times it (fp16 rows of small norm, whose gradient would
    pass fp16's range, come with 1 / c_i: ``triton_backend._lift``).
    """
    x, rx, t, rt = _prepare(x, rx, t, rt)
    B, D = x.shape
    start, stop = (0, B) if rows is None else rows
    whole = (start, stop) == (0, B)
    slab_lse = lse_s is None
    assert not slab_lse or shuffle == "random", "lse_s is needed for every column's gradient but with shuffle random"
    lse_s = torch.empty(B, device=x.device, dtype=torch.float32) if slab_lse else lse_s.float().contiguous()
    lse_t = lse_t.float().contiguous()
    targets = SHUFFLES.index(shuffle)
    if shuffle == "none":
        thr, n_thr = lse_s[:, None], 0  # unread
    else:
        thr = thr.float().contiguous()
        n_thr = thr.shape[1]
    if ties is not None:
        low, cut = (a.contiguous() for a in ties)
        assert low.shape == cut.shape == thr.shape and low.dtype == torch.float32 and cut.dtype == torch.int32
    else:
        low, cut = thr, thr  # unread
    with_ties = ties is not None and n_thr > 0
    qbar = qbar.float().contiguous() if shuffle == "expected" else lse_t  # the kernel reads rows of G
    G = n_thr + 1
    BG = max(2, next_pow2(G))
    teacher_blocks, slab_blocks = _slab_blocks(B, shuffle, with_ties)
    BM = max(teacher_blocks["BM"], slab_blocks["BM"])
    BN = max(teacher_blocks["BN"], slab_blocks["BN"])
    grad_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16  # also the compact targets'
    # the column side accumulated over the slabs (the slab rows' own targets and statistics only)
    accumulate = need_grad and (shuffle == "random" or not whole)
    loss = torch.empty(B, device=x.device, dtype=torch.float32)
    if accumulate:
        dx = torch.zeros_like(x)
        lo, slab_budget = _random_accumulator(x, budget_bytes)
    else:
        dx = torch.empty_like(x) if need_grad else None
        lo, slab_budget = None, budget_bytes
    # per slab entry: the student's and the teacher's fp32 dots, the factors, the compact targets
    entry_bytes = 8 + (grad_dtype.itemsize if need_grad else 0) + (grad_dtype.itemsize if shuffle == "random" else 0)
    # rows of a dot slab, of a gradient slab
    R = R_grad = slab_rows(stop - start, aligned(B), slab_budget, entry_bytes, BM)
    if accumulate:
        R, R_grad = _random_slabs(B, stop - start, slab_budget, grad_dtype.itemsize, BM, shuffle == "random")
        _warn_accumulation_traffic(B, stop - start, D, R_grad, x.element_size() + (0 if lo is None else 1),
                                   budget_bytes, shuffle)
    if chunks is None:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        chunks = cdiv(programs, cdiv(R, BM))
    chunk_width = cdiv(cdiv(B, max(1, min(chunks, cdiv(B, BN)))), BN) * BN
    chunks = cdiv(B, chunk_width)

    v = (x if x.dtype == grad_dtype else x.to(grad_dtype)) if need_grad else None  # the GEMMs' rows, raw
    # [rows, B] slabs with row stride ld (utils.slab_buffer: aligned rows, zero padding)
    s_dots = slab_buffer(R, B, x.device)  # x[slab] x^T
    t_dots = slab_buffer(R, B, x.device)  # t[slab] t^T
    ld = s_dots.stride(0)
    grad = slab_buffer(R_grad, B, x.device, grad_dtype) if need_grad else lse_s
    row_side = torch.empty(R_grad, D, device=x.device, dtype=torch.float32) if need_grad else None
    compact = slab_buffer(R, B, x.device, grad_dtype) if shuffle == "random" else lse_s
    first = perm = lse_s  # the random mode's tables, per slab
    for grad0 in range(start, stop, R_grad):
        grad_rows = min(R_grad, stop - grad0)
        for row0 in range(grad0, grad0 + grad_rows, R):
            rows = min(R, grad0 + grad_rows - row0)
            slab = slice(row0, row0 + rows)
            matmul_f32(x[slab], x.T, out=s_dots[:rows])
            matmul_f32(t[slab], t.T, out=t_dots[:rows])
            if shuffle == "random":
                teacher_grid = (cdiv(rows, teacher_blocks["BM"]), chunks)
                counts = torch.empty(rows, chunks, G, device=x.device, dtype=torch.int32)
                states = torch.empty((2, rows, chunks), device=x.device, dtype=torch.float32) if slab_lse else counts
                _group_counts_kernel[teacher_grid](
                    t_dots, rt, thr, low, cut, counts, s_dots, rx, states, row0, B, ld, thr.stride(0), n_thr,
                    chunk_width, chunks, rows, float(student_scale), BG=BG, LSE=slab_lse, TIES=with_ties,
                    **teacher_blocks)
                first, perm = _permutation_tables(counts, row0, step_seed, (states, lse_s) if slab_lse else None)
                _compact_targets_kernel[teacher_grid](
                    t_dots, rt, thr, low, cut, lse_t, first, compact, row0, B, ld, thr.stride(0), n_thr, chunk_width,
                    chunks, rows, float(teacher_scale), BG=BG, TIES=with_ties, **teacher_blocks)
            nll = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
            _distill_slab_kernel[(cdiv(rows, slab_blocks["BM"]), chunks)](
                s_dots, rx, t_dots, rt, thr, low, cut, lse_s, lse_t, qbar, first, compact, perm, nll,
                grad[row0 - grad0:], row0, B, ld, thr.stride(0), n_thr, chunk_width, chunks, rows, float(student_scale),
                float(teacher_scale), BG=BG, TARGETS=targets, WRITE_GRAD=need_grad, TIES=with_ties,
                BOTH_SIDES=targets < 2 and not accumulate, **slab_blocks)
            torch.sum(nll, dim=1, out=loss[slab])  # over the chunks
        if not need_grad:
            continue
        g, rows_g = grad[:grad_rows], slice(grad0, grad0 + grad_rows)
        own = matmul_f32(g, v, out=row_side[:grad_rows])  # [rows, D] fp32: sum_j M_rj x_j, the slab rows' du
        if not accumulate:  # g holds both sides: the slab rows' gradient is complete
            unit_rows_backward(own, x[rows_g], rx[rows_g], dx[rows_g],
                               row_scale=None if grad_scale is None else grad_scale[rows_g])
            continue
        accumulate_slab(dx, lo, g, x, rx, own, grad0, grad_scale)  # (accumulated: the own side)
    if accumulate:  # dx holds rx du (with lo): through u = x rx, in place
        unit_rows_backward(dx, x, rx, dx, lo=lo, scaled=True)
    return loss[start:stop], dx
