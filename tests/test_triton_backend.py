"""backend="triton" end to end against the reference (float64) and the torch backend:
every shuffle mode, K = 1 and 3 teachers, hard negatives, odd sizes; on CPU under the interpreter."""
import pytest
import torch

import distillcse
from conftest import DEVICE, requires_triton
from test_losses import rel_err

pytestmark = requires_triton

# Relative error (loss, gradients) against the float64 reference on the same rounded inputs.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 5e-2), torch.float16: (1e-2, 2e-2)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_batch(B, D, dims, Bh=0, seed=0, dtype=torch.float64):
    """Views with a shared direction (negatives as similar as real sentence embeddings) and
    positives not much closer: the softmax is not saturated, so fp32 gradients are meaningful."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(1, D, generator=g, dtype=dtype) + torch.randn(B, D, generator=g, dtype=dtype)
    z2 = z1 + torch.randn(B, D, generator=g, dtype=dtype)
    teachers = [torch.randn(1, d, generator=g, dtype=dtype) + 0.8 * torch.randn(B, d, generator=g, dtype=dtype)
                for d in dims]
    hard = torch.randn(1, D, generator=g, dtype=dtype) + torch.randn(Bh, D, generator=g, dtype=dtype) if Bh else None
    return z1, z2, teachers, hard


def round_trip(inputs, dtype):
    """The batch rounded to ``dtype`` and back to float64 (None stays None)."""
    z1, z2, teachers, hard = inputs
    rnd = lambda x: None if x is None else x.to(dtype).double()  # noqa: E731
    return rnd(z1), rnd(z2), [rnd(t) for t in teachers], rnd(hard)


def run(backend, inputs, dtype, device, **kw):
    z1, z2, teachers, hard = inputs
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    leaves = [cast(x).requires_grad_() for x in (z1, z2) + ((hard,) if hard is not None else ())]
    loss = distillcse.distillcse_loss(leaves[0], leaves[1], [cast(t) for t in teachers],
                                      hard_negatives=leaves[2] if hard is not None else None,
                                      backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # distill_only leaves z2 out
    return loss.detach().double().cpu(), [torch.zeros(x.shape, dtype=torch.float64) if g is None else g.double().cpu()
                                          for g, x in zip(grads, leaves)]


@pytest.mark.parametrize("shuffle", ["expected", "random"])
@pytest.mark.parametrize("grouping", [dict(group_p=0.1), dict(group_size=4)])
@pytest.mark.parametrize("B", [40, 130])
def test_duplicated_teacher_rows_rank_in_column_order(shuffle, grouping, B):
    """The same sentences twice in a batch: their teacher cosines tie in every row, and where a
    tie straddles a group boundary its columns rank in column order (the one-program kernel at
    B = 40, the pairwise thresholds' tie cuts at 130), as the torch backend's stable sort ranks
    them. Teacher entries are multiples of 1/64 in [-1, 1], so every dot is exact in fp32 (and
    TF32) and copies tie in every backend; the torch backend in fp32 is the yardstick."""
    check_against_torch_fp32(duplicated_batch(B), dict(shuffle=shuffle, seed=3, **grouping))


def duplicated_batch(B):
    """(z1, z2, [t], None) float64 whose last quarter of teacher rows copies the first, teacher
    entries multiples of 1/64 in [-1, 1]."""
    g = torch.Generator().manual_seed(B)
    z1 = torch.randn(B, 32, generator=g, dtype=torch.float64) + torch.randn(1, 32, generator=g, dtype=torch.float64)
    z2 = z1 + torch.randn(B, 32, generator=g, dtype=torch.float64)
    t = torch.randn(B, 24, generator=g, dtype=torch.float64).clamp(-1, 1).mul(64).round().div(64)
    t[B - B // 4:] = t[:B // 4]
    return z1, z2, [t], None


def check_against_torch_fp32(inputs, kw):
    """The triton backend's loss within 1e-6 and gradients within 2e-5 of the torch backend's, fp32."""
    ref_loss, ref_grads = run("torch", inputs, torch.float32, DEVICE, **kw)
    loss, grads = run("triton", inputs, torch.float32, DEVICE, **kw)
    assert rel_err(loss, ref_loss) <= 1e-6
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref) <= 2e-5


def check_against_reference_fp32(inputs, kw):
    """The triton backend in fp32 within 2e-5 (loss and gradients) of the float64 reference on
    the same fp32-rounded inputs."""
    ref_loss, ref_grads = run("reference", round_trip(inputs, torch.float32), torch.float64, "cpu", **kw)
    loss, grads = run("triton", inputs, torch.float32, DEVICE, **kw)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shuffle", ["none", "expected"])
@pytest.mark.parametrize("B,D,dims,Bh", [(37, 48, (32,), 0), (37, 48, (32, 20, 40), 11), (130, 96, (64,), 0), (2, 8, (5,), 0)])
def test_matches_reference(dtype, shuffle, B, D, dims, Bh):
    inputs = make_batch(B, D, dims, Bh, dtype=torch.float64)
    kw = dict(shuffle=shuffle, temperature=1.0 if B == 2 else 0.05)
    # The reference on the same rounded inputs isolates the kernels' error from the input cast.
    rounded = round_trip(inputs, dtype)
    ref_loss, ref_grads = run("reference", rounded, torch.float64, "cpu", **kw)
    loss, grads = run("triton", inputs, dtype, DEVICE, **kw)
    tol_loss, tol_grad = TOL[dtype]
    if B == 2:
        # The distillation gradient is 0 in exact arithmetic at B = 2 (one column per row, p = q = 1);
        # the kernels leave the rounding of exp(s / tau_s - lse) - 1, about eps * 40, times 1 / tau_s.
        tol_grad = max(tol_grad, 1e-3)
    assert rel_err(loss, ref_loss, floor=1.0) < tol_loss
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < tol_grad


@pytest.mark.parametrize("B,group_p,group_size", [(61, 0.25, None), (61, None, 6), (130, None, 6)])
def test_groupings_match_reference(B, group_p, group_size):
    """By mass and of fixed size (group_p None, unused), in one program and streaming."""
    inputs = make_batch(B, 40, (24, 24))
    kw = dict(shuffle="expected", group_p=group_p, group_size=group_size, teacher_weights=[0.3, 0.7])
    check_against_reference_fp32(inputs, kw)


@pytest.mark.parametrize("shuffle", ["expected", "random"])
def test_fixed_size_groups_with_a_last_group_of_one(shuffle):
    """group_size = 6 at B = 62 (the one-program kernel): the 61 ranks leave a last group of one
    entry, G = ceil(61 / 6) = 11 (a count of B - 2 ranks gives 10 and merges it into the group
    above). Teacher temperature 1 gives the bottom ranks real target mass, so that merge shows
    (the default 0.0125 leaves them ~e^-40 of it): against the float64 reference (expected) or
    the fp32 torch backend (random: the same draw for a seed)."""
    inputs = make_batch(62, 40, (24,))  # z1, z2 [62, 40], one teacher [62, 24]
    kw = dict(shuffle=shuffle, group_size=6, teacher_temperature=1.0, seed=3)
    (check_against_torch_fp32 if shuffle == "random" else check_against_reference_fp32)(inputs, kw)


@pytest.mark.parametrize("loss", ["contrastive_loss", "distillcse_loss"])
def test_rows_that_fit_one_program_with_columns_that_do_not(loss):
    """B = 37 rows fit the one-program kernel, but N = 37 + 30 = 67 contrastive columns pass its
    64 (``small_batch.MAX_COLUMNS``, hard negatives counted): the loss streams instead, and
    matches the float64 reference on the same fp32-rounded inputs (test_matches_reference's fp32 tolerances)."""
    z1, z2, teachers, hard = round_trip(make_batch(37, 48, (32,), Bh=30), torch.float32)  # hard [30, 48]
    results = {}
    for backend, dtype, device in (("reference", torch.float64, "cpu"), ("triton", torch.float32, DEVICE)):
        leaves = [x.to(device, dtype).requires_grad_() for x in (z1, z2, hard)]
        teachers_ = [[t.to(device, dtype) for t in teachers]] if loss == "distillcse_loss" else []
        kw = dict(shuffle="expected") if loss == "distillcse_loss" else {}
        value = getattr(distillcse, loss)(*leaves[:2], *teachers_, hard_negatives=leaves[2], backend=backend, **kw)
        results[backend] = value.detach().double().cpu(), [g.double().cpu() for g in torch.autograd.grad(value, leaves)]
    (ref_loss, ref_grads), (got_loss, got_grads) = results["reference"], results["triton"]
    assert rel_err(got_loss, ref_loss, floor=1.0) < 2e-5
    for g, rg in zip(got_grads, ref_grads):
        assert rel_err(g, rg) < 2e-5


@pytest.mark.parametrize("B", [40, 130])  # one program; streaming kernels
def test_random_shuffle_matches_torch_backend_with_empty_groups(B):
    """Grouping temperature 0.05 puts more than P on single entries, so some groups are empty:
    the shuffle's keys take the real group ids in the torch backend as in the kernels."""
    check_against_torch_fp32(make_batch(B, 24, (16,)), dict(shuffle="random", seed=5, group_p=0.1,
                                                           grouping_temperature=0.05, teacher_temperature=0.05))


@pytest.mark.parametrize("B", [53, 130])  # one program; streaming kernels
def test_random_shuffle_matches_torch_backend_for_a_seed(B):
    # Counter-based keys: the same seed gives the same permutation on every backend and device.
    inputs = make_batch(B, 32, (24, 16), Bh=4)
    kw = dict(shuffle="random", seed=11, group_p=0.2)
    ref_loss, ref_grads = run("torch", inputs, torch.float32, "cpu", **kw)
    loss, grads = run("triton", inputs, torch.float32, DEVICE, **kw)
    again, _ = run("triton", inputs, torch.float32, DEVICE, **kw)
    other, _ = run("triton", inputs, torch.float32, DEVICE, **dict(kw, seed=12))
    assert torch.equal(loss, again) and not torch.equal(loss, other)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-5


@pytest.mark.parametrize("shuffle,dims,group_size", [("expected", (48,), None), ("expected", (24, 16), None),
                                                    ("expected", (48,), 6), ("random", (48,), None)])
def test_threshold_search_path_matches(shuffle, dims, group_size, monkeypatch):
    """Above ``PAIRWISE_MAX_B`` the thresholds come from the search, whose first pass rides on the
    row statistics' teacher slabs (``grid_pass``) and whose last pass gives the group means: here
    B = 130 with the pairwise limit at 64 and an 8-value buffer (no windows in the first pass)."""
    from distillcse import triton_backend
    from distillcse.kernels import group_partition as gp

    monkeypatch.setattr(gp, "PAIRWISE_MAX_B", 64)
    monkeypatch.setattr(gp, "BUFFER", 8)
    made = []
    monkeypatch.setattr(triton_backend, "grid_pass", lambda *a, **kw: made.append(gp.grid_pass(*a, **kw)) or made[-1])
    inputs = make_batch(130, 40, dims)
    kw = dict(shuffle=shuffle, seed=5, group_size=group_size)
    # random: the torch backend draws the same shuffle for the seed (the reference its own)
    ref_loss, ref_grads = run("torch" if shuffle == "random" else "reference", round_trip(inputs, torch.float32),
                              torch.float64, "cpu", **kw)
    loss, grads = run("triton", inputs, torch.float32, DEVICE, **kw)
    assert len(made) == 1 and isinstance(made[0], gp.GridPass)
    assert rel_err(loss, ref_loss, floor=1.0) < 2e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 2e-5


SHARD_CUTS = [0, 37, 37, 101, 130]  # a partition of B = 130 rows, an empty share among them


def _contrastive_run(backend, inputs, dtype, device, rows):
    z1, z2, _, hard = inputs
    leaves = [x.to(device=device, dtype=dtype).requires_grad_() for x in (z1, z2, hard)]
    loss = distillcse.contrastive_loss(*leaves[:2], hard_negatives=leaves[2], backend=backend, rows=rows)
    return loss.detach().double().cpu(), [g.double().cpu() for g in torch.autograd.grad(loss, leaves)]


def _share_runs(backend, inputs, dtype, loss, cuts=SHARD_CUTS, **kw):
    """(loss, gradients) of each share of ``cuts``: ``loss`` "distillcse", "distill" (its
    distill_only form) or "contrastive", with a chunk budget of 32-row slabs (a share spans several)."""
    device = DEVICE if backend == "triton" else "cpu"
    with distillcse.chunk_budget(130 * 8 * 32 / 2**20):
        if loss == "contrastive":
            return [_contrastive_run(backend, inputs, dtype, device, (a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
        kw = dict(kw, distill_only=True) if loss == "distill" else kw
        return [run(backend, inputs, dtype, device, rows=(a, b), **kw) for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("shuffle,loss,thresholds", [
    (shuffle, loss, thresholds) for thresholds in ("pairwise", "search")
    for shuffle, loss in (("none", "distillcse"), ("expected", "distillcse"), ("random", "distillcse"),
                          ("expected", "distill"))] + [("none", "contrastive", "none")])
def test_shares_of_the_rows_match_the_torch_backend(shuffle, loss, thresholds, monkeypatch):
    """``rows=(start, stop)`` on the triton backend (``distillcse.sharded_loss``): each share's
    loss and gradients equal the torch backend's share, with the pairwise thresholds (and tie cuts)
    and with the search (its first pass on the shard's statistics slabs, 8-value buffers); every
    shuffle, K = 2, hard negatives. A share's distillation column side accumulates as the random
    shuffle's does."""
    from distillcse.kernels import group_partition as gp

    if thresholds == "search":
        monkeypatch.setattr(gp, "PAIRWISE_MAX_B", 64)
        monkeypatch.setattr(gp, "BUFFER", 8)
    inputs = make_batch(130, 40, (24, 16), Bh=5)
    kw = dict(shuffle=shuffle, seed=3, group_p=0.2, distill_weight=0.7)
    want = _share_runs("torch", inputs, torch.float32, loss, **kw)
    got = _share_runs("triton", inputs, torch.float32, loss, **kw)
    assert got[1][0] == 0 and all(not g.any() for g in got[1][1])  # the empty share
    for (share, grads), (want_share, want_grads) in zip(got, want):
        assert rel_err(share, want_share, floor=1.0) < 2e-5
        for g, wg in zip(grads, want_grads):
            assert rel_err(g, wg) < 2e-5


@pytest.mark.parametrize("loss", ["distillcse", "contrastive"])
def test_shares_of_a_batch_the_one_program_kernel_takes(loss):
    """B = 37 fits the one-program kernel as a whole, a shard never takes it: the share from row
    0 (and the one after it) each equal the torch backend's share, hard negatives included."""
    inputs = make_batch(37, 40, (24,), Bh=5)
    kw = dict(cuts=(0, 19, 37), shuffle="expected", group_p=0.2)
    got, want = (_share_runs(backend, inputs, torch.float32, loss, **kw) for backend in ("triton", "torch"))
    for (share, grads), (want_share, want_grads) in zip(got, want):
        assert rel_err(share, want_share, floor=1.0) < 2e-5
        for g, wg in zip(grads, want_grads):
            assert rel_err(g, wg) < 2e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_shares_sum_to_the_whole_loss(dtype):
    """16-bit shares (the accumulated column side in hi + lo, fp16's lifted rows) sum to the
    triton backend's whole-batch loss and gradients within the dtype's tolerance (no hard
    negatives: their fp16 gradients here, ~1e-6, are subnormal, 0.035 off the reference whole)."""
    inputs = make_batch(130, 40, (24,))
    kw = dict(shuffle="expected", group_p=0.2)
    with distillcse.chunk_budget(130 * 8 * 32 / 2**20):
        whole, whole_grads = run("triton", inputs, dtype, DEVICE, **kw)
    shares = _share_runs("triton", inputs, dtype, "distillcse", **kw)
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(sum(s for s, _ in shares), whole, floor=1.0) < tol_loss
    for i, wg in enumerate(whole_grads):
        assert rel_err(sum(g[i] for _, g in shares), wg) < tol_grad


@pytest.mark.parametrize("grouping", [dict(group_p=1.0), dict(group_size=200)])
def test_one_group_above_the_pairwise_limit(grouping, monkeypatch):
    """One group (group_p = 1, or a group larger than the row): the expected targets are the
    row's mean, on the search's side of ``PAIRWISE_MAX_B`` (no search: the means of their own)."""
    from distillcse.kernels import group_partition as gp
    monkeypatch.setattr(gp, "PAIRWISE_MAX_B", 64)
    inputs = make_batch(130, 40, (48,))
    check_against_reference_fp32(inputs, dict(shuffle="expected", **grouping))


def test_float64_is_a_clear_error():
    z1, z2, teachers, _ = make_batch(8, 8, (4,))
    with pytest.raises(TypeError, match='backend="triton" takes float16, bfloat16 or float32'):
        distillcse.distillcse_loss(z1.to(DEVICE), z2.to(DEVICE), [t.to(DEVICE) for t in teachers], backend="triton")


@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
def test_never_allocates_a_batch_by_batch_tensor(shuffle):
    """No tensor the triton backend creates in forward or backward (for the whole batch or a
    shard of its rows) is B x B or larger in its last two dims, with a chunk budget of a 64-row
    slab (B = 130); the reference does create one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and min(t.shape[-2:]) >= B:
                    self.square.append((str(func), tuple(t.shape)))
            return out

    B = 130
    inputs = make_batch(B, 40, (24,))
    kw = dict(shuffle=shuffle, seed=3, group_p=0.25)
    with distillcse.chunk_budget(B * 8 * 64 / 2**20):
        with Shapes() as triton_shapes:
            run("triton", inputs, torch.float32, DEVICE, **kw)
            run("triton", inputs, torch.float32, DEVICE, rows=(37, 101), **kw)  # a shard
        with Shapes() as reference_shapes:
            run("reference", inputs, torch.float32, DEVICE, **kw)
    assert triton_shapes.square == [] and reference_shapes.square


@pytest.mark.parametrize("shuffle", ["none", "expected", "random"])
def test_one_program_and_streaming_paths_agree(shuffle, monkeypatch):
    """B = 64 is the largest batch of the one-program path (kernels/small_batch.py; 64 columns,
    so no hard negatives); the streaming kernels must give the same loss and gradients."""
    from distillcse.kernels import small_batch

    inputs = make_batch(64, 48, (40,), Bh=0, seed=5)
    kw = dict(shuffle=shuffle, seed=9)
    loss, grads = run("triton", inputs, torch.float32, DEVICE, **kw)
    monkeypatch.setattr(small_batch, "MAX_ROWS", 0)
    streamed, streamed_grads = run("triton", inputs, torch.float32, DEVICE, **kw)
    assert rel_err(loss, streamed, floor=1.0) < 2e-5
    for g, sg in zip(grads, streamed_grads):
        assert rel_err(g, sg) < 2e-5


def _streamed_losses(z1, z2, teacher, backend):
    """The three public losses, by name (B > 64: the streaming kernels)."""
    return {
        "contrastive": distillcse.contrastive_loss(z1, z2, backend=backend),
        "distill": distillcse.distill_loss(z1, teacher, shuffle="expected", backend=backend),
        "distillcse": distillcse.distillcse_loss(z1, z2, teacher, shuffle="expected", backend=backend),
    }


@pytest.mark.parametrize("name", ["contrastive", "distill", "distillcse"])
def test_backward_twice_is_a_clear_error(name):
    """The streaming path's backward reuses its gradient buffer in place: once per forward."""
    z1, z2, teachers, _ = make_batch(70, 16, (8,))
    z1 = z1.float().to(DEVICE).requires_grad_()
    loss = _streamed_losses(z1, z2.float().to(DEVICE), teachers[0].float().to(DEVICE), "triton")[name]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        loss.backward()


@pytest.mark.parametrize("B", [40, 70])  # one program; streaming kernels
@pytest.mark.parametrize("name", ["contrastive", "distill", "distillcse"])
def test_upstream_gradient_scales_the_forward_gradient(name, B):
    """The forward writes z1's gradient for dL/dloss = 1 and the backward scales it: a loss
    weighted by -2.5 inside a larger graph gets -2.5 times it (against the torch backend)."""
    z1, z2, teachers, _ = make_batch(B, 16, (8,))
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [x.float().to(DEVICE).requires_grad_() for x in (z1, z2)]
        loss = _streamed_losses(*leaves, teachers[0].float().to(DEVICE), backend)[name]
        (1.0 - 2.5 * loss).backward()
        grads[backend] = [leaf.grad for leaf in leaves if leaf.grad is not None]
    assert len(grads["triton"]) == len(grads["torch"]) >= 1
    for ours, want in zip(grads["triton"], grads["torch"]):
        assert rel_err(ours.double().cpu(), want.double().cpu()) < 2e-5


@pytest.mark.parametrize("name", ["contrastive", "distill", "distillcse"])
def test_fp16_gradients_under_a_loss_scaler(name):
    """float16 with a loss scaler (dL/dloss = 2^16) on the streaming path: the gradient the
    forward writes must not underflow before the backward applies the scale, against the
    float64 reference on the same rounded inputs. Embeddings of norm ~10^4 put the mean's
    gradient near 4e-8, deep in fp16's subnormals (B = 65,536 at norm ~10 is 1e-6): written at
    the mean's 1 / B (commit 3b56b4c) z1's contrastive gradient was 15% off (40% zeros) here;
    written at the sum's, 3e-4."""
    B, scale = 512, 65536.0
    z1, z2, teachers, _ = make_batch(B, 64, (32,), seed=3)
    z1, z2 = 1000.0 * z1, 1000.0 * z2
    grads = {}
    for backend, dtype, device in (("reference", torch.float64, "cpu"), ("triton", torch.float16, DEVICE)):
        rounded = [x.to(torch.float16).to(device, dtype).requires_grad_() for x in (z1, z2)]
        teacher = teachers[0].to(torch.float16).to(device, dtype)
        loss = _streamed_losses(*rounded, teacher, backend)[name]
        (scale * loss).backward()
        grads[backend] = [x.grad.double().cpu() / scale for x in rounded if x.grad is not None]
    assert len(grads["triton"]) == len(grads["reference"]) >= 1
    for ours, want in zip(grads["triton"], grads["reference"]):
        assert rel_err(ours, want) < 2e-3


@pytest.mark.parametrize("name,shuffle", [("contrastive", None), ("distill", "expected"), ("distill", "random"),
                                          ("distillcse", "expected"), ("distillcse", "random")])
def test_fp16_rows_of_small_norm_keep_finite_gradients(name, shuffle):
    """fp16 rows of norm 1e-4 and 1e-5 among ordinary ones, on the streaming path (B = 66): the gradient
    of the sum of the row losses, which the forward writes, grows as 1 / |z1_i| and passed fp16's
    range (inf, where the mean's is 1e3 to 6e3); the rows are lifted by powers of two (exact), and the
    gradients match the float64 torch backend's on the same rounded inputs (its random shuffle
    is the kernels' for a seed)."""
    z1, z2, teachers, _ = make_batch(66, 16, (8,), seed=5)
    small = torch.arange(66) % 3 == 0   # norms 1e-4 and, past fp16's range once lifted (2^17), 1e-5
    z1[small] *= torch.where(torch.arange(66)[small, None] % 2 == 0, 1e-4, 1e-5) / z1[small].norm(dim=1, keepdim=True)
    kw = dict(shuffle=shuffle, seed=4)
    grads = {}
    for backend, dtype, device in (("torch", torch.float64, "cpu"), ("triton", torch.float16, DEVICE)):
        leaves = [x.to(torch.float16).to(device, dtype).requires_grad_() for x in (z1, z2)]
        teacher = teachers[0].to(torch.float16).to(device, dtype)
        loss = {"contrastive": lambda: distillcse.contrastive_loss(*leaves, backend=backend),
                "distill": lambda: distillcse.distill_loss(leaves[0], teacher, backend=backend, **kw),
                "distillcse": lambda: distillcse.distillcse_loss(*leaves, teacher, backend=backend, **kw)}[name]()
        loss.backward()
        grads[backend] = [x.grad.double().cpu() for x in leaves if x.grad is not None]
    assert 66 * grads["torch"][0][small].abs().max() > 65504   # the sum's gradient: beyond fp16
    for ours, want in zip(grads["triton"], grads["torch"]):
        assert torch.isfinite(ours).all() and rel_err(ours, want) < 1e-2   # fp16 rows: 4e-4 to 2.8e-3


def test_fp16_zero_row_gradient_is_inf_not_nan():
    """An all-zero fp16 row of z1 on the streaming path (B = 66): cos divides it by eps, so its
    gradient (~1e7) is beyond fp16 and comes out +-Inf, as on the torch backend, not NaN (the
    lift must take c = 1 for a zero row: 2^-floor(log2 0) = inf gave 0 * inf); the other rows
    match the float64 torch backend's."""
    z1, z2, teachers, _ = make_batch(66, 16, (8,), seed=5)
    z1[3] = 0.0
    grads = {}
    for backend, dtype, device in (("torch", torch.float64, "cpu"), ("triton", torch.float16, DEVICE)):
        leaves = [x.to(torch.float16).to(device, dtype).requires_grad_() for x in (z1, z2)]
        losses = _streamed_losses(*leaves, teachers[0].to(torch.float16).to(device, dtype), backend)
        grads[backend] = {name: torch.autograd.grad(loss, leaves[0])[0].double().cpu() for name, loss in losses.items()}
    others = torch.arange(66) != 3
    for name, want in grads["torch"].items():
        got = grads["triton"][name]
        assert not got.isnan().any() and got[3].isinf().any(), name
        if name != "distillcse":  # there the contrastive part adds to the distillation's fp16 Inf: its sign
            assert torch.equal(got[3].sign(), want[3].sign()), name
        assert rel_err(got[others], want[others]) < 1e-2, name


def _check_frozen_block(loss_of, z1, z2, hard, frozen, tol, monkeypatch):
    """``loss_of(z1, z2, hard_negatives, backend)`` backpropagated on each backend with the
    ``frozen`` block ("z2", "hard_negatives" or "none") asking for no gradient: the triton
    backward's column GEMMs take the other blocks' rows only, and every gradient matches the
    torch backend's within ``tol``, in the inputs' dtype."""
    from distillcse import triton_backend

    columns_asked = []
    real_bwd = triton_backend.contrastive_bwd_dy
    monkeypatch.setattr(triton_backend, "contrastive_bwd_dy", lambda *a, **k: columns_asked.append(
        tuple(k["blocks_needed"])) or real_bwd(*a, **k))
    grads = {}
    for backend in ("torch", "triton"):
        leaves = {"z1": z1.clone().requires_grad_(), "z2": z2.clone().requires_grad_(frozen != "z2"),
                  "hard_negatives": hard.clone().requires_grad_(frozen != "hard_negatives")}
        loss_of(leaves["z1"], leaves["z2"], leaves["hard_negatives"], backend).backward()
        grads[backend] = {name: x.grad for name, x in leaves.items()}
    assert columns_asked == [(frozen != "z2", frozen != "hard_negatives")]
    for name, want in grads["torch"].items():
        got = grads["triton"][name]
        assert (got is None) == (want is None) == (name == frozen)
        if got is not None:
            assert got.dtype == z1.dtype and rel_err(got.double().cpu(), want.double().cpu()) < tol, name


@pytest.mark.parametrize("frozen", ["hard_negatives", "z2"])
def test_contrastive_loss_streaming_with_a_frozen_block(frozen, monkeypatch):
    """contrastive_loss alone on the streaming path (B = 70), fp32, with z2 or the hard negatives
    frozen: the backward computes the other block's gradient only (autograd's flags for its
    inputs z2 and hn, not z1's and z2's), matching the torch backend."""
    z1, z2, _, hard = (x.float().to(DEVICE) if torch.is_tensor(x) else x for x in make_batch(70, 16, (8,), Bh=9, seed=2))
    _check_frozen_block(lambda a, b, h, backend: distillcse.contrastive_loss(a, b, hard_negatives=h, temperature=0.5,
                                                                             backend=backend),
                        z1, z2, hard, frozen, 2e-5, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frozen", ["none", "hard_negatives", "z2"])
def test_hard_negatives_streaming_and_frozen(dtype, frozen, monkeypatch):
    """16-bit hard negatives on the streaming path (B = 130) against the torch backend, also
    with the hard negatives or z2 frozen (no gradient asked): the frozen block's gradient is
    not computed (the column GEMMs take the other block's rows only)."""
    z1, z2, teachers, hard = (x.to(DEVICE, dtype) for x in
                              (lambda b: (b[0], b[1], b[2][0], b[3]))(make_batch(130, 48, (32,), Bh=23, seed=4)))
    _check_frozen_block(lambda a, b, h, backend: distillcse.distillcse_loss(a, b, teachers, hard_negatives=h,
                                                                            shuffle="expected", backend=backend),
                        z1, z2, hard, frozen, TOL[dtype][1], monkeypatch)


@pytest.mark.parametrize("B", [40, 70])
def test_no_gradient_work_without_autograd(B, monkeypatch):
    """Under torch.no_grad (or with inputs that need no gradient) no gradient is computed."""
    from distillcse import triton_backend

    asked = []
    for name in ("small_batch_loss", "distill_loss_and_grad"):
        real = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name,
                            lambda *a, _real=real, **k: asked.append(k["need_grad"]) or _real(*a, **k))
    real_contrastive = triton_backend.contrastive_fwd  # its gradient: grad_rows given or not
    monkeypatch.setattr(triton_backend, "contrastive_fwd", lambda *a, **k: asked.append(
        (a[5] if len(a) > 5 else k.get("grad_rows")) is not None) or real_contrastive(*a, **k))
    z1, z2, teachers, _ = (x.float().to(DEVICE) if torch.is_tensor(x) else x for x in make_batch(B, 16, (8,)))
    teacher = teachers[0].float().to(DEVICE)
    z1.requires_grad_()
    with torch.no_grad():
        distillcse.distillcse_loss(z1, z2, teacher, backend="triton")
        distillcse.contrastive_loss(z1, z2, backend="triton")
    distillcse.distill_loss(z1.detach(), teacher, backend="triton")
    loss = distillcse.distillcse_loss(z1, z2, teacher, backend="triton")
    if B <= 64:  # one program a call
        assert asked == [False, False, False, True]
    else:  # the full loss streams the distillation, then the contrastive term
        assert asked == [False, False, False, False, True, True]
    loss.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("B,kw", [(37, dict(shuffle="random")), (70, dict(shuffle="expected")),
                                  (70, dict(shuffle="random", group_size=1))])  # 69 groups: torch's row chunks
def test_return_terms_are_the_two_losses(backend, B, kw):
    """``return_terms``: L_cl and the unweighted L_kd of the same pass (the one-program kernel,
    the fused streaming Function, the triton backend's torch fallback), detached, equal to the
    separate losses for the same seed; the loss is unchanged."""
    z1, z2, teachers, hard = make_batch(B, 24, (16, 8), Bh=5)
    z1, z2, hard = (x.float().to(DEVICE).requires_grad_() for x in (z1, z2, hard))
    teachers = [t.float().to(DEVICE) for t in teachers]
    kw = dict(kw, seed=11, backend=backend)
    loss, terms = distillcse.distillcse_loss(z1, z2, teachers, hard_negatives=hard, distill_weight=0.7,
                                             return_terms=True, **kw)
    cl = distillcse.contrastive_loss(z1, z2, hard_negatives=hard, backend=backend)
    kd = distillcse.distill_loss(z1, teachers, **kw)
    assert set(terms) == {"contrastive", "distill"}
    assert not terms["contrastive"].requires_grad and not terms["distill"].requires_grad and loss.requires_grad
    assert terms["contrastive"].item() == pytest.approx(cl.item(), rel=1e-5)
    assert terms["distill"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert loss.item() == pytest.approx(cl.item() + 0.7 * kd.item(), rel=1e-5)
    assert loss.item() == distillcse.distillcse_loss(z1, z2, teachers, hard_negatives=hard, distill_weight=0.7,
                                                     **kw).item()
    only, only_terms = distillcse.distillcse_loss(z1, z2, teachers, distill_only=True, distill_weight=0.7,
                                                  return_terms=True, **kw)
    assert set(only_terms) == {"distill"} and only.item() == pytest.approx(0.7 * kd.item(), rel=1e-5)
    with pytest.raises(TypeError, match="return_terms must be a bool"):
        distillcse.distillcse_loss(z1, z2, teachers, return_terms="yes", **kw)


@pytest.mark.parametrize("B", [37, 70])  # the one-program kernel, the streaming Functions
def test_inside_torch_compile(B):
    """A training step under ``torch.compile`` calling the fused losses gets the eager losses and
    gradients: the kernels run outside the graph (a graph break around the loss)."""
    z1, z2, teachers, hard = make_batch(B, 24, (16,), Bh=5)
    teacher = teachers[0].float().to(DEVICE)

    def step(a, b, h):
        e1, e2 = 2.0 * a, b + 0.5  # work around the loss for the compiler to trace
        return (distillcse.distillcse_loss(e1, e2, teacher, hard_negatives=h, seed=5, backend="triton")
                + distillcse.contrastive_loss(e1, e2, backend="triton")
                + distillcse.distill_loss(e1, teacher, shuffle="expected", backend="triton"))

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        leaves = [x.float().to(DEVICE).requires_grad_() for x in (z1, z2, hard)]
        loss = fn(*leaves)
        results.append([loss.detach()] + list(torch.autograd.grad(loss, leaves)))
    torch._dynamo.reset()
    for compiled, eager in zip(results[1], results[0]):
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("B", [8, 70])  # the one-program kernel, the streaming Functions
def test_loss_takes_in_place_arithmetic(B):
    """``loss /= accumulation_steps`` (gradient accumulation) works on every entry point: the
    loss is no view of a buffer that also holds the terms."""
    z1, z2, teachers, _ = make_batch(B, 16, (8,))
    teacher = teachers[0].float().to(DEVICE)
    for name in ("contrastive", "distill", "distillcse"):
        leaf = z1.float().to(DEVICE).requires_grad_()
        loss = _streamed_losses(leaf, z2.float().to(DEVICE), teacher, "triton")[name]
        value = loss.item()
        loss /= 4
        loss.backward()
        assert loss.item() == pytest.approx(value / 4) and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("B", [40, 130])  # the one-program kernel, the streaming Functions
def test_random_shuffle_key_drawn_on_the_device_while_capturing(B, monkeypatch):
    """While a CUDA graph is being captured (simulated here: ``checks.capturing`` patched), a
    random shuffle without an int seed takes its key from a draw on the GPU, which every replay
    repeats: the same key and loss as the eager step's host draw from the same RNG state; a new
    one on the next draw. A CPU generator, which would be drawn once at capture, is refused."""
    inputs = make_batch(B, 48, (32,), seed=2)
    torch.manual_seed(7)
    eager = run("triton", inputs, torch.float32, DEVICE, shuffle="random", seed=None)
    monkeypatch.setattr(distillcse.checks, "capturing", lambda x: True)
    assert isinstance(distillcse.api._step_seed(None, inputs[0]), torch.Tensor)
    torch.manual_seed(7)
    drawn = run("triton", inputs, torch.float32, DEVICE, shuffle="random", seed=None)
    assert torch.equal(drawn[0], eager[0]) and all(torch.equal(a, b) for a, b in zip(drawn[1], eager[1]))
    assert not torch.equal(run("triton", inputs, torch.float32, DEVICE, shuffle="random", seed=None)[0], drawn[0])
    with pytest.raises(ValueError, match=r"seed: a cpu torch.Generator .* cannot draw a new shuffle on each replay"):
        run("triton", inputs, torch.float32, DEVICE, shuffle="random", seed=torch.Generator().manual_seed(1))
    fixed = run("triton", inputs, torch.float32, DEVICE, shuffle="random", seed=5)  # an int: the same shuffle
    monkeypatch.undo()
    assert torch.equal(fixed[0], run("triton", inputs, torch.float32, DEVICE, shuffle="random", seed=5)[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("B", [64, 200])  # the one-program kernel, the streaming Functions (no host sync)
def test_a_training_step_replays_as_a_cuda_graph(B):
    """Forward and backward captured in a CUDA graph (the input check is skipped while capturing)
    and replayed on new inputs copied into the captured ones: the eager loss and gradients, with
    shuffle expected and random (an int seed); a random shuffle without one differs at each replay."""
    z1, z2, teachers, _ = make_batch(B, 64, (48,))
    static = [x.float().cuda().requires_grad_() for x in (z1, z2)]
    teacher = teachers[0].float().cuda()

    def capture(**kw):
        def step():
            loss = distillcse.distillcse_loss(*static, teacher, backend="triton", **kw)
            return [loss.detach()] + list(torch.autograd.grad(loss, static))

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: Triton compiles outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        return graph, captured, step

    for kw in (dict(shuffle="expected"), dict(shuffle="random", seed=11)):
        graph, captured, step = capture(**kw)
        fresh = make_batch(B, 64, (48,), seed=1)
        with torch.no_grad():
            for leaf, x in zip(static, fresh[:2]):
                leaf.copy_(x.float())
        graph.replay()
        eager = step()
        for c, e in zip(captured, eager):
            assert torch.allclose(c, e, rtol=1e-6, atol=1e-7)
    # Without an int seed each replay draws its own shuffle (its key drawn on the GPU), as eager steps do.
    graph, captured, _ = capture(shuffle="random")
    losses = set()
    for _ in range(3):
        graph.replay()
        losses.add(captured[0].item())
    assert len(losses) == 3


@pytest.mark.parametrize("B", [12, 70])
def test_rows_shorter_than_eps(B):
    """cos divides a row shorter than eps = 1e-8 by eps, so its gradient has no projection
    (I - u u^T): a z1 row and a z2 row scaled to ~3e-9, against the float64 reference (the
    kernels projected them: 0.04-6% off). B = 12 runs the one-program kernel, 70 streams."""
    z1, z2, teachers, _ = make_batch(B, 8, (5,), seed=3)
    z1[2] *= 1e-9
    z2[5] *= 1e-9
    grads = {}
    for backend, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        x1, x2 = (z.to(dtype).to(DEVICE).requires_grad_() for z in (z1, z2))
        loss = distillcse.distillcse_loss(x1, x2, [teachers[0].to(dtype).to(DEVICE)], shuffle="none", backend=backend)
        grads[backend] = torch.autograd.grad(loss, (x1, x2))
    for got, want in zip(grads["triton"], grads["reference"]):
        for row in (2, 5):
            assert rel_err(got[row].double().cpu(), want[row].cpu()) < 1e-5, row
