"""`python -m parity bench` end to end on the tiny `testing` config, and its reference model.

Benchmarks are not tests: nothing here asserts a speed, only that the command runs every
implementation and mode and writes the JSON contract, and that timm's model it measures
against computes the same function as ours.
"""

import json
import os

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import _load_weights

from conftest import random_params, run_cli, tolerance
from parity.core import weights
from parity.core.config import OFFICIAL_CONFIGS
from parity.core.errors import UserError
from parity.tools import bench
from vit_torch.params import build_model

FIELDS = {'model', 'impl', 'mode', 'precision', 'batch_size', 'img_per_s', 'peak_mem_bytes', 'ratio_to_reference'}


@pytest.mark.slow
def test_bench_runs_end_to_end_and_writes_the_contract(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_cli('parity', 'bench', '--models', 'testing', '--batch-size', '2', '--repeats', '2', '--warmup', '1',
                   '--json', out, check=True)
    doc = json.loads(out.read_text())
    assert set(doc) == {'device', 'device_resident', 'jax_memory', 'results'} and doc['device'].startswith('cpu')
    assert doc['device_resident'] is False  # the default: each timed step puts the host batch on the device
    if 'XLA_PYTHON_CLIENT_PREALLOCATE' not in os.environ:
        assert doc['jax_memory']['XLA_PYTHON_CLIENT_PREALLOCATE'] == {'value': 'false', 'set_by': 'parity'}
    assert all(v['set_by'] in ('parity', 'user') for v in doc['jax_memory'].values()), doc['jax_memory']
    rows = doc['results']
    assert {(r['impl'], r['mode']) for r in rows} == {(i, m) for i in bench.IMPLS for m in bench.MODES}
    for r in rows:
        assert set(r) - {'error'} == FIELDS, r
        assert (r['model'], r['precision'], r['batch_size']) == ('testing', 'fp32', 2)
        if 'error' in r:  # only torch.compile may fail (no C++ compiler, say), and then it says why
            assert r['impl'] == 'vit_torch_compiled' and r['error'] and r['img_per_s'] is None, r
            continue
        assert r['img_per_s'] > 0 and r['peak_mem_bytes'] >= 0, r
    for mode in bench.MODES:
        by_impl = {r['impl']: r for r in rows if r['mode'] == mode}
        timm = by_impl['timm']['img_per_s']
        assert by_impl['timm']['ratio_to_reference'] == 1.0
        for r in by_impl.values():
            if r['img_per_s'] is not None:
                assert r['ratio_to_reference'] == pytest.approx(r['img_per_s'] / timm)
    table = proc.stdout.splitlines()
    assert table[0] == f'device: {doc["device"]}' and len(table) == 2 + len(rows)


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_timm_reference_computes_the_same_function(tmp_path, classifier):
    """The model `bench` measures against is ours, function for function (timm's own npz loader)."""
    cfg = OFFICIAL_CONFIGS['testing'].replace(classifier=classifier, dropout_rate=0.0)
    params = random_params(weights.param_shapes(cfg), scale=0.1)
    path = tmp_path / 'ckpt.npz'
    weights.save_npz(str(path), params)
    model = bench.timm_model(cfg)
    _load_weights(model, str(path))
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        ref = build_model(cfg, params)(x).numpy()
        got = model.eval()(x).numpy()
    assert np.abs(ref).max() > 0.1 and np.abs(got - ref).max() <= tolerance(ref)


def test_timm_has_no_model_for_hybrids_or_representation_layers():
    assert bench.timm_model(OFFICIAL_CONFIGS['R+ViT-Ti_16']) is None
    assert bench.timm_model(OFFICIAL_CONFIGS['testing'].replace(representation_size=8)) is None


@pytest.mark.parametrize('argv,needle', [
    (['--models', 'Z_99'], '--models Z_99: no such config'),
    (['--models', 'testing', '--batch-size', '0'], '--batch-size 0'),
    (['--models', 'testing', '--json', '/no/such/dir/out.json'], 'does not exist'),
])
def test_bench_user_errors(argv, needle):
    with pytest.raises(UserError, match=needle.replace('.', r'\.')):
        bench.main(argv)


def test_short_names_resolve_to_official_configs():
    assert bench.model_config('B_16') is OFFICIAL_CONFIGS['ViT-B_16']
    assert bench.model_config('ViT-S_16') is OFFICIAL_CONFIGS['ViT-S_16']
    assert bench.model_config('testing') is OFFICIAL_CONFIGS['testing']
