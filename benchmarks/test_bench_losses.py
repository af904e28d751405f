"""pytest-benchmark cases: forward+backward of each loss implementation at fixed sizes.

    pytest benchmarks/test_bench_losses.py                       # CPU cases anywhere, GPU cases on CUDA
    pytest benchmarks/test_bench_losses.py -k cuda --benchmark-json out.json
    pytest benchmarks/test_bench_losses.py --benchmark-disable   # run each case once, as a smoke test

Each case times one forward+backward (``benchmark.pedantic``: 1 warm-up round, then rounds
of 1 iteration; on CUDA the timed function synchronises before it returns); the ``hard1``
cases give each row a hard negative (supervised SimCSE's B x 2B contrastive logits). GPU cases skip
with a reason without CUDA; the triton CPU case skips (only the Triton interpreter runs there,
whose timings say nothing). The sweep over batch sizes, with memory, is ``distillcse bench memory``.
"""
import pytest
import torch

from distillcse.bench import Unavailable, loss_function, make_inputs

CUDA = torch.cuda.is_available()
IMPLS = ("reference", "plain", "torch", "triton")


def _case(benchmark, impl, what, shuffle, B, D, dtype, device, rounds, hard=0):
    device = torch.device(device)
    try:
        fn = loss_function(impl, what, shuffle, device)
    except Unavailable as why:
        pytest.skip(f"{impl} on {device.type}: {why}")
    z1, z2, teachers, hn = make_inputs(B, D, D, 2, dtype, device, hard=hard)

    def step():
        z1.grad = z2.grad = None
        if hn is not None:
            hn.grad = None
        fn(z1, z2, teachers, hn).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.group = (f"{what} shuffle={shuffle} B={B} D={D} {str(dtype).replace('torch.', '')} {device.type}"
                       + (f" hard negatives {hard} a row" if hard else ""))
    benchmark.extra_info.update(impl=impl, what=what, shuffle=shuffle, B=B, D=D, Dt=D, K=2, hard_per_row=hard,
                                dtype=str(dtype), device=torch.cuda.get_device_name(device) if CUDA and
                                device.type == "cuda" else "cpu")
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert hn is None or (hn.grad is not None and torch.isfinite(hn.grad).all())


CASES = [("contrastive", "none", 0), ("contrastive", "none", 1), ("full", "expected", 0), ("full", "random", 0)]
CASE_IDS = [f"{what}-{shuffle}" + (f"-hard{hard}" if hard else "") for what, shuffle, hard in CASES]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("what,shuffle,hard", CASES, ids=CASE_IDS)
def test_cpu(benchmark, impl, what, shuffle, hard):
    if impl == "triton":
        pytest.skip("triton on CPU runs only in the interpreter; its timings say nothing (GPU case below)")
    _case(benchmark, impl, what, shuffle, B=256, D=128, dtype=torch.float32, device="cpu", rounds=5, hard=hard)


GPU_CASES = [(impl, what, shuffle, hard, B)
             for B in (4096, 16384)
             for what, shuffle, hard in CASES
             for impl in IMPLS
             # the reference loops over rows in Python for the random shuffle: one small case only
             if not (impl == "reference" and (B > 4096 or shuffle == "random"))]


@pytest.mark.skipif(not CUDA, reason="GPU case: needs CUDA")
@pytest.mark.parametrize("impl,what,shuffle,hard,B", GPU_CASES)
def test_cuda(benchmark, impl, what, shuffle, hard, B):
    _case(benchmark, impl, what, shuffle, B=B, D=768, dtype=torch.bfloat16, device="cuda", rounds=20, hard=hard)
