"""distillcse: fused, memory-efficient DistillCSE losses.

``contrastive_loss``, ``distill_loss``, ``distillcse_loss`` and ``DistillCSELoss`` with backends
"reference" (plain PyTorch, B x B), "torch" (row-chunked, any device), "triton" (fused
kernels) and "auto" (triton on CUDA, torch elsewhere); ``all_gather`` for multi-GPU batches and
``sharded_loss`` to split their loss's work over the ranks;
``cached_backward`` for batches larger than the encoder's activations allow (gradient caching);
``distillcse.sentence_transformers.DistillCSELoss`` for sentence-transformers' trainer.
"""
from .api import DistillCSELoss, contrastive_loss, distill_loss, distillcse_loss
from .config import chunk_budget, finite_check, set_chunk_budget, set_finite_check
from .distributed import all_gather, sharded_loss
from .grad_cache import cached_backward

__all__ = ["contrastive_loss", "distill_loss", "distillcse_loss", "DistillCSELoss",
           "set_chunk_budget", "chunk_budget", "set_finite_check", "finite_check", "all_gather",
           "sharded_loss", "cached_backward"]
__version__ = "0.1.0"
