"""The distillation kernels compile for an H100/H200 (sm_90a) with few groups, offline:
``benchmarks/compile_sm90.py`` builds them with Triton's own ptxas, no GPU needed. The
interpreter never compiles, and Triton 3.6 failed to build the search's placing kernel with a
boundary axis of 4 or fewer (group_p >= 0.2), which only an H200 showed."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_few_group_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_sm90.py"), "--what",
                          "few_groups", "--dtypes", "bf16", "--B", "4096", "--D", "64"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for kernel in ("_place_kernel", "_group_probe_kernel", "_narrow_kernel", "_settle_kernel",
                   "_pairwise_brackets_kernel", "_group_means_kernel", "_settled_rows_kernel", "_grid_points_kernel",
                   "_distill_slab_kernel"):
        assert f"### {kernel} " in run.stdout, kernel
