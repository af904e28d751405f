"""Multi-GPU batches over ``torch.distributed``: gather every rank's embeddings into the global
batch, differentiably, and compute the loss on it.

    z1, z2, teacher = distillcse.all_gather(z1, z2, teacher)     # [B_local, D] -> [B_global, D]
    loss = distillcse.distillcse_loss(z1, z2, [teacher], seed=step)

Rows are concatenated in rank order (local sizes may differ). Every rank then computes the same
global loss (pass the same ``seed`` on every rank for ``shuffle="random"``), whose memory on the
triton backend is O(B_global). In the backward each rank's slice of the gradient is summed over
the ranks (as ``torch.distributed.nn.all_gather``): with ``DistributedDataParallel``, which
averages parameter gradients over the ranks, the parameters get the gradient of the global loss.
"""
import hashlib

import torch
import torch.distributed as dist


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


def all_gather(*tensors, group=None):
    """Each tensor's rows from every rank, in rank order: ``[n_local, ...] -> [n_global, ...]``.

    Differentiable for tensors that require grad. Without an initialised process group (one
    process) the tensors come back unchanged. Returns a tuple, or the tensor for one argument.
    """
    if not tensors:
        raise TypeError("all_gather: expected at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            raise TypeError(f"all_gather: argument {i} must be a tensor with a row dimension, got "
                            f"{type(t).__name__}{'' if not isinstance(t, torch.Tensor) else ' of 0 dims'}")
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(f"all_gather: argument {i} has {t.shape[0]} rows, argument 0 has "
                             f"{tensors[0].shape[0]}; pass each rank's rows of one batch")
    if not (dist.is_available() and dist.is_initialized()):
        return tensors if len(tensors) > 1 else tensors[0]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = _rows_per_rank(tensors, world, group)
    out = tuple(_AllGatherRows.apply(t, sizes, rank, group) for t in tensors)
    return out if len(out) > 1 else out[0]


def _rows_per_rank(tensors, world, group):
    """Every rank's row count, in one all-gather that also carries a digest of the tensors' kinds
    (number, trailing shapes, dtypes, whether they require grad), which must agree across the
    ranks: the collectives would otherwise reinterpret the bytes, abort, or, for the gradient's
    all-reduce, hang. On a mismatch every rank sees it and all of them exchange the details."""
    kinds = [(tuple(t.shape[1:]), str(t.dtype).replace("torch.", ""), t.requires_grad) for t in tensors]
    digest = int.from_bytes(hashlib.sha256(repr(kinds).encode()).digest()[:7], "little")
    local = torch.tensor([tensors[0].shape[0], digest], dtype=torch.int64, device=tensors[0].device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    rows, digests = zip(*torch.stack(gathered).tolist())        # one read for every rank
    if any(d != digest for d in digests):
        every = [None] * world
        dist.all_gather_object(every, kinds, group=group)
        described = "; ".join(f"rank {r}: " + ", ".join(
            f"[n, {', '.join(map(str, shape))}] {dtype}{' requiring grad' if grad else ''}" for shape, dtype, grad in k)
            for r, k in enumerate(every))
        raise ValueError(f"all_gather: the ranks pass different tensors ({described}); every rank must pass "
                         "tensors of the same trailing shape, dtype and requires_grad, in the same order")
    return list(rows)
