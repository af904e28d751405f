"""Library-wide settings."""
import os
from contextlib import contextmanager

# 128 MiB: at B = 65,536, D = 768, bf16 the triton backend's forward then peaks near 230 MiB
# (slab + the distillation's gradient buffer), within the 256 MiB target (benchmarks/NOTES.md)
_DEFAULT_CHUNK_MIB = 128
_chunk_budget = int(float(os.environ.get("DISTILLCSE_CHUNK_MIB", _DEFAULT_CHUNK_MIB)) * 2**20)
_finite_check = os.environ.get("DISTILLCSE_CHECK_FINITE", "1").strip().lower() not in ("0", "false", "no", "off")


def chunk_budget_bytes() -> int:
    """Memory the row-chunked paths may use for one chunk's temporaries (bytes)."""
    return _chunk_budget


def set_chunk_budget(mib: float) -> None:
    """Set the per-chunk memory budget of the torch backend and of the triton backend's
    distillation slabs, in MiB (default 128, or ``$DISTILLCSE_CHUNK_MIB``)."""
    global _chunk_budget
    if not (isinstance(mib, (int, float)) and mib > 0):
        raise ValueError(f"chunk budget must be a positive number of MiB, got {mib!r}")
    _chunk_budget = int(mib * 2**20)


@contextmanager
def chunk_budget(mib: float):
    """Context manager form of :func:`set_chunk_budget`."""
    previous = _chunk_budget
    set_chunk_budget(mib)
    try:
        yield
    finally:
        set_chunk_budget(previous / 2**20)


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
