"""Times the kernel launchers directly (no autograd) for a few slab budgets and block choices.

    python benchmarks/tune_kernels.py --B 16384 65536 --D 768

Prints, per B (bf16, N = B columns): one cuBLAS GEMM (B x D @ D x B); the slabs' two GEMM
shapes at a few slab heights, per sweep of B rows (``time_slab_gemms``); the contrastive forward
(the loss alone, and with dx) and its dy per --budgets slab budget (MiB), and the forward with
dx per --row-blocks choice of the row kernel (``C._blocks`` is replaced while each one is
timed) and with the row kernel in one read of the dots and in two, each also in
GEMM-equivalents (its time / the GEMM's) beside what the design predicts
(kernels/contrastive.py: the loss alone 1, with dx 2, dy 2, plus their memory-bound passes);
the distillation row stats / loss and gradient (shuffle none); and the row statistics per
--stats-blocks choice of ``_row_stats_kernel``'s tile, for each of its variants (the student's
dots or not; both halves of t, or its whole rows with the Group-P search's grid pass, which
this time includes).

  --budgets       slab budgets in MiB (the backward runs at half the chunk budget)
  --row-blocks    BR,BN,warps: rows a program of the row kernel, columns a step, warps
  --stats-blocks  BM,BN,warps of the statistics kernel (sm_90a, benchmarks/session_log.md Session 18:
                  at 32,128,8 the both-halves variant takes 173 registers, one program an SM;
                  32,64,8 107 registers and 17% more instructions an entry)
Check a block choice's registers and spills offline first: benchmarks/compile_sm90.py.
"""
import argparse

import torch
from triton.testing import do_bench

import distillcse.kernels.contrastive as C
import distillcse.kernels.distill as KD
from distillcse.kernels.group_partition import grid_pass
from distillcse.kernels.utils import matmul_f32

ROW_BLOCKS = ["1,2048,8", "1,4096,8", "2,1024,8", "4,1024,8", "1,1024,4"]  # the default first
STATS_BLOCKS = ["32,128,8", "32,64,8", "16,128,8"]  # the default first


def bench(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def patch_row_blocks(spec):
    """Replaces the row kernel's launch blocks; returns the original ``C._blocks``."""
    BR, BN, warps = map(int, spec.split(","))
    default = C._blocks
    C._blocks = lambda: dict(default(), rows=dict(BR=BR, BN=BN, num_warps=warps))
    return default


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--budgets", type=float, nargs="+", default=[128, 64, 256])
    p.add_argument("--row-blocks", nargs="+", default=ROW_BLOCKS)
    p.add_argument("--stats-blocks", nargs="+", default=STATS_BLOCKS)
    a = p.parse_args()
    dtype = torch.bfloat16
    for B in a.B:
        x = torch.randn(B, a.D, device="cuda", dtype=dtype)
        y = torch.randn(B, a.D, device="cuda", dtype=dtype)
        r = torch.ones(B, device="cuda") / a.D ** 0.5
        g = torch.ones(B, device="cuda")
        gemm = bench(lambda: x @ y.T)
        print(f"B={B} D={a.D} bf16: one cuBLAS GEMM {gemm:.3f} ms", flush=True)
        time_slab_gemms(x, y, gemm)
        for mib in a.budgets:
            budget = int(mib * 2**20)
            _, stats, _ = C.contrastive_fwd(x, r, y, r, 20.0, budget_bytes=budget)
            lo = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0, budget_bytes=budget))
            f = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0, g, budget_bytes=budget))
            b = bench(lambda: C.contrastive_bwd_dy(x, r, y, r, stats, 20.0, g, budget_bytes=budget))
            print(f"  contrastive, {mib:g} MiB slabs: loss alone {lo:.3f} ms ({lo / gemm:.2f} GEMM-eq, predicted 1+), "
                  f"with dx {f:.3f} ms ({f / gemm:.2f}, 2+), dy {b:.3f} ms ({b / gemm:.2f}, 2+)", flush=True)
        budget = 128 * 2**20
        for spec in a.row_blocks:
            default = patch_row_blocks(spec)
            try:  # a choice that does not compile is reported, not fatal
                f = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0, g, budget_bytes=budget))
                print(f"  contrastive with dx, row kernel BR,BN,warps={spec}: {f:.3f} ms ({f / gemm:.2f} GEMM-eq)", flush=True)
            except Exception as e:
                print(f"  row kernel {spec}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            finally:
                C._blocks = default
        time_passes(x, r, y, g, budget, gemm)
        t = torch.randn(B, a.D, device="cuda", dtype=dtype)  # one teacher's raw rows
        rt = torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).reciprocal()
        budget = 128 * 2**20
        stats = KD.distill_row_stats(x, r, t, rt, 40.0, 80.0, 1.0, budget_bytes=budget)
        st = bench(lambda: KD.distill_row_stats(x, r, t, rt, 40.0, 80.0, 1.0, budget_bytes=budget))
        lg = bench(lambda: KD.distill_loss_and_grad(x, r, t, rt, stats[0], stats[1], 40.0, 80.0,
                                                    budget_bytes=budget))
        print(f"  distill (none): stats {st:.3f} ms ({st/gemm:.2f}x, predicted 2+: the s and t dots)  loss+grad "
              f"{lg:.3f} ms ({lg/gemm:.2f}x, predicted 3+: s, t and the gradient's GEMM)", flush=True)
        time_stats_blocks(x, r, t, rt, budget, gemm, a.stats_blocks)
        del x, y, t, rt


SLAB_GEMM_ROWS = (320, 160, 64)  # at 128 MiB, B = 65,536: the contrastive forward's slabs, its backward's, random's dots


def time_slab_gemms(x, y, gemm):
    """The slabs' two cuBLAS shapes (``matmul_f32``, fp32 out), swept over B's rows in slabs of
    R: the dots ``x[slab] y^T`` [R, B] and the factors' GEMM ``[R, B] @ y`` [R, D], whose output
    is small and inner dimension B (split-K or not is cuBLAS's choice). Each as a multiple of
    the whole GEMM's time: 1.0 is the design's assumption (one GEMM-equivalent a sweep)."""
    B = x.shape[0]
    for R in (R for R in SLAB_GEMM_ROWS if R < B):  # a slab of all B rows is the whole GEMM
        dots = torch.empty(R, B, device=x.device, dtype=torch.float32)
        fac = torch.randn(R, B, device=x.device).to(x.dtype)
        d = bench(lambda: matmul_f32(x[:R], y.T, out=dots)) * B / R
        f = bench(lambda: matmul_f32(fac, y)) * B / R
        print(f"  slab GEMMs, R={R}: dots {d:.3f} ms a sweep ({d / gemm:.2f} GEMM-eq), "
              f"factors {f:.3f} ms a sweep ({f / gemm:.2f})", flush=True)


def time_passes(x, r, y, g, budget, gemm):
    """The contrastive forward with dx, its row kernel in one read of the dots (the default at
    scale 20 in bf16) and in two (``C.one_pass`` replaced): the one pass should save a read
    of the [rows, B] fp32 dots and half the kernel's instructions (benchmarks/session_log.md, Session 19)."""
    default = C.one_pass
    for name, choice in (("one pass", default), ("two passes", lambda dtype, scale: False)):
        C.one_pass = choice
        try:
            f = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0, g, budget_bytes=budget))
            print(f"  contrastive with dx, row kernel in {name}: {f:.3f} ms ({f / gemm:.2f} GEMM-eq)", flush=True)
        finally:
            C.one_pass = default


def time_stats_blocks(x, r, t, rt, budget, gemm, specs):
    """``distill_row_stats`` per variant and tile choice (``KD._stats_blocks`` replaced)."""
    default = KD._stats_blocks
    for student in (True, False):
        for half_t in (True, False):
            variant = f"{'student + ' if student else ''}t {'halves' if half_t else 'whole + grid pass'}"
            for spec in specs:
                BM, BN, warps = map(int, spec.split(","))
                KD._stats_blocks = lambda: dict(BM=BM, BN=BN, num_warps=warps)

                def stats():
                    grid = None if half_t else grid_pass(t, rt, 1.0, group_p=0.1, budget_bytes=budget)
                    KD.distill_row_stats(x if student else None, r if student else None, t, rt, 40.0, 80.0, 1.0,
                                         budget_bytes=budget, grid=grid)
                try:  # a choice that does not compile is reported, not fatal
                    ms = bench(stats)
                    print(f"  row stats, {variant}, BM,BN,warps={spec}: {ms:.3f} ms ({ms / gemm:.2f} GEMM-eq)",
                          flush=True)
                except Exception as e:
                    print(f"  row stats, {variant}, {spec}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
                finally:
                    KD._stats_blocks = default


if __name__ == "__main__":
    main()
