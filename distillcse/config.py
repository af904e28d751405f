"""Library-wide settings."""
import math
import numbers
import os
from contextlib import contextmanager

# 128 MiB: at B = 65,536, D = 768, bf16 a triton backend step then peaks near 254 MiB (the forward:
# slabs + the gradient buffer; the backward: both gradients + column slabs), within the 256 MiB
# target (tests/test_memory_plan.py::test_the_headline_step, benchmarks/NOTES.md)
_DEFAULT_CHUNK_MIB = 128


def _checked_mib(name, mib):
    """``mib`` as a float when it is a positive finite number (not a bool), else a ValueError
    naming ``name``."""
    if isinstance(mib, bool) or not isinstance(mib, numbers.Real) or not (math.isfinite(mib) and mib > 0):
        raise ValueError(f"{name} must be a positive finite number of MiB, got {mib!r}")
    return float(mib)


def _environment_chunk_mib():
    """``$DISTILLCSE_CHUNK_MIB``, else the default; a bad value is refused with its text."""
    text = os.environ.get("DISTILLCSE_CHUNK_MIB", str(_DEFAULT_CHUNK_MIB))
    try:
        return _checked_mib("$DISTILLCSE_CHUNK_MIB", float(text))
    except ValueError:
        raise ValueError(f"$DISTILLCSE_CHUNK_MIB must be a positive finite number of MiB, got {text!r}") from None


_chunk_budget = int(_environment_chunk_mib() * 2**20)
_finite_check = os.environ.get("DISTILLCSE_CHECK_FINITE", "1").strip().lower() not in ("0", "false", "no", "off")


def chunk_budget_bytes() -> int:
    """Memory the row-chunked paths may use for one chunk's temporaries (bytes)."""
    return _chunk_budget


def set_chunk_budget(mib: float) -> None:
    """Set the per-chunk memory budget of the torch backend and of the triton backend's
    distillation slabs, in MiB (default 128, or ``$DISTILLCSE_CHUNK_MIB``)."""
    global _chunk_budget
    _chunk_budget = int(_checked_mib("chunk budget", mib) * 2**20)


@contextmanager
def chunk_budget(mib: float):
    """Context manager form of :func:`set_chunk_budget`."""
    global _chunk_budget
    previous = _chunk_budget
    set_chunk_budget(mib)
    try:
        yield
    finally:
        _chunk_budget = previous  # as it was, bytes and all


def finite_check_enabled() -> bool:
    """Whether the losses check their inputs for NaN and Inf (one host sync a call)."""
    return _finite_check


def set_finite_check(enabled: bool) -> None:
    """Turn the losses' NaN / Inf check of their inputs on (the default) or off
    (``$DISTILLCSE_CHECK_FINITE=0`` at start-up). The check reads one value on the host per call,
    which waits for the GPU to finish the work queued before it (the encoder's forward); off, a
    step queues without waiting, and non-finite inputs go unreported."""
    global _finite_check
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    _finite_check = enabled


@contextmanager
def finite_check(enabled: bool):
    """Context manager form of :func:`set_finite_check`."""
    previous = _finite_check
    set_finite_check(enabled)
    try:
        yield
    finally:
        set_finite_check(previous)
