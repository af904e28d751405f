"""The GPU's block shapes, run under the interpreter: the launchers pick large blocks there
(``kernels.utils.interpreter_blocks``), so the tile sizes, grids and slab rows a GPU uses
(64 x 64 threshold-search tiles, 64 x 128 slab tiles, 128-wide accumulation, ...) are checked here
against the reference at a ragged B; on CUDA they are what every test runs."""
import pytest
import torch

from conftest import DEVICE, requires_triton
from test_losses import rel_err
from test_triton_backend import TOL, check_against_torch_fp32, duplicated_batch, make_batch, round_trip, run

pytestmark = [requires_triton, pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA every test runs these blocks")]


@pytest.mark.parametrize("dtype,shuffle,dims,thresholds,group_size", [
    (torch.float32, "none", (64,), "auto", None), (torch.float32, "expected", (32, 40), "pairwise", None),
    (torch.float32, "expected", (32, 40), "search", None), (torch.float32, "random", (64,), "pairwise", None),
    (torch.bfloat16, "random", (64,), "search", None), (torch.bfloat16, "expected", (64,), "search", None),
    (torch.float32, "expected", (64,), "search", 13), (torch.float32, "random", (64,), "pairwise", 64),
])
def test_gpu_blocks_match_reference(dtype, shuffle, dims, thresholds, group_size, monkeypatch):
    """``thresholds``: how the Group-P thresholds are found (B = 130: "auto" is pairwise);
    ``group_size``: fixed-size groups instead of groups by mass (64: up to 64 members of a group
    in a row's 128-column tile, in the random shuffle's packed 8-bit counts; at 100 this batch
    has a row whose 100th and 101st values tie in fp32 and not in float64, so its groups differ
    from the float64 torch backend's by one entry)."""
    from distillcse.kernels import group_partition, utils

    if thresholds == "search":
        monkeypatch.setattr(group_partition, "PAIRWISE_MAX_B", 0)

    inputs = make_batch(130, 96, dims, Bh=7)
    kw = dict(shuffle=shuffle, seed=3, group_size=group_size)
    # random: the torch backend in float64 draws the same shuffle for the seed (the reference draws its own)
    ref_loss, ref_grads = run("torch" if shuffle == "random" else "reference", round_trip(inputs, dtype),
                              torch.float64, "cpu", **kw)
    monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    assert group_partition._logit_blocks()["BN"] == 64  # the GPU's, not the interpreter's 128
    loss, grads = run("triton", inputs, dtype, DEVICE, **kw)
    tol_loss, tol_grad = TOL[dtype]
    assert rel_err(loss, ref_loss, floor=1.0) < tol_loss
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < tol_grad


@pytest.mark.parametrize("shuffle,group_size", [("expected", None), ("random", 4)])
def test_gpu_blocks_tie_cuts(shuffle, group_size, monkeypatch):
    """Copied sentences at B = 130 with the GPU's blocks: the tie cuts' kernel on its [16, 32]
    tiles and the classifying kernels on [32, 64] rank the ties as the torch backend does."""
    from distillcse.kernels import distill, utils

    monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    assert distill._slab_blocks(130, shuffle, ties=True)[1]["BN"] == 64
    check_against_torch_fp32(duplicated_batch(130), dict(shuffle=shuffle, seed=3, group_size=group_size))
