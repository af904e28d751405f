"""``distillcse verify``: every backend against the float64 reference, one row per case, each
held to its dtype's bounds; the command fails when one is outside them."""
import pytest
import torch

from conftest import requires_triton
from distillcse import api
from distillcse.__main__ import main
from distillcse.verify import verify


@requires_triton
def test_verify_rows_agree_with_the_reference():
    lines = []
    rows = verify(sizes=[37], dtypes=[torch.float32, torch.bfloat16], out=lines.append)
    assert [(r["backend"], r["dtype"], r["K"], r["shuffle"]) for r in rows] == [
        (b, d, K, s) for K in (1, 2) for s in ("none", "expected", "random") for d in ("float32", "bfloat16")
        for b in ("torch", "triton")]
    assert len(lines) == 4 + len(rows) and lines[1].split()[:5] == ["backend", "dtype", "B", "K", "shuffle"]
    assert all(r["ok"] for r in rows) and lines[-1].startswith(f"{len(rows)} of {len(rows)} cases within")
    for r in rows:
        bound = 1e-4 if r["dtype"] == "float32" else 0.1  # bf16: the inputs' rounding, amplified by 1 / tau
        assert r["err_loss"] < bound / 10 and max(r["err_grads"]) < bound, r


def test_verify_fails_a_backend_that_disagrees(monkeypatch, capsys):
    """A torch backend whose contrastive term is doubled fails its rows (z2's gradient 100% off)
    and the command exits with status 1; it printed the errors and exited 0."""
    real = api._contrastive

    def doubled_on_torch(z1, z2, hard_negatives, temperature, backend, shard):
        loss = real(z1, z2, hard_negatives, temperature, backend, shard)
        return 2 * loss if backend == "torch" else loss

    monkeypatch.setattr(api, "_contrastive", doubled_on_torch)
    with pytest.raises(SystemExit) as exited:
        main(["verify", "--sizes", "37", "--device", "cpu"])
    assert exited.value.code == 1
    printed = capsys.readouterr().out.splitlines()
    torch_rows = [line for line in printed if line.startswith("torch ")]
    assert len(torch_rows) == 18 and all(line.endswith("FAIL") for line in torch_rows)
    assert "FAILED: 18" in printed[-1]
