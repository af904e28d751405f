"""Shuffled teacher targets for a slab of rows (the torch backend, and the triton backend's
``shuffle="random"``), with extra memory O(rows x B).

The random permutation inside each group comes from counter-based keys, a hash of
(seed, row, column): the same seed gives the same permutation whatever the slab size and
whatever the device, so the torch and triton backends agree exactly.
"""
import torch

from .reference import group_ids

_M32 = 0xFFFFFFFF
_KEY_BITS = 42


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 tensors holding values in [0, 2^32) (no overflow)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def random_keys(step_seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """42-bit iid keys for entries (rows[r], cols[r, c]): rows [R] int64, cols [R, C] int64 -> [R, C]."""
    s1, s2 = step_seed & _M32, (step_seed >> 32) & _M32
    h1 = _mix32((rows[:, None] * 0x9E3779B1 + cols * 0x7FEB352D + s1) & _M32)
    h2 = _mix32(((h1 ^ s2) + rows[:, None] * 0x632BE5AB + cols) & _M32)
    return (h1 << 10) | (h2 >> 22)


def shuffled_targets(t_rows, rows, *, teacher_temperature, grouping_temperature, group_p,
                     group_size, shuffle, step_seed=None):
    """Targets ``q~`` for a slab: t_rows [R, B] teacher logits of rows ``rows`` [R] -> [R, B].

    The diagonal entries (column ``rows[r]`` of slab row r) are ignored and get target 0.
    ``shuffle``: "none" (q~ = q), "expected" (group means) or "random" (a permutation within
    each group drawn from ``step_seed``).
    """
    R, B = t_rows.shape
    t = t_rows.clone()
    t[torch.arange(R, device=t.device), rows] = float("-inf")
    if shuffle == "none":
        return torch.softmax(t / teacher_temperature, dim=-1)

    t_sorted, idx = torch.sort(t, dim=-1, descending=True)  # the diagonal sorts last
    idx = idx[:, :-1]
    q_sorted = torch.softmax(t_sorted[:, :-1] / teacher_temperature, dim=-1)  # [R, B-1]
    groups = group_ids(t_sorted[:, :-1], group_p, group_size, grouping_temperature)

    if shuffle == "expected":
        G = int(groups.max()) + 1
        sums = torch.zeros(R, G, dtype=q_sorted.dtype, device=t.device).scatter_add_(1, groups, q_sorted)
        counts = torch.zeros(R, G, dtype=q_sorted.dtype, device=t.device).scatter_add_(
            1, groups, torch.ones_like(q_sorted))
        q_tilde_sorted = torch.gather(sums / counts.clamp_min(1), 1, groups)
        return torch.zeros_like(t).scatter_(1, idx, q_tilde_sorted)

    # Random: order each group's slots by iid keys; slot k of a group pairs with the member
    # holding the k-th smallest key, a uniformly random bijection within the group.
    keys = random_keys(step_seed, rows.to(torch.int64), idx)
    order = torch.argsort((groups << _KEY_BITS) | keys, dim=-1)
    partner = torch.gather(idx, 1, order)  # student column that receives the target of each rank
    return torch.zeros_like(t).scatter_(1, partner, q_sorted)
