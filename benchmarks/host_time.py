"""Host time of one forward+backward of the triton backend, the kernels left out.

    python benchmarks/host_time.py                  # B = 64 (the paper's), D = 8, every shuffle
    python benchmarks/host_time.py --B 64 256 1024 --steps 500

At small B the loss's GPU work is a few tens of microseconds, so an eager step's time is the
host's: Python, the input checks, autograd and the launches. This measures that part on any
machine: the triton backend runs under ``TRITON_INTERPRET=1`` with every Triton launch and
every cuBLAS GEMM (``matmul_f32``) replaced by a no-op, so a step is everything but the
kernels (the values it computes are garbage; no host code reads them below B = 1,025). On a
CPU the other PyTorch ops run there (small D keeps their arithmetic negligible); a GPU adds
each op's launch (~3-6 us) and Triton's own launch path (binder and cache key, ~7-10 us a
kernel in Triton 3.6) on top. Printed: median microseconds a step over ``--repeats`` runs of
``--steps`` steps, with the NaN / Inf input check on and off (``distillcse.set_finite_check``).
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

import distillcse  # noqa: E402
from distillcse import config  # noqa: E402
from distillcse.kernels import contrastive, distill, group_partition  # noqa: E402


def stub_kernels():
    """Every ``kernel[grid](...)`` does nothing; every ``matmul_f32`` returns its output untouched."""
    from triton.runtime import interpreter
    interpreter.InterpretedFunction.run = lambda self, *args, **kwargs: None
    for module in (contrastive, distill, group_partition):
        module.matmul_f32 = lambda a, b, out=None, k_step=64: (
            out if out is not None else torch.empty(a.shape[0], b.shape[1]))


def per_step_us(step, steps, repeats):
    for _ in range(min(steps, 100)):
        step()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(runs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[64], help="batch sizes (<= 1,024: no host reads)")
    p.add_argument("--D", type=int, default=8, help="feature width (the CPU computes the ops' arithmetic)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shuffle", nargs="+", default=["random", "expected", "none"])
    a = p.parse_args(argv)
    if max(a.B) > 1024:
        p.error("--B: at most 1,024 (above, the threshold search reads its garbage passes on the host)")
    stub_kernels()
    print(f"host time of distillcse_loss(..., backend='triton') forward+backward, D = {a.D}, kernels stubbed, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| B | shuffle | step, us | forward, us | step without the finite check, us |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for B in a.B:
        torch.manual_seed(0)
        z1, z2 = (torch.randn(B, a.D, requires_grad=True) for _ in range(2))
        teacher = torch.randn(B, a.D)
        for shuffle in a.shuffle:
            def forward():
                return distillcse.distillcse_loss(z1, z2, teacher, shuffle=shuffle, backend="triton")

            def step():
                forward().backward()

            times = [per_step_us(step, a.steps, a.repeats), per_step_us(forward, a.steps, a.repeats)]
            config.set_finite_check(False)
            try:
                times.append(per_step_us(step, a.steps, a.repeats))
            finally:
                config.set_finite_check(True)
            print(f"| {B} | {shuffle} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
