"""Kernels built for an H100/H200 (sm_90a) offline: ``benchmarks/compile_sm90.py`` compiles them
with Triton's own ptxas, no GPU needed, for what the interpreter cannot show. Triton 3.6 failed
to build the search's placing kernel with a boundary axis of 4 or fewer (group_p >= 0.2), which
only an H200 showed; and its pipeliner built the one-program kernel's logit loops so that an
async copy refilled the shared slot a wgmma was still reading (``refill_races``)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_sm90.py"), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_few_group_kernels_compile_for_sm90():
    report = _compile_report("--what", "few_groups", "--dtypes", "bf16", "--B", "4096", "--D", "64")
    for kernel in ("_place_kernel", "_group_probe_kernel", "_narrow_kernel", "_settle_kernel",
                   "_pairwise_brackets_kernel", "_group_means_kernel", "_settled_rows_kernel", "_grid_points_kernel",
                   "_distill_slab_kernel"):
        assert f"### {kernel} " in report, kernel
    assert "REFILL RACE" not in report


def test_small_batch_kernels_refill_no_slot_in_use():
    """Every variant of the one-program kernel and its targets kernel, 16-bit and TF32: no
    pipelined loop refills a shared slot that an async wgmma may still read (the logit loops
    run unpipelined for this; pipelined, Triton 3.6 builds each of them as ``_PIPELINED``)."""
    report = _compile_report("--what", "small_batch", "--dtypes", "bf16", "tf32", "--B", "64", "--D", "64")
    assert "### _small_batch_kernel " in report and "### _shuffled_targets_kernel " in report
    assert report.count("| bf16 |") >= 8 and report.count("| tf32 |") >= 8
    assert "REFILL RACE" not in report, report


def test_small_batch_kernels_compile_below_16_rows():
    """B = 2: the one-program kernels' batch block stays 16 rows (``BB = max(16, next_pow2(B))``):
    the gradient's dots take it as their inner dimension, which sm_90 needs at least 16 (the
    interpreter takes any; with BB = 2 the build fails)."""
    report = _compile_report("--what", "small_batch", "--dtypes", "bf16", "--B", "2", "--D", "16")
    assert "### _small_batch_kernel " in report and "### _shuffled_targets_kernel " in report
    assert "WRITE_GRAD=True" in report and " BB=16 " in report and " BB=2 " not in report


def _report_rows(report):
    """{(kernel, constexprs): (spilled bytes, SASS instructions of the outermost loop or None)},
    the most of each where the launchers' integer arguments made several builds of a row."""
    rows, kernel = {}, None
    for line in report.splitlines():
        if line.startswith("### "):
            kernel = line.split()[1]
        elif line.startswith("| bf16 |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            loops = cells[8].split(" / ")[-1]
            spills, loops = int(cells[5].split("/")[0]), None if loops == "-" else int(loops)
            seen = rows.get((kernel, cells[1]), (0, loops))
            rows[kernel, cells[1]] = (max(spills, seen[0]), loops and max(loops, seen[1]))
    return rows


SLAB_READERS = ("_row_stats_kernel", "_group_counts_kernel", "_compact_targets_kernel", "_distill_slab_kernel",
                "_accumulate_slab_kernel", "_group_probe_kernel", "_group_means_kernel")


def test_slab_kernels_at_a_batch_not_a_multiple_of_16():
    """The kernels that read a slab of cuBLAS dots (or of factors) at B = 4,104 compile as well
    as at B = 4,112: their slabs' rows are padded to a multiple of 16 (``utils.slab_buffer``, above
    ``PAD_MIN_COLS``), so the loads stay vectorised. With a row stride of B they went element by
    element (B = 130, session 21): 1.9-2.6x the loops' instructions, 112-1,044 bytes of spills.
    Padded, the unaligned batch still costs its column masks (~110-150 SASS a loop): 1.13x on the
    slab kernel's whole-batch builds, 1.27x on the smallest, a shard's none (542 instructions)."""
    aligned, unaligned = (_report_rows(_compile_report("--what", "distill", "--dtypes", "bf16", "--B", B, "--D", "64"))
                          for B in ("4112", "4104"))
    checked = [key for key in aligned if key[0] in SLAB_READERS]
    assert len(checked) >= 15 and set(checked) <= set(unaligned), sorted(unaligned)
    for key in checked:
        (spills, loops), (spills_at_aligned, loops_at_aligned) = unaligned[key], aligned[key]
        # (a few bytes either way where ptxas caps a build's registers: 8 B at 4,104 and 4,112)
        assert spills <= spills_at_aligned + 16, (key, spills, spills_at_aligned)
        assert loops is None or loops <= 1.3 * loops_at_aligned, (key, loops, loops_at_aligned)


# A pipelined loop as Triton 3.6 builds the one-program kernel's logits (abridged TTGIR): a tile
# of SLOTS slots, two filled before the loop, both of the iteration's wgmmas left in flight
# (PENDINGS) while the refill for two iterations ahead goes out.
_PIPELINED = """
    %a = ttg.local_alloc : () -> !ttg.memdesc<SLOTSx64x64xbf16, #shared, #smem, mutable>
    %a0 = ttg.memdesc_index %a[%c0_i32] : !ttg.memdesc<SLOTSx64x64xbf16> -> !ttg.memdesc<64x64xbf16>
    %c0 = ttg.async_copy_global_to_local %p, %a0 mask %m : tensor<64x64x!tt.ptr<bf16>> -> <64x64xbf16>
    %a1 = ttg.memdesc_index %a[%c1_i32] : !ttg.memdesc<SLOTSx64x64xbf16> -> !ttg.memdesc<64x64xbf16>
    %c1 = ttg.async_copy_global_to_local %p, %a1 mask %m : tensor<64x64x!tt.ptr<bf16>> -> <64x64xbf16>
    %r:2 = scf.for %i = %c0_i32 to %n step %c1_i32 iter_args(%x = %z, %y = %z) -> (tensor<64x64xf32>) {
      %w = ttg.async_wait %c0 {num = 2 : i32}
      %s = ttg.memdesc_index %a[%e] : !ttg.memdesc<SLOTSx64x64xbf16> -> !ttg.memdesc<64x64xbf16>
      %t = ttg.memdesc_trans %s {order = array<i32: 1, 0>} : !ttg.memdesc<64x64xbf16> -> !ttg.memdesc<64x64xbf16>
      %d0 = ttng.warp_group_dot %s, %t, %x {isAsync = true} : !ttg.memdesc<64x64xbf16> * !ttg.memdesc<64x64xbf16> -> tensor<64x64xf32>
      %d1 = ttng.warp_group_dot %s, %b, %y {isAsync = true} : !ttg.memdesc<64x64xbf16> * !ttg.memdesc<64x64xbf16> -> tensor<64x64xf32>
      %d:3 = ttng.warp_group_dot_wait %d0, %d1, %s {pendings = PENDINGS : i32} : tensor<64x64xf32>, tensor<64x64xf32>
      %f = ttg.memdesc_index %a[%g] : !ttg.memdesc<SLOTSx64x64xbf16> -> !ttg.memdesc<64x64xbf16>
      %c = ttg.async_copy_global_to_local %q, %f mask %k : tensor<64x64x!tt.ptr<bf16>> -> <64x64xbf16>
      scf.yield %d#0, %d#1 : tensor<64x64xf32>, tensor<64x64xf32>
    } loc(#loc1)
"""


@pytest.mark.parametrize("slots,pendings,races", [
    (2, 2, 1),  # as built: the refill's slot is the one both wgmmas read
    (2, 1, 1),  # the second wgmma still reads it
    (2, 0, 0),  # both waited for
    (3, 2, 0),  # a third slot: the refill goes to the slot of the iteration before, done
    (3, 4, 1),  # ... unless that iteration's wgmmas are still in flight too
])
def test_refill_races_reads_the_pipeline(slots, pendings, races):
    interpret = os.environ.get("TRITON_INTERPRET")  # the module drops it on import, for its compiles
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from compile_sm90 import refill_races
    finally:
        sys.path.pop(0)
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    found = refill_races(_PIPELINED.replace("SLOTS", str(slots)).replace("PENDINGS", str(pendings)))
    assert len(found) == races, found
