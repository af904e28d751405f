"""How many probe points the threshold search's first pass should take: passes and predicted
per-entry work of the search on real sentence embeddings, for several ``GRID_LANES``.

    python benchmarks/grid_lanes.py --B 4096 16384 [--lanes 64 32 16]

The search is kernels/group_partition.py's own host code (``_search``) fed by the exact torch
evaluation of ``benchmarks/group_search_passes.py`` (each row's sorted values), on the
all-MiniLM-L6-v2 embeddings cached there, by mass with group_p = 0.1 (G - 1 = 9) at grouping
scales 1 and 20. Printed per setting: the passes, the fraction of rows each pass evaluates,
the fraction of (row, boundary) pairs open after it, the teacher GEMMs that makes (one a full
pass), and the probe kernel's SASS instructions per teacher logit (sm_90a, counted by
``compile_sm90.py``'s loop sizes, session 15: each point's accumulators in registers): ~3.6 per
point that only measures (the grid pass), ~10.2 per point that also snaps to the row's
neighbouring values, plus ~7.5 per boundary window from the second pass on.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import group_search_passes as passes  # noqa: E402  (sets TRITON_INTERPRET on a CPU)

gp = passes.gp
G1, GROUP_P, CHUNK = 9, 0.1, 1024


def search_trace(x, scale):
    """Per pass (open fraction, rows fraction, points) of the search over every row of x."""
    B = len(x)
    traces, weights = [], []
    for start in range(0, B, CHUNK):
        rows = torch.arange(start, min(start + CHUNK, B))
        t = x[rows] @ x.T
        t[torch.arange(len(rows)), rows] = math.inf  # the diagonal sorts last and is dropped
        ascending = t.sort(1).values[:, :-1].contiguous()
        logits = ascending.double() * scale
        lse = torch.logsumexp(logits, 1)
        suffix = torch.zeros(len(rows), B, dtype=torch.float64)
        suffix[:, :-1] = torch.exp(logits - lse[:, None]).flip(1).cumsum(1).flip(1)
        trace = []
        gp._search(passes.SortedRows(ascending, suffix), ascending[:, 0].clone(), ascending[:, -1].clone(),
                   lse.float(), scale, G1, B, GROUP_P, None, trace=trace)
        traces.append(trace)
        weights.append(len(rows))
    return passes.merge(traces, weights)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--lanes", type=int, nargs="+", default=[64, 32, 16])
    args = p.parse_args()
    print("| B | grouping scale | GRID_LANES | passes | rows per pass | open after each | teacher GEMMs | SASS per logit |")
    print("| ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |")
    for B in args.B:
        x = passes.embeddings(B).float()
        x = x / x.norm(dim=1, keepdim=True)
        for scale in (1.0, 20.0):
            for lanes in args.lanes:
                gp.GRID_LANES = lanes
                trace = search_trace(x, scale)
                ops = sum(r * (p * 10.2 + G1 * 7.5 if i > 0 else p * 3.6) for i, (_, r, p) in enumerate(trace))
                print(f"| {B} | {scale:g} | {lanes} | {len(trace)} | {', '.join(f'{r:.3g}' for _, r, _ in trace)} | "
                      f"{', '.join(f'{o:.2g}' for o, _, _ in trace)} | {sum(r for _, r, _ in trace):.2f} | {ops:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
