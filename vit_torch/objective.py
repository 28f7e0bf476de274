"""The training objective and optimizers of `vit_jax.train`, written once in PyTorch.

`python -m parity grad` runs the same steps through these and through optax and proves
them equal. What PyTorch does by default differs in three places, each matched here on
purpose: `torch.optim.AdamW` decays every parameter unless given parameter groups (here:
kernels only, as `vit_jax.train.kernels_mask`); torch's SGD adds weight decay to the
gradient before the momentum (here: decoupled, after it, as the JAX chain); and a KL
divergence must be averaged per example (`reduction='batchmean'`), not per element.
Label smoothing is torch's own (`(1 - eps) onehot + eps / C`, as optax's).

Shapes: B batch, C classes.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from parity.core.config import ViTConfig
from parity.core.weights import param_shapes
from parity.core.weights.formats.vit_torch import torch_name


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """DeiT's soft distillation, T^2 KL(softmax(t / T) || softmax(s / T)), averaged over the batch."""
    T = temperature
    return F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), reduction='batchmean',
                    log_target=True) * (T * T)


def objective_loss(logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                   teacher_logits: Sequence[torch.Tensor] = (), teacher_weights: Sequence[float] = (),
                   distill: str = 'soft', alpha: float = 0.0, temperature: float = 1.0,
                   student: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, distillation term or None): `vit_jax.train.objective_loss` for the softmax loss.

    (1 - alpha) cross-entropy on the labels + alpha sum_k w_k D_k, D_k DeiT's soft term or
    the cross-entropy on teacher k's argmax; `student` is what the teachers teach (DeiT's
    distillation head; default `logits`).
    """
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if not teacher_logits:
        return loss, None
    student = logits if student is None else student
    terms = [distillation_kl(student, t, temperature) if distill == 'soft'
             else F.cross_entropy(student, t.argmax(-1)) for t in teacher_logits]
    term = sum(w * d for w, d in zip(teacher_weights, terms))
    return (1.0 - alpha) * loss + alpha * term, term


def param_groups(model: torch.nn.Module, cfg: ViTConfig, weight_decay: float, decay_on: str = 'kernels') -> list:
    """Two groups for `torch.optim`: the kernels (dense and convolution weights) decay, nothing else does
    (biases, LayerNorm and GroupNorm scales, the tokens, the position embeddings), as in the JAX chain."""
    decayed = {torch_name(k) for k in param_shapes(cfg) if decay_on == 'all' or k.endswith('kernel')}
    named = dict(model.named_parameters())
    return [{'params': [p for n, p in named.items() if n in decayed], 'weight_decay': weight_decay},
            {'params': [p for n, p in named.items() if n not in decayed], 'weight_decay': 0.0}]


class Optimizer:
    """`vit_jax.train.make_optimizer`'s update at a constant learning rate, in torch.optim.

    `sgd`: momentum 0.9, and weight decay decoupled after the momentum: `p -= lr * (m + wd * p)`.
    `adamw`: `torch.optim.AdamW` (eps 1e-8 outside the square root, as optax) on `groups`
    (default `param_groups`: kernels only).
    """

    def __init__(self, model: torch.nn.Module, cfg: ViTConfig, optimizer: str, lr: float, weight_decay: float = 0.0,
                 decay_on: str = 'kernels', b1: float = 0.9, b2: float = 0.999, groups: Iterable = None):
        groups = list(groups) if groups is not None else param_groups(model, cfg, weight_decay, decay_on)
        self.lr = lr
        if optimizer == 'adamw':
            self.decoupled = []
            self.inner = torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=1e-8)
        elif optimizer == 'sgd':
            self.decoupled = [(g['params'], g['weight_decay']) for g in groups if g['weight_decay']]
            self.inner = torch.optim.SGD([dict(g, weight_decay=0.0) for g in groups], lr=lr, momentum=0.9)
        else:
            raise ValueError(f'optimizer {optimizer!r}')

    @torch.no_grad()
    def step(self) -> None:
        # The decay uses the parameters before this update, as the JAX chain does: take it out first.
        decays = [(p, -self.lr * wd * p) for params, wd in self.decoupled for p in params]
        self.inner.step()
        for p, d in decays:
            p.add_(d)

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=False)
