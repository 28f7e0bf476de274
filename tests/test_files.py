"""The one of each in `parity.core.files` and `parity.cli.plotting`: JSON read and written, records compared,
whether a process runs, a figure saved.

Every file that is not what it should be is one `UserError` line naming it and the cause;
every write is atomic: a failed one leaves the old file, or none, and no temporary.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from conftest import python, random_params, tiny
from parity.cli import plotting
from parity.core import files, limits, weights
from parity.core.errors import UserError

WHAT = '--config c.json'


def one_line(e: pytest.ExceptionInfo) -> str:
    line = str(e.value)
    assert '\n' not in line and line.startswith(WHAT), line
    return line


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize('content, needle', [
    (b'{"a": 1,', 'not valid JSON (Expecting property name'),
    (b'', 'not valid JSON'),
    (b'\xff\xfe{}', 'not UTF-8 text, so not JSON'),
    (b'[' * 100_000 + b']' * 100_000, 'nested too deeply to read'),
    (b'1' * 5000, 'not valid JSON'),  # past Python's limit on the digits of an int
])
def test_json_that_cannot_be_read_is_one_line_naming_the_file_and_the_cause(tmp_path, content, needle):
    path = tmp_path / 'c.json'
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        files.read_json(str(path), WHAT)
    assert needle in one_line(e)


def test_a_missing_or_unreadable_file_and_one_too_large_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:
        files.read_json(str(tmp_path / 'none.json'), WHAT)
    assert one_line(e) == f'{WHAT}: cannot read it (No such file or directory)'
    with pytest.raises(UserError) as e:
        files.read_json(str(tmp_path), WHAT)
    assert 'cannot read it' in one_line(e)
    (tmp_path / 'big.json').write_text('[' + '0, ' * 100 + '0]')
    monkeypatch.setattr(limits, 'MAX_TEXT_BYTES', 64)
    with pytest.raises(UserError) as e:
        files.read_json(str(tmp_path / 'big.json'), WHAT)
    assert 'more than a file of its kind holds' in one_line(e)


def test_the_advice_ends_each_line(tmp_path):
    (tmp_path / 'c.json').write_text('{')
    with pytest.raises(UserError) as e:
        files.read_json(str(tmp_path / 'c.json'), WHAT, 'use a new --workdir')
    assert one_line(e).endswith('; use a new --workdir')


@pytest.mark.parametrize('value, kind', [([1, 2], 'list'), ('x', 'string'), (3.5, 'number'), (None, 'null'),
                                         (True, 'boolean')])
def test_a_file_that_must_hold_an_object_refuses_anything_else(tmp_path, value, kind):
    path = tmp_path / 'c.json'
    path.write_text(json.dumps(value))
    assert files.read_json(str(path), WHAT) == value
    with pytest.raises(UserError) as e:
        files.read_json_object(str(path), WHAT, 'the record of a run', 'use a new --workdir')
    assert one_line(e) == f'{WHAT} holds a JSON {kind}, not the record of a run; use a new --workdir'
    path.write_text('{"a": [1, {"b": null}]}')
    assert files.read_json_object(str(path), WHAT) == {'a': [1, {'b': None}]}


# --------------------------------------------------------------------------- writing

def test_write_json_writes_indented_json_with_a_final_newline(tmp_path):
    path = tmp_path / 'out.json'
    path.write_text('old')
    record = {'lr': 0.01, 'grid': {'seed': [0, 1]}, 'name': 'ü'}
    files.write_json(str(path), record)
    assert path.read_text() == json.dumps(record, indent=2) + '\n'
    assert files.read_json_object(str(path), WHAT) == record and os.listdir(tmp_path) == ['out.json']


def test_a_failed_json_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / 'out.json'
    path.write_text('old')
    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        files.write_json(str(path), {'a': {1, 2}})
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['out.json']

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, 'replace', full)
    with pytest.raises(UserError) as e:
        files.write_json(str(path), {'a': 1}, '--json')
    assert str(e.value) == f'--json {path}: cannot write it: the disk is full; free space, or write somewhere else'
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['out.json']
    with pytest.raises(UserError, match='cannot write it: the disk is full'):
        files.write_json(str(tmp_path / 'new.json'), {'a': 1})
    assert os.listdir(tmp_path) == ['out.json']


def test_a_json_write_to_a_folder_that_is_not_there_is_one_line(tmp_path):
    with pytest.raises(UserError, match=f'--json {tmp_path}/no/out.json: directory .* does not exist'):
        files.write_json(str(tmp_path / 'no' / 'out.json'), {}, '--json')


# --------------------------------------------------------------------------- records

def test_record_differences_names_the_fields_that_differ():
    mine = {'lr': 0.1, 'steps': 10, 'labels': {}, 'seed': 0}
    assert files.record_differences(dict(mine), mine, ['lr', 'steps', 'labels']) == []
    assert files.record_differences(dict(mine, lr=0.2, seed=1), mine, ['lr', 'steps', 'labels']) == ['lr']
    # A field an older record does not have counts as its default, or None.
    old = {'lr': 0.1, 'steps': 10}
    assert files.record_differences(old, mine, ['lr', 'steps', 'labels']) == ['labels']
    assert files.record_differences(old, mine, ['lr', 'steps', 'labels'], {'labels': {}}) == []


# --------------------------------------------------------------------------- processes

def test_process_alive_knows_the_living_the_dead_and_garbage():
    assert files.process_alive(os.getpid())
    dead = python('import os; print(os.getpid())')
    dead_pid = int(dead.communicate()[0])
    assert not files.process_alive(dead_pid)
    for garbage in (0, -1, None, '123', True, 2 ** 40, 1.5):
        assert not files.process_alive(garbage), garbage


# --------------------------------------------------------------------------- a hub folder's config.json

def test_a_hub_folders_config_json_is_read_once_per_load(tmp_path, monkeypatch):
    cfg = tiny()
    reads = []
    real = files.read_json

    def counted(path, what, advice=None):
        reads.append(path)
        return real(path, what, advice)

    weights.save(str(tmp_path / 'hf'), random_params(weights.param_shapes(cfg)), cfg, 'hf')
    (tmp_path / 'timm').mkdir()
    weights.save(str(tmp_path / 'timm' / 'model.safetensors'), random_params(weights.param_shapes(cfg)), cfg, 'timm')
    files.write_json(str(tmp_path / 'timm' / 'config.json'), {'architecture': 'vit_tiny_patch16_224'})
    monkeypatch.setattr(files, 'read_json', counted)
    for spec, heads in [('hf', 4), ('hf/model.safetensors', 4), ('timm', 3), ('timm/model.safetensors', 3)]:
        reads.clear()
        ckpt = weights.load(str(tmp_path / spec))
        assert reads == [str(tmp_path / spec.split('/')[0] / 'config.json')], (spec, reads)
        assert ckpt.num_heads == heads, spec


# --------------------------------------------------------------------------- figures

def test_a_figure_is_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    plt = plotting.pyplot()
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    path = tmp_path / 'f.png'
    assert plotting.save_figure(fig, str(path), 50) == str(path)
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and not plt.get_fignums()
    assert os.listdir(tmp_path) == ['f.png']

    fig, ax = plt.subplots(figsize=(2, 1))
    real = fig.savefig

    def fills_the_disk(target, **kw):
        real(target, **kw)
        with open(target, 'r+b') as f:
            f.truncate(100)  # half an image on disk, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fig, 'savefig', fills_the_disk)
    before = path.read_bytes()
    with pytest.raises(UserError) as e:
        plotting.save_figure(fig, str(path), 50, '--out')
    assert str(e.value).startswith(f'--out {path}: cannot write it: the disk is full') and '\n' not in str(e.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['f.png'] and not plt.get_fignums()
