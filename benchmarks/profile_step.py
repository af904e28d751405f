"""Where a fused step's GPU time goes: torch.profiler's kernel table for one forward + backward.

    python benchmarks/profile_step.py [--B 16384 65536] [--small 64] [--out DIR]

For each B and each of (contrastive, full/expected, full/random): one warm-up step (JIT
compiles), then one profiled step; prints the wall time (CUDA events) and the kernels sorted by
their GPU time, with call counts; the ``distillcse::<phase>`` rows (row_stats, with the
search's grid pass; group_thresholds, with the group means of shuffle "expected";
distill_slabs, contrastive_rows, contrastive_columns) give each phase's total. ``--small``
profiles 20 steps at a small B, where host overhead rules. bf16, D = Dt = 768, one teacher, as ``bench targets``.
After each table: the GPU's busy time against the wall time, and each phase's host time against
its kernels' (``busy_summary``): where the host is the slower side.
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
    try:  # a summary that a profiler version without these fields must not cost the table above
        log(busy_summary(prof, ms, steps))
    except Exception as e:
        log(f"(no busy summary: {type(e).__name__}: {e})")


def busy_summary(prof, ms, steps):
    """The GPU's busy time a step (the kernels', memsets' and copies' self times, summed as
    the table's "Self CUDA time total" is) against the step's wall time: the rest is the GPU
    idle, waiting for the host's launches or a sync. Then per ``distillcse::<phase>`` range
    (its host-side events): the host's time in it against its kernels' (a phase whose host
    time exceeds its GPU time is launch-bound)."""
    from torch.autograd import DeviceType
    busy = sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3 / steps
    lines = [f"GPU busy {busy:.2f} ms of {ms:.2f} ms a step: idle {ms - busy:.2f} ms (waiting on the host)"]
    phases = {}
    for e in prof.events():
        if e.name.startswith("distillcse::") and e.device_type == DeviceType.CPU:
            host, gpu = phases.get(e.name, (0.0, 0.0))
            phases[e.name] = (host + e.cpu_time_total / 1e3 / steps, gpu + e.device_time_total / 1e3 / steps)
    for name, (host, gpu) in phases.items():
        lines.append(f"  {name}: host {host:.2f} ms, GPU {gpu:.2f} ms{'  (launch-bound)' if host > gpu else ''}")
    return "\n".join(lines)


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
