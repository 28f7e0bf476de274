"""Tiers 2 and 3 on tiny configs: shapes per classifier, Flax vs PyTorch on random weights, one training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BATCH, CONFIGS, images, random_params, tiny, tolerance, torch_forward
from parity.core import weights
from parity.core.config import ViTConfig
from vit_jax.model import VisionTransformer as FlaxViT
from vit_jax.params import params_from_variables, variables_from_params
from vit_torch.model import VisionTransformer as TorchViT
from vit_torch.params import build_model, params_from_state_dict

B = BATCH


def expected_shape(cfg: ViTConfig) -> tuple:
    h, w = cfg.grid_size
    features = cfg.num_classes or cfg.representation_size or cfg.hidden_size
    if cfg.classifier == 'unpooled':
        return (B, h * w, features)
    if cfg.classifier == 'token_unpooled':
        return (B, h * w + 1, features)
    return (B, features)


@pytest.mark.parametrize('name', CONFIGS)
def test_flax_and_torch_agree_on_random_weights(name):
    cfg = CONFIGS[name]
    params = random_params(weights.param_shapes(cfg))
    x = images(cfg)
    ref = np.asarray(FlaxViT(cfg).apply(variables_from_params(params), x))
    assert ref.shape == expected_shape(cfg)
    for fast in (False, True):
        got = torch_forward(build_model(cfg, params, fast=fast), x)
        assert np.abs(got - ref).max() <= tolerance(ref), f'{name}, fast={fast}'


@pytest.mark.parametrize('name', ['token', 'token_distilled', pytest.param('hybrid-stages', marks=pytest.mark.slow)])
def test_fresh_inits_share_the_canonical_tree(name):
    """A fresh model in either framework exports to the same names and shapes, and runs in the other."""
    cfg = CONFIGS[name]
    # Jitted: one compile, not an op-by-op dispatch of every layer (the hybrid's ResNet has hundreds).
    flax_params = params_from_variables(jax.jit(FlaxViT(cfg).init)(jax.random.PRNGKey(0), images(cfg)))
    torch_params = params_from_state_dict(TorchViT(cfg).state_dict(), cfg)
    assert {k: v.shape for k, v in flax_params.items()} == {k: v.shape for k, v in torch_params.items()}
    x = images(cfg)
    ref = torch_forward(build_model(cfg, flax_params), x)
    got = np.asarray(jax.jit(FlaxViT(cfg).apply)(variables_from_params(flax_params), x))
    assert np.abs(got - ref).max() <= tolerance(ref)


def test_the_distilled_model_averages_its_two_heads_in_both_frameworks():
    cfg = CONFIGS['token_distilled']
    params = random_params(weights.param_shapes(cfg))
    assert weights.param_shapes(cfg)['dist_token'] == (1, 1, cfg.hidden_size)
    assert weights.param_shapes(cfg)[weights.POSEMB][1] == cfg.grid_size[0] * cfg.grid_size[1] + 2
    x = images(cfg)
    cls, dist = FlaxViT(cfg).apply(variables_from_params(params), x, both_heads=True)
    assert not np.allclose(cls, dist)
    np.testing.assert_allclose(FlaxViT(cfg).apply(variables_from_params(params), x), (cls + dist) / 2, rtol=1e-6)
    model = build_model(cfg, params)
    with torch.no_grad():
        t_cls, t_dist = model(torch.from_numpy(x).permute(0, 3, 1, 2), both_heads=True)
    for got, want in ((t_cls.numpy(), cls), (t_dist.numpy(), dist)):
        assert np.abs(got - np.asarray(want)).max() <= tolerance(np.asarray(want))


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    cfg = CONFIGS['token']
    params = random_params(weights.param_shapes(cfg))
    x = images(cfg)
    ref = np.asarray(FlaxViT(cfg).apply(variables_from_params(params), x))
    got = FlaxViT(cfg, dtype=jnp.bfloat16).apply(variables_from_params(params), x)
    assert got.dtype == jnp.float32  # the head runs in float32
    assert np.abs(np.asarray(got) - ref).max() < 0.1 * max(1.0, np.abs(ref).max())
    fresh = FlaxViT(cfg, dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(fresh))


def test_dropout_is_active_in_training_only():
    cfg = tiny(dropout_rate=0.5, attention_dropout_rate=0.5)
    params = random_params(weights.param_shapes(cfg))
    x = images(cfg)
    model = FlaxViT(cfg)
    variables = variables_from_params(params)
    a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x, train=False))
    tm = build_model(cfg, params)
    assert np.array_equal(torch_forward(tm, x), torch_forward(tm, x))
    tm.train()
    assert not np.allclose(torch_forward(tm, x), torch_forward(tm, x))


# The hybrid's backward pass compiles for about 10 s: in `make test`, out of the edit loop.
@pytest.mark.parametrize('name', ['token', pytest.param('hybrid-stages', marks=pytest.mark.slow)])
def test_one_sgd_step_matches_and_lowers_the_loss(name):
    """Same batch, labels and weights: same loss and gradients in both frameworks; the step helps."""
    cfg = CONFIGS[name]
    params = random_params(weights.param_shapes(cfg), scale=0.1)
    x = images(cfg)
    labels = np.arange(B) % cfg.num_classes
    lr = 0.1

    def flax_loss(p):
        logits = FlaxViT(cfg).apply(variables_from_params(p), x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    # Compiled once, called twice (here and on the stepped weights): op by op the hybrid's backward is far slower.
    loss_and_grads = jax.jit(jax.value_and_grad(flax_loss))
    loss, grads = loss_and_grads({k: jnp.asarray(v) for k, v in params.items()})
    model = build_model(cfg, params).train()
    t_loss = F.cross_entropy(model(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(labels))
    t_loss.backward()
    t_grads = params_from_state_dict({n: p.grad for n, p in model.named_parameters()}, cfg)

    assert abs(float(loss) - t_loss.item()) <= tolerance(np.float32(loss))
    for k, g in grads.items():
        g = np.asarray(g)
        assert np.abs(g - t_grads[k]).max() <= 1e-4 * max(1.0, np.abs(g).max()), k

    stepped = {k: v - lr * np.asarray(grads[k]) for k, v in params.items()}
    assert float(loss_and_grads(stepped)[0]) < float(loss)


def test_flax_params_to_npz_round_trip_is_bit_exact(tmp_path):
    cfg = CONFIGS['hybrid-stages']
    params = params_from_variables(FlaxViT(cfg).init(jax.random.PRNGKey(0), images(cfg)))
    weights.save_npz(str(tmp_path / 'p.npz'), params)
    back = weights.load_npz(str(tmp_path / 'p.npz'))
    assert back.keys() == params.keys()
    assert all(back[k].dtype == params[k].dtype and back[k].tobytes() == params[k].tobytes() for k in params)
    released = np.load(tmp_path / 'p.npz')
    assert released['block1/unit1/gn1/scale'].shape == (1, 1, 1, 32)  # the released GroupNorm layout
    assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in released.files  # pre-linen numbering
