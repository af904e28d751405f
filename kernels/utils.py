"""Small helpers shared by the launchers."""
import os

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on inputs of ``dtype``.

    fp32 inputs follow PyTorch's own switch: full fp32 ("ieee") while
    ``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default), TF32 otherwise.
    bf16/fp16 inputs ignore it (their dots are exact products accumulated in fp32).
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids and sizes (``triton.cdiv`` is a constexpr function that
    costs ~2 us a call on the host; a B = 64 step made 7 of them)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), as ``triton.next_power_of_2``, in plain Python."""
    return 1 << max(0, n - 1).bit_length()


def int32_bits(v: int) -> int:
    """A uint32 value as the int32 with the same bits (a kernel reinterprets it)."""
    return v - (1 << 32) if v >= 1 << 31 else v


def seed_args(step_seed, like):
    """(p_seed, seed_lo, seed_hi, SEED_PTR) of a random shuffle's 64-bit key for a kernel's
    ``_seed_halves``: an int as two int32 scalars (p_seed then ``like``, unread), or a [1] int64
    tensor on the kernel's device (its 64 bits; drawn there inside a CUDA graph's capture, so that
    each replay draws a new key), read by the kernel."""
    if isinstance(step_seed, torch.Tensor):
        assert step_seed.dtype == torch.int64 and step_seed.numel() == 1 and step_seed.device == like.device
        return step_seed, 0, 0, True
    return like, int32_bits(step_seed & 0xFFFFFFFF), int32_bits(step_seed >> 32 & 0xFFFFFFFF), False


def interpreter_blocks() -> bool:
    """Whether the launchers pick the interpreter's blocks (``TRITON_INTERPRET=1``: few large
    blocks, as every block op costs Python time) rather than the GPU's. Tests patch it to run
    the GPU's block shapes under the interpreter (``tests/test_gpu_blocks.py``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [R, D] with feature stride 1 (row stride may be anything); copies only if needed."""
    return x if x.stride(-1) == 1 else x.contiguous()


MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"  # torch.mm(..., out_dtype=) on CUDA


def matmul_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor = None, k_step: int = 64) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (a, b in one dtype), into ``out`` if given (an
    fp32 [M, N] tensor, any row stride): on CUDA one cuBLAS call with an fp32 output (PyTorch
    >= 2.8); elsewhere over ``k_step`` slices of the inner dimension, so that the fp32 copies
    stay small (as on the GPU, no input-sized temporary)."""
    if out is None:
        out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=torch.float32)
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    out.zero_()
    for k0 in range(0, a.shape[1], k_step):
        out.addmm_(a[:, k0:k0 + k_step].float(), b[k0:k0 + k_step].float())
    return out


ROW_ALIGN = 16  # elements: the row stride of a padded slab buffer is a multiple of it
# Slabs of more columns than this are padded (``slab_buffer``). Below, a slab kernel's work is a
# few microseconds and the padding's zero fills (a PyTorch launch a buffer, 7-8 a step, ~5 us of
# host time each) would cost more than the aligned loads save. Tests set it to 0.
PAD_MIN_COLS = 4096


def aligned(n: int) -> int:
    """The row stride of ``slab_buffer``'s slabs of n columns: n rounded up to a multiple of
    ``ROW_ALIGN`` above ``PAD_MIN_COLS``, n itself up to it."""
    return n if n <= PAD_MIN_COLS else cdiv(n, ROW_ALIGN) * ROW_ALIGN


def slab_buffer(rows: int, cols: int, device, dtype=torch.float32) -> torch.Tensor:
    """A [rows, cols] view of a [rows, aligned(cols)] buffer whose columns past ``cols`` are zero.
    The kernels read such slabs in whole tiles under the aligned bound (the padding's zeros
    stand in for masked entries), so that their loads stay vectorised at any batch size: with
    a row stride of B and B not a multiple of 16 they went element by element (sm_90a, B = 130:
    1.9-2.6x the instructions a tile, up to 1 KB of spills; session 22)."""
    ld = aligned(cols)
    buf = torch.empty(rows, ld, device=device, dtype=dtype)
    if ld != cols:
        buf[:, cols:].zero_()
    return buf[:, :cols]


GRID_AXIS_MAX = 65_535  # CUDA's largest grid on its second and third axes (the first takes 2^31 - 1)
SPLIT_PROGRAMS = 1024  # a launch over a few row blocks splits the columns up to about this many programs


def column_splits(n_tiles: int, row_programs: int, programs: int = SPLIT_PROGRAMS) -> int:
    """Column splits of a launch of ``row_programs`` row programs over ``n_tiles`` column tiles:
    a power of two (partial results then pair up in a fixed order), at most ``n_tiles``, about
    ``programs`` programs in all. A slab of a few hundred rows has a few row blocks, and a GPU
    needs hundreds of programs to be busy."""
    want = -(-programs // max(1, row_programs))
    return min(1 << (max(1, n_tiles).bit_length() - 1), 1 << (want - 1).bit_length())


def slab_rows(rows: int, width: int, budget_bytes: int, entry_bytes: int, step: int) -> int:
    """Rows of a slab of [rows, width] entries of ``entry_bytes`` each within ``budget_bytes``:
    all when they fit, else as many as fit in multiples of ``step`` (at least one step, at most
    ``rows``). The slab size every launcher that materialises [rows, width] buffers uses."""
    fit = budget_bytes // (width * entry_bytes)
    return rows if fit >= rows else min(rows, max(step, fit // step * step))


def patch_interpreter_scalar_index():
    """triton-lang/triton#9171: with numpy >= 2.4, Triton 3.6's interpreter cannot ``int()`` a
    runtime scalar (a 1-element array), so ``range(0, N, BN)`` with a runtime N raises.
    Under ``TRITON_INTERPRET=1`` index through ``.item()`` instead; no-op on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "_scalar_index_patch", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._scalar_index_patch = True
    interpreter._patch_lang_tensor = patched


def patch_interpreter_bf16():
    """Under ``TRITON_INTERPRET=1``, make bf16 behave as on a GPU where Triton 3.6's interpreter
    does not (it stores bf16 as uint16 bit patterns; upstream does not support bf16 there,
    triton-lang/triton#11584): ``tl.dot`` of bf16 operands multiplies the bit patterns (now:
    their exact fp32 values, products accumulated in fp32, as an MMA does), and fp32 -> bf16
    casts truncate (now: round to nearest even, as ``cvt.rn.bf16.f32``). No-op on a GPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    if getattr(InterpreterBuilder.create_dot, "_bf16_patch", False):
        return
    dot, cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def as_fp32(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = src.data.astype(np.float32, copy=False).view(np.uint32)
            nan = np.isnan(src.data)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # ties to even
            return TensorHandle(np.where(nan, np.uint16(0x7FC0), rounded), tl.bfloat16)
        return cast(self, src, dst_type)

    create_dot._bf16_patch = True
    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = create_dot, cast_impl
