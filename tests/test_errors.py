"""Bad input raises a clear error naming the argument, on every public entry point."""
import pytest
import torch

import distillcse
from distillcse import config
from conftest import DEVICE, requires_triton

B, D = 8, 6


def good():
    return torch.randn(B, D), torch.randn(B, D), torch.randn(B, 5)


@pytest.mark.parametrize("change,error,match", [
    (lambda z1, z2, t: (z1[None], z2, t), ValueError, "z1 must be 2-D"),
    (lambda z1, z2, t: (z1[:1], z2[:1], t[:1]), ValueError, "at least 2 rows"),
    (lambda z1, z2, t: (z1, z2[:-1], t), ValueError, "z2 must have 8 rows"),
    (lambda z1, z2, t: (z1, z2[:, :-1], t), ValueError, "z2 must have 6 features"),
    (lambda z1, z2, t: (z1, torch.cat([z2, z2[:, :1]], 1), t), ValueError, "z2 must have 6 features"),  # wider too
    (lambda z1, z2, t: (z1[:, :0], z2[:, :0], t), ValueError, "z1 must have at least one feature"),
    (lambda z1, z2, t: (z1, z2.double(), t), TypeError, "z2 has dtype"),
    (lambda z1, z2, t: (z1.long(), z2, t), TypeError, "z1 must be float16"),
    (lambda z1, z2, t: (z1.index_fill(0, torch.tensor([2]), float("nan")), z2, t), ValueError, "z1 contains NaN"),
    (lambda z1, z2, t: (z1, z2.index_fill(0, torch.tensor([2]), float("inf")), t), ValueError, "z2 contains NaN or Inf"),
    (lambda z1, z2, t: (z1, z2, t[:-1]), ValueError, "teachers must have 8 rows"),
    (lambda z1, z2, t: (z1, z2, [t, t[:-2]]), ValueError, r"teachers\[1\] must have 8 rows"),
    (lambda z1, z2, t: (z1, z2, [t[:-2], t]), ValueError, r"teachers\[0\] must have 8 rows"),
    (lambda z1, z2, t: (z1, z2, []), TypeError, "teachers must be a tensor"),
    (lambda z1, z2, t: (z1, z2, t.index_fill(0, torch.tensor([0]), float("nan"))), ValueError, "teachers contains NaN"),
    (lambda z1, z2, t: ("z1", z2, t), TypeError, "z1 must be a torch.Tensor"),
    (lambda z1, z2, t: (z1, z2, [t, t.index_fill(0, torch.tensor([1]), float("-inf"))]), ValueError,
     r"teachers\[1\] contains NaN or Inf"),
    (lambda z1, z2, t: (z1.half().index_fill(1, torch.tensor([0]), float("inf")), z2.half(), t), ValueError,
     "z1 contains NaN or Inf"),
    (lambda z1, z2, t: (z1.index_fill(0, torch.tensor([2]), float("nan")), z2.index_fill(0, torch.tensor([1]), float("inf")),
                        t), ValueError, "^z1 contains NaN or Inf"),  # the first of the inputs that hold them
])
def test_bad_tensors(change, error, match):
    z1, z2, t = change(*good())
    with pytest.raises(error, match=match):
        distillcse.distillcse_loss(z1, z2, t, backend="torch")


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature must be a positive"),
    (dict(student_temperature=-1.0), "student_temperature must be a positive"),
    (dict(teacher_temperature=float("nan")), "teacher_temperature must be a positive"),
    (dict(grouping_temperature=0), "grouping_temperature must be a positive"),
    (dict(temperature=1e-40), "temperature must be at least 0.0001"),  # NaN loss, or a crash deep inside
    (dict(temperature=9e-5), "temperature must be at least 0.0001"),  # just below the bound
    (dict(grouping_temperature=1e-40), "grouping_temperature must be at least"),
    (dict(teacher_weights=1.0), "teacher_weights must be None or a sequence"),
    (dict(teacher_weights=[True]), "must be finite numbers >= 0"),
    (dict(teacher_weights={0: 1.0}), "teacher_weights must be None or a sequence of K numbers in the teachers' order"),
    (dict(teacher_weights="1"), "teacher_weights must be None or a sequence of K numbers in the teachers' order, got a str"),
    (dict(teacher_weights=[10**400]), "must be finite numbers >= 0"),
    (dict(temperature=10**400), "temperature must be a positive finite number"),  # an OverflowError
    (dict(group_p=torch.tensor(0.1)), "group_p must be a Python number, got a tensor"),
    (dict(distill_weight=torch.tensor(1.0)), "distill_weight must be a Python number, got a tensor"),
    (dict(group_p=0.0), r"group_p must be in \(0, 1\]"),
    (dict(group_p=1.5), r"group_p must be in \(0, 1\]"),
    (dict(group_size=0), "group_size must be a positive integer"),
    (dict(group_size=2.5), "group_size must be a positive integer"),
    (dict(group_size=True), "group_size must be a positive integer or None, got True"),
    (dict(group_size=3, group_p=2.0), r"group_p must be in \(0, 1\] \(or None with group_size\)"),
    (dict(shuffle="sometimes"), "shuffle must be one of"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(teacher_weights=[0.5, 0.5]), "one weight per teacher"),
    (dict(teacher_weights=[2.0]), "must sum to 1"),
    (dict(teacher_weights=[0.999]), "teacher_weights must sum to 1, got sum 0.999"),
    (dict(teacher_weights=[-1.0]), "must be finite numbers >= 0"),
    (dict(distill_weight=float("inf")), "distill_weight must be a finite number"),
    (dict(distill_only="yes"), "distill_only must be a bool"),
    (dict(distill_weight=-0.5), r"distill_weight must be >= 0 \(0 is SimCSE\)"),
    (dict(distill_only=True, distill_weight=0.0), "distill_only=True with distill_weight=0 leaves no loss"),
    (dict(rows=3), r"rows must be None or \(start, stop\), two ints, got 3"),
    (dict(rows=(0, 2.0)), r"rows must be None or \(start, stop\), two ints"),
    (dict(rows=(0, 2, 4)), r"rows must be None or \(start, stop\), two ints"),
    (dict(rows=(True, 2)), r"rows must be None or \(start, stop\), two ints"),
    (dict(rows=(3, 2)), r"rows must be \(start, stop\) with 0 <= start <= stop <= B = 8, got \(3, 2\)"),
    (dict(rows=(-1, 2)), r"0 <= start <= stop <= B = 8"),
    (dict(rows=(0, 9)), r"0 <= start <= stop <= B = 8"),
])
def test_bad_options(kwargs, match):
    z1, z2, t = good()
    with pytest.raises((ValueError, TypeError), match=match):
        distillcse.distillcse_loss(z1, z2, t, **dict(dict(backend="torch"), **kwargs))


def test_the_smallest_temperature_is_accepted():
    """The bound itself (1e-4) passes ("at least"), and the loss is finite there."""
    z1, z2, t = good()
    taus = dict(temperature=1e-4, student_temperature=1e-4, teacher_temperature=1e-4, grouping_temperature=1e-4)
    assert torch.isfinite(distillcse.distillcse_loss(z1, z2, t, backend="torch", **taus))


def test_rows_whose_norms_overflow_float32_are_named():
    """|x| * sqrt(D) past ~1.8e19 squares past float32's range: the torch and reference backends
    returned a wrong loss (3.40 for a float64 0.18), the kernels NaN. Each input is held to its
    own width (a narrow teacher beside it aside); float64 inputs are fine."""
    z1, z2, t = good()
    with pytest.raises(ValueError, match="z2 has entries up to 5e\\+18: its rows' squared norms overflow float32"):
        distillcse.distillcse_loss(z1, z2.index_fill(0, torch.tensor([3]), 5e18), t, backend="torch")
    with pytest.raises(ValueError, match=r"teachers has entries up to 1e\+19"):
        distillcse.distill_loss(z1, t.index_fill(1, torch.tensor([0]), 1e19), backend="reference")
    wide = torch.randn(B, 64).index_fill(0, torch.tensor([2]), 2.5e18)  # |row| = 2e19; the teacher is 5 wide
    with pytest.raises(ValueError, match=r"student has entries up to 2.5e\+18"):
        distillcse.distill_loss(wide, t, backend="torch")
    bf16 = [x.bfloat16() for x in good()]  # bfloat16 reaches 3.4e38 as float32 does; only float64 is exempt
    with pytest.raises(ValueError, match=r"z1 has entries up to .*: its rows' squared norms overflow float32"):
        distillcse.distillcse_loss(bf16[0].index_fill(0, torch.tensor([1]), 1e19), *bf16[1:], backend="torch")
    z1, z2, t = (x.double() * 1e30 for x in good())
    assert torch.isfinite(distillcse.distillcse_loss(z1, z2, t, backend="torch"))


def test_teacher_weights_one_per_teacher():
    """Fewer weights than teachers are refused too (zip would have left the last teachers out)."""
    z1, _, t = good()
    with pytest.raises(ValueError, match=r"teacher_weights must have one weight per teacher \(2\), got 1"):
        distillcse.distill_loss(z1, [t, t], teacher_weights=[1.0], backend="torch")


def test_rows_may_be_a_list():
    """rows=[start, stop] (a list, from a config file say) is the share (start, stop)."""
    z1, z2, t = good()
    kw = dict(shuffle="expected", backend="torch")
    assert torch.equal(distillcse.distillcse_loss(z1, z2, t, rows=[2, 5], **kw),
                       distillcse.distillcse_loss(z1, z2, t, rows=(2, 5), **kw))


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    """backend="triton" where the triton package does not import names the package."""
    from distillcse import api
    monkeypatch.setattr(api, "_triton_importable", lambda: False)
    z1, z2, _ = good()
    with pytest.raises(RuntimeError, match=r'backend="triton" needs the triton package \(pip install triton\)'):
        distillcse.contrastive_loss(z1, z2, backend="triton")


def test_module_checks_teacher_weights_at_construction():
    with pytest.raises(ValueError, match="teacher_weights must sum to 1"):
        distillcse.DistillCSELoss(teacher_weights=[0.2, 0.2])
    with pytest.raises(TypeError, match="teacher_weights must be None or a sequence"):
        distillcse.DistillCSELoss(teacher_weights=0.5)


def test_bad_seed_and_hard_negatives():
    z1, z2, t = good()
    with pytest.raises(TypeError, match="seed must be None, an int or a torch.Generator"):
        distillcse.distill_loss(z1, t, seed="42")
    with pytest.raises(TypeError, match="seed must be None, an int or a torch.Generator, got bool"):
        distillcse.distill_loss(z1, t, seed=True)
    with pytest.raises(TypeError, match="temperature must be a Python number, got a tensor"):
        distillcse.contrastive_loss(z1, z2, temperature=torch.tensor(0.05))
    with pytest.raises(ValueError, match="hard_negatives must have 6 features"):
        distillcse.contrastive_loss(z1, z2, hard_negatives=torch.randn(3, 4))
    with pytest.raises(ValueError, match="hard_negatives contains NaN"):
        distillcse.contrastive_loss(z1, z2, hard_negatives=torch.full((3, 6), float("nan")))


def test_module_rejects_unknown_keywords_and_bad_options():
    with pytest.raises(TypeError, match="unknown keyword"):
        distillcse.DistillCSELoss(temprature=0.05)
    with pytest.raises(ValueError, match="shuffle must be one of"):
        distillcse.DistillCSELoss(shuffle="all")
    with pytest.raises(ValueError, match="group_p must be in"):
        distillcse.DistillCSELoss(group_p=2)
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        distillcse.DistillCSELoss(distill_weight=-1.0)
    with pytest.raises(ValueError, match="leaves no loss"):
        distillcse.DistillCSELoss(distill_only=True, distill_weight=0.0)
    with pytest.raises(TypeError, match="return_terms must be a bool"):
        distillcse.DistillCSELoss(return_terms="yes")
    with pytest.raises(ValueError, match="backend must be one of"):  # at construction, not the first call
        distillcse.DistillCSELoss(backend="cuda")
    for name in ("student_temperature", "teacher_temperature", "grouping_temperature"):
        with pytest.raises(ValueError, match=f"^{name} must be a positive"):
            distillcse.DistillCSELoss(**{name: 0.0})
    with pytest.raises(TypeError, match=r"pass hard_negatives to forward\(\)"):
        distillcse.DistillCSELoss(hard_negatives=torch.randn(3, D))
    with pytest.raises(TypeError, match=r"pass rows to forward\(\)"):
        distillcse.DistillCSELoss(rows=(0, 2))


@requires_triton
def test_rows_on_the_triton_backend():
    """Every row is the whole loss (the one-program kernel here); a shard streams (its share's
    values: ``test_triton_backend.py``); a shard out of range names the argument."""
    z1, z2, t = (x.to(DEVICE) for x in good())
    whole = distillcse.distillcse_loss(z1, z2, t, rows=(0, z1.shape[0]), backend="triton", shuffle="expected")
    assert torch.equal(whole, distillcse.distillcse_loss(z1, z2, t, backend="triton", shuffle="expected"))
    shares = [distillcse.distillcse_loss(z1, z2, t, rows=rows, backend="triton", shuffle="expected")
              for rows in ((0, 1), (1, 3), (3, z1.shape[0]))]
    torch.testing.assert_close(sum(shares), whole, rtol=2e-5, atol=0)
    with pytest.raises(ValueError, match=r"rows must be \(start, stop\) with 0 <= start <= stop <= B"):
        distillcse.distillcse_loss(z1, z2, t, rows=(3, 1), backend="triton")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z1, z2, t = good()
    with pytest.raises(RuntimeError, match='backend="triton" needs CUDA tensors'):
        distillcse.contrastive_loss(z1, z2, backend="triton")


def test_chunk_budget_must_be_positive():
    with pytest.raises(ValueError, match="chunk budget must be a positive"):
        distillcse.set_chunk_budget(0)


def test_chunk_budget_block_restores_the_budget():
    """The budget before the block comes back after it, also when the block raises."""
    before = config.chunk_budget_bytes()
    with distillcse.chunk_budget(0.3):
        assert config.chunk_budget_bytes() == int(0.3 * 2**20)
        with pytest.raises(KeyError), distillcse.chunk_budget(2):
            assert config.chunk_budget_bytes() == 2 * 2**20
            raise KeyError
        assert config.chunk_budget_bytes() == int(0.3 * 2**20)
    assert config.chunk_budget_bytes() == before


def test_device_mismatch_names_the_argument():
    z1, z2, t = good()
    with pytest.raises(ValueError, match="z2 is on meta but the student embeddings are on cpu"):
        distillcse.contrastive_loss(z1, z2.to("meta"), backend="torch")
    with pytest.raises(ValueError, match="hard_negatives is on meta"):
        distillcse.contrastive_loss(z1, z2, hard_negatives=torch.randn(3, D, device="meta"), backend="torch")
    with pytest.raises(ValueError, match=r"teachers\[1\] is on meta"):
        distillcse.distill_loss(z1, [t, t.to("meta")], backend="torch")


def test_non_finite_inputs_of_each_entry_point_are_named():
    z1, z2, t = good()
    bad = z1.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="student contains NaN or Inf"):
        distillcse.distill_loss(bad, t, backend="torch")
    with pytest.raises(ValueError, match="z2 contains NaN or Inf"):
        distillcse.contrastive_loss(z1, bad, backend="torch")
    distillcse.distill_loss(z1, t, backend="torch")  # finite inputs pass


def test_finite_check_can_be_turned_off():
    """``finite_check(False)`` skips the NaN / Inf check (and its host sync): the NaN reaches the
    loss; the setting comes back after the block, and takes only a bool."""
    z1, z2, t = good()
    bad = z1.clone()
    bad[3, 1] = float("nan")
    with distillcse.finite_check(False):
        assert torch.isnan(distillcse.distillcse_loss(bad, z2, t, backend="torch"))
    with pytest.raises(ValueError, match="z1 contains NaN or Inf"):
        distillcse.distillcse_loss(bad, z2, t, backend="torch")
    with pytest.raises(TypeError, match="enabled must be True or False, got 0"):
        distillcse.set_finite_check(0)


def test_finite_check_block_restores_the_setting():
    """The setting before the block comes back after it: also when the block raises, and when it
    was off (a block inside ``finite_check(False)`` leaves the check off)."""
    before = config.finite_check_enabled()
    for outer in (True, False):
        with distillcse.finite_check(outer):
            with distillcse.finite_check(not outer):
                assert config.finite_check_enabled() is not outer
            assert config.finite_check_enabled() is outer
            with pytest.raises(KeyError), distillcse.finite_check(not outer):
                raise KeyError
            assert config.finite_check_enabled() is outer
    assert config.finite_check_enabled() is before


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_empty_hard_negatives_are_none(backend):
    """A [0, D] batch of hard negatives (a data pipeline's batch with none) is no hard negatives."""
    z1, z2, t = good()
    empty = torch.randn(0, D)
    assert torch.equal(distillcse.contrastive_loss(z1, z2, hard_negatives=empty, backend=backend),
                       distillcse.contrastive_loss(z1, z2, backend=backend))
    assert torch.equal(distillcse.distillcse_loss(z1, z2, t, hard_negatives=empty, seed=1, backend=backend),
                       distillcse.distillcse_loss(z1, z2, t, seed=1, backend=backend))


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=requires_triton)])
def test_any_int_seed_is_its_64_bit_key(backend):
    """Seeds beyond 64 bits (a hash, say) are taken modulo 2^64 on every backend and in the
    module form (the reference's generator overflowed on them)."""
    g = torch.Generator().manual_seed(0)
    dev = DEVICE if backend == "triton" else "cpu"  # the triton backend takes CUDA tensors on a GPU
    z1, z2, t = (torch.randn(70, d, generator=g).to(dev) for d in (D, D, 5))  # 70 rows: the shuffle moves the loss
    loss = lambda seed: distillcse.distillcse_loss(z1, z2, t, seed=seed, backend=backend).item()  # noqa: E731
    module = lambda seed: distillcse.DistillCSELoss(seed=seed, backend=backend)(z1, z2, t).item()  # noqa: E731
    for big in (2**70 + 12345, 2**64 - 1, -1):
        assert loss(big) == loss(big % 2**64) and module(big) == module(big % 2**64)
    assert loss(2**70 + 12345) != loss(2**70 + 12346) and loss(2**63 + 12345) != loss(12345)  # the top bit too


@pytest.mark.parametrize("argv,message", [
    (["bench", "memory", "--D", "0", "--out", "OUT"], "argument --D: expected a positive number, got 0"),  # was: the default D
    (["bench", "memory", "--time-cap", "nan", "--out", "OUT"], "argument --time-cap: expected a positive number, got nan"),
    (["bench", "memory", "--max-batch", "1", "--out", "OUT"], "argument --max-batch: expected a number >= 2, got 1"),
    (["bench", "memory", "--min-batch", "64", "--max-batch", "32", "--out", "OUT"], "need 2 <= --min-batch <= --max-batch (default 4096 on CPU, 2^20 on CUDA), got 64 and 32"),
    (["bench", "train", "--batch", "64", "1", "--out", "OUT"], "argument --batch: expected a number >= 2, got 1"),
    (["bench", "plot", "/nonexistent/results.csv"], "bench plot: /nonexistent/results.csv: no such file"),
    (["verify", "--sizes", "37", "1"], "argument --sizes: expected a number >= 2, got 1"),
    (["sts", "--max-pairs", "1"], "argument --max-pairs: expected a number >= 2, got 1"),  # one pair has no Spearman
    (["sts", "/nonexistent/model"], "model /nonexistent/model: no such folder"),
    (["train", "--out", "OUT", "--eval-every", "-1"], "argument --eval-every: expected a number >= 0, got -1"),
    (["train", "--out", "OUT", "--distill-weight", "-1"], "argument --distill-weight: expected a number >= 0"),
    (["train", "--out", "OUT", "--sentences", "SENTENCES", "--batch-size", "2", "--student", "/nonexistent/model"],
     "--student /nonexistent/model: no such folder"),
    (["train", "--out", "OUT", "--group-p", "2"], "loss settings: group_p must be in (0, 1], got 2.0"),
    (["train", "--out", "OUT", "--lr", "3e-5x"], "argument --lr: expected a number, got '3e-5x'"),
    (["train", "--out", "OUT", "--mini-batch-size", "0"], "argument --mini-batch-size: expected a positive number, got 0"),
    (["bench", "train", "--mini-batch-size", "1.5", "--out", "OUT"], "argument --mini-batch-size: expected an integer, got '1.5'"),
    (["train", "--out", "OUT", "--distill-only", "--distill-weight", "0"], "loss settings: distill_only=True"),
])
def test_command_line_rejects_bad_values(argv, message, tmp_path, capsys):
    """Every command's bad option is an error naming it, before any work (no traceback, no
    silent default, no empty results folder)."""
    from distillcse.__main__ import main
    sentences = tmp_path / "sentences.txt"  # a real corpus (the default in ../shared may be absent)
    sentences.write_text("one sentence\nanother one\n")
    with pytest.raises(SystemExit) as err:
        main([{"OUT": str(tmp_path / "out"), "SENTENCES": str(sentences)}.get(a, a) for a in argv])
    assert message in str(err.value) + capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_without_a_model_is_named(tmp_path):
    """A folder that is no saved model (a run's OUT instead of OUT/best, say) exits naming it."""
    from distillcse.__main__ import main
    with pytest.raises(SystemExit, match=f"model {tmp_path}: not loadable"):
        main(["sts", str(tmp_path)])


def test_a_file_given_relatively_as_a_model_is_named(tmp_path, monkeypatch):
    """A model named by a relative path that is a file (config.json in the current folder) is named
    as a file, not sent to the Hugging Face hub as a model name."""
    pytest.importorskip("transformers")
    from distillcse.__main__ import main
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="model config.json: a file, not a model's folder"):
        main(["sts", "config.json"])


@pytest.mark.parametrize("backend,B", [("torch", 8), pytest.param("triton", 8, marks=requires_triton),
                                       pytest.param("triton", 70, marks=requires_triton)])
def test_a_second_derivative_is_refused(backend, B):
    """create_graph=True: these backends save the gradient their forward computed, with no
    graph of its own, so a gradient penalty would silently leave their part out (the torch
    backend's came out 61% off by finite differences, the triton backend's had no graph at
    all). The reference differentiates twice; B = 8 runs the one-program kernel, 70 streams."""
    z1, z2 = (torch.randn(B, D, device=DEVICE, requires_grad=True) for _ in range(2))
    t = torch.randn(B, 5, device=DEVICE)
    losses = (lambda b: distillcse.distillcse_loss(z1, z2, t, seed=3, backend=b),
              lambda b: distillcse.contrastive_loss(z1, z2, backend=b),
              lambda b: distillcse.distill_loss(z1, t, seed=3, backend=b))
    for loss in losses:
        with pytest.raises(RuntimeError, match=r'create_graph=True \(a second derivative\) needs backend="reference"'):
            torch.autograd.grad(loss(backend), z1, create_graph=True)
        torch.autograd.grad(loss(backend), z1)  # once is fine
    g, = torch.autograd.grad(losses[0]("reference"), z1, create_graph=True)
    assert g.requires_grad


def test_every_argument_may_be_given_by_name():
    """The inputs by their documented names (the autocast wrapper once took the first one only by
    position: distill_loss(student=...) was a TypeError about a 'z1')."""
    z1, z2, t = good()
    kw = dict(shuffle="expected", backend="torch")
    assert torch.equal(distillcse.distill_loss(student=z1, teachers=t, **kw), distillcse.distill_loss(z1, t, **kw))
    assert torch.equal(distillcse.contrastive_loss(z1=z1, z2=z2), distillcse.contrastive_loss(z1, z2))
    assert torch.equal(distillcse.distillcse_loss(z1=z1, z2=z2, teachers=t, **kw), distillcse.distillcse_loss(z1, z2, t, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the wrapper finds the device by name: autocast off inside
        assert torch.equal(distillcse.distill_loss(student=z1, teachers=t, **kw), distillcse.distill_loss(z1, t, **kw))
