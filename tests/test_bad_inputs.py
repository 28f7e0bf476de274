"""Bad inputs to the command lines: one `error: ` line, exit code 2, no traceback, no output file.

The checkpoint, config and input checks are shared code (`parity.cli`, `parity.core.weights`),
so most cases run in one framework and one representative case runs in the other. Each
subprocess costs a few seconds of interpreter and framework start-up, so the cheap
library-level cases call `parity` directly instead, and most command lines run in this
process through the contract's own `run` (`command`); one case per command (vit_jax
logits, vit_torch logits, vit_torch convert) runs in a real process. The positive controls at the end run
the same commands with good inputs, so these tests prove the commands can also succeed.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REFERENCE, in_process, run_cli
from parity import cli
from parity.core import weights
from parity.core.config import load_config
from parity.core.errors import UserError

TINY = REFERENCE / 'tiny_token'  # ViT, patch 8, width 64, 4 heads, 2 layers, 10 classes, 32x32
CKPT, CFG, X = TINY / 'ckpt.npz', TINY / 'model.json', TINY / 'x.npy'
POSEMB = weights.POSEMB


# --------------------------------------------------------------------------- helpers

def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, stderr exactly one `error: ` line holding every needle, no traceback; returns the line."""
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert proc.returncode == 2, f'exit {proc.returncode}\n{proc.stderr}'
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
    assert '\x1b' not in lines[0], 'terminal escape codes in the error line'
    for needle in needles:
        assert str(needle) in lines[0], f'{needle!r} not in: {lines[0]}'
    return lines[0]


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty folder for outputs; a failed command must leave it empty (no partial or temp file)."""
    d = tmp_path / 'out'
    d.mkdir()
    return d


def assert_nothing_written(out: Path) -> None:
    assert not any(out.iterdir()), f'files left behind: {sorted(p.name for p in out.iterdir())}'


def command(*args) -> subprocess.CompletedProcess:
    """`python -m FRAMEWORK ARGS...` in this process (conftest's `in_process`): exit code, stdout and stderr."""
    return in_process(*args)


def logits(framework: str, ckpt, out: Path, *, config=CFG, x=X, image_size=None,
           process: bool = False) -> subprocess.CompletedProcess:
    """`FRAMEWORK logits`: in this process, or with `process` in a real one."""
    args = [framework, 'logits', ckpt, '--config', config, '--input', x, '--output', out / 'y.npy']
    if image_size is not None:
        args += ['--image-size', image_size]
    return run_cli(*args) if process else command(*args)


def reference_arrays() -> dict[str, np.ndarray]:
    with np.load(CKPT) as z:
        return {k: z[k] for k in z.files}


def write_json(path: Path, d) -> Path:
    path.write_text(json.dumps(d))
    return path


# --------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.slow
def test_truncated_npz(tmp_path, out):
    bad = tmp_path / 'ckpt.npz'
    data = CKPT.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    assert_user_error(logits('vit_jax', bad, out, process=True), str(bad), 'truncated or corrupted')
    assert_nothing_written(out)


@pytest.mark.slow
def test_corrupted_npz(tmp_path, out):
    bad = tmp_path / 'ckpt.npz'
    data = bytearray(CKPT.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # inside an array's data: the zip CRC check fails
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match='corrupted'):  # really damaged, not silently loadable
        weights.read_npz(str(bad))
    assert_user_error(logits('vit_jax', bad, out), str(bad), 'truncated or corrupted')
    assert_nothing_written(out)


def test_corrupted_compressed_npz_library(tmp_path):
    """A deflated member whose payload is damaged fails in zlib or the CRC, as a UserError."""
    path = tmp_path / 'c.npz'
    np.savez_compressed(path, w=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    with zipfile.ZipFile(path) as z:
        info = z.getinfo('w.npy')
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)  # local header is 30 bytes + name + extra
    mid = start + info.compress_size // 2
    data[mid:mid + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match='truncated or corrupted') as e:
        weights.read_npz(str(path))
    assert str(path) in str(e.value) and '\n' not in str(e.value)


@pytest.mark.slow
def test_not_an_npz(tmp_path, out):
    bad = tmp_path / 'ckpt.npz'
    bad.write_text('this is a text file, not a checkpoint\n')
    assert_user_error(logits('vit_jax', bad, out), str(bad), 'not a checkpoint file of a known kind', '.npz',
                      '.safetensors', 'Hugging Face folder')
    assert_nothing_written(out)


@pytest.mark.slow
def test_npy_as_checkpoint(tmp_path, out):
    bad = tmp_path / 'ckpt.npy'
    np.save(bad, np.zeros((2, 3), np.float32))
    assert_user_error(logits('vit_jax', bad, out), str(bad), 'single .npy array')
    assert_nothing_written(out)


@pytest.mark.slow
def test_npz_with_pickled_objects(tmp_path, out):
    bad = tmp_path / 'ckpt.npz'
    np.savez(bad, **reference_arrays(), evil=np.array([{'a': 1}, None], dtype=object))
    assert_user_error(logits('vit_jax', bad, out), str(bad), "'evil'", 'pickled')
    assert_nothing_written(out)


@pytest.mark.slow
def test_missing_checkpoint_torch(tmp_path, out):
    missing = tmp_path / 'nope.npz'
    assert_user_error(logits('vit_torch', missing, out, process=True), str(missing), 'no such file')
    assert_nothing_written(out)


# --------------------------------------------------------------------------- configs

@pytest.mark.slow
def test_official_config_does_not_fit(out):
    # The reference file uses the released spelling (MlpBlock_3), so the error names keys that way.
    line = assert_user_error(logits('vit_jax', CKPT, out, config='ViT-B_16'), str(CKPT), 'ViT-B_16',
                             'missing', 'Transformer/encoderblock_11/MlpBlock_3/Dense_0/kernel')
    assert 'embedding/kernel expected (16, 16, 3, 768) found (8, 8, 3, 64)' in line
    assert_nothing_written(out)


@pytest.mark.slow
def test_json_config_does_not_fit(tmp_path, out):
    d = json.loads(CFG.read_text())
    d['hidden_size'], d['transformer']['num_heads'], d['transformer']['num_layers'] = 32, 2, 3
    line = assert_user_error(logits('vit_jax', CKPT, out, config=write_json(tmp_path / 'wrong.json', d)),
                             'missing', 'Transformer/encoderblock_2/MultiHeadDotProductAttention_1/query/kernel',
                             'shape mismatches')
    assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel expected (32, 2, 16) ' \
           'found (64, 4, 16)' in line
    assert_nothing_written(out)


def test_check_params_names_extra_keys_library():
    params = weights.load_npz(str(CKPT))
    params['stray/kernel'] = np.zeros(3, np.float32)
    del params['head/bias']
    with pytest.raises(UserError) as e:
        weights.check_params(params, load_config(str(CFG)).replace(image_size=32), 'ckpt')
    assert '1 missing: head/bias' in str(e.value) and '1 extra: stray/kernel' in str(e.value)


@pytest.mark.slow
def test_config_not_valid_json(tmp_path, out):
    bad = tmp_path / 'model.json'
    bad.write_text('{"hidden_size": 64, "patches": ')
    assert_user_error(logits('vit_jax', CKPT, out, config=bad), str(bad), 'not valid JSON')
    assert_nothing_written(out)


@pytest.mark.slow
def test_unknown_config_name(out):
    assert_user_error(logits('vit_jax', CKPT, out, config='ViT-Z_99'), 'ViT-Z_99', 'not an official config name',
                      'ViT-B_16')
    assert_nothing_written(out)


# --------------------------------------------------------------------------- resolution

@pytest.mark.slow
def test_non_square_position_grid(tmp_path, out):
    arrays = reference_arrays()
    arrays[POSEMB] = arrays[POSEMB][:, :1 + 15]  # class token + 15 patch tokens
    bad = tmp_path / 'ckpt.npz'
    np.savez(bad, **arrays)
    assert_user_error(logits('vit_jax', bad, out), '15 patch tokens', 'square')
    assert_nothing_written(out)


def test_non_square_position_grid_library():
    posemb = np.zeros((1, 1 + 15, 8), np.float32)
    with pytest.raises(UserError, match='square'):
        weights.resize_posemb(posemb, (6, 6), prefix_tokens=1)
    cfg = load_config(str(CFG))
    with pytest.raises(UserError, match='square'):
        weights.checkpoint_grid({POSEMB: posemb}, cfg)
    with pytest.raises(UserError, match='square'):
        weights.resolve_config(str(CFG), {POSEMB: posemb})


@pytest.mark.slow
def test_image_size_not_divisible_by_patch(out):
    assert_user_error(logits('vit_jax', CKPT, out, image_size=36), 'image size 36', '8x8')
    assert_nothing_written(out)


# --------------------------------------------------------------------------- inputs

@pytest.mark.slow
def test_input_float64(tmp_path, out):
    x = tmp_path / 'x.npy'
    np.save(x, np.load(X).astype(np.float64))
    assert_user_error(logits('vit_jax', CKPT, out, x=x), str(x), 'float64', 'float32')
    assert_nothing_written(out)


@pytest.mark.slow
def test_input_nchw(tmp_path, out):
    x = tmp_path / 'x.npy'
    np.save(x, np.load(X).transpose(0, 3, 1, 2))
    assert_user_error(logits('vit_jax', CKPT, out, x=x), str(x), '(2, 3, 32, 32)', 'NHWC')
    assert_nothing_written(out)


@pytest.mark.parametrize('shape', [(32, 32, 3), (2, 3, 32, 32), (2, 32, 32, 1)])
def test_input_shape_library(tmp_path, shape):
    x = tmp_path / 'x.npy'
    np.save(x, np.zeros(shape, np.float32))
    with pytest.raises(UserError, match='NHWC') as e:
        cli.load_input(str(x), load_config(str(CFG)).replace(image_size=32))
    assert str(shape) in str(e.value)


@pytest.mark.slow
def test_input_wrong_resolution_torch(out):
    x = TINY / 'x_resized.npy'  # 48x48, the model is built at the checkpoint's 32x32
    assert_user_error(logits('vit_torch', CKPT, out, x=x), str(x), '48x48', '32x32', '--image-size 48')
    assert_nothing_written(out)


@pytest.mark.slow
def test_input_missing(tmp_path, out):
    x = tmp_path / 'nope.npy'
    assert_user_error(logits('vit_jax', CKPT, out, x=x), f'--input {x}', 'no such file')
    assert_nothing_written(out)


@pytest.mark.slow
def test_input_nan(tmp_path, out):
    x = tmp_path / 'x.npy'
    a = np.load(X)
    a[1, 5, 7, 2] = np.nan
    np.save(x, a)
    assert_user_error(logits('vit_jax', CKPT, out, x=x), str(x), 'NaN')
    assert_nothing_written(out)


# --------------------------------------------------------------------------- convert

@pytest.mark.slow
def test_convert_output_of_no_known_kind(out):
    dst = out / 'copy.bin'
    assert_user_error(run_cli('vit_torch', 'convert', CKPT, dst), str(dst), 'pass --to', 'big_vision', 'timm', 'hf')
    assert_nothing_written(out)


@pytest.mark.slow
def test_convert_pt_with_pickled_object(tmp_path, out):
    import torch

    bad = tmp_path / 'evil.pt'
    torch.save({'a': object()}, bad)  # torch.load(weights_only=True) must refuse it
    assert_user_error(command('vit_torch', 'convert', bad, out / 'y.npz'), str(bad), 'tensors-only')
    assert_nothing_written(out)


@pytest.mark.slow
def test_convert_truncated_safetensors(tmp_path, out):
    from safetensors.numpy import save_file

    bad = tmp_path / 'w.safetensors'
    save_file({'w': np.ones((64, 64), np.float32)}, str(bad))
    data = bad.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    assert_user_error(command('vit_torch', 'convert', bad, out / 'y.npz'), str(bad), '.safetensors')
    assert_nothing_written(out)


@pytest.fixture(scope='module')
def tiny_pt(tmp_path_factory) -> Path:
    """The tiny reference checkpoint as a PyTorch .pt: width 64 has no official head count."""
    pt = tmp_path_factory.mktemp('pt') / 'tiny.pt'
    proc = command('vit_torch', 'convert', CKPT, pt)
    assert proc.returncode == 0 and pt.is_file(), proc.stderr
    return pt


@pytest.mark.slow
def test_convert_pt_unknown_width_needs_config(tiny_pt, out):
    assert_user_error(command('vit_torch', 'convert', tiny_pt, out / 'back.npz'), 'width-64', 'pass --config')
    assert_nothing_written(out)


@pytest.mark.slow
def test_convert_pt_with_config_succeeds(tiny_pt, out):
    """Positive control for the case above: with --config the same conversion works and round-trips."""
    back = out / 'back.npz'
    proc = command('vit_torch', 'convert', tiny_pt, back, '--config', CFG)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ['back.npz']
    with np.load(back) as got:
        want = reference_arrays()
        assert sorted(got.files) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# --------------------------------------------------------------------------- positive controls

@pytest.mark.slow
@pytest.mark.parametrize('framework, x, image_size, want', [
    ('vit_jax', X, None, TINY / 'logits.npy'),
    ('vit_torch', TINY / 'x_resized.npy', 48, TINY / 'logits_resized.npy'),  # the fix the error suggests
])
def test_good_input_succeeds(framework, x, image_size, want, out):
    proc = logits(framework, CKPT, out, x=x, image_size=image_size)
    assert proc.returncode == 0, proc.stderr
    assert 'error' not in proc.stderr and 'Traceback' not in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ['y.npy']  # the output, and no temp file left over
    y = np.load(out / 'y.npy')
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, np.load(want), atol=1e-4, rtol=1e-4)
