"""Where a fused step's GPU time goes: torch.profiler's kernel table for one forward + backward.

    python benchmarks/profile_step.py [--B 16384 65536] [--small 64] [--out DIR]

For each B and each of (contrastive, full/expected, full/random): one warm-up step (JIT
compiles), then one profiled step; prints the wall time (CUDA events) and the kernels sorted by
their GPU time, with call counts; the ``distillcse::<phase>`` rows (row_stats, with the
search's grid pass; group_thresholds, with the group means of shuffle "expected";
distill_slabs, contrastive_rows, contrastive_columns) give each phase's total. ``--small``
profiles 20 steps at a small B, where host overhead rules. bf16, D = Dt = 768, one teacher, as ``bench targets``.
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

import distillcse


def step_fn(what, shuffle):
    if what == "contrastive":
        return lambda z1, z2, t: distillcse.contrastive_loss(z1, z2, backend="triton")
    return lambda z1, z2, t: distillcse.distillcse_loss(z1, z2, t, shuffle=shuffle, backend="triton")


def inputs(B, D=768):
    g = torch.Generator(device="cuda").manual_seed(0)
    z1, z2, t = (torch.randn(B, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    return z1.requires_grad_(), z2.requires_grad_(), t


def timed(fn, args, steps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn(*args).backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile_case(B, what, shuffle, steps, log):
    fn, args = step_fn(what, shuffle), inputs(B)
    timed(fn, args, 1)  # compile
    ms = timed(fn, args, steps)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn(*args).backward()
        torch.cuda.synchronize()
    log(f"\n### B = {B}, {what}, shuffle {shuffle}: {ms:.3f} ms a step (mean of {steps})")
    log(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--small", type=int, default=64)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    path = os.path.join(args.out, "profile.txt")
    with open(path, "w") as f:
        def log(s):
            print(s, flush=True)
            f.write(s + "\n")
            f.flush()
        log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        profile_case(args.small, "full", "random", 20, log)
        for B in args.B:
            for what, shuffle in (("contrastive", ""), ("full", "expected"), ("full", "random")):
                profile_case(B, what, shuffle, 1, log)


if __name__ == "__main__":
    main()
