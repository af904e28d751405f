"""Shuffled teacher targets for a slab of rows (the torch backend), and the random shuffle's
definition, which the triton backend's kernels (``distillcse.kernels.distill``) follow
bit for bit.

The random shuffle of row i (SPEC section 5): number the members of each group by column
order, ``rank_i(j) = #{j' < j, j' != i : group_i(j') = group_i(j)}``; column j takes the target
of the member whose rank is ``sigma(rank_i(j))``, with ``sigma`` a keyed pseudorandom
permutation of ``[0, n)`` (``n`` the group's size) keyed by hash(seed, row, group). Any fixed
numbering composed with a uniformly random permutation gives a uniformly random bijection of
the group, and ``sigma`` is computed element by element (no sort, no stored permutation), so
the same seed gives the same shuffle whatever the slab size, device or backend.

``sigma`` is a Feistel network on ``Z_b x Z_a`` (``a = 2^h``, ``a b >= n``, ``a b - n < a``)
with cycle walking onto ``[0, n)``: even rounds add a hash of the high part to the low part
mod ``a``, odd rounds add a hash of the low part, reduced to ``[0, b)`` by a multiply-high, to
the high part mod ``b``. Only 32-bit multiplies, xors and shifts, so torch (int64) and Triton
(uint32) agree exactly. Small domains mix slowly, so they get more rounds; measured total
variation from the uniform distribution over all n! permutations at n = 3..7 is at the noise
floor of 10^5 samples from 16 rounds on (8 rounds: 0.06 at n = 5); 24 are used below 256
(tests/test_losses.py checks it).
"""
import torch

from .reference import dense_groups, group_ids

_M32 = 0xFFFFFFFF
_I64_MAX = 2**63 - 1
_GOLDEN = 0x9E3779B1
SMALL_DOMAIN = 256  # groups smaller than this get SMALL_DOMAIN_ROUNDS Feistel rounds
SMALL_DOMAIN_ROUNDS = 24
ROUNDS = 12
# group_permutation on a CPU: entries per thread in a block (ATen's grain, below which an op
# runs on one thread); the ~7 int64 tensors of a thread's share (1.8 MB) then stay in its L2
CPU_BLOCK_PER_THREAD = 1 << 15


def _mix32(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser, in place on an int64 tensor x holding values in [0, 2^32)
    (no overflow); t is scratch of x's shape. Returns x."""
    for _ in range(2):
        x ^= torch.bitwise_right_shift(x, 16, out=t)
        x *= 0x45D9F3B
        x &= _M32
    x ^= torch.bitwise_right_shift(x, 16, out=t)
    return x


def group_keys(step_seed: int, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """32-bit keys (int64) of the permutations of (rows, groups), broadcast together."""
    s1, s2 = step_seed & _M32, (step_seed >> 32) & _M32
    k = ((rows & _M32) * 0x632BE5AB + groups * 0x7FEB352D + s1) & _M32
    t = torch.empty_like(k)
    _mix32(k, t)
    k ^= s2
    return _mix32(k, t)


def feistel_shape(n: torch.Tensor):
    """(h, b, rounds) of the network for domains of size n (int64): ``a = 2^h`` with
    ``h = bitlength(n - 1) // 2``, ``b = ceil(n / a)``."""
    v = (n - 1).clamp_min(0).double()
    bits = torch.where(v > 0, torch.frexp(v).exponent.long(), torch.zeros_like(n))
    h = bits // 2
    b = (n + (1 << h) - 1) >> h
    rounds = torch.where(n < SMALL_DOMAIN, SMALL_DOMAIN_ROUNDS, ROUNDS)
    return h, b, rounds


def _rounds(hi, lo, key, a_mask, b, rounds: range):
    """Feistel rounds ``rounds`` on (hi, lo), in place (int64 tensors of one shape)."""
    f, t = torch.empty_like(hi), torch.empty_like(hi)
    for r in rounds:
        torch.bitwise_xor(hi if r % 2 == 0 else lo, key, out=f)
        f += r * _GOLDEN
        f &= _M32
        _mix32(f, t)
        if r % 2 == 0:  # lo = (lo + f) mod a
            lo += f
            lo &= a_mask
        else:  # hi = u mod b for u = hi + (f b >> 32) in [0, 2b): the smaller of u and u - b,
            # with a negative u - b masked to a value above 2^62
            f *= b
            f >>= 32
            f += hi
            torch.sub(f, b, out=hi).bitwise_and_(_I64_MAX)
            torch.minimum(hi, f, out=hi)


def _feistel(x, key, h, b, rounds):
    """The network on flat int64 tensors of one shape (``rounds``: ROUNDS or SMALL_DOMAIN_ROUNDS
    each). Every entry has the first ROUNDS rounds; the rest run on the small domains only,
    gathered, rather than on every entry under a mask."""
    a_mask = (1 << h) - 1
    hi, lo = x >> h, x & a_mask
    _rounds(hi, lo, key, a_mask, b, range(ROUNDS))
    more = (rounds > ROUNDS).nonzero().squeeze(1)
    if len(more) == len(x):  # small domains only (typical at B ~ 1000): no gathering
        _rounds(hi, lo, key, a_mask, b, range(ROUNDS, SMALL_DOMAIN_ROUNDS))
    elif len(more):
        hi_m, lo_m = hi[more], lo[more]
        _rounds(hi_m, lo_m, key[more], a_mask[more], b[more], range(ROUNDS, SMALL_DOMAIN_ROUNDS))
        hi[more], lo[more] = hi_m, lo_m
    hi <<= h
    return hi.bitwise_or_(lo)


def group_permutation(x: torch.Tensor, n: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``sigma_key(x)`` for ``0 <= x < n``: a keyed pseudorandom permutation of ``[0, n)``,
    elementwise over broadcastable int64 tensors.

    The network works in place on reused buffers: on a CPU, a fresh tensor per elementwise op
    costs more (page faults) than the arithmetic. On a CPU it also runs in blocks that stay in
    cache (elsewhere in one, as each block costs a few hundred kernel launches). Cycle walking
    then runs on all the blocks' leftovers at once (a pass on a few entries costs about as much
    as on a block)."""
    x, n, key = torch.broadcast_tensors(x, n, key)
    shape = x.shape
    x, n, key = x.reshape(-1), n.reshape(-1), key.reshape(-1)
    y = torch.empty_like(x)
    block = CPU_BLOCK_PER_THREAD * torch.get_num_threads() if y.is_cpu else max(1, len(y))
    for s in range(0, len(y), block):
        blk = slice(s, s + block)
        y[blk] = _feistel(x[blk], key[blk], *feistel_shape(n[blk]))
    # cycle walking, on the entries still outside [0, n) only (a b - n < a <= sqrt(n) + 1: few)
    walk = (y >= n).nonzero().squeeze(1)
    while walk.numel():
        n_w = n[walk]
        y_w = _feistel(y[walk], key[walk], *feistel_shape(n_w))
        y[walk] = y_w
        walk = walk[y_w >= n_w]
    return y.view(shape)


def shuffled_targets(t_rows, rows, *, teacher_temperature, grouping_temperature, group_p,
                     group_size, shuffle, step_seed=None):
    """Targets ``q~`` for a slab: t_rows [R, B] teacher logits of rows ``rows`` [R] -> [R, B].

    The diagonal entries (column ``rows[r]`` of slab row r) are ignored and get target 0.
    ``shuffle``: "none" (q~ = q), "expected" (group means) or "random" (the permutation within
    each group drawn from ``step_seed``, defined in this module's docstring).
    """
    R, B = t_rows.shape
    t = t_rows.clone()
    t[torch.arange(R, device=t.device), rows] = float("-inf")
    if shuffle == "none":
        return torch.softmax(t / teacher_temperature, dim=-1)

    # stable: tied values rank in column order (the one-program kernel's rule); the diagonal sorts last
    t_sorted, idx = torch.sort(t, dim=-1, descending=True, stable=True)
    idx = idx[:, :-1]
    q_sorted = torch.softmax(t_sorted[:, :-1] / teacher_temperature, dim=-1)  # [R, B-1]
    groups = group_ids(t_sorted[:, :-1], group_p, group_size, grouping_temperature)  # [R, B-1]
    dense = dense_groups(groups)  # the [R, G] tables' index: G <= B - 1 whatever group_p is
    G = int(dense.max()) + 1

    if shuffle == "expected":
        sums = torch.zeros(R, G, dtype=q_sorted.dtype, device=t.device).scatter_add_(1, dense, q_sorted)
        counts = torch.zeros(R, G, dtype=q_sorted.dtype, device=t.device).scatter_add_(
            1, dense, torch.ones_like(q_sorted))
        q_tilde_sorted = torch.gather(sums / counts.clamp_min(1), 1, dense)
        return torch.zeros_like(t).scatter_(1, idx, q_tilde_sorted)

    # Random. Columns in group order, column order within a group (the diagonal, group G, last).
    group_of_col = torch.full((R, B), G, dtype=torch.int64, device=t.device).scatter_(1, idx, dense)
    q = torch.zeros_like(t).scatter_(1, idx, q_sorted)
    compact_cols = torch.sort(group_of_col, dim=-1, stable=True).indices[:, :-1]  # [R, B-1]
    compact_groups = torch.gather(group_of_col, 1, compact_cols)
    sizes = torch.zeros(R, G, dtype=torch.int64, device=t.device).scatter_add_(
        1, dense, torch.ones_like(dense))
    starts = sizes.cumsum(-1) - sizes  # [R, G] first compact position of each group
    start = torch.gather(starts, 1, compact_groups)
    rank = torch.arange(B - 1, device=t.device) - start
    group_of_dense = torch.zeros_like(sizes).scatter_(1, dense, groups)  # [R, G]: the keys take the real ids
    keys = group_keys(step_seed, rows.to(torch.int64)[:, None], torch.gather(group_of_dense, 1, compact_groups))
    partner = start + group_permutation(rank, torch.gather(sizes, 1, compact_groups), keys)
    q_compact = torch.gather(torch.gather(q, 1, compact_cols), 1, partner)
    return torch.zeros_like(t).scatter_(1, compact_cols, q_compact)
