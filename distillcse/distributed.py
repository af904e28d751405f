"""Multi-GPU batches over ``torch.distributed``: gather every rank's embeddings into the global
batch, differentiably, and compute the loss on it.

    z1, z2, teacher = distillcse.all_gather(z1, z2, teacher)     # [B_local, D] -> [B_global, D]
    loss = distillcse.distillcse_loss(z1, z2, [teacher], seed=step)

Rows are concatenated in rank order (local sizes may differ). Every rank then computes the same
global loss (pass the same ``seed`` on every rank for ``shuffle="random"``), whose memory on the
triton backend is O(B_global). In the backward each rank's slice of the gradient is summed over
the ranks (as ``torch.distributed.nn.all_gather``): with ``DistributedDataParallel``, which
averages parameter gradients over the ranks, the parameters get the gradient of the global loss.

``sharded_loss`` splits that work: each rank computes only its own rows' share of the global
loss (every row's term needs all the columns, and nothing from the other rows), so a rank's
loss costs about 1 / W of the whole (torch and triton backends), and the ranks' parameters get
the same gradients as above.
"""
import hashlib

import torch
import torch.distributed as dist

from .api import distillcse_loss


class _AllGatherRows(torch.autograd.Function):
    """[n_r, ...] on rank r -> [sum_r n_r, ...] everywhere; backward: the summed gradient's rows of this rank."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        padded = x.new_zeros((max(sizes),) + x.shape[1:])
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)   # autograd may hand it to others too
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


class _GlobalLoss(torch.autograd.Function):
    """Forward: the global loss (every rank's share summed); backward: the gradient of this rank's
    share, times the world size W (DistributedDataParallel averages over the ranks what
    ``all_gather``'s backward has summed: W times the share's is the global loss's)."""

    @staticmethod
    def forward(ctx, share, total, world):
        ctx.world = world
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.world, None, None


def sharded_loss(z1, z2, teachers, *, hard_negatives=None, group=None, return_terms=False, **kwargs):
    """:func:`distillcse.distillcse_loss` of the global batch, from each rank's local rows, each rank
    computing its own rows' share: ``[B_local, D]`` in, the global loss out (on every rank).

    The embeddings (and hard negatives, whose local counts may differ from the batch's) are gathered
    as :func:`all_gather` does; the rank's share is ``distillcse_loss(..., rows=(start, stop))`` for its
    rows of the global batch (on the torch and triton backends about 1 / W of the whole loss's work, with
    equal local batches; the reference computes the whole batch and keeps its rows); an all-reduce of the shares
    gives every rank the global loss (and ``return_terms``' terms). The backward gives this rank's
    rows the same gradient as ``all_gather`` then the whole loss: with ``DistributedDataParallel`` the
    parameters get the global loss's gradient. Keywords as ``distillcse_loss``'s; for
    ``shuffle="random"`` an int ``seed``, the same on every rank, gives the same shuffle as the whole
    loss (each row's is keyed by its global index). ``backend="auto"`` is the torch backend here
    (the triton backend's shards have been tested under the interpreter only so far: pass
    ``backend="triton"`` for them). Without a process group: ``distillcse_loss`` on the batch.
    """
    if "rows" in kwargs:
        raise TypeError("sharded_loss takes each rank's rows from the process group; rows= is not an option")
    teachers = list(teachers) if isinstance(teachers, (list, tuple)) else [teachers]
    if not (dist.is_available() and dist.is_initialized()):
        return distillcse_loss(z1, z2, teachers, hard_negatives=hard_negatives, return_terms=return_terms, **kwargs)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world > 1 and kwargs.get("backend", "auto") == "auto":  # one backend on every rank, before any collective
        kwargs["backend"] = "torch"                            # (a rank holding every row would take triton)
    gathered, sizes = _gather([z1, z2, *teachers], group, "sharded_loss",
                              extra="hard negatives" if hard_negatives is not None else "no hard negatives")
    if hard_negatives is not None:   # their own row counts
        (hard_negatives,), _ = _gather([hard_negatives], group, "sharded_loss", names=["hard_negatives"])
    start = sum(sizes[:rank])
    share, terms = distillcse_loss(*gathered[:2], gathered[2:], hard_negatives=hard_negatives, return_terms=True,
                                   rows=(start, start + sizes[rank]), **kwargs)
    total = torch.stack([share.detach(), *terms.values()])        # one all-reduce: the loss and its terms
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    loss = _GlobalLoss.apply(share, total[0], world)
    return (loss, dict(zip(terms, total[1:]))) if return_terms else loss


def _check_gatherable(caller, tensors, names=None):
    """Tensors with a row dimension, all with one row count (that of the first)."""
    for i, t in enumerate(tensors):
        name = names[i] if names else f"argument {i}"
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise TypeError(f"{caller}: {name} must be a tensor with a row dimension, got "
                            f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else ' of 0 dims'}")
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(f"{caller}: {name} has {t.shape[0]} rows, {names[0] if names else 'argument 0'} has "
                             f"{tensors[0].shape[0]}; pass each rank's rows of one batch")


def all_gather(*tensors, group=None):
    """Each tensor's rows from every rank, in rank order: ``[n_local, ...] -> [n_global, ...]``.

    Differentiable for tensors that require grad. Without an initialised process group (one
    process) the tensors come back unchanged. Returns a tuple, or the tensor for one argument.
    """
    if not tensors:
        raise TypeError("all_gather: expected at least one tensor")
    if not (dist.is_available() and dist.is_initialized()):
        _check_gatherable("all_gather", tensors)
        return tensors if len(tensors) > 1 else tensors[0]
    out, _ = _gather(tensors, group, "all_gather")
    return tuple(out) if len(out) > 1 else out[0]


def _gather(tensors, group, caller, names=None, extra=None):
    """(every tensor's rows from every rank, in rank order; each rank's row count), the tensors
    checked first and their kinds (and ``extra``) compared across the ranks (``_rows_per_rank``)."""
    _check_gatherable(caller, tensors, names)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = _rows_per_rank(tensors, world, group, caller, extra)
    return [_AllGatherRows.apply(t, sizes, rank, group) for t in tensors], sizes


def _rows_per_rank(tensors, world, group, caller="all_gather", extra=None):
    """Every rank's row count, in one all-gather that also carries a digest of the tensors' kinds
    (number, trailing shapes, dtypes, whether they require grad) and of ``extra`` (a short text the
    ranks must agree on too), which must agree across the ranks: the collectives would otherwise
    reinterpret the bytes, abort, or, for the gradient's all-reduce, hang. On a mismatch every
    rank sees it and all of them exchange the details."""
    kinds = [(tuple(t.shape[1:]), str(t.dtype).replace("torch.", ""), t.requires_grad) for t in tensors]
    digest = int.from_bytes(hashlib.sha256(repr((kinds, extra)).encode()).digest()[:7], "little")
    local = torch.tensor([tensors[0].shape[0], digest], dtype=torch.int64, device=tensors[0].device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    rows, digests = zip(*torch.stack(gathered).tolist())        # one read for every rank
    if any(d != digest for d in digests):
        every = [None] * world
        dist.all_gather_object(every, (kinds, extra), group=group)
        described = "; ".join(f"rank {r}: " + ", ".join(
            f"[n, {', '.join(map(str, shape))}] {dtype}{' requiring grad' if grad else ''}" for shape, dtype, grad in k)
            + (f", {e}" if e else "") for r, (k, e) in enumerate(every))
        raise ValueError(f"{caller}: the ranks pass different tensors ({described}); every rank must pass "
                         "tensors of the same trailing shape, dtype and requires_grad, in the same order")
    return list(rows)
