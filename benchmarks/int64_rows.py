"""The last rows of a batch whose [B, D] tensors pass 2^31 elements (default B = 2^22 + 37,
D = 768: the last rows start near 3.2e9): the triton backend's loss of those rows (``rows=``, a
shard) and its gradients of z1 and z2 (every row: the shard's columns) against the torch
backend's, per shuffle. Every row and column offset into z1, z2, the teacher rows and the
[B, D] buffers the kernels write (dz, the random shuffle's accumulator) must be int64 here.
``tests/test_int64_offsets.py`` reaches the inputs' offsets on the CPU through row-strided
views, but not the contiguous buffers the kernels allocate: this is their check. GPU memory,
estimated (not yet run): the bf16 inputs and both backends' gradients, 7 x 6.4 GB, plus each
backend's own tables.

    python benchmarks/int64_rows.py                                   # B = 4,194,341, D = 768, bf16
    python benchmarks/int64_rows.py --dtype float32 --D 256           # the accumulator's WIDE grid (fp32
                                                                      # rows: 65,537 row blocks of 64)
    TRITON_INTERPRET=1 python benchmarks/int64_rows.py --B 70 --D 16 --dtype float32   # the logic, on a CPU

Prints a markdown table: per shuffle, the loss's relative error and the gradients' (of the rows
whose offsets are below 2^31 elements and of those past it), and exits 1 if any is over the
dtype's bound (the triton backend's test tolerances against float64, twice: both sides round).
"""
import argparse
import sys

import torch

import distillcse

BOUND = {"float32": 4e-5, "bfloat16": 1e-1, "float16": 4e-2}


def rel(a, b, chunk=1 << 24):
    """|a - b| / |b| over all entries, summed in float64 a chunk of entries at a time (a float64
    copy of a whole [B, D] gradient would be 26 GB at the default size)."""
    a, b = a.reshape(-1), b.reshape(-1)
    diff = norm = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        diff += float((x - y).square().sum())
        norm += float(y.square().sum())
    return (diff / max(norm, 1e-60)) ** 0.5


def loss_and_grads(backend, z1, z2, teacher, **kw):
    leaves = [z1.detach().requires_grad_(), z2.detach().requires_grad_()]
    loss = distillcse.distillcse_loss(*leaves, [teacher], backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=2**22 + 37)
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--rows", type=int, default=64, help="the shard: the last ROWS rows")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(BOUND))
    p.add_argument("--shuffles", nargs="+", default=["none", "expected", "random"],
                   choices=("none", "expected", "random"))
    args = p.parse_args(argv)
    if not 2 <= args.rows <= args.B or args.D < 1:
        p.error(f"expected 2 <= --rows <= --B and --D >= 1, got --rows {args.rows}, --B {args.B}, --D {args.D}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    B, D = args.B, args.D
    g = torch.Generator(device=device).manual_seed(0)
    noise = lambda: torch.randn(B, D, device=device, dtype=dtype, generator=g)  # noqa: E731  [B, D] in dtype
    shared = torch.randn(1, D, device=device, dtype=dtype, generator=g)
    z1 = shared + noise()
    z2 = z1 + noise()
    teacher = shared + 0.8 * noise()
    past = min(B, -(-2**31 // D))   # the first row whose offset is past 2^31 elements (B: none)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}; B = {B:,}, D = {D}, {args.dtype}, rows ({B - args.rows:,}, {B:,}); "
          f"rows from {past:,} start past 2^31 elements; torch {torch.__version__}")
    print("| shuffle | loss rel. err. | dz1 rows below / past 2^31 | dz2 rows below / past 2^31 |")
    print("| --- | ---: | ---: | ---: |")
    worst = 0.0
    for shuffle in args.shuffles:
        kw = dict(rows=(B - args.rows, B), shuffle=shuffle, seed=5)
        loss, grads = loss_and_grads("triton", z1, z2, teacher, **kw)
        ref_loss, ref_grads = loss_and_grads("torch", z1, z2, teacher, **kw)
        errors = [rel(loss, ref_loss)]
        cells = [shuffle, f"{errors[0]:.1e}"]
        for got, ref in zip(grads, ref_grads):   # rows below 2^31 elements, then past it ("-": none)
            parts = [rel(got[:past], ref[:past])] + ([rel(got[past:], ref[past:])] if past < B else [])
            errors += parts
            cells.append(" / ".join(f"{e:.1e}" for e in parts) + (" / -" if past == B else ""))
        del grads, ref_grads
        worst = max(worst, *errors)
        print("| " + " | ".join(cells) + " |", flush=True)
    ok = worst <= BOUND[args.dtype]
    print(f"worst {worst:.1e} against {BOUND[args.dtype]:.0e}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
