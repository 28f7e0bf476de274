"""Profiling and input placement: `vit_jax train --profile`, `parity bench --profile` and `--device-resident`.

A trace is only checked to exist where the tools that open it look (JAX: DIR/plugins/profile/RUN/*.xplane.pb;
torch: a TensorBoard *.pt.trace.json), and a profiled run must train exactly as an unprofiled one. The batches
`train` prefetches onto the devices are `prefetch`'s: the same stream, in the same order, no more than asked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from parity.core import weights
from parity.core.errors import UserError
from parity.tools import bench
from vit_jax import train, train_cli

# One layer of width 16 on 8x8 digits: compiled in a second or two.
TINY = {'model_name': 'tiny', 'hidden_size': 16, 'patches': {'size': [4, 4]}, 'classifier': 'token',
        'transformer': {'mlp_dim': 32, 'num_heads': 2, 'num_layers': 1}, 'representation_size': None, 'num_classes': 10}


def test_prefetch_yields_the_same_batches_in_order_and_reads_no_more_than_asked():
    mesh = train.make_mesh()
    read = []

    def batches():
        for i in range(100):
            read.append(i)
            yield {'image': np.full((2, 1), i, np.float32)}

    got = [int(np.asarray(b['image'])[0, 0]) for b in train.prefetch(batches(), mesh, 5)]
    assert got == [0, 1, 2, 3, 4] and read == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_train_profile_writes_a_trace_and_trains_the_same(tmp_path, capsys):
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps(TINY))
    args = ['--dataset', 'digits', '--config', str(config), '--steps', '5', '--batch-size', '16',
            '--warmup-steps', '1', '--eval-every', '0']
    assert train_cli.main([*args, '--workdir', str(tmp_path / 'plain')]) == 0
    trace = tmp_path / 'trace'
    assert train_cli.main([*args, '--workdir', str(tmp_path / 'profiled'), '--profile', str(trace)]) == 0
    assert list(trace.glob('plugins/profile/*/*.xplane.pb'))
    assert f'written to {trace}' in capsys.readouterr().err
    plain, profiled = (weights.load_npz(str(tmp_path / d / 'final.npz')) for d in ('plain', 'profiled'))
    assert train.params_digest(plain) == train.params_digest(profiled)
    assert not (tmp_path / 'profiled' / 'run.json').read_text().count('profile')  # an output place, not a setting


def test_train_profile_into_a_file_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match='--profile .*exists and is not a directory'):
        train_cli.main(['--dataset', 'digits', '--workdir', str(tmp_path / 'w'), '--profile', str(tmp_path / 'file')])


@pytest.mark.slow
def test_bench_profile_writes_jax_and_torch_traces_and_device_resident_is_recorded(tmp_path):
    """`parity bench`'s entry point in this process (the command from a real process: test_bench.py)."""
    out, trace = tmp_path / 'bench.json', tmp_path / 'trace'
    assert bench.main(['--models', 'testing', '--batch-size', '2', '--repeats', '1', '--warmup', '1',
                       '--impls', 'vit_jax,vit_torch', '--mode', 'train', '--device-resident', '--json', str(out),
                       '--profile', str(trace)]) == 0
    assert json.loads(out.read_text())['device_resident'] is True
    assert list(trace.glob('testing-train-fp32-vit_jax/plugins/profile/*/*.xplane.pb'))
    assert list(trace.glob('testing-train-fp32-vit_torch/*.pt.trace.json'))
