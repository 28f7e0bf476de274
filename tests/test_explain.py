"""`parity explain` and `parity.tools.figures`: hand-computed arrays, Flax vs PyTorch, and the PNGs on disk.

The hand-computed cases use a 2x2 patch grid of 16-pixel patches, so every number below
can be checked on paper: patch centres are 16 px apart in a row or column and 16*sqrt(2)
px apart diagonally. Tokens are ordered [class token,] p00, p01, p10, p11.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import random_params, run_cli, tiny, tolerance
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.tools import explain, figures

GRID, PATCH = (2, 2), (16, 16)
R2 = np.sqrt(2.0)
PHOTOS = Path(__import__('skimage.data').data.__file__).parent


def rows(*rs) -> np.ndarray:
    return np.array(rs, dtype=np.float64)


def e(i: int, n: int = 5) -> np.ndarray:
    return np.eye(n)[i]


# Two layers, two heads, with a class token (N = 5).
LAYER_0 = np.stack([np.full((5, 5), 0.2), np.eye(5)])[None]  # head 0 uniform, head 1 the identity
LAYER_1 = np.stack([
    rows(e(4), e(4), e(1), e(3), 0.5 * e(0) + 0.5 * e(1)),  # p01 reads p00; p11 reads cls and p00
    rows(e(4), e(1), e(2), e(3), e(4)),
])[None]


# --------------------------------------------------------------------------- hand-computed

def test_rollout_by_hand():
    # Layer 0: heads average to 0.1 + 0.5 I; with the identity and renormalised, 0.05 + 0.75 I.
    # Layer 1: the class-token row averages to e4, so (e0 + e4) / 2, and the rollout's class row
    # is half layer 0's class row plus half its p11 row: [.425, .05, .05, .05, .425].
    got = figures.attention_rollout([LAYER_0, LAYER_1], GRID, prefix_tokens=1)
    np.testing.assert_allclose(got, [[[0.05, 0.05], [0.05, 0.425]]], atol=1e-12)
    got = figures.attention_rollout([LAYER_0], GRID, prefix_tokens=1)
    np.testing.assert_allclose(got, [[[0.05, 0.05], [0.05, 0.05]]], atol=1e-12)


def test_rollout_without_class_token_by_hand():
    # One head, every patch reads p11 only: (A + I) / 2 has rows (e_i + e3) / 2, and row p11 is e3.
    # Averaged over the four query rows: 1/8 for each of p00, p01, p10 and 5/8 for p11.
    a = np.tile(e(3, 4), (4, 1))[None, None]
    got = figures.attention_rollout([a], GRID, prefix_tokens=0)
    np.testing.assert_allclose(got, [[[0.125, 0.125], [0.125, 0.625]]], atol=1e-12)


def test_mean_attention_distance_by_hand():
    # Layer 0 head 0: each query spreads 1/4 over distances 0, 16, 16, 16*sqrt(2): 8 + 4*sqrt(2).
    # Layer 1 head 0: p00 -> p11 (16*sqrt(2)), p01 -> p00 (16), p10 -> itself (0), p11 -> p00 after
    # dropping the class token and renormalising (16*sqrt(2)): mean 4 + 8*sqrt(2).
    # Heads that attend to themselves reach 0 px.
    got = figures.mean_attention_distance([LAYER_0, LAYER_1], GRID, PATCH, prefix_tokens=1)
    np.testing.assert_allclose(got, [[8 + 4 * R2, 0], [4 + 8 * R2, 0]], atol=1e-12)


def test_patch_distances_use_each_side_of_the_patch():
    got = figures.patch_distances((1, 2), (8, 4))
    np.testing.assert_allclose(got, [[0, 4], [4, 0]])
    got = figures.patch_distances((2, 1), (8, 4))
    np.testing.assert_allclose(got, [[0, 8], [8, 0]])


def test_position_similarity_by_hand():
    posemb = np.array([[[9, 9], [1, 0], [0, 1], [1, 1], [-1, 0]]], np.float32)  # the class token is left out
    got = figures.position_similarity(posemb, GRID, prefix_tokens=1)
    assert got.shape == (2, 2, 2, 2)
    np.testing.assert_allclose(got[0, 0], [[1, 0], [1 / R2, -1]], atol=1e-12)
    np.testing.assert_allclose(got[1, 0], [[1 / R2, 1 / R2], [1, -1 / R2]], atol=1e-12)
    np.testing.assert_allclose(got, got.transpose(2, 3, 0, 1), atol=1e-12)


def test_filter_pca_by_hand():
    # Four 1x1 two-channel filters at (+-2, 0) and (0, +-1): the x axis carries 8 of 10 units of variance.
    filters = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], np.float64).reshape(4, 1, 1, 2)
    components, variance = figures.filter_pca(filters)
    np.testing.assert_allclose(components.reshape(2, 2), [[1, 0], [0, 1]], atol=1e-12)
    np.testing.assert_allclose(variance, [0.8, 0.2], atol=1e-12)
    # A flipped filter set gives the same picture: the sign is fixed by the largest entry.
    np.testing.assert_allclose(figures.filter_pca(-filters)[0], components, atol=1e-12)


# --------------------------------------------------------------------------- Flax vs PyTorch

def tiny3(**kw) -> ViTConfig:
    """The tiny config with three blocks (first, middle and last differ) and ten classes."""
    return tiny(**{'num_layers': 3, 'num_classes': 10, **kw})


def checkpoint(cfg: ViTConfig, path: Path, seed: int = 0) -> Path:
    weights.save_npz(str(path), random_params(weights.param_shapes(cfg), seed=seed))
    return path


def selection(cfg: ViTConfig, query=None) -> explain.Selection:
    return explain.Selection(list(range(cfg.num_layers)), list(range(cfg.num_heads)), query, 'q', 28)


@pytest.mark.parametrize('cfg', [tiny3(), tiny3(classifier='gap', patch_size=(8, 4)),
                                 tiny3(patch_size=(2, 2), resnet_num_layers=(), resnet_width_factor=0.5),
                                 tiny3(classifier='token_distilled')],
                         ids=['token', 'gap-non-square-patch', 'hybrid', 'deit-distilled'])
def test_every_array_equal_between_frameworks(cfg):
    params = random_params(weights.param_shapes(cfg), seed=3)
    image = np.random.default_rng(4).uniform(-1, 1, (cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    jax_out, torch_out = explain.run_jax(cfg, params, image), explain.run_torch(cfg, params, image)
    sel = selection(cfg, query=(1, 2))
    a, b = explain.arrays(cfg, jax_out, sel), explain.arrays(cfg, torch_out, sel)
    expected = {'probabilities', 'rollout', 'attention', 'position_similarity', 'attention_distance'}
    if not cfg.is_hybrid:
        expected |= {'filter_pca', 'filter_pca_variance'}
    assert set(a) == set(b) == expected
    h, w = cfg.grid_size
    assert a['rollout'].shape == (h, w) and a['attention'].shape == (cfg.num_layers, cfg.num_heads, h, w)
    assert a['attention_distance'].shape == (cfg.num_layers, cfg.num_heads)
    for key in expected:
        assert np.abs(a[key] - b[key]).max() <= tolerance(a[key]), key
    # The arrays are not trivial: the rollout is a distribution over tokens, not flat.
    total = a['rollout'].sum()
    assert 0 < total <= 1 + 1e-9 and a['rollout'].std() > 0
    if not cfg.has_cls_token:
        assert total == pytest.approx(1.0)  # the mean token row, all patches


def test_filters_come_from_each_frameworks_own_layout():
    """The torch filters are read from the OIHW conv weight, not routed back through the weight layer."""
    cfg = tiny3(patch_size=(8, 4))
    params = random_params(weights.param_shapes(cfg), seed=5)
    image = np.zeros((32, 32, 3), np.float32)
    kernel = params['embedding/kernel']  # (ph, pw, C, D)
    for run in (explain.run_jax, explain.run_torch):
        filters = run(cfg, params, image).filters
        assert filters.shape == (32, 8, 4, 3)
        np.testing.assert_array_equal(filters[7], kernel[..., 7])


# --------------------------------------------------------------------------- the command

def assert_png(path: Path, size: tuple[float, float]) -> None:
    assert path.stat().st_size > 10_000, f'{path.name} is almost empty'
    with Image.open(path) as im:
        assert im.format == 'PNG'
        assert im.size == figures.pixels(size), path.name
        assert len(np.unique(np.asarray(im.convert('L')))) > 50, f'{path.name} is nearly blank'


def test_explain_writes_every_figure(tmp_path, capsys):
    """In-process (the docs' test runs the command line itself, as a user would)."""
    ckpt = checkpoint(tiny3(num_classes=1000), tmp_path / 'ckpt.npz')
    out = tmp_path / 'figs'
    assert explain.main([str(PHOTOS / 'chelsea.png'), '--checkpoint', str(ckpt), '--out', str(out),
                         '--layers', '0,-1', '--heads', '1,3', '--components', '10']) == 0
    text = capsys.readouterr().out
    assert 'parity: OK' in text and 'top-1: ' in text, text
    assert_png(out / 'rollout.png', figures.rollout_size())
    assert_png(out / 'attention.png', figures.attention_size(2, 2))
    assert_png(out / 'position_similarity.png', figures.position_similarity_size())
    assert_png(out / 'filter_pca.png', figures.filter_pca_size(10))
    assert_png(out / 'attention_distance.png', figures.attention_distance_size())
    assert np.load(out / 'rollout.npy').shape == (4, 4)
    assert np.load(out / 'attention.npy').shape == (2, 2, 4, 4)
    assert np.load(out / 'position_similarity.npy').shape == (4, 4, 4, 4)
    assert np.load(out / 'filter_pca.npy').shape == (10, 8, 8, 3)
    assert np.load(out / 'attention_distance.npy').shape == (3, 4)
    assert np.load(out / 'probabilities.npy').shape == (1000,)


def test_explain_one_framework_and_gap_model(tmp_path, capsys):
    """In-process: a gap model through PyTorch alone, on a grayscale photo, says what replaces the class token."""
    ckpt = checkpoint(tiny3(classifier='gap', num_layers=2), tmp_path / 'gap.npz')
    out = tmp_path / 'figs'
    assert explain.main([str(PHOTOS / 'camera.png'), '--checkpoint', str(ckpt), '--out', str(out),
                         '--framework', 'torch', '--layers', 'all']) == 0
    text = capsys.readouterr().out
    assert 'with vit_torch' in text and 'parity:' not in text
    assert_png(out / 'attention.png', figures.attention_size(2, 4))
    assert np.load(out / 'rollout.npy').sum() == pytest.approx(1.0, abs=1e-6)


def test_explain_hybrid_skips_filter_pca(tmp_path, capsys):
    cfg = tiny3(patch_size=(2, 2), resnet_num_layers=(), resnet_width_factor=0.5, num_layers=1)
    ckpt = checkpoint(cfg, tmp_path / 'hybrid.npz')
    out = tmp_path / 'figs'
    assert explain.main([str(PHOTOS / 'logo.png'), '--checkpoint', str(ckpt), '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'filter_pca: skipped' in text and 'parity: OK' in text
    assert not (out / 'filter_pca.png').exists()
    assert_png(out / 'rollout.png', figures.rollout_size())


def test_explain_writes_all_its_files_or_none(tmp_path, monkeypatch):
    """A failure while writing (a full disk at the fourth figure) leaves the folder as it was: no truncated files."""
    ckpt = checkpoint(tiny3(), tmp_path / 'ckpt.npz')
    out = tmp_path / 'figs'
    out.mkdir()
    (out / 'rollout.png').write_bytes(b'the previous run')

    def full(path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'\x89PNG half')
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(figures, 'render_attention_distance', full)
    with pytest.raises(UserError, match=r'--out .*: cannot write it: the disk is full'):
        explain.main([str(PHOTOS / 'chelsea.png'), '--checkpoint', str(ckpt), '--out', str(out)])
    assert os.listdir(out) == ['rollout.png'] and (out / 'rollout.png').read_bytes() == b'the previous run'
    with pytest.raises(UserError, match='disk is full'):  # a folder it made itself goes too
        explain.main([str(PHOTOS / 'chelsea.png'), '--checkpoint', str(ckpt), '--out', str(tmp_path / 'new')])
    assert not (tmp_path / 'new').exists()


def test_explain_refuses_weights_that_are_not_numbers(tmp_path):
    params = random_params(weights.param_shapes(tiny3()), seed=0)
    params['embedding/kernel'][0, 0, 0, 0] = np.inf
    weights.save_npz(str(tmp_path / 'inf.npz'), params)
    with pytest.raises(UserError, match='embedding/kernel hold NaN or Inf'):
        explain.main([str(PHOTOS / 'chelsea.png'), '--checkpoint', str(tmp_path / 'inf.npz'), '--out',
                      str(tmp_path / 'o')])
    assert not os.path.exists(tmp_path / 'o')


def test_explain_never_writes_over_its_image(tmp_path):
    ckpt = checkpoint(tiny3(), tmp_path / 'ckpt.npz')
    image = tmp_path / 'rollout.png'
    image.write_bytes((PHOTOS / 'chelsea.png').read_bytes())
    with pytest.raises(UserError, match='is an input of this command'):
        explain.main([str(image), '--checkpoint', str(ckpt), '--out', str(tmp_path)])
    assert image.read_bytes() == (PHOTOS / 'chelsea.png').read_bytes()


@pytest.mark.parametrize('extra, needle', [
    (['--layers', '3'], 'the model has 3 layers (0 to 2)'),
    (['--heads', 'x'], 'expected comma-separated indices'),
    (['--query', '4,0'], 'the patch grid is 4x4'),
    (['--query', 'mean'], 'for models without a class token'),
    (['--labels', 'imagenet2012'], '1000 names for a head of 10 classes'),
])
def test_explain_bad_selections(tmp_path, extra, needle):
    ckpt = checkpoint(tiny3(), tmp_path / 'ckpt.npz')
    with pytest.raises(UserError, match=needle.replace('(', r'\(').replace(')', r'\)')):
        explain.main([str(PHOTOS / 'chelsea.png'), '--checkpoint', str(ckpt), '--out', str(tmp_path / 'o'), *extra])
    assert not os.path.exists(tmp_path / 'o')


@pytest.mark.slow
def test_explain_refuses_a_zero_head(tmp_path):
    params = random_params(weights.param_shapes(tiny3()), seed=0)
    params['head/kernel'][:] = 0
    weights.save_npz(str(tmp_path / 'zero.npz'), params)
    (tmp_path / 'model.json').write_text(json.dumps(dict(tiny3().to_official_dict(), image_size=32)))
    proc = run_cli('parity', 'explain', PHOTOS / 'chelsea.png', '--checkpoint', tmp_path / 'zero.npz',
                   '--config', tmp_path / 'model.json', '--out', tmp_path / 'o')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'all zeros' in lines[0] and 'ImageNet-21k' in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / 'o')


def test_compare_reports_a_mismatch(capsys):
    a = {'rollout': np.full((2, 2), 0.25), 'attention_distance': np.array([[100.0, 50.0]])}
    assert explain.compare(a, {k: v.copy() for k, v in a.items()}, ('vit_jax', 'vit_torch'))
    b = {'rollout': a['rollout'] + 2e-5, 'attention_distance': a['attention_distance'] + 1e-4}
    assert not explain.compare(a, b, ('vit_jax', 'vit_torch'))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith('rollout') and lines[-2].endswith('MISMATCH')
    assert lines[-1].startswith('attention_distance') and lines[-1].endswith('ok')  # 1e-4 is within 1e-5 x 100
