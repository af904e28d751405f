"""GEMM FLOPs of one rank's share of the loss against the whole loss (``rows=``), counted on the
CPU: every ``mm`` / ``addmm`` the forward and backward issue, by a dispatch mode. The triton
backend runs under Triton's interpreter; its Triton kernels (the distillation's accumulation
among them) are not GEMMs and are not counted.

    python benchmarks/shard_flops.py                     # B = 256, D = 64, W = 4, 32-row slabs
"""
import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import distillcse  # noqa: E402

GEMMS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.mm.out: (0, 1),
         torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.addmm.out: (1, 2)}


class GemmFlops(TorchDispatchMode):
    """Sums 2 M K N over the GEMMs dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in GEMMS:
            a, b = (args[i] for i in GEMMS[func])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--slab-rows", type=int, default=32, help="the chunk budget, in slab rows of B fp32 pairs")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    z1, z2, teacher = (torch.randn(args.B, args.D, generator=g) for _ in range(3))
    distillcse.set_chunk_budget(args.B * 8 * args.slab_rows / 2**20)
    cuts = [r * args.B // args.world for r in range(args.world + 1)]
    print(f"B = {args.B}, D = {args.D}, W = {args.world}, {args.slab_rows}-row slabs; GEMM FLOPs of a share / the whole")
    print("| backend | shuffle | whole, GFLOP | shares / whole |")
    print("| --- | --- | ---: | --- |")
    for backend in ("torch", "triton"):
        for shuffle in ("none", "expected", "random"):
            def count(rows):
                x1, x2 = (z.clone().requires_grad_() for z in (z1, z2))
                with GemmFlops() as counter:
                    distillcse.distillcse_loss(x1, x2, teacher, shuffle=shuffle, seed=1, group_p=0.2, rows=rows,
                                               backend=backend).backward()
                return counter.flops
            whole = count(None)
            shares = [count((a, b)) / whole for a, b in zip(cuts[:-1], cuts[1:])]
            print(f"| {backend} | {shuffle} | {whole / 1e9:.4f} | {', '.join(f'{s:.3f}' for s in shares)} |", flush=True)


if __name__ == "__main__":
    main()
