"""The whole DistillCSE loss of a small batch (B <= ``MAX_ROWS``) and its gradients in one
program, one launch; a shuffle's targets in a launch before it, a block of rows a program.

At the paper's B = 64 the streaming kernels (``contrastive.py``, ``distill.py``,
``group_partition.py``) are launch-bound: about 60 launches and a host sync per threshold-search
pass for a few microseconds of arithmetic. Here a single program holds every logit tile of
the batch in registers (s, t [BB, BB] and c [BB, BY], fp32, BB = next_pow2(B)), any D.
The shuffled targets (Group-P groups, their means or the random permutation) are O(B^3) work,
each row's its own: ``_shuffled_targets_kernel`` takes TARGET_ROWS rows a program (a few SMs
instead of one) and writes q~ [B, BB] fp32 for the loss kernel to read; its loops over the
columns read each column back from a scratch copy of the rows' blocks (``_spill``,
``_column``; a column reduced out of registers crosses warps: shuffles and a barrier or two a
column). Extra memory: those two buffers, [6, B, BB] fp32 (96 KiB at B = 64).

Maths (SPEC): cosines from raw rows and inverse norms computed in the same pass over D as the
dot products; ``t_ij = (t_i . t_j) rt_i rt_j`` (``rt`` from the teacher rows when
``NORM_T``, else 1 for pre-normalised weighted rows). Only ``j != i`` enters the
distillation. The Group-P group of entry (i, j) is the SPEC's ranking with tied values in
column order (the torch backend's stable sort): with the measure ``F_ij = sum w_ik`` over the
k != i ranked at or before j (``t_ik > t_ij``, or equal with ``k <= j``; w the softmax at the
grouping scale, or 1 for fixed-size groups), ``group = min(floor(F_ij / P), G - 1)`` by mass
and ``min(floor((F_ij - 1) / S), G - 1)`` by size (the streaming kernels rank ties the same way
up to B = 1024, ``group_partition.tie_cuts``, and put them in one group above: README, "Where
the backends differ"). F comes from a loop over
the columns k (O(B^3) work, a few million operations at B = 64). Targets: none ``q``; expected the group mean of ``q``; random ``q`` of
the group member whose column-order rank is ``sigma(rank)``, sigma the keyed Feistel
permutation of ``distillcse.shuffle`` (the same uint32 arithmetic as ``distill.py``), so a
seed gives the same shuffle here, in the streaming kernels and in the torch backend.

Loss ``w_cl mean_i L_cl_i + w_kd mean_i L_kd_i``. Gradient factors:
  distillation ``A_ij = w_kd/B (G_ij + G_ji)``, ``G = student_scale (p - q~)`` (s symmetric);
  contrastive  ``C_ij = w_cl/B cl_scale (P_ij - [i == j])``;
  ``du1 = A u1 + C uy``, ``duy = C^T u1``, and through ``u = x r``: ``dx = r (du - u (u . du))``
  with ``u1_i . du1_i = sum_j A_ij s_ij + C_ij c_ij`` (no extra pass).
"""
import torch
import triton
import triton.language as tl

from .distill import SHUFFLES, _group_permutation, _seed_halves, _sigma_params
from .tiles import EPS_SQUARED, log1p_unit
from .utils import cdiv, dot_precision, next_pow2, seed_args, unit_stride_rows

MAX_ROWS = 64  # B and the contrastive columns N = B + B_h of a batch that fits one program
# N <= 64: at N = 65..128 (a [64, 128] column tile, 180 KiB of shared memory with gradients) the
# gradient variant's loss varied from run to run on an H200 in bf16 / fp16 (benchmarks/session_log.md,
# Session 12); the race below may have been the cause, but no GPU has rerun it, so those batches stream
MAX_COLUMNS = 64
# Unpipelined loops: the one-program kernel's loops over features, whose tiles feed wgmmas and the
# norms' sums (the logits, the teacher's logits), run with num_stages=1. Pipelined, Triton 3.6
# gives them two shared buffers at a prefetch distance of two and leaves the iteration's wgmmas in
# flight, so each refill (a zero-fill past the last feature chunk) writes the slot those wgmmas are
# still reading: a race in every variant, found in the sm_90a build by simulating its shared-memory
# accesses (Session 20; ``benchmarks/compile_sm90.py``'s ``refill_races`` flags the pattern).
PIPELINED_STAGES = tl.constexpr(3)  # Triton's default num_stages, for the targets kernel's feature loop
TARGET_ROWS = 16  # rows a program of _shuffled_targets_kernel: an MMA's M (Triton 3.6 builds M = 8 too, sm_90a)


@triton.jit
def _rows_tile(p_a, o_r, m_r, s_a, o_d, m_d):
    """Rows o_r, features o_d of a row-major matrix (row stride s_a); 0 where masked. The row
    offsets in int64: a view's row stride may put a row past 2^31 elements."""
    return tl.load(p_a + o_r[:, None].to(tl.int64) * s_a + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _spill(p_rows, o_col, b_a):
    """Stores a [BR, BB] block at row starts ``p_rows`` [BR] (a scratch row a block row) and
    waits for every thread's stores, so that ``_column`` can read its columns back."""
    tl.store(p_rows[:, None] + o_col[None, :], b_a.to(tl.float32))
    tl.debug_barrier()


@triton.jit
def _column(p_rows, k):
    """Column k of a block ``_spill`` stored, as a [BR] vector indexed by row: each thread loads
    its rows' entries (L1), where reducing the block in registers would cross warps."""
    return tl.load(p_rows + k)


@triton.jit
def _row_logsumexp(b_a):
    """logsumexp along axis 1 of a [BB, BC] block whose excluded entries are -inf; 0 for an
    all-excluded (padding) row."""
    b_max = tl.max(b_a, axis=1)
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_sum = tl.sum(tl.exp(b_a - b_max[:, None]), axis=1)
    return b_max + tl.log(tl.where(b_sum > 0, b_sum, 1.0))


@triton.jit
def _group_measure(b_t, b_w, p_t, p_w, o_col, B):
    """``F_ij = sum_k w_ik [(t_ik, -k) >= (t_ij, -j)]`` [BR, BB] (w 0 off the valid entries): the
    weight ranked at or before entry j, tied values ranked in column order. The columns
    through the scratch rows ``p_t``, ``p_w`` [BR]."""
    _spill(p_t, o_col, b_t)
    _spill(p_w, o_col, b_w)
    b_f = tl.zeros(b_t.shape, dtype=tl.float32)
    for k in range(0, B):
        b_tk = _column(p_t, k)[:, None]
        m_ranked = (b_tk > b_t) | ((b_tk == b_t) & (o_col[None, :] >= k))
        b_f += tl.where(m_ranked, _column(p_w, k)[:, None], 0.0)
    return b_f


@triton.jit
def _random_targets(b_q, b_grp, o_row, o_col, B, p_grp, p_rank, p_q, seed_lo, seed_hi, BITS: tl.constexpr):
    """q~ [BR, BB] of the random shuffle (``distillcse.shuffle``): rank in column order within
    the group, ``sigma`` keyed by (seed, row, group), then the target of the member of that
    rank. ``b_grp`` is -1 off the valid entries, which get 0. Columns through the scratch rows
    ``p_grp``, ``p_rank``, ``p_q`` [BR]."""
    m_in = b_grp >= 0
    _spill(p_grp, o_col, b_grp)
    b_rank = tl.zeros(b_grp.shape, dtype=tl.int32)
    b_size = tl.zeros(b_grp.shape, dtype=tl.int32)
    for k in range(0, B):
        m_same = _column(p_grp, k).to(tl.int32)[:, None] == b_grp
        b_size += m_same.to(tl.int32)
        b_rank += (m_same & (o_col[None, :] > k)).to(tl.int32)
    b_row = tl.broadcast_to(o_row[:, None], b_grp.shape).to(tl.uint32)
    b_n = tl.where(m_in, b_size, 1).to(tl.uint32)
    b_key, b_h, b_b, b_rounds = _sigma_params(b_row, b_grp.to(tl.uint32), b_n, seed_lo, seed_hi, BITS)
    b_x = tl.where(m_in, b_rank, 0).to(tl.uint32)
    b_partner = _group_permutation(b_x, b_n, b_key, b_h, b_b, b_rounds).to(tl.int32)
    _spill(p_rank, o_col, b_rank)
    _spill(p_q, o_col, b_q)
    b_qt = tl.zeros(b_q.shape, dtype=tl.float32)
    for k in range(0, B):
        m_hit = ((_column(p_grp, k).to(tl.int32)[:, None] == b_grp)
                 & (_column(p_rank, k).to(tl.int32)[:, None] == b_partner))
        b_qt += tl.where(m_hit, _column(p_q, k)[:, None], 0.0)
    return tl.where(m_in, b_qt, 0.0)


@triton.jit
def _teacher_targets(p_t, o_row, m_row, o_col, m_col, m_in, s_t, Dt, teacher_scale,
                     BDT: tl.constexpr, NORM_T: tl.constexpr, PREC_T: tl.constexpr, STAGES: tl.constexpr):
    """(t, q) [BR, BB] of rows o_row against columns o_col: the teacher logits (``rt`` from the
    rows when NORM_T) and their softmax over the valid entries ``m_in`` at teacher_scale.
    STAGES: the feature loop's pipeline stages (1 where its dots are wgmmas: the note below
    MAX_COLUMNS; 16-row blocks take mma.sync, which that race does not touch)."""
    b_tt = tl.zeros([o_row.shape[0], o_col.shape[0]], dtype=tl.float32)
    b_nr = tl.zeros([o_row.shape[0]], dtype=tl.float32)
    b_nc = tl.zeros([o_col.shape[0]], dtype=tl.float32)
    for i_d in tl.range(0, tl.cdiv(Dt, BDT), num_stages=STAGES):
        o_d = i_d * BDT + tl.arange(0, BDT)
        m_d = o_d < Dt
        b_tr = _rows_tile(p_t, o_row, m_row, s_t, o_d, m_d)  # [BR, BDT]
        b_tc = _rows_tile(p_t, o_col, m_col, s_t, o_d, m_d)  # [BB, BDT]
        b_nr += tl.sum(b_tr.to(tl.float32) * b_tr.to(tl.float32), axis=1)
        b_nc += tl.sum(b_tc.to(tl.float32) * b_tc.to(tl.float32), axis=1)
        b_tt = tl.dot(b_tr, tl.trans(b_tc), b_tt, input_precision=PREC_T)  # [BR, BDT] @ [BDT, BB]
    if NORM_T:
        b_rr, b_rc = 1.0 / tl.maximum(tl.sqrt(b_nr), 1e-8), 1.0 / tl.maximum(tl.sqrt(b_nc), 1e-8)
        b_tt = b_tt * b_rr[:, None] * b_rc[None, :]
    b_lt = tl.where(m_in, b_tt * teacher_scale, float("-inf"))
    return b_tt, tl.exp(b_lt - _row_logsumexp(b_lt)[:, None])


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _shuffled_targets_kernel(
    p_t,  # [B, Dt] teacher rows, raw (NORM_T) or normalised and weighted, row stride s_t
    p_q,  # [B, BB] fp32 out: the shuffled targets q~ of the block's rows, 0 off the valid entries
    p_scratch,  # [5, R, BB] fp32 (R = B rounded up to BR): blocks whose columns the loops read back
    p_seed,  # [1] int64: the random shuffle's key (SEED_PTR), else unread
    B, Dt, s_t, R, teacher_scale, grouping_scale, group_p, group_size, n_groups, seed_lo, seed_hi,
    BR: tl.constexpr, BB: tl.constexpr, BDT: tl.constexpr, TARGETS: tl.constexpr, FIXED_SIZE: tl.constexpr,
    NORM_T: tl.constexpr, PREC_T: tl.constexpr, BITS: tl.constexpr, SEED_PTR: tl.constexpr,
):
    """BR rows a program: their teacher logits against every column, q, the Group-P groups and
    the expected (TARGETS 1) or random (2) targets. Each row's work is its own (O(B^2) of the
    O(B^3) group measure and ranks), so the rows spread over a few SMs; the loops over the
    columns read them back from the program's scratch rows (``_spill``, ``_column``)."""
    o_row = tl.program_id(0) * BR + tl.arange(0, BR)
    p_rows = p_scratch + o_row * BB  # [BR] the rows' starts in each scratch plane
    plane = R * BB
    o_col = tl.arange(0, BB)
    m_row = o_row < B
    m_col = o_col < B
    m_in = m_row[:, None] & m_col[None, :] & (o_row[:, None] != o_col[None, :])
    b_tt, b_qt = _teacher_targets(p_t, o_row, m_row, o_col, m_col, m_in, s_t, Dt, teacher_scale, BDT, NORM_T, PREC_T,
                                  PIPELINED_STAGES)
    b_t = tl.where(m_in, b_tt, float("-inf"))
    if FIXED_SIZE:
        b_f = _group_measure(b_t, m_in.to(tl.float32), p_rows, p_rows + plane, o_col, B)
        b_grp = ((b_f - 1.0) / group_size).to(tl.int32)
    else:
        b_lg = tl.where(m_in, b_tt * grouping_scale, float("-inf"))
        b_pi = tl.exp(b_lg - _row_logsumexp(b_lg)[:, None])
        b_f = _group_measure(b_t, b_pi, p_rows, p_rows + plane, o_col, B)
        b_grp = tl.floor(b_f / group_p).to(tl.int32)
    b_grp = tl.where(m_in, tl.minimum(b_grp, n_groups - 1), -1)
    if TARGETS == 1:
        b_mean = tl.zeros([BR, BB], dtype=tl.float32)
        for g in range(0, n_groups):
            m_g = b_grp == g
            b_sum = tl.sum(tl.where(m_g, b_qt, 0.0), axis=1)
            b_cnt = tl.sum(m_g.to(tl.float32), axis=1)
            b_mean = tl.where(m_g, (b_sum / tl.maximum(b_cnt, 1.0))[:, None], b_mean)
        b_qt = b_mean
    else:
        b_lo, b_hi = _seed_halves(p_seed, seed_lo, seed_hi, SEED_PTR)
        b_qt = _random_targets(b_qt, b_grp, o_row, o_col, B, p_rows + 2 * plane, p_rows + 3 * plane,
                               p_rows + 4 * plane, b_lo, b_hi, BITS)
    tl.store(p_q + o_row[:, None] * BB + o_col[None, :], tl.where(m_in, b_qt, 0.0), mask=m_row[:, None])


@triton.jit
def _small_batch_kernel(
    p_x,  # [B, D] view-1 rows z1, raw, row stride s_x
    p_y,  # [N, D] contrastive columns (z2, then hard negatives), raw, row stride s_y
    p_t,  # [B, Dt] teacher rows, raw (NORM_T) or normalised and weighted, row stride s_t (unshuffled targets)
    p_q,  # [B, BB] fp32: the shuffled targets (SHUFFLED, _shuffled_targets_kernel), else unread
    p_loss,  # [] fp32 out: w_cl L_cl + w_kd L_kd
    p_terms,  # [2] fp32 out: L_cl, L_kd
    p_dx,  # [B, D] out in x's dtype: d(loss)/dz1 (WRITE_GRAD)
    p_dy,  # [N, D] out in y's dtype: d(loss)/dy (WRITE_GRAD)
    B, N, D, Dt, s_x, s_y, s_t, s_dx, s_dy, cl_scale, student_scale, teacher_scale, w_cl, w_kd,
    BB: tl.constexpr, BY: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr, BD_GRAD: tl.constexpr,
    CONTRASTIVE: tl.constexpr, DISTILL: tl.constexpr, SHUFFLED: tl.constexpr, NORM_T: tl.constexpr,
    WRITE_GRAD: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr, PREC_GRAD: tl.constexpr,
):
    o_row = tl.arange(0, BB)
    o_col = tl.arange(0, BB)
    o_y = tl.arange(0, BY)
    m_row = o_row < B
    m_y = o_y < N

    # The distillation's targets first, while nothing else is live: q from the teacher's
    # logits, or the shuffled ones from _shuffled_targets_kernel.
    if DISTILL:
        m_in = m_row[:, None] & m_row[None, :] & (o_row[:, None] != o_col[None, :])
        if SHUFFLED:
            b_qt = tl.load(p_q + o_row[:, None] * BB + o_col[None, :], mask=m_in, other=0.0)
        else:
            _, b_qt = _teacher_targets(p_t, o_row, m_row, o_col, m_row, m_in, s_t, Dt, teacher_scale, BDT, NORM_T,
                                       PREC_T, 1)  # unpipelined (the note below MAX_COLUMNS)

    # One pass over the features: z1 z1^T, z1 y^T and the squared norms.
    b_xx = tl.zeros([BB, BB], dtype=tl.float32)
    b_xy = tl.zeros([BB, BY], dtype=tl.float32)
    b_nx = tl.zeros([BB], dtype=tl.float32)
    b_ny = tl.zeros([BY], dtype=tl.float32)
    for i_d in tl.range(0, tl.cdiv(D, BD), num_stages=1):  # unpipelined (the note below MAX_COLUMNS)
        o_d = i_d * BD + tl.arange(0, BD)
        m_d = o_d < D
        b_x = _rows_tile(p_x, o_row, m_row, s_x, o_d, m_d)  # [BB, BD]
        b_nx += tl.sum(b_x.to(tl.float32) * b_x.to(tl.float32), axis=1)
        if DISTILL:
            b_xx = tl.dot(b_x, tl.trans(b_x), b_xx, input_precision=PREC)  # [BB, BD] @ [BD, BB]
        if CONTRASTIVE:
            b_yd = _rows_tile(p_y, o_y, m_y, s_y, o_d, m_d)  # [BY, BD]
            b_ny += tl.sum(b_yd.to(tl.float32) * b_yd.to(tl.float32), axis=1)
            b_xy = tl.dot(b_x, tl.trans(b_yd), b_xy, input_precision=PREC)  # [BB, BD] @ [BD, BY]
    b_rx = tl.where(m_row, 1.0 / tl.maximum(tl.sqrt(b_nx), 1e-8), 0.0)
    b_ry = tl.where(m_y, 1.0 / tl.maximum(tl.sqrt(b_ny), 1e-8), 0.0)

    # The contrastive term (its logits die here), then the distillation term. With
    # WRITE_GRAD each leaves its gradient factors, 1 / B and the inverse norms folded in:
    # dx = Wx @ x + Wc @ y - coef_x x and dy = Wc^T @ x - coef_y y (module docstring).
    b_cl_rows = tl.zeros([BB], dtype=tl.float32)
    b_kd_rows = tl.zeros([BB], dtype=tl.float32)
    b_coef_x = tl.zeros([BB], dtype=tl.float32)  # u1 . du1 (times rx^2 below)
    if CONTRASTIVE:
        b_c = b_xy * b_rx[:, None] * b_ry[None, :]  # cosines c [BB, BY]
        m_c = m_row[:, None] & m_y[None, :]
        m_pos = o_row[:, None] == o_y[None, :]
        b_lc = tl.where(m_c, b_c * cl_scale, float("-inf"))
        b_max = tl.where(m_row, tl.max(b_lc, axis=1), 0.0)
        b_e = tl.exp(b_lc - b_max[:, None])  # [BB, BY], 0 off the valid entries
        b_e_pos = tl.sum(tl.where(m_pos, b_e, 0.0), axis=1)  # e_ii
        b_e = tl.where(m_pos, 0.0, b_e)
        b_off = tl.sum(b_e, axis=1)  # l_i = sum_{j != i} e_ij
        b_total = tl.where(m_row, b_off + b_e_pos, 1.0)
        b_pos = tl.sum(tl.where(m_pos & m_c, b_lc, 0.0), axis=1)
        # -log P_ii as in contrastive.py: log1p(l_i / e_ii) while P_ii > 1/2, else (max - positive) + log L_i
        b_ratio = tl.minimum(b_off / tl.where(b_e_pos > 0, b_e_pos, 1.0), 1.0)  # no 0 / 0 on padding rows
        b_cl = tl.where(b_off < b_e_pos, log1p_unit(b_ratio), (b_max - b_pos) + tl.log(b_total))
        b_cl_rows = tl.where(m_row, b_cl, 0.0)
        if WRITE_GRAD:
            # P - [i == j], the diagonal's P_ii - 1 = -l_i / L_i without cancellation
            b_C = tl.where(m_pos, -b_off[:, None], b_e) / b_total[:, None]
            b_C = (w_cl * cl_scale / B) * b_C  # [BB, BY]
            b_coef_x += tl.sum(b_C * b_c, axis=1)
            b_coef_y = tl.where(b_ny >= EPS_SQUARED, tl.sum(b_C * b_c, axis=0) * b_ry * b_ry, 0.0)  # [BY]
            b_Wc = b_C * b_rx[:, None] * b_ry[None, :]
    if DISTILL:
        b_s = b_xx * b_rx[:, None] * b_rx[None, :]  # cosines s [BB, BB]
        b_ls = tl.where(m_in, b_s * student_scale, float("-inf"))
        b_lse_s = _row_logsumexp(b_ls)
        # -log p_ij = lse_i - l_ij (+inf off the valid entries), and the loss row sum_j q_ij (lse_i - l_ij):
        # each difference before the sum (lse - sum_j q_ij l_ij lost ~7 ulps of 40)
        b_nlp = b_lse_s[:, None] - b_ls
        b_kd_rows = tl.sum(b_qt * tl.where(m_in, b_nlp, 0.0), axis=1)  # (no 0 * inf)
        if WRITE_GRAD:
            b_G = student_scale * (tl.exp(-b_nlp) - b_qt)  # 0 off the valid entries
            b_A = (w_kd / B) * (b_G + tl.trans(b_G))  # [BB, BB]
            b_coef_x += tl.sum(b_A * b_s, axis=1)
            b_Wx = b_A * b_rx[:, None] * b_rx[None, :]
    b_cl_mean = tl.sum(b_cl_rows, axis=0) / B
    b_kd_mean = tl.sum(b_kd_rows, axis=0) / B
    tl.store(p_loss, w_cl * b_cl_mean + w_kd * b_kd_mean)
    tl.store(p_terms, b_cl_mean)
    tl.store(p_terms + 1, b_kd_mean)
    if WRITE_GRAD:
        b_coef_x = tl.where(b_nx >= EPS_SQUARED, b_coef_x * b_rx * b_rx, 0.0)  # no projection under eps
        for i_d in range(0, tl.cdiv(D, BD_GRAD)):
            o_d = i_d * BD_GRAD + tl.arange(0, BD_GRAD)
            m_d = o_d < D
            b_x = _rows_tile(p_x, o_row, m_row, s_x, o_d, m_d).to(tl.float32)  # [BB, BD_GRAD]
            b_dx = -b_coef_x[:, None] * b_x
            if DISTILL:
                b_dx = tl.dot(b_Wx, b_x, b_dx, input_precision=PREC_GRAD)  # [BB, BB] @ [BB, BD_GRAD]
            if CONTRASTIVE:
                b_yd = _rows_tile(p_y, o_y, m_y, s_y, o_d, m_d).to(tl.float32)  # [BY, BD_GRAD]
                b_dx = tl.dot(b_Wc, b_yd, b_dx, input_precision=PREC_GRAD)  # [BB, BY] @ [BY, BD_GRAD]
                b_dy = tl.dot(tl.trans(b_Wc), b_x, -b_coef_y[:, None] * b_yd, input_precision=PREC_GRAD)  # [BY, BB] @ [BB, BD_GRAD]
                tl.store(p_dy + o_y[:, None] * s_dy + o_d[None, :], b_dy.to(p_dy.dtype.element_ty),
                         mask=m_y[:, None] & m_d[None, :])
            tl.store(p_dx + o_row[:, None] * s_dx + o_d[None, :], b_dx.to(p_dx.dtype.element_ty),
                     mask=m_row[:, None] & m_d[None, :])

def fits(B: int, N: int = 0) -> bool:
    """Whether a batch of B rows (and N contrastive columns) takes this path (its loss in one program)."""
    return 2 <= B <= MAX_ROWS and N <= MAX_COLUMNS


def small_batch_loss(x, y, t, *, cl_scale=1.0, student_scale=1.0, teacher_scale=1.0, grouping_scale=1.0,
                     group_p=0.1, group_size=None, n_groups=1, shuffle="none", step_seed=None,
                     w_cl=1.0, w_kd=1.0, normalize_teacher=True, need_grad=False):
    """``(loss, terms, dx, dy)``: ``loss`` [] fp32 ``w_cl L_cl + w_kd L_kd``, ``terms`` [2] fp32
    (``L_cl``, ``L_kd``; a missing term is 0; separate tensors, so that the loss is no view) and,
    with ``need_grad``, the loss's gradients ``dx`` [B, D] and ``dy`` [N, D] in x's dtype (else None).

    x [B, D] z1 (the student); y [N, D] the contrastive columns or None (no contrastive term);
    t [B, Dt] teacher rows (raw with ``normalize_teacher``, else normalised and weighted) or
    None (no distillation term). ``n_groups`` G from ``group_partition.num_groups``;
    ``step_seed`` the 64-bit key of a random shuffle (an int, or a [1] int64 tensor on x's device,
    ``utils.seed_args``). Needs ``fits(B, N)``.
    """
    B, D = x.shape
    N = 0 if y is None else y.shape[0]
    assert fits(B, N), f"the one-program path takes 2 <= B <= {MAX_ROWS} and N <= {MAX_COLUMNS}"
    contrastive, distill = y is not None, t is not None
    x = unit_stride_rows(x)
    y = unit_stride_rows(y) if contrastive else x
    t = unit_stride_rows(t) if distill else x
    assert y.shape[1] == D and y.dtype == x.dtype and t.shape[0] == B
    prec, prec_t = dot_precision(x.dtype), dot_precision(t.dtype)
    BB = max(16, next_pow2(B))
    # feature chunks: 64, or 16 where fp32 "ieee" dots run on the FMA units, whose register-
    # hungry layouts spill KBs at 64 (offline sm_90a compile, benchmarks/compile_sm90.py)
    fma_x = prec == "ieee" and x.dtype == torch.float32
    fma_t = prec_t == "ieee" and t.dtype == torch.float32
    BDT = min(16 if fma_t else 64, next_pow2(max(t.shape[1], 16)))
    shuffled = distill and shuffle != "none"
    q = x  # unread without a shuffle
    if shuffled:
        q = torch.empty((B, BB), device=x.device, dtype=torch.float32)
        R = cdiv(B, TARGET_ROWS) * TARGET_ROWS
        scratch = torch.empty((5, R, BB), device=x.device, dtype=torch.float32)
        p_seed, seed_lo, seed_hi, seed_ptr = seed_args(0 if step_seed is None else step_seed, x)
        _shuffled_targets_kernel[(cdiv(B, TARGET_ROWS),)](
            t, q, scratch, p_seed, B, t.shape[1], t.stride(0), R, float(teacher_scale), float(grouping_scale),
            float(1.0 if group_size is not None else group_p), float(group_size or 1), int(n_groups), seed_lo, seed_hi,
            BR=TARGET_ROWS, BB=BB, BDT=BDT, TARGETS=SHUFFLES.index(shuffle), FIXED_SIZE=group_size is not None,
            NORM_T=normalize_teacher, PREC_T=prec_t, BITS=BB.bit_length(), SEED_PTR=seed_ptr, num_warps=8)
    meta = dict(
        BB=BB, BY=max(16, next_pow2(max(N, 1))),
        BD=min(16 if fma_x else 64, next_pow2(max(D, 16))), BDT=BDT,
        BD_GRAD=min(16 if fma_x else 64, next_pow2(max(D, 16))),
        CONTRASTIVE=contrastive, DISTILL=distill, SHUFFLED=shuffled, NORM_T=normalize_teacher, WRITE_GRAD=need_grad,
        PREC=prec, PREC_T=prec_t, PREC_GRAD=prec if x.dtype == torch.float32 else "tf32", num_warps=8,
    )
    loss = torch.empty((), device=x.device, dtype=torch.float32)
    terms = torch.empty(2, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_grad else None
    dy = torch.empty_like(y) if need_grad and contrastive else None
    _small_batch_kernel[(1,)](
        x, y, t, q, loss, terms, x if dx is None else dx, x if dy is None else dy, B, N, D, t.shape[1],
        x.stride(0), y.stride(0), t.stride(0), D if dx is None else dx.stride(0), D if dy is None else dy.stride(0),
        float(cl_scale), float(student_scale), float(teacher_scale), float(w_cl), float(w_kd), **meta)
    return loss, terms, dx, dy

