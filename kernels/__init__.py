"""Triton kernels and their launchers (installed as ``distillcse.kernels``).

Layers: ``@triton.jit`` kernels (pointer arithmetic and maths) and launchers that allocate
outputs, pick blocks and compute the grid. No autograd here; the autograd Functions live in
``distillcse/triton_backend.py``. The only import from ``distillcse`` is ``distillcse.shuffle``
(plain torch), whose definition of the random shuffle ``distill.py`` follows bit for bit.

Naming scheme inside kernels (fla's prefixes):
  i_  program ids and loop indices        o_  offset vectors (aranges)
  m_  masks                               b_  block values held in registers
  p_  pointers                            s_  strides
  BM, BN, BD  block sizes over rows, columns and the feature dimension.
Shapes are written next to every pointer argument and every ``tl.dot``.

Conventions shared by every kernel:
  * Embeddings come raw (any float dtype, row stride arbitrary, unit feature stride) with
    fp32 inverse norms ``r = 1 / max(|x|, 1e-8)``; a cosine is ``(x_i . y_j) * r_i * r_j``,
    the dot accumulated in fp32.
  * The large products are cuBLAS GEMMs (``utils.matmul_f32``: 16-bit inputs, fp32 outputs)
    over slabs of rows within the caller's ``budget_bytes``: the raw dots of a slab's rows
    against every column, which the kernels read through ``tiles.slab_tile`` (times both
    inverse norms), and the gradients' GEMMs against the kernels' factor slabs. The kernels
    themselves are memory- and ALU-bound passes over those slabs (softmaxes, Group-P
    comparisons, targets, shuffles); only the pairwise thresholds (``teacher_logits``,
    B <= ``PAIRWISE_MAX_B``) and the one-program path compute dots with ``tl.dot``.
  * Teacher rows come the same way (raw, fp32 inverse norms ``rt``, a dtype that need not be
    the student's): ``t_ij = (t_i . t_j) * rt_i * rt_j``. One teacher passes its own rows and
    norms; K teachers pass their rows ``sqrt(w_k) e_k / |e_k|`` side by side with ``rt = 1``.
  * Gradients are returned w.r.t. the raw rows, in their dtype, the normalisation's backward
    ``r (du - u (u . du))`` included (accumulated in fp32, or for the random shuffle's 16-bit
    rows in dx plus an int8 low part: about 16 significant bits).
  * Row statistics (logsumexps) are fp32 vectors of length B: extra memory O(B); every
    other temporary (the slabs of dots and factors, the Group-P search's row chunks, the
    random shuffle's int8 low part, which leaves the slabs at least half) is bounded by the
    caller's ``budget_bytes``, beyond the gradients and O(B x groups) tables
    (``tests/test_memory_plan.py`` and ``tests/test_kernel_contrastive.py`` count them).
  * Exception: ``small_batch.py`` (B <= 64, one program) takes the raw rows alone and computes
    every norm and logit itself, in its own passes over the features.
"""

if __name__ == "kernels":
    # Imported under the bare name: a source checkout's root is on sys.path (``python -m ...``
    # run there puts it first). That name is Hugging Face's ``kernels``, which transformers
    # imports: hand the import over to it, or, where it is not installed, to an empty module
    # such as a folder without __init__.py gives (no __file__: transformers then reads the
    # name as a shadow on sys.path, not as an installed package).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.realpath(__file__)
    _checkout = os.path.dirname(os.path.dirname(_here))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _checkout]  # links too
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.origin and os.path.realpath(_spec.origin) == _here:
        _spec = None  # this folder again, by another path
    if _spec is None or _spec.loader is None:
        _spec = importlib.machinery.ModuleSpec("kernels", None, is_package=True)
        _spec.submodule_search_locations = []
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what the import statement returns
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
else:
    try:
        from .utils import patch_interpreter_bf16, patch_interpreter_scalar_index

        patch_interpreter_scalar_index()
        patch_interpreter_bf16()
    except ImportError:  # triton not installed: the launchers are unavailable, the package is not
        pass
