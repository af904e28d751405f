"""Hard negatives on the triton backend: forward + backward time and peak extra memory of
``contrastive_loss`` against the number of hard negatives H, with the hard negatives trained
and frozen (``requires_grad=False``: their backward GEMMs are skipped), and the contrastive
launchers given the columns as two blocks (z2, hard negatives: how the backend calls them) or
as one concatenated [B + H, D] tensor (the copy the blocks avoid, outside the timing).

    python benchmarks/hard_negatives_time.py --B 65536 --D 768 --hard 0 16384 65536   # a GPU
    TRITON_INTERPRET=1 python benchmarks/hard_negatives_time.py                       # CPU: tiny sizes

Predicted at B = 65,536, D = 768, bf16 (benchmarks/NOTES.md): time about (B + H) / B of H = 0's;
blocks within ~1% of one tensor; frozen hard negatives save about H / (B + H) of the backward;
peak extra memory (stubbed count) 254 MiB at H = 0, 278 at 16,384, 350 at 65,536.
"""
import argparse
import statistics
import time

import torch

import distillcse
from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd

TEMPERATURE = 0.05


def timed(fn, device, repeats):
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (CUDA events on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_mib(fn, device):
    """Peak CUDA memory ``fn()`` allocates beyond what exists before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def loss_step(z1, z2, hn):
    """One forward + backward of the public loss; the gradients are cleared first (so they count)."""
    def step():
        for x in (z1, z2, hn):
            if x is not None:
                x.grad = None
        distillcse.contrastive_loss(z1, z2, temperature=TEMPERATURE, hard_negatives=hn, backend="triton").backward()
    return step


def launcher_step(z1, columns, budget):
    """The contrastive launchers alone (forward with z1's gradient, then the columns'), on
    ``columns``: one [N, D] tensor or the blocks (z2, hard negatives)."""
    def inv_norms(x):
        return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).reciprocal()

    r1 = inv_norms(z1)
    ry = inv_norms(columns) if torch.is_tensor(columns) else torch.cat([inv_norms(c) for c in columns])
    g = torch.full((z1.shape[0],), 1.0 / z1.shape[0], device=z1.device)

    def step():  # the backward's budget as the triton backend's (half: the gradients exist beside it)
        _, stats, _ = contrastive_fwd(z1, r1, columns, ry, 1 / TEMPERATURE, g, budget_bytes=budget)
        contrastive_bwd_dy(z1, r1, columns, ry, stats, 1 / TEMPERATURE, g, budget_bytes=budget // 2)
    return step


def _cell(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=None, help="batch rows (default: 65,536 on CUDA, 160 on CPU)")
    p.add_argument("--D", type=int, default=None, help="width (default: 768 on CUDA, 32 on CPU)")
    p.add_argument("--hard", type=int, nargs="+", default=None,
                   help="numbers of hard negatives (default: 0, B / 4 and B)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=None, help="timed runs a point (default: 5 on CUDA, 1 on CPU)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    B = args.B or (65536 if cuda else 160)
    D = args.D or (768 if cuda else 32)
    hards = args.hard if args.hard is not None else [0, B // 4, B]
    repeats = args.repeats or (5 if cuda else 1)
    dtype = getattr(torch, args.dtype)
    budget = distillcse.config.chunk_budget_bytes()
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter: times say nothing of a GPU)"
    print(f"{name}; B = {B:,}, D = {D}, {args.dtype}, budget {budget / 2**20:.0f} MiB, torch {torch.__version__}")
    print("| H | loss, ms | peak extra, MiB | frozen H: ms | frozen H: MiB | launchers, blocks: ms | "
          "launchers, one [B + H, D] tensor: ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    z2 = (z1.detach() + torch.randn(B, D, generator=g).to(device, dtype)).requires_grad_()
    for H in hards:
        hn = torch.randn(H, D, generator=g).to(device, dtype).requires_grad_() if H else None
        trained = loss_step(z1, z2, hn)
        row = [f"{H:,}", _cell(1e3 * timed(trained, device, repeats), ".2f"), _cell(peak_extra_mib(trained, device), ".1f")]
        if hn is None:
            row += ["-", "-"]
        else:
            frozen = loss_step(z1, z2, hn.detach())
            row += [_cell(1e3 * timed(frozen, device, repeats), ".2f"), _cell(peak_extra_mib(frozen, device), ".1f")]
        x = z1.detach()
        blocks = (z2.detach(),) if hn is None else (z2.detach(), hn.detach())
        row.append(_cell(1e3 * timed(launcher_step(x, blocks, budget), device, repeats), ".2f"))
        one = torch.cat(blocks) if hn is not None else z2.detach()
        row.append(_cell(1e3 * timed(launcher_step(x, one, budget), device, repeats), ".2f"))
        print("| " + " | ".join(row) + " |", flush=True)
        del hn, one


if __name__ == "__main__":
    main()
