"""Host time of one forward+backward of the triton backend, the kernels left out.

    python benchmarks/host_time.py                  # B = 64 (the paper's), D = 8, every shuffle
    python benchmarks/host_time.py --B 64 256 1024 --steps 500

At small B the loss's GPU work is a few tens of microseconds, so an eager step's time is the
host's: Python, the input checks, autograd and the launches. This measures that part on any
machine: the triton backend runs under ``TRITON_INTERPRET=1`` with every Triton launch and
every cuBLAS GEMM (``matmul_f32``) replaced by a no-op (``StubbedKernels``), so a step is
everything but the kernels (the values it computes are garbage; above B = 1,024 the
threshold search reads its brackets on the host, and the stub closes them as real
embeddings do). On a CPU the other PyTorch ops run there (small D keeps their arithmetic
negligible at small B; at large B ops on [rows, B]-sized tensors compute on the CPU, so
there count the launches instead: ``launch_count.py --stub``); a GPU adds each op's launch
(~3-6 us) and Triton's own launch path (binder and cache key, ~7-10 us a kernel in Triton
3.6) on top. Printed: median microseconds a step over ``--repeats`` runs of ``--steps``
steps (fewer where a step is long: ~1 s a run), with the NaN / Inf input check on and off
(``distillcse.set_finite_check``), and the Triton launches a step.
"""
import argparse
import collections
import os
import statistics
import time
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

import distillcse  # noqa: E402
from distillcse import config  # noqa: E402
from distillcse.kernels import contrastive, distill, group_partition  # noqa: E402


LATE_ROWS = 50  # one row in this many needs the threshold search's third pass (real embeddings: ~2%)


class StubbedKernels:
    """Every ``kernel[grid](...)`` does nothing but count itself in ``launches`` (by kernel
    name); every ``matmul_f32`` returns its output untouched. Above B = 1,024 the threshold
    search reads its brackets on the host, so there ``_settle_kernel`` closes them as the
    search does on real embeddings: after the grid pass and one pass with windows, every row
    but one in ``LATE_ROWS``, which takes a third pass. ``spent``: the seconds that stub took,
    to be left out of the host's time; ``reset()`` before each step (a new search).
    Installed on construction; ``restore()`` (or leaving a ``with`` block) puts the kernels back."""

    def __init__(self):
        from triton.runtime import interpreter
        self.launches, self.spent, self.seen = collections.Counter(), 0.0, {}
        self.saved = [(interpreter.InterpretedFunction, "run", interpreter.InterpretedFunction.run)]
        self.saved += [(m, "matmul_f32", m.matmul_f32) for m in (contrastive, distill, group_partition)]
        interpreter.InterpretedFunction.run = lambda kernel, *args, **kwargs: self.run(kernel, *args, **kwargs)
        for module in (contrastive, distill, group_partition):
            module.matmul_f32 = lambda a, b, out=None, k_step=64: (
                out if out is not None else torch.empty(a.shape[0], b.shape[1]))

    def restore(self):
        for owner, name, value in self.saved:
            setattr(owner, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()

    def reset(self):
        self.seen.clear()

    def run(self, kernel, *args, grid, warmup, **kwargs):
        self.launches[kernel.fn.__name__] += 1
        if kernel.fn.__name__ == "_settle_kernel":
            start = time.perf_counter()
            rows, lo, hd = args[5], args[7], args[8]  # the chunk's rows, the [B, G1] brackets
            # keyed by the brackets' tensor (a weak reference: a later search's tensor may take its id,
            # and memory counts must not see it kept alive)
            ref, seen = self.seen.get(id(lo), (None, None))
            if ref is None or ref() is not lo:
                seen = torch.zeros(lo.shape[0], dtype=torch.bool)
                self.seen[id(lo)] = (weakref.ref(lo), seen)
            late = seen[rows] | (rows % LATE_ROWS != 0)
            done, late = rows[late], rows[~late]
            seen[rows] = True
            lo[done] = hd[done]
            # the stubbed statistics left t_min, t_max (so the brackets) as whatever memory held:
            # a late row is made open here, or it could pass for closed (NaN, or lo >= hd)
            lo[late], hd[late] = 0.0, 1.0
            self.spent += time.perf_counter() - start


def per_step_us(step, stub, steps, repeats):
    """Median microseconds of ``step`` over ``repeats`` runs of ``steps``, the settle stub's
    own time left out; and the Triton launches a step."""
    for _ in range(min(steps, 100)):
        step()
    runs, launches = [], sum(stub.launches.values())
    for _ in range(repeats):
        start, stubbed = time.perf_counter(), stub.spent
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - start - (stub.spent - stubbed)) / steps * 1e6)
    return statistics.median(runs), (sum(stub.launches.values()) - launches) / (repeats * steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[64], help="batch sizes")
    p.add_argument("--D", type=int, default=8, help="feature width (the CPU computes the ops' arithmetic)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=3000, help="steps a run (fewer where a step takes long: ~1 s a run)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shuffle", nargs="+", default=["random", "expected", "none"])
    a = p.parse_args(argv)
    stub = StubbedKernels()
    dtype = getattr(torch, a.dtype)
    print(f"host time of distillcse_loss(..., backend='triton') forward+backward, D = {a.D}, {a.dtype}, "
          f"kernels stubbed, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| B | shuffle | step, us | forward, us | step without the finite check, us | Triton launches a step |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for B in a.B:
        torch.manual_seed(0)
        z1, z2 = (torch.randn(B, a.D, dtype=dtype, requires_grad=True) for _ in range(2))
        teacher = torch.randn(B, a.D, dtype=dtype)
        for shuffle in a.shuffle:
            def forward():
                stub.reset()
                return distillcse.distillcse_loss(z1, z2, teacher, shuffle=shuffle, backend="triton")

            def step():
                forward().backward()

            step()  # the first call's one-time costs
            start = time.perf_counter()
            step()
            steps = max(1, min(a.steps, int(1.0 / (time.perf_counter() - start))))  # ~1 s a run
            timed = [per_step_us(step, stub, steps, a.repeats), per_step_us(forward, stub, steps, a.repeats)]
            config.set_finite_check(False)
            try:
                timed.append(per_step_us(step, stub, steps, a.repeats))
            finally:
                config.set_finite_check(True)
            print(f"| {B} | {shuffle} | " + " | ".join(f"{us:.1f}" for us, _ in timed) + f" | {timed[0][1]:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
