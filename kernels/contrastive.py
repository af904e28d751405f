"""InfoNCE contrastive term (SPEC section 1), forward and backward, never materialising B x N.

``c_ij = (x_i . y_j) rx_i ry_j`` for ``i < B``, ``j < N``: rows ``0..B-1`` of ``y`` are the
second view, rows ``B..N-1`` hard negatives. With ``scale = 1 / temperature``:
  forward   ``lse_i = logsumexp_j(scale c_ij)``, ``loss_i = lse_i - scale c_ii``;
  backward  ``P_ij = exp(scale c_ij - lse_i)`` recomputed tile by tile from the saved ``lse``
            (flash-attention-2 style: a row-block kernel for ``dx``, a column-block kernel
            for ``dy``, no atomics), each program holding up to 4 output blocks of features
            (cost and register budget in the comment above the backward kernels); the
            gradients are written w.r.t. the raw rows, the normalisation's backward fused.
"""

import torch
import triton
import triton.language as tl

from . import utils
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


# Backward: cost in GEMM-equivalents (1 = one B x N x D product, 2 B N D flops; counted, not
# timed: no GPU was available). A backward kernel recomputes its [BM, BN] logits tiles over
# the full D (1) and multiplies dS by the unit rows (1). A program keeps N_OUT <= 4 fp32
# accumulators of [64, BD_OUT] in registers, so the D output features are split over grid axis
# 1 in S = ceil(D / (N_OUT BD_OUT)) chunks, and each split recomputes the logits: a kernel costs
# S + W / D, W = S N_OUT BD_OUT the padded feature count, and the loss 1 (forward) + 2 (S + W / D).
#                                                  D = 768              D = 384             D = 1024
#   before: one [64, 128] accumulator (BD_OUT = BD)  1 + 2 (6 + 1) = 15   1 + 2 (3 + 1) = 9   1 + 2 (8 + 1) = 19
#   now, bf16 / fp16 (up to 4 x 128)               1 + 2 (2 + 1) = 7    1 + 2 (1 + 1) = 5   1 + 2 (2 + 1) = 7
#   now, fp32 with TF32 dots (up to 3 x 128)       7                    5                   1 + 2 (3 + 1.125) = 9.25
#   now, fp32 with "ieee" dots (FMA, 1 x 128)      15, as before        9, as before        19, as before
# Registers bound N_OUT (measured by compiling offline for sm_90a, benchmarks/compile_sm90.py):
# 3 or 4 accumulators of [64, 128] take 242-255 registers per thread at 8 warps without
# spilling, while one [64, 512] accumulator spills, 16 warps spill, and one split for all of
# D = 768 would need [64, 768] fp32 = 48K of an SM's 64K registers. Fewer splits also mean
# fewer programs: at D = 768 a kernel launches 2 B / 64 of them (6 B / 64 before), so batches
# under ~4096 rows no longer fill an H100's 132 SMs (predicted to cost little: such batches
# are small). No atomics: each program owns its output rows and features, so results are
# deterministic.
# The normalisation's backward, dL/dx = r (du - u (u . du)), is fused into the stores: u . du
# is a per-row sum of (P - [i == j]) s over the tiles each program already streams, so the
# kernels write the gradients w.r.t. the raw rows in their dtype and no fp32 [B, D] buffer
# exists (2 x 192 MiB at B = 65,536, D = 768). Offline sm_90 compile: no spills in bf16 / fp16
# and in the du_x kernel; the du_y kernel's column sum of that product spills with fp32 dots
# (TF32 44 B, "ieee" 1.8 KB; bf16 none): a GPU tuning item.


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
    block of a backward kernel, BR the program's output rows, BS the rows it streams.
    (Transposing b_w here, after the load, keeps the fp32 FMA build of du_y from spilling.)"""
    p_v = v + o_s[:, None] * s_v + o_d[None, :]  # [BS, BD_OUT]
    b_v = tl.load(p_v, mask=m_s[:, None] & (o_d < D)[None, :], other=0.0)
    b_u = (b_v.to(tl.float32) * b_r[:, None]).to(b_v.dtype)  # |u| <= 1
    b_w = b_w.to(b_v.dtype)
    if TRANS_W:
        b_w = tl.trans(b_w)
    return tl.dot(b_w, b_u, b_acc, input_precision=PRECISION)  # [BR, BS] @ [BS, BD_OUT] -> [BR, BD_OUT]


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
    b_v = tl.load(v + o_r[:, None] * s_v + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    b_u = b_v * b_r[:, None]
    b_dv = (b_r * b_coef)[:, None] * (b_acc - b_u * b_radial[:, None])
    p_out = out + o_r[:, None] * s_out + o_d[None, :]
    if ADD:
        b_dv += add_scale * tl.load(p_out, mask=m, other=0.0).to(tl.float32)
    tl.store(p_out, b_dv.to(out.dtype.element_ty), mask=m)


@triton.jit
def _contrastive_bwd_dx_kernel(
    x,  # [B, D] any float dtype, row stride s_x
    rx,  # [B] fp32
    y,  # [N, D] same dtype as x, row stride s_y
    ry,  # [N] fp32
    lse,  # [B] fp32, from the forward
    g,  # [B] fp32 dL/dloss_i
    dx,  # [B, D] out in x's dtype, row stride s_dx (with ADD also in: a gradient to add)
    p_add_scale,  # [1] fp32: the factor of dx's incoming values (ADD)
    B, N, D, s_x, s_y, s_dx, scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BD_OUT: tl.constexpr, N_OUT: tl.constexpr, PRECISION: tl.constexpr, ADD: tl.constexpr,
):
    """dL/dx_i through u_x = x rx, from du_x_i = scale g_i sum_j (P_ij - [i == j]) u_y_j, for BM
    rows (grid axis 0) and the N_OUT BD_OUT output features of split i_d (grid axis 1); columns
    streamed BN at a time. u_x_i . du_x_i = g_i sum_j (P_ij - [i == j]) s_ij, s = scale c.
    With ADD, dx's incoming values times ``p_add_scale`` are added (another term's gradient)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < B
    o_d = i_d * (N_OUT * BD_OUT) + tl.arange(0, BD_OUT)  # [BD_OUT] features of accumulator 0; accumulator k: + k BD_OUT
    b_lse = tl.load(lse + o_m, mask=m_m, other=0.0)

    b_radial = tl.zeros([BM], dtype=tl.float32)  # sum_j (P_ij - [i == j]) s_ij
    b_acc0 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
    if N_OUT > 1:
        b_acc1 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
    if N_OUT > 2:
        b_acc2 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
    if N_OUT > 3:
        b_acc3 = tl.zeros([BM, BD_OUT], dtype=tl.float32)
    for i_n in range(0, N, BN):
        o_n = i_n + tl.arange(0, BN).to(tl.int64)
        m_n = o_n < N
        b_s = _logits_tile(x, rx, y, ry, o_m, m_m, o_n, m_n, D, s_x, s_y, scale, BD, PRECISION)  # [BM, BN]
        b_p = tl.exp(b_s - b_lse[:, None])
        b_p = tl.where(m_n[None, :], b_p, 0.0)
        b_ds = b_p - tl.where(o_m[:, None] == o_n[None, :], 1.0, 0.0)  # [BM, BN] in [-1, 1]
        b_radial += tl.sum(b_ds * b_s, axis=1)  # masked columns have b_ds = 0
        b_ry = tl.load(ry + o_n, mask=m_n, other=0.0)
        b_acc0 = _accumulate_rows(b_acc0, b_ds, y, b_ry, o_n, m_n, o_d, D, s_y, False, PRECISION)
        if N_OUT > 1:
            b_acc1 = _accumulate_rows(b_acc1, b_ds, y, b_ry, o_n, m_n, o_d + BD_OUT, D, s_y, False, PRECISION)
        if N_OUT > 2:
            b_acc2 = _accumulate_rows(b_acc2, b_ds, y, b_ry, o_n, m_n, o_d + 2 * BD_OUT, D, s_y, False, PRECISION)
        if N_OUT > 3:
            b_acc3 = _accumulate_rows(b_acc3, b_ds, y, b_ry, o_n, m_n, o_d + 3 * BD_OUT, D, s_y, False, PRECISION)

    b_coef = scale * tl.load(g + o_m, mask=m_m, other=0.0)  # du_x = b_coef acc
    b_rx = tl.load(rx + o_m, mask=m_m, other=0.0)
    b_radial = b_radial / scale  # (u . du) / b_coef
    add_scale = tl.load(p_add_scale) if ADD else 0.0
    _store_grad_rows(dx, b_acc0, x, b_rx, b_coef, b_radial, o_m, m_m, o_d, D, s_x, s_dx, add_scale, ADD)
    if N_OUT > 1:
        _store_grad_rows(dx, b_acc1, x, b_rx, b_coef, b_radial, o_m, m_m, o_d + BD_OUT, D, s_x, s_dx, add_scale, ADD)
    if N_OUT > 2:
        _store_grad_rows(dx, b_acc2, x, b_rx, b_coef, b_radial, o_m, m_m, o_d + 2 * BD_OUT, D, s_x, s_dx, add_scale, ADD)
    if N_OUT > 3:
        _store_grad_rows(dx, b_acc3, x, b_rx, b_coef, b_radial, o_m, m_m, o_d + 3 * BD_OUT, D, s_x, s_dx, add_scale, ADD)


@triton.jit
def _contrastive_bwd_dy_kernel(
    x,  # [B, D] any float dtype, row stride s_x
    rx,  # [B] fp32
    y,  # [N, D] same dtype as x, row stride s_y
    ry,  # [N] fp32
    lse,  # [B] fp32, from the forward
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
        b_lse = tl.load(lse + o_m, mask=m_m, other=0.0)
        b_g = tl.load(g + o_m, mask=m_m, other=0.0)
        b_p = tl.exp(b_s - b_lse[:, None])
        b_p = tl.where(m_m[:, None], b_p, 0.0)
        b_ds = b_p - tl.where(o_m[:, None] == o_n[None, :], 1.0, 0.0)  # [BM, BN]
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


MAX_OUT_BLOCKS = 4  # accumulators per backward program (the kernels hold b_acc0..b_acc3)


def _output_blocks(D: int, max_block: int, max_blocks: int) -> dict:
    """BD_OUT and N_OUT of a backward program: the fewest feature splits that ``max_blocks``
    accumulators of ``BD_OUT`` features allow, then the fewest accumulators that cover D in that
    many splits (D = 768, blocks of 128: 2 splits of 3 blocks, not 2 of 4)."""
    BD_OUT = min(max_block, triton.next_power_of_2(max(D, 16)))  # tl.dot needs >= 16
    blocks = triton.cdiv(D, BD_OUT)
    splits = triton.cdiv(blocks, max_blocks)
    return dict(BD_OUT=BD_OUT, N_OUT=triton.cdiv(blocks, splits))


def _feature_splits(D: int, cfg: dict) -> int:
    """Grid axis 1 of a backward kernel: chunks of N_OUT BD_OUT output features."""
    return triton.cdiv(D, cfg["N_OUT"] * cfg["BD_OUT"])


def _config(D: int, dtype: torch.dtype) -> dict:
    """Launch keywords of the three kernels: ``{"fwd": ..., "dx": ..., "dy": ...}``.

    All three share the logits tile (BM x BN, here 64 x 64) and its K-chunk BD, so that the
    backward recomputes every logit exactly as the forward summed it (P_ii - 1 is
    ill-conditioned otherwise). BD must be shared; under the interpreter the tile shape too
    (numpy's matmul rounding depends on it, measured). On a GPU wgmma and FMA dots sum each
    logit over K in order, so the tile shape should not matter there: a tuned forward tile may
    differ from the backward's once the GPU tests pass with it (unchecked so far).
    The backward adds its output blocks (``_output_blocks``).

    GPU: BD = 128 (at most D), 8 warps, 3 pipeline stages for 2-byte inputs and 2 for 4-byte
    ones (at most 128 KiB of shared memory). Output blocks of 128, as many per program as
    compile without spilling for sm_90a (benchmarks/compile_sm90.py; not timed): 4 for bf16 /
    fp16 (255 registers), 3 for fp32 with TF32 dots (4 spill), and 1 for fp32 with "ieee" dots
    (PyTorch's default "highest" matmul precision), which run on the FMA units with register-
    hungrier layouts. All but "ieee" use wgmma. Rows whose stride is not a multiple of 16
    elements (D = 300, say) load element by element and spill a little in every design, the
    previous one included: not tuned, as embedding widths are multiples of 64.
    Interpreter: every block op costs Python time, so the logits tiles are large (BD up to 256),
    while the output blocks are 32 wide so that the test shapes take 1..4 blocks and several splits.
    """
    BD = triton.next_power_of_2(max(D, 16))
    if utils.interpreter_blocks():
        tile = dict(BM=64, BN=64, BD=min(BD, 256))
        bwd = dict(tile, **_output_blocks(D, 32, MAX_OUT_BLOCKS))
        return dict(fwd=tile, dx=bwd, dy=bwd)
    tile = dict(BM=64, BN=64, BD=min(BD, 128), num_warps=8, num_stages=2 if dtype.itemsize == 4 else 3)
    if dtype.itemsize == 2:  # output blocks per program that compile without spills, as above
        max_blocks = MAX_OUT_BLOCKS
    else:
        max_blocks = 3 if dot_precision(dtype) == "tf32" else 1
    bwd = dict(tile, **_output_blocks(D, 128, max_blocks))
    return dict(fwd=tile, dx=bwd, dy=bwd)


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
    cfg = _config(D, x.dtype)["fwd"]
    _contrastive_fwd_kernel[(triton.cdiv(B, cfg["BM"]),)](
        x, rx, y, ry, loss, lse, B, N, D, x.stride(0), y.stride(0), float(scale),
        PRECISION=dot_precision(x.dtype), **cfg,
    )
    return loss, lse


def contrastive_bwd(x, rx, y, ry, lse, scale, grad_rows, *, add_to=None, add_scale=None):
    """Gradients of L = sum_i grad_rows_i loss_rows_i w.r.t. the raw rows x and y, through
    u_x = x rx and u_y = y ry (rx, ry the inverse norms ``1 / max(|x|, eps)``).

    x [B, D], rx [B], y [N, D], ry [N], lse [B] (from ``contrastive_fwd``), grad_rows [B] fp32;
    returns (dx [B, D], dy [N, D]) in x's dtype, accumulated in fp32. With ``add_to`` (a
    contiguous [B, D] tensor in x's dtype, another term's gradient) and ``add_scale`` (a
    1-element fp32 tensor), dx is ``add_to`` itself, overwritten with dx + add_scale add_to.
    """
    x, rx, y, ry = _check(x, rx, y, ry)
    (B, D), N = x.shape, y.shape[0]
    lse, grad_rows = lse.float().contiguous(), grad_rows.float().contiguous()
    if add_to is None:
        dx, add_scale = torch.empty(B, D, device=x.device, dtype=x.dtype), lse  # unread
    else:
        assert add_to.shape == (B, D) and add_to.dtype == x.dtype and add_to.is_contiguous()
        dx, add_scale = add_to, add_scale.float().reshape(1)
    dy = torch.empty(N, D, device=x.device, dtype=x.dtype)
    cfg = _config(D, x.dtype)
    precision = dot_precision(x.dtype)
    dx_cfg, dy_cfg = cfg["dx"], cfg["dy"]
    _contrastive_bwd_dx_kernel[(triton.cdiv(B, dx_cfg["BM"]), _feature_splits(D, dx_cfg))](
        x, rx, y, ry, lse, grad_rows, dx, add_scale, B, N, D, x.stride(0), y.stride(0), dx.stride(0), float(scale),
        PRECISION=precision, ADD=add_to is not None, **dx_cfg,
    )
    _contrastive_bwd_dy_kernel[(triton.cdiv(N, dy_cfg["BN"]), _feature_splits(D, dy_cfg))](
        x, rx, y, ry, lse, grad_rows, dy, B, N, D, x.stride(0), y.stride(0), dy.stride(0), float(scale),
        PRECISION=precision, **dy_cfg,
    )
    return dx, dy
