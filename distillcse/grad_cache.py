"""Gradient caching (GradCache: Gao, Zhang, Han, Callan 2021): a loss over a whole batch whose
encoder runs a mini-batch at a time, so that the batch size is bounded by the loss's memory
(O(B) on the triton backend) and not by the encoder's activations.

    def encode(sentences):                           # one mini-batch -> its embeddings
        tokens = tokenizer(sentences + sentences, ...)    # two dropout views
        return embed(student, tokens).chunk(2)            # (z1 [m, D], z2 [m, D])

    with torch.no_grad():
        t = torch.cat([embed(teacher, tokenizer(m, ...)) for m in mini_batches])
    loss = distillcse.cached_backward(encode, mini_batches, lambda z1, z2: criterion(z1, z2, t))
    optimizer.step()

Three passes: (1) ``encode`` on each mini-batch without autograd, the random-number state
before each one kept; (2) the loss on the concatenated embeddings, backward to them; (3)
``encode`` on each mini-batch again with autograd, from the same random-number state (the same
dropout), backward from that mini-batch's rows of the embeddings' gradient. The parameters get
the gradient that one backward through all the mini-batches' forwards would give, at the cost
of a second forward of the encoder.
"""
import contextlib
import warnings

import torch
import torch.distributed as dist

__all__ = ["cached_backward"]


def _rng_state():
    """The CPU generator's state and, once CUDA is in use, every CUDA device's."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _as_tuple(out, i, n_outputs=None, replay=False):
    """``encode``'s result for mini-batch ``i`` (on its replay) as a tuple of tensors with a row
    dimension, ``n_outputs`` of them if given."""
    outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if not outputs or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in outputs):
        raise TypeError(f"cached_backward: encode(mini_batches[{i}]) must return a tensor with a row "
                        f"dimension or a tuple of them, got {type(out).__name__}")
    if n_outputs is not None and len(outputs) != n_outputs:
        if replay:
            raise ValueError(f"cached_backward: encode(mini_batches[{i}]) returned {len(outputs)} tensors on its "
                             f"replay, {n_outputs} the first time; encode must be deterministic given the random state")
        raise ValueError(f"cached_backward: encode(mini_batches[{i}]) returned {len(outputs)} tensors, "
                         f"encode(mini_batches[0]) {n_outputs}")
    return outputs


def _encode_without_grad(encode, mini_batches):
    """Pass 1: ``encode`` on each mini-batch under ``no_grad``. Returns the embeddings (each
    output concatenated over the mini-batches, a leaf that requires grad), their row counts
    ``[output][mini-batch]`` and the random state before each mini-batch."""
    states, parts = [], []
    with torch.no_grad():
        for i, mini_batch in enumerate(mini_batches):
            states.append(_rng_state())
            parts.append(_as_tuple(encode(mini_batch), i, len(parts[0]) if parts else None))
    embeddings = [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]
    embeddings = [e.requires_grad_() if e.is_floating_point() else e for e in embeddings]   # not ids, counts
    rows = [[p[k].shape[0] for p in parts] for k in range(len(parts[0]))]
    return embeddings, rows, states


def _replay_backward(encode, mini_batches, states, grads, no_sync):
    """Pass 3: ``encode`` on each mini-batch again, with autograd, from its random state, and
    backward from ``grads[output][mini-batch]`` (None: an output without gradient). The random
    state afterwards is the one before, also where an error ends it (then ``.grad`` holds the
    mini-batches before it)."""
    after = _rng_state()
    try:
        _replay(encode, mini_batches, states, grads, no_sync)
    finally:
        _set_rng_state(after)


def _replay(encode, mini_batches, states, grads, no_sync):
    for i, mini_batch in enumerate(mini_batches):
        _set_rng_state(states[i])
        with contextlib.ExitStack() as held:
            if i < len(mini_batches) - 1:
                for m in no_sync:
                    held.enter_context(m.no_sync())
            outputs = _as_tuple(encode(mini_batch), i, len(grads), replay=True)
            for k, (out, g) in enumerate(zip(outputs, grads)):
                if g is not None and out.shape != g[i].shape:
                    raise RuntimeError(f"cached_backward: encode(mini_batches[{i}]) output {k} is "
                                       f"{tuple(out.shape)} on its replay, {tuple(g[i].shape)} the "
                                       "first time; encode must be deterministic given the random state")
            pairs = [(out, g[i]) for out, g in zip(outputs, grads) if g is not None and out.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def cached_backward(encode, mini_batches, loss_fn, *, scale=None, no_sync=()):
    """One training step's backward with the encoder run mini-batch by mini-batch.

    Args:
        encode: ``encode(mini_batch)`` -> a tensor ``[m, ...]`` or a tuple of them (e.g. the two
            dropout views ``(z1, z2)``); it runs twice per mini-batch, under the caller's
            autocast and with the same random numbers both times (once where there is one
            mini-batch: then this is ``loss_fn(*encode(mini_batch))`` and its backward).
        mini_batches: a sequence (or iterable) of the inputs ``encode`` takes.
        loss_fn: ``loss_fn(*embeddings)`` -> the scalar loss, or a tuple whose first element is
            it (e.g. ``distillcse_loss(..., return_terms=True)``); each of ``embeddings`` is the
            row-wise concatenation of that output over the mini-batches.
        scale: applied to the loss before its backward, e.g. ``GradScaler.scale`` for float16.
        no_sync: the ``DistributedDataParallel`` modules inside ``encode``: their gradient
            all-reduce waits for the last mini-batch's backward. Needed under DDP: without it
            each mini-batch's backward all-reduces, and ranks with different numbers of
            mini-batches then pair up different collectives (wrong gradients, or a hang).

    Returns ``loss_fn``'s result with the loss detached. Parameter gradients are accumulated
    into ``.grad`` as ``loss.backward()`` would; the random-number state afterwards is the one
    after the first pass's forwards and the loss (the replay leaves no trace). An error in the
    replay leaves ``.grad`` with the mini-batches before it: zero it before a retry. The encoder
    runs twice, so running statistics (BatchNorm's) are updated twice a mini-batch.
    """
    if not callable(encode) or not callable(loss_fn):
        raise TypeError("cached_backward: encode and loss_fn must be callables")
    mini_batches = list(mini_batches)
    if not mini_batches:
        raise ValueError("cached_backward: mini_batches is empty; expected at least one mini-batch")
    no_sync = tuple(no_sync)                                     # read once: checked here, held in the replay
    for m in no_sync:
        if not hasattr(m, "no_sync"):
            raise TypeError(f"cached_backward: no_sync expects DistributedDataParallel modules, got "
                            f"{type(m).__name__}")
    if not torch.is_grad_enabled():
        raise RuntimeError("cached_backward: called with gradients disabled (torch.no_grad or "
                           "inference_mode); it runs the step's backward")
    if len(mini_batches) > 1 and not no_sync and dist.is_available() and dist.is_initialized():
        warnings.warn("cached_backward under torch.distributed without no_sync: if encode holds a "
                      "DistributedDataParallel module, pass it as no_sync=[module] (each mini-batch's "
                      "backward all-reduces otherwise: wrong gradients or a hang)", stacklevel=2)

    if len(mini_batches) == 1:                                   # nothing to cache: one forward, with autograd
        embeddings = _as_tuple(encode(mini_batches[0]), 0)
    else:
        embeddings, rows, states = _encode_without_grad(encode, mini_batches)
    result = loss_fn(*embeddings)
    loss = result[0] if isinstance(result, tuple) else result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("cached_backward: loss_fn must return a scalar tensor (or a tuple that starts with one)")
    if not loss.requires_grad:
        raise ValueError("cached_backward: the loss does not depend on the embeddings (nothing to differentiate)")
    (scale(loss) if scale is not None else loss).backward()          # pass 2
    if len(mini_batches) > 1:
        grads = [e.grad.split(r) if e.grad is not None else None for e, r in zip(embeddings, rows)]
        del embeddings
        _replay_backward(encode, mini_batches, states, grads, no_sync)   # pass 3
    loss = loss.detach()
    return (loss,) + tuple(result[1:]) if isinstance(result, tuple) else loss
