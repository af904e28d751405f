"""Test set-up shared by every test.

* Without a GPU, kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` is set here,
  before anything imports ``triton``.
* ``torch.empty`` / ``torch.empty_like`` return NaN-filled (float) or sentinel-filled (int)
  tensors, so an output a kernel forgets to write fails the comparison instead of passing
  on lucky zeros.
* ``DISTILLCSE_GPU_BLOCKS=1``: the GPU's block shapes under the interpreter (``gpu_blocks``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(max(-12345, torch.iinfo(t.dtype).min + 5) if t.dtype.is_signed else 123)
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


@pytest.fixture(autouse=True)
def gpu_blocks(monkeypatch):
    """``DISTILLCSE_GPU_BLOCKS=1``: the launchers pick the GPU's block shapes under the
    interpreter too, as every test does on a GPU; a CPU run then finds the tests that assume
    the interpreter's blocks before a device does (slow: a file or two at a time)."""
    if os.environ.get("DISTILLCSE_GPU_BLOCKS") == "1":
        from distillcse.kernels import utils
        monkeypatch.setattr(utils, "interpreter_blocks", lambda: False)
    yield


@pytest.fixture
def device():
    return DEVICE


def benchmark_module(name):
    """``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def device_key(step_seed):
    """A 64-bit shuffle key as the [1] int64 tensor on DEVICE that a CUDA graph's capture draws
    (the same bits, two's complement)."""
    return torch.tensor([step_seed - 2**64 if step_seed >= 2**63 else step_seed], dtype=torch.int64, device=DEVICE)
