"""Input validation for the public API and the command line: every error names the argument
and what was expected."""
import argparse
import collections.abc
import math
import numbers
import os

import torch

from . import config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHUFFLES = ("none", "random", "expected")
BACKENDS = ("auto", "reference", "torch", "triton")
NORM_LIMIT = 1e19  # a row's norm past ~1.8e19 squares past float32's range (3.4e38)
MIN_TEMPERATURE = 1e-4  # 1 / tau scales the cosines: 1e4 keeps every logit, exp and sum finite in fp32


def check_embeddings(name, x, *, rows=None, dim=None, like=None):
    """A 2-D floating tensor [rows, dim] on ``like``'s device. Returns it. (NaN and Inf:
    ``check_finite``, once for all the inputs.)"""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, D], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (the batch size), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} features like z1, got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature, got shape {tuple(x.shape)}")
    if like is not None:
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but the student embeddings are on {like.device}")
        if x.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but the student embeddings have {like.dtype}")
    return x


def capturing(x):
    """Whether ``x`` is a CUDA tensor and the current stream is being captured into a CUDA graph
    (no host reads then; what the host decides is replayed as it was at capture)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class NonFiniteError(ValueError):
    """An input holds NaN or Inf, or entries whose rows' norms overflow float32."""


def check_finite(named):
    """Raises NonFiniteError (a ValueError) naming the first of ``named`` ((name, tensor) pairs) that holds NaN or
    Inf, or entries so large that its rows' norms overflow float32 (float64 inputs aside). Each
    tensor's max |x| (which NaN and Inf survive) in one foreach op (fused on CUDA for tensors of
    one dtype, not a launch a tensor) and their max, read in one host sync: no temporary of an
    input's size. Skipped when ``config.set_finite_check(False)``, and while a
    CUDA stream is being captured into a graph (where a host read is not allowed)."""
    if not config.finite_check_enabled() or capturing(named[0][1]):
        return
    peaks = torch._foreach_norm([x.detach() for _, x in named], ord=math.inf)
    widest = max(math.sqrt(x.shape[-1]) for _, x in named)
    if torch.stack(peaks).amax().item() * widest < NORM_LIMIT:  # False for NaN: the usual case in one sync
        return
    for (name, x), peak in zip(named, peaks):
        peak = peak.item()
        if not math.isfinite(peak):
            raise NonFiniteError(f"{name} contains NaN or Inf")
        if x.dtype != torch.float64 and peak * math.sqrt(x.shape[-1]) >= NORM_LIMIT:
            raise NonFiniteError(f"{name} has entries up to {peak:.3g}: its rows' squared norms overflow float32, "
                             f"where the losses compute (keep max |x| * sqrt(D) under {NORM_LIMIT:.0e}; rescale "
                             "the embeddings, which the cosines do not see)")


def check_student(name, x):
    check_embeddings(name, x)
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs a batch of at least 2 rows (in-batch negatives), got {x.shape[0]}")
    return x


def check_teachers(teachers, student):
    """One tensor [B, D_t] or a non-empty sequence of K tensors [B, D_k]. Returns a list of
    (name, tensor) pairs, the tensors detached."""
    if isinstance(teachers, torch.Tensor):
        teachers = [teachers]
    elif isinstance(teachers, (list, tuple)) and len(teachers) > 0:
        teachers = list(teachers)
    else:
        raise TypeError("teachers must be a tensor [B, D_t] or a non-empty sequence of tensors [B, D_k], "
                        f"got {type(teachers).__name__}")
    B, named = student.shape[0], []
    for k, e in enumerate(teachers):
        label = "teachers" if len(teachers) == 1 else f"teachers[{k}]"
        if isinstance(e, torch.Tensor) and e.device != student.device:
            raise ValueError(f"{label} is on {e.device} but the student embeddings are on {student.device}")
        named.append((label, check_embeddings(label, e, rows=B).detach()))
    return named


def check_teacher_weights(weights, K):
    """None (uniform) or K non-negative finite numbers summing to 1 (any number of them for K
    None). Returns a list of floats."""
    if weights is None:
        return [1.0 / K] * K
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().flatten().tolist()
    if isinstance(weights, (collections.abc.Mapping, str)):
        raise TypeError(f"teacher_weights must be None or a sequence of K numbers in the teachers' order, "
                        f"got a {type(weights).__name__}")
    try:
        weights = list(weights)
    except TypeError:
        raise TypeError("teacher_weights must be None or a sequence of K numbers, "
                        f"got {type(weights).__name__}") from None
    if K is not None and len(weights) != K:
        raise ValueError(f"teacher_weights must have one weight per teacher ({K}), got {len(weights)}")
    values = [_finite("teacher_weights", w.item() if isinstance(w, torch.Tensor) and w.numel() == 1 else w)
              for w in weights]
    if any(w is None or w < 0 for w in values):
        raise ValueError(f"teacher_weights must be finite numbers >= 0, got {weights}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"teacher_weights must sum to 1, got sum {sum(values)}")
    return values


def _finite(name, value):
    """``float(value)`` for a finite real number (not a bool), else None; a tensor is a TypeError."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor (pass float(...): the "
                        "loss's settings are fixed, not learned)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return value if math.isfinite(value) else None


def check_positive(name, value):
    number = _finite(name, value)
    if number is None or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_positive_int(name, value, alternative=""):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer{alternative}, got {value!r}")
    return int(value)


def check_temperature(name, value):
    """A positive temperature, at least ``MIN_TEMPERATURE`` (smaller ones overflow fp32 logits)."""
    value = check_positive(name, value)
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be at least {MIN_TEMPERATURE:g} (1 / {name} scales the cosines, and "
                         f"float32 logits overflow far below that), got {value!r}")
    return value


# Group ids are int64: a smaller group_p (whose floor(c / P) could pass 2^63) acts as this one,
# and a larger group_size as this one, which puts every row of any batch in one group. The
# groups differ only where two neighbours' cumulative masses are closer than 2^-62, finer than a
# float32 cumulative sum resolves (for B < 2^39).
MIN_GROUP_P = 2.0 ** -62
MAX_GROUP_SIZE = 2 ** 62


def check_grouping(group_p, group_size):
    """(group_p, group_size): groups by mass, or of fixed size when ``group_size`` is set (then
    ``group_p`` is unused and may be None, and comes back as None)."""
    if group_size is not None:
        group_size = check_positive_int("group_size", group_size, " or None")
        if group_p is not None:
            _check_group_p(group_p, " (or None with group_size)")
        return None, min(group_size, MAX_GROUP_SIZE)
    return max(_check_group_p(group_p, ""), MIN_GROUP_P), None


def _check_group_p(group_p, alternative):
    number = _finite("group_p", group_p)
    if number is None or not 0 < number <= 1:
        raise ValueError(f"group_p must be in (0, 1]{alternative}, got {group_p!r}")
    return number


def check_rows(rows, B):
    """None (every row) or ``(start, stop)``, ints with ``0 <= start <= stop <= B``: the rows
    whose losses a shard computes. Returns (start, stop)."""
    if rows is None:
        return 0, B
    if not isinstance(rows, (tuple, list)) or len(rows) != 2 or not all(
            isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rows):
        raise TypeError(f"rows must be None or (start, stop), two ints, got {rows!r}")
    start, stop = int(rows[0]), int(rows[1])
    if not 0 <= start <= stop <= B:
        raise ValueError(f"rows must be (start, stop) with 0 <= start <= stop <= B = {B}, got {rows!r}")
    return start, stop


def shard_or_none(rows, B):
    """``rows`` (start, stop) as ``check_rows`` returns it, or None for every row (the backends'
    whole-batch path)."""
    return None if rows == (0, B) else rows


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_seed(seed):
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an int or a torch.Generator, got {type(seed).__name__}")
    return int(seed) & (2**64 - 1)  # any int, as the 64-bit key every backend uses


def check_real(name, value):
    number = _finite(name, value)
    if number is None:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


# Command-line option types: a bad value is argparse's usage error naming the option.

def cli_number(kind, minimum, *, exclusive=True):
    """An option type: ``kind(text)``, finite, and above ``minimum`` (or at least it, with
    ``exclusive=False``)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value) or (value <= minimum if exclusive else value < minimum):
            bound = "a positive number" if (minimum, exclusive) == (0, True) else \
                f"a number {'>' if exclusive else '>='} {minimum}"
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text}")
        return value
    return parse


positive_int = cli_number(int, 0)
positive_float = cli_number(float, 0)
non_negative_int = cli_number(int, 0, exclusive=False)
non_negative_float = cli_number(float, 0, exclusive=False)
batch_size = cli_number(int, 2, exclusive=False)   # in-batch negatives need two rows
pair_count = cli_number(int, 2, exclusive=False)   # a Spearman correlation of one pair is undefined


def cli_device(text):
    """The ``--device`` option type: cpu, or cuda / cuda:N for a GPU this machine has; returns the
    text as given (without the option the commands pick cuda when available)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        device = torch.device(text)
    except RuntimeError:                   # not a device type torch knows
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cuda" and (device.index or 0) >= gpus):
        here = ["cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(gpus)] if gpus else [])
        raise argparse.ArgumentTypeError(f"expected a device of this machine ({', '.join(here)}), got {text!r}")
    return text


def check_out_dir(path):
    """Exits naming ``--out`` unless ``path`` is a folder or can be made one (its nearest existing
    ancestor a writable folder); makes nothing, so a later error leaves no empty folder."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"--out {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {path}: {existing} is not writable")
