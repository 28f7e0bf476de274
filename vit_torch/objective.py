"""What training minimises and how it steps, in PyTorch: the twin of `vit_jax/objective.py`.

The same functions in the same order, with the same signatures; `python -m parity grad`
runs the same steps through both and proves them equal. Where the frameworks part, each
uses its own: torch.optim takes parameter groups where optax masks a transformation
(`param_groups` ~ `kernels_mask`), and `Optimizer` is optax's chain (`make_optimizer`).
What PyTorch does by default differs in three places, each matched here on purpose:
`torch.optim.AdamW` decays every parameter unless given parameter groups (here: kernels
only, as `vit_jax.objective.kernels_mask`); torch's SGD adds weight decay to the gradient
before the momentum (here: decoupled, after it, as the JAX chain); and a KL divergence must
be averaged per example (`reduction='batchmean'`), not per element. Label smoothing is
torch's own (`(1 - eps) onehot + eps / C`, as optax's).

Both take their settings from a `vit_jax.settings.TrainSettings` (or anything with its
fields): `Objective.from_settings`, `Optimizer(model, cfg, settings)`.

Shapes: B batch, C classes.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from parity.core.config import ViTConfig
from parity.core.objective import Objective
from parity.core.weights import param_shapes
from parity.core.weights.formats.vit_torch import torch_name


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per example, in float32: (B, C) logits, (B,) integer labels -> (B,)."""
    return F.cross_entropy(logits.float(), labels, reduction='none')


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy per example against (B, C) target distributions -> (B,)."""
    return -(targets * F.log_softmax(logits.float(), -1)).sum(-1)


def sigmoid_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """big_vision's sigmoid cross-entropy: one binary loss per class, summed over classes -> (B,)."""
    x = logits.float()
    return -(targets * F.logsigmoid(x) + (1.0 - targets) * F.logsigmoid(-x)).sum(-1)


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """DeiT's soft distillation per example: T^2 KL(softmax(t / T) || softmax(s / T)) -> (B,).

    Averaged over the batch this is `kl_div(..., reduction='batchmean') * T**2`.
    """
    T = temperature
    return F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), reduction='none',
                    log_target=True).sum(-1) * (T * T)


def mixup(key: np.random.Generator, images: torch.Tensor, targets: torch.Tensor, alpha: float):
    """big_vision's mixup: one lambda per batch from Beta(alpha, alpha), the larger of lambda and 1 - lambda,
    each example mixed with its neighbour (the batch rolled by one). Returns (images, targets, lambda)."""
    lam = float(key.beta(alpha, alpha))
    lam = max(lam, 1.0 - lam)
    mix = lambda x: lam * x + (1.0 - lam) * torch.roll(x, 1, dims=0)  # noqa: E731
    return mix(images), mix(targets), lam


def targets(obj: Objective, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) target distributions: one-hot, smoothed to `(1 - eps) onehot + eps / C` when asked."""
    onehot = F.one_hot(labels, num_classes).float()
    eps = obj.label_smoothing
    return onehot * (1.0 - eps) + eps / num_classes if eps else onehot


def objective_loss(obj: Objective, logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor = None,
                   teacher_logits: Sequence[torch.Tensor] = (),
                   student: torch.Tensor = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(loss, distillation term or None): `vit_jax.objective.objective_loss`, argument for argument.

    Smoothed labels without mixup go through torch's own `label_smoothing` (what a PyTorch
    user writes, and what `parity grad` checks against optax's); `target` is used for the
    sigmoid loss and under mixup.
    """
    if obj.loss == 'sigmoid':
        loss = sigmoid_cross_entropy(logits, target).mean()
    elif obj.mixup:
        loss = soft_cross_entropy(logits, target).mean()
    else:
        loss = F.cross_entropy(logits, labels, label_smoothing=obj.label_smoothing)
    if not teacher_logits:
        return loss, None
    student = logits if student is None else student
    terms = [distillation_kl(student, t, obj.temperature) if obj.distill == 'soft'
             else cross_entropy(student, t.argmax(-1)) for t in teacher_logits]
    return obj.with_distillation(loss, terms)


def learning_rate_schedule(lr: float, steps: int, warmup_steps: int, schedule: str = 'cosine',
                           linear_end: float = 1e-5) -> Callable[[int], float]:
    """The official schedule: linear warm-up to `lr`, then cosine or linear decay until `steps` (or `constant`)."""
    if schedule not in ('cosine', 'linear', 'constant'):
        raise ValueError(f'schedule {schedule!r}')

    def lr_fn(step: int) -> float:
        progress = min(max((step - warmup_steps) / float(max(steps - warmup_steps, 1)), 0.0), 1.0)
        if schedule == 'cosine':
            value = lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif schedule == 'constant':
            value = lr
        else:
            value = linear_end + (lr - linear_end) * (1.0 - progress)
        return value * min(1.0, step / warmup_steps) if warmup_steps else value

    return lr_fn


def param_groups(model: torch.nn.Module, cfg: ViTConfig, weight_decay: float, decay_on: str = 'kernels') -> list:
    """Two groups for `torch.optim`: the kernels (dense and convolution weights) decay, nothing else does
    (biases, LayerNorm and GroupNorm scales, the tokens, the position embeddings), as in the JAX chain."""
    decayed = {torch_name(k) for k in param_shapes(cfg) if decay_on == 'all' or k.endswith('kernel')}
    named = dict(model.named_parameters())
    return [{'params': [p for n, p in named.items() if n in decayed], 'weight_decay': weight_decay},
            {'params': [p for n, p in named.items() if n not in decayed], 'weight_decay': 0.0}]


class Optimizer:
    """`vit_jax.objective.make_optimizer`'s update in torch.optim, for the settings `s`.

    The learning rate follows `learning_rate_schedule`; gradients are clipped to global norm
    `s.grad_clip` (0: not at all). `sgd`: momentum 0.9, and weight decay decoupled after the
    momentum: `p -= lr * (m + wd * p)`. `adamw` and `adam` (the same update here as in the
    JAX chain): `torch.optim.AdamW` (eps 1e-8 outside the square root, as optax) on `groups`
    (default `param_groups`: kernels only, or every parameter with `weight_decay_on='all'`).
    """

    def __init__(self, model: torch.nn.Module, cfg: ViTConfig, s, groups: Iterable = None):
        groups = list(groups) if groups is not None else param_groups(model, cfg, s.weight_decay, s.weight_decay_on)
        self.params = [p for g in groups for p in g['params']]
        self.lr_fn = learning_rate_schedule(s.lr, s.steps, s.warmup_steps, s.schedule)
        self.lr, self.clip, self.count = s.lr, s.grad_clip, 0
        if s.optimizer in ('adamw', 'adam'):
            self.decoupled = []
            self.inner = torch.optim.AdamW(groups, lr=s.lr, betas=(s.b1, s.b2), eps=1e-8)
        elif s.optimizer == 'sgd':
            self.decoupled = [(g['params'], g['weight_decay']) for g in groups if g['weight_decay']]
            self.inner = torch.optim.SGD([dict(g, weight_decay=0.0) for g in groups], lr=s.lr, momentum=0.9)
        else:
            raise ValueError(f'optimizer {s.optimizer!r}')

    @torch.no_grad()
    def step(self) -> None:
        lr = self.lr_fn(self.count)
        self.count += 1
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if lr != self.lr:  # a constant rate leaves torch's groups as they were built
            self.lr = lr
            for g in self.inner.param_groups:
                g['lr'] = lr
        # The decay uses the parameters before this update, as the JAX chain does: take it out first.
        decays = [(p, -lr * wd * p) for params, wd in self.decoupled for p in params]
        self.inner.step()
        for p, d in decays:
            p.add_(d)

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=False)
