"""kernels/contrastive.py against a naive float64 PyTorch InfoNCE (SPEC section 1)."""

import pytest
import torch

from conftest import DEVICE, requires_triton

pytestmark = requires_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
SCALE = 1 / 0.05


def _inv_norm(a):
    return 1.0 / a.float().norm(dim=1).clamp_min(1e-8)


def _reference(x, y, scale, grad_rows):
    """float64: (loss_rows, lse, dx, dy) by normalise, matmul, logsumexp and autograd."""
    B = x.shape[0]
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    ux = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    uy = y / y.norm(dim=1, keepdim=True).clamp_min(1e-8)
    logits = scale * ux @ uy.T
    lse = torch.logsumexp(logits, dim=1)
    loss_rows = lse - logits[:, :B].diagonal()
    (grad_rows.double() * loss_rows).sum().backward()
    return loss_rows.detach(), lse.detach(), x.grad, y.grad


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check(x, y, grad_rows, tol):
    from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

    rx, ry = _inv_norm(x), _inv_norm(y)
    loss, stats, dx = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows)
    loss_only, stats_only, no_dx = contrastive_fwd(x, rx, y, ry, SCALE)
    assert no_dx is None
    for name, a, b in (("loss_rows", loss_only, loss), ("stats", stats_only, stats)):  # the same sums, dx or not
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"{name} without dx")
    lse = stats[0]
    dy = contrastive_bwd_dy(x, rx, y, ry, stats, SCALE, grad_rows)
    refs = _reference(x, y, SCALE, grad_rows)
    dtypes = (torch.float32, torch.float32, x.dtype, x.dtype)
    for name, out, ref, dtype in zip(("loss_rows", "lse", "dx", "dy"), (loss, lse, dx, dy), refs, dtypes):
        ref = ref.to(dtype).double()  # the best an output of this dtype can hold (fp16 underflows)
        assert out.shape == ref.shape and out.dtype == dtype, name
        assert torch.isfinite(out).all(), f"{name} has non-finite entries (unwritten output?)"
        assert _rel(out, ref) <= tol, f"{name}: relative error {_rel(out, ref):.2e} > {tol:.0e}"


def _views(B, n_hard, D, dtype, device, seed=0, noise=3.0):
    """Positives z1 + noise * N(0, 1): noise 3 puts cos(z1_i, z2_i) near 0.3, so the losses are
    O(1) (``test_near_perfect_positives`` takes small noise)."""
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(B, D, generator=gen)
    y = torch.cat([z1 + noise * torch.randn(B, D, generator=gen), torch.randn(n_hard, D, generator=gen)])
    return z1.to(device, dtype), y.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_hard", [0, 23])
@pytest.mark.parametrize("B, D", [(37, 48), (130, 96)])
def test_odd_shapes(B, D, n_hard, dtype, device):
    x, y = _views(B, n_hard, D, dtype, device)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [48, 200])
def test_random_grad_rows_and_non_contiguous(D, dtype, device):
    """Row stride 3 D; D = 200 also takes two feature splits in the backward."""
    B, n_hard = 37, 23
    x, y = _views(B, n_hard, 3 * D, dtype, device, seed=1)
    x, y = x[:, 5 : 5 + D], y[:, D : 2 * D]  # row stride 3 D, feature stride 1
    assert not x.is_contiguous() and not y.is_contiguous()
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(2)).to(device)
    _check(x, y, grad_rows, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_scale", [1e-4, 65536.0])
def test_grad_rows_magnitude(grad_scale, dtype, device):
    """Tiny (mean over a big batch) and loss-scaled upstream gradients: g_i enters the half
    precision operand of the du_y dot, so it must neither underflow nor overflow there (the
    fp16 outputs of the tiny case are themselves subnormal: compared with the reference in fp16)."""
    B = 37
    x, y = _views(B, 23, 48, dtype, device, seed=7)
    _check(x, y, torch.full((B,), grad_scale / B, device=device), TOL[dtype])


@pytest.mark.parametrize("noise", [0.3, 0.01])
def test_near_perfect_positives(noise, device):
    """Losses of ~3e-6 (P_ii = 1 - 3e-6): loss_i = -log P_ii and the gradients' P_ii - 1 come from
    the off-diagonal sum, not as a difference from 1 (which left 1e-2 relative errors in fp32)."""
    B = 130
    x, y = _views(B, 23, 96, torch.float32, device, seed=10, noise=noise)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 5e-5)


def test_feature_stride_not_one(device):
    B, D = 37, 48
    x, y = _views(B, 0, D, torch.float32, device, seed=3)
    _check(x.T.contiguous().T, y.T.contiguous().T, torch.full((B,), 2.0 / B, device=device), 1e-5)


def test_zero_rows(device):
    B, n_hard, D = 37, 23, 48
    x, y = _views(B, n_hard, D, torch.float32, device, seed=4)
    x[3] = 0.0  # rx = 1e8, every cosine of row 3 is 0
    y[5] = 0.0  # a zero positive
    y[B + 7] = 0.0  # a zero hard negative
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 1e-5)


@pytest.mark.parametrize("n_hard", [0, 3])
@pytest.mark.parametrize("D", [48, 200])
def test_two_rows(D, n_hard, device):
    x, y = _views(2, n_hard, D, torch.float32, device, seed=5, noise=10.0)
    _check(x, y, torch.tensor([0.5, -1.5], device=device), 1e-5)


@pytest.mark.parametrize("D", [5, 300])
def test_feature_dim_split(D, device):
    """D below the smallest tl.dot block (16), and D over one program's output blocks: the
    backward then splits the output features over the grid (D = 300 under the interpreter:
    3 splits of 4 blocks of 32, the last split partly and its last two blocks fully masked)."""
    B = 37
    x, y = _views(B, 23, D, torch.float32, device, seed=6)
    _check(x, y, torch.full((B,), 1.0 / B, device=device), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_out", [1, 2, 3, 4])
def test_output_blocks(n_out, dtype, monkeypatch, device):
    """Every accumulator count of the backward (b_acc0..b_acc3), each with several feature
    splits and a partly or fully masked last block: D = 100 in blocks of 16, N > B."""
    import distillcse.kernels.contrastive as C

    default = C._config

    def config(D, dtype):
        cfg, blocks = default(D, dtype), dict(BD_OUT=16, N_OUT=n_out)
        return dict(cfg, fwd_grad=dict(cfg["fwd_grad"], **blocks), dy=dict(cfg["dy"], **blocks))

    monkeypatch.setattr(C, "_config", config)
    B, D = 37, 100
    assert C._feature_splits(D, config(D, dtype)["fwd_grad"]) >= 2
    x, y = _views(B, 23, D, dtype, device, seed=8)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(9)).to(device)
    _check(x, y, grad_rows, TOL[dtype])


@pytest.mark.parametrize("D, max_block, max_blocks, expected", [
    (768, 128, 4, (128, 3, 2)),  # 2 splits of 3 x 128, not 2 of 4 x 128
    (384, 128, 4, (128, 3, 1)),
    (1024, 128, 4, (128, 4, 2)),
    (1024, 128, 3, (128, 3, 3)),
    (768, 128, 1, (128, 1, 6)),
    (100, 128, 4, (128, 1, 1)),
    (5, 128, 4, (16, 1, 1)),
    (300, 32, 4, (32, 4, 3)),
])
def test_output_block_choice(D, max_block, max_blocks, expected):
    """(BD_OUT, N_OUT, feature splits): the fewest splits, then the fewest blocks per split."""
    from distillcse.kernels.contrastive import _feature_splits, _output_blocks

    blocks = _output_blocks(D, max_block, max_blocks)
    assert (blocks["BD_OUT"], blocks["N_OUT"], _feature_splits(D, blocks)) == expected


@pytest.mark.parametrize("dtype, matmul_precision, n_out, narrow", [
    (torch.bfloat16, "highest", 3, (64, 64, 64)), (torch.float16, "highest", 3, (64, 64, 64)),
    (torch.float32, "high", 3, (32, 32, 64)), (torch.float32, "highest", 1, (32, 32, 32)),
])
def test_gpu_config_at_768(dtype, matmul_precision, n_out, narrow, monkeypatch):
    """The GPU launch configuration (pure Python, checked without a GPU): 64-row programs and
    one K-chunk (128) everywhere; 16-bit inputs share the 64 x 64 logits tile, fp32 streams 32
    columns in the dx-writing forward and 32 rows in dy (dy's own rows: 32 with "ieee" dots);
    at D = 768 two feature splits of 3 x 128 (6 GEMM-equivalents for forward + backward), and
    one block of 128 for fp32 "ieee" dots."""
    import distillcse.kernels.contrastive as C

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: matmul_precision)
    cfg = C._config(768, dtype)
    assert {k: cfg["fwd"][k] for k in ("BM", "BN", "BD")} == dict(BM=64, BN=64, BD=128)
    assert cfg["fwd_grad"]["BM"] == 64
    assert (cfg["fwd_grad"]["BN"], cfg["dy"]["BM"], cfg["dy"]["BN"]) == narrow  # streamed, streamed, own rows
    for kernel in ("fwd_grad", "dy"):
        assert cfg[kernel]["BD"] == 128, "one K-chunk: the dy kernel sums the logits as the forward did"
        assert (cfg[kernel]["BD_OUT"], cfg[kernel]["N_OUT"]) == (128, n_out)
    assert C._feature_splits(768, cfg["fwd_grad"]) == (2 if n_out == 3 else 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dx_adds_another_gradient_in_place(dtype, device):
    """``add_to``: dx is written into the given tensor as dx + add_scale * its values."""
    from distillcse.kernels.contrastive import contrastive_fwd

    B, D = 37, 200
    x, y = _views(B, 23, D, dtype, device, seed=2)
    rx, ry = _inv_norm(x), _inv_norm(y)
    grad_rows = torch.full((B,), 1.0 / B, device=device)
    loss, _, dx = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows)
    other = torch.randn(B, D, generator=torch.Generator().manual_seed(3)).to(device, dtype) * dx.double().abs().max().item()
    want = dx.double() + 0.3 * other.double()
    buffer = other.clone()
    loss_again, _, dx_sum = contrastive_fwd(x, rx, y, ry, SCALE, grad_rows, add_to=buffer, add_scale=0.3)
    assert dx_sum.data_ptr() == buffer.data_ptr()
    assert torch.equal(loss_again, loss)
    assert _rel(dx_sum, want) <= (1e-6 if dtype == torch.float32 else 2e-3)