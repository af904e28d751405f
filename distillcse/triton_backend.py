"""Fused Triton backend (``backend="triton"``): autograd Functions over the kernels in
``distillcse.kernels``; never B x B.

* ``SmallBatchFused``: a batch of B <= 64 rows (``small_batch.fits``) runs its whole loss
  and gradients in one program, one launch (the streaming path would be launch-bound), after
  one that takes a shuffle's targets over a few programs.
* Larger batches go in slabs: the contrastive term's forward takes row slabs (the loss, O(B)
  row statistics and z1's gradient), its backward column slabs (y's gradient), each slab's
  dots and factors from cuBLAS GEMMs and memory-bound kernels (``ContrastiveFused``; the
  forward's slabs fit the chunk budget, the backward's half of it, as it runs beside both
  gradients);
  the distillation term works on row slabs whose [R, B] buffers fit the chunk budget
  (``distillcse.set_chunk_budget``; ``DistillFused``); ``DistillCSEFused`` runs both and
  writes z1's gradient once, the contrastive forward adding into the distillation's buffer.
The random shuffle is the torch backend's for a seed. Groupings with more than
``MAX_KERNEL_GROUPS`` groups stream on the torch backend's row chunks.
z1's gradient is computed in the forward (the distillation's: a random shuffle is drawn once,
nothing is recomputed; the contrastive row side: in the loss's own pass), only when autograd
will need it; a backward that reuses that buffer in place can run once per forward.
A shard of the rows (``rows=(start, stop)``, ``distillcse.sharded_loss``) streams its rows only,
against every column; its distillation accumulates the column side as the random shuffle does
(``kernels.distill.distill_loss_and_grad``), and a shard never takes the one-program kernel.
"""
import torch
from torch.profiler import record_function

from . import checks, config
from .kernels.contrastive import contrastive_bwd_dy, contrastive_fwd
from .kernels.distill import distill_loss_and_grad, distill_row_stats
from .kernels.group_partition import grid_pass, group_means, group_thresholds, num_groups, searches, tie_cuts
from .kernels.small_batch import fits, small_batch_loss
from .reference import EPS
from .torch_backend import DistillChunked, first_order, need_grad

MAX_KERNEL_GROUPS = 64
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtype(x):
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f'backend="triton" takes float16, bfloat16 or float32 embeddings, got {x.dtype}; '
                        'use backend="torch" for float64')


def _inv_norms(x):
    """[R, D] -> [R] fp32 ``1 / max(|x_r|, eps)`` (accumulated in fp32, no fp32 copy of x)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(EPS).reciprocal()


def _grad_rows(grad_out, B, n=None):
    """dL/dloss_rows [n] fp32 (n = B by default: every row) for ``L = sum(loss_rows) / B``,
    without a host sync."""
    return (grad_out.float() / B).expand(B if n is None else n).contiguous()


def _share(loss_rows, B):
    """``L = sum(loss_rows) / B``: the mean for a whole batch, a shard's share of it otherwise."""
    return loss_rows.mean() if loss_rows.shape[0] == B else loss_rows.sum() / B


def _phase(name):
    """A named range for torch.profiler (``distillcse::<name>``): a profile's table then gives
    each phase's GPU time (``benchmarks/profile_step.py``); nearly free without a profiler."""
    return record_function(f"distillcse::{name}")


def _backward_budget():
    """The contrastive backward's slab budget: half the chunk budget, since y's gradient and z1's
    (the forward's, saved) exist beside its slabs (at B = 65,536, D = 768, bf16: 192 MiB of
    gradients and 60 MiB of slabs)."""
    return config.chunk_budget_bytes() // 2


def _lift(x):
    """c [B] fp32 for fp16 rows x: the power of two c_i >= 1 that lifts row i's norm into [1, 2)
    (1 for rows of norm >= 1 and zero rows); None for other dtypes. The forward writes the
    gradient of the *sum* of the row losses in x's dtype, and w.r.t. x_i it grows as 1 / |x_i|:
    at B = 66, fp16 rows of norm 1e-3 passed fp16's 65,504 (the mean's gradient, 1,309, did
    not). So the forward writes row i's gradient divided by c_i (exact: a power of two, applied
    in fp32 before the one rounding), and the backward's one fp32 scale takes c_i with the
    mean's 1 / B (``_mean_scale``). No copy of x: the kernels read it as it is."""
    if x.dtype != torch.float16:
        return None
    norms = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return torch.where(norms > 0, torch.exp2((-torch.floor(torch.log2(norms))).clamp_min(0.0)), 1.0)


def _mean_scale(grad_out, B, c):
    """The backward's factor on the forward's gradient of the sum: grad_out / B (times c [B] as
    [B, 1], for lifted rows), fp32."""
    g = grad_out.float() / B
    return g if c is None else g * c[:, None]


def _sum_grad_rows(x, c=None):
    """dL/dloss_rows [B] fp32 = 1 for ``L = sum(loss_rows)``: a forward that writes a gradient
    writes that of the sum, which its backward scales by ``grad_out / B`` (the mean's, already
    times a loss scaler's factor: written at the mean's 1 / B, fp16 gradients would underflow
    before a scaler could lift them). With the lift c [B] (``_lift``), 1 / c: for a term whose
    row i enters loss_i alone (the contrastive rows), that is row i's gradient divided by c_i."""
    return torch.ones(x.shape[0], device=x.device) if c is None else c.reciprocal()


def _columns_of(z2, hn):
    """The contrastive columns as the kernels' blocks: z2, then the hard negatives (if any),
    read where they are (no [B + H, D] concatenation)."""
    return (z2,) if hn is None else (z2, hn)


def _column_norms(z2, hn):
    """The columns' fp32 inverse norms [B + H]."""
    return _inv_norms(z2) if hn is None else torch.cat([_inv_norms(z2), _inv_norms(hn)])


def _contrastive_columns(ctx, grad_out, z1, r1, z2, hn, ry, cl_stats, needed):
    """(dz2, dhn): the gradients of the columns z2 and hn (None: no hard negatives) from the
    saved rows (``ctx.rows``) against every column; None for one that ``needed`` (two bools,
    autograd's ``needs_input_grad``) leaves out, e.g. a frozen bank of hard negatives."""
    start, stop = ctx.rows
    y, needed = _columns_of(z2, hn), needed[:1 if hn is None else 2]
    if not any(needed):
        return None, None
    with _phase("contrastive_columns"):
        dy = contrastive_bwd_dy(z1[start:stop], r1[start:stop], y, ry, cl_stats, ctx.cl_scale,
                                _grad_rows(grad_out, z1.shape[0], stop - start), budget_bytes=_backward_budget(),
                                diag0=start, blocks_needed=needed)
    return (*dy, None)[:2]


class ContrastiveFused(torch.autograd.Function):
    """InfoNCE over z1 [B, D] against the columns z2 [B, D] and hard negatives hn [H, D] (or
    None), the rows ``rows`` (start, stop) summed over B. The forward also writes z1's gradient
    (the row side, in the same pass as the loss; that of the sum of the row losses) when
    autograd will need it; the backward scales it in place and computes the columns' (those
    autograd asks for)."""

    @staticmethod
    def forward(ctx, z1, z2, hn, scale, need_grad, rows):
        ctx.lift = _lift(z1) if need_grad else None
        r1, y, ry = _inv_norms(z1), _columns_of(z2, hn), _column_norms(z2, hn)
        with _phase("contrastive_rows"):
            loss_rows, cl_stats, dz1 = contrastive_fwd(z1, r1, y, ry, scale,
                                                       _sum_grad_rows(z1, ctx.lift) if need_grad else None,
                                                       budget_bytes=config.chunk_budget_bytes(),
                                                       rows=checks.shard_or_none(rows, z1.shape[0]))
        ctx.save_for_backward(z1, r1, z2, hn, ry, cl_stats, dz1)
        ctx.cl_scale, ctx.rows = scale, rows
        return _share(loss_rows, z1.shape[0])

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        _take_once(ctx)
        z1, r1, z2, hn, ry, cl_stats, dz1 = ctx.saved_tensors
        dz2, dhn = _contrastive_columns(ctx, grad_out, z1, r1, z2, hn, ry, cl_stats, ctx.needs_input_grad[1:3])
        return dz1.mul_(_mean_scale(grad_out, z1.shape[0], ctx.lift)), dz2, dhn, None, None, None


def _distill_rows(z, r, t, rt, student_temperature, options, need_grad, rows=None, lift=None):
    """Distillation loss rows [B] fp32 (of ``rows`` (start, stop), [stop - start], if given) and
    d(sum of them)/dz [B, D] in z's dtype (or None), row i divided by ``lift``'s c_i if given."""
    ss, ts, gs = 1.0 / student_temperature, 1.0 / options["teacher_temperature"], 1.0 / options["grouping_temperature"]
    shuffle, groups, budget = options["shuffle"], {}, config.chunk_budget_bytes()
    shard = dict(rows=rows)
    grouping = dict(group_p=options["group_p"], group_size=options["group_size"], budget_bytes=budget)
    # the threshold search's first pass rides on the row statistics' teacher slabs (None: no search)
    grid = grid_pass(t, rt, gs, **grouping) if shuffle != "none" else None
    with _phase("row_stats"):  # the random shuffle takes s's logsumexps from its own slabs
        student = (None, None) if shuffle == "random" else (z, r)
        lse_s, lse_t, lse_g, t_min, t_max = distill_row_stats(*student, t, rt, ss, ts, gs, budget_bytes=budget,
                                                              grid=grid, **shard)
    if shuffle != "none":
        # pairwise thresholds (B <= PAIRWISE_MAX_B) come with tie cuts: tied values rank in column
        # order; the search's put a tie in one group, and give the expected mode's means (their last pass)
        ranked = not searches(t.shape[0])
        means = (lse_t, ts) if shuffle == "expected" and not ranked else None
        with _phase("group_thresholds"):
            found = group_thresholds(t, rt, lse_g, t_min, t_max, gs, **grouping, grid=grid, means=means, **shard)
            groups["thr"], groups["qbar"] = found if means else (found, None)
            if ranked:
                groups["ties"] = tie_cuts(t, rt, lse_g, t_min, t_max, groups["thr"], gs, group_p=options["group_p"],
                                          group_size=options["group_size"], **shard)
                if shuffle == "expected":
                    groups["qbar"] = group_means(t, rt, lse_t, groups["thr"], ts, budget_bytes=budget,
                                                 ties=groups["ties"], **shard)
    with _phase("distill_slabs"):
        return distill_loss_and_grad(
            z, r, t, rt, lse_s, lse_t, ss, ts, shuffle=shuffle, step_seed=options["step_seed"],
            budget_bytes=budget, need_grad=need_grad, grad_scale=None if lift is None else lift.reciprocal(),
            **groups, **shard)


def _take_once(ctx):
    if getattr(ctx, "consumed", False):
        raise RuntimeError("the triton backend's fused loss reuses its gradient buffer in the backward, so it "
                           "can be differentiated once per forward (retain_graph=True is not supported); "
                           'recompute the loss, or use backend="torch"')
    ctx.consumed = True


class DistillFused(torch.autograd.Function):
    """Distillation over student z [B, D] and teacher rows t [B, Dt] with fp32 inverse norms
    rt [B] (``t_ij = (t_i . t_j) rt_i rt_j``), any shuffle, the rows ``rows`` (start, stop)
    summed over B; the backward scales the gradient the forward computed, in place."""

    @staticmethod
    def forward(ctx, z, t, rt, student_temperature, options, need_grad, rows):
        ctx.lift = _lift(z) if need_grad else None
        loss_rows, dz_sum = _distill_rows(z, _inv_norms(z), t, rt, student_temperature, options, need_grad,
                                          checks.shard_or_none(rows, z.shape[0]), ctx.lift)
        ctx.save_for_backward(dz_sum)
        return _share(loss_rows, z.shape[0])

    @staticmethod
    @first_order
    def backward(ctx, grad_out):
        _take_once(ctx)
        dz_sum, = ctx.saved_tensors  # d(sum of loss rows)/dz
        scale = _mean_scale(grad_out, dz_sum.shape[0], ctx.lift)
        return dz_sum.mul_(scale), None, None, None, None, None, None  # fp32 scale, one rounding


class DistillCSEFused(torch.autograd.Function):
    """``L_cl(z1, (z2, hn)) + distill_weight L_kd(z1, t)``, and (L_cl, L_kd) [2] fp32 beside it
    (no gradient): the distillation's forward leaves dL_kd/dz1, and the contrastive forward adds
    its own row-side gradient into that buffer (z1's gradient is written once: no second
    [B, D] buffer, no autograd sum); the backward scales it in place and computes the columns'
    (those autograd asks for)."""

    @staticmethod
    def forward(ctx, z1, z2, hn, t, rt, cl_scale, distill_weight, student_temperature, options, need_grad, rows):
        ctx.lift = _lift(z1) if need_grad else None
        r1, y, ry = _inv_norms(z1), _columns_of(z2, hn), _column_norms(z2, hn)
        budget = config.chunk_budget_bytes()
        B, shard = z1.shape[0], checks.shard_or_none(rows, z1.shape[0])
        kd_rows, dz_kd = _distill_rows(z1, r1, t, rt, student_temperature, options, need_grad, shard, ctx.lift)
        with _phase("contrastive_rows"):
            if need_grad:
                dz_kd = dz_kd.contiguous()
                if shard is not None:  # the rows the contrastive forward does not visit: weighted here
                    for other in (slice(0, rows[0]), slice(rows[1], B)):
                        dz_kd[other] *= distill_weight
                cl_rows, cl_stats, dz1 = contrastive_fwd(z1, r1, y, ry, cl_scale, _sum_grad_rows(z1, ctx.lift),
                                                         budget_bytes=budget, add_to=dz_kd,
                                                         add_scale=distill_weight, rows=shard)
            else:
                cl_rows, cl_stats, dz1 = contrastive_fwd(z1, r1, y, ry, cl_scale, budget_bytes=budget, rows=shard)
        ctx.save_for_backward(z1, r1, z2, hn, ry, cl_stats, dz1)
        ctx.cl_scale, ctx.rows = cl_scale, rows
        terms = torch.stack([_share(cl_rows, B), _share(kd_rows, B)])
        ctx.mark_non_differentiable(terms)
        ctx.set_materialize_grads(False)  # no zeros for the terms' gradient
        return terms[0] + distill_weight * terms[1], terms

    @staticmethod
    @first_order
    def backward(ctx, grad_out, _):
        _take_once(ctx)
        z1, r1, z2, hn, ry, cl_stats, dz1 = ctx.saved_tensors
        dz2, dhn = _contrastive_columns(ctx, grad_out, z1, r1, z2, hn, ry, cl_stats, ctx.needs_input_grad[1:3])
        scaled = dz1.mul_(_mean_scale(grad_out, z1.shape[0], ctx.lift))
        return scaled, dz2, dhn, None, None, None, None, None, None, None, None


class SmallBatchFused(torch.autograd.Function):
    """The whole loss of a batch that fits one program (``kernels/small_batch.py``), and (L_cl,
    L_kd) [2] fp32 beside it (no gradient); y (the contrastive columns) or t (the teacher rows)
    may be None to drop a term."""

    @staticmethod
    def forward(ctx, z1, y, t, kernel_args, need_grad):
        loss, terms, dz1, dy = small_batch_loss(z1, y, t, need_grad=need_grad, **kernel_args)
        ctx.save_for_backward(dz1, dy)
        ctx.mark_non_differentiable(terms)
        ctx.set_materialize_grads(False)  # no zeros for the terms' gradient
        return loss, terms

    @staticmethod
    @first_order
    def backward(ctx, grad_out, _):
        dz1, dy = ctx.saved_tensors
        g = grad_out.float()
        if dy is None:
            return dz1 * g, None, None, None, None
        dz1, dy = torch._foreach_mul([dz1, dy], g)  # one op for both
        return dz1, dy, None, None, None


def _teacher(t, unit_rows):
    """(t, rt): teacher rows and their fp32 inverse norms (ones for unit rows)."""
    return t, (torch.ones(t.shape[0], device=t.device) if unit_rows else _inv_norms(t))


def _small_batch_args(z, cl_scale, distill_weight, student_temperature, options, unit_rows):
    args = dict(cl_scale=cl_scale, w_cl=1.0, w_kd=distill_weight, normalize_teacher=not unit_rows)
    if options is not None:
        group_p, group_size = options["group_p"], options["group_size"]
        args.update(student_scale=1.0 / student_temperature, teacher_scale=1.0 / options["teacher_temperature"],
                    grouping_scale=1.0 / options["grouping_temperature"], group_p=group_p, group_size=group_size,
                    n_groups=num_groups(z.shape[0], group_p, group_size), shuffle=options["shuffle"],
                    step_seed=options["step_seed"])
    return args


def _groups_on_torch(z, options):
    """Whether the shuffled targets take the torch backend's rows: more groups than the kernels
    hold (a tiny group_p; the one-program kernel loops over every group)."""
    G = num_groups(z.shape[0], options["group_p"], options["group_size"])
    return options["shuffle"] != "none" and G > MAX_KERNEL_GROUPS


def _empty_share(*inputs):
    """A shard without rows: 0, with zero gradients for the inputs (None: none)."""
    return sum(x[:0].float().sum() for x in inputs if x is not None)


def _one_program(rows, B, N=0):
    """Whether the one-program kernel takes the loss: every row (not a shard), of a batch that fits."""
    return rows == (0, B) and fits(B, N)


def _small_batch_columns(z2, hn):
    """The one-program kernel's columns [N, D]: z2, then the hard negatives (a small copy)."""
    return z2 if hn is None else torch.cat([z2, hn], dim=0)


def _num_columns(z2, hn):
    """N = B + H contrastive columns."""
    return z2.shape[0] + (0 if hn is None else hn.shape[0])


def contrastive(z1, z2, hn, scale, rows):
    """The contrastive term of the rows ``rows`` (start, stop), summed over B, against the
    columns z2 [B, D] and the hard negatives hn [H, D] (or None)."""
    _check_dtype(z1)
    if rows[0] == rows[1]:
        return _empty_share(z1, z2, hn)
    grad = need_grad(z1, z2, hn)
    if _one_program(rows, z1.shape[0], _num_columns(z2, hn)):
        return SmallBatchFused.apply(z1, _small_batch_columns(z2, hn), None,
                                     _small_batch_args(z1, scale, 0.0, None, None, False), grad)[0]
    return ContrastiveFused.apply(z1, z2, hn, scale, grad, rows)


def distill(z, t, student_temperature, options, rows, *, unit_rows):
    """The distillation term of the rows ``rows`` (start, stop), summed over B. ``t`` [B, Dt]:
    K teachers' weighted unit rows side by side (``unit_rows``), or one teacher's raw fp32 / bf16 /
    fp16 rows, which the kernels read as they are with their inverse norms."""
    _check_dtype(z)
    if rows[0] == rows[1]:
        return _empty_share(z)
    if _groups_on_torch(z, options):
        t, rt = _teacher(t, unit_rows)
        u = z.float() / z.float().norm(dim=-1, keepdim=True).clamp_min(EPS)
        return DistillChunked.apply(u, t.float() * rt[:, None], student_temperature, options, need_grad(u), rows)
    if _one_program(rows, z.shape[0]):
        args = _small_batch_args(z, 1.0, 1.0, student_temperature, options, unit_rows)
        return SmallBatchFused.apply(z, None, t, args, need_grad(z))[0]
    t, rt = _teacher(t, unit_rows)
    return DistillFused.apply(z, t, rt, student_temperature, options, need_grad(z), rows)


def distillcse(z1, z2, hn, t, cl_scale, distill_weight, student_temperature, options, rows, *, unit_rows):
    """``(L_cl + distill_weight L_kd, (L_cl, L_kd))`` of the rows ``rows`` (start, stop), summed
    over B, with z1 the distillation's student, the terms [2] fp32 without gradient; z2, hn
    and ``t`` as in :func:`contrastive` and :func:`distill`."""
    _check_dtype(z1)
    if rows[0] == rows[1] or _groups_on_torch(z1, options):
        cl = contrastive(z1, z2, hn, cl_scale, rows)
        kd = distill(z1, t, student_temperature, options, rows, unit_rows=unit_rows)
        return cl + distill_weight * kd, torch.stack([cl.detach(), kd.detach()])
    grad = need_grad(z1, z2, hn)
    if _one_program(rows, z1.shape[0], _num_columns(z2, hn)):
        args = _small_batch_args(z1, cl_scale, distill_weight, student_temperature, options, unit_rows)
        return SmallBatchFused.apply(z1, _small_batch_columns(z2, hn), t, args, grad)
    t, rt = _teacher(t, unit_rows)
    return DistillCSEFused.apply(z1, z2, hn, t, rt, cl_scale, distill_weight, student_temperature, options,
                                 grad, rows)
