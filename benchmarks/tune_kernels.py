"""Times the kernel launchers directly (no autograd) for a few block configurations.

    python benchmarks/tune_kernels.py --B 16384 65536 --D 768

Prints, per B: one cuBLAS GEMM (B x D @ D x B); the contrastive forward (the loss alone) per
--fwd config, and per --grad config the forward that also writes dx and the dy kernel, each
also in GEMM-equivalents (its time / the cuBLAS time) next to the count its design predicts,
S + W / D (S feature splits, W padded output features); and the distillation row stats /
loss and gradient (shuffle none).

Configs are comma-separated integers (`C._config` is replaced while each one is timed):
  --fwd   BM,BN,BD,warps,stages                 the forward's logits tile [BM, BN], K-chunk BD
  --grad  R,S,BD,BD_OUT,N_OUT,warps,stages      each gradient-writing program owns R rows (the
          dx-writing forward: tile [R, S]; dy: tile [S, R]), streams S at a time, and
          accumulates N_OUT blocks of BD_OUT output features; the logits' K-chunk BD
The forward and the dy kernel share BD and the tile by default; a mixed choice only changes
the off-diagonal P_ij by a logit's rounding (kernels/contrastive.py, ``_config``): time it,
then run the GPU tests with it before adopting it. Check a config's registers, spills and
shared memory offline first: benchmarks/compile_sm90.py.
"""
import argparse

import torch
from triton.testing import do_bench

import distillcse.kernels.contrastive as C
import distillcse.kernels.distill as KD

# The current default first, then the candidates worth timing on an H100 (bf16, D = 768),
# with what benchmarks/compile_sm90.py reported for them (registers, spills, shared memory;
# the defaults as compiled in session 7, the other rows on session 6's kernels: the forward
# then nested its feature-chunk loop, and dx had a kernel of its own); "GEMM-eq" is the
# predicted count of the dx-writing forward plus dy.
FWD_CONFIGS = [
    "64,64,128,8,3",  # default: wgmma m64n32 per warpgroup (likely shared-memory bound); 116 regs, 96 KiB
    "128,128,128,8,3",  # m64n128; 223 regs, 192 KiB
    "128,128,64,8,4",  # m64n128; 207 regs, 128 KiB
    "64,128,128,4,3",  # one warpgroup, m64n128; 239 regs, 144 KiB
]
GRAD_CONFIGS = [
    "64,64,128,128,3,8,3",  # default: 2 splits of 3 x 128, 6 GEMM-eq; 246 / 242 regs, 96 KiB
    "64,64,128,128,1,8,3",  # one block of 128: 6 splits, 14 GEMM-eq; 169 / 164 regs
    "64,64,128,128,4,8,3",  # 2 splits of 4 x 128 (1/4 padding), 6.7 GEMM-eq; 255 regs, no spills
    "64,64,128,128,3,8,2",  # fewer pipeline stages; 245 / 250 regs, 64 KiB
    "64,64,64,128,3,8,3",  # K-chunk 64 (the forward must then use BD = 64 too); 237 / 230 regs, 48 KiB
    "64,64,128,256,2,8,3",  # 2 x 256 (wgmma m64n128 products), 6.7 GEMM-eq; du_y spills 12 B
    "64,128,128,128,3,8,2",  # streamed tile 128 (wgmma m64n64 logits); spills 20-28 B
]

def bench(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def fwd_config(spec):
    BM, BN, BD, warps, stages = map(int, spec.split(","))
    return dict(BM=BM, BN=BN, BD=BD, num_warps=warps, num_stages=stages)


def grad_config(spec):
    """(dx-writing forward config, dy kernel config)."""
    R, S, BD, BD_OUT, N_OUT, warps, stages = map(int, spec.split(","))
    common = dict(BD=BD, BD_OUT=BD_OUT, N_OUT=N_OUT, num_warps=warps, num_stages=stages)
    return dict(BM=R, BN=S, **common), dict(BM=S, BN=R, **common)


def predicted_gemms(D, cfg):
    """S + W / D GEMM-equivalents: a gradient-writing kernel computes the logits once per
    feature split and multiplies them by W padded output features."""
    splits = C._feature_splits(D, cfg)
    return splits + splits * cfg["N_OUT"] * cfg["BD_OUT"] / D


def patch_config(**kernels):
    """Replaces the launchers' config: the given kernels' entries over the default ones."""
    default = C._config
    C._config = lambda D, dtype: dict(default(D, dtype), **kernels)
    return default


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--fwd", nargs="+", default=FWD_CONFIGS)
    p.add_argument("--grad", nargs="+", default=GRAD_CONFIGS)
    a = p.parse_args()
    dtype = torch.bfloat16
    for B in a.B:
        x = torch.randn(B, a.D, device="cuda", dtype=dtype)
        y = torch.randn(B, a.D, device="cuda", dtype=dtype)
        r = torch.ones(B, device="cuda") / a.D ** 0.5
        g = torch.full((B,), 1.0 / B, device="cuda")
        gemm = bench(lambda: x @ y.T)
        print(f"B={B} D={a.D} bf16: one cuBLAS GEMM {gemm:.3f} ms", flush=True)
        _, stats, _ = C.contrastive_fwd(x, r, y, r, 20.0)
        for spec in a.fwd:
            default = patch_config(fwd=fwd_config(spec))
            try:  # a config that does not compile (shared memory) is reported, not fatal
                f = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0))
                print(f"  contrastive fwd BM,BN,BD,warps,stages={spec}: {f:.3f} ms ({f / gemm:.2f} GEMM-eq, "
                      "predicted 1)", flush=True)
            except Exception as e:
                print(f"  contrastive fwd {spec}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            finally:
                C._config = default
        for spec in a.grad:
            fwd_grad_cfg, dy_cfg = grad_config(spec)
            default = patch_config(fwd_grad=fwd_grad_cfg, dy=dy_cfg)
            try:
                f = bench(lambda: C.contrastive_fwd(x, r, y, r, 20.0, g))
                b = bench(lambda: C.contrastive_bwd_dy(x, r, y, r, stats, 20.0, g))
                print(f"  contrastive R,S,BD,BD_OUT,N_OUT,warps,stages={spec}: fwd with dx {f:.3f} ms "
                      f"({f / gemm:.2f} GEMM-eq), dy {b:.3f} ms ({b / gemm:.2f}), each predicted "
                      f"{predicted_gemms(a.D, fwd_grad_cfg):.2f}", flush=True)
            except Exception as e:
                print(f"  contrastive {spec}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
            finally:
                C._config = default
        t = torch.randn(B, a.D, device="cuda", dtype=dtype)  # one teacher's raw rows
        rt = torch.linalg.vector_norm(t, dim=1, dtype=torch.float32).reciprocal()
        stats = KD.distill_row_stats(x, r, t, rt, 40.0, 80.0, 1.0)
        st = bench(lambda: KD.distill_row_stats(x, r, t, rt, 40.0, 80.0, 1.0))
        budget = 256 * 2**20
        lg = bench(lambda: KD.distill_loss_and_grad(x, r, t, rt, stats[0], stats[1], 40.0, 80.0,
                                                    budget_bytes=budget))
        print(f"  distill (none): stats {st:.3f} ms ({st/gemm:.2f}x)  loss+grad {lg:.3f} ms ({lg/gemm:.2f}x, "
              f"predicted 4: s, t and two cuBLAS GEMMs)", flush=True)
        del x, y, t, rt


if __name__ == "__main__":
    main()
