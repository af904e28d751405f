"""DistillCSE as a sentence-transformers loss, for ``SentenceTransformerTrainer``.

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from distillcse.sentence_transformers import DistillCSELoss

    student, teacher = SentenceTransformer(STUDENT), SentenceTransformer(TEACHER)
    dataset = dataset.map(lambda b: {"label": teacher.encode(b["anchor"])}, batched=True)   # once
    trainer = SentenceTransformerTrainer(model=student, train_dataset=dataset,
                                         loss=DistillCSELoss(student, mini_batch_size=256))

Input columns: ``(anchor)``, whose two dropout views are z1 and z2 (unsupervised SimCSE);
``(anchor, positive)``, z2 from the positive column; ``(anchor, positive, negative, ...)``,
the further columns hard negatives. With ``distill_only=True``, ``(anchor)`` alone, encoded once.
The ``label`` column holds the teachers' embeddings of the
anchors, computed once (as sentence-transformers' distillation losses take them): ``[B, D_t]``
for one teacher, ``[B, K, D_t]`` for K components of equal width (their logits averaged), or
teachers of different widths side by side, ``[B, D_1 + ... + D_K]`` with
``teacher_dims=(D_1, ..., D_K)``.

``mini_batch_size`` turns on gradient caching through sentence-transformers' own
``CachedLossMixin`` (sentence-transformers >= 6; its trainer then calls ``backward`` as
usual): the encoder's activations are those of one mini-batch, whatever the batch size.
``gather_across_devices=True`` (under torch.distributed, e.g. the trainer on several GPUs)
computes the loss on every rank's rows (:func:`distillcse.all_gather`): every negative and
every teacher row of the global batch counts. With ``shard_loss=True`` as well, each rank
computes only its own rows' share of that loss (:func:`distillcse.sharded_loss`; ``backend="auto"``
takes the torch backend for it, ``"triton"`` the kernels' shards): the same loss and gradients,
about 1 / W of the loss's work a rank.

The other keywords are :class:`distillcse.DistillCSELoss`'s (``backend="auto"`` takes the fused
kernels on a GPU). Leave ``seed`` unset under the trainer: each step's random shuffle is then
drawn from torch's random state, which the trainer seeds (its ``seed`` argument) and restores
when it resumes from a checkpoint, so a resumed run goes on as the uninterrupted one would; when
gathering, every rank takes rank 0's draw. An int ``seed`` starts a generator of the loss's
own, which the trainer does not checkpoint: a resumed run would repeat the first steps' shuffles.
"""
import torch

from . import checks
from .api import DistillCSELoss as _DistillCSELoss, _step_seed, distillcse_loss
from .distributed import all_gather, sharded_loss

try:
    from sentence_transformers.base.losses.gradcache import CachedLossMixin
except ImportError:                      # sentence-transformers < 6: no gradient caching
    CachedLossMixin = None

__all__ = ["DistillCSELoss"]

CITATION = """@inproceedings{xu-etal-2023-distillcse,
    title = "{D}istill{CSE}: Distilled Contrastive Learning for Sentence Embeddings",
    author = "Xu, Jiahao and Shao, Wei and Chen, Lihui and Liu, Lemao",
    booktitle = "Findings of the Association for Computational Linguistics: EMNLP 2023",
    year = "2023",
    url = "https://arxiv.org/abs/2310.13499",
}"""


class DistillCSELoss(*((CachedLossMixin,) if CachedLossMixin else ()), torch.nn.Module):
    """``loss(sentence_features, labels)``: contrastive + Group-P distillation over the batch's
    sentence-transformers embeddings, the teachers' embeddings in ``labels``."""

    def __init__(self, model, mini_batch_size=None, gather_across_devices=False, teacher_dims=None,
                 show_progress_bar=False, shard_loss=False, **loss_options):
        super().__init__()
        if teacher_dims is not None:
            if isinstance(teacher_dims, (int, str)) or not teacher_dims:
                raise TypeError(f"teacher_dims must be a non-empty sequence of the teachers' widths, "
                                f"e.g. (768, 1024), got {teacher_dims!r}")
            teacher_dims = tuple(checks.check_positive_int(f"teacher_dims[{k}]", d) for k, d in enumerate(teacher_dims))
        for name, flag in (("gather_across_devices", gather_across_devices), ("shard_loss", shard_loss)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if shard_loss and not gather_across_devices:
            raise ValueError("shard_loss=True splits the gathered global batch's loss over the ranks: it needs "
                             "gather_across_devices=True")
        if mini_batch_size is not None:
            if CachedLossMixin is None:
                raise ImportError("DistillCSELoss(mini_batch_size=...): gradient caching needs "
                                  "sentence-transformers >= 6 (its CachedLossMixin)")
            checks.check_positive_int("mini_batch_size", mini_batch_size, " or None")
        if loss_options.get("return_terms"):
            raise TypeError("return_terms: a sentence-transformers loss returns the loss alone")
        self.model = model
        self.criterion = _DistillCSELoss(**loss_options)        # checks the options
        self.loss_options = dict(loss_options)
        self.mini_batch_size = mini_batch_size
        self.gather_across_devices = gather_across_devices
        self.shard_loss = shard_loss
        self.teacher_dims = teacher_dims
        self.uses_gradient_cache = mini_batch_size is not None
        self.show_progress_bar = show_progress_bar

    def forward(self, sentence_features, labels):
        features = list(sentence_features)
        if not features:
            raise ValueError("sentence_features: expected at least one input column (the anchors)")
        if self.loss_options.get("distill_only"):                # the anchors alone: no views, no negatives
            if len(features) > 1:
                raise ValueError(f"sentence_features: distill_only=True uses the anchors alone, got {len(features)} "
                                 "columns (the others would be encoded for nothing: remove them from the dataset)")
        elif len(features) == 1:                                 # the anchors twice: two dropout views
            features = [features[0], dict(features[0])]
        if self.uses_gradient_cache:
            return self.forward_cached(features, labels)
        return self._loss([self.model(f)["sentence_embedding"] for f in features], labels)

    def calculate_loss(self, reps, labels=None, *, with_backward=False):
        """The loss from per-column lists of mini-batch embeddings (``CachedLossMixin``'s hook)."""
        loss = self._loss([torch.cat(column) for column in reps], labels)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def _loss(self, columns, labels):
        z1, z2, *negatives = columns if len(columns) > 1 else columns * 2   # distill_only: z2 unused
        teachers = self._teachers(labels, z1)
        negatives = torch.cat(negatives) if negatives else None
        if not self.gather_across_devices:
            return self.criterion(z1, z2, teachers, hard_negatives=negatives)
        if self.shard_loss:
            return sharded_loss(z1, z2, teachers, hard_negatives=negatives,
                                **dict(self.loss_options, seed=self._shared_key(z1)))
        z1, z2, *teachers = all_gather(z1, z2, *teachers)        # every rank's rows: the global batch
        negatives = all_gather(negatives) if negatives is not None else None
        if self.loss_options.get("seed") is not None or self.loss_options.get("shuffle", "random") != "random":
            return self.criterion(z1, z2, teachers, hard_negatives=negatives)
        return distillcse_loss(z1, z2, teachers, hard_negatives=negatives, **dict(self.loss_options,
                                                                                  seed=self._shared_key(z1)))

    def _shared_key(self, z1):
        """This step's shuffle key, the same on every rank: a draw from the loss's own generator (an
        int seed's, alike on every rank), or rank 0's from torch's random state (the ranks' differ).
        None where there is no random shuffle."""
        if self.loss_options.get("shuffle", "random") != "random":
            return None
        generator = self.criterion.kwargs.get("seed")
        if generator is not None:
            return _step_seed(generator)
        key = torch.randint(0, 2**62, (1,)).to(z1.device)       # from torch's random state, as unsharded;
        return int(all_gather(key)[0])                           # rank 0's, so that the ranks shuffle alike

    def _teachers(self, labels, z1):
        """``labels`` [B, D_t], [B, K, D_t] or, with ``teacher_dims``, [B, sum D_k] -> the teachers'
        embeddings on z1's device."""
        B, dims = z1.shape[0], self.teacher_dims
        expected = f"[{B}, {sum(dims)}] (teacher_dims={dims} side by side)" if dims else f"[{B}, D_t] or [{B}, K, D_t]"
        fits = isinstance(labels, torch.Tensor) and (
            labels.shape == (B, sum(dims)) if dims else labels.dim() in (2, 3) and labels.shape[0] == B)
        if not fits:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected the teachers' embeddings of the {B} anchors, {expected} "
                             f"(a 'label' column computed with teacher.encode), got {shape}")
        labels = labels.to(z1.device)
        if dims:
            return list(labels.split(dims, dim=1))
        return [labels] if labels.dim() == 2 else list(labels.unbind(1))

    def get_config_dict(self):
        return dict(self.loss_options, mini_batch_size=self.mini_batch_size,
                    gather_across_devices=self.gather_across_devices, shard_loss=self.shard_loss,
                    teacher_dims=self.teacher_dims)

    @property
    def citation(self):
        return CITATION
