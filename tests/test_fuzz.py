"""Hostile bytes: any file given as a checkpoint, config, input or image loads correctly or raises `UserError`.

Seeded generators mutate real files (truncation at random offsets, bit flips, spliced and
zeroed runs, header edits, declared-size and compression bombs) and the property is
checked in-process, where it is cheap: every mutant either loads or raises the one user
error type, never anything else, and never allocates more than a small fixed ceiling
(`tracemalloc` sees NumPy's allocations), because declared sizes are checked before
anything is allocated. A few subprocesses check the exit-code contract the property
stands for: one `error:` line, the last on stderr, exit code 2.

Everything is deterministic (seeded `random.Random`); hypothesis would add shrinking,
which a property this coarse does not need.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from conftest import REFERENCE, random_params, run_cli, run_main, tiny
from parity import cli
from parity.core import weights
from parity.core.config import load_config
from parity.core.errors import UserError
from parity.core.weights import containers
from parity.data.images import load_image

CEILING = 64 << 20  # bytes any one hostile file may make us allocate: the seeds are a few hundred KB
PHOTOS = Path(__import__('skimage.data').data.__file__).parent


# --------------------------------------------------------------------------- seeds and mutations

@pytest.fixture(scope='module')
def seeds(tmp_path_factory) -> dict[str, Path]:
    """One small checkpoint of every container and layout, written by the writers people use.

    timm's files do not record their heads, so each has its config beside it (NAME.json).
    """
    d = tmp_path_factory.mktemp('seeds')
    out = {'released.npz': d / 'released.npz', 'compressed.npz': d / 'compressed.npz'}
    shutil.copy(REFERENCE / 'tiny_token' / 'ckpt.npz', out['released.npz'])
    with np.load(out['released.npz']) as z:
        np.savez_compressed(out['compressed.npz'], **{k: z[k] for k in z.files})
    token, map_head = tiny(), tiny(classifier='map')
    ti = tiny(hidden_size=192, num_heads=3, mlp_dim=32, num_layers=1)  # a .pt's heads come from its width: ViT-Ti's
    for name, cfg, to in [('big_vision.npz', map_head, 'big_vision'), ('vit_torch.safetensors', token, 'torch'),
                          ('vit_torch.pt', ti, 'torch'), ('timm.pth', ti, 'timm'), ('hf', token, 'hf')]:
        out[name] = d / name
        weights.save(str(out[name]), random_params(weights.param_shapes(cfg)), cfg, to)
    (d / 'timm.pth.json').write_text(json.dumps(dict(ti.to_official_dict(), image_size=32)))
    # timm's own model and safetensors' own writer, for a file no code of ours wrote.
    import timm
    from safetensors.torch import save_file
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=1,
                              mlp_ratio=0.5, num_classes=5)
    out['timm.safetensors'] = d / 'timm.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out['timm.safetensors']))
    timm_cfg = tiny(hidden_size=192, num_heads=3, mlp_dim=96, num_layers=1)
    (d / 'timm.safetensors.json').write_text(json.dumps(dict(timm_cfg.to_official_dict(), image_size=32)))
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded corruption: a truncation, flipped bits, a spliced or a zeroed run."""
    b = bytearray(data)
    kind = rng.choice(['truncate', 'flip', 'flip', 'splice', 'zero'])
    if kind == 'truncate':
        return bytes(b[:rng.randrange(len(b))])
    if kind == 'flip':
        for _ in range(rng.choice([1, 2, 8, 64])):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 'splice':
        i, j, n = rng.randrange(len(b)), rng.randrange(len(b)), rng.randrange(1, 256)
        b[i:i + n] = b[j:j + n]
    else:
        i, n = rng.randrange(len(b)), rng.randrange(1, 64)
        b[i:i + n] = bytes(len(b[i:i + n]))
    return bytes(b)


@contextlib.contextmanager
def bounded():
    """A block that may allocate at most CEILING bytes (NumPy's allocations included), its stderr kept quiet."""
    tracemalloc.start()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < CEILING, f'allocated {peak / 2 ** 20:.0f} MiB'


def loads_or_refuses(load: Callable[[], object]) -> str:
    """'loaded' or 'refused'; anything but a UserError, or an allocation past CEILING, fails the test."""
    try:
        with bounded():
            load()
        return 'loaded'
    except UserError as e:
        assert '\n' not in str(e), f'a multi-line error: {e}'
        return 'refused'


def load_checkpoint(path: Path, config: Path = None) -> None:
    cli.load_model(str(path), config and str(config), None)


SEEDS = ['released.npz', 'compressed.npz', 'big_vision.npz', 'vit_torch.safetensors', 'vit_torch.pt', 'timm.pth',
         'timm.safetensors', 'hf']


@pytest.mark.parametrize('seed', SEEDS)
def test_any_bytes_as_a_checkpoint_load_or_raise_the_user_error(seed, seeds, tmp_path):
    source = seeds[seed]
    config = source.parent / f'{seed}.json'
    config = config if config.exists() else None
    assert loads_or_refuses(lambda: load_checkpoint(source, config)) == 'loaded'  # the seed itself is good
    rng = random.Random(f'fuzz-{seed}')
    outcomes = []
    for i in range(40):
        if source.is_dir():  # a Hugging Face folder: corrupt one of its files
            target_dir = tmp_path / f'm{i}'
            shutil.copytree(source, target_dir)
            victim = target_dir / rng.choice(sorted(os.listdir(source)))
            victim.write_bytes(mutate(victim.read_bytes(), rng))
            target = target_dir
        else:
            target = tmp_path / f'm{i}{source.suffix}'
            target.write_bytes(mutate(source.read_bytes(), rng))
        outcomes.append(loads_or_refuses(lambda: load_checkpoint(target, config)))
    assert 'refused' in outcomes  # the mutations did reach the checks


# --------------------------------------------------------------------------- declared sizes and bombs

def npy_bytes(shape: str, dtype: str = '<f4', data: bytes = b'') -> bytes:
    """A .npy file whose header says what it is told to, whatever the data."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (dtype, shape)
    header += ' ' * ((64 - (len(header) + 11) % 64) % 64) + '\n'
    return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(header)) + header.encode() + data


def npz_of(path: Path, member: bytes, compression=zipfile.ZIP_STORED, name='embedding/kernel.npy') -> Path:
    with zipfile.ZipFile(path, 'w', compression) as z:
        z.writestr(name, member)
    return path


def safetensors_of(path: Path, header, data: bytes = b'') -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(text)) + text + data)
    return path


def hostile_files(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must hold)."""
    big = '(1000000, 1000000)'  # 4 TB of float32 declared in a few bytes
    files = {
        'npz member declaring 10^12 elements': (npz_of(d / 'a.npz', npy_bytes(big, data=bytes(64))), 'declares'),
        'deflated member declaring 10^12': (npz_of(d / 'b.npz', npy_bytes(big, data=bytes(64)), zipfile.ZIP_DEFLATED),
                                            'declares'),
        'negative dimension': (npz_of(d / 'c.npz', npy_bytes('(-1,)', data=bytes(4))), 'negative'),
        'header that does not parse': (npz_of(d / 'd.npz', npy_bytes('(1,2', data=bytes(4))), 'npz'),
        '1000-deep header': (npz_of(d / 'e.npz', npy_bytes('(' * 1000 + ')' * 1000, data=bytes(4))), 'npz'),
        'float dimension': (npz_of(d / 'f.npz', npy_bytes('(1.5,)', data=bytes(4))), 'shape'),
        'pickled objects': (npz_of(d / 'g.npz', npy_bytes('(1,)', '|O', data=bytes(8))), 'pickled'),
        'strings': (npz_of(d / 'h.npz', npy_bytes('(1,)', '<U4', data=bytes(16))), 'not numeric'),
        'scalar embedding': (npz_of(d / 'i.npz', npy_bytes('()', data=bytes(4))), 'nonzero dimensions'),
        'safetensors 10^12 elements': (safetensors_of(d / 'a.safetensors', {'a': {
            'dtype': 'F32', 'shape': [10 ** 12], 'data_offsets': [0, 4 * 10 ** 12]}}), 'offsets'),
        'safetensors header not JSON': (safetensors_of(d / 'b.safetensors', b'{not json'), 'JSON'),
        'safetensors 100,000-deep header': (safetensors_of(d / 'c.safetensors', b'{"a":' + b'[' * 100_000
                                                           + b']' * 100_000 + b'}'), 'RecursionError'),
        'safetensors metadata of numbers': (safetensors_of(d / 'd.safetensors', {'__metadata__': {'a': 1}}),
                                            'metadata'),
        'safetensors non-UTF-8 header': (safetensors_of(d / 'e.safetensors', b'{"\xff": 1}'), 'UnicodeDecodeError'),
        'safetensors unknown dtype': (safetensors_of(d / 'f.safetensors', {'a': {
            'dtype': 'Q9', 'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)), 'not a tensor'),
    }
    for name, tensor in [('bf16', torch.zeros(2, dtype=torch.bfloat16)), ('sparse', torch.zeros(2, 2).to_sparse()),
                         ('meta', torch.empty(2, device='meta')), ('complex', torch.zeros(2, dtype=torch.complex64))]:
        torch.save({'embedding.weight': tensor}, d / f'{name}.pt')
    files.update({
        '.pt of bfloat16 (upcast, then no ViT layout)': (d / 'bf16.pt', 'cannot infer a config'),
        '.pt of a sparse tensor': (d / 'sparse.pt', 'sparse'),
        '.pt of a meta tensor': (d / 'meta.pt', 'meta'),
        '.pt of a complex tensor': (d / 'complex.pt', 'complex'),
    })
    torch.save({1: torch.zeros(2)}, d / 'intkey.pt')
    files['.pt with integer keys'] = (d / 'intkey.pt', 'keys must be names')
    return files


def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path):
    for name, (path, needle) in hostile_files(tmp_path).items():
        with pytest.raises(UserError) as e, bounded():
            load_checkpoint(path)
        assert needle in str(e.value), f'{name}: {e.value}'


def test_arrays_of_the_wrong_rank_are_refused_by_name(tmp_path):
    """Every array of a good checkpoint replaced in turn by one of another rank or an empty one.

    The config is inferred or given.
    """
    with np.load(REFERENCE / 'tiny_token' / 'ckpt.npz') as z:
        good = {k: z[k] for k in z.files}
    path, config = tmp_path / 'ckpt.npz', REFERENCE / 'tiny_token' / 'model.json'
    for key in good:
        for shape in [(), (2, 3, 4, 5, 6), (0, 5)]:
            np.savez(path, **{**good, key: np.zeros(shape, np.float32)})
            for given in (None, config, 'ViT-Ti_16'):
                with pytest.raises(UserError) as e, bounded():
                    load_checkpoint(path, given)
                assert key in str(e.value) or given == 'ViT-Ti_16', (key, shape, given, str(e.value))


class Unpicklable:
    def __reduce__(self):
        return (os.system, ('touch PWNED',))


def test_pickled_code_is_never_run(tmp_path):
    import pickle

    (tmp_path / 'evil.pt').write_bytes(pickle.dumps({'a': Unpicklable()}, protocol=2))
    torch.save({'a': torch.zeros(2), 'b': Unpicklable()}, tmp_path / 'evil_zip.pt')
    for name in ('evil.pt', 'evil_zip.pt'):
        with pytest.raises(UserError, match='not a tensors-only PyTorch state dict'):
            load_checkpoint(tmp_path / name)
    assert not (tmp_path / 'PWNED').exists() and not Path('PWNED').exists()


def test_a_compression_bomb_is_refused_at_the_ceiling(tmp_path, monkeypatch):
    """A deflated member of zeros: 32 MiB from about 32 KB, against a read budget of 8 MiB."""
    monkeypatch.setenv('VIT_MIRROR_MAX_READ', '8M')
    n = 8 << 20  # float32 elements: 32 MiB
    bomb = tmp_path / 'bomb.npz'
    with zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as z, z.open('embedding/kernel.npy', 'w') as m:
        m.write(npy_bytes(f'({n},)'))
        for _ in range(32):
            m.write(bytes(1 << 20))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(UserError, match=r'would inflate to 32\.0 MiB, past the 8\.0 MiB .*VIT_MIRROR_MAX_READ'), \
            bounded():
        containers.read_npz(str(bomb))
    # A member that lies about its size inflates only as far as it says, and fails its CRC.
    liar = tmp_path / 'liar.npz'
    with zipfile.ZipFile(liar, 'w', zipfile.ZIP_DEFLATED) as z:
        z.writestr('embedding/kernel.npy', npy_bytes('(4,)', data=bytes(16)))
    data = bytearray(liar.read_bytes())
    at = data.rfind(b'PK\x01\x02')  # the central directory entry: its uncompressed size is at offset 24
    struct.pack_into('<I', data, at + 24, struct.unpack_from('<I', data, at + 24)[0] + 16)
    liar.write_bytes(bytes(data))
    assert loads_or_refuses(lambda: containers.read_npz(str(liar))) == 'refused'
    # The budget is for inflating: the same member within it reads.
    monkeypatch.setenv('VIT_MIRROR_MAX_READ', '64M')
    assert containers.read_npz(str(bomb))['embedding/kernel'].shape == (n,)


def test_mutated_npy_inputs(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    good = io.BytesIO()
    np.save(good, x)
    rng = random.Random('npy')
    for i in range(60):
        path = tmp_path / f'x{i}.npy'
        path.write_bytes(mutate(good.getvalue(), rng) if i else npy_bytes('(100000, 1000, 1000, 3)'))
        loads_or_refuses(lambda: cli.read_npy(str(path), '--input'))


# --------------------------------------------------------------------------- configs

def test_mutated_configs_load_or_raise_the_user_error(tmp_path):
    base = json.loads((REFERENCE / 'tiny_token' / 'model.json').read_text())
    values = [0, -1, 2, 64.7, 1e309, None, True, 'x', '', [], {}, [8], [8, 8], 10 ** 30, '16', 'B/16', 0.5, -0.1]
    keys = [('hidden_size',), ('classifier',), ('num_classes',), ('representation_size',), ('patches', 'size'),
            ('transformer', 'num_heads'), ('transformer', 'mlp_dim'), ('transformer', 'num_layers'),
            ('transformer', 'dropout_rate'), ('resnet',), ('variant',), ('pool_type',), ('posemb',), ('width',)]
    rng = random.Random('configs')
    path = tmp_path / 'model.json'
    outcomes = []
    for _ in range(400):
        d = json.loads(json.dumps(base))
        for _ in range(rng.choice([1, 2, 3])):
            *parents, leaf = rng.choice(keys)
            node = d
            for k in parents:
                node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else node
            node[leaf] = rng.choice(values)
        path.write_text(json.dumps(d))
        outcomes.append(loads_or_refuses(lambda: load_config(str(path))))
    assert {'loaded', 'refused'} <= set(outcomes)
    for text in (b'\xff\xfe{}', b'[' * 100_000 + b']' * 100_000, b'{"hidden_size": ', b'null', b'[1, 2]'):
        path.write_bytes(text)
        assert loads_or_refuses(lambda: load_config(str(path))) == 'refused'


@pytest.mark.parametrize('field, value, needle', [
    ('hidden_size', 64.7, 'whole number'),
    ('num_classes', 10.5, 'whole number'),
    (('transformer', 'num_heads'), 0, 'heads must be positive'),
    (('transformer', 'dropout_rate'), 1.5, 'dropout'),
])
def test_config_numbers_that_are_not_what_they_seem(tmp_path, field, value, needle):
    d = json.loads((REFERENCE / 'tiny_token' / 'model.json').read_text())
    if isinstance(field, tuple):
        d[field[0]][field[1]] = value
    else:
        d[field] = value
    (tmp_path / 'm.json').write_text(json.dumps(d))
    with pytest.raises(UserError, match=needle):
        load_config(str(tmp_path / 'm.json'))


# --------------------------------------------------------------------------- images

def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels (and holds almost none)."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(bytes(100))) + chunk(b'IEND', b''))


def test_mutated_images_load_or_raise_the_user_error(tmp_path):
    from PIL import Image

    photo = Image.open(PHOTOS / 'chelsea.png').convert('RGB').resize((48, 32))
    originals = []
    for fmt in ('PNG', 'JPEG', 'GIF', 'BMP', 'TIFF', 'WEBP'):
        buf = io.BytesIO()
        (photo.convert('P') if fmt == 'GIF' else photo).save(buf, fmt)
        originals.append(buf.getvalue())
    rng = random.Random('images')
    path = tmp_path / 'image'
    outcomes = []
    for _ in range(240):
        path.write_bytes(mutate(rng.choice(originals), rng))
        outcomes.append(loads_or_refuses(lambda: load_image(str(path), 32)))
    assert {'loaded', 'refused'} <= set(outcomes)
    # Dimensions are read from the header and refused before anything is decoded.
    for w, h in ((12_000, 12_000), (2 ** 31 - 1, 1), (100_000, 100_000)):
        path.write_bytes(png_header(w, h))
        with pytest.raises(UserError, match=r'megapixels\), more than the 40'), bounded():
            load_image(str(path), 32)


# --------------------------------------------------------------------------- the exit-code contract

def assert_one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ') and needle in last, proc.stderr


def command(monkeypatch, capsys, main, *argv) -> tuple[int, str]:
    """`python -m PACKAGE ARGV...` in this process (conftest's `run_main`): (exit code, stderr). What a real
    process adds (no traceback, the code the shell sees) is checked by this file's subprocess tests."""
    proc = run_main(main, *argv)
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_the_exit_code_contract_from_the_command_line(seeds, tmp_path, monkeypatch, capsys):
    """A damaged checkpoint, a declared-size bomb, a full-disk stand-in and sizes past the machine: exit 2, one line.

    One real process per command family (vit_torch, vit_jax, parity); the other cases run the same `run` in-process.
    """
    from vit_jax import cli as jax_cli
    from vit_torch import cli as torch_cli

    damaged = tmp_path / 'damaged.safetensors'
    damaged.write_bytes(seeds['vit_torch.safetensors'].read_bytes()[:5000])
    bomb = npz_of(tmp_path / 'bomb.npz', npy_bytes('(1000000, 1000000)', data=bytes(64)))
    x, out = REFERENCE / 'tiny_token' / 'x.npy', tmp_path / 'out'
    out.mkdir()
    cases = [
        (('vit_torch', 'logits', damaged, '--input', x, '--output', out / 'y.npy'), 'not a readable .safetensors'),
        (('parity', 'compare', seeds['released.npz'], '--random', '100000000'), 'VIT_MIRROR_MAX_MEMORY'),
        (('vit_jax', 'predict', PHOTOS / 'chelsea.png', '--checkpoint', seeds['released.npz'], '--image-size',
          '80000'), 'needs about'),
    ]
    for args, needle in cases:
        assert_one_error_line(run_cli(*args), needle)
    in_process = [
        ((jax_cli.main, 'logits', bomb, '--input', x, '--output', out / 'y.npy'), 'declares'),
        ((torch_cli.main, 'convert', seeds['released.npz'], '/dev/null', '--to', 'npz'), 'not a regular file'),
    ]
    for args, needle in in_process:
        code, err = command(monkeypatch, capsys, *args)
        assert_one_error_line(subprocess.CompletedProcess(args, code, '', err), needle)
    assert not any(out.iterdir())


@pytest.mark.slow
def test_a_file_size_limit_is_one_line_and_leaves_nothing(seeds, tmp_path):
    """`ulimit -f`: every writer (npz, safetensors, torch.save, a Hugging Face folder) stops cleanly."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for name, extra in (('o.npz', []), ('o.safetensors', []), ('o.pt', []), ('o_hf', ['--to', 'hf'])):
        cmd = f'ulimit -f 16; exec {sys.executable} -m vit_torch convert {seeds["released.npz"]} {tmp_path / name} ' \
              + ' '.join(extra)
        proc = subprocess.run(['bash', '-c', cmd], capture_output=True, text=True, env=env)
        assert_one_error_line(proc, 'file-size limit (ulimit -f)')
        assert name in proc.stderr.strip().splitlines()[-1] and '.tmp-' not in proc.stderr
        assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
