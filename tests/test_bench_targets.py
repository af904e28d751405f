"""``distillcse bench targets`` at tiny sizes on the CPU (through the CLI entry), and its verdicts."""
import csv
import os

import pytest
import torch

from distillcse.__main__ import main
from distillcse.bench_targets import COLUMNS, GRAPH_IMPL, ONE_STEP_POINT, POINTS, markdown_table, run_points, verdict


def test_targets_cli_writes_well_formed_files(tmp_path, capsys, monkeypatch):
    """Every point at B / 4,096 with each implementation; on a CPU by default K = 1, float32 and a
    4 GiB memory cap; the contrastive term's rows without a shuffle; the one-step point's kernels
    already compiled by the earlier points (no untimed step of its own)."""
    from distillcse import bench_targets
    compiled_at = []
    monkeypatch.setattr(bench_targets, "_compile_at", lambda fn, B, *args: compiled_at.append(B))
    out = tmp_path / "targets"
    main(["bench", "targets", "--divide", "4096", "--D", "16", "--impl", "torch", "plain", "--repeats", "2",
          "--device", "cpu", "--no-progress", "--out", str(out)])
    assert "on a CPU every point is measured, none judged (--divide N shrinks every B); memory cap 4 GiB" in \
        capsys.readouterr().out
    assert compiled_at == []
    with open(out / "targets.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert [(r["point"], r["impl"]) for r in rows] == [(p[0], i) for p in POINTS for i in ("torch", "plain")]
    assert [int(r["B"]) for r in rows[::2]] == [max(2, p[2] // 4096) for p in POINTS]
    shuffles = {p[0]: "" if p[1] == "contrastive" else p[3] for p in POINTS}
    from distillcse import bench
    assert [r["label"] for r in rows] == [bench.label(r["impl"], r["what"]) for r in rows]   # plain PyTorch sorts
    assert rows[7]["label"] == "plain PyTorch"                                                # only for Group-P
    for r in rows:
        assert r["status"] == "ok" and r["device"] == "cpu" and r["commit"] and r["timestamp"]
        assert (r["D"], r["Dt"], r["K"], r["dtype"], r["shuffle"]) == ("16", "16", "1", "float32", shuffles[r["point"]])
        assert float(r["time_ms"]) > 0 and float(r["gemm_ms"]) > 0 and float(r["peak_mem_mib"]) > 0
        assert r["target_ms"] == r["target_mib"] == ""  # scaled run: no verdict against the targets
        assert verdict(r) == ("completes" if r["point"] == ONE_STEP_POINT else "measured")
    assert rows[-1]["repeats"] == "1"  # the million-row point is one step
    table = (out / "targets.md").read_text()
    assert table.count("\n| ") == 2 + len(rows) and "(not judged on a CPU)" in table
    assert os.path.getsize(out / "targets.csv") > 0


def test_a_cpu_run_at_the_stated_settings_is_not_judged():
    """The targets are an H100's: on a CPU, even at D = 768, K = 1, bf16 and full size, a point is
    measured and not judged; a repeated implementation runs once; the yardstick is not cuBLAS."""
    rows = run_points(points=POINTS[:1], impls=["torch", "torch"], repeats=1, device="cpu", progress=False,
                      log=lambda *a: None)
    assert [(r["B"], r["D"], r["dtype"], r["status"]) for r in rows] == [(64, 768, "bfloat16", "ok")]
    assert rows[0]["target_ms"] == rows[0]["target_mib"] == "" and verdict(rows[0]) == "measured"
    assert rows[0]["gemms"] == "fwd+bwd" and rows[0]["hard_per_row"] == 0
    table = markdown_table(rows)
    assert "| bare fwd+bwd GEMMs, ms |" in table and "cuBLAS" not in table


def test_a_point_over_the_memory_cap_is_not_run(monkeypatch):
    """On a CPU by default (4 GiB): plain PyTorch's B x B temporaries at the whole loss's 65,536
    rows (16 GiB of logits alone) are projected and skipped, not run; the torch backend's chunks
    fit, and run."""
    from distillcse import bench, bench_targets
    ran = []
    monkeypatch.setattr(bench_targets.bench, "_measure_point", lambda fn, inputs, *a, **k: (ran.append(1), (1.0, 1, 1, 1.0))[1])
    monkeypatch.setattr(bench_targets.bench, "time_gemms", lambda *a, **k: 0.5)
    monkeypatch.setattr(bench_targets.bench, "make_inputs", lambda *a, **k: None)
    full = [p for p in POINTS if p[1] == "full" and p[2] == 65536][:1]
    rows = run_points(points=full, impls=["plain", "torch"], repeats=1, device="cpu", progress=False,
                      log=lambda *a: None, max_memory_gib=4.0)
    assert [(r["impl"], r["status"]) for r in rows] == [("plain", "skipped (cap)"), ("torch", "ok")] and ran == [1]
    assert rows[0]["note"].startswith("projected ") and rows[0]["note"].endswith("> cap 4 GiB")
    assert verdict(rows[0]) == "skipped (cap)" and bench.projected_bytes("plain", "full", 65536, 768, 768, 1,
                                                                          bench.torch.bfloat16) > 16 * bench.GIB


def test_paper_batch_in_a_cuda_graph_needs_cuda(tmp_path):
    """The paper batch is measured eagerly and replayed in a CUDA graph by default; on a CPU the
    graph's row says why it is missing, and the run goes on."""
    assert POINTS[0][0] == "paper batch" and POINTS[0][4] == ("triton", GRAPH_IMPL, "reference")
    out = tmp_path / "graph"
    main(["bench", "targets", "--divide", "4096", "--D", "16", "--impl", GRAPH_IMPL, "torch", "--repeats", "2",
          "--device", "cpu", "--no-progress", "--skip-million", "--out", str(out)])
    with open(out / "targets.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["impl"], r["status"]) for r in rows[:2]] == [(GRAPH_IMPL, "n/a (needs CUDA)"), ("torch", "ok")]
    assert rows[0]["label"] == 'backend="triton" in a CUDA graph'


def test_million_only_and_skip_million(tmp_path, capsys, monkeypatch):
    """Alone, the one-step point first takes an untimed step at 65,536 rows (here / 4,096), so
    that its kernels do not compile inside its one timed step; its yardstick's GEMMs run 3 times."""
    from distillcse import bench_targets

    compiled_at, compile_at = [], bench_targets._compile_at
    monkeypatch.setattr(bench_targets, "_compile_at", lambda fn, B, *args: (compiled_at.append(B), compile_at(fn, B, *args)))
    gemm_repeats, time_gemms = [], bench_targets.bench.time_gemms
    monkeypatch.setattr(bench_targets.bench, "time_gemms", lambda B, shapes, dtype, device, repeats: (
        gemm_repeats.append(repeats), time_gemms(B, shapes, dtype, device, repeats))[1])
    out = tmp_path / "million"
    main(["bench", "targets", "--divide", "4096", "--D", "16", "--impl", "torch", "--repeats", "2",
          "--device", "cpu", "--no-progress", "--million-only", "--out", str(out)])
    with open(out / "targets.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["point"], r["B"], r["status"]) for r in rows] == [(ONE_STEP_POINT, str((1 << 20) // 4096), "ok")]
    assert compiled_at == [65536 // 4096] and gemm_repeats == [3]   # its yardstick: 3 calls, whatever --repeats
    with pytest.raises(SystemExit):
        main(["bench", "targets", "--skip-million", "--million-only", "--out", str(tmp_path / "none")])
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def _row(time_ms, mib, target_ms=150.0, target_mib=256.0, status="ok", point="full loss, shuffle expected"):
    return dict(point=point, status=status, time_ms=str(time_ms), peak_mem_mib=str(mib),
                target_ms=target_ms, target_mib=target_mib)


@pytest.mark.parametrize("row,expected", [
    (_row(149.0, 255.0), "meets"),
    (_row(151.0, 255.0), "misses (time)"),
    (_row(149.0, 257.0), "misses (memory)"),
    (_row(151.0, 257.0), "misses (time, memory)"),
    (_row(0.2, 1.0, target_ms=0.3, target_mib=""), "meets"),
    (_row(1.0, 1.0, status="OOM"), "OOM"),
    (_row(9e4, 9e3, target_ms="", target_mib="", point=ONE_STEP_POINT), "completes"),
])
def test_verdict(row, expected):
    assert verdict(row) == expected


def test_table_numbers_have_no_exponent():
    """The million-row step takes minutes: "234,600" ms in the table, not "2.346e+05"."""
    rows = [dict(_row("2.346e+05", "3584", target_ms="", target_mib="", point=ONE_STEP_POINT), label="x",
                 B=2**20, device_name="d", device="cuda", D=768, K=1, dtype="bfloat16", torch="t", triton="t",
                 python="p", commit="c", timestamp="s", memory_kind="m", gemm_ms="1.234e+04", ratio_to_gemm="19")]
    assert "| 1,048,576 | completes | 234,600 | 12,340 | 19 | 3,584 | completes |" in markdown_table(rows)


def test_table_shows_errors_with_their_note():
    rows = [dict(_row(1.0, 1.0, status="error"), note="RuntimeError: boom", label="x", B=64, device_name="d",
                 device="cuda", D=768, K=1, dtype="bfloat16", torch="t", triton="t", python="p", commit="c",
                 timestamp="s", memory_kind="m", time_ms="", gemm_ms="", ratio_to_gemm="", peak_mem_mib="")]
    assert "| error: RuntimeError: boom |" in markdown_table(rows)


@pytest.mark.parametrize("flag", ["--divide", "--D", "--K", "--repeats"])
def test_non_positive_settings_are_a_clear_error(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "targets", flag, "0", "--device", "cpu", "--out", str(tmp_path)])
    assert f"argument {flag}: expected a positive number, got 0" in capsys.readouterr().err


def test_verdict_at_the_target_meets_it():
    """A target is a bound the figure may reach: exactly 150 ms and 256 MiB meet 150 ms and 256 MiB."""
    assert verdict(_row(150.0, 256.0)) == "meets"
    assert verdict(_row(150.0, 256.0001)) == "misses (memory)" and verdict(_row(150.0001, 256.0)) == "misses (time)"


def test_the_stated_settings_on_cuda_are_judged_against_their_own_points_targets(monkeypatch):
    """On a CUDA device at D = 768, K = 1, bf16, full size, each point carries its own targets (the
    expected shuffle's 150 ms and 256 MiB, the random one's 250 ms and 256 MiB, the contrastive
    term's 60 ms); float32 (or another D, K, --divide) is measured without them. The device and the
    measurement are faked: 200 ms and 300 MiB a point, 50 ms of GEMMs."""
    from distillcse import bench
    monkeypatch.setattr(bench, "environment", lambda device: dict(
        timestamp="t", commit="c", device=device.type, device_name="GPU", torch="t", triton="t", python="p"))
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: None)
    monkeypatch.setattr(bench, "_measure_point", lambda fn, inputs, meter, device, repeats, time_cap: (
        0.2, 300 * bench.MIB, repeats, 1.0))
    monkeypatch.setattr(bench, "time_gemms", lambda *a, **k: 0.05)
    monkeypatch.setattr(bench, "_release", lambda device: None)
    run = lambda **kw: run_points(points=POINTS[1:4], impls=["torch"], repeats=3, device="cuda", progress=False,  # noqa: E731
                                  log=lambda *a: None, **kw)
    rows = run()
    assert [(r["point"], r["target_ms"], r["target_mib"], verdict(r)) for r in rows] == [
        ("full loss, shuffle expected", 150.0, 256.0, "misses (time, memory)"),
        ("full loss, shuffle random", 250.0, 256.0, "misses (memory)"),
        ("contrastive term", 60.0, "", "misses (time)")]
    assert {(r["time_ms"], r["gemm_ms"], r["ratio_to_gemm"], r["peak_mem_mib"], r["repeats"]) for r in rows} == {
        ("200", "50", "4", "300", 3)}
    table = markdown_table(rows)
    assert "| full loss, shuffle expected | " in table and "| 150 ms, 256 MiB | 200 | 50 | 4 | 300 | misses (time, memory) |" in table
    for other in (dict(dtype=bench.torch.float32), dict(D=384), dict(K=2), dict(divide=2)):
        assert {(r["target_ms"], r["target_mib"], verdict(r)) for r in run(**other)} == {("", "", "measured")}, other


def test_an_oom_is_recorded_and_the_run_goes_on(monkeypatch):
    """An implementation out of memory at a point: "OOM" with the error's first line as its note and
    no number, and the next implementation is measured (the measurement faked)."""
    from distillcse import bench
    calls = []

    def measure(fn, inputs, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB\nmore")
        return 0.001, 1, 1, 1.0
    monkeypatch.setattr(bench, "_measure_point", measure)
    monkeypatch.setattr(bench, "time_gemms", lambda *a, **k: 0.0005)
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: None)
    rows = run_points(points=POINTS[3:4], impls=["plain", "torch"], repeats=1, device="cpu", progress=False,
                      log=lambda *a: None)
    assert [(r["impl"], r["status"], verdict(r)) for r in rows] == [("plain", "OOM", "OOM"), ("torch", "ok", "measured")]
    assert rows[0]["note"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 16.00 GiB"
    assert rows[0].get("time_ms", "") == "" and rows[1]["time_ms"] == "1"
    assert "| OOM: OutOfMemoryError: CUDA out of memory. Tried to allocate 16.00 GiB |" in markdown_table(rows)


def test_the_untimed_step_before_the_one_step_point_is_a_forward_and_a_backward():
    """_compile_at: one forward and one backward at the given B (the backward's kernels compile
    there too, not in the one timed step)."""
    from distillcse import bench_targets
    ran = []

    def fn(z1, z2, teachers):
        loss = (z1 * z2).sum() + teachers[0].sum()
        loss.register_hook(lambda grad: ran.append(("backward", z1.shape[0])))
        ran.append(("forward", z1.shape[0]))
        return loss
    bench_targets._compile_at(fn, 16, 8, 1, torch.float32, torch.device("cpu"))
    assert ran == [("forward", 16), ("backward", 16)]


def test_the_one_step_point_compiles_first_where_the_earlier_points_failed(monkeypatch):
    """The earlier points compile the one-step point's kernels only where they ran: an implementation
    that failed at every earlier point takes the untimed step first (the measurements faked)."""
    from distillcse import bench, bench_targets
    compiled_at = []
    monkeypatch.setattr(bench_targets, "_compile_at", lambda fn, B, *args: compiled_at.append(B))
    monkeypatch.setattr(bench, "_measure_point", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    monkeypatch.setattr(bench_targets, "_measure_once", lambda *a: (1.0, 1, 1, 1.0))
    monkeypatch.setattr(bench, "time_gemms", lambda *a, **k: 0.5)
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **k: None)
    rows = run_points(points=(POINTS[1], POINTS[-1]), impls=["torch"], D=16, divide=4096, repeats=1, device="cpu",
                      progress=False, log=lambda *a: None)
    assert [(r["point"], r["status"]) for r in rows] == [(POINTS[1][0], "error"), (ONE_STEP_POINT, "ok")]
    assert compiled_at == [65536 // 4096]


def test_the_cuda_graphs_projected_memory_is_the_triton_backends(monkeypatch):
    """triton-graph runs the triton backend's step: the memory cap projects it as the backend, chunk
    budget included (CUDA faked; at the paper batch the inputs project 3 MiB, with the 128 MiB budget
    131 MiB: a 64 MiB cap skips both)."""
    import distillcse
    from distillcse import bench
    monkeypatch.setattr(bench, "environment", lambda device: dict(
        timestamp="t", commit="c", device=device.type, device_name="GPU", torch="t", triton="t", python="p"))
    monkeypatch.setattr(bench, "_release", lambda device: None)
    with distillcse.chunk_budget(128):
        rows = run_points(points=POINTS[:1], impls=["triton", GRAPH_IMPL], repeats=1, device="cuda", progress=False,
                          log=lambda *a: None, max_memory_gib=1 / 16)
    assert [(r["impl"], r["status"], r["note"]) for r in rows] == [
        (impl, "skipped (cap)", "projected 131 MiB > cap 0.0625 GiB") for impl in ("triton", GRAPH_IMPL)]


def test_table_verdict_of_a_measured_point_is_the_verdict_alone():
    """An ok row's note (plain-compile's memory from the allocator's records) is not a failure's: the
    verdict cell holds the verdict alone."""
    rows = [dict(_row(149.0, 255.0), note="memory from the CPU allocator's records", label="x", B=65536,
                 device_name="d", device="cuda", D=768, K=1, dtype="bfloat16", torch="t", triton="t", python="p",
                 commit="c", timestamp="s", memory_kind="m", gemm_ms="50", ratio_to_gemm="3")]
    assert markdown_table(rows).endswith("| 149 | 50 | 3 | 255 | meets |\n")
