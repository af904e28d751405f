"""``distillcse verify``: every backend against the float64 reference, one row per case."""
import torch

from conftest import requires_triton
from distillcse.verify import verify


@requires_triton
def test_verify_rows_agree_with_the_reference():
    lines = []
    rows = verify(sizes=[37], dtypes=[torch.float32, torch.bfloat16], out=lines.append)
    assert [(r["backend"], r["dtype"], r["shuffle"]) for r in rows] == [
        (b, d, s) for s in ("none", "expected", "random") for d in ("float32", "bfloat16") for b in ("torch", "triton")]
    assert len(lines) == 3 + len(rows) and lines[1].split()[:4] == ["backend", "dtype", "B", "shuffle"]
    for r in rows:
        bound = 1e-4 if r["dtype"] == "float32" else 0.1  # bf16: the inputs' rounding, amplified by 1 / tau
        assert r["err_loss"] < bound / 10 and max(r["err_grads"]) < bound, r
