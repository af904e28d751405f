"""Row-chunked PyTorch backend (``backend="torch"``): any device, extra memory O(chunk x B).

Each loss is a ``torch.autograd.Function`` over normalised embeddings that walks the rows in
chunks. A chunk holds whole rows, so its logsumexps, and with them its softmax, are known as
soon as its logits are: the forward computes the loss and, when autograd will ask for it, the
gradient in the same pass (the logits and the shuffled targets are computed once a step), and
the backward scales that gradient.
"""
import functools

import torch
from torch.autograd.function import once_differentiable

from . import config
from .shuffle import shuffled_targets


# Per shuffle, the [rows, B] float and int64 tensors that a distillation chunk holds at its peak
# (shuffled_targets included), counted with TensorMemory (tests/test_memory_plan.py).
CHUNK_ENTRY_TENSORS = {"none": (6, 0), "expected": (6, 3), "random": (6, 21)}


def chunk_rows(batch: int, columns: int, bytes_per_entry: int) -> int:
    """Rows per chunk so that the chunk's [rows, columns] temporaries fit the memory budget."""
    return max(1, min(batch, config.chunk_budget_bytes() // max(1, columns * bytes_per_entry)))


def first_order(backward):
    """``once_differentiable``, and a clear error where autograd asks for a second derivative
    (``create_graph=True``: grad mode is on in the backward): these backends save the
    gradient their forward computed, which has no graph of its own, so a gradient penalty
    would silently miss their part."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError('the torch and triton backends differentiate their losses once; '
                               'create_graph=True (a second derivative) needs backend="reference"')
        return once(ctx, *grads)
    return wrapper


def need_grad(*xs):
    """Whether autograd will ask for a gradient of ``xs`` (``ctx.needs_input_grad`` ignores no_grad)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


class ContrastiveChunked(torch.autograd.Function):
    """(1/B) sum_{i in shard} [logsumexp_j(scale u1_i.y_j) - scale u1_i.y_i]: u1 [B, D], y [N, D]
    (unit rows), the shard ``(start, stop)`` (all rows: the mean). With ``grad``, d(sum of the
    shard's row losses)/du1 and /dy are computed in the forward."""

    @staticmethod
    def forward(ctx, u1, y, scale, grad, shard):
        B, N = u1.shape[0], y.shape[0]
        start, stop = shard
        loss_rows = torch.empty(B, dtype=u1.dtype, device=u1.device)  # only [start, stop) is written
        du1, dy = (torch.zeros_like(u1), torch.zeros_like(y)) if grad else (None, None)
        step = chunk_rows(stop - start, N, 4 * u1.element_size())
        for r0 in range(start, stop, step):
            rows = torch.arange(r0, min(r0 + step, stop), device=u1.device)
            diag = (torch.arange(len(rows), device=u1.device), rows)
            logits = u1[rows] @ y.T * scale  # [R, N]
            positive = logits[diag]
            row_max = logits.amax(dim=-1)
            e = torch.exp(logits.sub_(row_max[:, None]))  # in place: [R, N] exp(s - max)
            e_pos = e[diag]
            e[diag] = 0.0
            off = e.sum(-1)  # sum_{j != i} e_ij
            total = off + e_pos
            # -log P_ii from the off-diagonal sum: log1p while P_ii > 1/2, so small losses keep
            # their relative precision (lse - s_ii loses it as P_ii -> 1)
            loss_rows[rows] = torch.where(off < e_pos, torch.log1p(off / e_pos),
                                          (row_max - positive) + torch.log(total))
            if grad:
                e[diag] = -off  # P - [i == j] once divided by the total: no cancellation at P_ii ~ 1
                d_logits = e.mul_((scale / total)[:, None])
                du1[rows] = d_logits @ y
                dy.addmm_(d_logits.T, u1[rows])
        ctx.save_for_backward(du1, dy)
        return loss_rows[start:stop].sum() / B

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        du1, dy = ctx.saved_tensors
        g = grad_out / du1.shape[0]
        return du1 * g, dy * g, None, None, None


class DistillChunked(torch.autograd.Function):
    """(1/B) sum_{i in shard} sum_{j!=i} -q~_ij log_softmax_{j!=i}(u_i.u_j / tau_s): u [B, D], T [B, Dt]
    (teacher rows with T T^T = averaged teacher cosines), the shard ``(start, stop)`` (all rows:
    the mean). ``options`` holds the temperatures, grouping and shuffle settings for
    :func:`shuffled_targets`; ``step_seed`` fixes the random shuffle (keyed by the global row).
    With ``grad``, d(sum of the shard's row losses)/du is computed in the forward."""

    @staticmethod
    def forward(ctx, u, T, student_temperature, options, grad, shard):
        B = u.shape[0]
        loss_rows = torch.empty(B, dtype=u.dtype, device=u.device)  # only the shard's rows are written
        du = torch.zeros_like(u) if grad else None
        for rows, logits, q_tilde in DistillChunked._chunks(u, T, student_temperature, options, shard):
            lse = torch.logsumexp(logits, dim=-1)
            if grad:
                # dL/ds [R, B] (0 on the diagonal, whose logit is -inf and target 0)
                g = (torch.exp(logits - lse[:, None]) - q_tilde) / student_temperature
                du[rows] += g @ u
                du.addmm_(g.T, u[rows])
                del g
            # sum_j q~_ij (lse_i - l_ij), each difference before the sum (lse_i and sum_j q~_ij l_ij
            # are both near 1 / tau_s, and their difference would lose their last bits)
            log_p = logits.sub_(lse[:, None])  # in place: [R, B]
            log_p[torch.arange(len(rows)), rows] = 0.0  # the diagonal, whose target is 0
            loss_rows[rows] = -(q_tilde * log_p).sum(-1)
        ctx.save_for_backward(du)
        start, stop = shard
        return loss_rows[start:stop].sum() / B

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        du, = ctx.saved_tensors
        return du * (grad_out / du.shape[0]), None, None, None, None, None

    @staticmethod
    def _chunks(u, T, student_temperature, options, shard):
        """Yields (rows [R], student logits [R, B] with -inf diagonal, targets q~ [R, B]) over the
        shard's rows."""
        B = u.shape[0]
        start, stop = shard
        floats, ints = CHUNK_ENTRY_TENSORS[options["shuffle"]]
        step = chunk_rows(stop - start, B, floats * u.element_size() + ints * 8)
        for r0 in range(start, stop, step):
            rows = torch.arange(r0, min(r0 + step, stop), device=u.device)
            logits = u[rows] @ u.T / student_temperature
            logits[torch.arange(len(rows)), rows] = float("-inf")
            q_tilde = shuffled_targets(T[rows] @ T.T, rows, **options)
            yield rows, logits, q_tilde
