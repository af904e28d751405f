"""kernels/small_batch.py (the whole loss of a small batch in one program) against float64
formulas, with the random shuffle from distillcse.shuffle's definition."""
import pytest
import torch

from conftest import DEVICE, device_key

pytest.importorskip("triton")
from distillcse.kernels.group_partition import num_groups  # noqa: E402
from distillcse.kernels.small_batch import fits, small_batch_loss  # noqa: E402
from distillcse.shuffle import shuffled_targets  # noqa: E402

SCALES = dict(cl_scale=1 / 0.05, student_scale=1 / 0.025, teacher_scale=1 / 0.0125, grouping_scale=1.0)
# loss (relative), gradients (relative to the largest entry, plus an absolute floor: fp32 P - 1
# is ill-conditioned where the positive dominates, as in the streaming kernels)
TOL = {torch.float32: (2e-5, 2e-4, 1e-6), torch.float16: (2e-3, 2e-2, 1e-4), torch.bfloat16: (1e-2, 5e-2, 1e-3)}


def _inputs(B, D, Dt, N, dtype, *, seed=0, strided=False, zero_row=False):
    """z1 [B, D], columns y [N, D] (z2 close to z1, then hard negatives), raw teacher rows
    [B, Dt] of varied norms that agree a little with z1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    y = torch.cat([x + 1.5 * torch.randn(B, D, generator=gen), torch.randn(N - B, D, generator=gen)])
    t = x[:, :1] + torch.randn(B, Dt, generator=gen)
    t = t * torch.rand(B, 1, generator=gen).add(0.5) * 3
    if zero_row:
        x[B // 3] = 0.0
        t[B // 2] = 0.0
    x, y, t = (a.to(dtype).to(DEVICE) for a in (x, y, t))
    if strided:  # row strides != D, Dt (made on the device: a copy there would be contiguous)
        x = torch.cat([x, x.new_ones(B, 5)], dim=1)[:, :D]
        y = torch.cat([y, y.new_ones(N, 7)], dim=1)[:, :D]
        t = torch.cat([t, t.new_ones(B, 3)], dim=1)[:, :Dt]
    return x, y, t


def _expected(x, y, t, *, shuffle, group_p, group_size, step_seed, w_cl, w_kd):
    """float64 ``w_cl L_cl + w_kd L_kd``, its gradients, and (L_cl, L_kd) (y or t None drops a
    term: 0)."""
    B = x.shape[0]
    x64 = x.detach().double().requires_grad_()
    unit = lambda a: a / a.norm(dim=1, keepdim=True).clamp_min(1e-8)  # noqa: E731
    u = unit(x64)
    cl = kd = x64.new_zeros(())
    if t is not None:
        rows, copy_of = torch.unique(unit(t.double()), dim=0, return_inverse=True)
        gram = (rows @ rows.T)[copy_of][:, copy_of]  # duplicated rows tie exactly (BLAS may round edge rows apart)
        q = shuffled_targets(gram, torch.arange(B, device=x.device),
                             teacher_temperature=1 / SCALES["teacher_scale"],
                             grouping_temperature=1 / SCALES["grouping_scale"], group_p=group_p,
                             group_size=group_size, shuffle=shuffle, step_seed=step_seed)
        eye = torch.eye(B, dtype=torch.bool, device=x.device)
        logp = torch.log_softmax((u @ u.T * SCALES["student_scale"]).masked_fill(eye, float("-inf")), dim=1)
        kd = -(q * logp.masked_fill(eye, 0.0)).sum(1).mean()
    y64 = None
    if y is not None:
        y64 = y.detach().double().requires_grad_()
        c = u @ unit(y64).T * SCALES["cl_scale"]
        cl = (torch.logsumexp(c, dim=1) - c.diagonal()).mean()
    loss = w_cl * cl + w_kd * kd
    grads = torch.autograd.grad(loss, [x64] + ([y64] if y is not None else []))
    return loss.detach(), grads, (cl.detach(), kd.detach())


def _check(x, y, t, *, shuffle="none", group_p=0.1, group_size=None, step_seed=None, w_cl=1.0, w_kd=1.0):
    B = x.shape[0]
    kwargs = dict(SCALES, group_p=group_p, group_size=group_size, n_groups=num_groups(B, group_p, group_size),
                  shuffle=shuffle, step_seed=step_seed, w_cl=w_cl, w_kd=w_kd)
    loss, terms, no_dx, no_dy = small_batch_loss(x, y, t, **kwargs)
    assert no_dx is None and no_dy is None
    loss_too, terms_too, dx, dy = small_batch_loss(x, y, t, need_grad=True, **kwargs)
    assert torch.equal(loss_too, loss) and torch.equal(terms_too, terms)
    want, grads, want_terms = _expected(x, y, t, shuffle=shuffle, group_p=group_p, group_size=group_size,
                                        step_seed=step_seed, w_cl=w_cl, w_kd=w_kd)
    tol_loss, tol_grad, atol = TOL[x.dtype]
    assert loss.dtype == terms.dtype == torch.float32 and loss.shape == () and terms.shape == (2,)
    for got, ref in zip([loss, *terms], (want,) + want_terms):  # the loss, L_cl, L_kd
        assert abs(got.double().item() - ref.item()) <= tol_loss * max(1.0, abs(ref.item()))
    for got, ref in zip((dx, dy), grads):
        assert got.dtype == x.dtype and got.shape == ref.shape
        err = (got.double() - ref).abs().max().item()
        assert err <= tol_grad * ref.abs().max().item() + atol, (err, ref.abs().max().item())
    if y is None:
        assert dy is None


@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
@pytest.mark.parametrize("B, D, Dt, N", [(37, 48, 40, 37), (64, 96, 72, 64), (2, 16, 16, 2)])
def test_whole_loss_matches_float64(shuffle, B, D, Dt, N):
    x, y, t = _inputs(B, D, Dt, N, torch.float32, seed=B)
    _check(x, y, t, shuffle=shuffle, step_seed=12345 if shuffle == "random" else None)


@pytest.mark.parametrize("shuffle", ["expected", "random"])
@pytest.mark.parametrize("group_p, group_size", [(0.25, None), (0.1, 5), (1.0, None)])
def test_groupings(shuffle, group_p, group_size):
    x, y, t = _inputs(30, 32, 24, 30, torch.float32, seed=7)
    _check(x, y, t, shuffle=shuffle, group_p=group_p, group_size=group_size, step_seed=2**63 + 99)


@pytest.mark.parametrize("shuffle", ["expected", "random"])
@pytest.mark.parametrize("group_p, group_size", [(0.1, None), (0.1, 4)])
def test_tied_teacher_values_rank_in_column_order(shuffle, group_p, group_size):
    """Duplicated teacher rows (the same sentence twice) tie every row's values in pairs and a
    triple; group boundaries cut through ties, whose columns rank in column order as in the
    float64 formula's stable sort (a rule that puts a tie in one group fails here)."""
    x, y, _ = _inputs(41, 32, 24, 41, torch.float32, seed=13)
    # quarters in [-2, 2]: every dot is exact in fp32 whatever the summation order, so copies tie
    t = torch.randint(-8, 9, (41, 24), generator=torch.Generator().manual_seed(13)).float().div(4)
    t[20:40] = t[:20]
    t[40] = t[0]
    t = t.to(DEVICE)
    _check(x, y, t, shuffle=shuffle, group_p=group_p, group_size=group_size, step_seed=31)


def test_random_shuffle_follows_the_seed():
    x, y, t = _inputs(40, 32, 24, 40, torch.float32, seed=3)
    for seed in (0, 1, 2**40 + 5):
        _check(x, None, t, shuffle="random", step_seed=seed, w_kd=1.0)
    kw = dict(SCALES, n_groups=10, shuffle="random", w_cl=0.0)
    a = small_batch_loss(x, None, t, step_seed=5, **kw)[0]
    assert a.item() == small_batch_loss(x, None, t, step_seed=5, **kw)[0].item()
    assert a.item() != small_batch_loss(x, None, t, step_seed=6, **kw)[0].item()


@pytest.mark.parametrize("step_seed", [5, 2**64 - 12345, 2**63 + 2**31])
def test_random_shuffle_key_on_the_device(step_seed):
    """The key as the [1] int64 tensor that a CUDA graph's capture draws gives the int key's loss
    and gradients (all 64 bits: a key past 2^63 is a negative int64; 2^63 + 2^31: both halves at
    the int32 boundary, each passed as the int32 -2^31)."""
    x, y, t = _inputs(40, 32, 24, 40, torch.float32, seed=3)
    kw = dict(SCALES, n_groups=10, shuffle="random", need_grad=True)
    by_int = small_batch_loss(x, y, t, step_seed=step_seed, **kw)
    by_tensor = small_batch_loss(x, y, t, step_seed=device_key(step_seed), **kw)
    for a, b in zip(by_int, by_tensor):
        assert torch.equal(a, b)


def test_seed_args_take_a_64_bit_key():
    """``utils.seed_args``: an int key as its two 32-bit halves (low first, each the int32 of its
    bits), a [1] int64 tensor on the device as it is (the kernel reads its 8 bytes); an int32 or
    a [2] tensor is refused (the kernel would read 4 bytes past the first, or one key of two)."""
    from distillcse.kernels.utils import seed_args

    like = device_key(0)
    assert seed_args(2**63 + 2**31 + 5, like)[1:] == (-2**31 + 5, -2**31, False)
    key = device_key(2**64 - 12345)
    p_seed, lo, hi, on_device = seed_args(key, like)
    assert p_seed is key and (lo, hi, on_device) == (0, 0, True)
    for bad in (key.int(), torch.cat([key, key])):
        with pytest.raises(AssertionError):
            seed_args(bad, like)


def test_next_pow2():
    """``utils.next_pow2`` (the batch block BB, the group axes): the smallest power of two >= n,
    1 for n <= 1, as ``triton.next_power_of_2``; a power of two is its own (B = 64: a [64, 64]
    block, not [128, 128])."""
    import triton

    from distillcse.kernels.utils import next_pow2

    assert [next_pow2(n) for n in (-3, 0, 1, 2, 3, 64, 65)] == [1, 1, 1, 2, 4, 64, 128]
    assert all(next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 5000))


def test_unit_stride_rows_copies_only_another_feature_stride():
    """``utils.unit_stride_rows``: rows of any row stride and feature stride 1 (a column slice)
    go on as they are, no [B, D] copy; only another feature stride is copied, contiguous."""
    from distillcse.kernels.utils import unit_stride_rows

    x = torch.randn(37, 60, device=DEVICE)[:, 5:53]  # [37, 48], row stride 60
    assert unit_stride_rows(x) is x
    y = torch.randn(37, 96, device=DEVICE)[:, ::2]  # [37, 48], feature stride 2
    z = unit_stride_rows(y)
    assert z.stride() == (48, 1) and torch.equal(z, y)


def test_single_terms_weights_strides_and_zero_rows():
    x, y, t = _inputs(45, 40, 33, 60, torch.float32, seed=11, strided=True, zero_row=True)
    assert not x.is_contiguous() and not y.is_contiguous() and not t.is_contiguous()  # dx, dy: contiguous
    _check(x, y, None, w_cl=1.0)  # contrastive only, with hard negatives
    _check(x, None, t, shuffle="expected", w_kd=1.0)  # distillation only
    _check(x, y, t, shuffle="random", step_seed=4, w_cl=0.5, w_kd=-2.0)


def test_prenormalised_teacher_rows():
    """K > 1: concatenated weighted unit rows are used as they are (no re-normalisation)."""
    x, y, t = _inputs(33, 32, 24, 33, torch.float32, seed=5)
    e1, e2 = t[:, :12], t[:, 12:]
    unit = lambda a: a / a.norm(dim=1, keepdim=True)  # noqa: E731
    rows = torch.cat([0.8 ** 0.5 * unit(e1), 0.2 ** 0.5 * unit(e2)], dim=1)
    kw = dict(SCALES, n_groups=10, shuffle="expected", w_cl=0.0)
    got = small_batch_loss(x, None, rows, normalize_teacher=False, **kw)[0]
    assert abs(got.item() - small_batch_loss(x, None, rows, **kw)[0].item()) < 1e-5  # unit rows already
    rows[0] *= 0.5  # a row of norm 1/2 now: the kernel must keep it
    assert abs(small_batch_loss(x, None, rows, normalize_teacher=False, **kw)[0].item() - got.item()) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    x, y, t = _inputs(50, 64, 48, 64, dtype, seed=9)
    _check(x, y, t, shuffle="random", step_seed=77)


def test_contrastive_logits_past_fp32_exp_range(monkeypatch):
    """Temperature 0.01 (scale 100), each row's positive and a hard negative at cosine ~0.95:
    exp(100 c) ~ e^95 overflows fp32, so the one program shifts the logits by their row maximum,
    as the streaming kernels do (the hard negative, as close as the positive, keeps the losses
    of order 1)."""
    monkeypatch.setitem(SCALES, "cl_scale", 100.0)
    B, D = 30, 48
    x, _, _ = _inputs(B, D, 40, B, torch.float32, seed=2)
    noise = 0.3 * torch.randn(2, B, D, generator=torch.Generator().manual_seed(3))
    y = torch.cat([x.cpu() + noise[0], x.cpu() + noise[1]]).to(DEVICE)  # z2, then the hard negatives
    _check(x, y, None)


def test_feature_stride_not_one():
    """Transposed copies (feature stride B or N, row stride 1) of z1, the columns and the teacher
    rows: the launcher gives each feature stride 1 before the kernels read rows at ``row * stride
    + feature``."""
    x, y, t = (a.T.contiguous().T for a in _inputs(37, 48, 40, 45, torch.float32, seed=17))
    assert x.stride() == (1, 37) and y.stride() == (1, 45) and t.stride() == (1, 37)
    _check(x, y, t)  # the loss kernel reads the teacher rows
    _check(x, None, t, shuffle="expected")  # the targets kernel reads them


@pytest.mark.parametrize("shuffle", ["none", "expected"])  # the loss kernel's q; the targets kernel's
def test_teacher_rows_shorter_than_1e_4(shuffle):
    """A teacher row of norm ~1e-5 (and a zero row) is a unit row for its cosines: the inverse
    norm clamps the norm at eps = 1e-8, not the squared norm (which would make it 1e-4 and
    scale that row's and column's logits by 1/10)."""
    x, _, t = _inputs(37, 48, 40, 37, torch.float32, seed=19, zero_row=True)
    t[5] *= 1e-6  # norm ~1e-5: its square 1e-10 is a normal fp32 number
    _check(x, None, t, shuffle=shuffle)


def test_near_perfect_positives():
    """Positives at noise 0.3 (P_ii = 1 - 5e-6 at scale 20): the gradient's P_ii - 1 is minus the
    off-diagonal sum over L_i, not e_ii / L_i - 1, which cancels in fp32 (2e-3 of the gradient
    here). w_cl = 2^16, a loss scaler's factor, lifts the gradients (~3e-7) far above TOL's floor."""
    B, D = 37, 48
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(B, D, generator=gen)
    y = x + 0.3 * torch.randn(B, D, generator=gen)  # z2 [B, D], no hard negatives
    _check(x.to(DEVICE), y.to(DEVICE), None, w_cl=2.0**16)


def test_fits_and_the_launcher_refuses_what_does_not():
    """``fits``: 2 <= B <= 64 rows and N <= 64 columns (the paper's B = 64 with its 64 columns
    takes the one program); ``small_batch_loss`` refuses a batch outside them."""
    assert [fits(B) for B in (1, 2, 64, 65)] == [False, True, True, False]
    assert fits(64, 64) and not fits(64, 65) and not fits(2, 65)
    x, y, t = _inputs(65, 16, 16, 65, torch.float32)
    for rows in (slice(0, 1), slice(0, 65)):  # B = 1, B = 65
        with pytest.raises(AssertionError, match="one-program path takes 2 <= B <= 64"):
            small_batch_loss(x[rows], y[rows], t[rows], n_groups=1)
