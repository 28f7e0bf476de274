"""Tier 1: every registered config builds with the official parameter count, in both frameworks."""

import jax
import jax.numpy as jnp
import pytest
import torch

from parity.core import weights
from parity.core.config import OFFICIAL_CONFIGS
from parity.core.weights.formats import vit_torch as torch_format
from vit_jax.model import VisionTransformer as FlaxViT
from vit_jax.params import params_from_variables
from vit_torch.model import VisionTransformer as TorchViT

# From the official models_test.py (224x224, 1000 classes).
GOLDEN = {
    'testing': 21_390,
    'testing-unpooled': 21_370,
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-S_32': 22_878_952,
    'ViT-B_8': 86_576_872,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
    'ViT-S_16-gap-norep': 22_049_896,
    'ViT-B_16-gap-norep': 86_566_120,
    'ViT-S_32-gap-norep': 22_878_184,
    'ViT-B_32-gap-norep': 88_222_696,
    'R+ViT-Ti_16': 6_337_704,
    'R50+ViT-B_16': 98_659_112,
    'R26+ViT-B_32': 101_383_976,
    'R26+ViT-S_32': 36_431_912,
    'R50+ViT-L_32': 328_994_856,
}


def test_every_registered_config_has_a_golden_count():
    assert set(OFFICIAL_CONFIGS) == set(GOLDEN)


@pytest.mark.parametrize('name', sorted(GOLDEN))
def test_official_parameter_count(name):
    cfg = OFFICIAL_CONFIGS[name]
    spec = weights.param_shapes(cfg)
    assert weights.count_params(cfg) == GOLDEN[name]

    # Flax: the abstract init has exactly the canonical names and shapes.
    variables = jax.eval_shape(lambda: FlaxViT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))
    flax_shapes = {k: tuple(v.shape) for k, v in params_from_variables_abstract(variables).items()}
    assert flax_shapes == spec

    # PyTorch: the same count, and the state dict keys are the table's names.
    with torch.device('meta'):
        model = TorchViT(cfg)
    assert sum(p.numel() for p in model.parameters()) == GOLDEN[name]
    assert set(model.state_dict()) == {torch_format.torch_name(k) for k in spec}


def params_from_variables_abstract(variables):
    from flax import traverse_util
    return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(variables['params'])).items()}


def test_params_from_variables_is_flat_canonical():
    cfg = OFFICIAL_CONFIGS['testing']
    variables = FlaxViT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
    assert {k: v.shape for k, v in params_from_variables(variables).items()} == weights.param_shapes(cfg)
