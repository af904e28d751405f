"""Padded slabs (``kernels.utils.slab_buffer``): above ``PAD_MIN_COLS`` columns the kernels read
slabs of dots whose rows are padded to a multiple of 16, so that their loads stay vectorised
whatever B is (``tests/test_compile_sm90.py`` holds the compiled kernels to that). Here the
threshold is lowered so that the tests' odd sizes take the padded path, which must give what
the unpadded path gives: the kernels compute the same values in the same order, only the
layout differs; the GEMMs on strided rows may sum in another order (CPU: ~1e-8 apart in fp32)."""
import pytest
import torch

import distillcse
from conftest import DEVICE, requires_triton
from test_losses import rel_err
from test_triton_backend import make_batch, run

pytestmark = requires_triton


def test_slab_buffer_pads_rows_above_the_threshold(monkeypatch):
    from distillcse.kernels import utils

    for cols, ld in ((37, 37), (4095, 4095), (4096, 4096), (4097, 4112), (4112, 4112)):  # PAD_MIN_COLS = 4096
        buf = utils.slab_buffer(3, cols, DEVICE)
        assert buf.shape == (3, cols) and buf.stride() == (ld, 1), (cols, buf.stride())
    monkeypatch.setattr(utils, "PAD_MIN_COLS", 0)
    buf = utils.slab_buffer(5, 37, DEVICE, torch.bfloat16)
    assert buf.stride() == (48, 1) and utils.aligned(37) == 48 and utils.aligned(48) == 48
    padding = buf.as_strided((5, 11), (48, 1), buf.storage_offset() + 37)
    assert (padding == 0).all()  # torch.empty is poisoned with NaN in the tests (conftest)


def _both(monkeypatch, fn):
    """fn() with unpadded slabs, then with every slab padded."""
    from distillcse.kernels import utils

    unpadded = fn()
    monkeypatch.setattr(utils, "PAD_MIN_COLS", 0)
    return unpadded, fn()


def _same(a, b, tol):
    """Loss and gradients a (unpadded) and b (padded) within ``tol`` of each other, relative."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert rel_err(loss_b, loss_a) < tol, (loss_a.item(), loss_b.item())
    for g_a, g_b in zip(grads_a, grads_b):
        assert g_b.abs().sum() > 0 and rel_err(g_b, g_a) < tol, rel_err(g_b, g_a)


@pytest.mark.parametrize("shuffle,dtype", [("none", torch.float32), ("expected", torch.float32),
                                           ("random", torch.float32), ("random", torch.bfloat16)])
def test_padded_slabs_give_the_same_loss_and_gradients(shuffle, dtype, monkeypatch):
    """B = 130 with 9 hard negatives and K = 2 teachers, in a budget small enough for several
    slabs of every kind (the row statistics' halves change width from slab to slab)."""
    inputs = make_batch(130, 40, (24, 16), Bh=9)

    def step():
        with distillcse.chunk_budget(0.1):
            return run("triton", inputs, dtype, DEVICE, shuffle=shuffle, seed=3)

    _same(*_both(monkeypatch, step), 1e-6 if dtype == torch.float32 else 1e-3)


def test_padded_slabs_in_the_threshold_search(monkeypatch):
    """The search's path (its grid pass on the row statistics' slabs, its probes, its last
    pass's group means): B = 130 with the pairwise limit at 64 and an 8-value buffer."""
    from distillcse.kernels import group_partition as gp

    inputs = make_batch(130, 40, (48,))

    def step():
        monkeypatch.setattr(gp, "PAIRWISE_MAX_B", 64)
        monkeypatch.setattr(gp, "BUFFER", 8)
        with distillcse.chunk_budget(0.1):
            return run("triton", inputs, torch.float32, DEVICE, shuffle="expected", seed=3)

    _same(*_both(monkeypatch, step), 1e-6)
