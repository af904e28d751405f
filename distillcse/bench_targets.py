"""``distillcse bench targets``: the headline figures, each at the size its target is stated at,
against the target, in one short run.

============================ ============ ========== =========== ====================================
point                        loss         B          target      compared with
============================ ============ ========== =========== ====================================
paper batch                  full, random 64         0.3 ms      the same in a CUDA graph; ``backend="reference"``
full loss, shuffle expected  full         65,536     150 ms, 256 MiB
full loss, shuffle random    full         65,536     250 ms, 256 MiB
contrastive term             contrastive  65,536     60 ms       plain PyTorch, Inf-CL when importable
a million rows               full, random 1,048,576  completes
============================ ============ ========== =========== ====================================

The targets hold on a CUDA device at D = Dt = 768, K = 1, bf16 (the defaults on CUDA); a CPU,
and other settings (``--D``, ``--K``, ``--dtype``, ``--divide N``, which divides every B by N
for a quick run), are measured without a verdict. A point whose projected memory exceeds
``--max-memory-gib`` (4 GiB on a CPU by default) is not run ("skipped (cap)"). Each (point,
implementation) is measured as ``bench memory`` measures a point (warm-up, one step under the memory meter, the median of up to ``--repeats``
timed steps), except the million-row point: one step, timed and metered at once (its kernels
compiled beforehand at 65,536: by the earlier points, or alone by one untimed step), and
``triton-graph`` at the paper batch: the triton backend's step captured once in a CUDA graph and replayed (no host work but the replay's launch; the input
check is skipped while capturing, and the random shuffle draws its key on the GPU at each
replay), the median of ``--repeats`` replays, memory the capture's peak. Beside each time: the
bare GEMMs (cuBLAS on CUDA; float32 for 16-bit inputs on a CPU) a forward and backward of the
loss need, of the same shapes (``bench.gemm_shapes``), and the ratio. An implementation that runs out of memory or fails is recorded so and the run goes on. Results: ``targets.csv``
(device, versions, commit and time stamp on every row) and ``targets.md`` in ``--out``,
rewritten after every point.
"""
import os
import statistics
import sys

import torch

from . import bench, checks

MIB = bench.MIB
GRAPH_IMPL = "triton-graph"
IMPLS = bench.IMPLS + (GRAPH_IMPL,)
LABELS = dict(bench.LABELS, **{GRAPH_IMPL: 'backend="triton" in a CUDA graph'})
# name, what, B, shuffle, implementations, target ms, target MiB (None: no target), one step only
POINTS = (
    ("paper batch", "full", 64, "random", ("triton", GRAPH_IMPL, "reference"), 0.3, None, False),
    ("full loss, shuffle expected", "full", 65536, "expected", ("triton",), 150.0, 256.0, False),
    ("full loss, shuffle random", "full", 65536, "random", ("triton",), 250.0, 256.0, False),
    ("contrastive term", "contrastive", 65536, "random", ("triton", "plain", "inf-cl"), 60.0, None, False),
    ("a million rows", "full", 1 << 20, "random", ("triton",), None, None, True),
)
COLUMNS = ("point", "target_ms", "target_mib") + bench.COLUMNS
ONE_STEP_POINT = POINTS[-1][0]


def _compile_at(fn, B, D, K, dtype, device):
    """One untimed step at B rows: the one-step point's kernels compile here (65,536 rows take the
    same variants as 2^20: multiples of 16 above ``utils.PAD_MIN_COLS``), not in its timed step."""
    z1, z2, teachers, _ = bench.make_inputs(B, D, D, K, dtype, device)
    fn(z1, z2, teachers).backward()
    del z1, z2, teachers
    bench._release(device)


def _measure_once(fn, inputs, meter, device):
    """One forward+backward, timed and metered at once (for points too large to repeat)."""
    z1, z2, teachers, _ = inputs  # no hard negatives at these points
    box, mem = {}, {}

    def step():
        loss = fn(z1, z2, teachers)
        loss.backward()
        box["loss"] = loss

    with meter.measure(mem):
        seconds = bench.time_once(step, device)
    return seconds, mem["peak"], 1, float(box["loss"].detach().float())


def _measure_in_graph(fn, inputs, meter, device, repeats):
    """Forward+backward captured in a CUDA graph after two eager steps on a side stream (Triton
    compiles outside the capture), then the median time of ``repeats`` replays; memory: the
    capture's peak (the graph's pool keeps every temporary of the step)."""
    if device.type != "cuda":
        raise bench.Unavailable("n/a (needs CUDA)")
    z1, z2, teachers, _ = inputs  # no hard negatives at these points
    box = {}

    def step():
        loss = fn(z1, z2, teachers)
        box["grads"] = torch.autograd.grad(loss, (z1, z2))
        box["loss"] = loss.detach()

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph, mem = torch.cuda.CUDAGraph(), {}
    with meter.measure(mem), torch.cuda.graph(graph):
        step()
    graph.replay()
    times = [bench.time_once(graph.replay, device) for _ in range(repeats)]
    return statistics.median(times), mem["peak"], repeats, float(box["loss"].float())


def verdict(row):
    """"meets", "misses (time)", "misses (memory)", "completes", "measured" (no target at these
    settings) or the row's status."""
    if row["status"] != bench.OK:
        return row["status"]
    if row["target_ms"] == "" and row["target_mib"] == "":
        return "completes" if row["point"] == ONE_STEP_POINT else "measured"
    missed = []
    if row["target_ms"] != "" and float(row["time_ms"]) > float(row["target_ms"]):
        missed.append("time")
    if row["target_mib"] != "" and float(row["peak_mem_mib"]) > float(row["target_mib"]):
        missed.append("memory")
    return f"misses ({', '.join(missed)})" if missed else "meets"


def run_points(*, D=768, K=1, dtype=torch.bfloat16, divide=1, impls=None, repeats=10, device="cuda",
               points=POINTS, progress=True, log=print, on_rows=None, max_memory_gib=None):
    """Measure every (point, implementation); returns the rows (dicts with the keys of ``COLUMNS``).
    ``on_rows(rows)`` is called after each one (the files are rewritten: a run stopped midway keeps
    what it measured). A point whose projected memory (``bench.projected_bytes``) exceeds
    ``max_memory_gib`` is not run: "skipped (cap)"."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    env = bench.environment(device)
    # where the targets apply: the issue states them for an H100 (a CPU's figures are measured, not judged)
    stated = device.type == "cuda" and divide == 1 and D == 768 and K == 1 and dtype == torch.bfloat16
    work = [(p, impl) for p in points for impl in dict.fromkeys(impls or p[4])]   # each once
    rows, compiled = [], {}
    bar = tqdm(total=len(work), desc="bench targets", unit="pt", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    if log is print:
        log = bar.write
    for (name, what, B, shuffle, _, target_ms, target_mib, once), impl in work:
        B = max(2, B // divide)
        bar.set_postfix_str(f"{name}: {impl} B={B}")
        meter = bench.memory_meter(impl, device)
        row = dict(env, point=name, target_ms="" if target_ms is None or not stated else target_ms,
                   target_mib="" if target_mib is None or not stated else target_mib, what=what, impl=impl,
                   label=LABELS[impl] if impl == GRAPH_IMPL else bench.label(impl, what),
                   B=B, D=D, Dt=D, K=K, dtype=str(dtype).replace("torch.", ""),
                   shuffle="" if what == "contrastive" else shuffle, hard_per_row=0, gemms=bench.GEMMS,
                   memory_kind=meter.kind)
        inputs = None
        projected = bench.projected_bytes("triton" if impl == GRAPH_IMPL else impl, what, B, D, D, K, dtype)
        try:
            fn = bench.loss_function("triton" if impl == GRAPH_IMPL else impl, what, shuffle, device, compiled)
            if max_memory_gib is not None and projected > max_memory_gib * bench.GIB:   # not run
                raise bench.Unavailable("skipped (cap)")
            inputs = bench.make_inputs(B, D, D, K, dtype, device)
            if impl == GRAPH_IMPL:
                seconds, peak, n, loss = _measure_in_graph(fn, inputs, meter, device, repeats)
            elif once:
                if not any(r["impl"] == impl and r["status"] == bench.OK for r in rows):
                    _compile_at(fn, max(2, 65536 // divide), D, K, dtype, device)
                seconds, peak, n, loss = _measure_once(fn, inputs, meter, device)
            else:
                seconds, peak, n, loss = bench._measure_point(fn, inputs, meter, device, repeats, time_cap=10.0)
            inputs = None
            bench._release(device)
            gemm = bench.time_gemms(B, bench.gemm_shapes(what, impl, D, D, K), dtype, device, 3 if once else repeats)
        except bench.Unavailable as why:
            row["status"] = str(why)
            if row["status"] == "skipped (cap)":
                row["note"] = f"projected {bench._gib(projected)} > cap {max_memory_gib:g} GiB"
        except Exception as err:  # noqa: BLE001 - recorded, the run goes on
            row["status"] = "OOM" if bench.is_oom(err) else "error"
            row["note"] = bench._describe(err)
        else:
            row.update(status=bench.OK, time_ms=f"{seconds * 1e3:.4g}", peak_mem_mib=f"{peak / MIB:.4g}",
                       repeats=n, loss=f"{loss:.6g}", gemm_ms=f"{gemm * 1e3:.4g}",
                       ratio_to_gemm=f"{seconds / gemm:.3g}",
                       note=meter.note)
        finally:
            del inputs
            bench._release(device)
        rows.append(row)
        if on_rows is not None:
            on_rows(rows)
        log(f"  {name:<28} {impl:<10} B={B:<8} " + (
            f"{bench.number(row['time_ms'], 4):>10} ms {bench.number(row['peak_mem_mib'], 4):>10} MiB  {verdict(row)}"
            if row["status"] == bench.OK else f"{row['status']} {row.get('note', '')}"))
        bar.update(1)
    bar.close()
    return rows


def markdown_table(rows):
    if not rows:
        return "(no results)\n"
    first = rows[0]
    lines = ["# distillcse bench targets", "",
             f"- device: {first['device_name']} ({first['device']})",
             f"- D = Dt = {first['D']}, K = {first['K']}, {first['dtype']}; torch {first['torch']}, "
             f"triton {first['triton']}, python {first['python']}, commit {first['commit']}, {first['timestamp']}",
             f"- peak memory: {first['memory_kind']}, the gradients of z1 and z2 included, the inputs not", "",
             f"| point | implementation | B | target | time, ms | {'cuBLAS' if first['device'] == 'cuda' else 'bare'} "
             "fwd+bwd GEMMs, ms | x GEMMs | peak extra, MiB | verdict |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        target = ", ".join(part for part in (f"{r['target_ms']:g} ms" if r["target_ms"] != "" else "",
                                             f"{r['target_mib']:g} MiB" if r["target_mib"] != "" else "") if part)
        ok = r["status"] == bench.OK
        if not target:
            target = ("completes" if r["point"] == ONE_STEP_POINT else
                      "(not judged on a CPU)" if r["device"] != "cuda" else "(not at these settings)")
        numbers = [bench.number(r[k], 4) if ok else "" for k in ("time_ms", "gemm_ms", "ratio_to_gemm", "peak_mem_mib")]
        cells = [r["point"], r["label"], f"{r['B']:,}", target, *numbers,
                 verdict(r) + ("" if ok or not r.get("note") else f": {r['note']}")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def add_targets_arguments(p):
    p.add_argument("--D", type=checks.positive_int, default=768, help="student and teacher width (default: 768)")
    p.add_argument("--K", type=checks.positive_int, default=1, help="teacher components (default: 1)")
    p.add_argument("--dtype", choices=bench.DTYPES, default=None,
                   help="embedding dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--divide", type=checks.positive_int, default=1, help="divide every batch size by this (default: 1)")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=None, metavar="IMPL",
                   help="these implementations at every point (default: each point's own)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--skip-million", action="store_true", help="leave out the million-row point")
    which.add_argument("--million-only", action="store_true",
                       help="the million-row point alone (a GPU run gives it its own time limit)")
    p.add_argument("--repeats", type=checks.positive_int, default=10, help="timed steps per point (default: 10)")
    p.add_argument("--max-memory-gib", type=checks.non_negative_float, default=None, help="skip a point whose "
                   "projected peak exceeds this many GiB; 0: no cap (default: 4 on CPU, none on CUDA)")
    p.add_argument("--device", type=checks.cli_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<timestamp>-targets)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_targets(args, log=print):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    points = tuple(p for p in POINTS if not (args.skip_million and p[7]) and not (args.million_only and not p[7]))
    out = args.out or bench.default_out_dir("-targets")
    checks.check_out_dir(out)
    log(f"distillcse bench targets on {bench.device_name(device)}: D = Dt = {args.D}, K = {args.K}, "
        f"{str(dtype).replace('torch.', '')}, batch sizes / {args.divide}")
    cap = bench.memory_cap(args.max_memory_gib, device)
    if device.type != "cuda":
        log("the targets are stated for an H100: on a CPU every point is measured, none judged (--divide N "
            f"shrinks every B); memory cap {'none' if cap is None else f'{cap:g} GiB'}")
    csv_path, md_path = os.path.join(out, "targets.csv"), os.path.join(out, "targets.md")
    bench.clear_previous_run(out, ("targets.csv", "targets.md"), log)

    measured = []

    def write(rows):                         # after every point
        measured[:] = rows
        os.makedirs(out, exist_ok=True)
        bench.write_csv(rows, csv_path, COLUMNS)
        bench.write_text(md_path, markdown_table(rows))

    def written():
        total = sum(len(dict.fromkeys(args.impl or p[4])) for p in points)
        return (f"{len(measured)} of {total} points written: {csv_path}, {md_path}" if measured
                else "no point was measured, nothing written")

    rows = bench.run_stoppable(lambda: run_points(
        D=args.D, K=args.K, dtype=dtype, divide=args.divide, impls=args.impl, repeats=args.repeats, device=device,
        points=points, progress=not args.no_progress, log=log, on_rows=write, max_memory_gib=cap), written, log)
    log("")
    log(markdown_table(rows))
    log(f"wrote {csv_path}, {md_path}")
    return rows, out
