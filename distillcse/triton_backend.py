"""Fused Triton backend (``backend="triton"``): autograd Functions over the kernels in
``distillcse.kernels``; never B x B. The contrastive term keeps O(B) row statistics; the
distillation term also works on row slabs whose [R, B] buffers fit the chunk budget
(``distillcse.set_chunk_budget``), and its random shuffle is the torch backend's for a seed.
Groupings with more than ``MAX_KERNEL_GROUPS`` groups run on the torch backend's row chunks.
"""
import torch
from torch.autograd.function import once_differentiable

from . import config
from .kernels.contrastive import contrastive_bwd, contrastive_fwd
from .kernels.distill import distill_loss_and_grad, distill_row_stats
from .kernels.group_partition import group_means, group_thresholds, num_groups
from .reference import EPS
from .torch_backend import DistillChunked

MAX_KERNEL_GROUPS = 64
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtype(x):
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f'backend="triton" takes float16, bfloat16 or float32 embeddings, got {x.dtype}; '
                        'use backend="torch" for float64')


def _inv_norms(x):
    """[R, D] -> [R] fp32 ``1 / max(|x_r|, eps)`` (accumulated in fp32, no fp32 copy of x)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(EPS).reciprocal()


def _grad_rows(grad_out, B):
    """dL/dloss_rows [B] fp32 for ``L = mean(loss_rows)``, without a host sync."""
    return (grad_out.float() / B).expand(B).contiguous()


class ContrastiveFused(torch.autograd.Function):
    """InfoNCE over z1 [B, D] against columns y [N, D] (z2 then hard negatives)."""

    @staticmethod
    def forward(ctx, z1, y, scale):
        r1, ry = _inv_norms(z1), _inv_norms(y)
        loss_rows, lse = contrastive_fwd(z1, r1, y, ry, scale)
        ctx.save_for_backward(z1, r1, y, ry, lse)
        ctx.scale = scale
        return loss_rows.mean()

    @staticmethod
    def backward(ctx, grad_out):
        z1, r1, y, ry, lse = ctx.saved_tensors
        dz1, dy = contrastive_bwd(z1, r1, y, ry, lse, ctx.scale, _grad_rows(grad_out, z1.shape[0]))
        return dz1, dy, None


class DistillFused(torch.autograd.Function):
    """Distillation over student z [B, D] and teacher rows t [B, Dt] with fp32 inverse norms
    rt [B] (``t_ij = (t_i . t_j) rt_i rt_j``), any shuffle: the forward computes the loss and,
    when z needs it, the gradient of the summed loss rows (so a random shuffle is drawn once per
    step and nothing is recomputed); the backward scales it."""

    @staticmethod
    def forward(ctx, z, t, rt, student_temperature, options):
        r = _inv_norms(z)
        ss, ts, gs = 1.0 / student_temperature, 1.0 / options["teacher_temperature"], 1.0 / options["grouping_temperature"]
        lse_s, lse_t, lse_g, t_min, t_max = distill_row_stats(z, r, t, rt, ss, ts, gs)
        shuffle, groups = options["shuffle"], {}
        if shuffle != "none":
            groups["thr"] = group_thresholds(t, rt, lse_g, t_min, t_max, gs, group_p=options["group_p"],
                                             group_size=options["group_size"])
        if shuffle == "expected":
            groups["qbar"] = group_means(t, rt, lse_t, groups["thr"], ts)
        loss_rows, dz_sum = distill_loss_and_grad(
            z, r, t, rt, lse_s, lse_t, ss, ts, shuffle=shuffle, step_seed=options["step_seed"],
            budget_bytes=config.chunk_budget_bytes(), need_grad=ctx.needs_input_grad[0], **groups)
        ctx.save_for_backward(dz_sum)
        return loss_rows.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        dz_sum, = ctx.saved_tensors  # d(sum of loss rows)/dz
        return dz_sum * (grad_out.float() / dz_sum.shape[0]), None, None, None, None  # fp32 scale, one rounding


def contrastive(z1, columns, scale):
    _check_dtype(z1)
    return ContrastiveFused.apply(z1, columns, scale)


def distill(z, t, student_temperature, options, *, unit_rows):
    """The distillation term. ``t`` [B, Dt]: K teachers' weighted unit rows side by side
    (``unit_rows``), or one teacher's raw rows, which the kernels read as they are (float64
    ones cast to z's dtype) with their inverse norms."""
    _check_dtype(z)
    if t.dtype not in KERNEL_DTYPES:
        t = t.to(z.dtype)
    rt = torch.ones(t.shape[0], device=t.device) if unit_rows else _inv_norms(t)
    G = num_groups(z.shape[0], options["group_p"], options["group_size"])
    if options["shuffle"] != "none" and G > MAX_KERNEL_GROUPS:
        u = z.float() / z.float().norm(dim=-1, keepdim=True).clamp_min(EPS)
        return DistillChunked.apply(u, t.float() * rt[:, None], student_temperature, options)
    return DistillFused.apply(z, t, rt, student_temperature, options)
