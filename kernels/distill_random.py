"""Distillation term with ``shuffle="random"`` (SPEC section 5), loss and gradient in one
forward, over row slabs: extra memory O(R x B) for a slab of R rows (the settable budget),
never B x B, and no sort.

The shuffle is the one ``distillcse.shuffle`` defines: row i's column j takes the target of
the member of its group whose column-order rank is ``sigma(rank_i(j))``, ``sigma`` a keyed
Feistel permutation with cycle walking (``_group_permutation`` here is the same arithmetic in
uint32). Its ranks need every earlier column of the row, so each slab runs three streaming
kernels over a (row block, column chunk) grid, each recomputing the teacher tiles:
  1. ``_group_counts_kernel``: ``counts[r, c, g]``, members of group g among chunk c's columns.
  2. ``_compact_targets_kernel``: ``compact[r, starts[r, g] + rank] = q_rj``, the targets in
     group order (column order within a group); a chunk starts from the prefix sums of 1.
  3. ``_shuffled_grad_kernel``: ``q~_rj = compact[r, starts + sigma(rank)]``, the loss's cross
     term ``sum_j q~_rj s_rj`` per chunk, and ``G_rj = student_scale (p_rj - q~_rj)`` into a
     [R, B] slab; then ``du[slab] += G u`` and ``du += G^T u[slab]`` are two GEMMs.
The loss and the gradient are both computed here, as the shuffle's cost is paid once per
step: the backward only scales ``du`` by the incoming gradient (the loss is linear in it).
"""
import os

import torch
import triton
import triton.language as tl

from ..shuffle import feistel_shape, group_keys
from .tiles import dot_tile
from .utils import dot_precision, unit_stride_rows

_GOLDEN = tl.constexpr(0x9E3779B1)


@triton.jit
def _mix32(x):
    """The 32-bit finaliser of ``distillcse.shuffle._mix32`` on uint32 (multiplies wrap)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


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
def _teacher_groups(
    p_t, p_thr, s_t, s_thr, o_m, m_m, o_n, m_n, Dt, n_thr,
    BDT: tl.constexpr, PREC_T: tl.constexpr,
):
    """Teacher logits t [BM, BN] fp32 and group ids [BM, BN] int32 (-1 off the off-diagonal
    in-range entries): ``group = #{g : t < thr[row, g]}``, as the expected mode classifies."""
    b_t = dot_tile(p_t, p_t, o_m, m_m, o_n, m_n, Dt, s_t, s_t, BDT, PREC_T)  # [BM, BN]
    b_grp = tl.zeros(b_t.shape, dtype=tl.int32)
    for i_g in range(0, n_thr):
        b_thr = tl.load(p_thr + o_m * s_thr + i_g, mask=m_m, other=float("-inf"))  # [BM]
        b_grp += (b_t < b_thr[:, None]).to(tl.int32)
    m_valid = (o_m[:, None] != o_n[None, :]) & m_m[:, None] & m_n[None, :]
    return b_t, tl.where(m_valid, b_grp, -1)


@triton.jit
def _compact_positions(b_grp, b_next, n_groups, BG: tl.constexpr):
    """Compact positions [BM, BN] of a tile's members (``b_next`` [BM, BG]: the next free
    position of each group, advanced past this tile and returned). -1 for non-members."""
    o_g = tl.arange(0, BG)[None, :]  # [1, BG]
    b_pos = tl.full(b_grp.shape, -1, dtype=tl.int32)
    for g in range(0, n_groups):
        m_g = b_grp == g  # [BM, BN]
        b_at = tl.sum(tl.where(o_g == g, b_next, 0), axis=1)  # [BM] next position of group g
        b_seen = tl.cumsum(m_g.to(tl.int32), axis=1)  # members so far in the tile, inclusive
        b_pos = tl.where(m_g, b_at[:, None] + b_seen - 1, b_pos)
        b_next += tl.where(o_g == g, tl.sum(m_g.to(tl.int32), axis=1)[:, None], 0)
    return b_pos, b_next


@triton.jit
def _group_counts_kernel(
    p_t,  # [B, Dt] teacher rows (normalised, weighted)
    p_thr,  # [B, G-1] fp32 group thresholds
    p_counts,  # [R, C, G] int32 out: members of group g in chunk c of slab row r
    row0, B, Dt, s_t, s_thr, n_thr, chunk_width, R,
    BM: tl.constexpr, BN: tl.constexpr, BDT: tl.constexpr, BG: tl.constexpr,
    PREC_T: tl.constexpr,
):
    i_m, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(1)
    o_r = i_m * BM + tl.arange(0, BM)  # slab rows
    o_m = row0 + o_r
    m_m = (o_r < R) & (o_m < B)
    o_g = tl.arange(0, BG)[None, :]
    n_groups = n_thr + 1
    b_counts = tl.zeros([BM, BG], dtype=tl.int32)
    col0 = i_c * chunk_width
    for i_n in range(0, tl.cdiv(chunk_width, BN)):
        o_n = col0 + i_n * BN + tl.arange(0, BN).to(tl.int64)
        m_n = (o_n < B) & (o_n < col0 + chunk_width)
        _, b_grp = _teacher_groups(p_t, p_thr, s_t, s_thr, o_m, m_m, o_n, m_n, Dt, n_thr, BDT, PREC_T)
        for g in range(0, n_groups):
            b_counts += tl.where(o_g == g, tl.sum((b_grp == g).to(tl.int32), axis=1)[:, None], 0)
    p_out = p_counts + (o_r[:, None] * n_chunks + i_c) * n_groups + o_g
    tl.store(p_out, b_counts, mask=m_m[:, None] & (o_g < n_groups))


@triton.jit
def _compact_targets_kernel(
    p_t,  # [B, Dt] teacher rows
    p_thr,  # [B, G-1] fp32
    p_lse_t,  # [B] fp32 teacher logsumexps
    p_first,  # [R, C, G] int32: compact position of chunk c's first member of group g
    p_compact,  # [R, B] fp32 out: targets in group order (B-1 used)
    row0, B, Dt, s_t, s_thr, n_thr, chunk_width, R, teacher_scale,
    BM: tl.constexpr, BN: tl.constexpr, BDT: tl.constexpr, BG: tl.constexpr,
    PREC_T: tl.constexpr,
):
    i_m, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(1)
    o_r = i_m * BM + tl.arange(0, BM)
    o_m = row0 + o_r
    m_m = (o_r < R) & (o_m < B)
    o_g = tl.arange(0, BG)[None, :]
    n_groups = n_thr + 1
    b_next = tl.load(p_first + (o_r[:, None] * n_chunks + i_c) * n_groups + o_g,
                     mask=m_m[:, None] & (o_g < n_groups), other=0)  # [BM, BG]
    col0 = i_c * chunk_width
    for i_n in range(0, tl.cdiv(chunk_width, BN)):
        o_n = col0 + i_n * BN + tl.arange(0, BN).to(tl.int64)
        m_n = (o_n < B) & (o_n < col0 + chunk_width)
        b_t, b_grp = _teacher_groups(p_t, p_thr, s_t, s_thr, o_m, m_m, o_n, m_n, Dt, n_thr, BDT, PREC_T)
        b_pos, b_next = _compact_positions(b_grp, b_next, n_groups, BG)
        b_lse_t = tl.load(p_lse_t + o_m, mask=m_m, other=0.0)
        b_q = tl.exp(b_t * teacher_scale - b_lse_t[:, None])  # q_ij [BM, BN]
        tl.store(p_compact + o_r[:, None] * B + b_pos, b_q, mask=b_pos >= 0)


@triton.jit
def _shuffled_grad_kernel(
    p_x,  # [B, D] student rows, raw
    p_rx,  # [B] fp32 inverse norms
    p_t,  # [B, Dt] teacher rows
    p_thr,  # [B, G-1] fp32
    p_lse_s,  # [B] fp32 student logsumexps
    p_first,  # [R, C, G] int32, as in _compact_targets_kernel
    p_compact,  # [R, B] fp32 targets in group order
    p_perm,  # [6, R, G] int32: start, size, h, b, rounds, key (bits) of each group's sigma
    p_cross,  # [R, C] fp32 out: sum over chunk c of q~_rj s_rj
    p_grad,  # [R, B] out (G's dtype): student_scale (p_rj - q~_rj), 0 on the diagonal
    row0, B, D, Dt, s_x, s_t, s_thr, n_thr, chunk_width, R, student_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDT: tl.constexpr,
    BG: tl.constexpr, PREC_X: tl.constexpr, PREC_T: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    i_m, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(1)
    o_r = i_m * BM + tl.arange(0, BM)
    o_m = row0 + o_r
    m_m = (o_r < R) & (o_m < B)
    o_g = tl.arange(0, BG)[None, :]
    n_groups = n_thr + 1
    b_next = tl.load(p_first + (o_r[:, None] * n_chunks + i_c) * n_groups + o_g,
                     mask=m_m[:, None] & (o_g < n_groups), other=0)  # [BM, BG]
    b_lse_s = tl.load(p_lse_s + o_m, mask=m_m, other=0.0)
    b_rx_m = tl.load(p_rx + o_m, mask=m_m, other=0.0)
    s_perm = R * n_groups  # stride between the tables of p_perm
    b_cross = tl.zeros([BM], dtype=tl.float32)
    col0 = i_c * chunk_width
    for i_n in range(0, tl.cdiv(chunk_width, BN)):
        o_n = col0 + i_n * BN + tl.arange(0, BN).to(tl.int64)
        m_n = (o_n < B) & (o_n < col0 + chunk_width)
        _, b_grp = _teacher_groups(p_t, p_thr, s_t, s_thr, o_m, m_m, o_n, m_n, Dt, n_thr, BDT, PREC_T)
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
        b_qt = tl.load(p_compact + o_r[:, None] * B + b_partner, mask=m_in, other=0.0)  # q~ [BM, BN]

        b_s = dot_tile(p_x, p_x, o_m, m_m, o_n, m_n, D, s_x, s_x, BD, PREC_X)
        b_s = b_s * b_rx_m[:, None] * tl.load(p_rx + o_n, mask=m_n, other=0.0)[None, :]  # cosines
        b_p = tl.exp(b_s * student_scale - b_lse_s[:, None])
        b_cross += tl.sum(tl.where(m_in, b_qt * b_s, 0.0), axis=1)
        if WRITE_GRAD:
            b_g = tl.where(m_in, student_scale * (b_p - b_qt), 0.0)
            tl.store(p_grad + o_r[:, None] * B + o_n[None, :], b_g.to(p_grad.dtype.element_ty),
                     mask=m_m[:, None] & m_n[None, :])
    tl.store(p_cross + o_r * n_chunks + i_c, b_cross, mask=m_m)


def _blocks(B: int):
    """(blocks of the count and compaction kernels, blocks of the gradient kernel). Compiled
    offline for sm_90 (bf16, D = 768; ``benchmarks/compile_sm90.py --what distill_random``):
    64 x 64 tiles with 8 warps use wgmma without spills in the first two (124 and 226
    registers) but spill 140 bytes in the gradient kernel, which also holds the permutation's
    state; there 32 x 64 tiles compile without spills (238 registers, mma.sync). Column tiles
    must divide the chunk width (powers of two). Under the interpreter few large blocks run
    fastest."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        bm = min(64, max(16, triton.next_power_of_2(B)))
        blocks = dict(BM=bm, BN=bm, BDT=64, num_warps=4)
        return blocks, dict(blocks, BD=64)
    return dict(BM=64, BN=64, BDT=64, num_warps=8), dict(BM=32, BN=64, BD=64, BDT=64, num_warps=8)


def slab_rows(B: int, budget_bytes: int, grad_bytes: int, BM: int) -> int:
    """Rows per slab: the [R, B] targets (fp32) and gradient factors fit ``budget_bytes``,
    rounded down to whole row blocks (at least one)."""
    per_row = B * (4 + grad_bytes)
    return max(BM, min(B, budget_bytes // per_row) // BM * BM)


def _matmul_f32(a, b):
    """``a @ b`` accumulated and returned in fp32 (a, b in one dtype)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _permutation_tables(counts, rows, step_seed):
    """From the chunk counts [R, C, G] int32: ``first`` [R, C, G] (compact position of each
    chunk's first member of each group) and ``perm`` [6, R, G] int32, the parameters of each
    group's sigma (start, size, h, b, rounds, key bits)."""
    counts = counts.long()
    sizes = counts.sum(1)  # [R, G]
    starts = sizes.cumsum(-1) - sizes
    first = starts[:, None, :] + counts.cumsum(1) - counts
    h, b, rounds = feistel_shape(sizes)
    groups = torch.arange(sizes.shape[1], device=counts.device)
    keys = group_keys(step_seed, rows.long()[:, None], groups[None, :])
    keys = torch.where(keys >= 2**31, keys - 2**32, keys)  # uint32 bits as int32
    perm = torch.stack([starts, sizes, h, b, rounds, keys]).to(torch.int32)
    return first.to(torch.int32), perm


def distill_random(x, rx, t, lse_s, lse_t, thr, student_scale, teacher_scale, step_seed, *,
                   budget_bytes, need_grad=True, chunks=None):
    """Loss rows [B] fp32 and du [B, D] fp32 (None without ``need_grad``) of the randomly
    shuffled distillation term: ``loss_i = lse_s_i - student_scale sum_{j != i} q~_ij s_ij``
    and ``du = d(sum_i loss_i)/du`` for ``u = x rx``.

    ``x`` [B, D] raw student rows, ``rx`` [B] fp32 inverse norms, ``t`` [B, Dt] teacher rows,
    ``lse_s``, ``lse_t`` [B] fp32 (``distill_row_stats``), ``thr`` [B, G-1] fp32
    (``group_thresholds``), ``step_seed`` the shuffle's 64-bit seed. Rows go in slabs whose
    [R, B] buffers fit ``budget_bytes``; ``chunks`` (column chunks per slab row) defaults to
    enough programs to fill the GPU.
    """
    x, t = unit_stride_rows(x), unit_stride_rows(t)
    rx, lse_s, lse_t = rx.contiguous(), lse_s.float().contiguous(), lse_t.float().contiguous()
    thr = unit_stride_rows(thr.float())
    B, D = x.shape
    n_thr = thr.shape[1]
    G = n_thr + 1
    teacher_blocks, grad_blocks = _blocks(B)
    BM = max(teacher_blocks["BM"], grad_blocks["BM"])
    BN = max(teacher_blocks["BN"], grad_blocks["BN"])
    prec = dict(PREC_X=dot_precision(x.dtype), PREC_T=dot_precision(t.dtype))
    grad_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    R = slab_rows(B, budget_bytes, grad_dtype.itemsize if need_grad else 0, BM)
    if chunks is None:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        chunks = triton.cdiv(programs, triton.cdiv(R, BM))
    chunks = max(1, min(chunks, triton.cdiv(B, BN)))
    chunk_width = triton.cdiv(triton.cdiv(B, chunks), BN) * BN
    chunks = triton.cdiv(B, chunk_width)
    BG = max(2, triton.next_power_of_2(G))

    loss = torch.empty(B, device=x.device, dtype=torch.float32)
    du = torch.zeros(B, D, device=x.device, dtype=torch.float32) if need_grad else None
    u = torch.mul(x, rx[:, None], out=torch.empty_like(x, dtype=grad_dtype)) if need_grad else None
    compact = torch.empty(R, B, device=x.device, dtype=torch.float32)
    grad = torch.empty(R, B, device=x.device, dtype=grad_dtype) if need_grad else compact
    for row0 in range(0, B, R):
        rows = min(R, B - row0)
        teacher_grid = (triton.cdiv(rows, teacher_blocks["BM"]), chunks)
        counts = torch.empty(rows, chunks, G, device=x.device, dtype=torch.int32)
        _group_counts_kernel[teacher_grid](
            t, thr, counts, row0, B, t.shape[1], t.stride(0), thr.stride(0), n_thr, chunk_width, rows,
            BG=BG, PREC_T=prec["PREC_T"], **teacher_blocks)
        first, perm = _permutation_tables(counts, torch.arange(row0, row0 + rows, device=x.device), step_seed)
        _compact_targets_kernel[teacher_grid](
            t, thr, lse_t, first, compact, row0, B, t.shape[1], t.stride(0), thr.stride(0), n_thr,
            chunk_width, rows, float(teacher_scale), BG=BG, PREC_T=prec["PREC_T"], **teacher_blocks)
        cross = torch.empty(rows, chunks, device=x.device, dtype=torch.float32)
        _shuffled_grad_kernel[(triton.cdiv(rows, grad_blocks["BM"]), chunks)](
            x, rx, t, thr, lse_s, first, compact, perm, cross, grad, row0, B, D, t.shape[1], x.stride(0),
            t.stride(0), thr.stride(0), n_thr, chunk_width, rows, float(student_scale),
            BG=BG, WRITE_GRAD=need_grad, **prec, **grad_blocks)
        loss[row0:row0 + rows] = lse_s[row0:row0 + rows] - student_scale * cross.sum(1)
        if need_grad:
            g = grad[:rows]
            du[row0:row0 + rows] += _matmul_f32(g, u)
            du += _matmul_f32(g.T, u[row0:row0 + rows])
    return loss, du
