"""Offline compile report for an H100 (sm_90a): no GPU needed, nothing runs.

    python benchmarks/compile_sm90.py                                  # contrastive kernels, D = 768
    python benchmarks/compile_sm90.py --what contrastive distill --D 384 768 --dtypes bf16 tf32
    python benchmarks/compile_sm90.py --what distill --dtypes bf16+fp32/tf32 bf16+fp32/ieee
    python benchmarks/compile_sm90.py --sweep --what contrastive distill small_batch --B 37 130 --D 5 48 300

The launchers are called as in training, on CPU tensors of the real shapes (``torch.empty``,
never touched). Each ``kernel[grid](...)`` they issue is intercepted instead of launched: its
arguments are bound and specialised exactly as Triton's launcher does (pointer dtypes, integers
divisible by 16 or equal to 1, constexprs, ``num_warps`` / ``num_stages``), and the kernel is
compiled for ``GPUTarget("cuda", 90, 32)`` with ptxas's log captured. Row counts are runtime
arguments, so the code compiled for one B serves every B with the same divisibility by 16 (and
the same side of ``utils.PAD_MIN_COLS``, above which slab rows are padded to a multiple of 16).

Per kernel, one table row per input precision and launch (bf16, fp16, fp32 with TF32 dots,
fp32 with full-precision "ieee" dots, the switch PyTorch's ``float32_matmul_precision`` makes;
on request a bf16 student with an fp32 teacher, whose dots are TF32 or "ieee"):
  constexprs  block sizes and flags of the launch (the dot precisions are in "inputs")
  regs        registers per thread (ptxas); an SM has 64K, so 8 warps at > 128 fit one program
  spills      bytes of spill stores / loads (ptxas); anything but 0/0 is slow
  smem        shared memory per program; an H100 block can have at most 227 KiB
  MMA         tensor-core instructions in the PTX: wgmma shape and operand sources (SS: both
              from shared memory, RS: A from registers); mma.sync when there is no wgmma
              (blocks under 64 rows), FMA when there are no tensor-core instructions at all
  loops       SASS instructions per thread in each loop body, innermost first (nvdisasm of the
              cubin; a body counts its inner loops once): with the tile's entries per thread, the
              ALU work an entry costs, for kernels bound by it (the Group-P probe kernel)
  flags       SPILLS, SMEM > 227 KiB, REFILL RACE (``refill_races``: a pipelined loop's async copy
              into the shared slot an async wgmma may still be reading), and ptxas warnings
              (wgmma serialisation, say) verbatim

Extend: add a function to TARGETS that calls a kernel file's launchers on tensors of shape
(B, D). Kernels wrapped in ``triton.autotune`` cannot be compiled this way (the autotuner
times its configs); launchers whose host logic loops on kernel results must be left out.
Uses Triton 3.6 internals (``jit.create_function_from_signature``, ``JITFunction._pack_args``,
the ``dump_ptxas_log`` knob), which later versions may move.
"""
import argparse
import contextlib
import io
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SMEM_PER_BLOCK = 227 * 1024
# name: (input dtype, teacher rows' dtype, torch.set_float32_matmul_precision value)
PRECISIONS = {
    "bf16": (torch.bfloat16, torch.bfloat16, "highest"),
    "fp16": (torch.float16, torch.float16, "highest"),
    "tf32": (torch.float32, torch.float32, "high"),
    "ieee": (torch.float32, torch.float32, "highest"),
    "bf16+fp32/tf32": (torch.bfloat16, torch.float32, "high"),  # one fp32 teacher, read raw
    "bf16+fp32/ieee": (torch.bfloat16, torch.float32, "highest"),
    "bf16+fp16": (torch.bfloat16, torch.float16, "highest"),  # K bf16 teachers' unit rows go in fp16
}
SAME_DTYPES = ["bf16", "fp16", "tf32", "ieee"]


def contrastive(B, D, dtype, teacher_dtype):
    """InfoNCE (kernels/contrastive.py): the row factor kernel (the loss alone, and with the
    factors; in one pass and in two) and the column factor kernel for a slab of 512 rows / columns, N = B, and the
    gradient through the norms adding into another term's (``unit_rows_backward`` with
    ``add_scale``); the slabs' GEMMs are cuBLAS's, so the kernels are called directly."""
    from distillcse.kernels import contrastive as C
    from distillcse.kernels.distill import unit_rows_backward
    from distillcse.kernels.utils import slab_buffer

    rows, blocks = 512, C._blocks()
    dots, fac = slab_buffer(rows, B, "cpu"), slab_buffer(rows, B, "cpu", dtype)  # row stride aligned(B)
    ld = dots.stride(0)
    r, stats, x = torch.empty(B), torch.empty(2, B), torch.empty(B, D, dtype=dtype)
    raw = dtype != torch.float16  # fp16: factors without the norms, against unit rows
    for grad in (False, True):
        for one in {C.one_pass(dtype, 20.0), False}:  # the one-pass kernel (not fp16), and two passes
            C._row_factors_kernel[(triton.cdiv(rows, blocks["rows"]["BR"]),)](
                dots, r, r, r, stats, r, fac, 0, rows, B, B, ld, 20.0, GRAD=grad, RAW=raw, ONE_PASS=one,
                **blocks["rows"])
    cols = blocks["cols"]
    for diag0 in (0, 37):  # the whole batch's, a shard's from row 37
        C._column_factors_kernel[(rows // cols["BC"] * triton.cdiv(B, cols["BB"]),)](
            dots, r, r, stats, r, r, fac, 0, rows, B, ld, 20.0, diag0, RAW=raw, **cols)
    unit_rows_backward(torch.empty(rows, D), x, r, x, row_scale=r, add_scale=0.5)


def distill(B, D, dtype, teacher_dtype, n_thr=9):
    """Distillation (kernels/distill.py): the row statistics pass (with and without the
    student's logsumexps, with the search's grid pass and without: whole teacher rows or
    halves), and for a slab of 512 rows
    in 8 column chunks (reading the slab's cuBLAS dots) the slab kernel with each shuffle plus
    the random mode's count (with the slab rows' lse_s), table and compaction kernels (G = 10 groups; those
    that classify, with and without tie cuts), the random mode's accumulation of that
    slab's gradient into dx (and lo), the gradient through the norms (`unit_rows_backward`); and in kernels/group_partition.py the
    threshold search over 4096 rows (the first pass's grid of 32 points, measure only and
    collecting, and a later pass's 16 points with windows: the placing, probe, narrowing and
    settling kernels, the group means of its finished rows; by mass and fixed size), its grid
    pass on the row statistics' slabs, the pairwise thresholds and their tie cuts (by mass and
    fixed size) and the group means pass (with and without tie cuts).
    The slab launcher builds its tables from kernel results and the search loops on them, so
    those kernels are called directly."""
    from distillcse.kernels import distill as K
    from distillcse.kernels import group_partition as GP
    from distillcse.kernels.utils import slab_buffer

    rows, chunks = 512, 8
    x, t = torch.empty(B, D, dtype=dtype), torch.empty(B, D, dtype=teacher_dtype)
    r, thr, qbar = torch.empty(B), torch.empty(B, n_thr), torch.empty(B, n_thr + 1)
    grid = GP.grid_pass(t, r, 1.0, group_p=1 / (n_thr + 0.5), budget_bytes=rows * B * 8, method="search")
    K.distill_row_stats(x, r, t, r, 40.0, 80.0, 1.0, budget_bytes=rows * B * 8, grid=grid)  # with the search's grid
    K.distill_row_stats(None, None, t, r, 40.0, 80.0, 1.0, budget_bytes=rows * B * 8, grid=grid)  # random: no student
    for student in ((x, r), (None, None)):  # shuffle none, or pairwise thresholds: t's halves too
        K.distill_row_stats(*student, t, r, 40.0, 80.0, 1.0, budget_bytes=rows * B * 8)
    K.distill_row_stats(x, r, t, r, 40.0, 80.0, 1.0, budget_bytes=rows * B * 8, rows=(B // 2, B))  # a shard: whole rows
    width = triton.cdiv(triton.cdiv(B, chunks), 128) * 128  # a multiple of the column tiles, as the launcher's
    chunks = triton.cdiv(B, width)
    first = torch.empty(rows, chunks, n_thr + 1, dtype=torch.int32)
    perm = torch.empty(6, rows, n_thr + 1, dtype=torch.int32)
    grad = slab_buffer(rows, B, "cpu", torch.float32 if dtype == torch.float32 else torch.bfloat16)
    compact, nll = slab_buffer(rows, B, "cpu", grad.dtype), torch.empty(rows, chunks)
    dots = slab_buffer(rows, B, "cpu")  # a slab's cuBLAS dots, student's or teacher's (row stride aligned(B))
    ld = dots.stride(0)
    teacher_grid = (rows // K._slab_blocks(B, "random")[0]["BM"], chunks)
    BG = max(2, triton.next_power_of_2(n_thr + 1))  # groups, as the slab launcher
    states = torch.empty(2, rows, chunks)  # the slab rows' lse_s, by chunk (the random shuffle's)
    cut = torch.empty(B, n_thr, dtype=torch.int32)  # tie cuts (the pairwise thresholds': TIES)
    for ties in (False, True):
        teacher_blocks = K._slab_blocks(B, "random", ties)[0]
        K._group_counts_kernel[teacher_grid](dots, r, thr, thr, cut, first, dots, r, states, 0, B, ld, n_thr, n_thr,
                                             width, chunks, rows, 40.0, BG=BG, LSE=True, TIES=ties, **teacher_blocks)
        K._compact_targets_kernel[teacher_grid](dots, r, thr, thr, cut, r, first, compact, 0, B, ld, n_thr, n_thr,
                                                width, chunks, rows, 80.0, BG=BG, TIES=ties, **teacher_blocks)
    K._permutation_tables(first, 0, 2**64 - 1, (states, r))
    K._permutation_tables(first, 0, torch.empty(1, dtype=torch.int64), (states, r))  # the key drawn on the GPU
    for targets, shuffle in enumerate(K.SHUFFLES):
        for ties in (False, True) if targets else (False,):
            for both_sides in (True, False) if targets < 2 else (False,):  # False: a shard's rows
                slab_blocks = K._slab_blocks(B, shuffle, ties)[1]
                K._distill_slab_kernel[(rows // slab_blocks["BM"], chunks)](
                    dots, r, dots, r, thr, thr, cut, r, r, qbar, first, compact, perm, nll, grad, 0, B, ld, n_thr,
                    n_thr, width, chunks, rows, 40.0, 80.0, BG=BG, TARGETS=targets, WRITE_GRAD=True, TIES=ties,
                    BOTH_SIDES=both_sides, **slab_blocks)
    lo = None if dtype == torch.float32 else torch.empty(B, D, dtype=torch.int8)
    hi = torch.empty(B, D, dtype=dtype)
    K.accumulate_slab(hi, lo, grad, x, r, torch.empty(rows, D), 0)
    if dtype == torch.float16:  # fp16 rows of small norm: each row's sum times 1 / c_i (triton_backend._lift)
        K.accumulate_slab(hi, lo, grad, x, r, torch.empty(rows, D), 0, torch.empty(B))
    K.unit_rows_backward(torch.empty(rows, D), x, r, x)  # a slab's dx rows (strided slices of dx on a GPU)
    K.unit_rows_backward(hi, x, r, hi, lo=lo, scaled=True)  # the random shuffle's accumulator, in place
    search_rows = torch.arange(min(B, 4096))
    for fixed in (False, True):  # a grid pass and a later pass of the search over (at most) 4096 rows, with means
        probes = GP._KernelProbes(t, r, r, 1.0, n_thr, fixed, means=(r, 80.0))
        state = {k: torch.empty(B, n_thr, dtype=torch.int32 if fixed and k.startswith("meas") else torch.float32)
                 for k in GP.STATE}
        rule = dict(G1=n_thr, group_size=100 if fixed else 0, group_p=1 / (n_thr + 0.5), scale=1.0, FIXED=fixed)
        for i_pass, collect in ((0, False), (0, True), (1, True)):  # the grid pass measures only, unless it collects
            GP._search_chunk(state, search_rows, i_pass, collect, probes, rule, 16, r)
            probes.after_chunk(search_rows, state, r, r)
    for group_size in (None, triton.cdiv(B, 40)):  # the pairwise thresholds (G - 1 = n_thr; fixed size: 40 groups)
        grouping = dict(group_p=1 / (n_thr + 0.5), group_size=group_size)
        for rows in (None, (B // 2, B)):  # the whole batch, a shard (SHARD)
            GP.group_thresholds(t, r, r, r, r, 1.0, **grouping, method="pairwise", rows=rows)
            GP.tie_cuts(t, r, r, r, r, torch.empty(B, GP.num_groups(B, **grouping) - 1), 1.0, **grouping, rows=rows)
    GP.group_means(t, r, r, thr, 80.0)
    GP.group_means(t, r, r, thr, 80.0, ties=(thr, cut))


def few_groups(B, D, dtype, teacher_dtype):
    """The distillation kernels as ``distill``, with G - 1 = 1 and 3 boundaries (group_p = 0.5,
    0.3): their group and boundary axes are the narrowest (Triton 3.6 failed to compile the
    search's placing kernel with a boundary axis of 4 or fewer, seen on an H200)."""
    for n_thr in (1, 3):
        distill(B, D, dtype, teacher_dtype, n_thr)


def small_batch(B, D, dtype, teacher_dtype):
    """The one-program loss (kernels/small_batch.py) at B = min(B, 64) with as many columns as
    it takes (N = MAX_COLUMNS, the largest tile), teacher width D: every shuffle, loss only and
    loss with gradients, plus fixed-size groups with gradients and the random shuffle's key read
    from the device."""
    from distillcse.kernels.small_batch import MAX_COLUMNS, MAX_ROWS, small_batch_loss

    B = min(B, MAX_ROWS)
    x, y, t = (torch.empty(B, D, dtype=dtype), torch.empty(MAX_COLUMNS, D, dtype=dtype),
               torch.empty(B, D, dtype=teacher_dtype))
    for shuffle in ("none", "expected", "random"):
        for need_grad in (False, True):
            small_batch_loss(x, y, t, n_groups=10, shuffle=shuffle, step_seed=3, need_grad=need_grad)
    small_batch_loss(x, y, t, n_groups=10, shuffle="random", group_size=6, step_seed=3, need_grad=True)
    key = torch.empty(1, dtype=torch.int64)  # the key drawn on the GPU inside a CUDA graph's capture
    small_batch_loss(x, y, t, n_groups=10, shuffle="random", step_seed=key, need_grad=True)


TARGETS = {"contrastive": contrastive, "distill": distill, "few_groups": few_groups, "small_batch": small_batch}


def _compile_for_h100(kernel, args, kwargs, seen):
    """Compiles what ``kernel[grid](*args, **kwargs)`` would launch; returns one report row, or
    None when ``seen`` (a set, updated) already holds the same specialisation (a launcher's loop
    over slabs launches one compiled kernel many times)."""
    backend = make_backend(H100)
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
    if key in seen:
        return None
    seen.add(key)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # ptxas -v output, printed by triton when dump_ptxas_log is set
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=H100,
                                  options=options.__dict__)
    log = log.getvalue()
    ptx = compiled.asm["ptx"]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    mma = sorted({f"{shape} {'RS' if a_operand.startswith('{') else 'SS'}" for shape, a_operand in
                  re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.\S+ \{[^}]*\}, (\S+)", ptx)})
    if not mma and "mma.sync" in ptx:
        mma = ["mma.sync (no wgmma)"]
    names = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    shown = {name: value for name, value in names.items() if not name.startswith("PREC")}  # in "inputs"
    return dict(
        kernel=kernel.__name__,
        constexprs=" ".join(f"{k}={v}" for k, v in shown.items()),
        warps=compiled.metadata.num_warps,
        stages=compiled.metadata.num_stages,
        regs=int(re.search(r"Used (\d+) registers", log).group(1)),
        spills=f"{spills.group(1)}/{spills.group(2)}",
        smem=compiled.metadata.shared,
        mma=", ".join(mma) or "FMA",
        loops=_sass_loops(compiled.asm["cubin"]),
        races=refill_races(compiled.asm["ttgir"]),
        warnings=" ".join(line.strip() for line in log.splitlines() if "warning" in line.lower()),
    )


def _untouched_matmul_f32(a, b, out=None, k_step=64):
    """``matmul_f32``'s result shape, not computed: the launchers' cuBLAS GEMMs are not built here."""
    return out if out is not None else torch.empty(a.shape[0], b.shape[1])


@contextlib.contextmanager
def compiled_launches(rows):
    """Within the block, ``kernel[grid](...)`` compiles for sm_90a and appends a row to ``rows``,
    and the launchers' cuBLAS GEMMs (``matmul_f32``) return untouched outputs."""
    from distillcse.kernels import contrastive, distill, group_partition

    launch = jit.JITFunction.run
    matmuls = [(m, m.matmul_f32) for m in (contrastive, distill, group_partition)]

    seen = set()

    def compile_instead(self, *args, grid, warmup, **kwargs):
        row = _compile_for_h100(self, args, kwargs, seen)
        if row is not None:
            rows.append(row)

    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    jit.JITFunction.run = compile_instead
    for module, _ in matmuls:
        module.matmul_f32 = _untouched_matmul_f32
    try:
        yield
    finally:
        jit.JITFunction.run = launch
        for module, matmul in matmuls:
            module.matmul_f32 = matmul
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved


def compile_rows(target, B, D, precision):
    """Report rows of every launch of ``target`` at (B, D) in ``precision`` (a PRECISIONS key)."""
    dtype, teacher_dtype, matmul_precision = PRECISIONS[precision]
    rows = []
    torch.set_float32_matmul_precision(matmul_precision)
    with compiled_launches(rows):
        TARGETS[target](B, D, dtype, teacher_dtype)
    return [dict(row, inputs=precision) for row in rows]


def _sass_loops(cubin):
    """Sizes of the SASS loop bodies (a backward branch to a label: the instructions from the
    label to the branch), smallest first, as "a / b / ...", from Triton's own nvdisasm."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    label_at, sizes, n = {}, [], 0  # label -> index of the next instruction
    for line in sass.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        if label:
            label_at[label.group(1)] = n
        elif re.search(r"/\*[0-9a-f]{4,}\*/", line):  # an instruction (its address comment)
            target = re.search(r"BRA\s+`?\(?\.(L_x_\d+)", line)
            if target and label_at.get(target.group(1), n + 1) <= n:
                sizes.append(n + 1 - label_at[target.group(1)])
            n += 1
    return " / ".join(map(str, sorted(s for s in sizes if s > 1))) or "-"


_SSA = r"%[\w#]+"


def refill_races(ttgir):
    """Pipelined loops of a compiled kernel (its TTGIR) whose async copy refills a shared slot
    that an asynchronous wgmma (``warp_group_dot {isAsync}``) may still be reading.

    Triton's software pipeliner gives a loaded tile a buffer of S slots, fills d of them before
    the loop (d = num_stages - 1) and in iteration i reads slot i mod S and refills slot
    (i + d) mod S, after a ``warp_group_dot_wait {pendings = P}`` that leaves the last P wgmmas
    in flight. A wgmma of iteration i - k still reading the slot being refilled, i.e.
    (d + k) mod S == 0, is a race: Triton 3.6 built the one-program kernel's logit loops with
    S = d = 2 and P = both of the iteration's wgmmas (benchmarks/session_log.md, Session 20).
    Returns one description per race found, [] for none. Loops are read at their own nesting
    level (an inner loop's ops are not the outer loop's events)."""
    lines = ttgir.splitlines()
    slots, alias = {}, {}  # alloc -> slots; memdesc value -> the alloc it views
    for line in lines:
        m = re.match(rf"\s*({_SSA}) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x", line)
        if m:
            slots[m.group(1)] = int(m.group(2))
        m = re.match(rf"\s*({_SSA}) = ttg\.memdesc_\w+ ({_SSA})", line)
        if m:
            alias[m.group(1)] = alias.get(m.group(2), m.group(2))

    def copy_target(line):
        m = re.search(rf"ttg\.async_copy_global_to_local {_SSA}, ({_SSA})", line)
        return alias.get(m.group(1)) if m else None

    races = []
    for start, line in enumerate(lines):
        if " = scf.for " not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[start + 1:]:
            level = len(inner) - len(inner.lstrip())
            if level <= indent:
                break
            if level == indent + 2:
                body.append(inner)
        prologue = {}  # alloc -> copies into it before the loop, at the loop's level: the distance d
        for before in lines[:start]:
            if len(before) - len(before.lstrip()) == indent and copy_target(before) in slots:
                prologue[copy_target(before)] = prologue.get(copy_target(before), 0) + 1
        pending = []  # (iteration, allocs the wgmma reads), oldest first
        for iteration in range(3):  # the pending set is periodic after the first iteration
            for op in body:
                if "ttng.warp_group_dot " in op and "isAsync = true" in op:
                    operands = re.search(r"warp_group_dot (.*?) \{", op).group(1)
                    pending.append((iteration, {alias.get(v) for v in re.findall(_SSA, operands)} & set(slots)))
                elif "ttng.warp_group_dot_wait" in op:
                    keep = int(re.search(r"pendings = (\d+)", op).group(1))
                    pending = pending[len(pending) - keep:] if keep else []
                elif copy_target(op) in prologue:
                    alloc = copy_target(op)
                    for issued, reads in pending:
                        if alloc in reads and (prologue[alloc] + iteration - issued) % slots[alloc] == 0:
                            races.append(f"loop at TTGIR line {start + 1}: {alloc} ({slots[alloc]} slots, "
                                         f"{prologue[alloc]} ahead) refilled under a wgmma {iteration - issued} "
                                         f"iteration(s) old")
                            break
    return sorted(set(races))


def _flags(row):
    flags = [f for f, bad in (("SPILLS", row["spills"] != "0/0"), ("SMEM > 227 KiB", row["smem"] > H100_SMEM_PER_BLOCK))
             if bad] + [f"REFILL RACE: {race}" for race in row["races"]]
    return flags + ([row["warnings"]] if row["warnings"] else [])


def report(target, B, D, precisions):
    """Markdown tables, one per kernel, one row per precision."""
    by_kernel = {}
    for name in precisions:
        for row in compile_rows(target, B, D, name):
            by_kernel.setdefault(row["kernel"], []).append(row)
    lines = []
    for kernel, rows in by_kernel.items():
        lines += [f"### {kernel} (D = {D})", "",
                  "| inputs | constexprs | warps | stages | regs | spills st/ld B | smem KiB | MMA | loops | flags |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(f"| {r['inputs']} | {r['constexprs']} | {r['warps']} | {r['stages']} | {r['regs']} | "
                         f"{r['spills']} | {r['smem'] / 1024:.0f} | {r['mma']} | {r['loops']} | "
                         f"{'; '.join(_flags(r)) or 'ok'} |")
        lines.append("")
    return "\n".join(lines)


def sweep(targets, batches, widths, precisions):
    """Every (target, B, D, precision) compiled; one markdown row per kernel and D alignment:
    compiles, failures, the worst spill and shared memory, with where each occurred, and every
    refill race (``refill_races``). Rows whose stride is not a multiple of 16 elements load
    element by element (``D % 16``), so the two are apart."""
    worst, failures, races = {}, [], []
    for target in targets:
        for B in batches:
            for D in widths:
                for precision in precisions:
                    where = f"{target} B={B} D={D} {precision}"
                    try:
                        rows = compile_rows(target, B, D, precision)
                    except Exception as e:  # a compile error is what this looks for
                        failures.append(f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                        continue
                    for r in rows:
                        w = worst.setdefault((r["kernel"], D % 16 == 0), dict(n=0, spill=(-1, ""), smem=(-1, "")))
                        w["n"] += 1
                        spill = max(map(int, r["spills"].split("/")))
                        w["spill"] = max(w["spill"], (spill, f"{where} {r['constexprs']}"))
                        w["smem"] = max(w["smem"], (r["smem"], f"{where} {r['constexprs']}"))
                        races += [f"{where} {r['kernel']} {r['constexprs']}: {race}" for race in r["races"]]
    lines = [f"failures: {len(failures)}"] + [f"- {f}" for f in failures] + [
        f"refill races: {len(races)}"] + [f"- {race}" for race in races] + [
        "", "| kernel | D % 16 == 0 | compiles | worst spill B | at | most smem KiB | at |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, aligned), w in sorted(worst.items()):
        lines.append(f"| {kernel} | {aligned} | {w['n']} | {w['spill'][0]} | {w['spill'][1] if w['spill'][0] else ''} | "
                     f"{w['smem'][0] / 1024:.0f}{' (> 227)' if w['smem'][0] > H100_SMEM_PER_BLOCK else ''} | {w['smem'][1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", nargs="+", default=["contrastive"], choices=sorted(TARGETS))
    p.add_argument("--B", type=int, nargs="+", default=[65536],
                   help="rows (a runtime value: only its divisibility by 16 and the launchers' choices matter)")
    p.add_argument("--D", type=int, nargs="+", default=[768])
    p.add_argument("--dtypes", nargs="+", default=SAME_DTYPES, choices=list(PRECISIONS),
                   help="input precisions; NAME+fp32/PREC: an fp32 teacher, bf16+fp16: fp16 teacher rows (distill only)")
    p.add_argument("--sweep", action="store_true", help="one summary table over every --what, --B, --D and "
                   "--dtypes (worst spill and shared memory per kernel, compile failures) instead of the tables")
    a = p.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_90a, B = {a.B}\n")
    if a.sweep:
        print(sweep(a.what, a.B, a.D, a.dtypes), flush=True)
        return
    for target in a.what:
        for B in a.B:
            for D in a.D:
                print(report(target, B, D, a.dtypes), flush=True)


if __name__ == "__main__":
    main()
