"""Public API: the three losses and the module, input checks and backend selection.

Shapes: ``z1, z2`` [B, D] student embeddings of two views; ``teachers`` one tensor [B, D_t] or
a sequence of K tensors [B, D_k]; ``hard_negatives`` [B_h, D]. Every loss returns a scalar
(float32 for half-precision inputs) that autograd differentiates w.r.t. the student inputs.
``rows=(start, stop)`` gives a shard's share of a loss: its rows' terms summed over B, so that
the shares of a partition of the rows sum to the loss (``distillcse.sharded_loss`` splits the
global batch's loss over the ranks this way).
"""
import functools
import hashlib
import inspect
import os

import torch

from . import checks, config, reference
from .reference import EPS
from .torch_backend import ContrastiveChunked, DistillChunked, need_grad


def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, x, shard=None):
    """"auto" -> "triton" for CUDA tensors (fp16/bf16/fp32) when Triton is installed, else "torch"
    (also for a shard of the rows, ``shard`` (start, stop) other than every row: the kernels'
    shards are tested under the interpreter only so far; ``backend="triton"`` takes them)."""
    checks.check_choice("backend", backend, checks.BACKENDS)
    sharded = shard is not None and shard != (0, x.shape[0])
    if backend == "auto":
        fused = x.is_cuda and x.dtype != torch.float64 and not sharded and _triton_importable()
        return "triton" if fused else "torch"
    if backend == "triton":
        if not _triton_importable():
            raise RuntimeError('backend="triton" needs the triton package (pip install triton)')
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and x.device.type == "cpu"
        if not (x.is_cuda or interpreted):
            raise RuntimeError(f'backend="triton" needs CUDA tensors (got {x.device}); on CPU set '
                               'TRITON_INTERPRET=1 before importing triton, or use backend="torch"')
    return backend


def _public_loss(loss):
    """A public loss's wrapper.

    Autocast: the losses compute in their inputs' precision with fp32 accumulation whatever
    autocast says (the torch backend adds its chunks' products into fp32 buffers, the kernels'
    GEMMs keep PyTorch's fp32 matmul switch, the reference follows suit); their fp32 result
    enters the surrounding autocast region as any fp32 tensor does.

    ``torch.compile``: the loss runs as in eager mode, a graph break around it
    (``torch.compiler.disable``). Its work is fused kernels or row chunks planned on the host
    from B, which the compiler would retrace for each B (and Inductor's CPU code generation
    fails on the random shuffle's integer hashing in torch 2.13); the rest of a compiled step
    is compiled as usual.
    """
    first = next(iter(inspect.signature(loss).parameters))   # z1 or student, positional or by name

    @torch.compiler.disable
    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device = getattr(args[0] if args else kwargs.get(first), "device", None)
        if device is not None and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
            with torch.autocast(device.type, enabled=False):
                return loss(*args, **kwargs)
        return loss(*args, **kwargs)
    return wrapper


def _work_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _full_precision(*xs):
    """The reference backend's inputs: half-precision tensors as fp32 (differentiably), so that it
    computes in fp32 as the other backends accumulate (fp16's eps of 1e-8 would be 0)."""
    return [None if x is None else x.to(_work_dtype(x)) for x in xs]


def _normalize(x):
    """Unit rows ``x / max(|x|, eps)`` in fp32 (fp64 for fp64 inputs), differentiable."""
    x = x.to(_work_dtype(x))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _teacher_rows(teachers, weights, dtype):
    """[B, sum D_k]: ``sqrt(w_k) e_k / |e_k|`` side by side, so that ``T T^T = sum_k w_k cos_k``
    (teachers detached). Written in row chunks within the chunk budget: no whole fp32 copy of a
    teacher beside the result."""
    B = teachers[0].shape[0]
    out = torch.empty(B, sum(e.shape[1] for e in teachers), device=teachers[0].device, dtype=dtype)
    col = 0
    for w, e in zip(weights, teachers):
        step = max(1, config.chunk_budget_bytes() // (3 * 8 * e.shape[1]))  # a chunk's work-dtype temporaries
        for r0 in range(0, B, step):
            out[r0:r0 + step, col:col + e.shape[1]] = w ** 0.5 * _normalize(e[r0:r0 + step]).to(dtype)
        col += e.shape[1]
    return out


def _step_seed(seed, x=None):
    """The 64-bit key of this step's random shuffle: a checked int seed as it is, 62 fresh bits
    from a generator or, if None, from torch's RNG. While ``x``'s CUDA stream is being captured
    into a graph, the fresh bits are drawn on the GPU instead (a [1] int64 tensor that the
    kernels read), so that each replay draws a new shuffle, as eager steps do."""
    if isinstance(seed, int):
        return seed
    if x is not None and checks.capturing(x):
        if seed is not None and seed.device.type != "cuda":
            raise ValueError(
                f"seed: a {seed.device.type} torch.Generator (DistillCSELoss makes one of an int seed) cannot "
                "draw a new shuffle on each replay of a CUDA graph (it would be drawn once, at capture); pass "
                "seed=None (drawn on the GPU at each replay), a CUDA generator registered with the graph, or an "
                "int to distillcse_loss (the same shuffle every step)")
        return torch.randint(0, 2**62, (1,), generator=seed, device=x.device)
    device = seed.device if isinstance(seed, torch.Generator) else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=seed, device=device).item())


def _reference_generator(seed):
    """A CPU generator for the reference's randperm calls (seeded from a CUDA generator if given).
    Its Mersenne Twister keeps a seed's low 32 bits: a 64-bit int seed past them is hashed to 32,
    so that seeds 0 and 2^32 draw different shuffles (seeds below 2^32 are taken as they are)."""
    if isinstance(seed, int):
        if seed >= 2**32:
            seed = int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little")).digest()[:4], "little")
        return torch.Generator().manual_seed(seed)
    if isinstance(seed, torch.Generator) and seed.device.type != "cpu":
        return torch.Generator().manual_seed(_step_seed(seed))
    return seed


def _distill_options(student_temperature, teacher_temperature, group_p, group_size,
                     grouping_temperature, shuffle, teacher_weights, seed, K):
    group_p, group_size = checks.check_grouping(group_p, group_size)
    return dict(
        student_temperature=checks.check_temperature("student_temperature", student_temperature),
        teacher_temperature=checks.check_temperature("teacher_temperature", teacher_temperature),
        group_p=group_p,
        group_size=group_size,
        grouping_temperature=checks.check_temperature("grouping_temperature", grouping_temperature),
        shuffle=checks.check_choice("shuffle", shuffle, checks.SHUFFLES),
        teacher_weights=checks.check_teacher_weights(teacher_weights, K),
        seed=checks.check_seed(seed),
    )


@_public_loss
def contrastive_loss(z1, z2, *, temperature=0.05, hard_negatives=None, backend="auto", rows=None):
    """SimCSE InfoNCE: ``mean_i [logsumexp_j(c_ij / tau) - c_ii / tau]``,
    ``c_ij = cos(z1_i, [z2; hard_negatives]_j)``. z1, z2 [B, D]; hard_negatives [B_h, D];
    ``rows=(start, stop)``: the sum over those rows only, divided by B."""
    named, hard_negatives = _check_views(z1, z2, hard_negatives)
    shard = checks.check_rows(rows, z1.shape[0])
    checks.check_finite(named)
    temperature = checks.check_temperature("temperature", temperature)
    return _contrastive(z1, z2, hard_negatives, temperature, resolve_backend(backend, z1, shard), shard)


def _check_views(z1, z2, hard_negatives):
    """Shapes, dtypes and devices of the views. Returns them as (name, tensor) pairs, and the
    hard negatives: None for none, which an empty [0, D] tensor also is."""
    checks.check_student("z1", z1)
    checks.check_embeddings("z2", z2, rows=z1.shape[0], dim=z1.shape[1], like=z1)
    named = [("z1", z1), ("z2", z2)]
    if hard_negatives is not None:
        checks.check_embeddings("hard_negatives", hard_negatives, dim=z1.shape[1], like=z1)
        if hard_negatives.shape[0] == 0:
            hard_negatives = None
        else:
            named.append(("hard_negatives", hard_negatives))
    return named, hard_negatives


def _contrastive(z1, z2, hard_negatives, temperature, backend, shard):
    """The contrastive term on checked inputs (``shard`` (start, stop): those rows' share)."""
    if backend == "reference":
        z1, z2, hard_negatives = _full_precision(z1, z2, hard_negatives)
        return reference.contrastive_loss(z1, z2, temperature, hard_negatives,
                                          checks.shard_or_none(shard, z1.shape[0]))
    if backend == "triton":
        from .triton_backend import contrastive
        return contrastive(z1, z2, hard_negatives, 1.0 / temperature, shard)
    columns = z2 if hard_negatives is None else torch.cat([z2, hard_negatives], dim=0)
    u1, y = _normalize(z1), _normalize(columns)
    return ContrastiveChunked.apply(u1, y, 1.0 / temperature, need_grad(u1, y), shard)


def _fused_setup(options, student):
    """(student_temperature, teacher weights, options) for the torch and triton backends, the
    seed replaced by the step's shuffle key (``_step_seed``)."""
    seed = options.pop("seed")
    weights = options.pop("teacher_weights")
    student_temperature = options.pop("student_temperature")
    options["step_seed"] = _step_seed(seed, student) if options["shuffle"] == "random" else None
    return student_temperature, weights, options


def _triton_teacher(teachers, weights):
    """(rows, unit_rows): one teacher's raw rows as they are (the kernels normalise on the fly,
    no [B, Dt] copy), or K teachers' weighted unit rows side by side in the teachers' own
    precision (float64 as float32, also for one float64 teacher, whose raw rows may hold norms
    that no kernel dtype does), never the student's: the targets divide t by tau_t = 0.0125,
    so rounding fp32 teachers' cosines to bf16 would cost them ~10%. bf16 teachers' unit rows
    (|u| <= 1) go in fp16: the same tensor-core rate and memory, 2 more mantissa bits (bf16 rows
    put 5-9x the torch backend's error on the gradient in `distillcse verify`)."""
    if len(teachers) == 1 and teachers[0].dtype != torch.float64:
        return teachers[0], False
    dtype = functools.reduce(torch.promote_types, (e.dtype for e in teachers))
    dtype = {torch.float64: torch.float32, torch.bfloat16: torch.float16}.get(dtype, dtype)
    return _teacher_rows(teachers, weights, dtype), True


def _distill(student, teachers, options, backend, shard):
    """The distillation term on checked inputs (``teachers`` a list, ``options`` checked,
    ``shard`` (start, stop): those rows' share)."""
    if backend == "reference":
        seed, weights = options.pop("seed"), options.pop("teacher_weights")
        student, *teachers = _full_precision(student, *teachers)
        return reference.distill_loss(student, teachers, teacher_weights=weights, generator=_reference_generator(seed),
                                      rows=checks.shard_or_none(shard, student.shape[0]), **options)
    student_temperature, weights, options = _fused_setup(options, student)
    if backend == "triton":
        from .triton_backend import distill
        rows, unit_rows = _triton_teacher(teachers, weights)
        return distill(student, rows, student_temperature, options, shard, unit_rows=unit_rows)
    u = _normalize(student)
    T = _teacher_rows(teachers, weights, u.dtype)
    return DistillChunked.apply(u, T, student_temperature, options, need_grad(u), shard)


@_public_loss
def distill_loss(student, teachers, *, student_temperature=0.025, teacher_temperature=0.0125,
                 group_p=0.1, group_size=None, grouping_temperature=1.0, shuffle="random",
                 teacher_weights=None, seed=None, backend="auto", rows=None):
    """Group-P shuffled distillation: ``mean_i sum_{j!=i} -q~_ij log_softmax_{j!=i}(s_ij / tau_s)``.

    student [B, D]; teachers [B, D_t] or K tensors [B, D_k] (frozen); ``shuffle`` "random" (the
    paper), "expected" (its deterministic expectation) or "none"; ``group_size`` switches to
    fixed-size groups; ``seed`` (int or torch.Generator) makes the random shuffle reproducible;
    ``rows=(start, stop)``: the sum over those rows only, divided by B (the random shuffle of a
    row is the same as in the whole batch's loss for the same int seed).
    """
    checks.check_student("student", student)
    shard = checks.check_rows(rows, student.shape[0])
    named_teachers = checks.check_teachers(teachers, student)
    checks.check_finite([("student", student)] + named_teachers)
    teachers = [e for _, e in named_teachers]
    options = _distill_options(student_temperature, teacher_temperature, group_p, group_size,
                               grouping_temperature, shuffle, teacher_weights, seed, len(teachers))
    return _distill(student, teachers, options, resolve_backend(backend, student, shard), shard)


def _check_total_options(temperature, distill_weight, distill_only, return_terms):
    """The keywords :func:`distillcse_loss` adds to the two terms'; (temperature, distill_weight)."""
    temperature = checks.check_temperature("temperature", temperature)
    distill_weight = checks.check_real("distill_weight", distill_weight)
    if distill_weight < 0:
        raise ValueError(f"distill_weight must be >= 0 (0 is SimCSE), got {distill_weight!r}")
    for name, flag in (("distill_only", distill_only), ("return_terms", return_terms)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if distill_only and distill_weight == 0:
        raise ValueError("distill_only=True with distill_weight=0 leaves no loss to train on")
    return temperature, distill_weight


@_public_loss
def distillcse_loss(z1, z2, teachers, *, temperature=0.05, distill_weight=1.0, distill_only=False,
                    hard_negatives=None, student_temperature=0.025, teacher_temperature=0.0125,
                    group_p=0.1, group_size=None, grouping_temperature=1.0, shuffle="random",
                    teacher_weights=None, seed=None, backend="auto", return_terms=False, rows=None):
    """``L = L_cl + distill_weight * L_kd`` (``distill_only=True`` drops ``L_cl``, and with it
    the hard negatives, its extra columns, which are then checked and unused); the
    distillation term uses view 1 (``z1``) as the student, as the authors' code does.

    With ``return_terms=True``, ``(L, terms)``: ``terms["contrastive"]`` (L_cl, absent with
    ``distill_only``) and ``terms["distill"]`` (L_kd, unweighted), detached 0-dim tensors for
    logging (no host sync; every backend has them from the same pass).

    ``rows=(start, stop)``: the loss of those rows only, summed and divided by B (the terms too).
    """
    named, hard_negatives = _check_views(z1, z2, hard_negatives)
    shard = checks.check_rows(rows, z1.shape[0])
    temperature, distill_weight = _check_total_options(temperature, distill_weight, distill_only, return_terms)
    named_teachers = checks.check_teachers(teachers, z1)
    checks.check_finite(named + named_teachers)
    teachers = [e for _, e in named_teachers]
    options = _distill_options(student_temperature, teacher_temperature, group_p, group_size,
                               grouping_temperature, shuffle, teacher_weights, seed, len(teachers))
    backend = resolve_backend(backend, z1, shard)
    if backend == "triton" and not distill_only:  # one fused Function: z1's gradient written once
        from .triton_backend import distillcse
        student_temperature, weights, options = _fused_setup(options, z1)
        rows, unit_rows = _triton_teacher(teachers, weights)
        loss, terms = distillcse(z1, z2, hard_negatives, rows, 1.0 / temperature, distill_weight,
                                 student_temperature, options, shard, unit_rows=unit_rows)
        if not return_terms:
            return loss
        terms = dict(zip(("contrastive", "distill"), terms))
    else:
        if backend != "triton":  # the two terms' gradients of z1 summed in fp32, then cast once
            z1 = z1.to(_work_dtype(z1))
        kd = _distill(z1, teachers, options, backend, shard)
        terms = dict(distill=kd.detach())
        if distill_only:
            loss = distill_weight * kd
        else:
            cl = _contrastive(z1, z2, hard_negatives, temperature, backend, shard)
            loss = cl + distill_weight * kd
            terms = dict(contrastive=cl.detach(), **terms)
    return (loss, terms) if return_terms else loss


_KEYWORDS = {name: p.default for name, p in inspect.signature(distillcse_loss).parameters.items()
             if p.kind is p.KEYWORD_ONLY and name != "rows"}  # distillcse_loss's settings and their defaults


class DistillCSELoss(torch.nn.Module):
    """Module form of :func:`distillcse_loss`; keywords as there, checked at construction.

    ``loss = DistillCSELoss(group_p=0.1)(z1, z2, teachers, hard_negatives=None, rows=None)``
    """

    def __init__(self, **kwargs):
        super().__init__()
        for per_call in ("hard_negatives", "rows"):
            if per_call in kwargs:
                raise TypeError(f"pass {per_call} to forward(), not to DistillCSELoss()")
        known = set(_KEYWORDS)
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"DistillCSELoss got unknown keyword(s) {sorted(unknown)}; "
                            f"expected some of {sorted(known)}")
        self.given = dict(kwargs)  # as passed, for the repr
        seed = checks.check_seed(kwargs.get("seed"))
        if isinstance(seed, int):  # a reproducible sequence of fresh shuffles, one per call
            kwargs["seed"] = torch.Generator().manual_seed(seed)
        self.kwargs = kwargs
        checks.check_choice("backend", kwargs.get("backend", "auto"), checks.BACKENDS)
        _distill_options(*(kwargs.get(k, _KEYWORDS[k]) for k in (
            "student_temperature", "teacher_temperature", "group_p", "group_size",
            "grouping_temperature", "shuffle")), None, None, 1)
        if kwargs.get("teacher_weights") is not None:  # their count is checked against each call's teachers
            checks.check_teacher_weights(kwargs["teacher_weights"], None)
        _check_total_options(*(kwargs.get(k, _KEYWORDS[k]) for k in (
            "temperature", "distill_weight", "distill_only", "return_terms")))

    def forward(self, z1, z2, teachers, hard_negatives=None, rows=None):
        return distillcse_loss(z1, z2, teachers, hard_negatives=hard_negatives, rows=rows, **self.kwargs)

    def get_extra_state(self):
        """The shuffle generator's state (an int seed's), so that a checkpoint's ``state_dict``
        resumes the sequence of shuffles where it stopped."""
        seed = self.kwargs.get("seed")
        return {"seed_generator": seed.get_state()} if isinstance(seed, torch.Generator) else {}

    def set_extra_state(self, state):
        seed = self.kwargs.get("seed")
        if "seed_generator" in state:
            if not isinstance(seed, torch.Generator):
                raise ValueError("this state_dict holds a shuffle generator's state, but this DistillCSELoss "
                                 "has no generator seed (make it with seed=<int> or a torch.Generator)")
            seed.set_state(state["seed_generator"])

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.given.items())
