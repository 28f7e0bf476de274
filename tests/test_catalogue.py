"""The catalogue of Google's checkpoints (parity/core/catalogue.py) and `models` (parity/cli/models.py): rows well
formed, and AugReg's index.csv filtered and ranked as the official code does, on a small fixture with its columns."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest

from fake_gcs import FakeGCS
from parity.cli import models, remote
from parity.core import catalogue, weights
from parity.core.config import OFFICIAL_CONFIGS, load_config
from parity.core.errors import UserError
from vit_jax import cli as jax_cli
from vit_torch import cli as torch_cli

URL = re.compile(r'gs://vit_models/(imagenet21k|imagenet21k\+imagenet2012|sam|augreg)/[\w.+-]+\.npz')


def test_rows_are_well_formed_unique_and_buildable():
    rows = catalogue.CATALOGUE
    assert len(rows) == 42
    names = [r.name.lower() for r in rows]
    assert len(set(names)) == len(names)
    assert len({r.url for r in rows}) == len(rows)
    for r in rows:
        assert URL.fullmatch(r.url), r.url
        assert r.architecture in OFFICIAL_CONFIGS and weights.param_shapes(load_config(r.architecture)), r.name
        assert r.name.split('@')[0] in (r.architecture, r.architecture + '-224'), r.name
        assert r.source.startswith(catalogue.REPO), r.name
        assert r.top1 is None or 70 < r.top1 < 90
        assert r.resolution in (None, 224, 384)
        assert (r.finetune is None) == ('+' not in r.name.split('@')[1]), r.name
        if '/augreg/' in r.url:
            assert remote.AUGREG_FILE.fullmatch(r.filename), r.filename
            assert r.name.endswith(('@augreg-i21k', '@augreg-i21k+imagenet2012'))
        else:
            assert r.name == f'{r.filename[:-4]}@{r.url.split("/")[3]}'
    # The README's recommended AugReg table: each fine-tune starts with its pre-training's filename.
    aug = {r.name: r for r in rows if '/augreg/' in r.url}
    for name, r in aug.items():
        if name.endswith('+imagenet2012'):
            up = aug[name.replace('+imagenet2012', '')]
            assert r.filename.startswith(up.filename[:-4] + '--imagenet2012-')
    assert catalogue.find('vit-b_16@IMAGENET21K').url == 'gs://vit_models/imagenet21k/ViT-B_16.npz'
    assert catalogue.find('ViT-B_16-224@imagenet21k+imagenet2012').top1 == 81.2
    assert catalogue.find('ViT-B_16@augreg-i21k+imagenet2012').top1 == 85.49


def test_models_table_json_and_filter(capsys):
    assert jax_cli.main(['models', 'sam']) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ['name', 'architecture'] and len(out) == 1 + 5
    assert torch_cli.main(['models', '--json']) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r['name'] for r in rows] == [r.name for r in catalogue.CATALOGUE]
    assert {'url', 'source', 'top1', 'resolution', 'size_mib', 'sha256'} <= set(rows[0])
    with pytest.raises(UserError, match='add --augreg'):
        models.main(['--adapt-ds', 'cifar100'])
    with pytest.raises(UserError, match='no catalogue row matches'):
        models.main(['nothing-like-this'])


# A small index.csv with the official columns. B/16 has two i21k pre-trainings (U1 the better by final_val) and
# an i1k one (U3, the highest final_val of all but not i21k); S/16 one (U4). U2's cifar100 fine-tune beats U1's,
# yet U1 is B/16's recommended pre-training, so the colab's best adapt is U1's.
U1 = 'B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0'
U2 = 'B_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0'
U3 = 'B_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1'
U4 = 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0'
FIXTURE = [  # name, ds, aug, wd, do, sd, final_val, upstream, adapt_ds, res, adapt_final_val
    ('B/16', 'i21k', 'medium1', 0.1, 0.0, 0.0, 0.50, U1, 'cifar100', 224, 0.91),
    ('B/16', 'i21k', 'medium1', 0.1, 0.0, 0.0, 0.50, U1, 'cifar100', 384, 0.93),
    ('B/16', 'i21k', 'medium1', 0.1, 0.0, 0.0, 0.50, U1, 'imagenet2012', 384, 0.85),
    ('B/16', 'i21k', 'light1', 0.03, 0.0, 0.0, 0.47, U2, 'cifar100', 384, 0.95),
    ('B/16', 'i1k', 'medium2', 0.1, 0.1, 0.1, 0.78, U3, 'cifar100', 384, 0.97),
    ('S/16', 'i21k', 'light1', 0.03, 0.0, 0.0, 0.45, U4, 'cifar100', 384, 0.90),
]


def adapt_name(up, ds, res):
    return f'{up}--{ds}-steps_10k-lr_0.01-res_{res}'


def index_csv() -> bytes:
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(catalogue.AUGREG_COLUMNS)
    for name, ds, aug, wd, do, sd, val, up, ads, res, aval in FIXTURE:
        w.writerow([name, ds, 300, 0.001, aug, wd, do, sd, val + 0.01, val, val - 0.01, ads, 0.01, 10000, res, aval,
                    aval - 0.01, 86e6, 100.0, up, adapt_name(up, ads, res)])
    return f.getvalue().encode()


@pytest.fixture
def index(tmp_path, monkeypatch):
    server = FakeGCS()
    server.put('/' + catalogue.AUGREG_INDEX, index_csv())
    monkeypatch.setenv(remote.GCS_ENV, server.url)
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / 'cache'))
    monkeypatch.delenv(remote.OFFLINE_ENV, raising=False)
    yield server
    server.close()


def run(capsys, *argv) -> list[str]:
    assert models.main(['--augreg', *argv]) == 0
    return capsys.readouterr().out.split('\n')[:-1]


def last_column(lines):
    return [line.split()[-1] for line in lines[1:]]


@pytest.mark.parametrize('argv, expected', [
    # vit_jax/train.py: the i21k rows of the model, the highest final_val.
    (['--best', 'upstream', '--name', 'B/16'], U1),
    (['--best', 'upstream'], U1),
    (['--best', 'upstream', '--ds', 'i1k'], U3),
    (['--best', 'upstream', '--name', 'B/16', '--aug', 'light1'], U2),
    # vit_jax_augreg.ipynb: the recommended pre-training of each model, its best fine-tune by adapt_final_val.
    (['--best', 'adapt', '--name', 'B/16', '--adapt-ds', 'cifar100'], adapt_name(U1, 'cifar100', 384)),
    (['--best', 'adapt', '--adapt-ds', 'cifar100'], adapt_name(U1, 'cifar100', 384)),
    (['--best', 'adapt', '--adapt-ds', 'cifar100', '--adapt-resolution', '224'], adapt_name(U1, 'cifar100', 224)),
    (['--best', 'adapt', '--name', 'S/16', '--adapt-ds', 'cifar100'], adapt_name(U4, 'cifar100', 384)),
])
def test_augreg_best_is_the_official_pick(index, capsys, argv, expected):
    assert run(capsys, *argv) == [expected]


def test_augreg_lists_filter_and_rank_and_download_once(index, capsys):
    assert last_column(run(capsys, '--name', 'B/16')) == [U3, U1, U2]  # final_val 0.78, 0.50, 0.47
    assert last_column(run(capsys, '--name', 'B/16', '--ds', 'i21k')) == [U1, U2]
    assert last_column(run(capsys, '--wd', '0.03')) == [U2, U4]
    assert last_column(run(capsys, '--adapt-ds', 'cifar100')) == [  # adapt_final_val 0.97 .. 0.90
        adapt_name(U3, 'cifar100', 384), adapt_name(U2, 'cifar100', 384), adapt_name(U1, 'cifar100', 384),
        adapt_name(U1, 'cifar100', 224), adapt_name(U4, 'cifar100', 384)]
    assert last_column(run(capsys, '--adapt-resolution', '224')) == [adapt_name(U1, 'cifar100', 224)]
    rows = json.loads('\n'.join(run(capsys, '--json', '--sd', '0.1')))
    assert [r['filename'] for r in rows] == [U3] and rows[0]['final_val'] == '0.78'
    with pytest.raises(UserError, match='no AugReg checkpoint matches'):
        models.main(['--augreg', '--name', 'L/16', '--best', 'upstream'])
    with pytest.raises(UserError, match='add --adapt-ds'):
        models.main(['--augreg', '--best', 'adapt'])
    assert len(index.gets('/' + catalogue.AUGREG_INDEX)) == 1  # cached after the first


def test_a_file_that_is_not_the_index_is_one_line(index, capsys):
    index.put('/' + catalogue.AUGREG_INDEX, b'name,ds\nB/16,i21k\n')
    with pytest.raises(UserError) as e:
        models.main(['--augreg'])
    assert 'not AugReg\'s index.csv' in str(e.value) and '\n' not in str(e.value)
