"""What a forward+backward of the triton backend launches, counted under the interpreter by
``benchmarks/launch_count.py``: at the paper's batch the step's time is its launches and host
syncs, and a sync above B = 64 would also make the step impossible to capture in a CUDA graph."""
import importlib.util
import os

import pytest
import torch

from conftest import _empty, _empty_like, requires_triton

pytestmark = [requires_triton,
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts interpreted launches")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def launch_count(monkeypatch):
    monkeypatch.setattr(torch, "empty", _empty)  # the poisoned empties' fills would count as kernels
    monkeypatch.setattr(torch, "empty_like", _empty_like)
    spec = importlib.util.spec_from_file_location("launch_count", os.path.join(ROOT, "benchmarks", "launch_count.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    graph; the only cuBLAS work is matmul_f32's."""
    kernels, ops, check_ops = launch_count.count(130, 16, 24, 5, "expected", general=False)
    assert "_small_batch_kernel" not in kernels and sum(kernels.values()) >= 8
    assert ops.syncs == 0
    assert ops.ops["matmul_f32"] >= 9 and not {"mm", "addmm", "matmul", "bmm"} & set(ops.ops), ops.ops
    assert check_ops.syncs == 1
