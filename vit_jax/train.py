"""Fine-tuning and training through XLA: the library (devices, state, teachers, steps, evaluation).

The steps run the official fine-tuning recipe by default (google-research/vision_transformer,
`train.py` and `configs/common.py`), with gradient accumulation (`accumulate_gradient`);
the loss and the optimizer are `vit_jax.objective`'s, the checkpoints `vit_jax.checkpoint`'s.
`python -m vit_jax train` (`vit_jax.train_cli`) runs it with the settings of
`vit_jax.settings`. For scripts and benchmarks, everything on one `Mesh` over all devices:

    mesh = make_mesh()                                     # every device of every process
    tx, lr_fn = make_optimizer(TrainSettings(lr=0.03, steps=500, warmup_steps=100))
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

import collections
import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parity import cli
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import class_names as names
from parity.data.datasets import Dataset
from vit_jax.model import VisionTransformer
from vit_jax.objective import Objective, cross_entropy, mixup, objective_loss, targets
from vit_jax.params import params_from_variables, variables_from_params

# --------------------------------------------------------------------------- devices

def make_mesh(devices=None) -> Mesh:
    """A 1-D `Mesh` named `data` over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def _shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(replicated, sharded along `data`) on `mesh`."""
    return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def replicate(tree, mesh: Mesh):
    """Host arrays (identical on every process) to arrays replicated over `mesh`."""
    replicated, _ = _shardings(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: np.asarray(x)[i]),
                        tree)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a global batch (NumPy) to global arrays sharded over `data`."""
    _, sharded = _shardings(mesh)
    return {k: jax.make_array_from_process_local_data(sharded, v) for k, v in batch.items()}


def prefetch(batches: Iterator[dict], mesh: Mesh, count: int, size: int = 2) -> Iterator[dict]:
    """`count` batches of `batches` (NumPy, this process's rows), each put on the devices by `shard_batch` up to
    `size` steps ahead.

    The host pipeline then reads and transfers the next batches while the step dispatched before
    runs, instead of between two steps; the stream is the same batches in the same order, and no
    more than `count` are read (a resumed or finished run reads nothing past its last step).
    """
    queue: collections.deque = collections.deque()
    fetched = 0
    for _ in range(count):
        while len(queue) < size and fetched < count:
            queue.append(shard_batch(next(batches), mesh))
            fetched += 1
        yield queue.popleft()


def to_host(tree):
    """Replicated global arrays to NumPy, from this process's own copy (works on every process)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


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
    key = replicate(np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))), mesh)
    tree = replicate(variables_from_params(params)['params'], mesh)
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

@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its config (its own resolution) and canonical NumPy params."""

    cfg: ViTConfig
    params: Any


def load_teachers(teachers: Sequence[tuple[str, Optional[str]]], num_classes: int, student: str,
                  image_size: Optional[int] = None, numerics: str = 'source',
                  class_names: Optional[Sequence[str]] = None) -> list[Teacher]:
    """Each (checkpoint, config or None) of `teachers` read for inference (at `image_size`, default its own
    resolution, with `--numerics` `numerics`), checked to predict the `num_classes` classes of `student` (what the
    error names), and the same `class_names` where both the teacher and the student's dataset name them."""
    out = []
    for path, config in teachers:
        model = cli.load_model(path, config, image_size, numerics=numerics)
        if model.cfg.num_classes != num_classes:
            raise UserError(f'--teacher {path}: it predicts {model.cfg.num_classes} classes and {student} has '
                            f'{num_classes}; a teacher must be trained on the same classes')
        own = model.checkpoint.labels
        if own and class_names and tuple(own) != tuple(class_names):
            raise UserError(f'--teacher {path}: it was trained on other classes than {student}: '
                            f'{names.change(own, class_names)}; a teacher must be trained on the same classes')
        out.append(Teacher(model.cfg, model.params))
    return out


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


def accumulate_gradient(grad_fn: Callable, params, rows: dict, key, accum_steps: int, mesh: Mesh):
    """`grad_fn(params, rows, key) -> ((loss, aux), grads)` averaged over `accum_steps` A microbatches of
    `rows`, as the official code's `train_utils.accumulate_gradient`: one microbatch's activations in
    memory at a time. Row i goes to microbatch i mod A, so every device keeps its own rows (B / devices
    must divide by A); microbatch i draws its randomness from `fold_in(key, i)`. With A = 1, `grad_fn`
    on the whole batch.
    """
    if accum_steps == 1:
        return grad_fn(params, rows, key)
    A, B = accum_steps, rows['label'].shape[0]

    def split(x):  # (B, ...) -> (A, B/A, ...), row i into microbatch i mod A
        x = x.reshape(B // A, A, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, 'data')))

    micro = {k: split(v) for k, v in rows.items()}

    def accumulate(carry, xs):
        i, r = xs
        (loss, aux), g = grad_fn(params, r, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, g)), None

    zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: grad_fn(params, jax.tree.map(lambda v: v[0], micro), key)[0][1])),
        jax.tree.map(jnp.zeros_like, params))
    (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(A), micro))
    loss, aux, grads = jax.tree.map(lambda t: t / A, (loss, aux, grads))
    return (loss, aux), grads


MIXUP_STREAM = 0x6D697875  # mixup's random stream, apart from dropout's: fold_in(fold_in(rng, this), step)


def make_train_step(cfg: ViTConfig, tx, lr_fn: Optional[Callable] = None, *, mesh: Optional[Mesh] = None,
                    accum_steps: int = 1, dtype: str = 'float32', fast: bool = False,
                    objective: Objective = Objective(), teachers: Sequence[Teacher] = (), remat: str = 'none'):
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
    `remat` ('none', 'block', 'dots') recomputes each encoder block in the backward pass
    (`vit_jax.fast.remat_block`): less memory, the same gradients.
    """
    mesh = mesh if mesh is not None else make_mesh()
    replicated, sharded = _shardings(mesh)
    model = VisionTransformer(cfg, dtype=jnp.dtype(dtype), fast=fast, remat=remat)
    A, obj, C = accum_steps, objective, cfg.num_classes
    distilling = bool(teachers) and obj.distill_alpha > 0
    teacher_logits = teachers_forward(teachers, dtype, fast)
    teacher_trees = replicate([variables_from_params(t.params)['params'] for t in teachers], mesh) \
        if distilling else []

    def loss_fn(params, rows, key, tree):
        logits = model.apply({'params': params}, rows['image'], train=True, rngs={'dropout': key},
                             both_heads=cfg.has_dist_token)  # (B/A, C), or a pair with DeiT's distillation token
        # DeiT: the class head learns from the labels, the distillation head from the teachers.
        logits, student = logits if cfg.has_dist_token else (logits, logits)
        teachers_say = teacher_logits(tree, rows['image']) if distilling else ()
        loss, distill = objective_loss(obj, logits, rows['label'], rows.get('target'), teachers_say, student)
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
        (loss, aux), grads = accumulate_gradient(lambda p, r, k: grad_fn(p, r, k, tree), state.params, rows, key,
                                                 A, mesh)
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
    teacher_trees = replicate([variables_from_params(t.params)['params'] for t in teachers], mesh)

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
    return replicate(totals, mesh)


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
