"""Group-P thresholds and group means (kernels/group_partition.py) against a naive float64
sort-and-cumsum partition.

Teacher rows come raw, with norms spread over 0.5..4 and fp32 inverse norms ``rt``, and are
rounded to multiples of 2^-7, so every dot ``t_i . t_j`` is exact in fp32 whatever the
summation order, and ``t_ij = (t_i . t_j) * rt_i * rt_j`` is the same fp32 number in the
kernels and in torch: the float64 reference sees the kernels' logits, ties included (exact
ties between whole rows with ``dup``). The only freedom left is the fp32 mass accumulation, which may flip an
entry whose cumulative mass lies within 1e-5 of a group boundary: there (and only there) a
difference of one group is allowed.
"""
import math

import pytest
import torch

from conftest import requires_triton

pytestmark = requires_triton

NEAR_BOUNDARY = 1e-5
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from distillcse.kernels.group_partition import _inverse_cubic, _next_up  # noqa: E402


@triton.jit
def _estimate_kernel(p_xs, p_ms, p_i, p_y, p_est, p_slope, BP: tl.constexpr, BG: tl.constexpr):
    """``_inverse_cubic`` of one row: points (xs, ms) [BP], BG boundaries (i_pass, y)."""
    o_l, o_g = tl.arange(0, BP), tl.arange(0, BG)
    xs, ms = tl.load(p_xs + o_l)[None, :], tl.load(p_ms + o_l)[None, :]
    i_pass, y = tl.load(p_i + o_g)[None, :], tl.load(p_y + o_g)[None, :]
    est, slope = _inverse_cubic(xs, ms, i_pass, y, BP)
    tl.store(p_est + o_g[None, :], est)
    tl.store(p_slope + o_g[None, :], slope)


@triton.jit
def _next_up_kernel(p_x, p_y, N: tl.constexpr):
    """``_next_up`` of N values."""
    o = tl.arange(0, N)
    tl.store(p_y + o, _next_up(tl.load(p_x + o)))


def teachers(B, Dt, device, dtype=torch.float32, dup=1, seed=0, zero_row=False, strided=False):
    """(t [B, Dt], rt [B] fp32): realistic raw rows (random + a shared component: positive,
    clustered cosines) of norms 0.5..4, rounded to 2^-7, and ``1 / max(|t_i|, 1e-8)``.
    ``dup`` > 1 repeats every row (exact ties between whole rows); ``zero_row`` zeroes row
    B // 2; ``strided`` slices t out of a wider tensor (row stride Dt + 5)."""
    gen = torch.Generator().manual_seed(seed)
    n = -(-B // dup)
    x = torch.randn(n, Dt, generator=gen) + 0.8 * torch.randn(1, Dt, generator=gen)
    x = x / x.norm(dim=1, keepdim=True) * 2.0 ** (3 * torch.rand(n, 1, generator=gen) - 1)
    x = ((x * 128).round() / 128).repeat_interleave(dup, 0)[:B]
    if zero_row:
        x[B // 2] = 0.0
    x = x.to(device=device, dtype=dtype)
    rt = 1.0 / x.float().norm(dim=1).clamp_min(1e-8)
    if strided:  # a view made on the device (a copy there would be contiguous)
        x = torch.cat([x.new_ones(B, 3), x, x.new_ones(B, 2)], dim=1)[:, 3:3 + Dt]
    return x, rt


def logits(rows):
    """The kernels' t_ij = (t_i . t_j) * rt_i * rt_j: the exact dot, rounded as in fp32, as float64."""
    x, rt = rows
    dot = (x.double() @ x.double().T).float()
    return (dot * rt[:, None] * rt[None, :]).double()


def row_stats(rows, scale):
    """t (float64), lse over j != i at ``scale``, t_min, t_max (the last three fp32)."""
    t = logits(rows)
    eye = torch.eye(len(t), dtype=torch.bool, device=t.device)
    lse = torch.logsumexp((t * scale).masked_fill(eye, -math.inf), 1)
    t_min = t.masked_fill(eye, math.inf).amin(1)
    t_max = t.masked_fill(eye, -math.inf).amax(1)
    return t, lse.float(), t_min.float(), t_max.float()


def naive_groups(t, scale, group_p=0.1, group_size=None, ranked=False):
    """group [B, B] (diagonal -1) and, by mass, the cumulative mass deciding each entry.
    Sort descending, softmax, cumsum, floor, clamp (or rank // size); tied values all take
    the group of the last of their run (the thresholds' tie rule), or with ``ranked`` rank in
    column order (the stable sort of the torch backend, and the thresholds with tie cuts)."""
    B = t.shape[0]
    G = -(-(B - 1) // group_size) if group_size is not None else math.ceil(1.0 / group_p)
    eye = torch.eye(B, dtype=torch.bool, device=t.device)
    v, order = t.masked_fill(eye, -math.inf).sort(dim=1, descending=True, stable=True)
    v = v[:, :-1]  # the diagonal sorts last
    c = torch.softmax(v * scale, dim=1).cumsum(dim=1)
    last = torch.arange(B - 1, device=t.device).expand(B, -1) if ranked else (
        torch.searchsorted(-v, -v, right=True) - 1)  # the rank deciding each entry's group
    if group_size is not None:
        g_sorted = last // group_size
    else:
        c = c.gather(1, last)
        g_sorted = torch.floor(c / group_p).long().clamp(max=G - 1)
    groups = torch.full((B, B), -1, dtype=torch.long, device=t.device)
    groups.scatter_(1, order[:, :-1], g_sorted)
    mass = torch.zeros(B, B, dtype=torch.float64, device=t.device).scatter_(1, order[:, :-1], c)
    return groups, mass


def kernel_groups(t, thr, ties=None):
    """group(j) = #{g : t_ij < thr[i, g]}, diagonal -1; with ``ties`` = (low, cut) from
    ``tie_cuts``, the columns j < cut[i, g] compare with low[i, g] instead."""
    thr = thr.double()[:, None, :]  # [B, 1, G-1]
    if ties is not None:
        low, cut = ties
        j = torch.arange(len(t), device=t.device)[None, :, None]
        thr = torch.where(j < cut[:, None, :], low.double()[:, None, :], thr)  # [B, B, G-1]
    g = (t[:, :, None] < thr).sum(2)
    return g.fill_diagonal_(-1)


def check_partition(rows, grouping_temperature, group_p=0.1, group_size=None, method="auto"):
    from distillcse.kernels.group_partition import group_thresholds

    scale = 1.0 / grouping_temperature
    t, lse, t_min, t_max = row_stats(rows, scale)
    thr = group_thresholds(*rows, lse, t_min, t_max, scale, group_p=group_p, group_size=group_size,
                           method=method)
    assert_partition(t, thr, scale, group_p, group_size)
    return thr


def assert_partition(t, thr, scale, group_p, group_size, ties=None):
    """thr [B, G-1] (with tie cuts ``ties``: ranking ties in column order) splits t's rows
    (float64) as the naive sort does (by mass: up to a group for entries within NEAR_BOUNDARY
    of a boundary)."""
    from distillcse.kernels.group_partition import num_groups

    G = num_groups(len(t), group_p, group_size)
    assert thr.shape == (len(t), G - 1) and thr.dtype == torch.float32
    assert torch.isfinite(thr).all()
    assert (thr[:, 1:] <= thr[:, :-1]).all(), "thresholds must be non-increasing in g"
    ref, mass = naive_groups(t, scale, group_p, group_size, ranked=ties is not None)
    got = kernel_groups(t, thr, ties)
    diff = got != ref
    if group_size is None:
        k = torch.round(mass / group_p)  # nearest boundary, a real one if 1 <= k <= G-1
        near = ((mass - k * group_p).abs() < NEAR_BOUNDARY) & (k >= 1) & (k <= G - 1)
        assert ((got - ref).abs() <= 1).all()
        diff &= ~near
    assert not diff.any(), f"{int(diff.sum())} entries in the wrong group"


MODES = [  # (grouping temperature, group_p, group_size)
    (1.0, 0.1, None), (1.0, 0.25, None), (1.0, 0.3, None),
    (0.1, 0.1, None), (0.1, 0.25, None), (0.1, 0.3, None),
    (1.0, 0.1, 4), (1.0, 0.1, 10), (1.0, 0.5, None), (1.0, 0.1, 20),  # the last two: one boundary at B = 37
]
METHODS = ["search", "pairwise"]  # "auto" takes pairwise up to PAIRWISE_MAX_B rows


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("B,Dt", [(37, 48), (130, 96)])
@pytest.mark.parametrize("temperature,group_p,group_size", MODES)
def test_partition_matches_naive(device, B, Dt, temperature, group_p, group_size, method):
    check_partition(teachers(B, Dt, device), temperature, group_p, group_size, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature,group_p,group_size",
                         [(1.0, 0.1, None), (0.1, 0.3, None), (1.0, 0.1, 4)])
def test_partition_exact_ties(device, temperature, group_p, group_size, method):
    """Every teacher row three times: runs of equal logits straddle the boundaries."""
    check_partition(teachers(130, 48, device, dup=3, seed=1), temperature, group_p, group_size, method)


@pytest.mark.parametrize("temperature,group_p,group_size", [(1.0, 0.1, None), (0.1, 0.3, None), (1.0, 0.1, 4)])
@pytest.mark.parametrize("dup,B,zero_row", [(3, 130, False), (2, 131, True)])
def test_tie_cuts_rank_ties_in_column_order(device, temperature, group_p, group_size, dup, B, zero_row):
    """Repeated teacher rows: with ``tie_cuts``, the tied columns of a run that straddles a
    boundary split between its groups in column order, as the stable sort ranks them (the
    thresholds alone put the run in one group: the check without cuts fails)."""
    from distillcse.kernels.group_partition import group_thresholds, tie_cuts

    rows = teachers(B, 48, device, dup=dup, seed=1, zero_row=zero_row, strided=zero_row)
    scale = 1.0 / temperature
    t, lse, t_min, t_max = row_stats(rows, scale)
    grouping = dict(group_p=group_p, group_size=group_size)
    thr = group_thresholds(*rows, lse, t_min, t_max, scale, **grouping, method="pairwise")
    low, cut = tie_cuts(*rows, lse, t_min, t_max, thr, scale, **grouping)
    assert low.shape == cut.shape == thr.shape and cut.dtype == torch.int32
    assert (cut > 0).any(), "no tie straddles a boundary: the case tests nothing"
    assert torch.equal(low[cut == 0], thr[cut == 0]) and (low[cut > 0] < thr[cut > 0]).all()
    assert_partition(t, thr, scale, group_p, group_size, ties=(low, cut))
    with pytest.raises(AssertionError):  # wrong groups, some more than one off
        assert_partition(t, thr, scale, group_p, group_size, ties=(thr, torch.zeros_like(cut)))


def test_tie_cuts_when_the_threshold_is_the_next_value(device):
    """A tie of three straddles a fixed-size boundary whose threshold is the next float above the
    tied value (no float between them): the cut still counts the one value above the tie and
    ranks the tie's columns in order. Row 0's logits are exact: it is e_0, every rt is 1, and row
    j's first feature is its logit."""
    from distillcse.kernels.group_partition import group_thresholds, tie_cuts

    a = 0.5
    b = float(torch.nextafter(torch.tensor(a), torch.tensor(1.0)))
    first = torch.tensor([1.0, b, a, a, a, 0.25, 0.125, -0.5])
    B, Dt = len(first), 16
    x = torch.zeros(B, Dt)
    x[:, 0] = first
    x[1:, 1:B] = 0.25 * torch.eye(B - 1)
    x, rt = x.to(device), torch.ones(B, device=device)
    t, lse, t_min, t_max = row_stats((x, rt), 1.0)
    assert t[0, 1:].tolist() == first[1:].tolist()
    thr = group_thresholds(x, rt, lse, t_min, t_max, 1.0, group_size=2, method="pairwise")
    assert thr[0, 0].item() == b
    low, cut = tie_cuts(x, rt, lse, t_min, t_max, thr, 1.0, group_size=2)
    assert kernel_groups(t, thr, (low, cut))[0].tolist() == [-1, 0, 0, 1, 1, 2, 2, 3]


def test_tie_cuts_below_a_tie_at_the_bottom_of_the_row(device):
    """A tie of three that is the row's smallest value straddles a fixed-size boundary: no value
    lies below it, and ``low`` still sits strictly below the tie, within the statistics' margin
    of t_min (not at the tie itself, where another summation order could round a tied logit
    below it). Row 0 is e_0 and every rt is 1, so its logits are ``first``."""
    from distillcse.kernels.group_partition import STATS_MARGIN, group_thresholds, tie_cuts

    first = torch.tensor([1.0, 0.75, 0.5, 0.25, -0.5, -0.5, -0.5])
    B = len(first)
    x = torch.zeros(B, 16)
    x[:, 0] = first
    x[1:, 1:B] = 0.25 * torch.eye(B - 1)
    rows = (x.to(device), torch.ones(B, device=device))
    t, lse, t_min, t_max = row_stats(rows, 1.0)
    assert t[0, 1:].tolist() == first[1:].tolist()
    thr = group_thresholds(*rows, lse, t_min, t_max, 1.0, group_size=2, method="pairwise")
    low, cut = tie_cuts(*rows, lse, t_min, t_max, thr, 1.0, group_size=2)
    assert cut[0].tolist() == [0, 5]
    assert -0.5 - 2 * STATS_MARGIN < low[0, 1].item() < -0.5
    assert kernel_groups(t, thr, (low, cut))[0].tolist() == [-1, 0, 0, 1, 1, 2, 2]


def test_tie_cuts_with_the_next_value_between_the_tied_columns(device):
    """A tie of two (columns 5 and 129) straddles a fixed-size boundary, and the next value below
    it (column 70, before the cut) lies in a column tile between them, where it is that tile's
    largest value below the threshold: ``low`` must sit above it (sweep 1 keeps each tile's top
    below the running maximum). Row 0 is e_0 and every rt is 1, so its logits are ``first``."""
    from distillcse.kernels.group_partition import group_thresholds, tie_cuts

    B = 130
    first = -torch.arange(B, dtype=torch.float32) / 256  # the rest: distinct, below the tie's neighbours
    first[[0, 1, 2, 3, 5, 129, 70]] = torch.tensor([1.0, 0.875, 0.75, 0.625, 0.5, 0.5, 0.4375])
    x = torch.zeros(B, B)
    x[:, 0] = first
    x[1:, 1:] = 0.25 * torch.eye(B - 1)
    rows = (x.to(device), torch.ones(B, device=device))
    t, lse, t_min, t_max = row_stats(rows, 1.0)
    assert t[0, 1:].tolist() == first[1:].tolist()
    thr = group_thresholds(*rows, lse, t_min, t_max, 1.0, group_size=4, method="pairwise")
    low, cut = tie_cuts(*rows, lse, t_min, t_max, thr, 1.0, group_size=4)
    assert cut[0, 0].item() == 129 and 0.4375 < low[0, 0].item() < 0.5
    assert kernel_groups(t, thr, (low, cut))[0, [1, 2, 3, 5, 129, 70]].tolist() == [0, 0, 0, 0, 1, 1]
    assert_partition(t, thr, 1.0, None, 4, ties=(low, cut))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_partition_half_rows(device, dtype, method):
    """Half-precision teacher rows (2^-7 multiples stay such multiples in both), fp32
    accumulation and inverse norms."""
    check_partition(teachers(37, 96, device, dtype=dtype, seed=2), 1.0, 0.1, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("temperature,group_p,group_size", [(1.0, 0.1, None), (1.0, 0.1, 4)])
def test_partition_strided_rows_and_zero_row(device, temperature, group_p, group_size, method):
    """Teacher rows sliced out of a wider tensor (row stride Dt + 5), one of them all zero
    (rt = 1e8: t = 0 on its row and column, its row one run of ties)."""
    rows = teachers(130, 48, device, seed=7, zero_row=True, strided=True)
    assert rows[0].stride() == (48 + 5, 1)
    check_partition(rows, temperature, group_p, group_size, method)


@pytest.mark.parametrize("method", METHODS)
def test_partition_small_and_single_group(device, method):
    from distillcse.kernels.group_partition import group_thresholds

    check_partition(teachers(2, 48, device), 1.0, 0.1, method=method)
    check_partition(teachers(3, 48, device), 0.1, 0.3, None, method)
    rows = teachers(37, 48, device)
    _, lse, t_min, t_max = row_stats(rows, 1.0)
    assert group_thresholds(*rows, lse, t_min, t_max, 1.0, group_p=1.0).shape == (37, 0)
    assert group_thresholds(*rows, lse, t_min, t_max, 1.0, group_size=40).shape == (37, 0)
    row = tuple(v[:1] for v in rows)  # B = 1: no off-diagonal entry, thresholds are written but arbitrary
    _, lse, t_min, t_max = row_stats(row, 1.0)
    assert torch.isfinite(group_thresholds(*row, lse, t_min, t_max, 1.0)).all()


@pytest.mark.parametrize("B,group_p,group_size,method", [(65, 1 / 64, None, "search"), (65, 1 / 64, None, "pairwise"),
                                                          (129, 0.1, 2, "pairwise")])
def test_partition_with_the_most_groups(device, B, group_p, group_size, method):
    """G = MAX_BOUNDARIES + 1 = 64 groups (of mass 1/64, or of 2 at B = 129) are accepted and split
    as the naive sort does (one more group is refused: ``test_too_many_groups_and_bad_arguments``)."""
    from distillcse.kernels.group_partition import MAX_BOUNDARIES

    thr = check_partition(teachers(B, 48, device, seed=3), 1.0, group_p, group_size, method)
    assert thr.shape == (B, MAX_BOUNDARIES)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shift", [5e-4, -5e-4])
def test_partition_inexact_row_stats(device, shift, method):
    """t_min / t_max off by less than the search's margin (another kernel's summation order)."""
    from distillcse.kernels.group_partition import group_thresholds

    rows = teachers(130, 48, device, seed=5)
    t, lse, t_min, t_max = row_stats(rows, 1.0)
    for group_p, group_size in [(0.1, None), (0.1, 4)]:
        thr = group_thresholds(*rows, lse, t_min + shift, t_max - shift, 1.0, group_p=group_p,
                               group_size=group_size, method=method)
        ref, _ = naive_groups(t, 1.0, group_p, group_size)
        assert (kernel_groups(t, thr) == ref).all()


def count_passes(monkeypatch):
    """A list that receives one entry per pass of every ``group_thresholds`` call."""
    import distillcse.kernels.group_partition as gp

    passes, search = [], gp._search
    monkeypatch.setattr(gp, "_search", lambda *args, **kw: search(*args, **kw, trace=passes))
    return passes


@pytest.mark.parametrize("temperature,group_p,group_size", [(1.0, 0.1, None), (0.1, 0.3, None), (1.0, 0.1, 4)])
@pytest.mark.parametrize("dup", [1, 3])
def test_partition_multi_pass(device, monkeypatch, temperature, group_p, group_size, dup):
    """An 8-value buffer: the grid pass, windows around the estimates that miss or overflow,
    brackets narrowed by the probe points; also several row chunks per pass and one column
    split per launch."""
    import distillcse.kernels.group_partition as gp

    monkeypatch.setattr(gp, "BUFFER", 8)
    monkeypatch.setattr(gp, "CHUNK_VALUES", 40 * 9 * 8)  # 40 rows per chunk when G - 1 = 9
    monkeypatch.setattr(gp, "SPLIT_PROGRAMS", 1 if dup == 1 else 1024)
    passes = count_passes(monkeypatch)
    check_partition(teachers(130, 48, device, dup=dup, seed=6), temperature, group_p, group_size, "search")
    assert 2 <= len(passes) <= 6, f"{len(passes)} passes"


@pytest.mark.parametrize("shift", [5e-4, -5e-4])
def test_partition_multi_pass_inexact_row_stats(device, monkeypatch, shift):
    """Windows collected whole reach below the bracket: they must not depend on exact stats."""
    import distillcse.kernels.group_partition as gp
    from distillcse.kernels.group_partition import group_thresholds

    monkeypatch.setattr(gp, "BUFFER", 8)
    rows = teachers(130, 48, device, seed=5)
    t, lse, t_min, t_max = row_stats(rows, 1.0)
    thr = group_thresholds(*rows, lse, t_min + shift, t_max - shift, 1.0, group_p=0.1, method="search")
    ref, _ = naive_groups(t, 1.0, 0.1)
    assert (kernel_groups(t, thr) == ref).all()


def test_search_places_each_window_top_on_a_lane_of_its_own(device, monkeypatch):
    """``_place_kernel`` in the later passes of a multi-pass search (an 8-value buffer, 9
    boundaries on 16 lanes: the last open boundary may get one lane, the last): every open
    window's top is a probe point, on a lane that no other open window of its row tops (the
    measure there is the one its settling adds to)."""
    import distillcse.kernels.group_partition as gp

    class Spy:  # ``kernel[grid](*args)``, then the placed points, windows and top lanes kept
        def __init__(self, kernel):
            self.kernel, self.placed = kernel, []

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.kernel[grid](*args, **kwargs)
                self.placed.append([a.clone() for a in args[9:13]])  # x, wlo, whi, top
            return launch

    monkeypatch.setattr(gp, "BUFFER", 8)
    spy = Spy(gp._place_kernel)
    monkeypatch.setattr(gp, "_place_kernel", spy)
    check_partition(teachers(130, 48, device, seed=6), 1.0, 0.1, method="search")
    for x, wlo, whi, top in spy.placed:
        is_open = ~wlo.isnan()
        assert torch.equal(x.gather(1, top.long())[is_open], whi[is_open])
        lanes = torch.where(is_open, top, -1 - torch.arange(top.shape[1], device=device, dtype=top.dtype))
        assert (lanes.sort(1).values.diff(dim=1) != 0).all(), "two windows topped by one lane"
    assert any((top[~wlo.isnan()] == x.shape[1] - 1).any() for x, wlo, _, top in spy.placed), "no top on the last lane"


def test_search_pass_count(device, monkeypatch):
    """B - 1 <= FILL * BUFFER: the first pass collects whole rows and settles everything."""
    passes = count_passes(monkeypatch)
    check_partition(teachers(130, 96, device, seed=3), 1.0, 0.1, method="search")
    assert len(passes) == 1 and passes[0][0] == 0.0


@pytest.mark.parametrize("temperature,group_p,group_size", [(1.0, 0.1, None), (0.1, 0.3, None), (1.0, 0.1, 4)])
def test_grid_pass_on_the_row_statistics_slabs(device, monkeypatch, temperature, group_p, group_size):
    """``grid_pass`` fed by ``distill_row_stats``' teacher slabs (64, 64 and 2 rows): the search
    that starts from it evaluates no grid of its own and finds the right partition (and means)."""
    import distillcse.kernels.group_partition as gp
    from distillcse.kernels.distill import distill_row_stats

    monkeypatch.setattr(gp, "BUFFER", 8)  # B - 1 > FILL * BUFFER: the grid pass has no windows
    monkeypatch.setattr(gp, "PAIRWISE_MAX_B", 64)
    rows = teachers(130, 48, device, seed=6)
    scale, budget = 1.0 / temperature, 4 * 64 * 130 * 8 // 3 + 8  # the slabs' 3/4: 64 rows of 8-byte entries
    grouping = dict(group_p=group_p, group_size=group_size, budget_bytes=budget)
    grid = gp.grid_pass(*rows, scale, **grouping)
    _, lse_t, lse_g, t_min, t_max = distill_row_stats(*rows, *rows, 40.0, 80.0, scale, budget_bytes=budget,
                                                      grid=grid)
    lo, hd = gp._initial_brackets(t_min, t_max)  # the search's own grid, up to FMA contraction on a GPU
    torch.testing.assert_close(grid.x, gp._grid_points(lo[:, None], hd[:, None]), rtol=1e-6, atol=1e-7)
    gemms, matmul = [], gp.matmul_f32
    monkeypatch.setattr(gp, "matmul_f32", lambda a, b, **kw: gemms.append(len(a)) or matmul(a, b, **kw))
    passes = count_passes(monkeypatch)
    thr, qbar = gp.group_thresholds(*rows, lse_g, t_min, t_max, scale, **grouping, grid=grid, means=(lse_t, 80.0))
    later = round(130 * sum(rows_evaluated for _, rows_evaluated, _ in passes[1:]))
    assert sum(gemms) == later, "the grid pass's teacher dots were made again"  # only the later passes' rows
    again, _ = gp.group_thresholds(*rows, lse_g, t_min, t_max, scale, **grouping, means=(lse_t, 80.0))
    # without a budget, chunks of 64 rows (their dots) in every pass but the grid's, which has none
    monkeypatch.setattr(gp, "CHUNK_VALUES", 64 * (130 + 48))
    first_pass, search_chunk = [], gp._search_chunk
    monkeypatch.setattr(gp, "_search_chunk", lambda st, r, i, *a: (first_pass.append(len(r)) if i == 0 else None)
                        or search_chunk(st, r, i, *a))
    unbounded = gp.group_thresholds(*rows, lse_g, t_min, t_max, scale, group_p=group_p, group_size=group_size,
                                    grid=grid)
    assert first_pass == [130]
    t = logits(rows)
    assert_partition(t, unbounded, scale, group_p, group_size)
    assert_partition(t, thr, scale, group_p, group_size)
    assert_partition(t, again, scale, group_p, group_size)
    check_means(qbar, t, thr, 80.0)


def test_grid_pass_only_where_the_search_has_one(device, monkeypatch):
    import distillcse.kernels.group_partition as gp

    rows = teachers(300, 16, device)
    assert gp.grid_pass(*rows, 1.0) is None  # B <= PAIRWISE_MAX_B: pairwise thresholds
    assert isinstance(gp.grid_pass(*rows, 1.0, method="search"), gp.GridPass)
    assert gp.grid_pass(*rows, 1.0, group_p=1.0, method="search") is None  # one group: no thresholds
    monkeypatch.setattr(gp, "PAIRWISE_MAX_B", 64)
    assert isinstance(gp.grid_pass(*rows, 1.0), gp.GridPass)
    assert gp.grid_pass(*(v[:130] for v in rows), 1.0) is None  # the first pass collects whole rows


@pytest.mark.parametrize("fixed", [False, True])
def test_probe_evaluation(device, monkeypatch, fixed):
    """One pass of ``_KernelProbes`` on 5 rows against float64: the measure (mass or count) and
    the snaps at 32 points (two blocks of 16 snapping points), and the values inside each
    window: two overlapping windows share values, a NaN window is empty, and row 64, whose
    windows hold more than its G1 * BUFFER collection slots, gets every window empty (a part of
    its values would make a window look complete)."""
    import distillcse.kernels.group_partition as gp

    monkeypatch.setattr(gp, "BUFFER", 8)
    B, G1 = 130, 3
    rows = teachers(B, 48, device, seed=2)
    t, lse, _, _ = row_stats(rows, 2.0)
    r = torch.tensor([0, 7, 64, 100, 129], device=device)
    eye = torch.eye(B, dtype=torch.bool, device=device)
    v = t.masked_fill(eye, math.inf)[r].sort(1).values[:, :-1]  # [5, B - 1] each row's values, ascending
    gen = torch.Generator().manual_seed(0)
    x = (v[:, :1] + (v[:, -1:] - v[:, :1]) * torch.rand(5, 32, generator=gen, dtype=torch.float64).to(device))
    x[:, 3] = v[:, 40]  # a point on a value: measured from it up
    x = x.float().sort(1).values
    lo = torch.tensor([[5, 20, 18], [5, 20, 60], [0, 40, 80], [5, 20, 60], [100, 110, 120]], device=device)
    hi = lo + torch.tensor([[6, 6, 6], [6, 6, 6], [30, 30, 30], [6, 6, 6], [6, 6, 6]], device=device)
    wlo, whi = v.float().gather(1, lo), v.float().gather(1, hi)  # [wlo, whi): the values lo .. hi - 1
    wlo[3, 1] = whi[3, 1] = math.nan  # no window
    probes = gp._KernelProbes(rows[0], rows[1], lse, 2.0, G1, fixed)
    meas, above, below, count, buf = probes(r, x, (wlo, whi), True)

    xd = x.double()[:, :, None]
    ge = v[:, None, :] >= xd  # [5, 32, B - 1]
    if fixed:
        torch.testing.assert_close(meas.cpu(), ge.sum(2).int().cpu(), rtol=0, atol=0)
    else:
        w = torch.softmax(v * 2.0, 1)[:, None, :]
        torch.testing.assert_close(meas.double(), (w * ge).sum(2), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(above.double(), v[:, None, :].expand_as(ge).masked_fill(~ge, math.inf).amin(2))
    torch.testing.assert_close(below.double(), v[:, None, :].expand_as(ge).masked_fill(ge, -math.inf).amax(2))
    expected = (hi - lo).masked_fill(torch.isnan(wlo), 0)
    expected[2] = 0  # 90 values in its windows > 3 * 8 slots: none kept
    assert count.tolist() == expected.tolist()
    for i in range(5):
        for g in range(G1):
            n = min(int(count[i, g]), gp.BUFFER)
            if n:
                assert buf[i, g, :n].sort().values.double().tolist() == v[i, lo[i, g]:lo[i, g] + n].tolist()


def test_probe_collection_at_the_row_buffers_edges(device, monkeypatch):
    """The probe kernel's row buffers (G1 * BUFFER = 24 slots, ``_split_windows``) at their edges:
    row 1's three windows hold exactly 24 values, each window's top a value of the row (not
    inside it): all are kept; row 0's one window holds 25, the 25th in column order (column 129)
    in the last column tile: its windows are empty, and its 25th value stays out of row 1's
    buffer, which follows it."""
    import distillcse.kernels.group_partition as gp

    monkeypatch.setattr(gp, "BUFFER", 8)
    B, G1 = 130, 3
    rows = teachers(B, 48, device, seed=2)
    t, lse, _, _ = row_stats(rows, 2.0)
    r = torch.tensor([0, 1], device=device)
    eye = torch.eye(B, dtype=torch.bool, device=device)
    v, order = t.masked_fill(eye, math.inf)[r].sort(1)
    v, order = v[:, :-1], order[:, :-1]  # [2, B - 1] each row's values, ascending, and their columns
    assert order[0, 30:55].max() == 129 and (order[0, 30:55] < 128).sum() == 24  # row 0: the 25th arrives last
    lo = torch.tensor([[30, 0, 0], [5, 40, 80]], device=device)
    hi = lo + torch.tensor([[25, 0, 0], [8, 8, 8]], device=device)
    wlo, whi = v.float().gather(1, lo), v.float().gather(1, hi)  # [wlo, whi): the values lo .. hi - 1
    wlo[0, 1:] = whi[0, 1:] = math.nan  # no window
    assert (v[1, hi[1]] > v[1, hi[1] - 1]).all() and v[0, 55] > v[0, 54]  # no tie at a window's top
    x = v[:, 10:26].float()  # 16 points, one block
    probes = gp._KernelProbes(rows[0], rows[1], lse, 2.0, G1, False)
    _, _, _, count, buf = probes(r, x, (wlo, whi), False)
    assert count.tolist() == [[0, 0, 0], [8, 8, 8]]
    for g in range(G1):
        assert buf[1, g].sort().values.double().tolist() == v[1, lo[1, g]:hi[1, g]].tolist()


def test_inverse_cubic_is_exact_on_a_cubic(device):
    """The crossing estimate of the search (``_inverse_cubic``): where x is a cubic in the
    measure m, the estimate through the four probe points around the crossing is x(y) and
    -dx/dm there, exactly up to rounding; NaN where the nodes run off the points, where their
    measures do not strictly decrease, or where the estimate leaves the middle interval."""
    x_of_m = lambda m: 0.3 - 0.5 * m + 0.2 * m ** 2 - 0.1 * m ** 3  # noqa: E731  decreasing in m on [0, 1]
    ms = torch.linspace(1.0, 0.0, 16, dtype=torch.float64)  # decreasing along the points
    xs = x_of_m(ms)  # increasing
    i_pass = torch.tensor([5, 9, 0, 13, 2, 7, 7, 7], dtype=torch.int32)  # last point whose measure >= y
    y = (ms[i_pass.long()] + ms[i_pass.long() + 1]) / 2
    y[5], y[6] = ms[7] - 1e-3, ms[8] + 1e-3  # near either end of the middle interval
    y[7] = ms[3]  # outside it: the estimate is not between the middle nodes
    y = y.float().double()
    est, slope = (torch.empty(8, device=device) for _ in range(2))
    run = lambda measures: _estimate_kernel[(1,)](  # noqa: E731
        xs.float().to(device), measures.float().to(device), i_pass.to(device), y.float().to(device), est, slope,
        BP=16, BG=8)
    run(ms)
    nan = torch.isnan(est.cpu())
    assert nan.nonzero().flatten().tolist() == [2, 7] and torch.equal(nan, torch.isnan(slope.cpu()))
    torch.testing.assert_close(est.cpu()[~nan].double(), x_of_m(y)[~nan], rtol=0, atol=1e-7)
    torch.testing.assert_close(slope.cpu()[~nan].double(), (0.5 - 0.4 * y + 0.3 * y ** 2)[~nan], rtol=1e-5, atol=0)
    flat = ms.clone()
    flat[9] = flat[10]  # two nodes with equal measures: no estimate through both (boundary 1's)
    run(flat)
    assert torch.isnan(est.cpu()).nonzero().flatten().tolist() == [1, 2, 7]


def test_next_up_is_nextafter_towards_inf(device):
    """``_next_up`` (the search's "float above": bracket ends without snaps, the lowest point a
    window may take) is ``torch.nextafter(x, inf)`` on either side of zero, at zero and among the
    subnormals: negative logits (anticorrelated teacher rows) go through it too."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([-3.5, -1.0, -0.3, -tiny, -1e-45, 0.0, 1e-45, tiny, 1e-30, 0.3, 1.0, 3.5, 1e38, -1e38,
                      -0.7, 2.0 ** -20], device=device)
    y = torch.empty_like(x)
    _next_up_kernel[(1,)](x, y, N=16)
    assert torch.equal(y, torch.nextafter(x, torch.full_like(x, math.inf)))


@pytest.mark.parametrize("B,Dt,teacher_temperature,group_p,group_size,budget",
                         [(37, 48, 0.0125, 0.1, None, None), (130, 96, 0.0125, 0.3, None, None),
                          (130, 48, 0.05, 0.1, 10, None), (130, 96, 0.0125, 0.3, None, 64 * 130 * 4),
                          (130, 48, 0.05, None, 4, None), (600, 24, 0.0125, 0.3, None, None)])
def test_group_means(device, B, Dt, teacher_temperature, group_p, group_size, budget):
    """``budget``: the teacher dots' slabs (64 rows: three slabs, the last ragged). Groups of 4:
    33 groups, three sweeps of the kernel's in-register group blocks (MEANS_GROUPS = 16).
    B = 130: two column splits; B = 600: five column tiles in four splits, the last empty."""
    from distillcse.kernels.group_partition import group_means, group_thresholds

    rows = teachers(B, Dt, device, seed=4)
    t, lse_g, t_min, t_max = row_stats(rows, 1.0)
    thr = group_thresholds(*rows, lse_g, t_min, t_max, 1.0, group_p=group_p, group_size=group_size)
    scale = 1.0 / teacher_temperature
    _, lse_t, _, _ = row_stats(rows, scale)
    qbar = group_means(*rows, lse_t, thr, scale, budget_bytes=budget)
    check_means(qbar, t, thr, scale)


def check_means(qbar, t, thr, scale, ties=None):
    """qbar [B, G] against float64 means of the softmax at ``scale`` over ``thr``'s groups (with
    the tie cuts ``ties``, as ``kernel_groups`` takes them)."""
    B, G = t.shape[0], thr.shape[1] + 1
    groups = kernel_groups(t, thr, ties)
    eye = torch.eye(B, dtype=torch.bool, device=t.device)
    q = torch.softmax((t * scale).masked_fill(eye, -math.inf), 1)
    onehot = (groups[:, :, None] == torch.arange(G, device=t.device)).double()
    sums, counts = (q[:, :, None] * onehot).sum(1), onehot.sum(1)
    ref = torch.where(counts > 0, sums / counts.clamp(min=1), 0.0)
    assert qbar.shape == (B, G) and qbar.dtype == torch.float32
    assert ((counts == 0) == (qbar == 0)).all()
    err = (qbar.double() - ref).norm() / ref.norm()
    assert err <= 1e-5, f"relative error {err:.2e}"
    torch.testing.assert_close(qbar.double(), ref, rtol=1e-4, atol=0.0)


def test_group_means_with_tie_cuts_in_slabs(device):
    """Repeated teacher rows, tie cuts and three teacher-dot slabs: each slab's rows take their
    own cuts (not the first slab's), and a cut column takes its lower threshold."""
    from distillcse.kernels.group_partition import group_means, group_thresholds, tie_cuts

    rows = teachers(130, 48, device, dup=3, seed=1)
    t, lse, t_min, t_max = row_stats(rows, 1.0)
    thr = group_thresholds(*rows, lse, t_min, t_max, 1.0, group_p=0.1, method="pairwise")
    ties = tie_cuts(*rows, lse, t_min, t_max, thr, 1.0, group_p=0.1)
    assert (ties[1][64:] > 0).any(), "no split tie past the first slab: the case tests nothing"
    _, lse_t, _, _ = row_stats(rows, 80.0)
    qbar = group_means(*rows, lse_t, thr, 80.0, ties=ties, budget_bytes=64 * 130 * 4)  # 64-row slabs
    check_means(qbar, t, thr, 80.0, ties)


@pytest.mark.parametrize("temperature,group_p,group_size", [(1.0, 0.1, None), (0.1, 0.3, None), (1.0, 0.1, 4)])
def test_group_means_from_the_search(device, monkeypatch, temperature, group_p, group_size):
    """``group_thresholds(means=...)``: each row's means from the teacher dots of the chunk that
    finishes it. An 8-value buffer and 40-row chunks: rows finish in different passes and chunks
    (none in the grid pass, which has no windows), the rest of a chunk is skipped."""
    import distillcse.kernels.group_partition as gp

    monkeypatch.setattr(gp, "BUFFER", 8)
    monkeypatch.setattr(gp, "CHUNK_VALUES", 40 * 9 * 8)
    passes = count_passes(monkeypatch)
    rows = teachers(130, 48, device, dup=3, seed=6)
    t, lse_g, t_min, t_max = row_stats(rows, 1.0 / temperature)
    _, lse_t, _, _ = row_stats(rows, 80.0)
    thr, qbar = gp.group_thresholds(*rows, lse_g, t_min, t_max, 1.0 / temperature, group_p=group_p,
                                    group_size=group_size, method="search", means=(lse_t, 80.0))
    assert len(passes) >= 3 and 0 < passes[1][0] < 1, "rows should finish over several passes"
    check_means(qbar, t, thr, 80.0)
    assert (thr == gp.group_thresholds(*rows, lse_g, t_min, t_max, 1.0 / temperature, group_p=group_p,
                                       group_size=group_size, method="search")).all()


@pytest.mark.parametrize("per_sweep", [1, 3])
def test_group_means_in_group_blocks(device, monkeypatch, per_sweep):
    """10 groups in blocks of 1 or 3 (the last block of 3 holds group 9 and two past G): each
    block's edges are the thresholds around it, inf above the first group, -inf below the last."""
    import distillcse.kernels.group_partition as gp

    monkeypatch.setattr(gp, "MEANS_GROUPS", per_sweep)
    rows = teachers(130, 48, device, seed=5)
    t, lse_g, t_min, t_max = row_stats(rows, 1.0)
    thr = gp.group_thresholds(*rows, lse_g, t_min, t_max, 1.0, group_p=0.1)
    _, lse_t, _, _ = row_stats(rows, 20.0)
    check_means(gp.group_means(*rows, lse_t, thr, 20.0), t, thr, 20.0)


def test_group_means_single_group(device):
    from distillcse.kernels.group_partition import group_means

    rows = teachers(37, 48, device)
    _, lse_t, _, _ = row_stats(rows, 80.0)
    thr = torch.zeros(37, 0, device=device)
    qbar = group_means(*rows, lse_t, thr, 80.0)
    torch.testing.assert_close(qbar, torch.full((37, 1), 1.0 / 36, device=device), rtol=1e-5, atol=0.0)


def test_too_many_groups_and_bad_arguments(device):
    from distillcse.kernels.group_partition import group_thresholds

    rows = teachers(130, 48, device)
    _, lse, t_min, t_max = row_stats(rows, 1.0)
    with pytest.raises(ValueError, match="group_p"):
        group_thresholds(*rows, lse, t_min, t_max, 1.0, group_p=0.01)
    with pytest.raises(ValueError, match="group_size"):
        group_thresholds(*rows, lse, t_min, t_max, 1.0, group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        group_thresholds(*rows, lse, t_min, t_max, 1.0, group_size=0)
    with pytest.raises(ValueError, match="group_p"):
        group_thresholds(*rows, lse, t_min, t_max, 1.0, group_p=0.0)
    with pytest.raises(ValueError, match="method"):
        group_thresholds(*rows, lse, t_min, t_max, 1.0, method="sort")
