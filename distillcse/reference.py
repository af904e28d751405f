"""Reference DistillCSE losses in plain PyTorch (``backend="reference"``).

Follows the authors' public code step by step so it can be read next to the paper: B x B
cosine matrices with the diagonal filled with ``-inf``, the teacher row sorted in descending
order, the grouping softmax and its cumulative sums, one ``randperm`` per group, the student
logits gathered in the permuted order and the ``nansum`` cross entropy. It materialises
B x B and loops in Python over rows and groups: it is the yardstick, not the fast path.
"""
import math

import torch

EPS = 1e-8


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_i, b_j) = a_i.b_j / (max(|a_i|, eps) max(|b_j|, eps))``: [Ra, D], [Rb, D] -> [Ra, Rb]."""
    ua = a / a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    ub = b / b.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return ua @ ub.T


def teacher_logits(teachers, teacher_weights=None) -> torch.Tensor:
    """``t = sum_k w_k cos(e_k, e_k)``: K tensors [B, D_k] -> [B, B] (weights default 1/K)."""
    K = len(teachers)
    weights = [1.0 / K] * K if teacher_weights is None else [float(w) for w in teacher_weights]
    return sum(w * cosine_matrix(e, e) for w, e in zip(weights, teachers))


def contrastive_loss(z1, z2, temperature=0.05, hard_negatives=None, rows=None) -> torch.Tensor:
    """SimCSE InfoNCE: cross entropy of ``cos(z1_i, [z2; hard_negatives]_j) / tau`` with label i.
    ``rows=(start, stop)``: the sum of those rows' terms over B (a shard of the mean)."""
    columns = z2 if hard_negatives is None else torch.cat([z2, hard_negatives], dim=0)
    cos_sim = cosine_matrix(z1, columns)
    labels = torch.arange(z1.shape[0], device=z1.device)
    if rows is None:
        return torch.nn.functional.cross_entropy(cos_sim / temperature, labels)
    start, stop = rows
    return torch.nn.functional.cross_entropy(cos_sim[start:stop] / temperature, labels[start:stop],
                                             reduction="sum") / z1.shape[0]


def group_ids(sim_t_sorted: torch.Tensor, group_p=0.1, group_size=None, grouping_temperature=1.0):
    """Group of each rank: [B, B-1] descending teacher logits (diagonal dropped) -> [B, B-1] int64.

    By mass: ``min(floor(c_r / P), G - 1)`` with ``c`` the cumulative softmax at the grouping
    temperature; fixed size: ``floor(r / group_size)``.
    """
    rows, n = sim_t_sorted.shape
    if group_size is not None:
        ranks = torch.arange(n, device=sim_t_sorted.device)
        return (ranks // group_size).expand(rows, n)
    cp = torch.softmax(sim_t_sorted / grouping_temperature, dim=-1).cumsum(dim=-1)
    G = math.ceil(1.0 / group_p)
    return torch.floor(cp / group_p).long().clamp_(max=G - 1)


def dense_groups(groups: torch.Tensor) -> torch.Tensor:
    """Group ids [R, n], non-decreasing along each row, renumbered 0, 1, ... per row: at most n
    of them, however many groups G a tiny ``group_p`` allows (most of them empty), so that
    [R, G] tables stay within [R, n]. Membership, all the targets depend on, is unchanged."""
    dense = torch.zeros_like(groups)
    dense[:, 1:] = (groups[:, 1:] != groups[:, :-1]).cumsum(-1)
    return dense


def distill_loss(student, teachers, student_temperature=0.025, teacher_temperature=0.0125,
                 group_p=0.1, group_size=None, grouping_temperature=1.0, shuffle="random",
                 teacher_weights=None, generator=None, rows=None) -> torch.Tensor:
    """Cross entropy between the (shuffled) teacher and student in-batch distributions.

    ``student`` [B, D]; ``teachers`` a list of K tensors [B, D_k]; ``generator`` a CPU
    ``torch.Generator`` for ``shuffle="random"``; ``rows=(start, stop)``: those rows' share of
    the loss (the whole batch is computed, and shuffled, as without it).
    """
    B = student.shape[0]
    sim_s = cosine_matrix(student, student).fill_diagonal_(float("-inf"))
    sim_t = teacher_logits(teachers, teacher_weights).detach().fill_diagonal_(float("-inf"))

    # Rank the teacher row (the diagonal -inf sorts last; ties in column order) and group the
    # B-1 real entries.
    sim_t, idx = torch.sort(sim_t, dim=-1, descending=True, stable=True)
    groups = group_ids(sim_t[:, :-1], group_p, group_size, grouping_temperature)
    q = torch.softmax(sim_t / teacher_temperature, dim=-1)  # [B, B], 0 in the last column

    if shuffle == "random":
        # One uniformly random permutation per (row, group), applied to the student's columns.
        perm = torch.empty(B, B - 1, dtype=torch.long)
        for i in range(B):
            row_groups = groups[i].cpu()
            for g in torch.unique(row_groups).tolist():
                slots = torch.nonzero(row_groups == g).flatten()
                perm[i, slots] = slots[torch.randperm(len(slots), generator=generator)]
        idx = idx.clone()
        idx[:, :-1] = torch.gather(idx[:, :-1], -1, perm.to(idx.device))
    elif shuffle == "expected":
        # Expectation of the random mode: each target replaced by the mean over its group.
        groups = dense_groups(groups)
        G = int(groups.max()) + 1
        sums = torch.zeros(B, G, dtype=q.dtype, device=q.device).scatter_add_(1, groups, q[:, :-1])
        counts = torch.zeros(B, G, dtype=q.dtype, device=q.device).scatter_add_(
            1, groups, torch.ones_like(q[:, :-1]))
        q = torch.cat([torch.gather(sums / counts.clamp_min(1), 1, groups), q[:, -1:]], dim=1)
    sim_s = torch.gather(sim_s, -1, idx)

    log_p = torch.log_softmax(sim_s / student_temperature, dim=-1)
    if rows is None:
        return -(q * log_p).nansum() / q.nansum()
    start, stop = rows
    return -(q[start:stop] * log_p[start:stop]).nansum() / q.nansum()
