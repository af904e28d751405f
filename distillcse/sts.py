"""STS evaluation as SimCSE and DistillCSE report it: SentEval's unsupervised STS tasks.

Each pair is scored by the cosine of its two embeddings, and a task's score is the Spearman
correlation with the gold scores, x 100. STS12-16 use SentEval's "all" setting (the subsets
concatenated, unscored pairs dropped); STS-B and SICK-R score one split (``test``; ``dev`` for
model selection during training). Files are read in SentEval's layout (``data/sts/downstream``
of the shared data folder: Moses-tokenised, STS lowercased), sentences rejoined with spaces as
SimCSE's batcher does.

``evaluate(encode, tasks)`` takes any ``encode(list of str) -> [n, d] tensor``;
:class:`Encoder` wraps a Hugging Face model with mean or [CLS] pooling.
"""
import os

import numpy as np
import torch

STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
SHORT_NAMES = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}
_SUBSETS = {
    "STS12": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13": ("FNWN", "headlines", "OnWN"),
    "STS14": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}
_SPLIT_FILES = {
    "STSBenchmark": {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test.csv"},
    "SICKRelatedness": {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"},
}


def default_data_dir():
    """``../shared/data/sts/downstream`` relative to the repository root (``$DISTILLCSE_STS_DIR`` wins)."""
    if os.environ.get("DISTILLCSE_STS_DIR"):
        return os.environ["DISTILLCSE_STS_DIR"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.normpath(os.path.join(root, "..", "shared", "data", "sts", "downstream"))


def _read_lines(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"STS file not found: {path} (data_dir should be SentEval's "
                                f"'downstream' folder, holding STS/ and SICK/)")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f]


def _join(sentence):
    return " ".join(sentence.split())


def _task_files(task, split, data_dir):
    """The files of one task at ``split``: STS12-16 (test only) an (input, gold) pair a subset,
    STS-B and SICK-R one file."""
    if task in _SUBSETS:
        if split != "test":
            raise ValueError(f"split: {task} has only 'test', got {split!r}")
        folder = os.path.join(data_dir, "STS", f"{task}-en-test")
        return [os.path.join(folder, f"STS.{kind}.{subset}.txt") for subset in _SUBSETS[task] for kind in ("input", "gs")]
    if task in _SPLIT_FILES:
        if split not in _SPLIT_FILES[task]:
            raise ValueError(f"split: expected one of {sorted(_SPLIT_FILES[task])}, got {split!r}")
        folder = ("STS", "STSBenchmark") if task == "STSBenchmark" else ("SICK",)
        return [os.path.join(data_dir, *folder, _SPLIT_FILES[task][split])]
    raise ValueError(f"task: expected one of {STS_TASKS}, got {task!r}")


def missing_files(tasks, split="test", data_dir=None):
    """The files that :func:`evaluate` would read for ``tasks`` and are not in ``data_dir``
    (checked before a long run, which would otherwise fail at its first evaluation)."""
    data_dir = data_dir or default_data_dir()
    return [path for task in tasks for path in _task_files(task, "test" if task in _SUBSETS else split, data_dir)
            if not os.path.isfile(path)]


def load_task(task, split="test", data_dir=None):
    """The scored pairs of one task: ``(sentences_a, sentences_b, gold)``, gold a float64 array.

    STS12-16 have only a test split (their subsets concatenated in SentEval's order);
    STS-B and SICK-R have ``train``, ``dev`` and ``test``.
    """
    files = _task_files(task, split, data_dir or default_data_dir())
    a, b, gold = [], [], []
    if task in _SUBSETS:
        for pairs_file, scores_file in zip(files[::2], files[1::2]):
            for pair, score in zip(_read_lines(pairs_file), _read_lines(scores_file)):
                if score.strip():                     # STS15/16 leave unscored pairs blank
                    s1, s2 = pair.split("\t")[:2]
                    a.append(_join(s1)), b.append(_join(s2)), gold.append(float(score))
    else:
        columns, skip = ((5, 6, 4), 0) if task == "STSBenchmark" else ((1, 2, 3), 1)
        # STS-B: genre file year id score s1 s2; SICK: pair_ID A B relatedness entailment
        for line in _read_lines(files[0])[skip:]:
            if line.strip():
                cells = line.split("\t")
                a.append(_join(cells[columns[0]])), b.append(_join(cells[columns[1]]))
                gold.append(float(cells[columns[2]]))
    return a, b, np.asarray(gold, dtype=np.float64)


def spearman(predicted, gold):
    """Spearman rank correlation x 100 (average ranks for ties, as scipy.stats.spearmanr)."""
    from scipy.stats import spearmanr
    return float(spearmanr(np.asarray(predicted, dtype=np.float64), gold).correlation) * 100.0


@torch.no_grad()
def pair_cosines(encode, a, b, batch_size=128):
    """cos(encode(a_i), encode(b_i)) for every pair, as a float64 numpy array. Sentences are
    encoded once each, in batches of similar length (little padding)."""
    unique = sorted(set(a) | set(b), key=lambda s: (len(s), s))
    index = {s: i for i, s in enumerate(unique)}
    emb = torch.cat([encode(unique[i:i + batch_size]).double().cpu()
                     for i in range(0, len(unique), batch_size)])
    ea = emb[[index[s] for s in a]]
    eb = emb[[index[s] for s in b]]
    return torch.nn.functional.cosine_similarity(ea, eb, dim=-1).numpy()


def evaluate(encode, tasks=STS_TASKS, split="test", data_dir=None, batch_size=128, max_pairs=None,
             progress=None):
    """``{task: Spearman x 100}`` and, over several tasks, ``"avg"``; ``max_pairs`` keeps each
    task's first pairs only (quick checks). ``progress(task)`` is called before each task."""
    scores = {}
    for task in tasks:
        if progress is not None:
            progress(task)
        a, b, gold = load_task(task, split="test" if task in _SUBSETS else split, data_dir=data_dir)
        if max_pairs is not None:
            a, b, gold = a[:max_pairs], b[:max_pairs], gold[:max_pairs]
        scores[task] = spearman(pair_cosines(encode, a, b, batch_size), gold)
    if len(tasks) > 1:
        scores["avg"] = float(np.mean([scores[t] for t in tasks]))
    return scores


def format_scores(scores):
    """One markdown table row pair: task names, then scores with two decimals."""
    names = [SHORT_NAMES.get(t, "avg." if t == "avg" else t) for t in scores]
    head = "| " + " | ".join(names) + " |"
    rule = "| " + " | ".join("---:" for _ in names) + " |"
    row = "| " + " | ".join(f"{v:.2f}" for v in scores.values()) + " |"
    return "\n".join((head, rule, row))


def mean_pool(hidden, mask):
    """Mean of the hidden states over the real tokens: [n, L, d], [n, L] -> [n, d]."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


POOLINGS = ("mean", "cls")


class Encoder:
    """Sentences -> pooled embeddings of a Hugging Face encoder (``pooling`` mean or cls)."""

    def __init__(self, model, tokenizer, pooling="mean", max_length=128):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.max_length = pooling, max_length

    def tokenize(self, sentences, max_length=None):
        device = next(self.model.parameters()).device
        return self.tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt",
                              max_length=max_length or self.max_length).to(device)

    def pool(self, batch, model=None):
        """Pooled embeddings of a tokenised batch, with whatever grad mode is on: [n, d];
        ``model`` runs it instead of ``self.model`` (a DistributedDataParallel wrapper)."""
        hidden = (self.model if model is None else model)(**batch).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return mean_pool(hidden, batch["attention_mask"])

    @torch.no_grad()
    def __call__(self, sentences):
        was_training = self.model.training
        self.model.eval()
        try:
            return self.pool(self.tokenize(sentences)).float()
        finally:
            self.model.train(was_training)
