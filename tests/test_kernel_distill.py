"""kernels/distill.py against naive float64 PyTorch formulas (SPEC sections 2, 3, 5, 6)."""
import math

import pytest
import torch

from conftest import DEVICE, requires_triton

pytestmark = requires_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
STUDENT, TEACHER, GROUPING = 1 / 0.025, 1 / 0.0125, 1 / 0.7
N_GROUPS = 10


def _inputs(B, D, Dt, dtype, device, *, zero_row=False, strided=False, seed=0):
    """Student rows x [B, D], inverse norms rx [B], teacher rows t [B, Dt] (two components of
    weight 1/2, normalised and concatenated). ``strided`` gives non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    k = Dt // 2
    e1 = x[:, :1].repeat(1, k) + torch.randn(B, k, generator=gen)  # teacher 1 agrees a little
    e2 = torch.randn(B, Dt - k, generator=gen)
    t = torch.cat([e / e.norm(dim=1, keepdim=True) for e in (e1, e2)], dim=1) * math.sqrt(0.5)
    if zero_row:
        x[B // 2] = 0.0
    x, t = x.to(dtype), t.to(dtype)
    rx = 1.0 / x.float().norm(dim=1).clamp_min(1e-8)
    if strided:
        x = torch.cat([x, torch.ones(B, 7, dtype=dtype)], dim=1)[:, :D]  # row stride D + 7
        t = torch.stack([t, torch.ones_like(t)], dim=2).flatten(1)[:, ::2]  # feature stride 2
        rx = torch.stack([rx, torch.ones_like(rx)], dim=1)[:, 0]  # stride 2
        assert not (x.is_contiguous() or t.is_contiguous() or rx.is_contiguous())
    return x.to(device), rx.to(device), t.to(device)


def _logits(x, rx, t):
    """float64 (u, s, t, off-diagonal mask)."""
    u = x.double() * rx.double()[:, None]
    tt = t.double() @ t.double().T
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return u, u @ u.T, tt, off


def _groups(t):
    """(thr [B, G-1], qbar [B, G]) in fp32: thresholds halfway between neighbouring sorted
    off-diagonal t (so fp32 rounding of t cannot move an entry across), qbar = group means of q."""
    B = t.shape[0]
    tt = t.double() @ t.double().T
    off = ~torch.eye(B, dtype=torch.bool, device=t.device)
    vals = tt[off].view(B, B - 1).sort(dim=1, descending=True).values
    ext = torch.cat([vals[:, :1] + 0.5, vals, vals[:, -1:] - 0.5], dim=1)  # [B, B + 1]
    cut = [min(B - 1, (g + 1) * (B - 1) // N_GROUPS) for g in range(N_GROUPS - 1)]
    thr = torch.stack([(ext[:, c] + ext[:, c + 1]) / 2 for c in cut], dim=1).float()
    q = torch.softmax((TEACHER * tt).masked_fill(~off, -math.inf), dim=1)
    grp = (tt[:, :, None] < thr.double()[:, None, :]).sum(-1)
    onehot = torch.nn.functional.one_hot(grp, N_GROUPS).double() * off[:, :, None]
    qbar = (q[:, :, None] * onehot).sum(1) / onehot.sum(1).clamp_min(1)
    return thr, qbar.float()


def _reference(x, rx, t, grad_rows, thr=None, qbar=None):
    """float64 (lse_s, lse_t, lse_g, t_min, t_max, loss_rows, du) from B x B matrices."""
    u, s, tt, off = _logits(x, rx, t)
    neg = lambda a: a.masked_fill(~off, -math.inf)  # noqa: E731
    lse_s, lse_t, lse_g = (torch.logsumexp(neg(c * m), 1)
                           for c, m in ((STUDENT, s), (TEACHER, tt), (GROUPING, tt)))
    t_min = tt.masked_fill(~off, math.inf).min(1).values
    t_max = neg(tt).max(1).values
    if thr is None:
        q = torch.softmax(neg(TEACHER * tt), dim=1)
    else:
        grp = (tt[:, :, None] < thr.double()[:, None, :]).sum(-1)
        q = qbar.double().gather(1, grp).masked_fill(~off, 0.0)
    u = u.detach().requires_grad_()
    log_p = torch.log_softmax(neg(STUDENT * (u @ u.T)), dim=1).masked_fill(~off, 0.0)
    loss_rows = -(q * log_p).sum(1)
    (grad_rows.double() * loss_rows).sum().backward()
    return lse_s, lse_t, lse_g, t_min, t_max, loss_rows.detach(), u.grad


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(name, out, ref, tol):
    assert out.shape == ref.shape and out.dtype == torch.float32, name
    assert torch.isfinite(out).all(), f"{name} has non-finite entries (unwritten output?)"
    assert _rel(out, ref) <= tol, f"{name}: relative error {_rel(out, ref):.2e} > {tol:.0e}"


def _run_and_check(x, rx, t, grad_rows, shuffle, tol):
    from distillcse.kernels.distill import distill_bwd, distill_fwd, distill_row_stats

    thr, qbar = _groups(t) if shuffle else (None, None)
    stats = distill_row_stats(x, rx, t, STUDENT, TEACHER, GROUPING)
    lse_s, lse_t = stats[0], stats[1]
    loss = distill_fwd(x, rx, t, lse_s, lse_t, STUDENT, TEACHER, thr=thr, qbar=qbar)
    du = distill_bwd(x, rx, t, lse_s, lse_t, STUDENT, TEACHER, grad_rows, thr=thr, qbar=qbar)
    refs = _reference(x, rx, t, grad_rows, thr, qbar)
    names = ("lse_s", "lse_t", "lse_g", "t_min", "t_max", "loss_rows", "du")
    for name, out, ref in zip(names, (*stats, loss, du), refs):
        _check(name, out, ref, tol)


@pytest.mark.parametrize("shuffle", [False, True], ids=["plain", "shuffled"])
@pytest.mark.parametrize("B,D,Dt", [(37, 48, 32), (130, 96, 80)])
def test_distill_matches_naive(B, D, Dt, shuffle, device):
    x, rx, t = _inputs(B, D, Dt, torch.float32, device)
    grad_rows = torch.rand(B, generator=torch.Generator().manual_seed(1)).to(device) + 0.5
    _run_and_check(x, rx, t, grad_rows, shuffle, TOL[torch.float32])


@pytest.mark.parametrize("shuffle", [False, True], ids=["plain", "shuffled"])
def test_distill_noncontiguous_zero_row_signed_grad(shuffle, device):
    """Strided x, t and rx, an all-zero student row, and an upstream gradient of both signs."""
    B = 37
    x, rx, t = _inputs(B, 48, 32, torch.float32, device, zero_row=True, strided=True)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(2)).to(device)
    _run_and_check(x, rx, t, grad_rows, shuffle, TOL[torch.float32])


@pytest.mark.parametrize("shuffle", [False, True], ids=["plain", "shuffled"])
def test_distill_two_rows(shuffle, device):
    """B = 2: one column per row, q~ = 1, so the loss and du vanish up to rounding."""
    x, rx, t = _inputs(2, 48, 32, torch.float32, device)
    from distillcse.kernels.distill import distill_bwd, distill_fwd, distill_row_stats

    thr, qbar = _groups(t) if shuffle else (None, None)
    stats = distill_row_stats(x, rx, t, STUDENT, TEACHER, GROUPING)
    grad_rows = torch.tensor([0.7, -1.3], device=device)
    loss = distill_fwd(x, rx, t, stats[0], stats[1], STUDENT, TEACHER, thr=thr, qbar=qbar)
    du = distill_bwd(x, rx, t, stats[0], stats[1], STUDENT, TEACHER, grad_rows, thr=thr, qbar=qbar)
    refs = _reference(x, rx, t, grad_rows, thr, qbar)
    for name, out, ref in zip(("lse_s", "lse_t", "lse_g", "t_min", "t_max"), stats, refs):
        _check(name, out, ref, TOL[torch.float32])
    # Loss and du are 0 in exact arithmetic: bound them by fp32 rounding of the logits.
    assert loss.abs().max().item() <= 1e-5 * STUDENT, "loss_rows"
    assert du.shape == (2, 48) and torch.isfinite(du).all(), "du"
    assert du.abs().max().item() <= 1e-5 * STUDENT * 1.3, "du"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shuffle", [False, True], ids=["plain", "shuffled"])
def test_distill_half_precision(dtype, shuffle, device):
    if DEVICE != "cuda":
        pytest.skip("bf16/fp16 tl.dot is checked on CUDA only (the interpreter emulates it on CPU)")
    B = 130
    x, rx, t = _inputs(B, 96, 80, dtype, device, zero_row=True)
    grad_rows = torch.randn(B, generator=torch.Generator().manual_seed(3)).to(device)
    _run_and_check(x, rx, t, grad_rows, shuffle, TOL[dtype])
