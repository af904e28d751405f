"""Two GPU diagnostics left open by the first H200 run (2026-12-04), printed and written to
``$OUT/diag.txt``:

1. ``small`` -- the one-program kernel's loss with and without gradients (bf16 and fp16, random
   shuffle, B = 50 with 70 columns, a tile the API no longer sends there: ``MAX_COLUMNS`` is
   lifted to 128 for it; tests/test_kernel_small_batch.py's inputs over 12 data seeds): run twice
   (determinism), with gradients, and the float64 loss. tests' ``test_half_precision[bf16]``
   saw 11.0694 with gradients against 10.8383 without.
2. ``probe`` -- ``_group_probe_kernel``'s time against its probe points per row (BP = 16, 32, 64,
   no collection; measure only, as the grid pass now runs, and with snaps) at B = 16,384, bf16
   teacher rows of 768, and cuBLAS's t t^T for scale. On the 16 x 16 tiles of d13d510: 91 / 161 /
   163 ms against cuBLAS's 0.62 ms; predicted from the sm_90a SASS of session 14's [32, 64]
   tiles (compile-sm90 report, "loops"; 1.05e12 warp-instructions/s): BP = 32 measure only
   (unrolled) ~1.5 ms, snapping (a loop) ~5.6 ms.

3. ``paper`` -- where the paper batch's time goes (B = 64, D = Dt = 768, bf16; 0.80 ms a step in
   ``bench targets``, of which the one-program kernel took 194 us): the kernel alone (CUDA
   events over 200 launches) per term and shuffle, with and without gradients, and the host
   time of ``distillcse_loss`` + backward (wall clock over 200 steps, the finiteness check on
   and off), so that the kernel's parts and the host's share are known.

    python benchmarks/gpu_diag.py [small] [probe] [paper]
    compute-sanitizer --tool racecheck python3 benchmarks/gpu_diag.py once   # 1.'s first seed, bf16
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small(log, seeds=12, dtypes=(torch.bfloat16, torch.float16)):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_kernel_small_batch as T
    from distillcse.kernels import small_batch
    from distillcse.kernels.group_partition import num_groups
    from distillcse.kernels.small_batch import small_batch_loss

    small_batch.MAX_COLUMNS = 128  # the 70-column tile that failed (the API streams it since)

    kwargs = dict(T.SCALES, group_p=0.1, group_size=None, n_groups=num_groups(50, 0.1), shuffle="random",
                  step_seed=77, w_cl=1.0, w_kd=1.0)
    for dtype in dtypes:
        log(f"\n## small batch, {dtype}: seed | loss | again | with grad | float64")
        for seed in range(seeds):
            x, y, t = T._inputs(50, 64, 48, 70, dtype, seed=seed if seed else 9)
            a = small_batch_loss(x, y, t, **kwargs)[0].item()
            a2 = small_batch_loss(x, y, t, **kwargs)[0].item()
            b = small_batch_loss(x, y, t, need_grad=True, **kwargs)[0].item()
            want = T._expected(x, y, t, shuffle="random", group_p=0.1, group_size=None, step_seed=77,
                               w_cl=1.0, w_kd=1.0)[0].item()
            flag = "" if a == a2 == b else "  <- differ"
            log(f"{seed if seed else 9:>4} | {a:.6f} | {a2:.6f} | {b:.6f} | {want:.6f}{flag}")


def cuda_ms(fn, reps=3):
    """Milliseconds a call of ``fn`` (CUDA events over ``reps`` calls, after one warm-up call)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def probe(log):
    from distillcse.kernels import group_partition as GP

    B, Dt, G1 = 16384, 768, 9
    g = torch.Generator(device="cuda").manual_seed(0)
    t = torch.randn(B, Dt, device="cuda", generator=g).to(torch.bfloat16)
    rt = t.float().norm(dim=1).reciprocal()
    lse = torch.zeros(B, device="cuda")
    rows = torch.arange(B, device="cuda")
    evaluate = GP._KernelProbes(t, rt, lse, 1.0, G1, False)
    log(f"\n## _group_probe_kernel at B = {B}, Dt = {Dt}, bf16, blocks measuring {GP._probe_blocks(False)}, "
        f"snapping {GP._probe_blocks(True)} (each pass with its cuBLAS dots)")
    for BP in (16, 32, 64):
        x = torch.linspace(-0.2, 0.2, BP, device="cuda").expand(B, BP).contiguous()
        log(f"BP = {BP:>2}: {cuda_ms(lambda: evaluate(rows, x, None, False)):.2f} ms measure only (the grid pass), "
            f"{cuda_ms(lambda: evaluate(rows, x, None, True)):.2f} ms with snaps")
    # a later pass: 16 snapping points and G1 windows of ~200 values each (cosines ~ N(0, 1 / Dt))
    x = torch.linspace(-0.2, 0.2, 16, device="cuda").expand(B, 16).contiguous()
    centre = torch.linspace(-0.06, 0.06, G1, device="cuda").expand(B, G1)
    windows = ((centre - 5e-4).contiguous(), (centre + 5e-4).contiguous())
    log(f"16 snapping points and {G1} windows: {cuda_ms(lambda: evaluate(rows, x, windows, True)):.2f} ms")
    log(f"cuBLAS t t^T [B, B] bf16: {cuda_ms(lambda: t @ t.T):.2f} ms")


def paper(log, B=64, D=768, reps=200):
    import time

    import distillcse
    from distillcse.kernels.group_partition import num_groups
    from distillcse.kernels.small_batch import small_batch_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    x, y, t = (torch.randn(B, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    scales = dict(cl_scale=20.0, student_scale=40.0, teacher_scale=80.0, grouping_scale=1.0, group_p=0.1,
                  n_groups=num_groups(B, 0.1), step_seed=7)
    log(f"\n## paper batch, B = {B}, D = {D}, bf16: small_batch_loss (with a shuffle, the targets' kernel and the "
        "loss kernel), us a call (CUDA events)")
    log("| terms | shuffle | loss only | with gradients |")
    log("| --- | --- | ---: | ---: |")
    for terms, cols, teacher in (("contrastive", y, None), ("distillation", None, t), ("both", y, t)):
        for shuffle in (("none",) if teacher is None else ("none", "expected", "random")):
            us = [1e3 * cuda_ms(lambda: small_batch_loss(x, cols, teacher, shuffle=shuffle, need_grad=grad,
                                                         **scales), reps) for grad in (False, True)]
            log(f"| {terms} | {shuffle} | {us[0]:.1f} | {us[1]:.1f} |")
    z1, z2 = x.clone().requires_grad_(), y.clone().requires_grad_()
    for check in (True, False):
        distillcse.set_finite_check(check)
        for _ in range(20):
            distillcse.distillcse_loss(z1, z2, t, backend="triton").backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            distillcse.distillcse_loss(z1, z2, t, backend="triton").backward()
        host = time.perf_counter() - t0  # the launches queue; the sync below waits for the rest
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
        log(f"distillcse_loss + backward, finite check {'on' if check else 'off'}: {1e6 * total / reps:.0f} us a "
            f"step ({1e6 * host / reps:.0f} us of it before the last launch returned)")
    distillcse.set_finite_check(True)


def main():
    parts = sys.argv[1:] or ["small", "probe"]
    known = ("small", "once", "probe", "paper")
    if any(part not in known for part in parts):  # --help too: say so before writing anything
        sys.exit(f"usage: python benchmarks/gpu_diag.py [{'] ['.join(known)}]  (see the docstring)")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "diag.txt"), "a") as f:
        def log(s):
            print(s, flush=True)
            f.write(s + "\n")
            f.flush()
        log(f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}")
        for part in parts:
            {"small": small, "once": lambda log: small(log, 1, (torch.bfloat16,)), "probe": probe,
             "paper": paper}[part](log)


if __name__ == "__main__":
    main()
