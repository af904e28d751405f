"""``distillcse verify``: every available backend against the reference, printed as a table.

For each case (batch size, K teachers, shuffle mode, dtype) the loss and the gradients of z1, z2
and the hard negatives are compared with the reference backend run in float64 on the unrounded
inputs. The random shuffle is compared through its distribution-free part (singleton groups),
the other modes directly. K = 1 takes the kernels' path for one teacher's raw rows, K = 2 the
weighted unit rows side by side. Each row is held to its dtype's bounds (``BOUNDS``), which the
rounding of the inputs to that dtype sets; ``distillcse verify`` exits with status 1 if one is
outside them.
"""
import os
import time

import torch

from . import distillcse_loss
from .api import _triton_importable


def _available_backends(device):
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    fused = _triton_importable() and (device.type == "cuda" or interpreted)
    return ["torch", "triton"] if fused else ["torch"]


def _batch(B, D, Dt, K, Bh, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A shared direction makes in-batch negatives as similar as real sentence embeddings are.
    z1 = torch.randn(1, D, generator=g, dtype=torch.float64) + torch.randn(B, D, generator=g, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(B, D, generator=g, dtype=torch.float64)
    hard = torch.randn(Bh, D, generator=g, dtype=torch.float64)
    teachers = [torch.randn(1, Dt, generator=g, dtype=torch.float64)
                + 0.8 * torch.randn(B, Dt, generator=g, dtype=torch.float64) for _ in range(K)]
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(z1), cast(z2), [cast(t) for t in teachers], cast(hard)


def _run(backend, z1, z2, teachers, hard, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (z1, z2, hard)]
    start = time.perf_counter()
    loss = distillcse_loss(leaves[0], leaves[1], teachers, hard_negatives=leaves[2], backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves)
    if z1.is_cuda:
        torch.cuda.synchronize()
    return loss.detach().double(), [g.double() for g in grads], time.perf_counter() - start


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


# dtype -> (loss, gradients of z1 and z2, gradient of the hard negatives): relative errors
# against float64, set by the inputs' rounding (magnified by 1 / tau up to 80); float16's hard
# negatives' gradients (1e-8 to 1e-7 here) are subnormal in float16.
BOUNDS = {"float32": (1e-5, 1e-4, 1e-4), "bfloat16": (1e-2, 0.1, 0.1), "float16": (1e-3, 3e-2, 0.5)}


def within_bounds(row):
    """Whether a row's errors are within its dtype's ``BOUNDS``."""
    loss, views, hard = BOUNDS[row["dtype"]]
    z1, z2, hn = row["err_grads"]
    return row["err_loss"] < loss and max(z1, z2) < views and hn < hard


def verify(device=None, sizes=(37, 130), dtypes=None, out=print):
    """Prints a table and a verdict; returns its rows (dicts, ``ok`` whether within ``BOUNDS``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    rows = []
    header = (f"{'backend':8} {'dtype':9} {'B':>5} {'K':>2} {'shuffle':9} {'loss':>12} {'rel.err loss':>12} "
              f"{'grad z1':>9} {'grad z2':>9} {'grad hn':>9} {'ms':>8}  ok")
    out(f"distillcse verify on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}")
    if "triton" not in _available_backends(device):
        out('(backend="triton" left out: it needs a CUDA device, or TRITON_INTERPRET=1 set before '
            "triton is imported to run its kernels on the CPU)" if _triton_importable() else
            '(backend="triton" left out: triton is not installed)')
    out(header)
    out("-" * len(header))
    for B in sizes:
        for K in (1, 2):
            for shuffle in ("none", "expected", "random"):
                kw = dict(shuffle=shuffle, seed=0, group_p=0.1)
                if shuffle == "random":
                    kw["group_size"] = 1
                base = _batch(B, 48, 40, K, 7, torch.float64, torch.device("cpu"))
                ref_loss, ref_grads, _ = _run("reference", *base, **kw)
                for dtype in dtypes:
                    inputs = [x.to(device=device, dtype=dtype) if isinstance(x, torch.Tensor) else
                              [t.to(device=device, dtype=dtype) for t in x] for x in base]
                    for backend in _available_backends(device):
                        loss, grads, seconds = _run(backend, *inputs, **kw)
                        row = dict(backend=backend, dtype=str(dtype).replace("torch.", ""), B=B, K=K, shuffle=shuffle,
                                   loss=loss.item(), err_loss=_rel(loss.cpu(), ref_loss),
                                   err_grads=[_rel(g.cpu(), r) for g, r in zip(grads, ref_grads)], ms=1e3 * seconds)
                        row["ok"] = within_bounds(row)
                        rows.append(row)
                        out(f"{backend:8} {row['dtype']:9} {B:>5} {K:>2} {shuffle:9} {row['loss']:>12.6f} "
                            f"{row['err_loss']:>12.2e} " + " ".join(f"{e:>9.2e}" for e in row["err_grads"])
                            + f" {row['ms']:>8.1f}  {'ok' if row['ok'] else 'FAIL'}")
    failed = [r for r in rows if not r["ok"]]
    bounds = "; ".join(f"{d}: loss {b[0]:g}, z1 z2 {b[1]:g}, hn {b[2]:g}" for d, b in BOUNDS.items())
    out(f"{len(rows) - len(failed)} of {len(rows)} cases within their dtype's bounds ({bounds})"
        + (f"; FAILED: {len(failed)}" if failed else ""))
    return rows
