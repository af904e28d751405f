"""Offsets past 2^31 elements: every input a row-strided view whose last rows start beyond
int32's reach (row i at i * S, S = ceil(2^31 / (B - 6))), so a kernel that forms a row or column
offset in int32 reads the wrong rows or faults. The same batch contiguous, through the torch
backend in fp32 (the triton backend's shuffle draws; tied teacher values decided in the same
precision), is the yardstick: the loss within 2e-6 (a sum of B fp32 row losses, a few ulps
each), the gradients within 2e-5, as ``test_triton_backend.check_against_torch_fp32``. At B = 4M and D = 768 a contiguous [B, D] batch has such
offsets; here the stride stands in for them at sizes the interpreter runs.

The storage is ``torch.empty_strided`` (not poisoned by the conftest): on the CPU only the
pages of the rows written are ever touched, ~9 GiB of address space, ~0.4 GiB resident; a GPU
allocates it all."""
import math

import pytest
import torch

import distillcse
from conftest import DEVICE, benchmark_module, requires_triton
from distillcse.kernels import group_partition
from distillcse.kernels.small_batch import fits
from test_losses import rel_err
from test_triton_backend import make_batch

# on a GPU each case allocates its ~9 GiB: gpu_run.sh's 16 workers (--dist loadgroup) run them one at a time
pytestmark = [requires_triton, pytest.mark.xdist_group("int64_offsets")]


def wide_rows(tensors, B):
    """``tensors`` ([n_k <= B, d_k] each, float64) as fp32 column blocks of one [B, S] storage
    with S = ceil(2^31 / (B - 6)): views [n_k, d_k] of row stride S, rows >= B - 6 past 2^31."""
    S = math.ceil(2**31 / (B - 6))
    storage = torch.empty_strided((B, S), (S, 1), device=DEVICE, dtype=torch.float32)
    views, col = [], 0
    for x in tensors:
        view = storage[:x.shape[0], col:col + x.shape[1]]
        view.copy_(x)
        views.append(view)
        col += x.shape[1]
    assert views[0].stride(0) * (B - 1) >= 2**31
    return views


def loss_and_grads(backend, z1, z2, teacher, hard, **kw):
    leaves = [x.detach().requires_grad_() for x in (z1, z2, hard)]
    loss = distillcse.distillcse_loss(leaves[0], leaves[1], [teacher], hard_negatives=leaves[2], backend=backend, **kw)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("B,Bh,path,kw", [
    (37, 27, "one program", dict(shuffle="random")),
    (37, 27, "one program", dict(shuffle="expected", group_size=4)),
    (37, 37, "pairwise", dict(shuffle="none")),
    (130, 130, "pairwise", dict(shuffle="random")),
    (130, 130, "pairwise", dict(shuffle="expected", rows=(50, 130))),
    (130, 130, "search", dict(shuffle="expected")),
    (130, 130, "search", dict(shuffle="random", group_size=9, rows=(0, 77))),
])
def test_row_offsets_past_int32(monkeypatch, B, Bh, path, kw):
    """Loss and gradients of z1, z2 and the hard negatives (Bh of them) from the wide views as
    from the same batch contiguous: the one-program kernel (B + Bh <= 64), the streaming kernels
    with the pairwise thresholds and tie cuts, and with the threshold search; whole and row
    shards. The pairwise batches' last quarter of teacher rows copies the first (entries
    multiples of 1/64: exact dots), so ties straddle group boundaries and the tie cuts' second
    sweep runs; the search puts a tie in one group, unlike the torch backend's stable sort, so
    its batches have none."""
    if path == "search":
        monkeypatch.setattr(group_partition, "PAIRWISE_MAX_B", 0)
    assert fits(B, B + Bh) == (path == "one program") and (B > group_partition.PAIRWISE_MAX_B) == (path == "search")
    z1, z2, (teacher,), hard = make_batch(B, 48, (40,), Bh=Bh, seed=B)
    if path == "pairwise":
        teacher = teacher.clamp(-1, 1).mul(64).round().div(64)
        teacher[B - B // 4:] = teacher[:B // 4]
    kw = dict(seed=11, **kw)
    loss, grads = loss_and_grads("triton", *wide_rows([z1, z2, teacher, hard], B), **kw)
    contiguous = [x.to(DEVICE, torch.float32) for x in (z1, z2, teacher, hard)]
    ref_loss, ref_grads = loss_and_grads("torch", *contiguous, **kw)
    assert rel_err(loss.double().cpu(), ref_loss.double().cpu()) <= 2e-6
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got.double().cpu(), ref.double().cpu()) <= 2e-5


def test_the_gpu_check_of_the_kernels_own_buffers_runs_here(monkeypatch, capsys):
    """``benchmarks/int64_rows.py`` (a GPU's check of the [B, D] buffers the kernels write, at
    B * D past 2^31) at a size the interpreter runs: a row per shuffle and exit 0; a triton
    backend whose loss is off by 1e-3 fails it; its chunked error is the whole one; a shard
    larger than the batch is refused by name."""
    script = benchmark_module("int64_rows")
    argv = ["--B", "70", "--D", "16", "--dtype", "float32"]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "e-" in line] == [
        "| none", "| expected", "| random"]
    real = distillcse.distillcse_loss

    def off(*args, backend, **kw):
        loss = real(*args, backend=backend, **kw)
        return loss * (1 + 1e-3) if backend == "triton" else loss
    monkeypatch.setattr(distillcse, "distillcse_loss", off)
    assert script.main(argv + ["--shuffles", "none"]) == 1
    assert "FAILED" in capsys.readouterr().out
    a, b = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)  # 7 entries at a time
    assert script.rel(a, b, chunk=7) == pytest.approx(float((a - b).norm() / b.norm()), rel=1e-12)
    with pytest.raises(SystemExit):
        script.main(["--B", "70", "--rows", "80"])
    assert "expected 2 <= --rows <= --B and --D >= 1, got --rows 80, --B 70" in capsys.readouterr().err
