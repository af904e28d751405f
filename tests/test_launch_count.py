"""What a forward+backward of the triton backend launches, counted under the interpreter by
``benchmarks/launch_count.py``: at the paper's batch the step's time is its launches and host
syncs, and a sync above B = 64 would also make the step impossible to capture in a CUDA graph."""
import os

import pytest
import torch

from conftest import _empty, _empty_like, _poisoned_empty, benchmark_module, requires_triton

pytestmark = [requires_triton,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts interpreted launches")]


@pytest.fixture
def launch_count(monkeypatch):
    monkeypatch.setattr(torch, "empty", _empty)  # the poisoned empties' fills would count as kernels
    monkeypatch.setattr(torch, "empty_like", _empty_like)
    return benchmark_module("launch_count")


@pytest.mark.parametrize("shuffle, launches", [
    ("random", {"_shuffled_targets_kernel": 1, "_small_batch_kernel": 1}),
    ("none", {"_small_batch_kernel": 1}),
])
def test_the_paper_batch_launches(launch_count, shuffle, launches):
    """B <= 64: the loss's kernels, two PyTorch ops (the backward's seed and its one scaling of
    both gradients), no host sync; the NaN / Inf check's three ops and one sync."""
    kernels, ops, check_ops = launch_count.count(40, 16, 24, 0, shuffle, general=False)
    assert dict(kernels) == launches
    assert dict(ops.ops) == {"ones_like": 1, "_foreach_mul": 1}, ops.ops
    assert ops.syncs == 0
    assert sum(check_ops.ops.values()) == 3 and check_ops.syncs == 1, check_ops.ops


def test_no_host_sync_in_the_streaming_kernels(launch_count):
    """B = 130 (streaming; the Group-P thresholds from the pairwise kernel): no host sync and no
    tensor made from host data (a host-to-device copy), so a step can be captured in a CUDA
    graph; the only GEMMs are matmul_f32's."""
    kernels, ops, check_ops = launch_count.count(130, 16, 24, 5, "expected", general=False)
    assert "_small_batch_kernel" not in kernels and sum(kernels.values()) >= 8
    assert ops.syncs == 0
    assert ops.ops["matmul_f32"] >= 9 and not {"mm", "addmm", "matmul", "bmm"} & set(ops.ops), ops.ops
    assert ops.ops["sum"] == 1 and "sub" not in ops.ops, ops.ops  # one slab: its loss rows in one op
    assert check_ops.syncs == 1


def test_the_search_sums_its_splits_in_one_op(launch_count, monkeypatch):
    """Above B = 1,024 the threshold search probes row chunks whose columns the GPU's blocks split
    over many programs. With the kernels stubbed (``host_time.StubbedKernels``: no kernel, no
    GEMM, the search closing its rows as on real embeddings) a step at B = 8,192 sums each
    probe's per-split measures in one op, not a tree of adds (log2 of the splits a probe), and
    syncs the host once a pass."""
    from distillcse.kernels import utils

    monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)  # the GPU's blocks: many splits
    # NaN in every new tensor: the stubbed statistics leave the brackets as such memory, which
    # the settle stub must not read as closed rows (uninitialised memory once made a late row closed)
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    with benchmark_module("host_time").StubbedKernels():
        kernels, ops, _ = launch_count.count(8192, 16, 24, 0, "expected", general=False)
    probes, slabs = kernels["_group_probe_kernel"], kernels["_distill_slab_kernel"]
    assert probes >= 3 and kernels["_settle_kernel"] >= 2, kernels  # the grid pass and two with windows
    assert ops.ops["sum"] <= probes + slabs, ops.ops  # a probe's splits, a slab's chunks: one op each
    assert ops.ops["add"] < probes, ops.ops  # 4 here (the brackets); with the tree 53 for 12 probes
    assert ops.syncs == 2, ops.syncs  # one a pass: the second pass and the third (its late rows)
