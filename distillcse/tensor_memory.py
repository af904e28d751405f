"""Peak bytes of the tensors that torch ops allocate inside a block, on any device.

On a GPU ``torch.cuda.max_memory_allocated`` counts this. On the CPU, where the triton backend
runs under ``TRITON_INTERPRET=1``, resident-set growth also counts the interpreter's own numpy
copies, so the backends' memory plans are checked with this count instead: every storage that
an aten op allocates (not the views and in-place results its schema marks as aliases) is live
until its last reference dies. Kernels write into tensors allocated by torch ops, so the count
is the one a GPU makes, up to the CUDA caching allocator's rounding (512-byte blocks). The
interpreter keeps each launch's arguments alive in reference cycles that a GPU launch does
not make, so inside the block every interpreted launch is followed by ``gc.collect()``.

    with TensorMemory() as mem:
        loss = distillcse.distill_loss(z, t, backend="triton"); loss.backward()
    mem.peak, mem.at_peak  # bytes; (bytes, shape, dtype, op) live at the peak, largest first
    mem.largest  # (bytes, shape, dtype, op) of the largest single allocation
"""
import gc
import os

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Dispatch mode that tracks the live bytes of the storages allocated inside it."""

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (weak ref, nbytes, (shape, dtype, op))
        self.bytes = 0
        self.peak = 0
        self.at_peak = []
        self.largest = (0, (), None, "")
        self._launch = None

    def _sweep(self):
        for ptr in [p for p, (ref, _, _) in self.live.items() if ref.expired()]:
            self.bytes -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new storage
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and ptr not in self.live:
                    what = (tuple(t.shape), t.dtype, str(func))
                    self.live[ptr] = (StorageWeakRef(storage), nbytes, what)
                    self.bytes += nbytes
                    self.largest = max(self.largest, (nbytes, *what), key=lambda e: e[0])
        if self.bytes > self.peak:
            self.peak = self.bytes
            self.at_peak = sorted(((n, *d) for _, n, d in self.live.values()), key=lambda e: -e[0])
        return out

    def __enter__(self):
        if os.environ.get("TRITON_INTERPRET") == "1":
            from triton.runtime.interpreter import GridExecutor
            self._launch = launch = GridExecutor.__call__

            def launch_then_collect(executor, *args, **kwargs):
                try:
                    return launch(executor, *args, **kwargs)
                finally:
                    gc.collect()

            GridExecutor.__call__ = launch_then_collect
        return super().__enter__()

    def __exit__(self, *exc):
        if self._launch is not None:
            from triton.runtime.interpreter import GridExecutor
            GridExecutor.__call__, self._launch = self._launch, None
        self._sweep()
        return super().__exit__(*exc)
