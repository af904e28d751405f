"""Kernel launches and host syncs of one forward+backward of ``distillcse_loss`` (no GPU needed).

    python benchmarks/launch_count.py                       # B = 64, D = 768, every shuffle
    python benchmarks/launch_count.py --B 64 1024 --D 768 --hard-negatives 64

At the paper's B = 64 a step's loss is a few microseconds of arithmetic, so its time is the
launches (~3-6 us each from Python on an H100) and the host syncs (~10-20 us each), which
can be counted on any machine: the triton backend runs under ``TRITON_INTERPRET=1`` here,
Triton launches are counted by kernel, PyTorch operators through a dispatch mode (those that
launch a kernel on CUDA: everything but views and allocations; ``matmul_f32`` as the one cuBLAS
call it is on a GPU, not its CPU stand-in's slices), and host syncs as reads of a
tensor value on the host (``.item()``, ``bool()``, ``int()``), an output whose size depends on
the data (``nonzero``, boolean indexing), or a tensor made from host data (``torch.tensor``).
The input checks are counted separately (their NaN / Inf check: one foreach reduction, one sync).
``--general`` forces the streaming kernels at every B (the one-program path is off).
``--stub`` runs no kernel and no GEMM (``host_time.StubbedKernels``: the threshold search
closes its rows as on real embeddings), so that the launches of the headline's B = 65,536
can be counted; a slab's height depends on ``--dtype`` and ``--D`` as on the GPU.
"""
import argparse
import collections
import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import distillcse  # noqa: E402
from distillcse import checks  # noqa: E402

NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
             "_record_function_enter_new", "_record_function_exit"}  # (the phases' profiler ranges: host only)
# host syncs: a value read on the host, an output whose size depends on the data, or a tensor made
# from host data (lift_fresh: on CUDA a copy from pageable memory, which a graph capture refuses)
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
         "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Counts operators that would launch a CUDA kernel, and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.paused = collections.Counter(), 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if self.paused:  # the interpreter's own tensor copies while it runs a kernel
            pass
        elif name in SYNCS:
            self.syncs += 1
        elif not (func.is_view or name in NO_LAUNCH):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def triton_launches(counter, ops):
    """Counts ``kernel[grid](...)`` calls by kernel name (``ops`` paused while they run)."""
    from triton.runtime import interpreter, jit
    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        run = cls.run

        def counting(self, *args, _run=run, **kwargs):
            fn = getattr(self, "fn", self)
            counter[getattr(fn, "__name__", str(fn))] += 1
            ops.paused = True
            try:
                return _run(self, *args, **kwargs)
            finally:
                ops.paused = False
        cls.run = counting
        patched.append((cls, run))
    try:
        yield
    finally:
        for cls, run in patched:
            cls.run = run


@contextlib.contextmanager
def cublas_gemms(ops):
    """Counts each ``matmul_f32`` as the one cuBLAS GEMM it is on a GPU ("matmul_f32" in the
    PyTorch kernels), not the CPU stand-in's k-slices (``ops`` paused while it runs)."""
    from distillcse.kernels import contrastive, distill, group_partition
    saved = [(m, m.matmul_f32) for m in (contrastive, distill, group_partition)]

    def one_gemm(*args, _real=saved[0][1], **kwargs):
        ops.ops["matmul_f32"] += 1
        ops.paused = True
        try:
            return _real(*args, **kwargs)
        finally:
            ops.paused = False
    for module, _ in saved:
        module.matmul_f32 = one_gemm
    try:
        yield
    finally:
        for module, real in saved:
            module.matmul_f32 = real


def count(B, D, Dt, hard_negatives, shuffle, general, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    z1 = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
    z2 = torch.randn(B, D, generator=gen).to(dtype).requires_grad_()
    teacher = torch.randn(B, Dt, generator=gen).to(dtype)
    hn = torch.randn(hard_negatives, D, generator=gen).to(dtype) if hard_negatives else None
    from distillcse.kernels import small_batch
    saved = small_batch.MAX_ROWS
    small_batch.MAX_ROWS = 0 if general else saved
    kernels, check_ops, ops = collections.Counter(), OpCounter(), OpCounter()
    real_check = checks.check_finite

    def counted_check(*args, **kwargs):  # the input checks, counted on their own
        ops.paused = True
        try:
            with check_ops:
                return real_check(*args, **kwargs)
        finally:
            ops.paused = False
    checks.check_finite = counted_check
    try:
        with triton_launches(kernels, ops), cublas_gemms(ops), ops:
            loss = distillcse.distillcse_loss(z1, z2, teacher, hard_negatives=hn, shuffle=shuffle, seed=1,
                                              backend="triton")
            loss.backward()
    finally:
        small_batch.MAX_ROWS = saved
        checks.check_finite = real_check
    return kernels, ops, check_ops


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, nargs="+", default=[64])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--Dt", type=int, default=384, help="teacher width (all-MiniLM-L6-v2: 384)")
    p.add_argument("--hard-negatives", type=int, default=0)
    p.add_argument("--shuffle", nargs="+", default=["none", "expected", "random"])
    p.add_argument("--general", action="store_true", help="streaming kernels at every B")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--stub", action="store_true",
                   help="kernels and GEMMs do not run (host_time.StubbedKernels): any B, e.g. the headline's 65,536")
    a = p.parse_args(argv)
    stub = None
    if a.stub:
        from host_time import StubbedKernels  # benchmarks/, the script's folder
        stub = StubbedKernels()
    print(f"torch {torch.__version__}, distillcse_loss forward+backward, backend triton "
          f"({'stubbed kernels' if a.stub else 'interpreted'}), {a.dtype}, D = {a.D}, Dt = {a.Dt}, hard negatives "
          f"{a.hard_negatives}{', streaming kernels only' if a.general else ''}\n")
    print("| B | shuffle | Triton launches | PyTorch kernels | host syncs | checks: kernels, syncs | kernels by name |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for B in a.B:
        for shuffle in a.shuffle:
            if stub is not None:
                stub.reset()
            kernels, ops, check_ops = count(B, a.D, a.Dt, a.hard_negatives, shuffle, a.general, getattr(torch, a.dtype))
            names = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()))
            top = ", ".join(f"{k} {v}" for k, v in ops.ops.most_common(6))
            print(f"| {B} | {shuffle} | {sum(kernels.values())} | {sum(ops.ops.values())} ({top}) | {ops.syncs} | "
                  f"{sum(check_ops.ops.values())}, {check_ops.syncs} | {names} |", flush=True)


if __name__ == "__main__":
    main()
