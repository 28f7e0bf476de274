"""`python -m vit_jax sweep` and its results (`vit_jax.sweep_report`).

The report is checked on hand-made runs against the experiment log of the issue (ddof 0),
and so are the plots; the sweep itself runs a 2 x 2 grid x 2 trials of tiny digits
trainings two ways (`--list` and `--run-one` over every index; two at a time, killed
mid-grid and restarted) and every run's final parameters must agree bit for bit. Bad input is
one error line before anything starts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, kill_once_written, popen, run_cli
from parity.core.errors import UserError
from vit_jax import sweep, sweep_report

TINY = {'model_name': 'tiny', 'hidden_size': 32, 'patches': {'size': [4, 4]}, 'classifier': 'token',
        'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1}, 'representation_size': None, 'num_classes': 10}


def fake_run(workdir: Path, accuracies: list[float]) -> None:
    workdir.mkdir(parents=True)
    lines = [{'step': 10 * (i + 1), 'split': 'test', 'accuracy': a, 'loss': 1 - a, 'examples': 360}
             for i, a in enumerate(accuracies)]
    lines += [{'step': 5 * (i + 1), 'split': 'train', 'loss': 2.3 / (i + 1)} for i in range(2 * len(accuracies))]
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines) + '{"step": 9')
    (workdir / 'final.npz').write_bytes(b'')


def test_the_report_is_the_experiment_log_with_ddof_0(tmp_path):
    log = {'T: teacher A, S: student': [0.689703, 0.676680, 0.670429],
           'T1: teacher A, T2: teacher B, S: student': [0.697864, 0.706720, 0.703247]}
    cells = []
    for name, trials in log.items():
        runs = []
        for k, a in enumerate(trials):
            fake_run(tmp_path / name / f'trial-{k + 1}', [0.1, a])
            runs.append({'seed': str(k), 'workdir': str(tmp_path / name / f'trial-{k + 1}')})
        cells.append({'settings': {'teachers': str(len(cells) + 1), 'distill-alpha': '0.3'},
                      'labels': {'teachers': name, 'distill-alpha': '0.3'}, 'runs': runs})
    results = sweep_report.summarise(cells, 3, 'final-accuracy')
    assert results[1]['std'] == pytest.approx(0.003643, abs=1e-6)  # the log's 0.3643, in percent
    assert results[0]['mean'] == pytest.approx(0.678937, abs=1e-6)
    paths = sweep_report.write_reports(str(tmp_path), results, ['teachers', 'distill-alpha'], 'final-accuracy', 3)
    md = Path(paths[0]).read_text()
    assert '| Experiment (distill-alpha = 0.3) | Trial 1 | Trial 2 | Trial 3 | Mean | Std |' in md
    assert '| teachers = T1: teacher A, T2: teacher B, S: student | 69.7864 | 70.6720 | 70.3247 | **70.2610** | ' \
           '0.3643 |' in md
    assert '| teachers = T: teacher A, S: student | 68.9703 | 67.6680 | 67.0429 | 67.8937 | 0.8029 |' in md
    assert 'ddof 0' in md
    saved = json.loads(Path(paths[2]).read_text())
    assert saved['ddof'] == 0 and saved['metric'] == 'final-accuracy'
    assert [t['value'] for t in saved['cells'][0]['trials']] == log['T: teacher A, S: student']
    header = 'teachers,distill-alpha,trial_1,trial_2,trial_3,mean,std,trials'
    assert Path(paths[1]).read_text().splitlines()[0] == header
    # The best evaluation instead of the last; a missing trial is said.
    best = sweep_report.summarise(cells, 3, 'best-accuracy')
    assert best[0]['trials'][0]['value'] == pytest.approx(0.689703)
    (tmp_path / 'T: teacher A, S: student' / 'trial-3' / 'final.npz').unlink()
    partial = sweep_report.summarise(cells, 3, 'final-accuracy')
    assert len(partial[0]['trials']) == 2
    assert '(2 of 3 trials)' in sweep_report.markdown(partial, ['teachers', 'distill-alpha'], 'final-accuracy', 3)


def test_grids_parse_values_with_commas_and_refuse_what_they_cannot_hold():
    grid = sweep.parse_grid(['teacher-weights=0.3,0.7;0.5,0.5', 'distill-alpha=0.1,0.3'])
    assert grid == {'teacher-weights': ['0.3,0.7', '0.5,0.5'], 'distill-alpha': ['0.1', '0.3']}
    cells = sweep.plan('/d', grid, 2, ['--dataset', 'digits'], None)
    assert len(cells) == 4 and [len(c['runs']) for c in cells] == [2, 2, 2, 2]
    run = cells[1]['runs'][1]
    assert run['args'] == ['train', '--dataset', 'digits', '--teacher-weights', '0.3,0.7', '--distill-alpha', '0.3',
                           '--seed', '1', '--workdir', '/d/runs/teacher-weights-0.3+0.7_distill-alpha-0.3/trial-2']
    for bad, needle in ((['lr'], 'expected NAME=V1,V2'), (['lr=1', 'lr=2'], 'given twice'), (['lr=1,1'], 'repeated'),
                        (['workdir=a,b'], 'its own workdir')):
        with pytest.raises(UserError, match=needle):
            sweep.parse_grid(bad)
    with pytest.raises(UserError, match='two cells the folder'):
        sweep.plan('/d', grid, 1, [], 'a{distill-alpha}')
    # Labels name the values in the folders, tables and plots; the flags keep the values.
    labels = sweep.parse_labels(['teacher-weights=more A;equal'], grid)
    cells = sweep.plan('/d', grid, 1, [], None, labels=labels)
    assert cells[2]['labels'] == {'teacher-weights': 'equal', 'distill-alpha': '0.1'}
    assert cells[2]['settings'] == {'teacher-weights': '0.5,0.5', 'distill-alpha': '0.1'}
    assert cells[2]['runs'][0]['workdir'] == '/d/runs/teacher-weights-equal_distill-alpha-0.1/trial-1'
    assert '--teacher-weights 0.5,0.5' in sweep.command(cells[2]['runs'][0])
    for bad in (['lr=a,b'], ['teacher-weights=one'], ['teacher-weights=x,x']):
        with pytest.raises(UserError, match='--labels'):
            sweep.parse_labels(bad, grid)


def test_the_plots_are_drawn_from_the_runs(tmp_path):
    cells = []
    for alpha in ('0.1', '0.5', '0.9'):
        for teachers in ('one', 'two'):
            runs = []
            for k in range(2):
                workdir = tmp_path / f'{teachers}-{alpha}' / f'trial-{k + 1}'
                fake_run(workdir, [0.5, 0.6 + float(alpha) / 10 + k / 100])
                runs.append({'seed': str(k), 'workdir': str(workdir)})
            cells.append({'settings': {'teacher': teachers, 'distill-alpha': alpha}, 'runs': runs})
    assert sweep_report.run_curves(cells[0]['runs'][0]['workdir'])['train loss'][0].tolist() == [5, 10, 15, 20]
    results = sweep_report.summarise(cells, 2, 'final-accuracy')
    workdirs = [[r['workdir'] for r in c['runs']] for c in cells]
    paths = sweep_report.write_plots(str(tmp_path), results, ['teacher', 'distill-alpha'], 'final-accuracy', workdirs)
    # The numeric dimension gets its plot, the teachers (not numbers) do not; the curves always.
    assert [Path(p).name for p in paths] == ['plot-distill-alpha.png', 'curves.png']
    for path in paths:
        data = Path(path).read_bytes()
        assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 20_000
    assert not list(tmp_path.glob('.tmp-*'))


def test_parallel_runs_get_disjoint_devices(monkeypatch):
    gpus = sweep.device_slots(2, ['0', '1', '2', '3'], range(16))
    assert [s.env for s in gpus] == [{'CUDA_VISIBLE_DEVICES': '0,1'}, {'CUDA_VISIBLE_DEVICES': '2,3'}]
    assert [s.env['CUDA_VISIBLE_DEVICES'] for s in sweep.device_slots(3, ['0', '1', '2', '3'], [0])] == ['0', '1', '2']
    cpus = sweep.device_slots(2, [], [0, 1, 2, 3])
    assert [s.cpus for s in cpus] == [{0, 1}, {2, 3}] and all(s.env == {} for s in cpus)
    assert sweep.device_slots(1, ['0', '1'], [0, 1]) == [sweep.Slot({}, None, '')]  # one run sees everything
    with pytest.raises(UserError, match='--parallel 3: this machine has 2 CPU core'):
        sweep.device_slots(3, [], [0, 1])
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,6')
    assert sweep.visible_gpus() == ['4', '6']
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    assert sweep.visible_gpus() == []


def test_a_flag_that_repeats_takes_several_words():
    cells = sweep.plan('/d', sweep.parse_grid(['teacher=a.npz;a.npz "b c.npz"']), 1, [], None,
                       sweep.train_flags().repeated)
    assert [c['runs'][0]['args'][1:-2] for c in cells] == [
        ['--teacher', 'a.npz', '--seed', '0'], ['--teacher', 'a.npz', '--teacher', 'b c.npz', '--seed', '0']]


@pytest.mark.parametrize('ours, theirs, needle', [
    (['--grid', 'learning-rate=0.1,0.2'], [], '--grid learning-rate: train has no flag --learning-rate'),
    (['--grid', 'lr=0.1,-1'], [], 'the cell lr=-1 would fail: argument --lr: -1: must be a finite number above 0'),
    (['--grid', 'label-smoothing=0.1,1.5'], [], 'label-smoothing=1.5 would fail: --label-smoothing 1.5: must lie'),
    (['--grid', 'batch-size=32,x'], [], "the cell batch-size=x would fail: argument --batch-size: invalid int"),
    (['--grid', 'teacher=missing.npz'], ['--distill-alpha', '0.5'], 'teacher missing.npz: no such file'),
])
def test_a_grid_train_would_refuse_stops_before_anything_starts(tmp_path, ours, theirs, needle):
    workdir = tmp_path / 'sweep'
    with pytest.raises(UserError) as e:
        sweep.main(['--workdir', str(workdir), *ours, '--', '--dataset', 'digits', *theirs])
    assert needle in str(e.value)
    assert not workdir.exists()


def test_bad_sweeps_are_one_error_line(tmp_path):
    for args, needle in ((['--trials', '0', '--', '--dataset', 'digits'], '--trials: 0: must be at least 1'),
                         (['--grid', 'lrr=1', '--', '--dataset', 'digits'], 'train has no flag --lrr')):
        proc = run_cli('vit_jax', 'sweep', '--workdir', tmp_path / 'w', *args)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]  # argparse's own errors come after its usage line
        assert 'error: ' in last and needle in last
        assert not (tmp_path / 'w').exists()


def _finals(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for path in sorted((workdir / 'runs').glob('*/trial-*/final.npz')):
        with np.load(path) as f:
            out[str(path.relative_to(workdir))] = {k: f[k] for k in f.files}
    return out


def _same_finals(a: Path, b: Path) -> None:
    fa, fb = _finals(a), _finals(b)
    assert len(fa) == 2 and len(fb) == 4 and fa.keys() <= fb.keys()
    for run, params in fa.items():
        assert params.keys() == fb[run].keys()
        assert all(np.array_equal(params[k], fb[run][k]) for k in params), run


def _values(workdir: Path) -> list:
    return [[t['value'] for t in c['trials']] for c in json.loads((workdir / 'results.json').read_text())['cells']]


@pytest.mark.slow
def test_a_sweep_killed_and_restarted_ends_with_the_runs_of_list_and_run_one(tmp_path, capsys, monkeypatch):
    """Two ways to the same runs: `--list` piped to `xargs -P 2 ... --run-one` (each run alone, on the whole
    machine; the lr=0.1 cell's two), and the whole sweep two at a time (each on its own core), SIGKILLed
    mid-grid and started again. The runs made both ways must end with the same parameters, bit for bit."""
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps(TINY))
    train = ['--dataset', 'digits', '--config', str(config), '--steps', '8', '--warmup-steps', '2',
             '--batch-size', '32', '--eval-every', '2', '--log-every', '2', '--augment', 'shift=1']
    grid = ['--trials', '2', '--grid', 'lr=0.05,0.1']

    # 1. Fanned out by xargs over --list, one --run-one per index (the last two: the runs the kill below hits).
    fanned = tmp_path / 'fanned'
    monkeypatch.chdir(REPO)  # where the runs start (the sweep goes to the folder it was declared in); restored after

    def in_process(*argv) -> str:  # --list and --report train nothing: this process, not one more interpreter
        capsys.readouterr()
        assert sweep.main(list(map(str, argv))) == 0
        return capsys.readouterr().out

    listed = in_process('--workdir', fanned, *grid, '--list', '--', *train)
    assert [line.split('\t')[0] for line in listed.splitlines()] == [str(i) for i in range(4)]
    assert '--lr 0.1 --seed 1 --workdir ' in listed.splitlines()[3]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(f'cut -f1 | tail -n 2 | xargs -P 2 -I{{}} {sys.executable} -m vit_jax sweep --workdir {fanned} '
                   '--run-one {}', shell=True, input=listed, text=True, env=env, cwd=REPO, check=True,
                   capture_output=True)
    left = in_process('--workdir', fanned, '--list')
    assert [line.split('\t')[0] for line in left.splitlines()] == ['0', '1']

    # 2. The sweep, two at a time, SIGKILLed once the last run has its first checkpoint, then started again.
    # The last run may still reach its end between that checkpoint and the kill (three more evaluations, on a
    # busy machine): such a try interrupted nothing and is made again.
    last_run = Path('runs', 'lr-0.1', 'trial-2')
    for attempt in range(3):
        killed = tmp_path / f'killed-{attempt}'
        out = tmp_path / f'killed-sweep-{attempt}'
        first = popen('vit_jax', 'sweep', '--workdir', killed, '--parallel', '2', *grid, '--', *train, out=out)
        kill_once_written(first, killed / last_run / 'checkpoints' / 'ckpt-0000002.npz', out)
        time.sleep(0.5)  # the run's own process dies with the sweep (SIGTERM from the parent's death)
        if not (killed / last_run / 'final.npz').exists():
            break
    else:
        pytest.fail('the last run reached its end before each of three kills')
    again = run_cli('vit_jax', 'sweep', '--workdir', killed, '--parallel', '2', *grid, '--', *train, check=True)
    assert re.search(r'\b[23] of 4 run\(s\) finished', again.stderr), again.stderr
    assert 'sweep: run 3' in again.stderr
    assert re.search(r'resuming at step [2468]\b', (killed / 'logs' / 'runs__lr-0.1__trial-2.log').read_text())
    _same_finals(fanned, killed)

    # The tables: each value is the run's own last evaluation, mean and std numpy's over them.
    results = json.loads((killed / 'results.json').read_text())
    assert [c['settings'] for c in results['cells']] == [{'lr': lr} for lr in ('0.05', '0.1')]
    md = (killed / 'results.md').read_text()
    for cell in results['cells']:
        own = []
        for trial in cell['trials']:
            lines = [json.loads(x) for x in Path(trial['workdir'], 'metrics.jsonl').read_text().splitlines()]
            last = [r for r in lines if r['split'] == 'test'][-1]
            assert (trial['value'], trial['step']) == (last['accuracy'], 8)
            own.append(last['accuracy'])
        assert [t['seed'] for t in cell['trials']] == ['0', '1']
        assert cell['mean'] == np.mean(own) and cell['std'] == np.std(own)
        assert f'| {" | ".join(f"{100 * v:.4f}" for v in own)} |' in md
    for png in ('plot-lr.png', 'curves.png'):
        assert (killed / png).stat().st_size > 20_000
    recorded = json.loads((killed / last_run / 'run.json').read_text())
    assert (recorded['lr'], recorded['seed'], recorded['augment']) == (0.1, 1, 'shift=1')
    in_process('--workdir', fanned, '--report', '--metric', 'final-loss')
    assert 'test loss of the last evaluation' in (fanned / 'results.md').read_text()
    # Another grid on the same workdir is refused.
    with pytest.raises(UserError, match=r'^--workdir .*holds another sweep \(grid, trials differ\)'):
        sweep.main(['--workdir', str(fanned), '--grid', 'lr=0.2', '--', *train])


def test_a_report_says_what_is_missing(tmp_path):
    workdir = tmp_path / 'sweep'
    workdir.mkdir()
    record = {'grid': {'lr': ['0.1', '0.2']}, 'trials': 2, 'train_args': ['--dataset', 'digits'], 'name': None}
    (workdir / 'sweep.json').write_text(json.dumps(record))
    fake_run(workdir / 'runs' / 'lr-0.1' / 'trial-1', [0.4, 0.5])
    fake_run(workdir / 'runs' / 'lr-0.1' / 'trial-2', [0.4, 0.7])
    fake_run(workdir / 'runs' / 'lr-0.2' / 'trial-1', [0.4, 0.8])
    (workdir / 'runs' / 'lr-0.2' / 'trial-2').mkdir()  # started, not evaluated yet
    assert sweep.main(['--workdir', str(workdir), '--report']) == 0
    md = (workdir / 'results.md').read_text()
    assert '| lr = 0.1 | 50.0000 | 70.0000 | 60.0000 | 10.0000 |' in md
    assert '| lr = 0.2 (1 of 2 trials) | 80.0000 |  | **80.0000** | 0.0000 |' in md
    cells = json.loads((workdir / 'results.json').read_text())['cells']
    assert [len(c['trials']) for c in cells] == [2, 1] and cells[1]['expected_trials'] == 2
