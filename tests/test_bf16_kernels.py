"""bf16 inside a Triton kernel behaves as on a GPU: ``tl.dot`` of bf16 operands is the fp32
product of their values, and fp32 -> bf16 casts round to nearest even. On CPU this holds the
interpreter patch (``kernels/utils.patch_interpreter_bf16``) that lets the bf16 kernel tests run
there; on CUDA it checks the compiled kernels the same way."""
import pytest
import torch

from conftest import DEVICE

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
import distillcse.kernels  # noqa: E402,F401  (installs the interpreter patches)


@triton.jit
def _dot_kernel(p_a, p_b, p_c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    o_m, o_n, o_k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    b_a = tl.load(p_a + o_m[:, None] * K + o_k[None, :])  # [M, K]
    b_b = tl.load(p_b + o_k[:, None] * N + o_n[None, :])  # [K, N]
    tl.store(p_c + o_m[:, None] * N + o_n[None, :], tl.dot(b_a, b_b))  # fp32 [M, N]


@triton.jit
def _cast_kernel(p_x, p_y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(p_y + o, tl.load(p_x + o).to(tl.bfloat16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dot_multiplies_values(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 16, generator=g).to(dtype)
    b = torch.randn(16, 32, generator=g).to(dtype)
    c = torch.empty(32, 32, device=DEVICE)
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c, M=32, N=32, K=16)
    exact = a.double() @ b.double()  # products of 8-bit mantissas are exact in fp32
    assert (c.cpu().double() - exact).abs().max().item() < 1e-5


def test_cast_rounds_to_nearest_even():
    one = 1.0
    ties = [one + 2 ** -8, one + 3 * 2 ** -8, -(one + 2 ** -8)]  # halfway: to the even neighbour
    edges = [3.3895313892515355e38, 3.4e38, 1e-40, -0.0, float("inf"), -float("inf")]
    g = torch.Generator().manual_seed(1)
    spread = torch.randn(4096 - 9 - 16, generator=g) * torch.logspace(-35, 35, 4096 - 9 - 16)
    x = torch.cat([torch.tensor(ties + edges), spread, torch.full((16,), float("nan"))]).float()
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x.to(DEVICE), y, N=x.numel())
    y, want = y.cpu(), x.to(torch.bfloat16)
    finite = ~torch.isnan(x)
    assert torch.equal(y[finite].view(torch.int16), want[finite].view(torch.int16))
    assert torch.isnan(y[~finite]).all()
    assert y[:3].tolist() == [1.0, 1.0 + 2 ** -6, -1.0]


def test_cast_keeps_every_nan_a_nan():
    """NaNs of any payload and sign cast to NaN: rounded as a number's bits, 0x7F800001 would
    carry into inf, 0x7FFFFFFF into -0 and 0xFFFFFFFF past 32 bits into +0."""
    bits = [0x7F800001, 0x7F80FFFF, 0x7FBFFFFF, 0x7FC00000, 0x7FFFFFFF, 0xFF800001, 0xFFC00000, 0xFFFFFFFF]
    x = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(x).all()
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x.to(DEVICE), y, N=x.numel())
    assert torch.isnan(y.cpu()).all(), y.cpu().view(torch.int16)
