"""``distillcse.all_gather`` over a real 2-process gloo group on the CPU: the global loss and
each rank's gradients equal one process's loss on the whole batch (gradients summed over the
ranks, as DistributedDataParallel expects)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distillcse

WORLD = 2
SHARDS = (slice(0, 7), slice(7, 11))        # unequal local batches: 7 and 4 rows
B, D, DT = 11, 24, 16


def _batch():
    g = torch.Generator().manual_seed(5)
    z1, z2, hn = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    teachers = [torch.randn(B, DT, generator=g, dtype=torch.float64),
                torch.randn(B, 8, generator=g, dtype=torch.float64)]
    return z1, z2, hn, teachers


def _loss(z1, z2, hn, teachers, backend):
    return distillcse.distillcse_loss(z1, z2, teachers, hard_negatives=hn, group_size=3,
                                      shuffle="random", seed=11, backend=backend)


def _worker(rank, init_file, backend, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z1, z2, hn, teachers = _batch()
        local = [t[SHARDS[rank]].clone().requires_grad_(True) for t in (z1, z2, hn)]
        gathered = distillcse.all_gather(*local, *[t[SHARDS[rank]] for t in teachers])
        loss = _loss(*gathered[:3], list(gathered[3:]), backend)
        loss.backward()
        results[rank] = (loss.detach(), [t.grad for t in local], type(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gathered_loss_and_gradients_match_one_process(tmp_path, backend):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "init"), backend, results), nprocs=WORLD, join=True)

    z1, z2, hn, teachers = (t.requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in _batch())
    loss = _loss(z1, z2, hn, teachers, backend)
    loss.backward()
    for rank in range(WORLD):
        rank_loss, grads, gathered_type = results[rank]
        assert gathered_type is tuple                              # as without a process group
        torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-12, atol=0)
        for name, grad, full in zip(("z1", "z2", "hard_negatives"), grads, (z1, z2, hn)):
            torch.testing.assert_close(grad, WORLD * full.grad[SHARDS[rank]], rtol=1e-10, atol=1e-14,
                                       msg=f"rank {rank} grad {name}")


def test_all_gather_without_a_process_group_is_the_identity():
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    assert distillcse.all_gather(x) is x
    assert distillcse.all_gather(x, y) == (x, y)


@pytest.mark.parametrize("args,error,message", [
    ((), TypeError, "at least one tensor"),
    (([1.0, 2.0],), TypeError, "argument 0 must be a tensor"),
    ((torch.tensor(1.0),), TypeError, "0 dims"),
    ((torch.randn(3, 4), torch.randn(2, 4)), ValueError, "argument 1 has 2 rows"),
])
def test_all_gather_errors(args, error, message):
    with pytest.raises(error, match=message):
        distillcse.all_gather(*args)



def _shared_gradient_worker(rank, init_file, results):
    """(i) the mean of two gathered tensors, whose backward hands both gathers one gradient tensor;
    (ii) a width that differs between the ranks; (iii) one rank's tensors with different row counts;
    (iv) 1-D tensors (a count or a key per row)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(3)
        a, b, w = (torch.randn(B, 4, generator=g, dtype=torch.float64) for _ in range(3))
        a, b = (x[SHARDS[rank]].clone().requires_grad_(True) for x in (a, b))
        ((w * (distillcse.all_gather(a) + distillcse.all_gather(b)) / 2).sum()).backward()
        width = 4 if rank == 0 else 5
        try:
            distillcse.all_gather(torch.zeros(3, width))
            mismatch = None
        except ValueError as err:
            mismatch = str(err)
        try:
            distillcse.all_gather(torch.zeros(3, 4), torch.zeros(2, 4))    # [3, 4] and [2, 4] on each rank
            rows = None
        except ValueError as err:
            rows = str(err)
        counts = distillcse.all_gather(torch.arange(SHARDS[rank].start, SHARDS[rank].stop))   # [n_r] -> [B]
        results[rank] = (a.grad, b.grad, mismatch, rows, counts)
    finally:
        dist.destroy_process_group()


def test_all_gather_backward_and_mismatched_ranks(tmp_path):
    """Each gather's gradient is its own: the mean of two gathered tensors gives each rank W x the
    one-process gradient (the all-reduce ran in place on the tensor autograd handed to both, so
    they got W^2). Ranks passing different widths get an error naming both (gloo aborted the
    processes; other mismatches were reinterpreted as bytes). Under a process group too, one rank's
    tensors must have one row count (a shorter one was padded with zeros); 1-D tensors gather."""
    results = mp.Manager().dict()
    mp.spawn(_shared_gradient_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    g = torch.Generator().manual_seed(3)
    _, _, w = (torch.randn(B, 4, generator=g, dtype=torch.float64) for _ in range(3))
    for rank in range(WORLD):
        a_grad, b_grad, mismatch, rows, counts = results[rank]
        torch.testing.assert_close(a_grad, WORLD * w[SHARDS[rank]] / 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(b_grad, WORLD * w[SHARDS[rank]] / 2, rtol=1e-12, atol=0)
        assert mismatch is not None and "rank 0: [n, 4] float32; rank 1: [n, 5] float32" in mismatch
        assert rows is not None and "all_gather: argument 1 has 2 rows, argument 0 has 3" in rows, rows
        assert torch.equal(counts, torch.arange(B))


def _kinds_and_subgroup_worker(rank, init_file, results):
    """(i) ranks that differ only in dtype, then only in requires_grad; (ii) on rank 1, a group
    of rank 1 alone, where it is rank 0."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mismatches = []
        for x in (torch.zeros(3, 4, dtype=torch.float64 if rank else torch.float32),
                  torch.zeros(3, 4, requires_grad=rank == 0)):
            try:
                distillcse.all_gather(x)
                mismatches.append(None)
            except ValueError as err:
                mismatches.append(str(err))
        alone = dist.new_group([1])
        if rank == 1:
            g = torch.Generator().manual_seed(3)
            x, w, z2, t = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
            x.requires_grad_(True)
            (w * distillcse.all_gather(x, group=alone)).sum().backward()
            gathered_grad, x.grad = x.grad, None
            loss = distillcse.sharded_loss(x, z2, t, group=alone, backend="torch", shuffle="expected")
            loss.backward()
            results["alone"] = (gathered_grad, loss.detach(), x.grad)
        results[rank] = mismatches
    finally:
        dist.destroy_process_group()


def test_ranks_that_differ_in_dtype_or_requires_grad_and_a_group_that_is_not_the_world(tmp_path):
    """Ranks passing different dtypes, or one requiring grad and one not (its backward's all-reduce
    would wait for the other forever), get an error naming both. In a group whose ranks are not
    the global ones (rank 1 alone, rank 0 in it), all_gather's backward hands the rank its own
    rows' gradient and sharded_loss is the loss on its rows: the group's rank is used, not the
    global one."""
    results = mp.Manager().dict()
    mp.spawn(_kinds_and_subgroup_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        dtypes, grads = results[rank]
        assert dtypes is not None and "rank 0: [n, 4] float32; rank 1: [n, 4] float64" in dtypes, dtypes
        assert grads is not None and "rank 0: [n, 4] float32 requiring grad; rank 1: [n, 4] float32" in grads, grads
    gathered_grad, loss, grad = results["alone"]
    g = torch.Generator().manual_seed(3)
    x, w, z2, t = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4))
    torch.testing.assert_close(gathered_grad, w, rtol=0, atol=0)
    x.requires_grad_(True)
    expected = distillcse.distillcse_loss(x, z2, t, backend="torch", shuffle="expected")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, x.grad, rtol=1e-10, atol=1e-14)


HN_SHARDS = (slice(0, 3), slice(3, 5))      # unequal local hard negatives: 3 and 2 rows (of _batch's 11)
SHARD_KEYWORDS = dict(group_size=3, shuffle="random", seed=11, distill_weight=0.7)
# the triton backend's shards in fp32 on CPU under the interpreter (the ranks' gloo group holds CPU tensors)
SHARD_BACKENDS = ("reference", "torch") + (("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ())


def _sharded_worker(rank, init_file, results):
    """``sharded_loss`` on each rank's rows: per backend, the loss, its terms and the local
    gradients; then a batch whose second rank holds no rows; then ranks that disagree on the
    hard negatives."""
    # mismatched collectives fail instead of hanging; 300 s leaves room for a rank that compiles
    # kernels (a GPU run's first launches) while the other, holding no rows, waits
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    try:
        z1, z2, hn, teachers = _batch()
        for backend in SHARD_BACKENDS:
            dtype = torch.float32 if backend == "triton" else torch.float64
            local = [t[s].to(dtype).requires_grad_(True) for t, s in
                     ((z1, SHARDS[rank]), (z2, SHARDS[rank]), (hn, HN_SHARDS[rank]))]
            loss, terms = distillcse.sharded_loss(*local[:2], [t[SHARDS[rank]].to(dtype) for t in teachers],
                                                  hard_negatives=local[2], backend=backend, return_terms=True,
                                                  **SHARD_KEYWORDS)
            loss.backward()
            results[rank, backend] = (loss.detach(), terms, [t.grad for t in local])
        whole = slice(0, B) if rank == 0 else slice(B, B)
        for backend in SHARD_BACKENDS[1:]:
            dtype = torch.float32 if backend == "triton" else torch.float64
            local = [t[whole].to(dtype).requires_grad_(True) for t in (z1, z2)]
            loss = distillcse.sharded_loss(*local, [t[whole].to(dtype) for t in teachers], backend=backend,
                                           **SHARD_KEYWORDS)
            loss.backward()
            results[rank, "empty", backend] = (loss.detach(), [t.grad for t in local])
        try:
            distillcse.sharded_loss(z1[SHARDS[rank]], z2[SHARDS[rank]], teachers[0][SHARDS[rank]],
                                    hard_negatives=hn[:2] if rank == 0 else None, backend="torch")
            results[rank, "mismatch"] = None
        except ValueError as err:
            results[rank, "mismatch"] = str(err)
    finally:
        dist.destroy_process_group()


def test_sharded_loss_matches_one_process(tmp_path):
    """Each rank computes its own rows' share of the loss (unequal shares: 7 and 4 rows of z1, 3
    and 2 hard negatives); every rank gets the whole batch's loss and terms, and its rows get the
    gradient all_gather's path gives them (W x the one-process gradient). A rank without rows
    takes part (loss and gradients of the other rank's batch); ranks that disagree on passing hard
    negatives get an error on every rank, not a hang. The triton backend's shards (fp32, under the
    interpreter) against one float64 process on the torch backend, which draws the same shuffle."""
    results = mp.Manager().dict()
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    assert "triton" in SHARD_BACKENDS or torch.cuda.is_available()
    for backend in SHARD_BACKENDS:
        z1, z2, hn, teachers = _batch()
        z1, z2, hn = (t.requires_grad_(True) for t in (z1, z2, hn[:HN_SHARDS[-1].stop]))
        loss, terms = distillcse.distillcse_loss(z1, z2, teachers, hard_negatives=hn, return_terms=True,
                                                 backend="torch" if backend == "triton" else backend, **SHARD_KEYWORDS)
        loss.backward()
        rtol, atol = (2e-5, 1e-7) if backend == "triton" else (1e-12, 0)
        for rank in range(WORLD):
            rank_loss, rank_terms, grads = results[rank, backend]
            torch.testing.assert_close(rank_loss.double(), loss.detach(), rtol=rtol, atol=atol,
                                       msg=f"{backend}: rank {rank} loss")
            for name in ("contrastive", "distill"):
                torch.testing.assert_close(rank_terms[name].double(), terms[name], rtol=rtol, atol=atol)
            for name, grad, full, shards in (("z1", grads[0], z1, SHARDS), ("z2", grads[1], z2, SHARDS),
                                             ("hard_negatives", grads[2], hn, HN_SHARDS)):
                torch.testing.assert_close(grad.double(), WORLD * full.grad[shards[rank]],
                                           rtol=1e-10 if backend != "triton" else 1e-4,
                                           atol=1e-14 if backend != "triton" else 1e-6,
                                           msg=f"{backend}: rank {rank} grad {name}")
    z1, z2, _, teachers = (t.requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in _batch())
    loss = distillcse.distillcse_loss(z1, z2, teachers, backend="torch", **SHARD_KEYWORDS)
    loss.backward()
    for rank in range(WORLD):
        for backend in SHARD_BACKENDS[1:]:
            rank_loss, grads = results[rank, "empty", backend]
            exact = backend != "triton"
            torch.testing.assert_close(rank_loss.double(), loss.detach(), rtol=1e-12 if exact else 2e-5, atol=0)
            expected = (WORLD * z1.grad, WORLD * z2.grad) if rank == 0 else (z1.grad[:0], z2.grad[:0])
            for grad, want in zip(grads, expected):
                torch.testing.assert_close(grad.double(), want, rtol=1e-10 if exact else 1e-4,
                                           atol=1e-14 if exact else 1e-6, msg=f"{backend}: rank {rank}")
        mismatch = results[rank, "mismatch"]
        assert mismatch is not None and "rank 0: " in mismatch and ", hard negatives;" in mismatch \
            and ", no hard negatives" in mismatch, mismatch


def test_sharded_loss_without_a_process_group_is_the_loss():
    z1, z2, t = torch.randn(9, 8), torch.randn(9, 8), torch.randn(9, 5)
    kwargs = dict(shuffle="expected", backend="torch")
    assert torch.equal(distillcse.sharded_loss(z1, z2, t, **kwargs), distillcse.distillcse_loss(z1, z2, t, **kwargs))
    with pytest.raises(TypeError, match="rows= is not an option"):
        distillcse.sharded_loss(z1, z2, t, rows=(0, 4))


def test_sharded_loss_without_a_process_group_passes_hard_negatives_and_terms_on():
    """Without a process group sharded_loss is distillcse_loss with every keyword, hard negatives
    and return_terms included."""
    g = torch.Generator().manual_seed(2)
    z1, z2, hn, t = (torch.randn(9, 8, generator=g) for _ in range(4))
    kwargs = dict(hard_negatives=hn[:4], return_terms=True, shuffle="expected", backend="torch")
    loss, terms = distillcse.sharded_loss(z1, z2, [t], **kwargs)
    want_loss, want_terms = distillcse.distillcse_loss(z1, z2, [t], **kwargs)
    assert torch.equal(loss, want_loss) and terms.keys() == want_terms.keys()
    assert all(torch.equal(terms[k], want_terms[k]) for k in terms)


def test_sharded_loss_takes_teachers_as_a_tensor_a_list_or_a_tuple():
    """Teachers as distillcse_loss takes them: one tensor, a list or a tuple (here without a
    process group)."""
    g = torch.Generator().manual_seed(4)
    z1, z2, t1, t2 = (torch.randn(9, 8, generator=g) for _ in range(4))
    kwargs = dict(shuffle="expected", backend="torch")
    assert torch.equal(distillcse.sharded_loss(z1, z2, (t1, t2), **kwargs),
                       distillcse.distillcse_loss(z1, z2, [t1, t2], **kwargs))
    assert torch.equal(distillcse.sharded_loss(z1, z2, t1, **kwargs), distillcse.distillcse_loss(z1, z2, [t1], **kwargs))


THREE_SHARDS = (slice(0, 2), slice(2, 7), slice(7, 11))   # 3 ranks, the first the smallest: 2, 5 and 4 rows


class _Stop(Exception):
    pass


def _three_ranks_worker(rank, init_file, results):
    """On 3 ranks of unequal sizes: all_gather's backward (each rank's own rows of the summed
    gradient), sharded_loss's loss and gradients (torch backend), then the backend sharded_loss
    hands distillcse_loss for "triton" and "auto" (recorded, the loss not computed)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=300))
    try:
        z1, z2, _, teachers = _batch()
        g = torch.Generator().manual_seed(3)
        w = torch.randn(B, D, generator=g, dtype=torch.float64)
        a = z1[THREE_SHARDS[rank]].clone().requires_grad_(True)
        (w * distillcse.all_gather(a)).sum().backward()
        local = [t[THREE_SHARDS[rank]].clone().requires_grad_(True) for t in (z1, z2)]
        loss = distillcse.sharded_loss(*local, [t[THREE_SHARDS[rank]] for t in teachers], backend="torch",
                                       **SHARD_KEYWORDS)
        loss.backward()
        from distillcse import distributed
        backends, real = [], distributed.distillcse_loss

        def recording(*args, **kwargs):
            backends.append(kwargs.get("backend", "auto"))
            raise _Stop
        distributed.distillcse_loss = recording
        try:
            for backend in ("triton", "auto"):
                try:
                    distillcse.sharded_loss(*local, [t[THREE_SHARDS[rank]] for t in teachers], backend=backend)
                except _Stop:
                    pass
        finally:
            distributed.distillcse_loss = real
        pair = dist.new_group([1, 2])                              # a group that is not the world: rank 0 stays out
        mismatch = None
        if rank > 0:
            try:
                distillcse.all_gather(torch.zeros(2, 3 + rank), group=pair)
            except ValueError as err:
                mismatch = str(err)
        results[rank] = (a.grad, loss.detach(), [t.grad for t in local], backends, mismatch)
    finally:
        dist.destroy_process_group()


def test_three_ranks_of_unequal_sizes(tmp_path):
    """Three ranks whose first holds the fewest rows (2, 5, 4): a rank's rows start after the sum
    of the ranks before it and span its own count (two ranks, or a first rank with the most rows,
    cannot tell that from rank x the first rank's count, or from the first rank's count as the
    span). sharded_loss keeps backend="triton" and takes "torch" for "auto" on several ranks. Ranks 1
    and 2 in a group of their own, passing different widths, exchange the details in that group
    (in the world's, which rank 0 never joins, they failed or waited)."""
    results = mp.Manager().dict()
    mp.spawn(_three_ranks_worker, args=(str(tmp_path / "init"), results), nprocs=3, join=True)
    z1, z2, _, teachers = _batch()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(B, D, generator=g, dtype=torch.float64)
    z1, z2 = z1.requires_grad_(True), z2.requires_grad_(True)
    loss = distillcse.distillcse_loss(z1, z2, teachers, backend="torch", **SHARD_KEYWORDS)
    loss.backward()
    for rank in range(3):
        gathered_grad, rank_loss, grads, backends, mismatch = results[rank]
        rows = THREE_SHARDS[rank]
        torch.testing.assert_close(gathered_grad, 3 * w[rows], rtol=1e-12, atol=0, msg=f"rank {rank}")
        torch.testing.assert_close(rank_loss, loss.detach(), rtol=1e-12, atol=0, msg=f"rank {rank} loss")
        for name, grad, full in (("z1", grads[0], z1), ("z2", grads[1], z2)):
            torch.testing.assert_close(grad, 3 * full.grad[rows], rtol=1e-10, atol=1e-14, msg=f"rank {rank} {name}")
        assert backends == ["triton", "torch"], backends
        if rank:                                                   # the group's ranks 0 and 1, in the group
            assert mismatch is not None and "rank 0: [n, 4] float32; rank 1: [n, 5] float32" in mismatch, mismatch
