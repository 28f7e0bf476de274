"""Checkpoints by name or URL (parity/cli/remote.py): resolved, downloaded once, resumed, verified, cached.

Every download here is from `fake_gcs.FakeGCS`, a server on the loopback address that the test starts;
VIT_MIRROR_GCS_URL points the catalogue and gs:// URLs at it, VIT_MIRROR_CACHE at the test's folder.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import socket
import textwrap

import numpy as np
import pytest

from conftest import python, random_params, tiny
from fake_gcs import FakeGCS
from parity import cli
from parity.cli import models, remote
from parity.core import weights
from parity.core.errors import UserError
from vit_torch import cli as torch_cli

B16 = '/vit_models/imagenet21k/ViT-B_16.npz'  # where ViT-B_16@imagenet21k lives under VIT_MIRROR_GCS_URL


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    server = FakeGCS()
    monkeypatch.setenv(remote.GCS_ENV, server.url)
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.setenv(remote.TIMEOUT_ENV, '5')
    monkeypatch.setenv(remote.OFFLINE_ENV, '0')  # online; restored after a test whose --offline sets it
    yield server
    server.close()


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory) -> bytes:
    """A released-layout npz of the tiny config, as the project saves one."""
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.npz'
    weights.save_npz(str(path), random_params(weights.param_shapes(tiny()), seed=3))
    return path.read_bytes()


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / 'cache'
    return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()) if root.exists() else []


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert '\n' not in text and text
    return text


def test_a_name_downloads_once_is_reused_and_loads_with_the_files_own_logits(gcs, tiny_npz, tmp_path, capsys):
    gcs.put(B16, tiny_npz)
    local = tmp_path / 'local.npz'
    local.write_bytes(tiny_npz)
    x = tmp_path / 'x.npy'
    np.save(x, np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
    outs = []
    for i, spec in enumerate(['ViT-B_16@imagenet21k', 'ViT-B_16@imagenet21k', str(local)]):
        out = tmp_path / f'y{i}.npy'
        offline = ['--offline'] if i == 1 else []  # the second run: the cache only
        assert torch_cli.logits_main([spec, '--input', str(x), '--output', str(out), *offline]) == 0
        err = capsys.readouterr().err.splitlines()
        if i < 2:  # the resolved file is the first line
            assert err[0] == f'ViT-B_16@imagenet21k: {tmp_path}/cache/gs/vit_models/imagenet21k/ViT-B_16.npz'
        outs.append(np.load(out))
    assert len(gcs.gets(B16)) == 1 and os.environ[remote.OFFLINE_ENV] == '1'  # the second run read the cache
    assert np.array_equal(outs[0], outs[2]) and np.array_equal(outs[1], outs[2])
    assert cache_files(tmp_path) == ['gs/vit_models/imagenet21k/ViT-B_16.npz']
    # the cache listed
    assert remote.resolve('ViT-B_16@imagenet21k').endswith('ViT-B_16.npz')
    assert models.main(['--cached']) == 0
    assert 'gs/vit_models/imagenet21k/ViT-B_16.npz' in capsys.readouterr().out


def test_urls_gs_paths_augreg_files_and_subtrees_resolve(gcs, tiny_npz, tmp_path):
    augreg = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'
    gcs.put(f'/vit_models/augreg/{augreg}.npz', tiny_npz)
    gcs.put('/some/where/model.npz', tiny_npz)
    cached = remote.resolve(augreg)
    assert cached == str(tmp_path / 'cache' / 'gs' / 'vit_models' / 'augreg' / f'{augreg}.npz')
    assert remote.resolve(f'gs://vit_models/augreg/{augreg}.npz') == cached  # the same file, no new request
    assert len(gcs.gets(f'/vit_models/augreg/{augreg}.npz')) == 1
    url = remote.resolve(f'{gcs.url}/some/where/model.npz:params')
    assert url.endswith('/model.npz:params') and os.path.isfile(url.rpartition(':')[0])
    assert remote.resolve(str(tmp_path)) == str(tmp_path)  # a path is left alone
    with pytest.raises(UserError) as e:
        remote.resolve('ViT-B_16@imagenet21')
    assert 'did you mean ViT-B_16@imagenet21k' in one_line(e)


@pytest.mark.parametrize('ranges', [True, False])
def test_a_cut_transfer_resumes_to_an_identical_file(gcs, tiny_npz, tmp_path, ranges):
    gcs.put(B16, tiny_npz, cut=len(tiny_npz) // 2, no_range=not ranges)  # without ranges: all again
    with pytest.raises(UserError) as e:
        remote.resolve('ViT-B_16@imagenet21k')
    assert 'run the same command again to resume' in one_line(e)
    part = tmp_path / 'cache' / 'gs' / 'vit_models' / 'imagenet21k' / 'ViT-B_16.npz.part'
    assert 0 < part.stat().st_size < len(tiny_npz)
    have = part.stat().st_size
    path = remote.resolve('ViT-B_16@imagenet21k')
    assert open(path, 'rb').read() == tiny_npz
    assert gcs.gets(B16) == ['', f'bytes={have}-']  # the second request asked for the rest only
    assert cache_files(tmp_path) == ['gs/vit_models/imagenet21k/ViT-B_16.npz']


@pytest.mark.parametrize('header', ['x-goog-hash', 'etag'])
def test_a_corrupted_byte_is_refused_and_nothing_stays(gcs, tiny_npz, tmp_path, header):
    gcs.header = header
    gcs.put(B16, tiny_npz, corrupt=True)
    with pytest.raises(UserError) as e:
        remote.resolve('ViT-B_16@imagenet21k')
    assert 'fails its md5 check' in one_line(e)
    assert cache_files(tmp_path) == []


def test_the_catalogues_sha256_and_size_are_checked(gcs, tiny_npz, tmp_path):
    gcs.header = None  # no server checksum: the recorded one decides
    gcs.put('/f.npz', tiny_npz)
    url = f'{gcs.url}/f.npz'
    with pytest.raises(UserError) as e:
        remote.fetch(url, 'f.npz', sha256='0' * 64)
    assert 'fails its sha256 check' in one_line(e) and cache_files(tmp_path) == []
    with pytest.raises(UserError) as e:
        remote.fetch(url, 'f.npz', size=len(tiny_npz) + 1)
    assert 'the catalogue says' in one_line(e) and cache_files(tmp_path) == []
    assert remote.fetch(url, 'f.npz', len(tiny_npz), hashlib.sha256(tiny_npz).hexdigest()).endswith('f.npz')


def test_each_failure_is_one_line_and_leaves_nothing(gcs, tiny_npz, tmp_path, monkeypatch):
    gcs.put('/gone.npz', b'', status=404)
    gcs.put('/broken.npz', b'', status=503)
    gcs.put('/slow.npz', tiny_npz, delay=1.0)
    cases = [(f'{gcs.url}/gone.npz', 'HTTP 404'), (f'{gcs.url}/broken.npz', 'HTTP 503'),
             (f'{gcs.url}/slow.npz', 'no answer within 0.3 s')]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        cases.append((f'http://127.0.0.1:{s.getsockname()[1]}/x.npz', 'cannot reach the server'))
    monkeypatch.setenv(remote.TIMEOUT_ENV, '0.3')
    for spec, needle in cases:
        with pytest.raises(UserError) as e:
            remote.resolve(spec)
        assert needle in one_line(e), (spec, str(e.value))
    assert cache_files(tmp_path) == []
    monkeypatch.setenv(remote.OFFLINE_ENV, '1')
    with pytest.raises(UserError) as e:
        remote.resolve('ViT-B_16@imagenet21k')
    assert 'not in the download cache' in one_line(e) and gcs.gets(B16) == []


def test_a_full_disk_and_a_read_only_cache_are_one_line(gcs, tiny_npz, tmp_path, monkeypatch):
    gcs.put(B16, tiny_npz)
    real_open = builtins.open

    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_open(path, mode='r', *a, **k):
        return Full(path, mode.replace('b', '')) if str(path).endswith('.part') else real_open(path, mode, *a, **k)

    monkeypatch.setattr(remote, 'open', full_open, raising=False)
    with pytest.raises(UserError) as e:
        remote.resolve('ViT-B_16@imagenet21k')
    assert 'the disk is full' in one_line(e)
    assert cache_files(tmp_path) == []  # the partial file went with the error
    monkeypatch.undo()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setenv(remote.GCS_ENV, gcs.url)
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / 'ro'))
    monkeypatch.setattr(remote.os, 'makedirs', read_only)
    with pytest.raises(UserError) as e:
        remote.resolve('ViT-B_16@imagenet21k')
    assert 'read-only file system' in one_line(e)


def test_two_processes_download_once(gcs, tiny_npz, tmp_path):
    gcs.put(B16, tiny_npz, delay=1.0)  # the first holds the lock a second: the other starts meanwhile
    code = textwrap.dedent("""
        from parity.cli import remote
        print(remote.resolve('ViT-B_16@imagenet21k'))
    """)
    procs = [python(code) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1 and open(paths.pop(), 'rb').read() == tiny_npz
    assert len(gcs.gets(B16)) == 1
    assert sum('waiting for another process downloading ViT-B_16.npz' in e for _, e in outs) == 1
    assert cache_files(tmp_path) == ['gs/vit_models/imagenet21k/ViT-B_16.npz']


def test_prune_removes_partial_files_only(gcs, tiny_npz, tmp_path, capsys):
    gcs.put(B16, tiny_npz, cut=100)
    with pytest.raises(UserError):
        remote.resolve('ViT-B_16@imagenet21k')
    gcs.put('/vit_models/sam/ViT-B_16.npz', tiny_npz)
    remote.resolve('ViT-B_16@sam')
    assert models.main(['--prune']) == 0
    assert capsys.readouterr().out.split() == ['gs/vit_models/imagenet21k/ViT-B_16.npz.part']
    assert cache_files(tmp_path) == ['gs/vit_models/sam/ViT-B_16.npz']


def hub_cache(root, repo: str, files: dict[str, bytes]) -> None:
    """The huggingface_hub cache layout of one commit of `repo`: models--ORG--NAME/{refs/main,snapshots/SHA/...}."""
    folder = root / f'models--{repo.replace("/", "--")}'
    sha = 'a' * 40
    (folder / 'refs').mkdir(parents=True)
    (folder / 'refs' / 'main').write_text(sha)
    for name, data in files.items():
        (folder / 'snapshots' / sha).mkdir(parents=True, exist_ok=True)
        (folder / 'snapshots' / sha / name).write_bytes(data)


def test_hf_hub_and_timm_names_offline_from_the_hub_cache(gcs, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    cfg = tiny(num_classes=3)
    params = random_params(weights.param_shapes(cfg), seed=5)
    saved = tmp_path / 'saved'
    weights.save(str(saved), dict(params), cfg, 'hf')  # config.json + model.safetensors, as save_pretrained writes
    hub = tmp_path / 'hub'
    hub_cache(hub, 'someone/tiny-vit', {p.name: p.read_bytes() for p in saved.iterdir()})
    timm_file = tmp_path / 'timm.safetensors'
    weights.save(str(timm_file), dict(params), cfg, 'timm')
    hub_cache(hub, 'timm/tiny_vit.test', {'model.safetensors': timm_file.read_bytes(), 'config.json': json.dumps(
        {'architecture': 'vit_tiny_test', 'num_classes': 3}).encode()})
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(hub))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv(remote.OFFLINE_ENV, '1')
    for spec in ('hf-hub:someone/tiny-vit', 'hf-hub:someone/tiny-vit@main'):
        model = cli.load_model(spec, None, None)  # the folder's own config.json
        assert capsys.readouterr().err.splitlines()[0].startswith(f'{spec}: {hub}')
        assert model.cfg.num_classes == 3
        for k, v in params.items():
            np.testing.assert_array_equal(model.params[k], v, err_msg=f'{spec} {k}')
    folder = remote.resolve('timm/tiny_vit.test')  # timm's hub folder: its state dict, read as timm's
    ckpt = weights.load(folder)
    assert ckpt.format == 'timm'
    for k, v in ckpt.params(cfg).items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    with pytest.raises(UserError) as e:
        remote.resolve('hf-hub:someone/not-there')
    assert 'not in the Hugging Face cache' in one_line(e)
    assert gcs.requests == []


def test_train_takes_offline_and_refuses_an_uncached_name_before_anything_is_written(gcs, tmp_path):
    from vit_jax import train_cli

    with pytest.raises(UserError, match=r'not in the download cache .*offline'):
        train_cli.main(['--dataset', 'digits', '--checkpoint', 'ViT-B_16@imagenet21k', '--workdir',
                        str(tmp_path / 'w'), '--offline', '--steps', '2', '--warmup-steps', '0'])
    assert os.environ[remote.OFFLINE_ENV] == '1' and not gcs.gets(B16) and not (tmp_path / 'w').exists()
