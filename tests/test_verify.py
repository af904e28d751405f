"""``distillcse verify``: every backend against the float64 reference, one row per case, each
held to its dtype's bounds; the command fails when one is outside them."""
import pytest
import torch

from conftest import requires_triton
from distillcse import api
from distillcse import verify as verifying
from distillcse.__main__ import main
from distillcse.verify import verify, within_bounds


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
    rows = [line for line in printed if line.split()[:1] in (["torch"], ["triton"])]
    passed = sum(line.endswith(" ok") for line in rows)
    assert printed[-1].startswith(f"{passed} of {len(rows)} cases within") and "FAILED: 18" in printed[-1]


def test_within_bounds_holds_each_error_to_its_dtype():
    """The loss's error, the larger of z1's and z2's, and the hard negatives' each fail a row
    on their own, against the row's dtype: float32 1e-5, 1e-4, 1e-4; bfloat16 0.01, 0.1, 0.1;
    float16 0.001, 0.03 and 0.5 (its hard negatives' gradients are subnormal)."""
    def row(dtype, loss, z1, z2, hn):
        return dict(dtype=dtype, err_loss=loss, err_grads=[z1, z2, hn])

    for dtype, (loss, views, hard) in {"float32": (1e-5, 1e-4, 1e-4), "bfloat16": (1e-2, 0.1, 0.1),
                                       "float16": (1e-3, 3e-2, 0.5)}.items():
        assert within_bounds(row(dtype, loss / 2, views / 2, views / 2, hard / 2)), dtype
        for bad in (row(dtype, 2 * loss, 0, 0, 0), row(dtype, 0, 2 * views, 0, 0), row(dtype, 0, 0, 2 * views, 0),
                    row(dtype, 0, 0, 0, 2 * hard)):
            assert not within_bounds(bad), bad


def test_relative_error_is_against_the_reference_with_a_floor():
    """_rel(a, b) = |a - b| / |b| (b the float64 reference), |b| floored at 1e-6: a 2x result is
    100% off, not 50%; references of norm 2e-6 are still relative."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert verifying._rel(t(2.0, 0.0), t(1.0, 0.0)) == 1.0
    assert verifying._rel(t(0.0, 4.0), t(3.0, 0.0)) == pytest.approx(5 / 3, rel=1e-15)
    assert verifying._rel(t(3e-6), t(2e-6)) == pytest.approx(0.5, rel=1e-12)
    assert verifying._rel(t(1e-7), t(0.0)) == pytest.approx(0.1, rel=1e-12)


def test_the_reference_runs_in_float64_on_the_unrounded_inputs(monkeypatch):
    """Each case's reference sees float64 inputs that bfloat16 cannot hold; the backend, the same
    inputs rounded to bfloat16."""
    seen, real = [], verifying.distillcse_loss

    def recording(z1, z2, teachers, **kwargs):
        seen.append((kwargs["backend"], z1.detach().clone()))
        return real(z1, z2, teachers, **kwargs)

    monkeypatch.setattr(verifying, "distillcse_loss", recording)
    monkeypatch.setattr(verifying, "_available_backends", lambda device: ["torch"])
    rows = verify(device="cpu", sizes=[6], dtypes=[torch.bfloat16], out=lambda line: None)
    assert len(rows) == 6 and [b for b, _ in seen] == ["reference", "torch"] * 6
    for (_, ref), (_, rounded) in zip(seen[::2], seen[1::2]):
        assert ref.dtype == torch.float64 and not torch.equal(ref.to(torch.bfloat16).double(), ref)
        assert torch.equal(rounded, ref.to(torch.bfloat16))


def test_verify_command_runs_the_default_sizes_on_the_device_given(monkeypatch):
    """``distillcse verify`` runs B = 37 and 130 unless --sizes says otherwise, on --device when
    given (else verify picks); with every row ok it returns (exit status 0)."""
    calls = []
    monkeypatch.setattr(verifying, "verify", lambda **kwargs: calls.append(kwargs) or [{"ok": True}])
    main(["verify"])
    main(["verify", "--sizes", "5", "9", "--device", "cpu"])
    assert calls == [dict(device=None, sizes=[37, 130]), dict(device="cpu", sizes=[5, 9])]


@pytest.mark.parametrize("interpret, importable, reason", [
    (None, True, "it needs a CUDA device, or TRITON_INTERPRET=1"), ("1", False, "triton is not installed")],
    ids=["not-interpreted", "no-triton"])
def test_triton_is_left_out_where_it_cannot_run_and_the_reason_printed(monkeypatch, interpret, importable, reason):
    """On a CPU the kernels run only under the interpreter and with triton installed: otherwise
    verify runs the torch backend alone and says why; every row has its time (B = 6, float32)."""
    monkeypatch.setattr(verifying, "_triton_importable", lambda: importable)
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert verifying._available_backends(torch.device("cpu")) == ["torch"]
    lines = []
    rows = verify(device="cpu", sizes=[6], dtypes=[torch.float32], out=lines.append)
    assert reason in lines[1] and lines[2].split()[:2] == ["backend", "dtype"]
    assert [r["backend"] for r in rows] == ["torch"] * 6 and all(r["ok"] and r["ms"] > 0 for r in rows)


def test_each_case_gives_its_teachers_hard_negatives_and_positives(monkeypatch):
    """B rows of width 48 whose positives are their noisy copies, K teachers of width 40 (each
    rounded to the case's dtype for the backend) and 7 hard negatives, for K = 1 and 2."""
    seen, real = [], verifying.distillcse_loss

    def recording(z1, z2, teachers, **kwargs):
        seen.append((kwargs["backend"], z1.detach().clone(), z2.detach().clone(), [t.clone() for t in teachers],
                     kwargs["hard_negatives"].shape))
        return real(z1, z2, teachers, **kwargs)

    monkeypatch.setattr(verifying, "distillcse_loss", recording)
    monkeypatch.setattr(verifying, "_available_backends", lambda device: ["torch"])
    rows = verify(device="cpu", sizes=[6], dtypes=[torch.bfloat16], out=lambda line: None)
    for row, (_, z1, z2, ref_teachers, _), (_, _, _, teachers, hard) in zip(rows, seen[::2], seen[1::2]):
        # [6, 48] views: z2 = z1 + 0.5 noise with z1's entries of variance 2, so cos(z1_i, z2_i) ~ 0.94
        assert z1.shape == (6, 48) and torch.nn.functional.cosine_similarity(z1, z2).min() > 0.8
        assert len(teachers) == len(ref_teachers) == row["K"] and hard == (7, 48)
        for t, ref in zip(teachers, ref_teachers):    # [6, 40] each
            assert t.shape == (6, 40) and t.dtype == torch.bfloat16 and torch.equal(t, ref.to(torch.bfloat16))
    assert [r["K"] for r in rows] == [1, 1, 1, 2, 2, 2]
