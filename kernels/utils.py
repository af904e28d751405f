"""Small helpers shared by the launchers."""
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
