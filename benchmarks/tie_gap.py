"""The triton backend's tie rule against the torch backend's on batches with duplicated rows
(benchmarks/session_log.md, Sessions 20-21): the torch backend ranks tied teacher cosines in
column order (a stable sort), as do the one-program kernel (B <= 64) and the pairwise
thresholds' tie cuts (B <= 1024); the threshold search (B > 1024) puts tied cosines in one
group. Relative loss difference, shuffle expected, fp32, the
worst of 4 seeds; the last n teacher rows are copies of the first n, and every teacher entry
is a multiple of 1/64 in [-1, 1], so that every dot is exact in fp32 whatever its summation
order and copies tie in every backend. On a CPU the kernels run under Triton's interpreter
(set here before triton is imported).

    python benchmarks/tie_gap.py
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import distillcse  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

print("| B | duplicated rows | difference |\n| ---: | ---: | ---: |")
for B, n_dup in ((16, 0), (16, 5), (64, 8), (130, 0), (130, 4), (256, 2), (256, 8), (1100, 0), (1100, 8)):
    gaps = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        z, t = torch.randn(B, 32, generator=g), torch.randn(B, 24, generator=g).clamp(-1, 1).mul(64).round().div(64)
        for k in range(n_dup):
            t[B - 1 - k] = t[k]
            z[B - 1 - k] = z[k] + 0.01 * torch.randn(32, generator=g)
        z, t = z.to(DEVICE), t.to(DEVICE)
        ref = distillcse.distill_loss(z, t, shuffle="expected", backend="torch").item()
        got = distillcse.distill_loss(z, t, shuffle="expected", backend="triton").item()
        gaps.append(abs(got - ref) / ref)
    print(f"| {B} | {n_dup} | {max(gaps):.2g} |", flush=True)
