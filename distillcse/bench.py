"""``distillcse bench memory``: peak extra memory and forward+backward time of every loss
implementation over a doubling sweep of the batch size.

Implementations (``--impl``, default: all present)

============== =====================================================================
name           what
============== =====================================================================
reference      ``backend="reference"`` (the authors' algorithm step by step, B x B)
plain          :func:`plain_distillcse_loss` below: the vectorised loss a user would
               write in plain PyTorch (B x B logits, ``torch.sort`` of the teacher
               row, softmax/cumsum groups, shuffle by ``argsort`` of (group, key))
plain-compile  the same under ``torch.compile(dynamic=True)``
torch          ``backend="torch"`` (row-chunked, chunk x B)
triton         ``backend="triton"`` (fused kernels, row slabs within the chunk budget; CUDA only here)
inf-cl         Inf-CL's ``cal_inf_loss`` when ``inf_cl`` is importable (CUDA only;
               the contrastive term only, whatever ``--what`` says)
============== =====================================================================

Per point (implementation, B), on inputs made before it: a warm-up forward+backward; the peak
extra memory of one more, untimed, forward+backward; the median time of up to ``--repeats``
further ones (CUDA events on CUDA, ``time.perf_counter`` on CPU); and the ratio of that time to
the time of the bare GEMMs a forward and backward of the loss need, of the same shapes on the
same device: ``z1 @ z2.T`` and the two B x B x D gradient products ``G @ z2``, ``G.T @ z1`` for
the contrastive term; ``z1 @ z1.T``, ``T @ T.T`` (``T`` the K teachers side by side) and
``(G + G.T) @ z1`` for the distillation term (:func:`gemm_shapes`). With ``--hard-negatives R``
(supervised SimCSE: R = 1) each row also has R hard negatives, R x B more columns of the
contrastive term in every implementation (Inf-CL's keys: z2, then them), and its three GEMMs
count (1 + R) times. Peak extra memory is the most that the step holds at once of what it allocates: the
inputs do not count, their gradients (cleared before the step) and every temporary do. On CUDA
it is ``max_memory_allocated`` during the step minus ``memory_allocated`` before it ("peak
extra CUDA memory"). On CPU, "tensor allocations (CPU, counted)": the bytes of the storages
that torch ops allocate, counted by :class:`~distillcse.tensor_memory.TensorMemory`, a
dispatch mode that slows ops (hence the separate step). Under a dispatch mode Dynamo runs
compiled code eagerly, so ``plain-compile`` is counted from the CPU allocator's records in
``torch.profiler`` instead (said in its rows' note); on eager code the two counts agree. With
glibc, CPU runs use its steady-state malloc thresholds from the start (:func:`set_mmap_threshold`).

A series stops at the first point that runs out of CUDA memory ("OOM"), whose projected
memory exceeds ``--max-memory-gib`` ("skipped (cap)", on CPU by default) or whose projected
time exceeds ``--time-cap`` seconds ("skipped (time cap)"); the larger batch sizes of the
series are recorded with the reason. Results: ``results.csv`` (one row per implementation and
batch size, every row with device, versions, commit and time stamp) and ``results.md``, rewritten
after every point (Ctrl-C or SIGTERM ends the run with exit status 128 + the signal, keeping them),
and, from :func:`distillcse.plot.plot_results`, ``memory_vs_batch.png`` and ``time_vs_batch.png``
(skipped, with a note, without matplotlib).
"""
import contextlib
import csv
import datetime
import gc
import io
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from . import checks, contrastive_loss, distill_loss, distillcse_loss
from .plot import PLOT_FILES, settings_phrase
from .reference import EPS
from .tensor_memory import TensorMemory

IMPLS = ("reference", "plain", "plain-compile", "torch", "triton", "inf-cl")
LABELS = {
    "reference": 'backend="reference"',
    "plain": "plain PyTorch (sort-based)",
    "plain-compile": "plain PyTorch + torch.compile",
    "torch": 'backend="torch" (row-chunked)',
    "triton": 'backend="triton" (fused)',
    "inf-cl": "Inf-CL (contrastive term only)",
}
WHATS = ("contrastive", "distill", "full")
WHAT_TITLES = {"contrastive": "contrastive term (InfoNCE)", "distill": "distillation term (Group-P)",
               "full": "full loss (contrastive + Group-P distillation)"}
DTYPES = ("float32", "float64", "bfloat16", "float16")
COLUMNS = ("timestamp", "commit", "device", "device_name", "torch", "triton", "python",
           "what", "impl", "label", "B", "D", "Dt", "K", "dtype", "shuffle", "hard_per_row", "status",
           "time_ms", "gemm_ms", "gemms", "ratio_to_gemm", "peak_mem_mib", "memory_kind", "repeats",
           "loss", "note")
OK = "ok"
GEMMS = "fwd+bwd"  # the yardstick's GEMMs (gemm_ms): a forward's and a backward's (before 2026-12-06: forward only)
MIB = 2.0 ** 20
GIB = 2.0 ** 30


def label(impl, what):
    """An implementation's name in tables and plots (the plain loss sorts only for Group-P)."""
    return "plain PyTorch" if impl == "plain" and what == "contrastive" else LABELS.get(impl, impl)


def yardstick_dtype(device_type, dtype):
    """The dtype of the yardstick's GEMMs: the inputs', but float32 for 16-bit inputs on a CPU,
    where every loss computes them in float32 (and float16 CPU GEMMs are many times slower)."""
    return torch.float32 if device_type == "cpu" and dtype in (torch.float16, torch.bfloat16) else dtype


def memory_cap(max_memory_gib, device):
    """``--max-memory-gib`` as GiB or None (no cap): by default 4 on a CPU, none on CUDA (where
    out-of-memory ends a series); 0 is none."""
    cap = max_memory_gib if max_memory_gib is not None else (None if device.type == "cuda" else 4.0)
    return cap if cap is None or cap > 0 else None


# --------------------------------------------------------------------------------------------
# The plain-PyTorch baseline: what a user would write with B x B matrices.
# --------------------------------------------------------------------------------------------

def _unit(x):
    """Unit rows ``x / max(|x|, eps)`` in fp32 (fp64 for fp64 inputs)."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def plain_contrastive_loss(z1, z2, temperature=0.05, hard_negatives=None):
    """InfoNCE of z1 [B, D] against z2 [B, D] (and ``hard_negatives`` [H, D], extra columns):
    cross entropy of the B x (B + H) cosine logits."""
    columns = _unit(z2) if hard_negatives is None else torch.cat([_unit(z2), _unit(hard_negatives)])
    logits = _unit(z1) @ columns.T / temperature
    return F.cross_entropy(logits, torch.arange(z1.shape[0], device=z1.device))


def group_permutation(groups, generator=None):
    """A uniformly random permutation of each row that maps every group onto itself.

    groups [R, N] int64, non-decreasing along each row (ranks of the sorted teacher row) ->
    positions [R, N]: ``argsort`` of (group, iid uniform key), so position r of a group holds a
    random rank of the same group. ``generator`` must live on ``groups``' device.
    """
    if generator is None:
        keys = torch.rand_like(groups, dtype=torch.float64)
    else:
        keys = torch.rand(groups.shape, generator=generator, dtype=torch.float64, device=groups.device)
    return torch.argsort(groups.to(torch.float64) + keys, dim=-1)


def plain_distill_loss(student, teachers, *, student_temperature=0.025, teacher_temperature=0.0125,
                       group_p=0.1, group_size=None, grouping_temperature=1.0, shuffle="random",
                       teacher_weights=None, generator=None):
    """Group-P distillation with B x B matrices, vectorised (no Python loop over rows).

    student [B, D]; teachers a list of K tensors [B, D_k]. Sorts each teacher row, groups the
    ranks by the cumulative softmax mass (or ``group_size``), and shuffles the teacher targets
    within groups by :func:`group_permutation` (``"random"``), replaces them by their group mean
    (``"expected"``) or keeps them (``"none"``).
    """
    B = student.shape[0]
    u = _unit(student)
    K = len(teachers)
    weights = [1.0 / K] * K if teacher_weights is None else [float(w) for w in teacher_weights]
    with torch.no_grad():
        T = torch.cat([w ** 0.5 * _unit(e).to(u.dtype) for w, e in zip(weights, teachers)], dim=1)
        eye = torch.eye(B, dtype=torch.bool, device=u.device)
        t = (T @ T.T).masked_fill_(eye, float("-inf"))
        t_sorted, order = torch.sort(t, dim=-1, descending=True)   # the diagonal sorts last
        t_sorted, order = t_sorted[:, :-1], order[:, :-1]          # [B, B-1]
        if group_size is not None:
            G = -(-(B - 1) // group_size)
            groups = (torch.arange(B - 1, device=u.device) // group_size).expand(B, B - 1)
        else:
            G = math.ceil(1.0 / group_p)
            mass = torch.softmax(t_sorted / grouping_temperature, dim=-1).cumsum(dim=-1)
            groups = torch.floor(mass / group_p).long().clamp_(max=G - 1)
        q = torch.softmax(t_sorted / teacher_temperature, dim=-1)  # targets in rank order
        if shuffle == "random":
            q = torch.gather(q, 1, group_permutation(groups, generator))
        elif shuffle == "expected":
            sums = torch.zeros(B, G, dtype=q.dtype, device=q.device).scatter_add_(1, groups, q)
            counts = torch.zeros(B, G, dtype=q.dtype, device=q.device).scatter_add_(1, groups, torch.ones_like(q))
            q = torch.gather(sums / counts.clamp_min(1), 1, groups)
        elif shuffle != "none":
            raise ValueError(f'shuffle must be "none", "expected" or "random", got {shuffle!r}')
    s = (u @ u.T).masked_fill(eye, float("-inf"))
    log_p = torch.gather(torch.log_softmax(s / student_temperature, dim=-1), 1, order)
    return -(q * log_p).sum(dim=-1).mean()


def plain_distillcse_loss(z1, z2, teachers, *, temperature=0.05, distill_weight=1.0, hard_negatives=None,
                          **distill_kwargs):
    """``plain_contrastive_loss + distill_weight * plain_distill_loss`` (student = z1)."""
    return (plain_contrastive_loss(z1, z2, temperature, hard_negatives)
            + distill_weight * plain_distill_loss(z1, teachers, **distill_kwargs))


# --------------------------------------------------------------------------------------------
# Environment and measurement.
# --------------------------------------------------------------------------------------------

def git_commit():
    """Short commit of the checkout this package runs from, "+dirty" with local changes; outside
    a git checkout of its own (a copied tree, or an install inside another project's checkout)
    ``$DISTILLCSE_COMMIT``, else "unknown"."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fallback = os.environ.get("DISTILLCSE_COMMIT", "unknown")
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not top or os.path.realpath(top) != os.path.realpath(root):
            return fallback
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return fallback
    return (sha + ("+dirty" if dirty else "")) if sha else fallback


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


def environment(device):
    """Metadata written on every result row."""
    return dict(timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=git_commit(), device=device.type, device_name=device_name(device),
                torch=torch.__version__, triton=triton_version(), python=platform.python_version())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
STEADY_MMAP_THRESHOLD = 32 * 2**20              # glibc's dynamic ceiling on 64-bit


def glibc():
    """The C library when it is glibc (``mallopt`` and ``malloc_trim``), else None."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist
        return libc
    except (OSError, AttributeError):
        return None


def set_mmap_threshold(libc, nbytes):
    """glibc serves allocations below ``nbytes`` from its heap and trims the heap beyond 2 x ``nbytes``.

    At :data:`STEADY_MMAP_THRESHOLD`, where glibc's dynamic thresholds end up in a long run, page
    faults on fresh mmaps do not dominate short CPU timings."""
    libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * nbytes)


class CountedMemory:
    """Peak bytes of the tensors that torch ops allocate during a block, counted by
    :class:`~distillcse.tensor_memory.TensorMemory`: what ``max_memory_allocated`` sees on a GPU, up
    to the caching allocator's rounding and the workspaces that ops allocate inside."""
    kind = "tensor allocations (CPU, counted)"
    note = ""

    @contextlib.contextmanager
    def measure(self, result):
        gc.collect()
        with TensorMemory() as counted:
            yield
        result["peak"] = counted.peak


class AllocatorRecords:
    """Peak bytes that the CPU allocator hands out during a block and still holds, from the
    allocation and free records of ``torch.profiler`` (frees of earlier blocks are not recorded):
    for torch.compile'd code, which Dynamo runs eagerly under a dispatch mode such as
    TensorMemory. On eager code it matches :class:`CountedMemory` (``tests/test_bench.py``)."""
    kind = CountedMemory.kind
    note = "memory from the CPU allocator's records (torch.profiler): under TensorMemory compiled code runs eagerly"

    @contextlib.contextmanager
    def measure(self, result):
        from torch.profiler import ProfilerActivity, profile
        # Kineto reads its log level at its first start: above its highest (5, "USDT") it no
        # longer prints "profiler_start" / "profiler_stop" lines into the progress bar.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        gc.collect()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        if not records:
            raise RuntimeError("torch.profiler recorded no CPU allocations for the memory step")
        live = peak = 0
        for record in sorted(records, key=lambda e: e.start_ns()):
            live += record.nbytes()
            peak = max(peak, live)
        result["peak"] = peak


class CudaMemory:
    """Peak CUDA memory allocated during a block over what was allocated before it."""
    kind = "peak extra CUDA memory"
    note = ""

    def __init__(self, device):
        self.device = device

    @contextlib.contextmanager
    def measure(self, result):
        gc.collect()
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        yield
        torch.cuda.synchronize(self.device)
        result["peak"] = torch.cuda.max_memory_allocated(self.device) - base


def memory_meter(impl, device):
    """The meter of an implementation's peak extra memory on ``device`` (module docstring)."""
    if device.type == "cuda":
        return CudaMemory(device)
    return AllocatorRecords() if impl == "plain-compile" else CountedMemory()


def time_once(fn, device):
    """Seconds of one call of ``fn`` (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def is_oom(err):
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(err, (oom, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "DefaultCPUAllocator" in text)


def _describe(err):
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Inputs, losses per implementation, GEMM yardstick, memory projection.
# --------------------------------------------------------------------------------------------

def make_inputs(B, D, Dt, K, dtype, device, seed=0, hard=0):
    """(z1, z2, teachers, hard_negatives): z1, z2 [B, D] (leaves, requires grad), K teachers
    [B, Dt], with a shared direction so that in-batch rows are about as similar as real sentence
    embeddings (cos ~ 0.5); and ``hard`` hard negatives a row, [hard * B, D] (a leaf; None for 0),
    each near its z1 row (cos ~ 0.8, below the positive's ~0.94), as mined ones are."""
    g = torch.Generator(device=device).manual_seed(seed)
    common = torch.randn(1, D, device=device, generator=g)
    z1 = common + torch.randn(B, D, device=device, generator=g)
    z2 = z1 + 0.5 * torch.randn(B, D, device=device, generator=g)
    teachers = [(torch.randn(1, Dt, device=device, generator=g)
                 + 0.8 * torch.randn(B, Dt, device=device, generator=g)).to(dtype) for _ in range(K)]
    hn = None
    if hard:
        hn = (z1.repeat(hard, 1) + torch.randn(hard * B, D, device=device, generator=g)).to(dtype).requires_grad_()
    return z1.to(dtype).requires_grad_(), z2.to(dtype).requires_grad_(), teachers, hn


class Unavailable(Exception):
    """An implementation that cannot run here; the message is the row's status."""


def _inf_cl_loss():
    try:
        from inf_cl import cal_inf_loss
    except ImportError as err:
        raise Unavailable("n/a (inf_cl not installed)") from err
    return cal_inf_loss


def inf_cl_importable():
    try:
        _inf_cl_loss()
    except Unavailable:
        return False
    return True


def _compile(fn):
    if not hasattr(torch, "compile"):
        raise Unavailable(f"skipped (torch.compile unavailable in torch {torch.__version__})")
    return torch.compile(fn, dynamic=True)


def loss_function(impl, what, shuffle, device, compiled_cache=None, dtype=None):
    """A function ``(z1, z2, teachers, hard_negatives=None) -> scalar loss`` for one
    implementation, or Unavailable (also for inputs of a ``dtype`` it does not take). Hard
    negatives [H, D] are extra columns of the contrastive term (``what`` "distill" has none)."""
    if impl in ("reference", "torch", "triton"):
        if impl == "triton":
            if dtype == torch.float64:
                raise Unavailable("n/a (float64: the kernels take float16, bfloat16 or float32)")
            if device.type != "cuda":
                raise Unavailable("n/a (needs CUDA)")
            try:
                import triton  # noqa: F401
            except ImportError as err:
                raise Unavailable("n/a (triton not installed)") from err
        if what == "contrastive":
            return lambda z1, z2, ts, hn=None: contrastive_loss(z1, z2, hard_negatives=hn, backend=impl)
        if what == "distill":
            return lambda z1, z2, ts, hn=None: distill_loss(z1, ts, shuffle=shuffle, backend=impl)
        return lambda z1, z2, ts, hn=None: distillcse_loss(z1, z2, ts, hard_negatives=hn, shuffle=shuffle,
                                                           backend=impl)
    if impl in ("plain", "plain-compile"):
        if what == "contrastive":
            fn = lambda z1, z2, ts, hn=None: plain_contrastive_loss(z1, z2, hard_negatives=hn)  # noqa: E731
        elif what == "distill":
            fn = lambda z1, z2, ts, hn=None: plain_distill_loss(z1, ts, shuffle=shuffle)  # noqa: E731
        else:
            fn = lambda z1, z2, ts, hn=None: plain_distillcse_loss(z1, z2, ts, hard_negatives=hn,  # noqa: E731
                                                                   shuffle=shuffle)
        if impl == "plain":
            return fn
        if compiled_cache is not None:
            if impl not in compiled_cache:
                compiled_cache[impl] = _compile(fn)
            return compiled_cache[impl]
        return _compile(fn)
    if impl == "inf-cl":
        if what == "distill":
            raise Unavailable("n/a (Inf-CL has no distillation term)")
        cal_inf_loss = _inf_cl_loss()
        if device.type != "cuda":
            raise Unavailable("n/a (needs CUDA)")

        def inf_cl(z1, z2, ts, hn=None):
            D = z1.shape[1]
            head_dim = next((h for h in (256, 128, 64, 32, 16) if D % h == 0), None)
            if head_dim is None:
                raise Unavailable(f"n/a (Inf-CL needs D divisible by 16, got {D})")
            scale = torch.tensor(1.0 / 0.05, device=z1.device)
            keys = F.normalize((z2 if hn is None else torch.cat([z2, hn])).float(), dim=-1)  # labels: arange(B)
            return cal_inf_loss(F.normalize(z1.float(), dim=-1), keys, scale=scale, head_dim=head_dim)
        return inf_cl
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def gemm_shapes(what, impl, D, Dt, K, hard=0):
    """The B x B GEMMs a forward and backward of the loss need (Inf-CL: contrastive only), as
    (kind, d): "fwd" ``[B, d] @ [d, B]`` (logits), "bwd" ``[B, B] @ [B, d]`` (a gradient). With
    ``hard`` hard negatives a row the contrastive term has (1 + hard) B columns: its three GEMMs
    (1 + hard) times."""
    shapes = []
    if what in ("contrastive", "full") or impl == "inf-cl":
        shapes += [("fwd", D), ("bwd", D), ("bwd", D)] * (1 + hard)  # z1 z2^T; dz1 = G z2, dz2 = G^T z1
    if what in ("distill", "full") and impl != "inf-cl":
        shapes += [("fwd", D), ("fwd", K * Dt), ("bwd", D)]  # z1 z1^T, T T^T; dz1 = (G + G^T) z1
    return tuple(shapes)


def time_gemms(B, shapes, dtype, device, repeats, max_block_bytes=None):
    """Median seconds of the bare GEMMs ``shapes`` (:func:`gemm_shapes`), summed, in
    :func:`yardstick_dtype`.

    Rows go in blocks whose [rows, B] operand fits ``max_block_bytes`` (reused; default 1 GiB on
    CUDA, 256 MiB on CPU), so huge B still runs: a forward GEMM writes it, a backward one reads it."""
    if max_block_bytes is None:
        max_block_bytes = GIB if device.type == "cuda" else 256 * MIB
    dtype = yardstick_dtype(device.type, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    dims = {d for _, d in shapes}
    mats = {d: torch.randn(B, d, device=device, generator=g).to(dtype) for d in dims}
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = max(1, min(B, int(max_block_bytes // (B * elem))))
    buf = torch.randn(rows, B, device=device, generator=g).to(dtype)  # a backward's left block: finite values
    outs = {d: torch.empty(rows, d, device=device, dtype=dtype) for d in dims}

    def gemms():
        for kind, d in shapes:
            a = mats[d]
            for r0 in range(0, B, rows):
                r1 = min(B, r0 + rows)
                if kind == "fwd":
                    torch.matmul(a[r0:r1], a.T, out=buf[: r1 - r0])
                else:
                    torch.matmul(buf[: r1 - r0], a, out=outs[d][: r1 - r0])

    gemms()
    _sync(device)
    first = time_once(gemms, device)
    n = max(1, min(repeats, int(10.0 / max(first, 1e-9))))  # at most ~10 s per point
    return statistics.median([first] + [time_once(gemms, device) for _ in range(n - 1)])


# Live B x B temporaries at the peak, in units of B*B*4 bytes (fp32 work): RSS growth measured
# on CPU at B = 2048 and 4096 for every shuffle mode, rounded up. Only used to stop a series
# before it passes the memory cap; the torch backend's chunks stop growing at its budget.
_BB_FACTORS = {
    "reference": {"contrastive": 4, "distill": 20, "full": 20},
    "plain": {"contrastive": 4, "distill": 22, "full": 22},
    "plain-compile": {"contrastive": 4, "distill": 22, "full": 22},
    "torch": {"contrastive": 4, "distill": 32, "full": 32},
}


def projected_bytes(impl, what, B, D, Dt, K, dtype, hard=0):
    """Projected peak extra bytes of one forward+backward (for the ``--max-memory-gib`` cap); the
    contrastive term's B x B temporaries grow to B x (1 + hard) B with hard negatives."""
    work = 8 if dtype == torch.float64 else 4
    linear = 8 * B * ((1 + hard) * D + K * Dt) * work
    factors = _BB_FACTORS.get(impl)
    if factors is None:          # O(B): inf-cl; triton's slabs within the chunk budget
        if impl == "triton" and what != "contrastive":
            from .config import chunk_budget_bytes
            return linear + chunk_budget_bytes()
        return linear
    bb = (factors[what] + (hard * factors["contrastive"] if what != "distill" else 0)) * B * B * work
    if impl == "torch":
        from .config import chunk_budget_bytes
        bb = min(bb, 3 * chunk_budget_bytes())
    return bb + linear


# --------------------------------------------------------------------------------------------
# The sweep.
# --------------------------------------------------------------------------------------------

def _gib(nbytes):
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB else f"{nbytes / MIB:.3g} MiB"


def batch_sizes(min_batch, max_batch):
    if min_batch < 2 or max_batch < min_batch:
        raise SystemExit(f"need 2 <= --min-batch <= --max-batch (default 4096 on CPU, 2^20 on CUDA), "
                         f"got {min_batch} and {max_batch}")
    sizes, B = [], min_batch
    while B <= max_batch:
        sizes.append(B)
        B *= 2
    return sizes


def default_impls():
    return [i for i in IMPLS if i != "inf-cl" or inf_cl_importable()]


def _measure_point(fn, inputs, meter, device, repeats, time_cap):
    """A warm-up step, one untimed step under the memory meter, then up to ``repeats`` timed
    steps. Every step starts with the inputs' gradients cleared, so it allocates them."""
    z1, z2, teachers, hn = inputs
    leaves = (z1, z2) if hn is None else (z1, z2, hn)
    loss_box = {}

    def step():
        for x in leaves:
            x.grad = None
        loss = fn(z1, z2, teachers, hn)
        loss.backward()
        loss_box["loss"] = loss

    step()                                 # warm-up (and compilation)
    _sync(device)
    for x in leaves:
        x.grad = None                      # freed before the meter's baseline, not during the step
    mem = {}
    with meter.measure(mem):
        step()
    first = time_once(step, device)
    n = max(1, min(repeats, int(time_cap / max(first, 1e-9))))
    times = [first] + [time_once(step, device) for _ in range(n - 1)]
    loss = float(loss_box["loss"].detach().float())
    for x in leaves:
        x.grad = None
    return statistics.median(times), mem["peak"], n, loss


def sweep(*, what="full", D=128, Dt=128, K=2, dtype=torch.float32, shuffle="random", hard=0, impls=None,
          batches=(64, 128, 256, 512, 1024), repeats=5, device="cpu", max_memory_gib=None,
          time_cap=30.0, progress=True, log=print, on_rows=None):
    """Run the sweep; returns the rows (dicts with the keys of ``COLUMNS``). ``hard``: hard
    negatives a row (columns of the contrastive term; not with ``what`` "distill"). ``on_rows(rows)``
    is called after each point (the files are rewritten: a run stopped midway keeps what it measured)."""
    if hard < 0:
        raise ValueError(f"hard={hard}: expected a number of hard negatives a row >= 0")
    if hard and what == "distill":
        raise ValueError(f"hard={hard}: hard negatives are columns of the contrastive term, which what='distill' "
                         "leaves out; expected what='contrastive' or 'full', or hard=0")
    from tqdm.auto import tqdm

    device = torch.device(device)
    impls = list(impls) if impls else default_impls()
    libc = glibc() if device.type == "cpu" else None
    if libc is not None:
        set_mmap_threshold(libc, STEADY_MMAP_THRESHOLD)
    env = environment(device)
    dtype_name = str(dtype).replace("torch.", "")
    settings = dict(what=what, D=D, Dt=Dt, K=K, dtype=dtype_name, shuffle=shuffle, hard_per_row=hard)
    rows = []
    bar = tqdm(total=len(impls) * len(batches), desc="bench memory", unit="pt", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    if log is print:
        log = bar.write

    def record(impl, B, status, note="", **values):
        row = dict(env, **settings, impl=impl, label=label(impl, what), B=B, status=status,
                   time_ms="", gemm_ms="", gemms=GEMMS, ratio_to_gemm="", peak_mem_mib="",
                   memory_kind=memory_meter(impl, device).kind,
                   repeats="", loss="", note=note)
        row.update(values)
        rows.append(row)
        if on_rows is not None:
            on_rows(rows)
        bar.update(1)
        return row

    try:
        _sweep_points(impls, batches, record, bar, log, what=what, D=D, Dt=Dt, K=K, dtype=dtype,
                      shuffle=shuffle, hard=hard, repeats=repeats, device=device, max_memory_gib=max_memory_gib,
                      time_cap=time_cap)
    finally:
        bar.close()
    return rows


def _sweep_points(impls, batches, record, bar, log, *, what, D, Dt, K, dtype, shuffle, hard, repeats, device,
                  max_memory_gib, time_cap):
    """The loop of :func:`sweep`: each (implementation, B) ends in one ``record``."""
    gemm_cache, compiled = {}, {}
    for impl in impls:
        stop, last = None, None      # stop: (status, note) once the series ends; last: (B, seconds)
        meter = memory_meter(impl, device)
        try:
            fn = loss_function(impl, what, shuffle, device, compiled, dtype)
        except Unavailable as why:
            stop = (str(why), "")
            log(f"{impl}: {why}")
        for B in batches:
            bar.set_postfix_str(f"{impl} B={B}")
            if stop is not None:
                record(impl, B, stop[0], stop[1])
                continue
            projected = projected_bytes(impl, what, B, D, Dt, K, dtype, hard)
            if max_memory_gib is not None and projected > max_memory_gib * GIB:
                stop = ("skipped (cap)", f"projected {_gib(projected)} > cap {max_memory_gib:g} GiB")
                record(impl, B, *stop)
                continue
            if last is not None and 3 * last[1] * (B / last[0]) ** 2 > time_cap:
                stop = ("skipped (time cap)", f"projected {3 * last[1] * (B / last[0]) ** 2:.3g} s "
                        f"> cap {time_cap:g} s per point")
                record(impl, B, *stop)
                continue
            inputs, failed = None, None
            try:
                inputs = make_inputs(B, D, Dt, K, dtype, device, hard=hard)
                seconds, peak, n, loss = _measure_point(fn, inputs, meter, device, repeats, time_cap)
            except Unavailable as why:
                failed = (str(why), "")
            except Exception as err:  # noqa: BLE001 - every failure ends the series, recorded
                if is_oom(err):
                    failed = ("OOM", f"{type(err).__name__} at B={B}")
                elif impl == "plain-compile" and last is None:
                    failed = ("skipped (compile failed)", _describe(err))
                else:
                    failed = ("error", _describe(err))
            finally:
                del inputs
                _release(device)
            if failed is not None:
                record(impl, B, *failed)
                log(f"  {impl:<14} B={B:<8} {failed[0]}: {failed[1]}")
                stop = {"OOM": ("skipped (after OOM)", f"OOM at B={B}"),
                        "error": ("skipped (after error)", f"error at B={B}")}.get(failed[0], failed)
                continue
            dims = gemm_shapes(what, impl, D, Dt, K, hard)
            if (B, dims) not in gemm_cache:
                try:
                    gemm_cache[B, dims] = time_gemms(B, dims, dtype, device, repeats)
                except Exception as err:  # noqa: BLE001
                    if not is_oom(err):
                        raise
                    gemm_cache[B, dims] = None
                finally:
                    _release(device)
            gemm = gemm_cache[B, dims]
            last = (B, seconds)
            partial = "contrastive term only" if impl == "inf-cl" and what != "contrastive" else ""
            record(impl, B, OK, "; ".join(part for part in (partial, meter.note) if part),
                   time_ms=f"{seconds * 1e3:.4g}", peak_mem_mib=f"{peak / MIB:.4g}", repeats=n,
                   loss=f"{loss:.6g}", gemm_ms="" if gemm is None else f"{gemm * 1e3:.4g}",
                   ratio_to_gemm="" if gemm is None else f"{seconds / gemm:.3g}")
            log(f"  {impl:<14} B={B:<8} {seconds * 1e3:>10.3f} ms  {peak / MIB:>10.2f} MiB"
                + ("" if gemm is None else f"  {seconds / gemm:>7.1f} x GEMM"))


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------

def write_text(path, text):
    """Writes ``path`` whole or not at all (a temporary file renamed over it): an interruption
    or a failed write leaves the previous version, and no temporary file."""
    part = path + ".part"
    try:
        with open(part, "w", newline="") as f:
            f.write(text)
        os.replace(part, path)
    except BaseException:
        if os.path.exists(part):
            os.remove(part)
        raise


def write_csv(rows, path, columns=COLUMNS):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    write_text(path, text.getvalue())


def number(value, digits=3):
    """``digits`` significant digits, without an exponent from 1,000 on: 3,490 and 49,900, not
    3.49e+03 (the tables' cells; the CSVs keep ``.4g``)."""
    rounded = float(f"{float(value):.{digits}g}")
    return f"{float(value):.{digits}g}" if abs(rounded) < 1000 else f"{rounded:,.0f}"


def clear_previous_run(out, names, log):
    """A run into a folder that holds an earlier one's results (``names``): they go, so that none
    of them can sit beside the new run's files, nor pass for them if it stops early."""
    stale = [os.path.join(out, name) for name in names if os.path.isfile(os.path.join(out, name))]
    if stale:
        log(f"--out {out}: replacing the previous run's results")
    for path in stale:
        os.remove(path)


def _cell_time(row):
    if row["status"] != OK:
        return row["status"]
    ratio = f" ({number(row['ratio_to_gemm'])}x)" if row.get("ratio_to_gemm") else ""
    return f"{number(row['time_ms'])}{ratio}"


def _cell_mem(row):
    if row["status"] != OK:
        return row["status"]
    return number(row["peak_mem_mib"])


def markdown_table(rows):
    """Two tables (time, memory): one line per batch size, one column per implementation."""
    if not rows:
        return "(no results)\n"
    first = rows[0]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    labels = {r["impl"]: r["label"] for r in rows}
    Bs = sorted({int(r["B"]) for r in rows})
    cell = {(r["impl"], int(r["B"])): r for r in rows}
    lines = [f"# distillcse bench memory: {WHAT_TITLES.get(first['what'], first['what'])}", "",
             f"- device: {first['device_name']} ({first['device']})",
             f"- settings: {settings_phrase(first)}",
             f"- torch {first['torch']}, triton {first['triton']}, python {first['python']}, "
             f"commit {first['commit']}, {first['timestamp']}", ""]
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r["note"] and r["status"] != OK}
                   | {f"{r['impl']}: {r['note']}" for r in rows if r["status"] == OK and r["note"]})
    gemm_dtype = str(yardstick_dtype(first["device"], getattr(torch, first["dtype"], None))).replace("torch.", "")
    tables = ((f"Median forward+backward time, ms (x the bare forward and backward GEMMs of the same shapes, "
               f"{gemm_dtype})", _cell_time),
              (f"Peak extra memory, MiB ({first['memory_kind']})", _cell_mem))
    for title, fmt in tables:
        lines += [f"## {title}", "", "| B | " + " | ".join(labels[i] for i in impls) + " |",
                  "| ---: | " + " | ".join("---" for _ in impls) + " |"]
        for B in Bs:
            lines.append(f"| {B} | " + " | ".join(fmt(cell[i, B]) if (i, B) in cell else "" for i in impls) + " |")
        lines.append("")
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------

def default_out_dir(suffix=""):
    """``benchmarks/results/<time stamp><suffix>`` under the current folder."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("benchmarks", "results", stamp + suffix)


class Stopped(KeyboardInterrupt):
    """SIGTERM (``signum``) during a benchmark, raised where it arrives as Ctrl-C's KeyboardInterrupt is."""

    def __init__(self, signum):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def run_stoppable(work, written, log=print):
    """``work()``; on Ctrl-C or SIGTERM one line saying what ``written()`` (a phrase) holds, then
    exit status 128 + the signal (130 for Ctrl-C), no traceback."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
    except ValueError:                       # not the main thread: leave signals alone
        previous = None
    try:
        return work()
    except KeyboardInterrupt as stopped:
        signum = getattr(stopped, "signum", signal.SIGINT)
        log(f"\n{signal.Signals(signum).name}: stopped; {written()}")
        raise SystemExit(128 + signum) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def add_memory_arguments(p):
    p.add_argument("--what", choices=WHATS, default="full", help="which loss (default: full)")
    p.add_argument("--D", type=checks.positive_int, default=None, help="student width (default: 128 on CPU, 768 on CUDA)")
    p.add_argument("--Dt", type=checks.positive_int, default=None, help="width of each teacher (default: as D)")
    p.add_argument("--K", type=checks.positive_int, default=2, help="number of teacher components (default: 2)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="embedding dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--shuffle", choices=("none", "expected", "random"), default="random",
                   help="Group-P shuffle of the distillation term (default: random, the paper)")
    p.add_argument("--hard-negatives", type=checks.non_negative_int, default=0, metavar="R",
                   help="hard negatives a row: R x B more columns of the contrastive term, as in supervised "
                   "SimCSE (R = 1); --what contrastive or full (default: 0)")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=None, metavar="IMPL",
                   help=f"implementations, some of {', '.join(IMPLS)} (default: all; inf-cl when importable)")
    p.add_argument("--min-batch", type=checks.batch_size, default=64, help="first batch size (default: 64)")
    p.add_argument("--max-batch", type=checks.batch_size, default=None,
                   help="last batch size, doubling from --min-batch (default: 4096 on CPU, 2^20 on CUDA)")
    p.add_argument("--repeats", type=checks.positive_int, default=None, help="timed runs per point (default: 5 on CPU, 10 on CUDA)")
    p.add_argument("--device", type=checks.cli_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-memory-gib", type=checks.non_negative_float, default=None,
                   help="skip points whose projected memory exceeds this many GiB; 0: no cap "
                   "(default: 4 on CPU, none on CUDA, where OOM ends a series)")
    p.add_argument("--time-cap", type=checks.positive_float, default=30.0,
                   help="seconds per point; a series stops when the next point is projected beyond it (default: 30)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<timestamp>)")
    p.add_argument("--no-plot", action="store_true", help="write the CSV and the table only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_memory(args, log=print):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    D = args.D or (768 if cuda else 128)
    Dt = args.Dt or D
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    max_batch = args.max_batch or (2 ** 20 if cuda else 4096)
    repeats = args.repeats or (10 if cuda else 5)
    cap = memory_cap(args.max_memory_gib, device)
    batches = batch_sizes(args.min_batch, max_batch)
    if args.hard_negatives and args.what == "distill":
        raise SystemExit(f"--hard-negatives {args.hard_negatives}: hard negatives are columns of the contrastive "
                         "term, which --what distill leaves out; use --what contrastive or full")
    impls = list(dict.fromkeys(args.impl)) if args.impl else default_impls()   # each once, in order
    out = args.out or default_out_dir()
    checks.check_out_dir(out)
    csv_path, md_path = os.path.join(out, "results.csv"), os.path.join(out, "results.md")
    no_plots = None if args.no_plot else _matplotlib_missing(csv_path)
    settings = dict(what=args.what, D=D, Dt=Dt, K=args.K, dtype=str(dtype).replace("torch.", ""),
                    shuffle=args.shuffle, hard_per_row=args.hard_negatives)
    log(f"distillcse bench memory on {device_name(device)}: {WHAT_TITLES[args.what]}, {settings_phrase(settings)}, "
        f"B={batches[0]}..{batches[-1]}, {repeats} repeats, "
        f"memory cap {'none' if cap is None else f'{cap:g} GiB'}, time cap {args.time_cap:g} s/point")
    log(f"implementations: {', '.join(impls)}")
    if "inf-cl" not in impls and not args.impl:
        log("inf-cl: not run (the inf_cl package is not importable)")
    if no_plots:
        log(no_plots)
    clear_previous_run(out, ("results.csv", "results.md") + PLOT_FILES, log)
    state = dict(rows=[], swept=False)

    def write(rows):                         # after every point
        state["rows"] = rows
        os.makedirs(out, exist_ok=True)
        write_csv(rows, csv_path)
        write_text(md_path, markdown_table(rows))

    def plots():
        if args.no_plot or no_plots:
            return []
        if not any(r["status"] == OK for r in state["rows"]):
            log("plots skipped: no point was measured")
            return []
        from .plot import plot_results
        return plot_results(csv_path, out)

    def run():
        rows = sweep(what=args.what, D=D, Dt=Dt, K=args.K, dtype=dtype, shuffle=args.shuffle,
                     hard=args.hard_negatives, impls=impls,
                     batches=batches, repeats=repeats, device=device, max_memory_gib=cap,
                     time_cap=args.time_cap, progress=not args.no_progress, log=log, on_rows=write)
        state["swept"] = True
        log("")
        log(markdown_table(rows))
        log("wrote " + ", ".join([csv_path, md_path] + plots()))
        if no_plots:
            log(no_plots)
        return rows

    def written():
        if not state["rows"]:
            return "no point was measured, nothing written"
        files = [csv_path, md_path]
        if not state["swept"]:               # interrupted while measuring: the plots of the points so far
            try:
                files += plots()
            except KeyboardInterrupt:        # a second Ctrl-C: no plots
                pass
        return f"{len(state['rows'])} of {len(impls) * len(batches)} points written: " + ", ".join(files)

    return run_stoppable(run, written, log), out


def _matplotlib_missing(csv_path):
    """None when the plots can be drawn, else a line saying why not and how to draw them later."""
    from .plot import check_matplotlib
    try:
        check_matplotlib()
    except ImportError as err:
        return (f"plots skipped: {err}; results.csv and results.md are written (the plots, once it is "
                f"installed: distillcse bench plot {csv_path})")
    return None
