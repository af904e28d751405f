"""Group-P thresholds on a GPU: the pass search against the pairwise kernel (kernels/group_partition.py).

    python benchmarks/time_thresholds.py                          # B = 256 .. 4096, Dt = 384 768 2304
    python benchmarks/time_thresholds.py --B 1024 2048 --Dt 768

``group_thresholds(method="search")`` is a few passes of probe kernels with host-side
bookkeeping between them (hundreds of small PyTorch kernels and a host sync a pass);
``method="pairwise"`` is one B^3 kernel. "auto" takes pairwise up to ``PAIRWISE_MAX_B`` rows:
this table is what that constant should be set from; the pairwise way also takes ``tie_cuts``
(session 21: tied values in column order), timed in its own column. Teacher rows: bf16, random plus a shared
component (positive, clustered cosines like a sentence encoder's), unit norm; grouping by
mass at temperature 1 with group_p = 0.1 (G - 1 = 9). Median of ``triton.testing.do_bench``
after a warm-up call; both methods' partitions are compared (entries in another group).
"""
import argparse

import torch


def teacher_rows(B, Dt, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, Dt, device="cuda", generator=g) + 0.8 * torch.randn(1, Dt, device="cuda", generator=g)
    return torch.nn.functional.normalize(x, dim=1).to(torch.bfloat16)


def row_stats(t):
    """lse at scale 1, t_min, t_max over j != i (fp32 [B] each), from the bf16 rows."""
    s = t.float() @ t.float().T
    s.fill_diagonal_(float("-inf"))
    lse, t_max = torch.logsumexp(s, 1), s.amax(1)
    s.fill_diagonal_(float("inf"))
    return lse, s.amin(1), t_max


def main():
    from triton.testing import do_bench

    from distillcse.kernels import group_partition as gp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--Dt", type=int, nargs="+", default=[384, 768, 2304])
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a GPU")
    print(f"# group_thresholds on {torch.cuda.get_device_name()}, bf16 rows, group_p 0.1; "
          f"PAIRWISE_MAX_B = {gp.PAIRWISE_MAX_B}")
    print("| B | Dt | search ms | pairwise ms | tie cuts ms | (pairwise + cuts) / search | entries in another group |")
    print("|---|---|---|---|---|---|---|")
    for B in a.B:
        for Dt in a.Dt:
            t = teacher_rows(B, Dt)
            rt = torch.ones(B, device="cuda")
            lse, t_min, t_max = row_stats(t)
            ms, thr = {}, {}
            for method in ("search", "pairwise"):
                run = lambda: gp.group_thresholds(t, rt, lse, t_min, t_max, 1.0, group_p=0.1,  # noqa: E731
                                                  method=method)
                thr[method] = run()
                ms[method] = do_bench(run, return_mode="median")
            cuts = lambda: gp.tie_cuts(t, rt, lse, t_min, t_max, thr["pairwise"], 1.0, group_p=0.1)  # noqa: E731
            ms["cuts"] = do_bench(cuts, return_mode="median")
            s = (t.float() @ t.float().T)
            groups = {m: (s[:, :, None] < v[:, None, :]).sum(-1).fill_diagonal_(-1) for m, v in thr.items()}
            differ = int((groups["search"] != groups["pairwise"]).sum())
            print(f"| {B} | {Dt} | {ms['search']:.3f} | {ms['pairwise']:.3f} | {ms['cuts']:.3f} | "
                  f"{(ms['pairwise'] + ms['cuts']) / ms['search']:.2f} | {differ} |", flush=True)


if __name__ == "__main__":
    main()
