"""Fine-tuning and training through XLA: the library (state, optimizer, steps, checkpoints).

The recipe is the official fine-tuning one (google-research/vision_transformer, `train.py`
and `configs/common.py`): SGD with momentum 0.9, gradients clipped to global norm 1.0,
no weight decay, linear warm-up then cosine (or linear) decay, gradient accumulation,
softmax cross-entropy. `python -m vit_jax train` (`vit_jax.trainer`) runs it with the
settings of `vit_jax.settings`. For scripts and benchmarks, everything on one `Mesh`
over all devices:

    mesh = make_mesh()                                     # every device of every process
    tx, lr_fn = make_optimizer(lr=0.03, steps=500, warmup_steps=100)
    state = create_train_state(cfg, params, tx, mesh=mesh)  # params: canonical NumPy dict
    train_step = make_train_step(cfg, tx, lr_fn, mesh=mesh, accum_steps=1, dtype='float32', fast=True)
    state, metrics = train_step(state, shard_batch(batch, mesh))

`train_step(state, batch) -> (state, metrics)` is pure and compiled once by `jax.jit`:
the batch is sharded over the mesh's `data` axis, parameters and optimizer state are
replicated, the incoming state's buffers are donated, and nothing leaves the devices
inside the step (metrics stay device arrays until the caller reads them).

Shapes: B global batch, Bl per-process rows, A accumulation steps, S image size, C classes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parity.core import files, weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.core.weights import containers
from parity.data.datasets import Dataset
from vit_jax.checkpoint import params_from_variables, variables_from_params
from vit_jax.model import VisionTransformer

CHECKPOINTS = 'checkpoints'
CHECKPOINT = re.compile(r'^ckpt-(\d+)\.npz$')


# --------------------------------------------------------------------------- devices

def make_mesh(devices=None) -> Mesh:
    """A 1-D `Mesh` named `data` over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def _shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, sharded along `data`) on `mesh`."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def _replicate(tree, mesh: Mesh):
    """Host arrays (identical on every process) to arrays replicated over `mesh`."""
    replicated, _ = _shardings(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: np.asarray(x)[i]),
                        tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a global batch (NumPy) to global arrays sharded over `data`."""
    _, sharded = _shardings(mesh)
    return {k: jax.make_array_from_process_local_data(sharded, v) for k, v in batch.items()}


def to_host(tree):
    """Replicated global arrays to NumPy, from this process's own copy (works on every process)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# --------------------------------------------------------------------------- the optimizer

SCHEDULES = ('cosine', 'linear', 'constant')


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


OPTIMIZERS = ('sgd', 'adamw', 'adam')


def kernels_mask(params):
    """True for the leaves weight decay applies to by default: the kernels of dense layers and convolutions,
    not biases, LayerNorm and GroupNorm scales, the class token or the position embeddings."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(lr: float, steps: int, warmup_steps: int, schedule: str = 'cosine', grad_norm_clip: float = 1.0,
                   *, optimizer: str = 'sgd', weight_decay: float = 0.0, weight_decay_on: str = 'kernels',
                   b1: float = 0.9, b2: float = 0.999, eps_root: float = 0.0):
    """(optax transformation, lr_fn). The default is the official recipe: clip to global norm 1, then SGD
    with momentum 0.9 and no weight decay (float32 momentum; the official code keeps it in bfloat16).

    `grad_norm_clip` 0 clips nothing. `optimizer='adamw'` is optax's AdamW (eps 1e-8); `'adam'`
    is big_vision's `scale_by_adam`, then the weight decay, then the learning rate. Weight
    decay is decoupled (the update is `-lr * (direction + weight_decay * param)`), on kernels
    only unless `weight_decay_on='all'`; with `sgd` it is added after the momentum the same way.
    `eps_root` > 0 puts Adam's epsilon inside the square root instead (a known deviation, for
    `parity grad`'s diagnosis).
    """
    if optimizer not in OPTIMIZERS:
        raise UserError(f'--optimizer {optimizer!r}: expected one of {", ".join(OPTIMIZERS)}')
    if weight_decay_on not in ('kernels', 'all'):
        raise UserError(f'--weight-decay-on {weight_decay_on!r}: expected kernels or all')
    lr_fn = learning_rate_schedule(lr, steps, warmup_steps, schedule)
    clip = [optax.clip_by_global_norm(grad_norm_clip)] if grad_norm_clip else []
    mask = kernels_mask if weight_decay_on == 'kernels' else None
    if optimizer == 'sgd' and not weight_decay:  # the official chain, exactly: old checkpoints keep their layout
        return optax.chain(*clip, optax.sgd(learning_rate=lr_fn, momentum=0.9)), lr_fn
    eps = 0.0 if eps_root else 1e-8
    if optimizer == 'adamw':
        return optax.chain(*clip, optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                              weight_decay=weight_decay, mask=mask)), lr_fn
    direction = (optax.trace(decay=0.9) if optimizer == 'sgd'
                 else optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root))
    decay = [optax.add_decayed_weights(weight_decay, mask)] if weight_decay else []
    return optax.chain(*clip, direction, *decay, optax.scale_by_learning_rate(lr_fn)), lr_fn


# --------------------------------------------------------------------------- the state

class TrainState(train_state.TrainState):
    """flax's `TrainState` (update count, params tree, optimizer `tx` and its state) and the dropout key.

    Step i draws its dropout from `fold_in(rng, i)`. `apply_fn` is None: the jitted step
    holds the model, built for its compute dtype and path.
    """

    rng: Any  # uint32[2] base key


def _new_state(tx, seed_key) -> Callable:
    """`params -> TrainState` at step 0, for jit and eval_shape alike."""
    return lambda p: TrainState(step=jnp.zeros((), jnp.int32), apply_fn=None, params=p, tx=tx,
                                opt_state=tx.init(p), rng=seed_key)


def init_params(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The Flax model's own initialisation (zero head and class token, as the official code), canonical NumPy."""
    S = cfg.image_size
    init = jax.jit(lambda key: VisionTransformer(cfg).init(key, np.zeros((1, S, S, 3), np.float32)))
    with jax.default_device(jax.local_devices(backend='cpu')[0]):  # host memory, this process only
        return params_from_variables(init(jax.random.PRNGKey(seed)))


def create_train_state(cfg: ViTConfig, params: dict, tx, seed: int = 0, mesh: Optional[Mesh] = None) -> TrainState:
    """A fresh `TrainState` for canonical NumPy `params`, replicated over `mesh` (default `make_mesh()`).

    `seed` makes the dropout key; `init_params(cfg, seed)` gives params for training from scratch.
    """
    mesh = mesh if mesh is not None else make_mesh()
    replicated, _ = _shardings(mesh)
    key = _replicate(np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))), mesh)
    tree = _replicate(variables_from_params(params)['params'], mesh)
    return jax.jit(lambda p, k: _new_state(tx, k)(p), out_shardings=replicated)(tree, key)


def abstract_train_state(cfg: ViTConfig, tx) -> TrainState:
    """The shapes and dtypes of a `TrainState` for `cfg`, computed without running anything."""
    shapes = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in weights.param_shapes(cfg).items()}
    key = jax.ShapeDtypeStruct((2,), np.uint32)
    return jax.eval_shape(lambda p, k: _new_state(tx, k)(p), variables_from_params(shapes)['params'], key)


def canonical_params(state: TrainState) -> dict[str, np.ndarray]:
    """The state's parameters as canonical NumPy arrays (this process's copy)."""
    return params_from_variables(to_host(state.params))


def params_digest(params: dict[str, np.ndarray]) -> str:
    """sha256 over names and bytes: equal digests mean bit-identical parameters."""
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the steps

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

    @property
    def soft_targets(self) -> bool:
        """Targets as distributions; else the official integer-label loss, so the default step stays bit-identical."""
        return self.loss == 'sigmoid' or self.label_smoothing > 0 or self.mixup > 0


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its config (its own resolution) and canonical NumPy params."""

    cfg: ViTConfig
    params: Any


def targets(obj: Objective, labels, num_classes: int):
    """(B, C) target distributions: one-hot, smoothed to `(1 - eps) onehot + eps / C` when asked."""
    onehot = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(onehot, obj.label_smoothing) if obj.label_smoothing else onehot


def objective_loss(obj: Objective, logits, rows: dict, teacher_logits: Sequence = (), student=None):
    """(loss, distillation term or None) of `obj` for (B, C) `logits` and `rows` ('label', and 'target' when
    `obj.soft_targets`). `student` is what the teachers teach (DeiT's distillation head; default `logits`);
    with no `teacher_logits` there is no distillation term.
    """
    if obj.loss == 'sigmoid':
        loss = sigmoid_cross_entropy(logits, rows['target']).mean()
    elif obj.soft_targets:
        loss = soft_cross_entropy(logits, rows['target']).mean()
    else:
        loss = cross_entropy(logits, rows['label']).mean()
    if not teacher_logits:
        return loss, None
    student = logits if student is None else student
    terms = [distillation_kl(student, t, obj.temperature) if obj.distill == 'soft'
             else cross_entropy(student, t.argmax(-1)) for t in teacher_logits]
    distill = sum(w * d.mean() for w, d in zip(obj.teacher_weights, terms))
    return (1.0 - obj.distill_alpha) * loss + obj.distill_alpha * distill, distill


def teachers_forward(teachers: Sequence[Teacher], dtype: str = 'float32', fast: bool = False) -> Callable:
    """`(trees, images) -> [(B, C) logits per teacher]`: each frozen teacher (its params tree in `trees`) on
    `images` resized on the device to its own resolution (bilinear, as tf.image.resize), no gradient."""
    models = [VisionTransformer(t.cfg, dtype=jnp.dtype(dtype), fast=fast) for t in teachers]

    def forward(trees, images):
        out = []
        for t, m, p in zip(teachers, models, trees):
            B, S = images.shape[0], t.cfg.image_size
            x = images if images.shape[1] == S else jax.image.resize(images, (B, S, S, 3), 'bilinear',
                                                                       antialias=False)
            out.append(jax.lax.stop_gradient(m.apply({'params': p}, x, train=False)))  # (B, C)
        return out
    return forward


MIXUP_STREAM = 0x6D697875  # mixup's random stream, apart from dropout's: fold_in(fold_in(rng, this), step)


def make_train_step(cfg: ViTConfig, tx, lr_fn: Optional[Callable] = None, *, mesh: Optional[Mesh] = None,
                    accum_steps: int = 1, dtype: str = 'float32', fast: bool = False,
                    objective: Objective = Objective(), teachers: Sequence[Teacher] = ()):
    """The jitted `train_step(state, batch) -> (state, metrics)` for `cfg` and optimizer `tx`.

    `batch` holds 'image' (B, S, S, 3) float32 and 'label' (B,) int32, sharded over `mesh`
    (see `shard_batch`). With `accum_steps` A > 1 the batch is split into A microbatches
    (row i goes to microbatch i mod A, so every device keeps its rows) whose gradients are
    averaged before one update; B / devices must divide by A. Metrics (device scalars):
    loss, accuracy, grad_norm (before clipping), learning_rate (the one this update used),
    and with teachers distill_loss. `dtype` is the compute dtype; `fast` takes the model's
    fast path (`vit_jax.fast`). `objective` sets the loss (see `Objective`); `teachers` run
    frozen in the step, on the same (mixed) images as the student, resized on the device to
    their own resolution; with `distill_alpha` 0 they are not run at all. With DeiT's
    `token_distilled` classifier the labels' loss is the class head's and the distillation
    term the distillation head's; accuracy is that of their mean, as evaluation predicts.
    """
    mesh = mesh if mesh is not None else make_mesh()
    replicated, sharded = _shardings(mesh)
    model = VisionTransformer(cfg, dtype=jnp.dtype(dtype), fast=fast)
    A, obj, C = accum_steps, objective, cfg.num_classes
    distilling = bool(teachers) and obj.distill_alpha > 0
    teacher_logits = teachers_forward(teachers, dtype, fast)
    teacher_trees = _replicate([variables_from_params(t.params)['params'] for t in teachers], mesh) \
        if distilling else []

    def loss_fn(params, rows, key, tree):
        logits = model.apply({'params': params}, rows['image'], train=True, rngs={'dropout': key},
                             both_heads=cfg.has_dist_token)  # (B/A, C), or a pair with DeiT's distillation token
        # DeiT: the class head learns from the labels, the distillation head from the teachers.
        logits, student = logits if cfg.has_dist_token else (logits, logits)
        teachers_say = teacher_logits(tree, rows['image']) if distilling else ()
        loss, distill = objective_loss(obj, logits, rows, teachers_say, student)
        predicted = (logits + student) / 2 if cfg.has_dist_token else logits  # what evaluation predicts
        aux = {'accuracy': (predicted.argmax(-1) == rows['label']).mean()}
        if distilling:
            aux['distill_loss'] = distill
        return loss, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, tree):
        rows = {'image': batch['image'], 'label': batch['label']}
        key = jax.random.fold_in(state.rng, state.step)
        if obj.soft_targets:
            rows['target'] = targets(obj, rows['label'], C)
        if obj.mixup:
            mix_key = jax.random.fold_in(jax.random.fold_in(state.rng, MIXUP_STREAM), state.step)
            rows['image'], rows['target'], _ = mixup(mix_key, rows['image'], rows['target'], obj.mixup)
        if A == 1:
            (loss, aux), grads = grad_fn(state.params, rows, key, tree)
        else:
            B = rows['label'].shape[0]

            def split(x):  # (B, ...) -> (A, B/A, ...), row i into microbatch i mod A
                x = x.reshape(B // A, A, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, 'data')))

            micro = {k: split(v) for k, v in rows.items()}

            def accumulate(carry, xs):
                i, r = xs
                (l, a), g = grad_fn(state.params, r, jax.random.fold_in(key, i), tree)
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda v: v[0], micro), key, tree)[0][1])),
                jax.tree.map(jnp.zeros_like, state.params))
            (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(A), micro))
            loss, aux, grads = jax.tree.map(lambda t: t / A, (loss, aux, grads))
        metrics = {'loss': loss, **aux, 'grad_norm': optax.tree.norm(grads)}
        if lr_fn is not None:
            metrics['learning_rate'] = lr_fn(state.step)
        return state.apply_gradients(grads=grads), metrics

    step = jax.jit(train_step, in_shardings=(replicated, sharded, replicated), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))
    return lambda state, batch: step(state, batch, teacher_trees)


def make_eval_step(cfg: ViTConfig, *, mesh: Optional[Mesh] = None, dtype: str = 'float32', fast: bool = False,
                   teachers: Sequence[Teacher] = ()):
    """Jitted `eval_step(params, batch, totals) -> totals`: adds the batch's 'correct', 'loss' and 'count'
    over its unmasked rows to `totals` (start from `eval_totals(mesh, len(teachers))`), all on the devices.

    With teachers, 'agree' (one count per teacher) adds the rows where the student's and
    the teacher's predicted classes are the same.
    """
    mesh = mesh if mesh is not None else make_mesh()
    replicated, sharded = _shardings(mesh)
    model = VisionTransformer(cfg, dtype=jnp.dtype(dtype), fast=fast)
    teacher_logits = teachers_forward(teachers, dtype, fast)
    teacher_trees = _replicate([variables_from_params(t.params)['params'] for t in teachers], mesh)

    def eval_step(params, batch, totals, tree):
        logits = model.apply({'params': params}, batch['image'], train=False)  # (B, C)
        mask = batch['mask']
        out = {'correct': totals['correct'] + jnp.sum((logits.argmax(-1) == batch['label']) & mask),
               'loss': totals['loss'] + jnp.sum(jnp.where(mask, cross_entropy(logits, batch['label']), 0.0)),
               'count': totals['count'] + jnp.sum(mask)}
        if teachers:
            agree = [jnp.sum((t.argmax(-1) == logits.argmax(-1)) & mask) for t in teacher_logits(tree, batch['image'])]
            out['agree'] = totals['agree'] + jnp.stack(agree)
        return out

    step = jax.jit(eval_step, in_shardings=(replicated, sharded, replicated, replicated), out_shardings=replicated,
                   donate_argnums=(2,))
    return lambda params, batch, totals: step(params, batch, totals, teacher_trees)


def eval_totals(mesh: Mesh, teachers: int = 0) -> dict:
    """Zero totals for `make_eval_step` (with `teachers` agreement counts)."""
    totals = {'correct': np.int32(0), 'loss': np.float32(0), 'count': np.int32(0)}
    if teachers:
        totals['agree'] = np.zeros(teachers, np.int32)
    return _replicate(totals, mesh)


def evaluate(eval_step, params, dataset: Dataset, batch_size: int, image_size: int, mesh: Mesh,
             teachers: int = 0) -> dict:
    """Test-split loss and accuracy of replicated `params`; sums stay on the devices until the end.

    With `teachers` (the eval step's), 'teacher_agreement' lists the fraction of test
    images on which the student predicts each teacher's class.
    """
    totals = eval_totals(mesh, teachers)
    for batch in dataset.eval_batches(None, batch_size, image_size, jax.process_index(), jax.process_count()):
        totals = eval_step(params, shard_batch(batch, mesh), totals)
    totals = to_host(totals)
    n = int(totals['count'])
    out = {'examples': n, 'loss': float(totals['loss']) / max(n, 1), 'accuracy': int(totals['correct']) / max(n, 1)}
    if teachers:
        out['teacher_agreement'] = [int(a) / max(n, 1) for a in totals['agree']]
    return out


# --------------------------------------------------------------------------- checkpoints

def _leaf_name(path) -> str:
    """A TrainState leaf's name in checkpoints: params under `params/` in canonical names (so
    `weights.load_npz` reads a training checkpoint as a model), the rest by pytree path."""
    field, *rest = path
    if field.name == 'params':
        return 'params/' + '/'.join(str(k.key) for k in rest)
    return field.name + jax.tree_util.keystr(tuple(rest))


def state_arrays(state: TrainState) -> dict[str, Any]:
    """A TrainState (or its abstract shapes) as flat named leaves."""
    return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def save_checkpoint(workdir: str, state: TrainState, keep: int) -> str:
    """Writes DIR/checkpoints/ckpt-STEP.npz atomically (temp file, then rename); keeps the newest `keep`.

    A failed write (a full disk) is a `UserError` and leaves the older checkpoints as they were.
    """
    directory = os.path.join(workdir, CHECKPOINTS)
    files.make_dirs(directory)
    arrays = state_arrays(to_host(state))
    path = os.path.join(directory, f'ckpt-{int(arrays["step"]):07d}.npz')
    containers.write_npz(path, arrays, durable=True)
    for old in list_checkpoints(workdir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old[1])
    return path


def remove_temporaries(workdir: str) -> list[str]:
    """Deletes what a killed run left half-written in DIR and DIR/checkpoints (`files.TEMPORARY` names).

    Only the workdir's lock holder may call it: nobody else is writing there.
    """
    return files.remove_temporaries(workdir) + files.remove_temporaries(os.path.join(workdir, CHECKPOINTS))


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in DIR/checkpoints, oldest first."""
    directory = os.path.join(workdir, CHECKPOINTS)
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if m := CHECKPOINT.match(name):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def restore_checkpoint(path: str, template: TrainState, mesh: Mesh) -> TrainState:
    """The TrainState saved at `path`, checked leaf by leaf against `template` (see
    `abstract_train_state`), replicated over `mesh`."""
    saved = weights.read_npz(path)
    want = state_arrays(template)
    wrong = [k for k, v in want.items() if k not in saved or saved[k].shape != v.shape or saved[k].dtype != v.dtype]
    if wrong or saved.keys() != want.keys():
        raise UserError(f'{path}: not a checkpoint of this run ({len(wrong)} arrays missing or different, '
                        f'e.g. {", ".join(wrong[:2])}); use a new --workdir')
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return _replicate(treedef.unflatten([saved[_leaf_name(p)] for p, _ in paths]), mesh)
