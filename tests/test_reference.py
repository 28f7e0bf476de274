"""Tier 3: both frameworks reproduce the official model's logits (tests/reference, made by the official code)."""

import hashlib
import re

import numpy as np
import pytest
import torch

from conftest import REPO, in_process, run_cli
from parity.core import weights
from vit_jax.model import VisionTransformer as FlaxViT
from vit_jax.params import variables_from_params
from vit_torch.params import build_model

# (case, input, official logits, image size to build at: None is the checkpoint's own grid)
CASES = [
    ('tiny_token', 'x', 'logits', None),
    ('tiny_token', 'x_resized', 'logits_resized', 48),
    ('hybrid_stem', 'x', 'logits', None),
]
BOUND = 1e-5  # the bound; expect about 1e-6


def _load(reference, case, size):
    params = weights.load_npz(str(reference / case / 'ckpt.npz'))
    cfg = weights.resolve_config(str(reference / case / 'model.json'), params, size)
    return cfg, weights.prepare_for_inference(params, cfg, case)


@pytest.mark.parametrize('case,x,y,size', CASES)
def test_flax_reproduces_official_logits(reference, case, x, y, size):
    cfg, params = _load(reference, case, size)
    out = np.asarray(FlaxViT(cfg).apply(variables_from_params(params), np.load(reference / case / f'{x}.npy')))
    assert np.abs(out - np.load(reference / case / f'{y}.npy')).max() < BOUND


@pytest.mark.parametrize('fast', [False, True], ids=['by-hand', 'fast'])
@pytest.mark.parametrize('case,x,y,size', CASES)
def test_torch_reproduces_official_logits(reference, case, x, y, size, fast):
    cfg, params = _load(reference, case, size)
    model = build_model(cfg, params, fast=fast)
    with torch.no_grad():
        out = model(torch.from_numpy(np.load(reference / case / f'{x}.npy')).permute(0, 3, 1, 2)).numpy()
    assert np.abs(out - np.load(reference / case / f'{y}.npy')).max() < BOUND


def logits_command(*args) -> tuple[int, str]:
    """`python -m FRAMEWORK ARGS...` in this process (conftest's `in_process`): (exit code, stderr)."""
    proc = in_process(*args)
    return proc.returncode, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('framework', ['vit_jax', 'vit_torch'])
@pytest.mark.parametrize('case,x,y,size', CASES)
def test_logits_command(reference, tmp_path, framework, case, x, y, size):
    """The contract: `python -m FRAMEWORK logits CKPT --config JSON --input X --output Y [--image-size N]`.

    The first case runs in a real process in each framework; the others run its `main` in this process.
    """
    out = tmp_path / 'y.npy'
    args = [framework, 'logits', reference / case / 'ckpt.npz', '--config', reference / case / 'model.json',
            '--input', reference / case / f'{x}.npy', '--output', out]
    if size:
        args += ['--image-size', str(size)]
    if (case, x) == CASES[0][:2]:
        run_cli(*args, check=True)
    else:
        code, err = logits_command(*args)
        assert code == 0, err
    got = np.load(out)
    assert got.dtype == np.float32
    assert np.abs(got - np.load(reference / case / f'{y}.npy')).max() < BOUND


@pytest.mark.slow
def test_logits_command_infers_config(reference, tmp_path):
    """Without --config the config is read off the checkpoint's shapes."""
    out = tmp_path / 'y.npy'
    code, err = logits_command('vit_torch', 'logits', reference / 'hybrid_stem' / 'ckpt.npz',
                               '--input', reference / 'hybrid_stem' / 'x.npy', '--output', out)
    assert code == 0 and 'inferred config' in err, err
    assert np.abs(np.load(out) - np.load(reference / 'hybrid_stem' / 'logits.npy')).max() < BOUND


def _recorded_sums(reference):
    """The SHA-256 of each reference file as its README records them."""
    text = (reference / 'README.md').read_text()
    return dict((name, digest) for digest, name in re.findall(r'^([0-9a-f]{64})  (\S+)$', text, re.M))


def test_the_committed_vectors_are_the_recorded_ones(reference):
    sums = _recorded_sums(reference)
    on_disk = sorted(str(p.relative_to(reference)) for p in reference.glob('*/*'))
    assert sorted(sums) == on_disk
    for name, digest in sums.items():
        assert hashlib.sha256((reference / name).read_bytes()).hexdigest() == digest, name


def test_a_shared_copy_beside_the_repository_holds_the_same_bytes(reference):
    """Where the vectors' origin sits beside the clone, the committed copy must not have drifted from it."""
    shared = REPO.parent / 'shared' / 'reference'
    if not shared.is_dir():
        pytest.skip('no shared/reference beside this clone: the committed copy is checked by its recorded sums')
    for name in _recorded_sums(reference):
        assert (shared / name).read_bytes() == (reference / name).read_bytes(), name
