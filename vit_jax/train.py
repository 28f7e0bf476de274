"""Fine-tuning and training through XLA: `python -m vit_jax train ...`, and the library under it.

The recipe is the official fine-tuning one (google-research/vision_transformer, `train.py`
and `configs/common.py`): SGD with momentum 0.9, gradients clipped to global norm 1.0,
no weight decay, linear warm-up then cosine (or linear) decay, gradient accumulation,
softmax cross-entropy. `digits` trains a small ViT from scratch with the same recipe and
its own step count, batch and learning rate (`RECIPES`).

The library, for scripts and benchmarks (everything on one `Mesh` over all devices):

    mesh = make_mesh()                                     # every device of every process
    tx, lr_fn = make_optimizer(lr=0.03, steps=500, warmup_steps=100)
    state = create_train_state(cfg, params, tx, mesh=mesh)  # params: canonical NumPy dict
    train_step = make_train_step(cfg, tx, lr_fn, mesh=mesh, accum_steps=1, dtype='float32', use_sdpa=True)
    state, metrics = train_step(state, shard_batch(batch, mesh))

`train_step(state, batch) -> (state, metrics)` is pure and compiled once by `jax.jit`:
the batch is sharded over the mesh's `data` axis, parameters and optimizer state are
replicated, the incoming state's buffers are donated, and nothing leaves the devices
inside the step (metrics stay device arrays until the caller reads them).

Shapes: B global batch, Bl per-process rows, A accumulation steps, S image size, C classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from parity import cli, data, files, weights
from parity.config import ViTConfig, load_config
from parity.errors import UserError

DIGITS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'digits.json')
CHECKPOINTS = 'checkpoints'
CHECKPOINT = re.compile(r'^ckpt-(\d+)\.npz$')


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Defaults of one dataset; every field is a command-line flag."""

    steps: int
    warmup_steps: int
    batch_size: int = 512
    accum_steps: int = 8
    lr: float = 0.03
    eval_every: int = 100


# The official fine-tuning defaults (configs/common.py; configs/augreg.py for other datasets).
# digits trains from scratch on 1,437 images: a higher rate, a smaller batch, no accumulation.
RECIPES = {
    'cifar10': Recipe(steps=10_000, warmup_steps=500),
    'cifar100': Recipe(steps=10_000, warmup_steps=500),
    'imagenet2012': Recipe(steps=20_000, warmup_steps=500),
    data.DIGITS: Recipe(steps=1000, warmup_steps=50, batch_size=128, accum_steps=1, lr=0.1, eval_every=200),
}
DEFAULT_RECIPE = Recipe(steps=500, warmup_steps=100)
# Settings a restart must repeat exactly to continue the same run.
RUN_KEYS = ('config', 'dataset', 'checkpoint', 'image_size', 'steps', 'batch_size', 'accum_steps', 'lr',
            'warmup_steps', 'schedule', 'dtype', 'seed')


# --------------------------------------------------------------------------- the library

def make_mesh(devices=None):
    """A 1-D `Mesh` named `data` over `devices` (default: every device of every process)."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


def _shardings(mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P

    return NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


def learning_rate_schedule(lr: float, steps: int, warmup_steps: int, schedule: str = 'cosine',
                           linear_end: float = 1e-5) -> Callable:
    """The official schedule: linear warm-up to `lr`, then cosine or linear decay until `steps`."""
    import jax.numpy as jnp

    if schedule not in ('cosine', 'linear'):
        raise UserError(f'--schedule {schedule!r}: expected cosine or linear')

    def lr_fn(step):
        progress = jnp.clip((step - warmup_steps) / float(max(steps - warmup_steps, 1)), 0.0, 1.0)
        if schedule == 'cosine':
            value = lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            value = linear_end + (lr - linear_end) * (1.0 - progress)
        if warmup_steps:
            value = value * jnp.minimum(1.0, step / warmup_steps)
        return jnp.asarray(value, jnp.float32)

    return lr_fn


def make_optimizer(lr: float, steps: int, warmup_steps: int, schedule: str = 'cosine', grad_norm_clip: float = 1.0):
    """(optax transformation, lr_fn): the official recipe, clipping to global norm 1 then SGD momentum 0.9.

    No weight decay; float32 momentum (the official code keeps it in bfloat16 to save memory).
    """
    import optax

    lr_fn = learning_rate_schedule(lr, steps, warmup_steps, schedule)
    return optax.chain(optax.clip_by_global_norm(grad_norm_clip), optax.sgd(learning_rate=lr_fn, momentum=0.9)), lr_fn


def _register_state():
    import flax.struct

    @flax.struct.dataclass
    class TrainState:
        """Everything a step changes: the update count, parameters, optimizer state, dropout key."""

        step: Any  # int32 scalar: updates done so far
        params: Any  # nested Flax params tree
        opt_state: Any
        rng: Any  # uint32[2] base key; step i uses fold_in(rng, i)

    return TrainState


_TRAIN_STATE = None


def train_state_class():
    """The `TrainState` pytree class (defined on first use, so importing this module needs no flax)."""
    global _TRAIN_STATE
    if _TRAIN_STATE is None:
        _TRAIN_STATE = _register_state()
    return _TRAIN_STATE


def _replicate(tree, mesh):
    """Host arrays (identical on every process) to arrays replicated over `mesh`."""
    import jax

    replicated, _ = _shardings(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: np.asarray(x)[i]),
                        tree)


def _new_state(tx, seed_key):
    """`params -> TrainState` at step 0, for jit and eval_shape alike."""
    import jax.numpy as jnp

    TrainState = train_state_class()
    return lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=seed_key)


def init_params(cfg: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The Flax model's own initialisation (zero head and class token, as the official code), canonical NumPy."""
    import jax

    from vit_jax.checkpoint import params_from_variables
    from vit_jax.model import VisionTransformer

    S = cfg.image_size
    init = jax.jit(lambda key: VisionTransformer(cfg).init(key, np.zeros((1, S, S, 3), np.float32)))
    with jax.default_device(jax.local_devices(backend='cpu')[0]):  # host memory, this process only
        return params_from_variables(init(jax.random.PRNGKey(seed)))


def create_train_state(cfg: ViTConfig, params: dict, tx, seed: int = 0, mesh=None):
    """A fresh `TrainState` for canonical NumPy `params`, replicated over `mesh` (default `make_mesh()`).

    `seed` makes the dropout key; `init_params(cfg, seed)` gives params for training from scratch.
    """
    import jax

    from vit_jax.checkpoint import variables_from_params

    mesh = mesh if mesh is not None else make_mesh()
    replicated, _ = _shardings(mesh)
    key = _replicate(np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))), mesh)
    tree = _replicate(variables_from_params(params)['params'], mesh)
    return jax.jit(lambda p, k: _new_state(tx, k)(p), out_shardings=replicated)(tree, key)


def abstract_train_state(cfg: ViTConfig, tx):
    """The shapes and dtypes of a `TrainState` for `cfg`, computed without running anything."""
    import jax

    from vit_jax.checkpoint import variables_from_params

    shapes = {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in weights.param_shapes(cfg).items()}
    key = jax.ShapeDtypeStruct((2,), np.uint32)
    return jax.eval_shape(lambda p, k: _new_state(tx, k)(p), variables_from_params(shapes)['params'], key)


def shard_batch(batch: dict, mesh):
    """This process's rows of a global batch (NumPy) to global arrays sharded over `data`."""
    import jax

    _, sharded = _shardings(mesh)
    return {k: jax.make_array_from_process_local_data(sharded, v) for k, v in batch.items()}


def _cross_entropy(logits, labels):
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # (B, C)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]  # (B,)


def make_train_step(cfg: ViTConfig, tx, lr_fn: Optional[Callable] = None, *, mesh=None, accum_steps: int = 1,
                    dtype: str = 'float32', use_sdpa: bool = False):
    """The jitted `train_step(state, batch) -> (state, metrics)` for `cfg` and optimizer `tx`.

    `batch` holds 'image' (B, S, S, 3) float32 and 'label' (B,) int32, sharded over `mesh`
    (see `shard_batch`). With `accum_steps` A > 1 the batch is split into A microbatches
    (row i goes to microbatch i mod A, so every device keeps its rows) whose gradients are
    averaged before one update; B / devices must divide by A. Metrics (device scalars):
    loss, accuracy, grad_norm (before clipping), learning_rate (the one this update used).
    `dtype` is the compute dtype; `use_sdpa` takes the model's fast path (see `VisionTransformer`).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import PartitionSpec as P

    from vit_jax.model import VisionTransformer

    mesh = mesh if mesh is not None else make_mesh()
    replicated, sharded = _shardings(mesh)
    model = VisionTransformer(cfg, dtype=jnp.dtype(dtype), use_sdpa=use_sdpa)
    A = accum_steps

    def loss_fn(params, images, labels, key):
        logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})  # (B/A, C)
        losses = _cross_entropy(logits, labels)
        return losses.mean(), (logits.argmax(-1) == labels).mean()

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch):
        images, labels = batch['image'], batch['label']
        key = jax.random.fold_in(state.rng, state.step)
        if A == 1:
            (loss, acc), grads = grad_fn(state.params, images, labels, key)
        else:
            B = images.shape[0]
            micro = images.reshape(B // A, A, *images.shape[1:]).swapaxes(0, 1)  # (A, B/A, S, S, 3)
            micro = jax.lax.with_sharding_constraint(micro, jax.sharding.NamedSharding(mesh, P(None, 'data')))
            micro_labels = labels.reshape(B // A, A).T  # (A, B/A)

            def accumulate(carry, xs):
                i, x, y = xs
                (l, a), g = grad_fn(state.params, x, y, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (loss, acc, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(A), micro, micro_labels))
            loss, acc, grads = jax.tree.map(lambda t: t / A, (loss, acc, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {'loss': loss, 'accuracy': acc, 'grad_norm': optax.tree.norm(grads)}
        if lr_fn is not None:
            metrics['learning_rate'] = lr_fn(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                   donate_argnums=(0,))


def make_eval_step(cfg: ViTConfig, *, mesh=None, dtype: str = 'float32', use_sdpa: bool = False):
    """Jitted `eval_step(params, batch, totals) -> totals`: adds the batch's 'correct', 'loss' and 'count'
    over its unmasked rows to `totals` (start from `eval_totals(mesh)`), all on the devices."""
    import jax
    import jax.numpy as jnp

    from vit_jax.model import VisionTransformer

    mesh = mesh if mesh is not None else make_mesh()
    replicated, sharded = _shardings(mesh)
    model = VisionTransformer(cfg, dtype=jnp.dtype(dtype), use_sdpa=use_sdpa)

    def eval_step(params, batch, totals):
        logits = model.apply({'params': params}, batch['image'], train=False)  # (B, C)
        mask = batch['mask']
        return {'correct': totals['correct'] + jnp.sum((logits.argmax(-1) == batch['label']) & mask),
                'loss': totals['loss'] + jnp.sum(jnp.where(mask, _cross_entropy(logits, batch['label']), 0.0)),
                'count': totals['count'] + jnp.sum(mask)}

    return jax.jit(eval_step, in_shardings=(replicated, sharded, replicated), out_shardings=replicated,
                   donate_argnums=(2,))


def eval_totals(mesh):
    """Zero totals for `make_eval_step`."""
    return _replicate({'correct': np.int32(0), 'loss': np.float32(0), 'count': np.int32(0)}, mesh)


def to_host(tree):
    """Replicated global arrays to NumPy, from this process's own copy (works on every process)."""
    import jax

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def canonical_params(state) -> dict[str, np.ndarray]:
    from vit_jax.checkpoint import params_from_variables

    return params_from_variables(to_host(state.params))


def params_digest(params: dict[str, np.ndarray]) -> str:
    """sha256 over names and bytes: equal digests mean bit-identical parameters."""
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- checkpoints

def _leaf_name(path) -> str:
    """A TrainState leaf's name in checkpoints: params under `params/` in canonical names (so
    `weights.load_npz` reads a training checkpoint as a model), the rest by pytree path."""
    import jax

    field, *rest = path
    if field.name == 'params':
        return 'params/' + '/'.join(str(k.key) for k in rest)
    return field.name + jax.tree_util.keystr(tuple(rest))


def state_arrays(state) -> dict[str, Any]:
    """A TrainState (or its abstract shapes) as flat named leaves."""
    import jax

    return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def save_checkpoint(workdir: str, state, keep: int) -> str:
    """Writes DIR/checkpoints/ckpt-STEP.npz atomically (temp file, then rename); keeps the newest `keep`."""
    directory = os.path.join(workdir, CHECKPOINTS)
    os.makedirs(directory, exist_ok=True)
    arrays = state_arrays(to_host(state))
    path = os.path.join(directory, f'ckpt-{int(arrays["step"]):07d}.npz')
    with files.atomic_path(path, durable=True) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)
    for old in list_checkpoints(workdir)[:-keep]:
        os.unlink(old[1])
    return path


def remove_partial_checkpoints(workdir: str) -> None:
    """Deletes temporary files a killed run left half-written (complete checkpoints are never temporary)."""
    directory = os.path.join(workdir, CHECKPOINTS)
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if CHECKPOINT.match(name.split('.tmp-')[0]) and '.tmp-' in name:
            os.unlink(os.path.join(directory, name))


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in DIR/checkpoints, oldest first."""
    directory = os.path.join(workdir, CHECKPOINTS)
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if m := CHECKPOINT.match(name):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def restore_checkpoint(path: str, template, mesh):
    """The TrainState saved at `path`, checked leaf by leaf against `template` (see
    `abstract_train_state`), replicated over `mesh`."""
    import jax

    saved = weights.read_npz(path)
    want = state_arrays(template)
    wrong = [k for k, v in want.items() if k not in saved or saved[k].shape != v.shape or saved[k].dtype != v.dtype]
    if wrong or saved.keys() != want.keys():
        raise UserError(f'{path}: not a checkpoint of this run ({len(wrong)} arrays missing or different, '
                        f'e.g. {", ".join(wrong[:2])}); use a new --workdir')
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return _replicate(treedef.unflatten([saved[_leaf_name(p)] for p, _ in paths]), mesh)


# --------------------------------------------------------------------------- the command

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m vit_jax train', description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='defaults: the official fine-tuning recipe (SGD momentum 0.9, clip 1.0, no weight decay, warm-up '
               'then cosine; batch 512, accumulation 8, lr 0.03; 10k steps on cifar10/100, 20k on imagenet2012, '
               '500 elsewhere; crop 384). --dataset digits trains a small ViT from scratch '
               '(vit_jax/configs/digits.json at 8x8; 1000 steps of 128, lr 0.1, warm-up 50, no accumulation).')
    p.add_argument('--config', metavar='NAME_OR_JSON',
                   help='official config name or JSON file (default: inferred from --checkpoint; for digits '
                        'vit_jax/configs/digits.json)')
    p.add_argument('--dataset', required=True, metavar='NAME', help='digits, or a tensorflow-datasets name')
    p.add_argument('--workdir', required=True, metavar='DIR', help='metrics, checkpoints, final.npz, config.json')
    p.add_argument('--checkpoint', metavar='PRETRAINED.npz',
                   help='fine-tune from this checkpoint (position embeddings resized, head re-initialised)')
    p.add_argument('--image-size', type=int, metavar='N', help='training resolution (default: 384; digits 8)')
    p.add_argument('--steps', type=int, metavar='N', help='optimizer updates')
    p.add_argument('--batch-size', type=int, metavar='N', help='global batch (all devices and processes)')
    p.add_argument('--accum-steps', type=int, metavar='N', help='microbatches per update (gradient accumulation)')
    p.add_argument('--lr', type=float, metavar='F', help='peak learning rate')
    p.add_argument('--warmup-steps', type=int, metavar='N', help='linear warm-up steps')
    p.add_argument('--schedule', choices=('cosine', 'linear'), default='cosine', help='decay after warm-up')
    p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='compute dtype (parameters and optimizer state stay float32)')
    p.add_argument('--eval-every', type=int, metavar='N',
                   help='evaluate on the test split every N steps (0: only at the end)')
    p.add_argument('--seed', type=int, default=0, metavar='N', help='initialisation, data order, augmentation, dropout')
    p.add_argument('--checkpoint-every', type=int, metavar='N',
                   help='write a checkpoint every N steps (default: --eval-every)')
    p.add_argument('--keep-checkpoints', type=int, default=3, metavar='N', help='newest checkpoints kept (default 3)')
    p.add_argument('--log-every', type=int, default=10, metavar='N', help='metrics line every N steps (default 10)')
    p.add_argument('--data-dir', metavar='DIR', help='tensorflow-datasets data directory')
    p.add_argument('--coordinator', metavar='HOST:PORT',
                   help='multi-host: address of process 0 (or JAX_COORDINATOR_ADDRESS)')
    p.add_argument('--num-processes', type=int, metavar='N',
                   help='multi-host: number of processes (or JAX_NUM_PROCESSES)')
    p.add_argument('--process-id', type=int, metavar='I',
                   help='multi-host: this process, 0..N-1 (or JAX_PROCESS_ID)')
    return p


def init_distributed(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> None:
    """`jax.distributed.initialize` from the flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    Nothing set means one process. Values left unset are auto-detected by JAX on the
    clusters it knows (SLURM, Open MPI, ...). On CPU, collectives go through gloo.
    """
    env = os.environ
    coordinator = coordinator or env.get('JAX_COORDINATOR_ADDRESS')
    if num_processes is None and env.get('JAX_NUM_PROCESSES'):
        num_processes = int(env['JAX_NUM_PROCESSES'])
    if process_id is None and env.get('JAX_PROCESS_ID'):
        process_id = int(env['JAX_PROCESS_ID'])
    if coordinator is None and num_processes is None and process_id is None:
        return
    if num_processes is not None and not (num_processes >= 1 and process_id is not None
                                          and 0 <= process_id < num_processes):
        raise UserError(f'--process-id {process_id} with --num-processes {num_processes}: '
                        'each process needs its own id in 0..N-1')
    import jax

    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (ValueError, RuntimeError) as e:
        raise UserError(f'cannot join the distributed run at {coordinator} ({str(e).splitlines()[0][:160]}); '
                        'check --coordinator HOST:PORT, --num-processes and --process-id') from None


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f'--{name.replace("_", "-")} {value}: must be positive')


def _check_workdir(workdir: str) -> None:
    """A directory that is or can be made writable; created only once every other check has passed."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f'--workdir {workdir}: {path} exists and is not a directory; pick another path')
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f'--workdir {workdir}: {path} is not writable; pick a writable path')


def _model(args, dataset: data.Dataset, image_size: int) -> tuple[ViTConfig, Optional[dict]]:
    """The config to train, and the fine-tuning params (None: initialise from scratch)."""
    if args.checkpoint is None:
        spec = args.config or (DIGITS_CONFIG if dataset.name == data.DIGITS else None)
        if spec is None:
            raise UserError(f'--dataset {dataset.name}: pass --config (an official name or JSON) or --checkpoint '
                            'to fine-tune; only digits has a default model')
        cfg = load_config(spec)
        return cfg.replace(num_classes=dataset.num_classes, image_size=image_size), None
    params = weights.load_npz(args.checkpoint)
    # Fine-tuning drops the representation layer unless the config asks for one, as the official code does.
    cfg = load_config(args.config) if args.config else weights.infer_config(params).replace(representation_size=None)
    cfg = cfg.replace(num_classes=dataset.num_classes, image_size=image_size)
    cfg.grid_for(image_size)
    return cfg, weights.prepare_for_finetuning(params, cfg, args.checkpoint)


def _settings(args, recipe: Recipe, cfg: ViTConfig) -> dict:
    """Every setting of the run, defaults filled in; RUN_KEYS of it must match on restart."""
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else getattr(recipe, name)  # noqa: E731
    s = {'config': dict(cfg.to_official_dict(), image_size=cfg.image_size), 'dataset': args.dataset,
         'checkpoint': os.path.abspath(args.checkpoint) if args.checkpoint else None,
         'image_size': cfg.image_size, 'schedule': args.schedule, 'dtype': args.dtype, 'seed': args.seed}
    for name in ('steps', 'batch_size', 'accum_steps', 'lr', 'warmup_steps', 'eval_every'):
        s[name] = pick(name)
    s['checkpoint_every'] = args.checkpoint_every or s['eval_every'] or s['steps']
    if s['warmup_steps'] < 0 or s['warmup_steps'] >= s['steps']:
        raise UserError(f'--warmup-steps {s["warmup_steps"]} must be at least 0 and below --steps {s["steps"]}')
    if s['lr'] <= 0:
        raise UserError(f'--lr {s["lr"]}: must be positive')
    if s['batch_size'] % s['accum_steps']:
        raise UserError(f'--batch-size {s["batch_size"]} is not divisible by --accum-steps {s["accum_steps"]}')
    return s


def _claim_workdir(workdir: str, settings: dict, is_writer: bool) -> None:
    """Records the run's settings in DIR/run.json, or checks that a restart repeats them."""
    path = os.path.join(workdir, 'run.json')
    mine = {k: settings[k] for k in RUN_KEYS}
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f'--workdir {workdir}: run.json is unreadable ({e}); use a new --workdir') from None
        differ = [k for k in RUN_KEYS if theirs.get(k) != mine[k]]
        if differ:
            raise UserError(f'--workdir {workdir} holds a run with other settings ({", ".join(differ)}: '
                            f'{", ".join(f"{theirs.get(k)!r} there" for k in differ[:2])}); '
                            'repeat that command to resume it, or use a new --workdir')
    elif list_checkpoints(workdir) or os.path.exists(os.path.join(workdir, 'final.npz')):
        raise UserError(f'--workdir {workdir} holds checkpoints of an unknown run; use a new --workdir')
    elif is_writer:
        os.makedirs(workdir, exist_ok=True)
        _write_json(path, mine)


def _write_json(path: str, obj) -> None:
    files.write_text(path, json.dumps(obj, indent=2) + '\n')


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line; None for a line cut short when a run was killed mid-write."""
    try:
        return json.loads(line)['step']
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


class MetricsLog:
    """DIR/metrics.jsonl; on restart, lines past the resumed step are dropped (they will be redone)."""

    def __init__(self, path: str, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if _step_of(line) is not None and _step_of(line) <= start_step]
            files.write_text(path, ''.join(keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


def evaluate(eval_step, params, dataset: data.Dataset, batch_size: int, image_size: int, mesh) -> dict:
    """Test-split loss and accuracy of replicated `params`; sums stay on the devices until the end."""
    import jax

    totals = eval_totals(mesh)
    for batch in dataset.eval_batches(None, batch_size, image_size, jax.process_index(), jax.process_count()):
        totals = eval_step(params, shard_batch(batch, mesh), totals)
    totals = to_host(totals)
    n = int(totals['count'])
    return {'examples': n, 'loss': float(totals['loss']) / max(n, 1), 'accuracy': int(totals['correct']) / max(n, 1)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Fine-tune an official checkpoint, or train from scratch, on one dataset through XLA.

    Data-parallel over every device of every process. DIR gets metrics.jsonl, run.json,
    checkpoints/ (atomic, newest kept), and at the end final.npz (released layout) and
    config.json (official layout). Running the same command again resumes from the last
    checkpoint, data order and random state included.
    """
    args = _parser().parse_args(argv)
    _positive(args, 'steps', 'batch_size', 'accum_steps', 'checkpoint_every', 'keep_checkpoints', 'log_every',
              'image_size')
    if args.eval_every is not None and args.eval_every < 0:
        raise UserError(f'--eval-every {args.eval_every}: must be 0 (only at the end) or more')
    if args.seed < 0:
        raise UserError(f'--seed {args.seed}: must be 0 or more')
    _check_workdir(args.workdir)
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    import jax

    dataset = data.load(args.dataset, args.data_dir)
    image_size = args.image_size or dataset.preset.image_size
    cfg, finetune = _model(args, dataset, image_size)
    s = _settings(args, RECIPES.get(args.dataset, DEFAULT_RECIPE), cfg)
    B, A = s['batch_size'], s['accum_steps']
    devices, pid, procs = jax.device_count(), jax.process_index(), jax.process_count()
    if B % devices or (B // devices) % A:
        raise UserError(f'--batch-size {B} does not split over {devices} devices with --accum-steps {A}; '
                        f'pick a multiple of {devices * A}')
    writer = pid == 0
    _claim_workdir(args.workdir, s, writer)
    if writer:
        remove_partial_checkpoints(args.workdir)

    mesh = make_mesh()
    tx, lr_fn = make_optimizer(s['lr'], s['steps'], s['warmup_steps'], s['schedule'])
    found = list_checkpoints(args.workdir)
    if found:
        state = restore_checkpoint(found[-1][1], abstract_train_state(cfg, tx), mesh)
    else:
        params = finetune if finetune is not None else init_params(cfg, args.seed)
        state = create_train_state(cfg, params, tx, args.seed, mesh)
    start = int(to_host(state.step))
    if procs > 1:
        from jax.experimental import multihost_utils

        starts = multihost_utils.process_allgather(np.int64(start))
        if not (starts == start).all():
            raise UserError(f'--workdir {args.workdir}: the processes found checkpoints of different steps '
                            f'({", ".join(map(str, starts))}); the workdir must be one directory every process sees')
    steps = s['steps']
    if start > steps:
        raise UserError(f'--workdir {args.workdir} is at step {start}, past --steps {steps}; use a new --workdir')

    # The fast path (fused attention, ordered dense backward, patch matmul): the same function, proven
    # equal to the by-hand path in tests/test_fast_paths.py; it falls back by itself under attention dropout.
    train_step = make_train_step(cfg, tx, lr_fn, mesh=mesh, accum_steps=A, dtype=s['dtype'], use_sdpa=True)
    eval_step = make_eval_step(cfg, mesh=mesh, dtype=s['dtype'], use_sdpa=True)
    log = MetricsLog(os.path.join(args.workdir, 'metrics.jsonl'), start, writer)
    if writer:
        cli.say(f'vit_jax train: {cli.describe(cfg)}, {weights.count_params(cfg):,} params, on {args.dataset} '
                f'({dataset.num_examples(dataset.preset.train):,} train images); {devices} device(s) in {procs} '
                f'process(es); batch {B}' + (f' in {A} microbatches' if A > 1 else '')
                + (f'; resuming at step {start}' if start else ''))
    return _loop(args, s, dataset, state, train_step, eval_step, mesh, log, start, writer)


def _loop(args, s, dataset, state, train_step, eval_step, mesh, log, start, writer) -> int:
    import jax
    from tqdm import tqdm

    steps, B, S = s['steps'], s['batch_size'], s['image_size']
    pid, procs = jax.process_index(), jax.process_count()
    batches = dataset.train_batches(B, S, s['seed'], start, pid, procs)
    bar = tqdm(total=steps, initial=start, unit='step', disable=not writer, dynamic_ncols=True, file=sys.stderr,
               desc='train')
    pending: list[tuple[int, dict]] = []
    last_good = list_checkpoints(args.workdir)[-1][1] if list_checkpoints(args.workdir) else None
    tick, ticked = time.perf_counter(), start
    trained_seconds, trained_images = 0.0, 0  # after the compiling first step, eval and checkpoints left out
    ev = None
    t_start = time.perf_counter()
    try:
        for step in range(start + 1, steps + 1):
            state, metrics = train_step(state, shard_batch(next(batches), mesh))
            pending.append((step, metrics))
            bar.update(1)
            if step == start + 1:  # the first step compiles: leave it out of the throughput
                jax.block_until_ready(metrics)
                tick, ticked = time.perf_counter(), step
            due_eval = s['eval_every'] and step % s['eval_every'] == 0 or step == steps
            due_ckpt = step % s['checkpoint_every'] == 0 or step == steps
            if step % args.log_every and not (due_eval or due_ckpt):
                continue
            # One device-to-host transfer per log interval; NaN is caught before any checkpoint is written.
            host = jax.device_get([m for _, m in pending])
            bad = next((st for (st, _), m in zip(pending, host)
                        if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm']))), None)
            if bad is not None:
                bar.close()
                where = f'the last good checkpoint is {last_good}' if last_good else 'no checkpoint was written yet'
                raise UserError(f'loss is not finite at step {bad}; stopped, {where}; '
                                'lower --lr or raise --warmup-steps')
            now = time.perf_counter()
            trained_seconds, trained_images = trained_seconds + now - tick, trained_images + B * (step - ticked)
            rate = B * (step - ticked) / max(now - tick, 1e-9) if step > ticked else 0.0
            record = {'step': step, 'split': 'train',
                      'loss': float(np.mean([m['loss'] for m in host])),
                      'accuracy': float(np.mean([m['accuracy'] for m in host])),
                      'learning_rate': float(host[-1]['learning_rate']), 'img_per_sec': round(rate, 2),
                      'grad_norm': float(host[-1]['grad_norm'])}
            log.write(record)
            bar.set_postfix(loss=f'{record["loss"]:.4f}', img_s=f'{rate:.0f}', refresh=False)
            pending = []
            if due_eval:
                t0 = time.perf_counter()
                ev = evaluate(eval_step, state.params, dataset, B, S, mesh)
                log.write({'step': step, 'split': dataset.preset.test, **ev,
                           'img_per_sec': round(ev['examples'] / (time.perf_counter() - t0), 2)})
                if writer:
                    bar.write(f'step {step}: {dataset.preset.test} accuracy {ev["accuracy"]:.2%} '
                              f'({ev["examples"]} images), loss {ev["loss"]:.4f}', file=sys.stderr)
            if due_ckpt and writer:
                last_good = save_checkpoint(args.workdir, state, args.keep_checkpoints)
            tick, ticked = time.perf_counter(), step
    finally:
        bar.close()
    if ev is None:  # resumed a finished run: score it again for the summary
        ev = evaluate(eval_step, state.params, dataset, B, S, mesh)
    ev = dict(ev, split=dataset.preset.test, seconds=round(time.perf_counter() - t_start, 1),
              img_per_sec=round(trained_images / trained_seconds, 1) if trained_seconds else None)
    return _finish(args, s, state, ev, writer)


def _finish(args, s, state, ev: dict, writer: bool) -> int:
    """Writes final.npz and config.json (process 0) and prints the summary line (every process)."""
    import jax

    params = canonical_params(state)
    digest = params_digest(params)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        digests = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
        if not (digests == digests[0]).all():
            raise RuntimeError('processes ended with different parameters: a data-parallel bug')
    final, config_path = (os.path.join(args.workdir, name) for name in ('final.npz', 'config.json'))
    cfg = ViTConfig.from_official_dict(s['config'])
    if writer:
        weights.save_npz(final, params)
        _write_json(config_path, cfg.to_official_dict())
    print(json.dumps({'step': s['steps'], **ev, 'final': final, 'config': config_path,
                      'process': jax.process_index(), 'params_sha256': digest}))
    return 0
