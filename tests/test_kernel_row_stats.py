"""kernels/distill.py ``distill_row_stats`` (per row slab, from the slab's cuBLAS dots) against
float64 PyTorch: odd sizes over several slabs and ragged blocks, mixed dtypes, strided rows,
rows whose every teacher and student cosine is negative; determinism. ``torch.empty`` is
NaN-filled (conftest), so a row the kernel never writes shows up."""
import math

import pytest
import torch

from conftest import DEVICE

pytest.importorskip("triton")
from distillcse.kernels import distill as K  # noqa: E402
from distillcse.kernels import utils  # noqa: E402

STUDENT, TEACHER, GROUPING = 1 / 0.025, 1 / 0.0125, 1 / 0.7
NAMES = ("lse_s", "lse_t", "lse_g", "t_min", "t_max")


def _rows(B, D, Dt, dtype, t_dtype, *, strided=False, seed=0):
    """x [B, D] and t [B, Dt] in a cone around the all-ones direction with spread norms, x's
    first and t's last row flipped out of it (all their cosines negative: in several slabs,
    row B - 1's t_max < 0 comes from the column side of the slabs above it), and fp32 inverse norms.
    ``strided``: x and t column slices of wider tensors, rx and rt of stride 2."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen).abs() * 0.5 + 0.3
    t = (torch.randn(B, Dt, generator=gen).abs() * 0.5 + 0.3) * 4.0 ** torch.rand(B, 1, generator=gen)
    x[0], t[-1] = -x[0], -t[-1]
    x, t = x.to(dtype), t.to(t_dtype)
    rx = 1.0 / x.float().norm(dim=1).clamp_min(1e-8)
    rt = 1.0 / t.float().norm(dim=1).clamp_min(1e-8)
    x, rx, t, rt = (v.to(DEVICE) for v in (x, rx, t, rt))
    if strided:
        x = torch.cat([x, x.new_ones(B, 5)], dim=1)[:, :D]
        t = torch.cat([t.new_ones(B, 3), t], dim=1)[:, 3:]
        rx, rt = (torch.stack([r, torch.ones_like(r)], dim=1)[:, 0] for r in (rx, rt))
    return x, rx, t, rt


def _reference(x, rx, t, rt):
    """float64 (lse_s, lse_t, lse_g, t_min, t_max) over j != i from the B x B matrices."""
    u, v = x.double() * rx.double()[:, None], t.double() * rt.double()[:, None]
    s, tt = u @ u.T, v @ v.T
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    neg = lambda a: a.masked_fill(~off, -math.inf)  # noqa: E731
    return (torch.logsumexp(neg(STUDENT * s), 1), torch.logsumexp(neg(TEACHER * tt), 1),
            torch.logsumexp(neg(GROUPING * tt), 1), tt.masked_fill(~off, math.inf).amin(1), neg(tt).amax(1))


def _check(stats, refs, tol=1e-5, names=NAMES):
    """Every entry within tol * max(1, |ref|): one wrong row fails."""
    for name, out, ref in zip(names, stats, refs):
        assert out.dtype == torch.float32 and out.shape == ref.shape, name
        err = ((out.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.0e}"


BIG = 1 << 30  # one slab


@pytest.mark.parametrize("dtype,t_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                           (torch.float32, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "fp16-fp32", "fp32-fp16", "bf16-fp32"])
@pytest.mark.parametrize("B,D,Dt,slab", [(2, 48, 32, None), (37, 48, 40, None), (130, 96, 80, None),
                                          (200, 96, 48, 64)])
def test_row_stats_match_float64(B, D, Dt, slab, dtype, t_dtype):
    """``slab``: rows a slab (B = 200: 4 slabs, the last ragged; the interpreter's 64-row blocks
    leave B = 37 and 130 ragged too). The reference reads the same rounded rows, so fp32
    accumulation alone sets the tolerance."""
    x, rx, t, rt = _rows(B, D, Dt, dtype, t_dtype, strided=B == 130, seed=B)
    refs = _reference(x, rx, t, rt)
    assert refs[4][-1] < 0 and refs[0][0] < math.log(B)  # the flipped rows
    budget = BIG if slab is None else slab * B * 8
    _check(K.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=budget), refs)


def test_row_stats_in_uneven_column_splits():
    """B = 600: 5 column tiles of 128 in 4 splits of 2 (the last split empty), 10 row blocks
    of 64; the merged splits against float64, with and without the student."""
    B = 600
    assert utils.column_splits(5, 10) == 4
    x, rx, t, rt = _rows(B, 32, 24, torch.float32, torch.float32, seed=5)
    refs = _reference(x, rx, t, rt)
    _check(K.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG), refs)
    teacher = K.distill_row_stats(None, None, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    assert teacher[0] is None
    _check(teacher[1:], refs[1:], names=NAMES[1:])


def test_column_splits():
    """``utils.column_splits``: a power of two (the merge pairs partial results up), at most the
    tiles, and otherwise the power of two at or above programs / row programs (about that many
    programs in all)."""
    assert [utils.column_splits(64, rows) for rows in (1, 100, 300, 1024, 5000)] == [64, 16, 4, 1, 1]
    assert [utils.column_splits(n, 1) for n in (0, 1, 2, 3, 100)] == [1, 1, 2, 2, 64]
    for n_tiles in range(70):
        for rows in (1, 3, 10, 100, 1000):
            splits = utils.column_splits(n_tiles, rows, 512)
            assert splits & (splits - 1) == 0 and 1 <= splits <= max(1, n_tiles), (n_tiles, rows, splits)
            assert splits * rows >= 512 or 2 * splits > n_tiles, (n_tiles, rows, splits)


def test_blocks_follow_the_interpreter():
    """The statistics kernel's blocks: the interpreter's few large ones (64 rows) under
    ``TRITON_INTERPRET=1``, the GPU's (32 rows) on a GPU or with ``DISTILLCSE_GPU_BLOCKS=1``."""
    import os

    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("DISTILLCSE_GPU_BLOCKS") != "1"
    assert utils.interpreter_blocks() == interpreted
    assert K._stats_blocks()["BM"] == (64 if interpreted else 32)


@pytest.mark.parametrize("case", ["student", "teacher", "grid"])
def test_row_stats_from_half_the_dots(case, monkeypatch):
    """B = 450 in three slabs (192, 192 and 66 rows: 3, 3 and 2 row blocks of 64 under the
    interpreter, the column merge taking them 2 at a time; 176, 176 and 98 with the GPU's 32-row
    blocks, ``DISTILLCSE_GPU_BLOCKS=1`` or on a GPU). s and t are symmetric: each slab's
    GEMMs have the columns from its first row on, and its rows' earlier columns come from the
    slabs above as their column side (a row of negative cosines in the second slab would show a
    masked dot's 0 counted as a logit). "teacher": no student; "grid": the search's first pass
    reads whole teacher rows, so t is whole and s halved. Against float64."""
    B = 450
    x, rx, t, rt = _rows(B, 32, 24, torch.float32, torch.float32, seed=7)
    x[0], t[-1], x[200], t[200] = -x[0], -t[-1], -x[200], -t[200]  # one flipped row, in the second slab
    refs = _reference(x, rx, t, rt)
    assert refs[0][200] < 0 and refs[4][200] < 0  # a masked dot's 0 as a logit would show
    gemms, fed, matmul = [], [], K.matmul_f32
    monkeypatch.setattr(K, "matmul_f32", lambda a, b, **kw: gemms.append((a.shape[0], b.shape[1])) or matmul(a, b, **kw))
    student = (None, None) if case == "teacher" else (x, rx)
    grid = (lambda row0, dots, *stats: fed.append((row0, dots.clone()))) if case == "grid" else None
    budget = {"student": 807_000, "teacher": 432_600, "grid": 960_400}[case]  # 192-row slabs
    stats = K.distill_row_stats(*student, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=budget, grid=grid)
    R = gemms[0][0]
    assert R == 192 or not utils.interpreter_blocks()
    assert R % 16 == 0 and R <= 200 < 2 * R < B  # three slabs, the flipped row in the second
    starts = list(range(0, B, R))
    slabs = [min(R, B - row0) for row0 in starts]
    halves = [(rows, B - row0) for rows, row0 in zip(slabs, starts)]
    whole = [(rows, B) for rows in slabs]
    expected = {"student": zip(halves, halves), "teacher": zip(halves), "grid": zip(halves, whole)}[case]
    assert gemms == [g for pair in expected for g in pair]
    _check(stats[1:], refs[1:], names=NAMES[1:])
    if case == "teacher":
        assert stats[0] is None
    else:
        _check(stats[:1], refs[:1])
    if case == "grid":  # the whole teacher rows of each slab, once its statistics are final
        assert [row0 for row0, _ in fed] == starts
        for (row0, dots), rows in zip(fed, slabs):
            torch.testing.assert_close(dots, t[row0:row0 + rows] @ t.T, rtol=1e-5, atol=1e-5)


def test_row_stats_from_half_the_dots_in_gpu_blocks(monkeypatch):
    """The GPU's blocks under the interpreter: B = 450 in slabs of 320 and 130 rows, 32-row
    blocks (10 in the first slab: the column merge takes 8, then 2), 128-column tiles."""
    monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    assert K._stats_blocks()["BM"] == 32
    B = 450
    x, rx, t, rt = _rows(B, 32, 24, torch.float32, torch.float32, seed=8)
    x[0], t[-1], x[400], t[400] = -x[0], -t[-1], -x[400], -t[400]  # one flipped row, in the second slab
    refs = _reference(x, rx, t, rt)
    gemms, matmul = [], K.matmul_f32
    monkeypatch.setattr(K, "matmul_f32", lambda a, b, **kw: gemms.append((a.shape[0], b.shape[1])) or matmul(a, b, **kw))
    _check(K.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=1_379_800), refs)
    assert gemms == [(320, 450), (320, 450), (130, 130), (130, 130)]


def test_row_stats_of_a_shard(monkeypatch):
    """``rows=(21, 111)`` at B = 130 in two slabs of whole rows (64 and 26, no halves): the
    shard's rows against float64, every other row 0 (as documented), with and without the
    student."""
    x, rx, t, rt = _rows(130, 48, 40, torch.float32, torch.float32, seed=3)
    refs = _reference(x, rx, t, rt)
    shard = slice(21, 111)
    gemms, matmul = [], K.matmul_f32
    monkeypatch.setattr(K, "matmul_f32", lambda a, b, **kw: gemms.append((a.shape[0], b.shape[1])) or matmul(a, b, **kw))
    for student in (True, False):
        stats = K.distill_row_stats(*((x, rx) if student else (None, None)), t, rt, STUDENT, TEACHER, GROUPING,
                                    budget_bytes=40 * 130 * 8, rows=(21, 111))
        names, stats, want = (NAMES, stats, refs) if student else (NAMES[1:], stats[1:], refs[1:])
        _check([s[shard] for s in stats], [r[shard] for r in want], names=names)
        for name, s in zip(names, stats):
            assert not torch.cat([s[:21], s[111:]]).any(), f"{name}: rows outside the shard are not 0"
    assert gemms == [(64, 130), (64, 130), (26, 130), (26, 130), (64, 130), (26, 130)]


def test_row_stats_deterministic():
    x, rx, t, rt = _rows(130, 96, 80, torch.float32, torch.float16, seed=1)
    first = K.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    again = K.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_row_stats_one_row():
    """B = 1: no valid column, every logsumexp -inf, t's range empty."""
    x, rx, t, rt = (v[:1] for v in _rows(2, 48, 32, torch.float32, torch.float32))
    lse_s, lse_t, lse_g, t_min, t_max = K.distill_row_stats(x, rx, t, rt, STUDENT, TEACHER, GROUPING, budget_bytes=BIG)
    assert (lse_s == -math.inf).all() and (lse_t == -math.inf).all() and (lse_g == -math.inf).all()
    assert (t_min == math.inf).all() and (t_max == -math.inf).all()
