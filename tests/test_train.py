"""Training through XLA (`vit_jax train`) and the two `eval` commands.

Everything runs the small digits model for a few hundred images, so each command costs
mostly its start-up. One uninterrupted run (`reference`) is the yardstick: a run killed
with SIGKILL and restarted must end bit for bit on its parameters, two processes joined
by `jax.distributed` must end identical to each other and, up to float rounding, to it,
and both frameworks' eval commands must agree on its every prediction. Sharding over 8
simulated CPU devices runs in a subprocess, since XLA_FLAGS must be set before JAX starts.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import (
    REFERENCE,
    REPO,
    kill_once_written,
    killed_writer_leftover,
    popen,
    random_params,
    run_cli,
    tolerance,
)
from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import datasets
from vit_jax import checkpoint, objective, settings, train, train_cli
from vit_jax.settings import TrainSettings

pytestmark = pytest.mark.slow  # every test here trains, or runs the command line

# One layer of width 32 on 8x8 digits in 2x2 patches of 4x4: XLA compiles it in a few seconds.
TINY = {'model_name': 'tiny', 'hidden_size': 32, 'patches': {'size': [4, 4]}, 'classifier': 'token',
        'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1}, 'representation_size': None, 'num_classes': 10}
STEPS = 100


@pytest.fixture(scope='module')
def tiny_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp('config') / 'tiny.json'
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope='module')
def run_args(tiny_json) -> tuple:
    """The settings of the reference run."""
    return ('--config', tiny_json, '--dataset', 'digits', '--steps', STEPS, '--batch-size', '32',
            '--warmup-steps', '10', '--eval-every', '50', '--checkpoint-every', '10')


def tiny_config() -> ViTConfig:
    return ViTConfig.from_official_dict(TINY).replace(image_size=8)


def summary(stdout: str) -> dict:
    """The JSON line `train` prints last."""
    return json.loads(stdout.strip().splitlines()[-1])


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    return weights.load_npz(str(workdir / 'final.npz'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, run_args) -> Path:
    """One uninterrupted run with `run_args`."""
    workdir = tmp_path_factory.mktemp('reference') / 'run'
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # in this process: the killed and the resumed runs are compared with it
        assert train_cli.main([*map(str, run_args), '--workdir', str(workdir)]) == 0
    result = summary(stdout.getvalue())
    assert result['step'] == STEPS and result['examples'] == 360
    assert result['accuracy'] > 0.5, result  # it learned something in 100 small steps
    assert result['params_sha256'] == train.params_digest(final_params(workdir))
    return workdir


# --------------------------------------------------------------------------- the workdir

def test_workdir_holds_metrics_checkpoints_and_the_released_files(reference):
    lines = [json.loads(line) for line in (reference / 'metrics.jsonl').read_text().splitlines()]
    train_lines = [r for r in lines if r['split'] == 'train']
    assert [r['step'] for r in train_lines] == list(range(10, STEPS + 1, 10))
    assert set(train_lines[0]) >= {'step', 'loss', 'accuracy', 'learning_rate', 'img_per_sec'}
    assert [r['step'] for r in lines if r['split'] == 'test'] == [50, 100]
    assert train_lines[-1]['loss'] < train_lines[0]['loss']
    # Warm-up then cosine decay, as the official schedule.
    rates = [r['learning_rate'] for r in train_lines]
    assert rates[0] == pytest.approx(0.1 * 9 / 10) and rates[-1] < 1e-3 and rates[1] > rates[5]
    assert [step for step, _ in checkpoint.list_checkpoints(str(reference))] == [80, 90, 100]  # the newest 3
    assert not list((reference / 'checkpoints').glob('*tmp*'))
    config = json.loads((reference / 'config.json').read_text())
    assert config['patches'] == {'size': [4, 4]} and config['hidden_size'] == 32 and config['num_classes'] == 10
    # final.npz is in the released layout (pre-linen block names) and equals the last checkpoint's params.
    with np.load(reference / 'final.npz') as z:
        assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in z.files
    last = weights.load_npz(checkpoint.list_checkpoints(str(reference))[-1][1])
    final = final_params(reference)
    assert last.keys() == final.keys() and all(np.array_equal(last[k], final[k]) for k in final)


def test_kill_and_restart_ends_with_the_same_parameters(reference, run_args, tmp_path, capsys):
    """The killed run is a process of its own, SIGKILLed; the restart runs the train entry point in this process."""
    workdir = tmp_path / 'run'
    proc = popen('vit_jax', 'train', *run_args, '--workdir', workdir, out=tmp_path / 'killed')
    kill_once_written(proc, workdir / 'checkpoints' / 'ckpt-0000010.npz', tmp_path / 'killed')
    assert not (workdir / 'final.npz').exists(), 'the run ended before it was killed; make it longer'
    killed_at = checkpoint.list_checkpoints(str(workdir))[-1][0]
    assert 10 <= killed_at < STEPS
    # What a kill in the middle of a metrics write leaves: half a line (a half checkpoint: below, from a real kill).
    with open(workdir / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 9')

    capsys.readouterr()
    assert train_cli.main([*map(str, run_args), '--workdir', str(workdir)]) == 0
    assert f'resuming at step {killed_at}' in capsys.readouterr().err
    want, got = final_params(reference), final_params(workdir)
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want), 'the resumed run ended elsewhere'
    # Metric lines past the checkpoint were dropped and written again, once.
    steps = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()
             if json.loads(line)['split'] == 'train']
    assert steps == list(range(10, STEPS + 1, 10))
    assert not list((workdir / 'checkpoints').glob('.tmp-*'))


def test_a_second_trainer_on_the_workdir_is_refused_by_the_lock(run_args, tmp_path):
    """The first trainer is another process; the second, refused, is this one (a UserError: the one `error:` line
    and exit 2 of test_train_errors_are_one_line_from_the_command_line)."""
    workdir = tmp_path / 'run'
    first = popen('vit_jax', 'train', *run_args, '--workdir', workdir, out=tmp_path / 'first')
    deadline = time.time() + 300
    while not (workdir / '.lock').exists() or not (workdir / '.lock').read_text():
        assert first.poll() is None, (tmp_path / 'first.err').read_text()
        assert time.time() < deadline
        time.sleep(0.01)
    with pytest.raises(UserError) as e:
        train_cli.main([*map(str, run_args), '--workdir', str(workdir)])
    line = str(e.value)
    assert '\n' not in line and line.startswith(f'--workdir {workdir} is in use by PID {first.pid} on '), line
    assert 'python -m vit_jax train' in line
    assert first.wait() == 0, (tmp_path / 'first.err').read_text()  # the first run never noticed
    assert summary((tmp_path / 'first.out').read_text())['step'] == STEPS and not (workdir / '.lock').exists()


def test_a_killed_writers_temporaries_are_removed_at_start(tiny_json, tmp_path, capsys):
    workdir = tmp_path / 'run'
    (workdir / 'checkpoints').mkdir(parents=True)
    left = killed_writer_leftover(workdir / 'checkpoints')  # what SIGKILL in a checkpoint write really leaves
    train_main('--config', tiny_json, '--workdir', workdir, '--steps', '2', '--batch-size', '32',
               '--warmup-steps', '1')
    assert f'removed 1 half-written files a killed run left in {workdir} ({left})' in capsys.readouterr().err
    assert not [n for n in os.listdir(workdir / 'checkpoints') if n.startswith('.tmp-')]


def test_a_run_that_never_started_leaves_nothing_and_the_corrected_one_runs(tiny_json, tmp_path, monkeypatch):
    workdir = tmp_path / 'run'
    good = ('--config', tiny_json, '--workdir', workdir, '--steps', '2', '--batch-size', '32', '--warmup-steps', '1')
    with pytest.raises(UserError, match='is not divisible'):
        train_main(*good, '--accum-steps', '3')
    real = datasets.Digits.train_batches

    def fails(*args, **kwargs):  # a data pipeline that fails before the first step
        raise UserError('the data could not be read')

    monkeypatch.setattr(datasets.Digits, 'train_batches', fails)
    with pytest.raises(UserError, match='could not be read'):
        train_main(*good, '--lr', '0.5')
    assert not workdir.exists()  # no run.json to refuse the corrected command with
    monkeypatch.setattr(datasets.Digits, 'train_batches', real)
    assert train_main(*good) == 0 and json.loads((workdir / 'run.json').read_text())['lr'] == 0.1


def test_a_full_disk_during_a_checkpoint_stops_cleanly_and_resumes(reference, run_args, tmp_path, monkeypatch):
    workdir = tmp_path / 'run'
    real, written = np.savez, []

    def fills_the_disk(f, **arrays):  # the third checkpoint meets a full disk half-way through
        if len(written) == 2:
            f.write(b'PK\x03\x04 half')
            raise OSError(errno.ENOSPC, 'No space left on device')
        written.append(1)
        real(f, **arrays)

    monkeypatch.setattr(np, 'savez', fills_the_disk)
    with pytest.raises(UserError) as e:
        train_main(*run_args, '--workdir', workdir)
    assert str(e.value).startswith(f'{workdir}/checkpoints/ckpt-0000030.npz: cannot write it: the disk is full')
    assert f'stopped at step 30, the last good checkpoint is {workdir}/checkpoints/ckpt-0000020.npz' in str(e.value)
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['ckpt-0000010.npz', 'ckpt-0000020.npz']
    monkeypatch.setattr(np, 'savez', real)
    train_main(*run_args, '--workdir', workdir)  # space freed: the same command resumes and ends where it would have
    want, got = final_params(reference), final_params(workdir)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_a_finished_run_is_not_trained_again(reference, run_args, capsys):
    before = (reference / 'checkpoints' / 'ckpt-0000100.npz').stat().st_mtime_ns
    assert train_cli.main([*map(str, run_args), '--workdir', str(reference)]) == 0
    out, err = capsys.readouterr()
    assert f'resuming at step {STEPS}' in err
    assert summary(out)['params_sha256'] == train.params_digest(final_params(reference))
    assert (reference / 'checkpoints' / 'ckpt-0000100.npz').stat().st_mtime_ns == before


# --------------------------------------------------------------------------- several devices and processes

SHARDED = r'''
import json, sys
import jax, numpy as np
from vit_jax import runtime
runtime.strict_float32()
sys.path.insert(0, 'tests')
from conftest import random_params
from parity.core import weights
from parity.data import datasets
from parity.core.config import load_config
from parity.core.errors import UserError
from vit_jax import objective, train, train_cli
from vit_jax.settings import TrainSettings

assert jax.device_count() == 8
cfg = load_config(sys.argv[2]).replace(image_size=8, dropout_rate=0.1)
params = random_params(weights.param_shapes(cfg), seed=1, scale=0.1)  # no zero head: every leaf learns
batch = next(datasets.load('digits').train_batches(32, 8, seed=0))
tx, lr_fn = objective.make_optimizer(TrainSettings(lr=0.01, steps=10, warmup_steps=0))
result = {}
for name, mesh in (('one', train.make_mesh(jax.devices()[:1])), ('eight', train.make_mesh())):
    state = train.create_train_state(cfg, params, tx, 0, mesh)
    step = train.make_train_step(cfg, tx, lr_fn, mesh=mesh, accum_steps=2)
    state, metrics = step(state, train.shard_batch(batch, mesh))
    result[name] = train.canonical_params(state), float(metrics['loss'])
(want, want_loss), (got, got_loss) = result['one'], result['eight']
# The updates compared as vectors: rounding params + update to float32 is far below this bound.
dw = np.concatenate([(want[k] - params[k]).ravel() for k in params])
dg = np.concatenate([(got[k] - params[k]).ravel() for k in params])
out = {'update_error': float(np.linalg.norm(dw - dg) / np.linalg.norm(dw)), 'loss_error': abs(want_loss - got_loss),
       'leaves_moved': sum(not np.array_equal(want[k], params[k]) for k in params), 'errors': []}
for extra in (['--batch-size', '12'], ['--batch-size', '16', '--accum-steps', '4']):
    try:
        train_cli.main(['--dataset', 'digits', '--config', sys.argv[2], '--workdir', sys.argv[1], *extra])
    except UserError as e:
        out['errors'].append(str(e))
print(json.dumps(out))
'''


def test_sharded_step_equals_the_unsharded_step(tiny_json, tmp_path):
    """8 devices against 1, with dropout and 2 microbatches: masks and microbatches do not depend on sharding."""
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS='--xla_force_host_platform_device_count=8')
    proc = subprocess.run([sys.executable, '-c', SHARDED, str(tmp_path / 'run'), str(tiny_json)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out['update_error'] < 1e-4 and out['loss_error'] < 1e-5 and out['leaves_moved'] >= 15, out
    assert len(out['errors']) == 2, out
    assert 'does not split over 8 devices' in out['errors'][0] and 'multiple of 8' in out['errors'][0]
    assert 'with --accum-steps 4' in out['errors'][1] and 'multiple of 32' in out['errors'][1], out
    assert not (tmp_path / 'run').exists()


def library_run(cfg, params, steps: int, batch_size: int, accum_steps: int = 1, warmup_steps: int = 0):
    """`steps` updates on digits through the library, on one device: what `train` does, minus the workdir."""
    tx, lr_fn = objective.make_optimizer(TrainSettings(lr=0.1, steps=steps, warmup_steps=warmup_steps))
    mesh = train.make_mesh()
    state = train.create_train_state(cfg, params, tx, 0, mesh)
    step = train.make_train_step(cfg, tx, lr_fn, mesh=mesh, accum_steps=accum_steps)
    batches = datasets.load('digits').train_batches(batch_size, cfg.image_size, seed=0)
    for _ in range(steps):
        state, _ = step(state, train.shard_batch(next(batches), mesh))
    return train.canonical_params(state)


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny_config()
    params = random_params(weights.param_shapes(cfg), seed=2, scale=0.1)
    one, four = library_run(cfg, params, 2, 32), library_run(cfg, params, 2, 32, accum_steps=4)
    for k in params:
        np.testing.assert_allclose(four[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(one['head/kernel'], params['head/kernel'])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_processes_end_with_identical_parameters(tiny_json, tmp_path):
    workdir, port, steps = tmp_path / 'run', free_port(), 6
    # Starting from a checkpoint (of the same shape) spares each process compiling the random init.
    start = random_params(weights.param_shapes(tiny_config()), seed=4, scale=0.1)
    weights.save_npz(str(tmp_path / 'start.npz'), start)
    args = ('--config', tiny_json, '--checkpoint', tmp_path / 'start.npz', '--dataset', 'digits', '--steps', steps,
            '--batch-size', '32', '--warmup-steps', '2', '--eval-every', '0', '--workdir', workdir,
            '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2')
    procs = [popen('vit_jax', 'train', *args, '--process-id', i, out=tmp_path / f'p{i}') for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=600) == 0, (tmp_path / f'p{i}.err').read_text()
    results = [summary((tmp_path / f'p{i}.out').read_text()) for i in range(2)]
    assert [r['process'] for r in results] == [0, 1]
    assert results[0]['params_sha256'] == results[1]['params_sha256']
    assert results[0]['params_sha256'] == train.params_digest(final_params(workdir))
    assert '2 device(s) in 2 process(es)' in (tmp_path / 'p0.err').read_text()
    # Each process fed its half of the same global batches: one process's run, up to float rounding.
    want, got = library_run(tiny_config(), start, steps, 32, warmup_steps=2), final_params(workdir)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert not np.allclose(got['head/kernel'], start['head/kernel'])


# --------------------------------------------------------------------------- fine-tuning

def test_finetuning_starts_from_resized_position_embeddings_and_a_zero_head(tiny_json, tmp_path):
    # A "pretrained" checkpoint at 16x16 (a 4x4 grid) with 5 classes and a representation layer.
    pre_cfg = tiny_config().replace(image_size=16, num_classes=5, representation_size=16)
    pre = random_params(weights.param_shapes(pre_cfg), seed=3)
    weights.save_npz(str(tmp_path / 'pre.npz'), pre)
    workdir = tmp_path / 'run'
    # The first update of a warm-up runs at learning rate 0, so checkpoint 1 holds the starting point.
    train_main('--checkpoint', tmp_path / 'pre.npz', '--config', tiny_json, '--workdir', workdir, '--steps', '2',
               '--warmup-steps', '1', '--batch-size', '32', '--checkpoint-every', '1')
    start = weights.load_npz(checkpoint.list_checkpoints(str(workdir))[0][1])
    np.testing.assert_array_equal(start[weights.POSEMB],
                                  weights.resize_posemb(pre[weights.POSEMB], (2, 2), prefix_tokens=1))  # 8x8 digits
    assert start[weights.POSEMB].shape == (1, 5, 32)
    assert start['head/kernel'].shape == (32, 10) and not start['head/kernel'].any() and not start['head/bias'].any()
    assert 'pre_logits/kernel' not in start
    for k in start.keys() - {weights.POSEMB, 'head/kernel', 'head/bias'}:
        np.testing.assert_array_equal(start[k], pre[k], err_msg=k)
    assert final_params(workdir)['head/kernel'].any()  # and the second update trained the new head
    config = json.loads((workdir / 'config.json').read_text())
    assert config['num_classes'] == 10 and config['representation_size'] is None


# --------------------------------------------------------------------------- eval in both frameworks

def test_both_eval_commands_agree_on_every_prediction(reference, tmp_path, capsys):
    from vit_jax.cli import main as jax_main
    from vit_torch.cli import main as torch_main

    results, logits = {}, {}
    for fw, main in (('vit_jax', jax_main), ('vit_torch', torch_main)):
        assert main(['eval', str(reference / 'final.npz'), '--config', str(reference / 'config.json'),
                     '--dataset', 'digits', '--json', str(tmp_path / f'{fw}.json'),
                     '--logits', str(tmp_path / f'{fw}.npy')]) == 0
        results[fw] = json.loads(capsys.readouterr().out)
        assert results[fw] == json.loads((tmp_path / f'{fw}.json').read_text())
        logits[fw] = np.load(tmp_path / f'{fw}.npy')
    jx, pt = results['vit_jax'], results['vit_torch']
    assert jx['examples'] == pt['examples'] == 360 and jx['image_size'] == 8
    assert jx['accuracy'] == pt['accuracy'] == pytest.approx(summary_of(reference)['accuracy'])
    a, b = logits['vit_jax'], logits['vit_torch']
    assert a.shape == (360, 10) and np.abs(a - b).max() <= tolerance(a)
    differ = a.argmax(-1) != b.argmax(-1)
    top2 = np.sort(a, axis=-1)[:, -2:]
    assert (top2[differ, 1] - top2[differ, 0] <= tolerance(a)).all()  # only float32 ties may differ


def summary_of(workdir: Path) -> dict:
    """The last test-split line of a run's metrics."""
    lines = map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
    return [r for r in lines if r['split'] == 'test'][-1]


# --------------------------------------------------------------------------- bad input

def train_main(*args):
    return train_cli.main(['--dataset', 'digits', *map(str, args)])


def test_bad_workdirs(reference, run_args, tmp_path):
    (tmp_path / 'listed').mkdir()
    (tmp_path / 'listed' / 'run.json').write_text('[1, 2]')
    with pytest.raises(UserError, match='run.json holds a JSON list, not the record of a run'):
        train_main(*run_args, '--workdir', tmp_path / 'listed')
    (tmp_path / 'file').write_text('')
    with pytest.raises(UserError, match='is not a directory'):
        train_main('--workdir', tmp_path / 'file' / 'run')
    with pytest.raises(UserError, match=r'other settings \(lr'):
        train_main(*run_args, '--workdir', reference, '--lr', '0.5')
    assert not (tmp_path / 'run').exists()


def test_checkpoint_of_another_architecture(tmp_path):
    ckpt = REFERENCE / 'tiny_token' / 'ckpt.npz'  # patch 8, 2 layers; the digits model has patch 4, 4 layers
    with pytest.raises(UserError, match=r'does not fit config ViT-digits: .*missing.*shape mismatches'):
        train_main('--checkpoint', ckpt, '--config', settings.DIGITS_CONFIG, '--workdir', tmp_path / 'run')
    with pytest.raises(UserError, match='--warmup-steps 50 must be .* below --steps 10'):
        train_main('--steps', '10', '--workdir', tmp_path / 'run')
    with pytest.raises(UserError, match='pass --config'):
        train_cli._model(SimpleNamespace(checkpoint=None, config=None), SimpleNamespace(name='cifar10'), 32)
    assert not (tmp_path / 'run').exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_json, tmp_path):
    workdir = tmp_path / 'run'
    stopped = r'^loss is not finite at step 2; stopped, the last good checkpoint is .*ckpt-0000001'
    with pytest.raises(UserError, match=stopped):
        train_main('--config', tiny_json, '--workdir', workdir, '--lr', '1e30', '--warmup-steps', '0', '--steps', '20',
                   '--batch-size', '32', '--checkpoint-every', '1')
    assert [step for step, _ in checkpoint.list_checkpoints(str(workdir))] == [1]
    kept = weights.load_npz(str(workdir / 'checkpoints' / 'ckpt-0000001.npz'))
    assert all(np.isfinite(v).all() for v in kept.values())
    assert not (workdir / 'final.npz').exists()


def test_train_errors_are_one_line_from_the_command_line(tmp_path):
    proc = run_cli('vit_jax', 'train', '--dataset', 'digits', '--workdir', tmp_path / 'run', '--batch-size', '30',
                   '--accum-steps', '4')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == ['error: --batch-size 30 is not divisible by --accum-steps 4']


def test_trains_on_a_tfds_dataset_with_the_official_defaults(tiny_json, tmp_path, monkeypatch, capsys):
    """cifar10 from `tfds.testing.mock_data` through the whole command: official crop pipeline, 8 microbatches."""
    datasets.import_tensorflow()  # before tensorflow_datasets, which imports it too
    import tensorflow_datasets as tfds

    monkeypatch.setattr(datasets, '_online', lambda: True)  # mock_data stands in for the download
    workdir = tmp_path / 'run'
    with tfds.testing.mock_data(num_examples=24):
        assert train_cli.main(['--config', str(tiny_json), '--dataset', 'cifar10', '--image-size', '16', '--steps', '3',
                           '--batch-size', '16', '--warmup-steps', '1', '--workdir', str(workdir)]) == 0
    out, err = capsys.readouterr()
    assert 'batch 16 in 8 microbatches' in err
    result = summary(out)
    assert result['examples'] == 24 and result['split'] == 'test'
    settings = json.loads((workdir / 'run.json').read_text())
    assert (settings['lr'], settings['accum_steps'], settings['schedule']) == (0.03, 8, 'cosine')
    assert final_params(workdir)[weights.POSEMB].shape == (1, 17, 32)  # 16x16 in 4x4 patches, and the class token


def test_fine_tuning_a_big_vision_map_checkpoint_writes_what_reads_it_back(tmp_path, capsys):
    """Any checkpoint layout fine-tunes; a model the released layout cannot hold ends in big_vision's."""
    import big_vision_vit as bv

    model = bv.Model(num_classes=3, patch_size=(4, 4), width=32, depth=1, mlp_dim=64, num_heads=2, pool_type='map')
    bv.save_checkpoint({'params': bv.init(model, 8)}, tmp_path / 'bv.npz')
    workdir = tmp_path / 'run'
    assert train_cli.main(['--checkpoint', str(tmp_path / 'bv.npz'), '--dataset', 'digits', '--steps', '3',
                         '--warmup-steps', '1', '--batch-size', '32', '--workdir', str(workdir)]) == 0
    capsys.readouterr()
    final = weights.load(str(workdir / 'final.npz'))
    assert final.format == 'big_vision' and 'MAPHead_0/probe' in final.shapes
    config = json.loads((workdir / 'config.json').read_text())
    assert config['classifier'] == 'map' and config['num_classes'] == 10
    from vit_torch.cli import main as torch_main

    assert torch_main(['eval', str(workdir / 'final.npz'), '--config', str(workdir / 'config.json'),
                       '--dataset', 'digits']) == 0
    assert json.loads(capsys.readouterr().out)['examples'] == 360
