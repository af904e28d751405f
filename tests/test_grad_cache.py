"""``distillcse.cached_backward`` (gradient caching): the parameters' gradients equal those of one
backward through every mini-batch's forward, dropout included; input errors."""
import contextlib
import warnings

import pytest
import torch

import distillcse
from distillcse import cached_backward


class Encoder(torch.nn.Module):
    """A small float64 encoder with dropout: [n, 8] -> two dropout views [n, 6]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3),
                                       torch.nn.Linear(16, 6)).double()

    def forward(self, x):
        return self.net(torch.cat([x, x])).chunk(2)


def _setup(rows=13):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 8, generator=g, dtype=torch.float64)
    teacher = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    return Encoder(), x, teacher


def _loss(teacher):
    """The loss, its shuffle drawn from the global generator (seed=None), after the forwards."""
    return lambda z1, z2: distillcse.distillcse_loss(z1, z2, teacher, seed=None, group_p=0.3, backend="reference")


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("sizes", [(5, 5, 3), (13,), (1, 12)])   # (13,): one mini-batch, no replay
def test_gradients_are_those_of_one_backward_through_every_mini_batch(sizes):
    model, x, teacher = _setup()
    minis = list(x.split(sizes))

    torch.manual_seed(7)
    direct_z = [model(m) for m in minis]                       # the same dropout draws, in order
    z1, z2 = torch.cat([z[0] for z in direct_z]), torch.cat([z[1] for z in direct_z])
    direct = _loss(teacher)(z1, z2)
    direct.backward()
    expected, next_draw = _grads(model), torch.rand(4)
    model.zero_grad()

    torch.manual_seed(7)
    loss = cached_backward(model, minis, _loss(teacher))
    assert not loss.requires_grad
    torch.testing.assert_close(loss, direct.detach(), rtol=1e-12, atol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-14, msg=name)
    torch.testing.assert_close(torch.rand(4), next_draw, rtol=0, atol=0)   # the replay leaves no trace


def test_outputs_may_differ_in_rows():
    """Each output is concatenated and split by its own row counts: here hard negatives, two per
    mini-batch row, beside the two views."""
    model, x, _ = _setup()
    minis = list(x.split(5))

    def encode(m):
        z1, z2 = model(m)
        return z1, z2, model.net(torch.cat([m.flip(1), m.roll(1, 1)]))

    def loss_fn(z1, z2, negatives):
        return distillcse.contrastive_loss(z1, z2, hard_negatives=negatives, backend="reference")

    torch.manual_seed(2)
    direct = [encode(m) for m in minis]
    loss_fn(*(torch.cat([d[k] for d in direct]) for k in range(3))).backward()
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(2)
    cached_backward(encode, minis, loss_fn)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-14, msg=name)


def test_dropout_makes_the_replay_matter():
    """Guards the test above: with dropout active, two forwards from different random states give
    different embeddings, so a replay from the wrong state would give other gradients."""
    model, x, _ = _setup()
    torch.manual_seed(7)
    first = model(x)[0]
    assert not torch.equal(first, model(x)[0])


def test_tuple_results_scale_and_unused_outputs():
    model, x, teacher = _setup()
    minis = list(x.split(4))

    def contrastive_only(z1, z2):
        terms = {"z1 rows": z1.shape[0]}
        return distillcse.contrastive_loss(z1, z1.detach().flip(0), backend="reference"), terms

    torch.manual_seed(0)
    loss, terms = cached_backward(model, minis, contrastive_only)   # z2 gets no gradient
    assert terms == {"z1 rows": 13} and not loss.requires_grad
    once = _grads(model)
    model.zero_grad()
    torch.manual_seed(0)
    cached_backward(model, minis, contrastive_only, scale=lambda l: 4 * l)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, 4 * once[name], rtol=1e-12, atol=0, msg=name)


@pytest.mark.parametrize("sizes,forwards", [((13,), 1), ((5, 5, 3), 6)])
def test_the_encoder_runs_twice_per_mini_batch_once_without_caching(sizes, forwards):
    model, x, teacher = _setup()
    calls = []

    def encode(m):
        calls.append(m.shape[0])
        return model(m)
    cached_backward(encode, list(x.split(sizes)), _loss(teacher))
    assert len(calls) == forwards and all(p.grad is not None for p in model.parameters())


def test_no_sync_holds_every_mini_batch_but_the_last():
    model, x, teacher = _setup()
    held = []

    class FakeDDP:
        @contextlib.contextmanager
        def no_sync(self):
            held.append(True)
            yield

    cached_backward(model, list(x.split(4)), _loss(teacher), no_sync=[FakeDDP()])
    assert len(held) == 3                                       # 4 mini-batches: the last syncs


def test_no_sync_holds_every_module_for_every_backward_but_the_last():
    """Every DDP module's no_sync holds the replay's backward of each mini-batch but the last, and
    the one it does not hold runs last (its all-reduce carries every mini-batch's gradient):
    mini-batches of distinct sizes, in order, as each one's backward sees the modules held."""
    model, x, teacher = _setup()
    held, seen = {"a": 0, "b": 0}, []

    class FakeDDP:
        def __init__(self, name):
            self.name = name

        @contextlib.contextmanager
        def no_sync(self):
            held[self.name] += 1
            try:
                yield
            finally:
                held[self.name] -= 1

    def encode(m):
        z1, z2 = model(m)
        if z1.requires_grad:                                    # the replay's forward: see its backward
            z1.register_hook(lambda g: seen.append((g.shape[0], dict(held))))
        return z1, z2
    cached_backward(encode, list(x.split((5, 4, 3, 1))), _loss(teacher), no_sync=[FakeDDP("a"), FakeDDP("b")])
    both, neither = {"a": 1, "b": 1}, {"a": 0, "b": 0}
    assert seen == [(5, both), (4, both), (3, both), (1, neither)]


def test_no_sync_may_be_any_iterable_of_modules():
    """no_sync read once (a generator, as mini_batches may be): its modules still hold every
    replay backward but the last (the input check consumed it, and the replay held nothing)."""
    model, x, teacher = _setup()
    held, seen = [0], []

    class FakeDDP:
        @contextlib.contextmanager
        def no_sync(self):
            held[0] += 1
            try:
                yield
            finally:
                held[0] -= 1

    def encode(m):
        z1, z2 = model(m)
        if z1.requires_grad:                                    # the replay's forward: see its backward
            z1.register_hook(lambda g: seen.append(held[0]))
        return z1, z2
    cached_backward(encode, x.split(5), _loss(teacher), no_sync=(m for m in [FakeDDP()]))
    assert seen == [1, 1, 0]


def test_outputs_without_a_gradient_path_on_the_replay_are_skipped():
    """An output the loss differentiates that does not depend on the trained parameters (hard
    negatives from a frozen encoder inside encode) gets a gradient in the loss's backward, and the
    replay has nothing to pass it to: the gradients are those of one backward."""
    model, x, _ = _setup()
    frozen = torch.nn.Linear(8, 6).double().requires_grad_(False)

    def encode(m):
        z1, z2 = model(m)
        return z1, z2, frozen(m)

    def loss_fn(z1, z2, negatives):
        return distillcse.contrastive_loss(z1, z2, hard_negatives=negatives, backend="reference")

    torch.manual_seed(3)
    direct = [encode(m) for m in x.split(5)]
    loss_fn(*(torch.cat([d[k] for d in direct]) for k in range(3))).backward()
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(3)
    cached_backward(encode, x.split(5), loss_fn)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("sizes", [(13,), (7, 6)])
def test_outputs_without_a_row_dimension_are_refused(sizes):
    """A 0-dim output (a loss computed inside encode, say) is refused by name, with one mini-batch
    as with several."""
    model, x, teacher = _setup()
    with pytest.raises(TypeError, match=r"encode\(mini_batches\[0\]\) must return a tensor with a row dimension"):
        cached_backward(lambda m: tuple(z.sum() for z in model(m)), x.split(sizes), _loss(teacher))


def test_errors():
    model, x, teacher = _setup()
    loss = _loss(teacher)
    with pytest.raises(ValueError, match="mini_batches is empty"):
        cached_backward(model, [], loss)
    with pytest.raises(TypeError, match="callables"):
        cached_backward(model, [x], "loss")
    with pytest.raises(TypeError, match=r"encode\(mini_batches\[0\]\) must return a tensor"):
        cached_backward(lambda m: "text", [x], loss)
    with pytest.raises(ValueError, match=r"mini_batches\[2\]\) returned 1 tensors"):
        cached_backward(lambda m: model(m) if m.shape[0] > 5 else model(m)[0], x.split(6), loss)
    with pytest.raises(TypeError, match="scalar tensor"):
        cached_backward(model, [x], lambda z1, z2: z1)
    with pytest.raises(TypeError, match=r"scalar tensor \(or a tuple that starts with one\)"):
        cached_backward(model, [x], lambda z1, z2: [loss(z1, z2), {}])   # a list is not a tuple of results
    with pytest.raises(ValueError, match="does not depend on the embeddings"):
        cached_backward(model, [x], lambda z1, z2: torch.zeros(()))
    with pytest.raises(TypeError, match="no_sync expects DistributedDataParallel"):
        cached_backward(model, [x], loss, no_sync=[model])
    with torch.no_grad(), pytest.raises(RuntimeError, match="called with gradients disabled"):
        cached_backward(model, [x], loss)
    calls = []

    def shifting(m):                                            # a different row count on its replay
        calls.append(1)
        return model(m if len(calls) <= 2 else m[1:])
    with pytest.raises(RuntimeError, match=r"mini_batches\[0\]\) output 0 is \(6, 6\) on its replay"):
        cached_backward(shifting, x.split(7), loss)


def test_malformed_outputs_are_refused_by_name():
    """An empty tuple, or a tuple or list with one output that is not a tensor with a row dimension
    beside tensors that are (every output is checked, not just one), is refused by name."""
    model, x, teacher = _setup()
    message = r"encode\(mini_batches\[0\]\) must return a tensor with a row dimension"
    for encode in (lambda m: (), lambda m: (model(m)[0], model(m)[1].sum()), lambda m: [*model(m), "text"]):
        for sizes in ((13,), (7, 6)):
            with pytest.raises(TypeError, match=message):
                cached_backward(encode, x.split(sizes), _loss(teacher))


def test_a_replay_that_differs_from_the_first_pass_is_named():
    """encode must be deterministic given the random state: a replay that returns fewer outputs
    (its gradients would be dropped silently) or other trailing shapes than the first pass (7 + 6
    rows: [7, 6] then [7, 5]) is refused by cached_backward, not by autograd's shape check."""
    model, x, teacher = _setup()

    def fewer(m):                                               # the replay runs with autograd on
        return model(m)[:1] if torch.is_grad_enabled() else model(m)

    def narrower(m):
        z1, z2 = model(m)
        return (z1[:, :5], z2) if torch.is_grad_enabled() else (z1, z2)
    with pytest.raises(ValueError, match=r"encode\(mini_batches\[0\]\) returned 1 tensors on its replay, 2 the first"):
        cached_backward(fewer, x.split(7), _loss(teacher))
    model.zero_grad()
    with pytest.raises(RuntimeError, match=r"mini_batches\[0\]\) output 0 is \(7, 5\) on its replay, \(7, 6\) the first"):
        cached_backward(narrower, x.split(7), _loss(teacher))


def test_a_list_of_outputs_an_iterator_of_mini_batches_and_a_one_element_loss():
    """encode may return a list, mini_batches may be any iterable (here a generator, read once),
    and the loss may be any one-element tensor (here [1]): the step is the one with a tuple, a
    list and a 0-dim loss, bit for bit."""
    model, x, teacher = _setup()
    torch.manual_seed(4)
    want = cached_backward(model, list(x.split(5)), _loss(teacher))
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(4)
    loss = cached_backward(lambda m: list(model(m)), (m for m in x.split(5)),
                           lambda z1, z2: _loss(teacher)(z1, z2).reshape(1))
    assert loss.shape == (1,) and not loss.requires_grad
    torch.testing.assert_close(loss[0], want, rtol=0, atol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0, msg=name)


def test_an_error_in_the_replay_leaves_the_random_state_as_after_the_loss():
    """A failure in the replay's last mini-batch (an out-of-memory error, say) leaves the random
    state where the step left it, as a finished replay does (it was left at that mini-batch's
    saved state: the next step redrew its dropout masks)."""
    model, x, teacher = _setup()
    calls = []

    def failing_on_its_last_replay(m):
        calls.append(1)
        if len(calls) == 6:                                     # 3 forwards, then the replay's third
            raise RuntimeError("out of memory")
        return model(m)

    torch.manual_seed(0)
    cached_backward(model, x.split(5), _loss(teacher))
    want = torch.get_rng_state()
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="out of memory"):
        cached_backward(failing_on_its_last_replay, x.split(5), _loss(teacher))
    assert torch.equal(torch.get_rng_state(), want)


def test_outputs_that_are_not_floats_pass_through():
    """An encoder that also returns integer rows (token counts) works with several mini-batches
    (concatenating them asked an int64 tensor to require grad)."""
    model, x, teacher = _setup()

    def with_counts(m):
        z1, z2 = model(m)
        return z1, z2, torch.full((m.shape[0],), 7)

    def loss(z1, z2, counts):
        assert counts.dtype == torch.int64 and counts.shape == (13,)
        return _loss(teacher)(z1, z2)

    torch.manual_seed(0)
    cached_backward(with_counts, x.split(5), loss)
    cached = _grads(model)
    model.zero_grad()
    torch.manual_seed(0)
    cached_backward(model, x.split(5), _loss(teacher))
    for name, grad in _grads(model).items():
        torch.testing.assert_close(cached[name], grad, rtol=0, atol=0, msg=name)


def test_without_a_process_group_several_mini_batches_do_not_warn():
    """The no_sync warning below is for torch.distributed only: one process with several
    mini-batches and no no_sync (the usual single-GPU call) runs silently."""
    model, x, teacher = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_backward(model, x.split(5), _loss(teacher))


def test_several_mini_batches_under_torch_distributed_without_no_sync_warn(tmp_path):
    """Under a process group, several mini-batches without no_sync warn: a DDP encoder would
    all-reduce after each one, and ranks with different counts would pair up wrong collectives."""
    import torch.distributed as dist
    model, x, teacher = _setup()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.warns(UserWarning, match=r"pass it as no_sync=\[module\]") as record:
            cached_backward(model, x.split(5), _loss(teacher))
        assert record[0].filename == __file__                  # attributed to the caller's line
    finally:
        dist.destroy_process_group()


def test_under_torch_distributed_one_mini_batch_or_no_sync_do_not_warn(tmp_path):
    """The warning above is for several mini-batches without no_sync only: one mini-batch (one
    backward) and several with no_sync given run silently."""
    import torch.distributed as dist
    model, x, teacher = _setup()

    class FakeDDP:
        no_sync = contextlib.nullcontext

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cached_backward(model, [x], _loss(teacher))
            cached_backward(model, x.split(5), _loss(teacher), no_sync=[FakeDDP()])
    finally:
        dist.destroy_process_group()
