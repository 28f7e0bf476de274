"""Training recipes and knowledge distillation: each flag changes the step the way it says.

The library tests build one step on a one-layer model and check it against what the flag
promises (a formula, a NumPy computation, bit-identity with the default step). The
command-line tests (slow) train small digits models: a teacher whose head rows are
permuted must be followed by a student that learns from it alone, resuming after SIGKILL
stays bit-identical with a teacher and mixup, and every bad flag is one `error:` line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from conftest import kill_once_written, popen, random_params, run_cli
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import datasets
from vit_jax import cli as jax_cli, objective, train, train_cli
from vit_jax.model import DropPath as JaxDropPath, VisionTransformer
from vit_jax.settings import TrainSettings
from vit_torch import cli as torch_cli
from vit_torch.model import DropPath as TorchDropPath, VisionTransformer as TorchViT
from vit_torch.params import build_model

TINY = {'model_name': 'tiny', 'hidden_size': 32, 'patches': {'size': [4, 4]}, 'classifier': 'token',
        'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1}, 'representation_size': None, 'num_classes': 10}


def tiny_config(**kw) -> ViTConfig:
    return ViTConfig.from_official_dict(TINY).replace(**{'image_size': 8, **kw})


def digits_batch(n: int = 16, seed: int = 0) -> dict:
    return next(datasets.load('digits').train_batches(n, 8, seed=seed))


def run_steps(cfg, params, tx, lr_fn=None, steps=2, **kw) -> tuple[dict, list]:
    mesh = train.make_mesh()
    state = train.create_train_state(cfg, params, tx, 0, mesh)
    step = train.make_train_step(cfg, tx, lr_fn, mesh=mesh, **kw)
    batches = datasets.load('digits').train_batches(16, cfg.image_size, seed=0)
    metrics = []
    for _ in range(steps):
        state, m = step(state, train.shard_batch(next(batches), mesh))
        metrics.append(jax.device_get(m))
    return train.canonical_params(state), metrics


def bit_identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the optimizer

@pytest.mark.parametrize('optimizer', ['adamw', pytest.param('adam', marks=pytest.mark.slow),
                                       pytest.param('sgd', marks=pytest.mark.slow)])
def test_decoupled_weight_decay_shrinks_kernels_only(optimizer):
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=1)
    tree = train.variables_from_params(params)['params']
    lr, wd = 0.1, 0.05
    tx, _ = objective.make_optimizer(TrainSettings(lr=lr, steps=10, warmup_steps=0, optimizer=optimizer,
                                                   weight_decay=wd))
    zeros = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(tree), tree)
    got = train.params_from_variables({'params': updates})
    for k, p in params.items():
        if k.endswith('kernel'):
            np.testing.assert_allclose(got[k], -lr * wd * p, rtol=1e-6, atol=1e-9, err_msg=k)
        else:  # biases, LayerNorms, cls and the position embeddings
            assert not got[k].any(), k
    assert {k for k in params if not k.endswith('kernel')} >= {'cls', weights.POSEMB, 'head/bias'}


@pytest.mark.slow
def test_weight_decay_on_all_decays_everything():
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=1)
    tree = train.variables_from_params(params)['params']
    tx, _ = objective.make_optimizer(TrainSettings(lr=0.1, steps=10, warmup_steps=0, optimizer='adamw',
                                                   weight_decay=0.05, weight_decay_on='all'))
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, tree), tx.init(tree), tree)
    got = train.params_from_variables({'params': updates})
    for k, p in params.items():
        np.testing.assert_allclose(got[k], -0.1 * 0.05 * p, rtol=1e-6, atol=1e-9, err_msg=k)


def test_adamw_first_step_is_the_formula():
    """Adam's first bias-corrected step is -lr * g / (|g| + eps) per element (plus the decay on kernels)."""
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=1)
    grads = random_params(weights.param_shapes(cfg), seed=2)
    tree, gtree = (train.variables_from_params(p)['params'] for p in (params, grads))
    lr, wd = 0.01, 0.1
    tx, _ = objective.make_optimizer(TrainSettings(lr=lr, steps=10, warmup_steps=0, grad_clip=0, optimizer='adamw',
                                                   weight_decay=wd))
    updates, _ = jax.jit(tx.update)(gtree, tx.init(tree), tree)
    got = train.params_from_variables({'params': updates})
    for k in params:
        want = -lr * (grads[k] / (np.abs(grads[k]) + 1e-8) + (wd * params[k] if k.endswith('kernel') else 0))
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-7, err_msg=k)


def test_adam_moment_decays_b1_b2_follow_the_formula():
    """Two steps with b1 0.5, b2 0.9 (no decay, no clipping) against Adam written out in NumPy."""
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=1)
    g1, g2 = (random_params(weights.param_shapes(cfg), seed=s) for s in (2, 3))
    tree = train.variables_from_params(params)['params']
    lr, b1, b2, eps = 0.01, 0.5, 0.9, 1e-8
    tx, _ = objective.make_optimizer(TrainSettings(lr=lr, steps=10, warmup_steps=0, schedule='constant', grad_clip=0,
                                                   optimizer='adamw', b1=b1, b2=b2))
    state = tx.init(tree)
    _, state = jax.jit(tx.update)(train.variables_from_params(g1)['params'], state, tree)
    updates, _ = jax.jit(tx.update)(train.variables_from_params(g2)['params'], state, tree)
    got = train.params_from_variables({'params': updates})
    for k in params:
        m = (1 - b1) * (b1 * g1[k] + g2[k])
        v = (1 - b2) * (b2 * g1[k] ** 2 + g2[k] ** 2)
        want = -lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps)
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-7, err_msg=k)


@pytest.mark.slow
def test_no_clipping_and_clipping_differ_only_for_large_gradients():
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=1)
    tree = train.variables_from_params(params)['params']
    big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), tree)
    for clip, expect_norm in ((1.0, 1.0), (0, None)):
        tx, _ = objective.make_optimizer(TrainSettings(lr=1.0, steps=10, warmup_steps=0, grad_clip=clip))
        updates, _ = jax.jit(tx.update)(big, tx.init(tree), tree)
        norm = float(jax.device_get(optax.tree.norm(updates)))
        if expect_norm:
            assert norm == pytest.approx(expect_norm, rel=1e-5)  # lr 1 and one momentum step: the clipped norm
        else:
            assert norm > 1000


# --------------------------------------------------------------------------- losses and targets

def test_label_smoothing_loss_on_a_one_hot_prediction_is_the_formula():
    C, eps, z = 10, 0.1, 5.0
    logits = jnp.zeros((1, C)).at[0, 3].set(z)
    targets = optax.smooth_labels(jax.nn.one_hot(jnp.array([3]), C), eps)
    log_norm = np.log(np.exp(z) + C - 1)
    want = -((1 - eps + eps / C) * (z - log_norm) + (C - 1) * (eps / C) * (-log_norm))
    assert float(objective.soft_cross_entropy(logits, targets)[0]) == pytest.approx(want, rel=1e-6)
    # Without smoothing the soft loss is the integer-label loss.
    np.testing.assert_allclose(objective.soft_cross_entropy(logits, jax.nn.one_hot(jnp.array([3]), C)),
                               objective.cross_entropy(logits, jnp.array([3])), rtol=1e-6)


def test_sigmoid_cross_entropy_is_big_visions_formula():
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(4, 10)).astype(np.float32), rng.uniform(size=(4, 10)).astype(np.float32)
    sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
    want = -(targets * np.log(sig) + (1 - targets) * np.log(1 - sig)).sum(-1)
    np.testing.assert_allclose(objective.sigmoid_cross_entropy(logits, targets), want, rtol=1e-5)


def test_mixup_mixes_with_the_rolled_batch_and_keeps_the_larger_share():
    batch = digits_batch(8)
    images, targets = jnp.asarray(batch['image']), jax.nn.one_hot(batch['label'], 10)
    for seed in range(5):
        mixed, mixed_targets, lam = objective.mixup(jax.random.PRNGKey(seed), images, targets, 0.4)
        lam = float(lam)
        assert 0.5 <= lam <= 1.0
        np.testing.assert_allclose(mixed, lam * images + (1 - lam) * np.roll(images, 1, axis=0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    # A vanishing alpha draws lambda at 0 or 1: max(lambda, 1 - lambda) is 1, the identity.
    mixed, _, lam = objective.mixup(jax.random.PRNGKey(0), images, targets, 1e-4)
    assert float(lam) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(mixed, images, atol=1e-5)


@pytest.mark.slow
def test_the_default_objective_is_the_official_step_bit_for_bit():
    """Explicit defaults (mixup 0, smoothing 0, no teachers) run the very step of before."""
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    tx, lr_fn = objective.make_optimizer(TrainSettings(lr=0.1, steps=10, warmup_steps=2))
    plain, _ = run_steps(cfg, params, tx, lr_fn)
    explicit, _ = run_steps(cfg, params, tx, lr_fn, objective=objective.Objective(mixup=0.0, label_smoothing=0.0))
    assert bit_identical(plain, explicit)


@pytest.mark.slow
def test_mixup_and_smoothing_change_the_step():
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    tx, lr_fn = objective.make_optimizer(TrainSettings(lr=0.1, steps=10, warmup_steps=2))
    plain, _ = run_steps(cfg, params, tx, lr_fn)
    for obj in (objective.Objective(mixup=0.5), objective.Objective(label_smoothing=0.1),
                objective.Objective(loss='sigmoid')):
        changed, metrics = run_steps(cfg, params, tx, lr_fn, objective=obj)
        assert not bit_identical(plain, changed), obj
        assert all(np.isfinite(m['loss']) for m in metrics)


@pytest.mark.parametrize('obj', [dict(), dict(label_smoothing=0.1), dict(loss='sigmoid'), dict(mixup=0.4),
                                 dict(distill='soft', distill_alpha=0.3, temperature=2.0, teacher_weights=(0.25, 0.75)),
                                 dict(distill='hard', distill_alpha=0.6, teacher_weights=(0.5, 0.5))],
                         ids=['plain', 'smoothing', 'sigmoid', 'mixup', 'soft', 'hard'])
def test_the_torch_objective_is_the_jax_one(obj):
    """vit_torch/objective.py against vit_jax/objective.py, function for function, on the same numbers."""
    from vit_torch import objective as torch_objective

    rng = np.random.default_rng(0)
    B, C = 6, 5
    logits, student = (rng.normal(size=(B, C)).astype(np.float32) for _ in range(2))
    teachers = [rng.normal(size=(B, C)).astype(np.float32) for _ in range(2)]
    labels = rng.integers(0, C, B)
    j, t = objective.Objective(**obj), torch_objective.Objective(**obj)
    target = np.array(objective.targets(j, jnp.asarray(labels), C))
    np.testing.assert_allclose(torch_objective.targets(t, torch.from_numpy(labels), C).numpy(), target, rtol=1e-6)
    if j.mixup:  # a mixed batch's targets are no longer one-hot
        target = 0.7 * target + 0.3 * np.roll(target, 1, axis=0)
    said = teachers if j.teacher_weights else []
    want = objective.objective_loss(j, jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(target),
                                    [jnp.asarray(x) for x in said], jnp.asarray(student))
    got = torch_objective.objective_loss(t, torch.from_numpy(logits), torch.from_numpy(labels),
                                         torch.from_numpy(target), [torch.from_numpy(x) for x in said],
                                         torch.from_numpy(student))
    for w, g in zip(want, got):
        assert (w is None) == (g is None)
        if w is not None:
            assert float(g) == pytest.approx(float(w), rel=1e-5)
    np.testing.assert_allclose(torch_objective.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)),
                               objective.cross_entropy(logits, labels), rtol=1e-5)
    for name in ('soft_cross_entropy', 'sigmoid_cross_entropy'):
        np.testing.assert_allclose(getattr(torch_objective, name)(torch.from_numpy(logits), torch.from_numpy(target)),
                                   getattr(objective, name)(logits, target), rtol=1e-5)


def test_the_torch_schedule_and_mixup_are_the_jax_ones():
    from vit_torch import objective as torch_objective

    for schedule in ('cosine', 'linear', 'constant'):
        want = objective.learning_rate_schedule(0.1, 20, 5, schedule)
        got = torch_objective.learning_rate_schedule(0.1, 20, 5, schedule)
        steps = range(25)
        np.testing.assert_allclose([got(s) for s in steps], [float(want(s)) for s in steps], rtol=1e-5)  # JAX: float32
    images, targets = torch.arange(12.).reshape(3, 4), torch.eye(3)
    mixed, mixed_targets, lam = torch_objective.mixup(np.random.default_rng(0), images, targets, 0.4)
    assert 0.5 <= lam <= 1
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * torch.roll(images, 1, dims=0), rtol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(-1), np.ones(3), rtol=1e-6)


# --------------------------------------------------------------------------- regularisation in the models

def test_drop_path_rates_rise_linearly():
    cfg = tiny_config().replace(num_layers=5, stochastic_depth_rate=0.2)
    np.testing.assert_allclose(cfg.drop_path_rates, [0.0, 0.05, 0.1, 0.15, 0.2])
    assert tiny_config().drop_path_rates == (0.0,)


def test_drop_path_drops_whole_examples_in_both_frameworks():
    x = np.random.default_rng(0).normal(size=(64, 5, 8)).astype(np.float32)
    rate = 0.5
    jax_out = np.asarray(JaxDropPath(rate).apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)}))
    module = TorchDropPath(rate).train()
    torch_out = module(torch.from_numpy(x)).numpy()
    for out in (jax_out, torch_out):
        kept = np.array([np.allclose(o, xi / (1 - rate)) for o, xi in zip(out, x)])
        dropped = np.array([not o.any() for o in out])
        assert (kept | dropped).all() and kept.any() and dropped.any()
    # Identity in evaluation and at rate 0.
    np.testing.assert_array_equal(JaxDropPath(rate).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(TorchDropPath(rate).eval()(torch.from_numpy(x)).numpy(), x)
    np.testing.assert_array_equal(TorchDropPath(0.0).train()(torch.from_numpy(x)).numpy(), x)


@pytest.mark.slow
def test_stochastic_depth_is_a_no_op_in_evaluation_and_mirrored():
    cfg = tiny_config().replace(num_layers=2, stochastic_depth_rate=0.3, dropout_rate=0.1)
    params = random_params(weights.param_shapes(cfg), seed=3)
    x = digits_batch(4)['image']
    plain = VisionTransformer(tiny_config().replace(num_layers=2))
    ours = VisionTransformer(cfg)
    tree = train.variables_from_params(params)
    np.testing.assert_array_equal(ours.apply(tree, x), plain.apply(tree, x))
    model = build_model(cfg, params).eval()
    assert isinstance(model, TorchViT)
    with torch.no_grad():
        y = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(y, np.asarray(ours.apply(tree, x)), rtol=1e-4, atol=1e-5)
    # In training, the drop-path draws change the logits.
    trained = ours.apply(tree, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    assert not np.allclose(trained, ours.apply(tree, x))
    assert cfg.to_official_dict()['transformer']['stochastic_depth_rate'] == 0.3
    assert ViTConfig.from_official_dict(cfg.to_official_dict()).stochastic_depth_rate == 0.3


# --------------------------------------------------------------------------- distillation

def test_soft_distillation_is_the_deit_formula():
    rng = np.random.default_rng(0)
    s, t, T = rng.normal(size=(6, 10)), rng.normal(size=(6, 10)), 3.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    pt = np.exp(log_softmax(t / T))
    want = T * T * (pt * (log_softmax(t / T) - log_softmax(s / T))).sum(-1)
    got = objective.distillation_kl(s.astype(np.float32), t.astype(np.float32), T)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # PyTorch's batchmean KL, times T^2, is its mean.
    torch_kl = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(s / T), -1),
                                          torch.log_softmax(torch.tensor(t / T), -1),
                                          reduction='batchmean', log_target=True) * T * T
    assert float(torch_kl) == pytest.approx(want.mean(), rel=1e-6)


def teacher(seed: int = 5, **kw) -> train.Teacher:
    cfg = tiny_config(**kw)
    return train.Teacher(cfg, random_params(weights.param_shapes(cfg), seed=seed, scale=0.3))


@pytest.mark.slow
def test_alpha_zero_is_the_step_without_a_teacher_bit_for_bit():
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    tx, lr_fn = objective.make_optimizer(TrainSettings(lr=0.1, steps=10, warmup_steps=2))
    alone, _ = run_steps(cfg, params, tx, lr_fn)
    zero, _ = run_steps(cfg, params, tx, lr_fn, teachers=[teacher()],
                        objective=objective.Objective(distill_alpha=0.0, teacher_weights=(1.0,)))
    assert bit_identical(alone, zero)
    taught, metrics = run_steps(cfg, params, tx, lr_fn, teachers=[teacher()],
                                objective=objective.Objective(distill_alpha=0.5, teacher_weights=(1.0,)))
    assert not bit_identical(alone, taught) and 'distill_loss' in metrics[0]


@pytest.mark.slow
def test_distill_loss_is_the_weighted_sum_over_teachers_at_their_own_resolution():
    """Two teachers, one at 16 px (the batch resized on the device): the step's distill_loss is the formula."""
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    t1 = teacher(5)
    # An R+ViT hybrid teacher at twice the resolution: its stem (stride 4) and 2x2 patches see the resized batch.
    hybrid = tiny_config(image_size=16, patch_size=(2, 2), resnet_num_layers=(), resnet_width_factor=0.5)
    t2 = train.Teacher(hybrid, random_params(weights.param_shapes(hybrid), seed=6, scale=0.3))
    tx, _ = objective.make_optimizer(TrainSettings(lr=0.1, steps=10, warmup_steps=0))
    _, metrics = run_steps(cfg, params, tx, steps=1, teachers=[t1, t2],
                           objective=objective.Objective(distill='hard', distill_alpha=0.3,
                                                         teacher_weights=(0.25, 0.75)))
    batch = next(datasets.load('digits').train_batches(16, 8, seed=0))
    x = batch['image']
    student = VisionTransformer(cfg).apply(train.variables_from_params(params), x, train=True,
                                           rngs={'dropout': jax.random.PRNGKey(0)})
    big = jax.image.resize(x, (16, 16, 16, 3), 'bilinear', antialias=False)
    terms = [objective.cross_entropy(student, VisionTransformer(t.cfg).apply(
        train.variables_from_params(t.params), xi).argmax(-1)).mean() for t, xi in ((t1, x), (t2, big))]
    want_distill = 0.25 * float(terms[0]) + 0.75 * float(terms[1])
    assert float(metrics[0]['distill_loss']) == pytest.approx(want_distill, rel=1e-4)
    label_loss = float(objective.cross_entropy(student, batch['label']).mean())
    assert float(metrics[0]['loss']) == pytest.approx(0.7 * label_loss + 0.3 * want_distill, rel=1e-4)


@pytest.mark.slow
def test_teacher_agreement_is_counted_on_the_test_split():
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    mesh = train.make_mesh()
    same = train.Teacher(cfg, params)
    step = train.make_eval_step(cfg, mesh=mesh, teachers=[same, teacher()])
    tx, _ = objective.make_optimizer(TrainSettings(lr=0.1, steps=10, warmup_steps=0))
    ev = train.evaluate(step, train.create_train_state(cfg, params, tx).params,
                        datasets.load('digits'), 64, 8, mesh, teachers=2)
    assert ev['teacher_agreement'][0] == 1.0  # a student agrees with itself on every image
    assert 0 <= ev['teacher_agreement'][1] < 1.0


# --------------------------------------------------------------------------- the command line (slow)

def write_tiny(tmp_path: Path, width: int = 32, layers: int = 1) -> Path:
    d = json.loads(json.dumps(TINY))
    d['hidden_size'], d['transformer']['num_layers'], d['transformer']['mlp_dim'] = width, layers, 2 * width
    path = tmp_path / f'tiny-{width}-{layers}.json'
    path.write_text(json.dumps(d))
    return path


def summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def train_main(*args) -> None:
    """`vit_jax train ARGS...` in this process (a subprocess only where the process itself is tested)."""
    assert train_cli.main(list(map(str, args))) == 0


@pytest.fixture(scope='module')
def permuted_teacher(tmp_path_factory) -> Path:
    """A digits model trained for real, then its head rows permuted: it predicts PERM[y] for a digit y."""
    tmp = tmp_path_factory.mktemp('teacher')
    workdir = tmp / 'run'
    train_main('--config', write_tiny(tmp, 64, 2), '--dataset', 'digits', '--steps', '300',
               '--warmup-steps', '20', '--eval-every', '0', '--workdir', workdir)
    ckpt = weights.load(str(workdir / 'final.npz'))
    cfg = weights.configure(ckpt, str(workdir / 'config.json'))
    params = dict(ckpt.params(cfg))
    params['head/kernel'] = params['head/kernel'][:, PERM_INVERSE]
    params['head/bias'] = params['head/bias'][PERM_INVERSE]
    path = tmp / 'permuted.npz'
    weights.save(str(path), params, cfg, 'npz')
    return path


PERM = np.array([3, 7, 0, 9, 1, 8, 2, 6, 4, 5])  # the teacher says PERM[y] for digit y
PERM_INVERSE = np.argsort(PERM)


@pytest.mark.slow
def test_a_student_taught_by_a_permuted_teacher_alone_follows_the_permutation(permuted_teacher, tmp_path, capsys):
    train_main('--config', write_tiny(tmp_path), '--dataset', 'digits', '--steps', '300',
               '--warmup-steps', '20', '--eval-every', '0', '--teacher', permuted_teacher, '--distill', 'hard',
               '--distill-alpha', '1', '--workdir', tmp_path / 'student')
    result = summary(capsys.readouterr().out)
    assert result['teacher_agreement'][0] > 0.8, result  # it learned the teacher's labels ...
    assert result['accuracy'] < 0.2, result  # ... not the dataset's
    lines = [json.loads(line) for line in (tmp_path / 'student' / 'metrics.jsonl').read_text().splitlines()]
    assert all('distill_loss' in r for r in lines if r['split'] == 'train')
    recorded = json.loads((tmp_path / 'student' / 'run.json').read_text())
    assert recorded['teachers'] == [{'checkpoint': str(permuted_teacher), 'config': None}]
    assert (recorded['distill'], recorded['distill_alpha'], recorded['teacher_weights']) == ('hard', 1.0, [1.0])


@pytest.mark.slow
def test_a_deit_student_with_a_distillation_token_trains_and_is_read_back(permuted_teacher, tmp_path, capsys):
    """The class head learns the labels, the distillation head the (permuted) teacher; evaluation averages them."""
    config = tmp_path / 'distilled.json'
    config.write_text(json.dumps(dict(TINY, classifier='token_distilled')))
    workdir = tmp_path / 'deit'
    train_main('--config', config, '--dataset', 'digits', '--steps', '200',
               '--warmup-steps', '20', '--eval-every', '0', '--teacher', permuted_teacher, '--distill', 'hard',
               '--workdir', workdir)
    result = summary(capsys.readouterr().out)
    ckpt = weights.load(str(workdir / 'final.npz'))
    cfg = weights.configure(ckpt, None)
    assert cfg.classifier == 'token_distilled' and 'head_dist/kernel' in ckpt.shapes
    params = ckpt.params(cfg)
    x = datasets.load('digits').eval_batches(None, 360, 8).__next__()
    model = VisionTransformer(cfg)
    cls, dist = model.apply(train.variables_from_params(params), x['image'], both_heads=True)
    labels, teacher_says = np.asarray(x['label']), PERM[np.asarray(x['label'])]
    assert (np.asarray(cls).argmax(-1) == labels).mean() > 0.5  # the class head learned the digits ...
    assert (np.asarray(dist).argmax(-1) == teacher_says).mean() > 0.5  # ... the distillation head the teacher
    assert 0 <= result['teacher_agreement'][0] <= 1
    # Both frameworks' eval commands (their entry points, in this process) read it and agree.
    for main in (jax_cli.main, torch_cli.main):
        assert main(['eval', str(workdir / 'final.npz'), '--dataset', 'digits']) == 0
        out = capsys.readouterr().out
        assert json.loads(out.strip().splitlines()[-1])['accuracy'] == pytest.approx(result['accuracy'])


def test_fine_tuning_a_class_token_model_into_deit_grows_its_distillation_token():
    token = tiny_config()
    params = random_params(weights.param_shapes(token), seed=4)
    distilled = token.replace(classifier='token_distilled', image_size=16)  # and at twice the resolution
    out = weights.prepare_for_finetuning(params, distilled, 'test')
    np.testing.assert_array_equal(out['dist_token'], params['cls'])
    pe = out[weights.POSEMB]
    assert pe.shape == (1, 2 + 16, 32)  # class and distillation tokens, then the 4x4 grid
    np.testing.assert_array_equal(pe[:, 1], params[weights.POSEMB][:, 0])  # the class token's row, copied
    assert not out['head_dist/kernel'].any() and not out['head_dist/bias'].any()


@pytest.mark.slow
def test_the_trainer_fine_tunes_a_plain_vit_into_a_distilled_student(permuted_teacher, tmp_path):
    config = tmp_path / 'distilled.json'
    tiny_config = json.loads(write_tiny(tmp_path, 64, 2).read_text())
    config.write_text(json.dumps(dict(tiny_config, classifier='token_distilled')))
    workdir = tmp_path / 'run'
    train_main('--checkpoint', permuted_teacher, '--config', config, '--dataset', 'digits',
               '--steps', '10', '--warmup-steps', '1', '--eval-every', '0', '--teacher', permuted_teacher,
               '--workdir', workdir)
    assert 'dist_token' in weights.load_npz(str(workdir / 'final.npz'))
    small = tmp_path / 'distilled-small.json'
    small.write_text(json.dumps(dict(TINY, classifier='token_distilled')))  # width 32: another trunk
    # A UserError: one `error:` line and exit 2 from the command line (the contract's subprocess test below).
    with pytest.raises(UserError, match='grows a distillation token from a class token'):
        train_main('--checkpoint', permuted_teacher, '--config', small, '--dataset', 'digits',
                   '--teacher', permuted_teacher, '--workdir', tmp_path / 'other')


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical_with_a_teacher_and_mixup(permuted_teacher, tmp_path, capsys):
    """Only the killed run is a process of its own; the reference, the resumed and the refused run are in-process."""
    args = ('--config', write_tiny(tmp_path), '--dataset', 'digits', '--steps', '60', '--warmup-steps', '5',
            '--batch-size', '32', '--eval-every', '0', '--checkpoint-every', '10', '--teacher', permuted_teacher,
            '--mixup', '0.4', '--optimizer', 'adamw', '--lr', '0.003', '--weight-decay', '0.05',
            '--label-smoothing', '0.1', '--stochastic-depth', '0.1')
    train_main(*args, '--workdir', tmp_path / 'reference')
    reference = capsys.readouterr().out
    workdir = tmp_path / 'killed'
    proc = popen('vit_jax', 'train', *args, '--workdir', workdir, out=tmp_path / 'killed')
    kill_once_written(proc, workdir / 'checkpoints' / 'ckpt-0000020.npz', tmp_path / 'killed')
    assert not (workdir / 'final.npz').exists(), 'the run ended before it was killed'
    train_main(*args, '--workdir', workdir)
    resumed = capsys.readouterr()
    assert 'resuming at step' in resumed.err
    assert summary(resumed.out)['params_sha256'] == summary(reference)['params_sha256']
    # A restart with another recipe value is refused (a UserError: one line, exit 2), naming the field.
    with pytest.raises(UserError, match='config'):
        train_main(*args[:-2], '--stochastic-depth', '0.2', '--workdir', workdir)


BAD = [
    (('--optimizer', 'lamb'), 'invalid choice'),
    (('--recipe-typo',), 'unrecognized arguments'),
    (('--distill-alpha', '1.5', '--teacher', '{teacher}'), '--distill-alpha 1.5: must lie in [0, 1]'),
    (('--distill-alpha', '0.5'), 'needs a teacher'),
    (('--teacher', '{teacher}', '--teacher-weights', '1,2'), '2 weights for 1 --teacher'),
    (('--teacher', '{teacher}', '--teacher', '{teacher}', '--teacher-config', '{config}'),
     '1 --teacher-config for 2 --teacher'),
    (('--teacher', '{other}'), 'predicts 5 classes and digits has 10'),
    (('--b1', '0.8'), "--b1 and --b2 are Adam's"),
    (('--label-smoothing', '1'), '--label-smoothing 1.0: must lie in [0, 1)'),
    (('--stochastic-depth', '-0.1'), '--stochastic-depth -0.1: must lie in [0, 1)'),
    (('--weight-decay', 'nan'), '--weight-decay nan'),
    (('--config', '{distilled}'), 'the token_distilled classifier learns its distillation head from a teacher'),
    (('--config', '{distilled}', '--teacher', '{teacher}', '--distill-alpha', '0'), 'a --distill-alpha above 0'),
    (('--recipe', 'deit'), 'set by --recipe deit'),
    (('--recipe', 'sota'), "--recipe 'sota': expected one of official, adamw-cifar"),
    (('--teacher', '{teacher}', '--teacher-weights', '1,x'), 'expected numbers separated by commas'),
    (('--teacher', '{teacher}', '--distill-temperature', '0'), '--distill-temperature 0.0: must be a finite number'),
]


@pytest.fixture(scope='module')
def bad_flag_files(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp('bad')
    cfg = tiny_config()
    teacher, other = tmp / 'teacher.npz', tmp / 'other.npz'
    weights.save(str(teacher), random_params(weights.param_shapes(cfg)), cfg, 'npz')
    five = cfg.replace(num_classes=5)
    weights.save(str(other), random_params(weights.param_shapes(five)), five, 'npz')
    distilled = tmp / 'distilled.json'
    distilled.write_text(json.dumps(dict(TINY, classifier='token_distilled')))
    return dict(teacher=teacher, other=other, config=write_tiny(tmp), distilled=distilled)


@pytest.mark.parametrize('flags, needle', BAD, ids=[b[1][:24] for b in BAD])
def test_bad_recipe_flags_are_refused_before_any_compilation(flags, needle, tmp_path, bad_flag_files, monkeypatch,
                                                             capsys):
    """In-process (the command line's one-line contract for these errors: the test below)."""
    from parity.core.errors import UserError
    from vit_jax import train_cli

    def compiled(*a, **k):
        raise AssertionError('compiled a step before refusing the flags')
    monkeypatch.setattr(train, 'make_train_step', compiled)
    monkeypatch.setattr(train, 'init_params', compiled)
    flags = [f.format(**bad_flag_files) for f in flags]
    if '--config' not in flags:
        flags = ['--config', str(bad_flag_files['config']), *flags]
    workdir = tmp_path / 'run'
    with pytest.raises((UserError, SystemExit)) as e:
        train_cli.main(['--dataset', 'digits', '--workdir', str(workdir), *flags])
    if isinstance(e.value, SystemExit):  # argparse's usage line, then its error line
        assert e.value.code == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
    else:
        message = str(e.value)
    assert needle in message and '\n' not in message.strip(), message
    assert not workdir.exists()


@pytest.mark.slow
def test_a_bad_teacher_is_one_line_and_exit_2_from_the_command_line(bad_flag_files, tmp_path):
    proc = run_cli('vit_jax', 'train', '--dataset', 'digits', '--config', bad_flag_files['config'], '--teacher',
                   bad_flag_files['other'], '--workdir', tmp_path / 'run')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert sum(line.startswith('error:') for line in lines) == 1  # a note on the teacher's config, then the error
    assert lines[-1:] == [
        f'error: --teacher {bad_flag_files["other"]}: it predicts 5 classes and digits has 10; a teacher must be '
        'trained on the same classes']
    assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------- recipes

def parsed(*flags: str):
    from vit_jax import train_cli

    return train_cli._parser().parse_args(['--dataset', 'digits', '--workdir', 'unused', *flags])


def test_a_recipe_fills_the_flags_not_given_and_a_flag_given_wins():
    from vit_jax import settings

    args = settings.apply_recipe(parsed('--recipe', 'augreg-medium2', '--mixup', '0.1'), 1000)
    assert (args.optimizer, args.lr, args.weight_decay, args.loss, args.randaug) == ('adam', 0.001, 0.0001,
                                                                                    'sigmoid', '2,15')
    assert args.mixup == 0.1 and args.head_bias_init == -6.9  # the flag wins; 1000 classes start at -6.9
    assert settings.apply_recipe(parsed('--recipe', 'augreg-light1'), 10).head_bias_init == -10.0
    deit = settings.apply_recipe(parsed('--recipe', 'deit', '--batch-size', '1024'), 10)
    assert deit.lr == pytest.approx(1e-3) and deit.stochastic_depth == 0.1  # 5e-4 x 1024 / 512
    official = settings.apply_recipe(parsed(), 10)
    assert official.recipe == 'official' and official.optimizer is None
    with pytest.raises(Exception, match="--recipe 'sota': expected one of official, adamw-cifar"):
        settings.apply_recipe(parsed('--recipe', 'sota'), 10)


@pytest.mark.slow
def test_the_cifar_adamw_recipe_runs_through_the_tfds_pipeline(tmp_path, monkeypatch, capsys):
    """The acceptance's new user: `--recipe adamw-cifar` on cifar10 (`tfds.testing.mock_data`), the pipeline."""
    from vit_jax import train_cli

    datasets.import_tensorflow()
    import tensorflow_datasets as tfds

    monkeypatch.setattr(datasets, '_online', lambda: True)
    workdir = tmp_path / 'run'
    with tfds.testing.mock_data(num_examples=24):
        assert train_cli.main(['--config', str(write_tiny(tmp_path)), '--dataset', 'cifar10', '--recipe', 'adamw-cifar',
                             '--image-size', '16', '--steps', '3', '--batch-size', '8', '--warmup-steps', '1',
                             '--head-bias-init', '-5', '--dropout', '0.1', '--attention-dropout', '0.05',
                             '--workdir', str(workdir)]) == 0
    result = summary(capsys.readouterr().out)
    assert result['examples'] == 24 and np.isfinite(result['loss'])
    recorded = json.loads((workdir / 'run.json').read_text())
    assert (recorded['recipe'], recorded['optimizer'], recorded['lr'], recorded['weight_decay']) == \
        ('adamw-cifar', 'adamw', 1e-4, 1e-4)
    assert (recorded['label_smoothing'], recorded['augment'], recorded['image_size']) == \
        (0.1, 'flip,rotate=15,jitter=0.4:0.4:0.4:0.1', 16)
    transformer = recorded['config']['transformer']
    assert (transformer['dropout_rate'], transformer['attention_dropout_rate']) == (0.1, 0.05)
    # The head bias started at -5; three AdamW steps at lr 1e-4 move it by about 3e-4 at most.
    bias = weights.load_npz(str(workdir / 'final.npz'))['head/bias']
    np.testing.assert_allclose(bias, -5.0, atol=1e-3)
    assert not np.array_equal(bias, np.full_like(bias, -5.0))


# --------------------------------------------------------------------------- the declarations

def test_the_train_parser_takes_exactly_the_declared_flags():
    from vit_jax import settings, train_cli

    declared = {settings.Flag.option(name) for name in settings.FLAGS}
    assert set(re.findall(r'--[a-z][a-z0-9-]*', train_cli._parser().format_usage())) - {'--help'} == declared
    names, repeated = settings.flag_names()
    assert {'--' + n for n in names} == declared and repeated == {'teacher', 'teacher-config'}
    args = parsed('--teacher', 'a', '--teacher', 'b', '--teacher-config', 'x', '--teacher-config', 'y')
    assert (args.teacher, args.teacher_config) == (['a', 'b'], ['x', 'y'])
    # Nothing given, nothing set: the declared defaults are filled in once the run's settings are resolved.
    assert all(getattr(parsed(), name) is None for name in settings.FLAGS if name not in ('dataset', 'workdir'))


def test_every_declared_default_and_recipe_value_is_one_its_flag_accepts():
    from vit_jax import settings

    for name, flag in settings.FLAGS.items():
        if flag.default is not None:
            assert flag.choices is None or flag.default in flag.choices, name
            assert flag.range is None or flag.range.holds(flag.default), name
    for recipe, preset in settings.RECIPE_PRESETS.items():
        for name, value in preset.items():
            flag = settings.FLAGS[name]  # every key a declared flag
            values = [value(n) for n in (10, 1000)] if callable(value) else [value]
            for v in values:
                assert flag.choices is None or v in flag.choices, (recipe, name)
                assert flag.range is None or flag.range.holds(v), (recipe, name)
    # The settings' defaults are the declared ones (distill_alpha: 0 without a teacher, the flag's with one).
    defaults = settings.TrainSettings()
    for name, flag in settings.FLAGS.items():
        if hasattr(defaults, name) and flag.default is not None and name != 'distill_alpha':
            assert getattr(defaults, name) == flag.default, name


def test_a_run_json_without_the_newer_fields_is_the_same_run():
    """run.json is `TrainSettings.record()`; a field an older run.json lacks counts as its declared default."""
    from parity.core.config import load_config
    from vit_jax import settings

    cfg = load_config(settings.DIGITS_CONFIG).replace(num_classes=10, image_size=8)
    s = settings.resolve(settings.apply_recipe(parsed(), 10), cfg)
    recorded = s.record()
    assert list(recorded) == [f.name for f in dataclasses.fields(settings.TrainSettings)]
    newer = ('optimizer', 'weight_decay', 'weight_decay_on', 'b1', 'b2', 'grad_clip', 'loss', 'label_smoothing',
             'head_bias_init', 'mixup', 'augment', 'randaug', 'teachers', 'distill', 'distill_alpha',
             'distill_temperature', 'teacher_weights')
    older = {k: v for k, v in recorded.items() if k not in newer}
    assert s.differences(recorded) == [] and s.differences(older) == []
    smoothed = settings.resolve(settings.apply_recipe(parsed('--label-smoothing', '0.1'), 10), cfg)
    assert smoothed.differences(older) == ['label_smoothing']


def refusal(parse, argv, capsys):
    """The one error line a command line's parsing gives `argv` (without argparse's prefix), or None."""
    from parity.core.errors import UserError

    try:
        parse(argv)
    except UserError as e:
        return str(e)
    except SystemExit:
        return capsys.readouterr().err.strip().splitlines()[-1].split('error: ', 1)[1]
    return None


SHARED_VALUES = {
    'lr': ['0.1', '1e-4', '0', '-1', 'nan', 'x'],
    'optimizer': ['sgd', 'adamw', 'adam', 'lamb'],
    'weight-decay': ['0', '0.05', '-1', 'nan', 'inf'],
    'label-smoothing': ['0', '0.1', '0.999', '1', '1.5', '-0.1'],
    'distill': ['soft', 'hard', 'x'],
    'distill-alpha': ['0', '0.5', '1', '1.5', '-0.1', 'nan'],
    'distill-temperature': ['1', '2.5', '0', '-1', 'inf'],
}


def test_train_and_grad_accept_and_refuse_the_same_values_of_the_flags_they_share(tmp_path, bad_flag_files, capsys):
    from parity.harness import grad
    from vit_jax import settings, train_cli

    teacher = str(bad_flag_files['teacher'])
    train = lambda argv: train_cli.check_flags(  # noqa: E731
        ['--dataset', 'digits', '--workdir', str(tmp_path / 'run'), '--teacher', teacher, *argv])
    grad_cli = lambda argv: grad.parse_args([teacher, '--teacher', teacher, *argv])  # noqa: E731
    assert {f.replace('-', '_') for f in SHARED_VALUES} | {'teacher', 'teacher_config'} == set(grad.SHARED_FLAGS)
    assert set(grad.SHARED_FLAGS) <= set(settings.FLAGS)
    for flag, values in SHARED_VALUES.items():
        for value in values:
            argv = [f'--{flag}', value]
            assert refusal(train, argv, capsys) == refusal(grad_cli, argv, capsys), (flag, value)
    assert refusal(train, ['--label-smoothing', '1'], capsys) == '--label-smoothing 1.0: must lie in [0, 1)'
    assert refusal(grad_cli, ['--label-smoothing', '1'], capsys) == '--label-smoothing 1.0: must lie in [0, 1)'
    assert refusal(grad_cli, ['--distill-alpha', '1'], capsys) is None  # [0, 1], closed in both


# --------------------------------------------------------------------------- parity grad: the same steps in PyTorch

def grad_main(monkeypatch, tmp_path, *flags, patch=None) -> dict:
    """`parity grad` in-process on the reference's tiny model, with the PyTorch side optionally patched."""
    from conftest import REFERENCE
    from parity.harness import grad
    from vit_torch import objective

    if patch:
        patch(monkeypatch, objective)
    out = tmp_path / 'grad.json'
    tiny = REFERENCE / 'tiny_token'
    code = grad.main([str(tiny / 'ckpt.npz'), '--config', str(tiny / 'model.json'),
                      '--json', str(out), *map(str, flags)])
    result = json.loads(out.read_text())
    assert code == (0 if result['ok'] else 1)
    return result


@pytest.fixture(scope='module')
def grad_teacher(tmp_path_factory) -> Path:
    from conftest import REFERENCE

    ckpt = weights.load(str(REFERENCE / 'tiny_token' / 'ckpt.npz'))
    cfg = weights.configure(ckpt, str(REFERENCE / 'tiny_token' / 'model.json'))
    path = tmp_path_factory.mktemp('grad') / 'teacher.npz'
    weights.save(str(path), random_params(weights.param_shapes(cfg), seed=9, scale=0.3), cfg, 'npz')
    return path


@pytest.mark.slow
def test_grad_adamw_five_steps_pass_from_the_command_line(monkeypatch, tmp_path):
    """`parity grad`'s entry point in-process (its exit codes from a real process: test_harness.py)."""
    result = grad_main(monkeypatch, tmp_path, '--optimizer', 'adamw', '--weight-decay', '0.05',
                       '--lr', '0.001', '--label-smoothing', '0.1', '--steps', '5')
    assert result['ok'] and [s['step'] for s in result['steps']] == [1, 2, 3, 4, 5]
    assert all(s['gradients_ok'] and s['updated_params_ok'] and s['loss']['ok'] for s in result['steps'])
    losses = [s['loss']['reference'] for s in result['steps']]
    assert losses[-1] < losses[0]  # the steps train


@pytest.mark.slow
def test_grad_with_a_teacher_passes_soft_and_hard(monkeypatch, tmp_path, grad_teacher):
    for mode in ('soft', 'hard'):
        result = grad_main(monkeypatch, tmp_path, '--teacher', grad_teacher, '--distill', mode, '--steps', '2',
                           '--distill-temperature', '2')
        assert result['ok'], (mode, result['first_divergence'])


def torch_default_adamw_groups(monkeypatch, objective):
    """What `torch.optim.AdamW(model.parameters(), weight_decay=wd)` does: one group, every parameter decayed."""
    monkeypatch.setattr(objective, 'param_groups', lambda model, cfg, wd, decay_on='kernels': [
        {'params': list(model.parameters()), 'weight_decay': wd}])


def smoothing_over_the_others(monkeypatch, objective):
    real = objective.F.cross_entropy

    def cross_entropy(logits, labels, label_smoothing=0.0):
        if not label_smoothing:
            return real(logits, labels)
        C = logits.shape[-1]
        onehot = torch.nn.functional.one_hot(labels, C).float()
        target = onehot * (1 - label_smoothing) + (1 - onehot) * label_smoothing / (C - 1)
        return -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    monkeypatch.setattr(objective.F, 'cross_entropy', cross_entropy)


def kl_per_element(monkeypatch, objective):
    def distillation_kl(student, teacher, T):
        return torch.nn.functional.kl_div(torch.log_softmax(student / T, -1), torch.log_softmax(teacher / T, -1),
                                          reduction='mean', log_target=True) * T * T
    monkeypatch.setattr(objective, 'distillation_kl', distillation_kl)


def eps_inside_the_root(monkeypatch, objective):
    class AdamEpsInside:
        def __init__(self, groups, lr, betas, eps):
            self.groups, self.lr, self.betas, self.eps, self.t, self.m, self.v = list(groups), lr, betas, eps, 0, {}, {}

        @torch.no_grad()
        def step(self):
            self.t += 1
            b1, b2 = self.betas
            for g in self.groups:
                for p in g['params']:
                    m = self.m[p] = b1 * self.m.get(p, torch.zeros_like(p)) + (1 - b1) * p.grad
                    v = self.v[p] = b2 * self.v.get(p, torch.zeros_like(p)) + (1 - b2) * p.grad ** 2
                    p.mul_(1 - self.lr * g['weight_decay'])
                    p.sub_(self.lr * (m / (1 - b1 ** self.t)) / torch.sqrt(v / (1 - b2 ** self.t) + self.eps))

        def zero_grad(self, set_to_none=False):
            for g in self.groups:
                for p in g['params']:
                    p.grad = None if p.grad is None else torch.zeros_like(p.grad)
    monkeypatch.setattr(objective.torch.optim, 'AdamW', AdamEpsInside)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::UserWarning')  # torch's note on reduction='mean', the habit planted
@pytest.mark.parametrize('patch, flags, cause', [
    (torch_default_adamw_groups, ('--optimizer', 'adamw', '--weight-decay', '0.1', '--lr', '0.01'), 'decay_all'),
    (eps_inside_the_root, ('--optimizer', 'adamw', '--lr', '0.01'), 'eps_inside'),
    (smoothing_over_the_others, ('--label-smoothing', '0.2'), 'smoothing_others'),
    (kl_per_element, ('--teacher', '{teacher}', '--distill-alpha', '0.9'), 'kl_mean'),
], ids=['adamw-groups', 'eps-inside', 'smoothing', 'kl-mean'])
def test_grad_names_the_known_pytorch_habit_that_parts_the_steps(monkeypatch, tmp_path, grad_teacher, patch, flags,
                                                                 cause):
    flags = [str(grad_teacher) if f == '{teacher}' else f for f in flags]
    result = grad_main(monkeypatch, tmp_path, *flags, '--steps', '2', patch=patch)
    assert not result['ok']
    assert [f['cause'] for f in result['diagnosis'] if f['kind'] == 'cause'] == [cause], result['diagnosis']
