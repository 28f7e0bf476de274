"""What training minimises and how it steps, in JAX: the losses, mixup, the `Objective` computed, and the optimizer.

The default is the official fine-tuning recipe (google-research/vision_transformer,
`train.py` and `configs/common.py`): softmax cross-entropy on the integer labels; SGD with
momentum 0.9, gradients clipped to global norm 1.0, no weight decay, linear warm-up then
cosine (or linear) decay. The recipe flags of `vit_jax.settings` change it; both pieces are
built from a `TrainSettings` (`Objective.from_settings`, `make_optimizer`).

The twin of `vit_torch/objective.py`: the same functions in the same order, with the same
signatures; `parity grad` runs both and proves them equal. Where the frameworks part, each
uses its own: optax masks a transformation where torch.optim takes parameter groups
(`kernels_mask` ~ `param_groups`), and optax's chain is torch's `Optimizer`.

Shapes: B batch, C classes.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from parity.core.errors import UserError
from parity.core.objective import Objective
from vit_jax.settings import OPTIMIZERS, SCHEDULES


def cross_entropy(logits, labels):
    """Softmax cross-entropy per example, in float32: (B, C) logits, (B,) integer labels -> (B,)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # (B, C)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]  # (B,)


def soft_cross_entropy(logits, targets):
    """Softmax cross-entropy per example against (B, C) target distributions -> (B,)."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def sigmoid_cross_entropy(logits, targets):
    """big_vision's sigmoid cross-entropy: one binary loss per class, summed over classes -> (B,)."""
    x = logits.astype(jnp.float32)
    return -jnp.sum(targets * jax.nn.log_sigmoid(x) + (1.0 - targets) * jax.nn.log_sigmoid(-x), axis=-1)


def distillation_kl(student, teacher, temperature: float):
    """DeiT's soft distillation per example: T^2 KL(softmax(t / T) || softmax(s / T)) -> (B,).

    Averaged over the batch this is PyTorch's `kl_div(..., reduction='batchmean') * T**2`.
    """
    T = temperature
    log_t = jax.nn.log_softmax(teacher.astype(jnp.float32) / T)  # (B, C)
    log_s = jax.nn.log_softmax(student.astype(jnp.float32) / T)  # (B, C)
    return T * T * jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)


def mixup(key, images, targets, alpha: float):
    """big_vision's mixup: one lambda per batch from Beta(alpha, alpha), the larger of lambda and 1 - lambda,
    each example mixed with its neighbour (the batch rolled by one). Returns (images, targets, lambda)."""
    lam = jax.random.beta(key, alpha, alpha)
    lam = jnp.maximum(lam, 1.0 - lam)
    mix = lambda x: lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)  # noqa: E731
    return mix(images), mix(targets), lam


def targets(obj: Objective, labels, num_classes: int):
    """(B, C) target distributions: one-hot, smoothed to `(1 - eps) onehot + eps / C` when asked."""
    onehot = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(onehot, obj.label_smoothing) if obj.label_smoothing else onehot


def objective_loss(obj: Objective, logits, labels, target=None, teacher_logits: Sequence = (), student=None):
    """(loss, distillation term or None) of `obj` for (B, C) `logits`, (B,) integer `labels` and, when
    `obj.soft_targets`, (B, C) `target` distributions (`targets`, mixed by `mixup`). `student` is what
    the teachers teach (DeiT's distillation head; default `logits`); with no `teacher_logits` there is
    no distillation term.
    """
    if obj.loss == 'sigmoid':
        loss = sigmoid_cross_entropy(logits, target).mean()
    elif obj.soft_targets:
        loss = soft_cross_entropy(logits, target).mean()
    else:
        loss = cross_entropy(logits, labels).mean()
    if not teacher_logits:
        return loss, None
    student = logits if student is None else student
    terms = [distillation_kl(student, t, obj.temperature) if obj.distill == 'soft'
             else cross_entropy(student, t.argmax(-1)) for t in teacher_logits]
    return obj.with_distillation(loss, terms)


def learning_rate_schedule(lr: float, steps: int, warmup_steps: int, schedule: str = 'cosine',
                           linear_end: float = 1e-5) -> Callable:
    """The official schedule: linear warm-up to `lr`, then cosine or linear decay until `steps` (or `constant`)."""
    if schedule not in SCHEDULES:
        raise UserError(f'--schedule {schedule!r}: expected one of {", ".join(SCHEDULES)}')

    def lr_fn(step):
        progress = jnp.clip((step - warmup_steps) / float(max(steps - warmup_steps, 1)), 0.0, 1.0)
        if schedule == 'cosine':
            value = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif schedule == 'constant':
            value = lr + 0.0 * progress
        else:
            value = linear_end + (lr - linear_end) * (1.0 - progress)
        if warmup_steps:
            value = value * jnp.minimum(1.0, step / warmup_steps)
        return jnp.asarray(value, jnp.float32)

    return lr_fn


def kernels_mask(params):
    """True for the leaves weight decay applies to by default: the kernels of dense layers and convolutions,
    not biases, LayerNorm and GroupNorm scales, the class token or the position embeddings."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(s, *, eps_root: float = 0.0) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, lr_fn) of a `vit_jax.settings.TrainSettings` `s`: its `lr` on its schedule
    (`steps`, `warmup_steps`, `schedule`), `grad_clip`, `optimizer`, `weight_decay`, `weight_decay_on`,
    `b1` and `b2`. The defaults are the official recipe: clip to global norm 1, then SGD with momentum
    0.9 and no weight decay (float32 momentum; the official code keeps it in bfloat16).

    `grad_clip` 0 clips nothing. `adamw` is optax's AdamW (eps 1e-8); `adam` is big_vision's
    `scale_by_adam`, then the weight decay, then the learning rate. Weight decay is decoupled
    (the update is `-lr * (direction + weight_decay * param)`), on kernels only unless
    `weight_decay_on='all'`; with `sgd` it is added after the momentum the same way.
    `eps_root` > 0 puts Adam's epsilon inside the square root instead (a known deviation, for
    `parity grad`'s diagnosis).
    """
    if s.optimizer not in OPTIMIZERS:
        raise UserError(f'--optimizer {s.optimizer!r}: expected one of {", ".join(OPTIMIZERS)}')
    if s.weight_decay_on not in ('kernels', 'all'):
        raise UserError(f'--weight-decay-on {s.weight_decay_on!r}: expected kernels or all')
    lr_fn = learning_rate_schedule(s.lr, s.steps, s.warmup_steps, s.schedule)
    clip = [optax.clip_by_global_norm(s.grad_clip)] if s.grad_clip else []
    mask: Optional[Callable] = kernels_mask if s.weight_decay_on == 'kernels' else None
    if s.optimizer == 'sgd' and not s.weight_decay:  # the official chain, exactly: old checkpoints keep their layout
        return optax.chain(*clip, optax.sgd(learning_rate=lr_fn, momentum=0.9)), lr_fn
    eps = 0.0 if eps_root else 1e-8
    if s.optimizer == 'adamw':
        return optax.chain(*clip, optax.adamw(lr_fn, b1=s.b1, b2=s.b2, eps=eps, eps_root=eps_root,
                                              weight_decay=s.weight_decay, mask=mask)), lr_fn
    direction = (optax.trace(decay=0.9) if s.optimizer == 'sgd'
                 else optax.scale_by_adam(b1=s.b1, b2=s.b2, eps=eps, eps_root=eps_root))
    decay = [optax.add_decayed_weights(s.weight_decay, mask)] if s.weight_decay else []
    return optax.chain(*clip, direction, *decay, optax.scale_by_learning_rate(lr_fn)), lr_fn
