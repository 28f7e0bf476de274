"""The training objective as data: which loss, its targets, mixup and the distillation.

Framework-neutral, so that the twins `vit_jax/objective.py` and `vit_torch/objective.py`
compute from one description, and a run's settings (`vit_jax.settings.TrainSettings`)
name it once (`Objective.from_settings`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimises, beside the optimizer: the loss, its targets and the distillation.

    The default is the official objective, softmax cross-entropy on the integer labels.
    `label_smoothing` eps makes the targets `(1 - eps) onehot + eps / C` (optax's, and
    torch's `label_smoothing`); `mixup` alpha > 0 mixes images and targets (see `mixup`).
    With teachers, the loss is `(1 - distill_alpha) * loss + distill_alpha * sum_k w_k D_k`,
    D_k the soft (`distillation_kl`) or hard (cross-entropy on teacher k's argmax) term.
    """

    loss: str = 'softmax'
    label_smoothing: float = 0.0
    mixup: float = 0.0
    distill: str = 'soft'
    distill_alpha: float = 0.0
    temperature: float = 1.0
    teacher_weights: tuple[float, ...] = ()  # one per teacher, summing to 1

    @classmethod
    def from_settings(cls, s) -> 'Objective':
        """The objective of a `vit_jax.settings.TrainSettings` (or anything with its fields)."""
        return cls(loss=s.loss, label_smoothing=s.label_smoothing, mixup=s.mixup, distill=s.distill,
                   distill_alpha=s.distill_alpha, temperature=s.distill_temperature,
                   teacher_weights=tuple(s.teacher_weights))

    def with_distillation(self, loss, terms):
        """(`(1 - distill_alpha) * loss + distill_alpha * sum_k w_k D_k`, that sum) for the label loss and each
        teacher's per-example term D_k, in whichever framework's arrays they come (each averaged over the batch)."""
        distill = sum(w * d.mean() for w, d in zip(self.teacher_weights, terms))
        return (1.0 - self.distill_alpha) * loss + self.distill_alpha * distill, distill

    @property
    def soft_targets(self) -> bool:
        """Targets as distributions; else the official integer-label loss, so the default step stays bit-identical."""
        return self.loss == 'sigmoid' or self.label_smoothing > 0 or self.mixup > 0
