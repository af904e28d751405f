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

import torch

import distillcse
from distillcse import checks
from distillcse.bench import memory_meter, time_once
from distillcse.kernels.contrastive import contrastive_bwd_dy, contrastive_fwd
from distillcse.triton_backend import _column_norms, _columns_of, _inv_norms

TEMPERATURE = 0.05


def timed(fn, device, repeats):
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    return statistics.median(time_once(fn, device) for _ in range(repeats))


def peak_extra_mib(fn, device):
    """Peak extra memory of one ``fn()``: CUDA's allocator on a GPU, counted tensor allocations
    on the CPU (``distillcse bench memory``'s meters)."""
    result = {}
    with memory_meter("triton", device).measure(result):
        fn()
    return result["peak"] / 2**20


def loss_step(z1, z2, hn):
    """One forward + backward of the public loss; the gradients are cleared first (so they count)."""
    def step():
        for x in (z1, z2, hn):
            if x is not None:
                x.grad = None
        distillcse.contrastive_loss(z1, z2, temperature=TEMPERATURE, hard_negatives=hn, backend="triton").backward()
    return step


def launcher_step(z1, z2, hn, budget, concatenated):
    """The contrastive launchers alone (forward with z1's gradient, then the columns'), on the
    blocks (z2, hn) as the backend passes them, or ``concatenated`` into one [B + H, D] tensor
    (made here, outside the timed step)."""
    r1, ry = _inv_norms(z1), _column_norms(z2, hn)
    columns = torch.cat([z2, hn]) if concatenated and hn is not None else _columns_of(z2, hn)
    g = torch.full((z1.shape[0],), 1.0 / z1.shape[0], device=z1.device)

    def step():  # the backward's budget as the triton backend's (half: the gradients exist beside it)
        _, stats, _ = contrastive_fwd(z1, r1, columns, ry, 1 / TEMPERATURE, g, budget_bytes=budget)
        contrastive_bwd_dy(z1, r1, columns, ry, stats, 1 / TEMPERATURE, g, budget_bytes=budget // 2)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=checks.batch_size, default=None, help="batch rows (default: 65,536 on CUDA, 160 on CPU)")
    p.add_argument("--D", type=checks.positive_int, default=None, help="width (default: 768 on CUDA, 32 on CPU)")
    p.add_argument("--hard", type=checks.non_negative_int, nargs="+", default=None,
                   help="numbers of hard negatives (default: 0, B / 4 and B)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=checks.positive_int, default=None, help="timed runs a point (default: 5 on CUDA, 1 on CPU)")
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
    print(f"{name}; B = {B:,}, D = {D}, {args.dtype}, budget {budget / 2**20:.0f} MiB, torch {torch.__version__}; "
          f"memory: {memory_meter('triton', device).kind}")
    print("| H | loss, ms | peak extra, MiB | frozen H: ms | frozen H: MiB | launchers, blocks: ms | "
          "launchers, one [B + H, D] tensor: ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    z2 = (z1.detach() + torch.randn(B, D, generator=g).to(device, dtype)).requires_grad_()
    for H in hards:
        hn = torch.randn(H, D, generator=g).to(device, dtype).requires_grad_() if H else None
        trained = loss_step(z1, z2, hn)
        row = [f"{H:,}", f"{1e3 * timed(trained, device, repeats):.2f}", f"{peak_extra_mib(trained, device):.4g}"]
        if hn is None:
            row += ["-", "-"]
        else:
            frozen = loss_step(z1, z2, hn.detach())
            row += [f"{1e3 * timed(frozen, device, repeats):.2f}", f"{peak_extra_mib(frozen, device):.4g}"]
        x, y, h = z1.detach(), z2.detach(), None if hn is None else hn.detach()
        for concatenated in (False, True):
            row.append(f"{1e3 * timed(launcher_step(x, y, h, budget, concatenated), device, repeats):.2f}")
        print("| " + " | ".join(row) + " |", flush=True)
        del hn, h


if __name__ == "__main__":
    main()
