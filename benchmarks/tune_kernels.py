"""Times the kernel launchers directly (no autograd) for a few block configurations.

    python benchmarks/tune_kernels.py --B 16384 65536 --D 768

Prints, per B: one cuBLAS GEMM (B x D @ D x B), the contrastive forward and backward per
config, and the distillation row stats / forward / backward (shuffle none)."""
import argparse

import torch
from triton.testing import do_bench

import distillcse.kernels.contrastive as C
import distillcse.kernels.distill as KD


def bench(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--configs", nargs="+", default=["64,64,64,4,3", "64,64,128,8,3", "128,64,64,8,3", "128,128,64,8,3", "64,64,256,8,2"])
    a = p.parse_args()
    dtype = torch.bfloat16
    original = C._config
    for B in a.B:
        x = torch.randn(B, a.D, device="cuda", dtype=dtype)
        y = torch.randn(B, a.D, device="cuda", dtype=dtype)
        r = torch.ones(B, device="cuda") / a.D ** 0.5
        g = torch.full((B,), 1.0 / B, device="cuda")
        gemm = bench(lambda: x @ y.T)
        print(f"B={B} D={a.D} bf16: one cuBLAS GEMM {gemm:.3f} ms", flush=True)
        for cfg in a.configs:
            BM, BN, BD, w, s = map(int, cfg.split(","))
            C._config = lambda D, dt, BM=BM, BN=BN, BD=BD, w=w, s=s: dict(BM=BM, BN=BN, BD=BD, num_warps=w, num_stages=s)
            try:
                _, lse = C.contrastive_fwd(x, r, y, r, 20.0)
                f = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0))
                b = bench(lambda: C.contrastive_bwd(x, r, y, r, lse, 20.0, g))
                print(f"  contrastive BM={BM} BN={BN} BD={BD} warps={w} stages={s}: fwd {f:.3f} ms ({f/gemm:.2f}x GEMM)  bwd {b:.3f} ms ({b/gemm:.2f}x)", flush=True)
            except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
                print(f"  contrastive {cfg}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
        C._config = original
        t = torch.randn(B, a.D, device="cuda", dtype=dtype) / a.D ** 0.5
        stats = KD.distill_row_stats(x, r, t, 40.0, 80.0, 1.0)
        st = bench(lambda: KD.distill_row_stats(x, r, t, 40.0, 80.0, 1.0))
        fw = bench(lambda: KD.distill_fwd(x, r, t, stats[0], stats[1], 40.0, 80.0))
        bw = bench(lambda: KD.distill_bwd(x, r, t, stats[0], stats[1], 40.0, 80.0, g))
        print(f"  distill (none): stats {st:.3f} ms ({st/gemm:.2f}x)  fwd {fw:.3f} ms ({fw/gemm:.2f}x)  bwd {bw:.3f} ms ({bw/gemm:.2f}x)", flush=True)
        del x, y, t


if __name__ == "__main__":
    main()
