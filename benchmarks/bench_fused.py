"""Time and peak extra memory of forward+backward of the losses on one GPU, per backend,
against the time of one bare cuBLAS GEMM of the same shape (B x D @ D x B).

    python benchmarks/bench_fused.py --sizes 64 4096 16384 65536 --out results/

Writes ``bench_fused.csv`` (one row per point, with GPU, versions, commit and time stamp) and
prints a markdown table. A point that runs out of memory is recorded as "OOM".
"""
import argparse
import csv
import datetime
import os
import subprocess
import sys

import torch
import triton
from triton.testing import do_bench

import distillcse


def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


def make_inputs(B, D, Dt, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    common = torch.randn(1, D, device="cuda", generator=g)
    z1 = (common + torch.randn(B, D, device="cuda", generator=g)).to(dtype).requires_grad_()
    z2 = (z1.detach().float() + 0.5 * torch.randn(B, D, device="cuda", generator=g)).to(dtype).requires_grad_()
    teacher = (torch.randn(1, Dt, device="cuda", generator=g)
               + torch.randn(B, Dt, device="cuda", generator=g)).to(dtype)
    return z1, z2, teacher


def loss_fn(what, backend, shuffle, z1, z2, teacher):
    if what == "contrastive":
        return lambda: distillcse.contrastive_loss(z1, z2, backend=backend)
    return lambda: distillcse.distillcse_loss(z1, z2, teacher, shuffle=shuffle, seed=0, backend=backend)


def measure(fn, z1, z2):
    def step():
        z1.grad = z2.grad = None
        fn().backward()
    step()  # compile / warm up
    torch.cuda.synchronize()
    z1.grad = z2.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(step, warmup=25, rep=200, return_mode="median")
    return ms, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 4096, 16384, 65536])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--Dt", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cases", nargs="+", default=[
        "contrastive:triton", "contrastive:torch", "contrastive:reference",
        "full-none:triton", "full-expected:triton", "full-random:triton",
        "full-expected:torch", "full-random:torch", "full-random:reference"])
    p.add_argument("--max-reference-B", type=int, default=16384)
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit(), time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                D=args.D, Dt=args.Dt, dtype=args.dtype)
    rows = []
    for B in args.sizes:
        a = torch.randn(B, args.D, device="cuda", dtype=dtype)
        gemm_ms = do_bench(lambda: a @ a.T, warmup=25, rep=100, return_mode="median") if B * B * 2 < 2**35 else float("nan")
        del a
        for case in args.cases:
            what, backend = case.split(":")
            if backend == "reference" and B > args.max_reference_B:
                continue
            shuffle = what.split("-")[1] if what.startswith("full") else None
            torch.cuda.empty_cache()
            z1, z2, teacher = make_inputs(B, args.D, args.Dt, dtype)
            try:
                ms, peak = measure(loss_fn(what.split("-")[0], backend, shuffle, z1, z2, teacher), z1, z2)
                row = dict(meta, B=B, case=what, backend=backend, ms=round(ms, 4), peak_extra_MiB=round(peak / 2**20, 1),
                           gemm_ms=round(gemm_ms, 4), ms_over_gemm=round(ms / gemm_ms, 2))
            except torch.OutOfMemoryError:
                row = dict(meta, B=B, case=what, backend=backend, ms="OOM", peak_extra_MiB="OOM",
                           gemm_ms=round(gemm_ms, 4), ms_over_gemm="OOM")
            del z1, z2, teacher
            rows.append(row)
            print(f"B={B:>8} {what:14} {backend:9} ms={row['ms']!s:>10} extra MiB={row['peak_extra_MiB']!s:>9} "
                  f"gemm ms={gemm_ms:.4f} x gemm={row['ms_over_gemm']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_fused.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    print(f"\n{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}, "
          f"D={args.D}, Dt={args.Dt}, {args.dtype}\n")
    print("| B | case | backend | fwd+bwd ms | peak extra MiB | one GEMM ms | x GEMM |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['case']} | {r['backend']} | {r['ms']} | {r['peak_extra_MiB']} | {r['gemm_ms']} | {r['ms_over_gemm']} |")


if __name__ == "__main__":
    sys.exit(main())
