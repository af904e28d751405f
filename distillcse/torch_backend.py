"""Row-chunked PyTorch backend (``backend="torch"``): any device, extra memory O(chunk x B).

Each loss is a ``torch.autograd.Function`` over normalised embeddings that walks the rows in
chunks, keeps only per-row logsumexps between forward and backward, and recomputes each
chunk's logits (and shuffled targets, from the same seed) in the backward.
"""
import torch

from . import config
from .shuffle import shuffled_targets


# Per shuffle, the [rows, B] float and int64 tensors that a distillation chunk holds at its peak
# (forward or backward, shuffled_targets included), counted with TensorMemory (tests/test_memory_plan.py).
CHUNK_ENTRY_TENSORS = {"none": (6, 0), "expected": (6, 3), "random": (6, 21)}


def chunk_rows(batch: int, columns: int, bytes_per_entry: int) -> int:
    """Rows per chunk so that the chunk's [rows, columns] temporaries fit the memory budget."""
    return max(1, min(batch, config.chunk_budget_bytes() // max(1, columns * bytes_per_entry)))


class ContrastiveChunked(torch.autograd.Function):
    """mean_i [logsumexp_j(scale u1_i.y_j) - scale u1_i.y_i]: u1 [B, D], y [N, D] (unit rows)."""

    @staticmethod
    def forward(ctx, u1, y, scale):
        B, N = u1.shape[0], y.shape[0]
        lse = torch.empty(B, dtype=u1.dtype, device=u1.device)
        diag = (u1 * y[:B]).sum(-1) * scale
        step = chunk_rows(B, N, 4 * u1.element_size())
        for r0 in range(0, B, step):
            lse[r0:r0 + step] = torch.logsumexp(u1[r0:r0 + step] @ y.T * scale, dim=-1)
        ctx.save_for_backward(u1, y, lse)
        ctx.scale = scale
        return (lse - diag).mean()

    @staticmethod
    def backward(ctx, grad_out):
        u1, y, lse = ctx.saved_tensors
        B, N = u1.shape[0], y.shape[0]
        coef = grad_out * ctx.scale / B
        du1, dy = torch.empty_like(u1), torch.zeros_like(y)
        step = chunk_rows(B, N, 4 * u1.element_size())
        for r0 in range(0, B, step):
            rows = torch.arange(r0, min(r0 + step, B), device=u1.device)
            d_logits = torch.exp(u1[rows] @ y.T * ctx.scale - lse[rows, None])  # softmax [R, N]
            d_logits[torch.arange(len(rows)), rows] -= 1.0
            d_logits *= coef
            du1[rows] = d_logits @ y
            dy += d_logits.T @ u1[rows]
        return du1, dy, None


class DistillChunked(torch.autograd.Function):
    """mean_i sum_{j!=i} -q~_ij log_softmax_{j!=i}(u_i.u_j / tau_s): u [B, D], T [B, Dt] (teacher
    rows with T T^T = averaged teacher cosines). ``options`` holds the temperatures, grouping
    and shuffle settings for :func:`shuffled_targets`; ``step_seed`` fixes the random shuffle."""

    @staticmethod
    def forward(ctx, u, T, student_temperature, options):
        B = u.shape[0]
        loss_rows = torch.empty(B, dtype=u.dtype, device=u.device)
        lse = torch.empty(B, dtype=u.dtype, device=u.device)
        for rows, logits, q_tilde in DistillChunked._chunks(u, T, student_temperature, options):
            lse[rows] = torch.logsumexp(logits, dim=-1)
            logits[torch.arange(len(rows)), rows] = 0.0  # the diagonal, whose target is 0
            loss_rows[rows] = lse[rows] - (q_tilde * logits).sum(-1)
        ctx.save_for_backward(u, T, lse)
        ctx.student_temperature, ctx.options = student_temperature, options
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_out):
        u, T, lse = ctx.saved_tensors
        B = u.shape[0]
        coef = grad_out / (ctx.student_temperature * B)
        du = torch.zeros_like(u)
        for rows, logits, q_tilde in DistillChunked._chunks(u, T, ctx.student_temperature, ctx.options):
            g = (torch.exp(logits - lse[rows, None]) - q_tilde) * coef  # dL/ds [R, B]
            du[rows] += g @ u
            du += g.T @ u[rows]
        return du, None, None, None

    @staticmethod
    def _chunks(u, T, student_temperature, options):
        """Yields (rows [R], student logits [R, B] with -inf diagonal, targets q~ [R, B])."""
        B = u.shape[0]
        floats, ints = CHUNK_ENTRY_TENSORS[options["shuffle"]]
        step = chunk_rows(B, B, floats * u.element_size() + ints * 8)
        for r0 in range(0, B, step):
            rows = torch.arange(r0, min(r0 + step, B), device=u.device)
            logits = u[rows] @ u.T / student_temperature
            logits[torch.arange(len(rows)), rows] = float("-inf")
            q_tilde = shuffled_targets(T[rows] @ T.T, rows, **options)
            yield rows, logits, q_tilde
