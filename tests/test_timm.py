"""An independent cross-check: timm's own npz loader agrees with both of our models.

timm reads a released-layout npz with its own code (`_load_weights`); with the official
tanh GELU it must give the logits our two models give for the same file. This pins the
released layout we write and read against a third implementation.
"""

import numpy as np
import pytest
import timm  # part of the test extra: a missing timm fails, never skips
import torch
from timm.models.vision_transformer import _load_weights

from conftest import random_params, run_cli, tolerance
from parity.core import weights
from parity.core.config import OFFICIAL_CONFIGS


@pytest.fixture(scope='module')
def ti16_npz(tmp_path_factory):
    """A random full-size ViT-Ti/16 written in the released layout, and a batch for it."""
    cfg = OFFICIAL_CONFIGS['ViT-Ti_16']
    path = tmp_path_factory.mktemp('timm') / 'ViT-Ti_16.npz'
    weights.save_npz(str(path), random_params(weights.param_shapes(cfg), seed=3, scale=0.05))
    x = np.random.default_rng(4).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    np.save(path.with_name('x.npy'), x)
    return path, x


@pytest.mark.slow
def test_timm_npz_loader_matches_both_frameworks(ti16_npz):
    path, x = ti16_npz
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=1000, act_layer='gelu_tanh')
    _load_weights(model, str(path))
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(ref).max() > 0.1  # a real signal, not a zero head

    for framework in ('vit_jax', 'vit_torch'):
        out = path.with_name(f'{framework}.npy')
        run_cli(framework, 'logits', path, '--config', 'ViT-Ti_16', '--input', path.with_name('x.npy'),
                '--output', out, check=True)
        got = np.load(out)
        assert np.abs(got - ref).max() <= tolerance(ref), framework
