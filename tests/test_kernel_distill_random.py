"""kernels/distill_random.py against float64 PyTorch built on distillcse.shuffle's definition
of the random shuffle (SPEC section 5)."""
import pytest
import torch

from conftest import DEVICE
from test_kernel_distill import GROUPING, STUDENT, TEACHER, _inputs

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from distillcse.kernels.distill_random import _group_permutation  # noqa: E402

SEED = 0x1234_5678_9ABC


@triton.jit
def _sigma_kernel(p_x, p_n, p_key, p_h, p_b, p_rounds, p_out, N, BLOCK: tl.constexpr):
    """The kernels' sigma, elementwise over int32 inputs (key as uint32 bits)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    x = tl.load(p_x + o, mask=m, other=0).to(tl.uint32)
    n = tl.load(p_n + o, mask=m, other=1).to(tl.uint32)
    key = tl.load(p_key + o, mask=m, other=0).to(tl.uint32, bitcast=True)
    h = tl.load(p_h + o, mask=m, other=0).to(tl.uint32)
    b = tl.load(p_b + o, mask=m, other=1).to(tl.uint32)
    rounds = tl.load(p_rounds + o, mask=m, other=0)
    tl.store(p_out + o, _group_permutation(x, n, key, h, b, rounds).to(tl.int32), mask=m)


def test_kernel_permutation_is_the_torch_definition():
    from distillcse.shuffle import feistel_shape, group_keys, group_permutation

    n = torch.tensor([1, 2, 3, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4099, 65537])
    n = n.repeat_interleave(64)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(n.shape, generator=gen) * n).long()
    key = group_keys(SEED, torch.arange(len(n)), torch.arange(len(n)) % 7)
    h, b, rounds = feistel_shape(n)
    expected = group_permutation(x, n, key)
    as_i32 = lambda v: v.to(torch.int32).to(DEVICE)  # noqa: E731
    key_bits = torch.where(key >= 2**31, key - 2**32, key)
    out = torch.empty(len(n), dtype=torch.int32, device=DEVICE)
    _sigma_kernel[(triton.cdiv(len(n), 128),)](
        as_i32(x), as_i32(n), as_i32(key_bits), as_i32(h), as_i32(b), as_i32(rounds), out, len(n), BLOCK=128)
    assert torch.equal(out.cpu().long(), expected)


def _reference(x, rx, t, thr_groups, step_seed):
    """float64 loss rows and du = d(sum_i loss_i)/du by distillcse.shuffle.shuffled_targets."""
    from distillcse.shuffle import shuffled_targets

    B = x.shape[0]
    u = x.double().cpu() * rx.double().cpu()[:, None]
    s = u @ u.T
    tt = t.double().cpu() @ t.double().cpu().T
    q_tilde = shuffled_targets(tt, torch.arange(B), teacher_temperature=1 / TEACHER,
                               grouping_temperature=1 / GROUPING, shuffle="random",
                               step_seed=step_seed, **thr_groups)
    off = ~torch.eye(B, dtype=torch.bool)
    logits = torch.where(off, s * STUDENT, float("-inf"))
    lse = torch.logsumexp(logits, dim=1)
    loss = lse - STUDENT * (q_tilde * torch.where(off, s, 0.0)).sum(1)
    g = torch.where(off, STUDENT * (torch.softmax(logits, dim=1) - q_tilde), 0.0)
    return loss, (g + g.T) @ u


def _run(x, rx, t, grouping, seed=SEED, **kw):
    from distillcse.kernels.distill import distill_row_stats
    from distillcse.kernels.distill_random import distill_random
    from distillcse.kernels.group_partition import group_thresholds

    lse_s, lse_t, lse_g, t_min, t_max = distill_row_stats(x, rx, t, STUDENT, TEACHER, GROUPING)
    thr = group_thresholds(t, lse_g, t_min, t_max, GROUPING, **grouping)
    return distill_random(x, rx, t, lse_s, lse_t, thr, STUDENT, TEACHER, seed, **kw)


@pytest.mark.parametrize("grouping", [dict(group_p=0.1, group_size=None), dict(group_p=0.25, group_size=None),
                                      dict(group_p=1.0, group_size=None), dict(group_p=None, group_size=6)],
                         ids=["p0.1", "p0.25", "one-group", "size6"])
@pytest.mark.parametrize("B,D,Dt,budget,chunks", [(37, 48, 32, 1 << 20, 1), (130, 96, 80, 130 * 8 * 64, 3)],
                         ids=["one-slab", "three-slabs-three-chunks"])
def test_random_matches_the_shuffle_definition(B, D, Dt, budget, chunks, grouping, device):
    x, rx, t = _inputs(B, D, Dt, torch.float32, device)
    kernel_grouping = dict(group_p=grouping["group_p"] or 0.1, group_size=grouping["group_size"])
    loss, du = _run(x, rx, t, kernel_grouping, budget_bytes=budget, chunks=chunks)
    ref_loss, ref_du = _reference(x, rx, t, grouping, SEED)
    assert ((loss.cpu().double() - ref_loss).abs().max() / ref_loss.abs().max()).item() < 1e-5
    assert ((du.cpu().double() - ref_du).norm() / ref_du.norm()).item() < 1e-5


def test_random_without_grad_and_other_seeds(device):
    x, rx, t = _inputs(61, 40, 24, torch.float32, device, strided=True)
    grouping = dict(group_p=0.2, group_size=None)
    loss, du = _run(x, rx, t, grouping, budget_bytes=1 << 20)
    loss_only, none = _run(x, rx, t, grouping, budget_bytes=1 << 20, need_grad=False)
    assert none is None and torch.equal(loss, loss_only)
    again, _ = _run(x, rx, t, grouping, budget_bytes=1 << 20)
    other, _ = _run(x, rx, t, grouping, seed=SEED + 1, budget_bytes=1 << 20)
    assert torch.equal(loss, again) and not torch.equal(loss, other)
