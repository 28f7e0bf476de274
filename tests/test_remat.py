"""`vit_jax train --remat`: each encoder block recomputed in the backward pass, the same gradients.

Rematerialisation trades memory for compute and must change nothing else: the gradients
of a training step (dropout on, so the recomputed block draws the same masks), the
parameter tree's names, the run's outputs. A big_vision config's `remat_policy` is a
training setting the trainer honours, not architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import in_process, random_params
from parity.core import limits, weights
from parity.core.config import OFFICIAL_CONFIGS, ViTConfig, big_vision_remat, load_config
from parity.core.errors import UserError
from parity.data import datasets
from vit_jax import objective, settings, train, train_cli
from vit_jax.model import VisionTransformer
from vit_jax.settings import TrainSettings

# Two layers of width 32 on 8x8 digits, dropout on everywhere dropout can be.
TINY = {'model_name': 'tiny', 'hidden_size': 32, 'patches': {'size': [4, 4]}, 'classifier': 'token',
        'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 2, 'dropout_rate': 0.1,
                        'attention_dropout_rate': 0.1}, 'representation_size': None, 'num_classes': 10}
MODES = ('none', 'block', 'dots')


def tiny_config() -> ViTConfig:
    return ViTConfig.from_official_dict(TINY).replace(image_size=8)


def one_step(cfg: ViTConfig, remat: str) -> tuple[dict, float]:
    """The parameters after one SGD step of `train`'s step function (p - lr * grad), and its gradient norm."""
    params = random_params(weights.param_shapes(cfg), seed=3, scale=0.1)
    tx, lr_fn = objective.make_optimizer(TrainSettings(lr=0.1, steps=2, warmup_steps=0))
    mesh = train.make_mesh()
    state = train.create_train_state(cfg, params, tx, 0, mesh)
    step = train.make_train_step(cfg, tx, lr_fn, mesh=mesh, remat=remat)
    batch = next(datasets.load('digits').train_batches(16, cfg.image_size, seed=0))
    state, metrics = step(state, train.shard_batch(batch, mesh))
    return train.canonical_params(state), float(metrics['grad_norm'])


def test_a_training_steps_gradients_are_the_same_with_and_without_remat():
    cfg = tiny_config()
    (ref, ref_norm), *others = [one_step(cfg, mode) for mode in MODES]
    assert ref_norm > 0
    for mode, (got, norm) in zip(MODES[1:], others):
        assert norm == pytest.approx(ref_norm, rel=1e-6), mode
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=f'{mode}: {k}')


def test_remat_keeps_the_parameter_tree_and_is_in_the_traced_step():
    cfg = tiny_config()
    x = np.zeros((1, 8, 8, 3), np.float32)
    # The trees' shapes, traced without computing them: names are what is compared, and the jaxpr needs no values.
    trees = {mode: jax.eval_shape(VisionTransformer(cfg, remat=mode).init, jax.random.PRNGKey(0), x) for mode in MODES}
    names = {mode: sorted('/'.join(p.key for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(t))
             for mode, t in trees.items()}
    assert names['block'] == names['dots'] == names['none']
    assert any(n.startswith('params/Transformer/encoderblock_1/') for n in names['none'])

    def jaxpr(mode):
        model = VisionTransformer(cfg, remat=mode)
        loss = lambda p: model.apply(p, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)}).sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(loss))(trees['none']))

    plain = jaxpr('none')
    assert 'remat' not in plain and 'checkpoint' not in plain
    assert 'remat' in jaxpr('block') or 'checkpoint' in jaxpr('block')


def test_the_memory_estimate_counts_what_remat_keeps():
    cfg = OFFICIAL_CONFIGS['ViT-B_16']
    full, block, dots = (limits.training_bytes(cfg, 256, 224, remat=m) for m in MODES)
    assert block < dots < full
    assert full == limits.training_bytes(cfg, 256, 224)  # the default is unchanged


# --------------------------------------------------------------------------- the command line

def tiny_json(tmp_path: Path, **extra) -> Path:
    path = tmp_path / 'tiny.json'
    path.write_text(json.dumps(dict(TINY, **extra)))
    return path


def big_vision_json(tmp_path: Path, policy) -> Path:
    path = tmp_path / f'bv-{policy}.json'
    path.write_text(json.dumps({'variant': 'mu/4', 'num_classes': 10, 'pool_type': 'tok', 'image_size': 8,
                                'remat_policy': policy}))
    return path


def run(config: Path, workdir: Path, *extra) -> dict:
    assert train_cli.main(['--dataset', 'digits', '--config', str(config), '--workdir', str(workdir), '--steps', '2',
                           '--warmup-steps', '0', '--batch-size', '16', '--eval-every', '0', *extra]) == 0
    return json.loads((workdir / 'run.json').read_text())


@pytest.mark.slow
def test_train_records_remat_and_a_default_run_is_unchanged(tmp_path):
    config = tiny_json(tmp_path)
    default = run(config, tmp_path / 'default')
    block = run(config, tmp_path / 'block', '--remat', 'block')
    assert default['remat'] == 'none' and block['remat'] == 'block'
    a, b = (np.load(tmp_path / w / 'final.npz') for w in ('default', 'block'))
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_a_big_vision_remat_policy_is_honoured_and_the_flag_wins(tmp_path):
    assert big_vision_remat(str(big_vision_json(tmp_path, 'nothing_saveable'))) == 'block'
    assert big_vision_remat(str(big_vision_json(tmp_path, 'dots_with_no_batch_dims_saveable'))) == 'dots'
    assert big_vision_remat(str(big_vision_json(tmp_path, 'none'))) == 'none'
    assert big_vision_remat('ViT-B_16') is None and big_vision_remat(str(tiny_json(tmp_path))) is None
    path = big_vision_json(tmp_path, 'nothing_saveable')
    assert load_config(str(path)).same_architecture(load_config(str(big_vision_json(tmp_path, None))))
    train_cli.check_flags(['--dataset', 'digits', '--config', str(path), '--workdir', str(tmp_path / 'w')])
    p = train_cli._parser()
    for argv, want in ((['--config', str(path)], 'block'), (['--config', str(path), '--remat', 'dots'], 'dots'),
                       ([], 'none')):
        args = p.parse_args(['--dataset', 'digits', '--workdir', str(tmp_path / 'w'), *argv])
        cfg = load_config(args.config or settings.DIGITS_CONFIG)
        assert settings.resolve(settings.apply_recipe(args, 10), cfg).remat == want, argv


def vit_jax_command(monkeypatch, capsys, *argv) -> tuple[int, str]:
    """`python -m vit_jax ARGV...` in this process (conftest's `in_process`): (exit code, stderr). (The same line
    and exit code from a real process: test_recipes.py's bad-teacher test.)"""
    proc = in_process('vit_jax', *argv)
    return proc.returncode, proc.stderr


def test_an_unknown_remat_is_one_error_line(tmp_path, monkeypatch, capsys):
    path = big_vision_json(tmp_path, 'everything_saveable')
    with pytest.raises(UserError, match="remat_policy 'everything_saveable': expected one of none, nothing_saveable"):
        big_vision_remat(str(path))
    code, err = vit_jax_command(monkeypatch, capsys, 'train', '--dataset', 'digits', '--config', path,
                                '--workdir', tmp_path / 'w')
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith('error: ') and 'remat_policy' in err and not (tmp_path / 'w').exists()
    code, err = vit_jax_command(monkeypatch, capsys, 'train', '--dataset', 'digits', '--workdir', tmp_path / 'w',
                                '--remat', 'all')
    assert code == 2 and "invalid choice: 'all'" in err, err
