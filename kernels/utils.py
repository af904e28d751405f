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


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` [R, D] with feature stride 1 (row stride may be anything); copies only if needed."""
    return x if x.stride(-1) == 1 else x.contiguous()


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
