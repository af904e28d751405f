"""``kernels.utils.matmul_f32``, the GEMM every slab of the triton backend goes through: 16-bit
(or fp32) inputs, an fp32 result accumulated in fp32, into a given output slice. On CUDA it is
one cuBLAS call (``torch.mm(..., out_dtype=torch.float32, out=...)``), on the CPU a stand-in
over k-slices; both against float64 on the same rounded inputs."""
import pytest
import torch

from conftest import DEVICE

pytest.importorskip("triton")
from distillcse.kernels.utils import ROW_ALIGN, matmul_f32, slab_buffer  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N", [(37, 48, 53), (130, 300, 70), (5, 7, 3), (5, 129, 3)])
def test_matches_float64_into_a_slice(M, K, N, dtype):
    """b as the transpose of a row-major matrix (as the launchers pass ``y.T``), the result
    written into the first M rows of a larger fp32 buffer, which is returned. K = 129: on the CPU
    two 64-wide k-slices and a last one of a single column."""
    g = torch.Generator().manual_seed(M + K)
    a = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, K, generator=g).to(DEVICE, dtype).T  # [K, N], column-major
    buffer = torch.full((M + 4, N), float("nan"), device=DEVICE)
    out = matmul_f32(a, b, out=buffer[:M])
    assert out.data_ptr() == buffer.data_ptr() and out.dtype == torch.float32
    want = a.double() @ b.double()
    # fp32 accumulation of exact products (16-bit) or of fp32 products (TF32 off by default)
    assert ((out.double() - want).abs().max() / want.abs().max()).item() < 1e-5
    assert torch.isnan(buffer[M:]).all(), "rows past the slice were written"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_allocates_its_output_without_one(dtype):
    a = torch.ones(3, 130, device=DEVICE, dtype=dtype)
    out = matmul_f32(a, a.T)
    assert out.shape == (3, 3) and out.dtype == torch.float32 and (out == 130).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [37, 48, 130])
def test_into_a_slab_buffer(N, dtype, monkeypatch):
    """The slabs the kernels read (``slab_buffer``, padded here at any width): rows of a stride
    rounded up to ROW_ALIGN, the padding zero; the GEMM writes the [M, N] view in place and
    leaves the padding 0."""
    from distillcse.kernels import utils

    monkeypatch.setattr(utils, "PAD_MIN_COLS", 0)
    M, K = 21, 40
    g = torch.Generator().manual_seed(N)
    a = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    b = torch.randn(N, K, generator=g).to(DEVICE, dtype).T
    out = slab_buffer(M + 3, N, DEVICE)
    ld = out.stride(0)
    assert out.shape == (M + 3, N) and ld % ROW_ALIGN == 0 and N <= ld < N + ROW_ALIGN
    assert matmul_f32(a, b, out=out[:M]).data_ptr() == out.data_ptr()
    padding = out.as_strided((M + 3, ld - N), (ld, 1), out.storage_offset() + N)
    assert (padding == 0).all()
    want = a.double() @ b.double()
    assert ((out[:M].double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_dot_precision_follows_torchs_float32_switch():
    """fp32 Triton dots are full fp32 under PyTorch's default ("highest") and TF32 once the user
    allows it (``torch.set_float32_matmul_precision("high")`` or ``"medium"``); 16-bit inputs are
    exact either way."""
    from distillcse.kernels.utils import dot_precision
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert [dot_precision(d) for d in (torch.float32, torch.bfloat16)] == ["ieee", "ieee"]
        torch.set_float32_matmul_precision("high")
        assert [dot_precision(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["tf32", "ieee", "ieee"]
        torch.set_float32_matmul_precision("medium")
        assert [dot_precision(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["tf32", "ieee", "ieee"]
    finally:
        torch.set_float32_matmul_precision(before)
