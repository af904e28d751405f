"""One rank's share of the loss against the whole loss (``rows=``, what ``distillcse.sharded_loss``
computes on each of W ranks): forward + backward time of ``distillcse_loss`` on one backend
(``--backend``, torch by default), the median of a few runs after a warm-up, the whole batch and
each of W equal shares. On a GPU CUDA events time it; with the torch backend the triton
backend's whole loss is timed beside it for comparison.

    python benchmarks/shard_time.py                         # B = 4,096, D = 256, W = 4, random and expected
    python benchmarks/shard_time.py --B 65536 --D 768 --world 8 --dtype bfloat16
    python benchmarks/shard_time.py --B 65536 --D 768 --world 8 --dtype bfloat16 --backend triton
"""
import argparse
import statistics
import time

import torch

import distillcse


def timed(fn, repeats):
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--shuffles", nargs="+", default=["random", "expected"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="torch", choices=("torch", "triton"))
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(args.B, args.D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    teacher = torch.randn(args.B, 384, generator=g).to(device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, {torch.get_num_threads()} threads; B = {args.B:,}, D = {args.D}, {args.dtype}, W = {args.world}, "
          f"backend {args.backend}, torch {torch.__version__}")
    beside = device == "cuda" and args.backend == "torch"  # the triton backend's whole loss
    print("| shuffle | whole loss, s | shares, s (min-max) | share / whole |" + (" triton whole, s |" if beside else ""))
    print("| --- | ---: | ---: | ---: |" + (" ---: |" if beside else ""))
    for shuffle in args.shuffles:
        def step(rows, backend=args.backend):
            loss = distillcse.distillcse_loss(z1, z2, teacher, shuffle=shuffle, seed=1, backend=backend, rows=rows)
            loss.backward()
        whole = timed(lambda: step(None), args.repeats)
        cuts = [r * args.B // args.world for r in range(args.world + 1)]
        shares = [timed(lambda a=a, b=b: step((a, b)), args.repeats) for a, b in zip(cuts[:-1], cuts[1:])]
        row = (f"| {shuffle} | {whole:.3f} | {min(shares):.3f}-{max(shares):.3f} | "
               f"{statistics.mean(shares) / whole:.3f} (1 / W = {1 / args.world:.3f}) |")
        if beside:
            row += f" {timed(lambda: step(None, 'triton'), args.repeats):.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
