"""`python -m vit_jax sweep` and its results (`parity.tools.experiments`).

The report is checked on hand-made runs against the experiment log of the issue (ddof 0);
the sweep itself runs a 2 x 2 grid of tiny digits trainings: every run its own workdir,
finished runs skipped, `--list` and `--run-one` over stable indices, one error line for a
sweep that does not fit its workdir.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parity.core.errors import UserError
from parity.tools import experiments
from vit_jax import sweep

from conftest import run_cli

TINY = {'model_name': 'tiny', 'hidden_size': 32, 'patches': {'size': [4, 4]}, 'classifier': 'token',
        'transformer': {'mlp_dim': 64, 'num_heads': 2, 'num_layers': 1}, 'representation_size': None, 'num_classes': 10}


def fake_run(workdir: Path, accuracies: list[float]) -> None:
    workdir.mkdir(parents=True)
    lines = [{'step': 10 * (i + 1), 'split': 'test', 'accuracy': a, 'loss': 1 - a, 'examples': 360}
             for i, a in enumerate(accuracies)]
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
        cells.append({'settings': {'teachers': name, 'distill-alpha': '0.3'}, 'runs': runs})
    results = experiments.summarise(cells, 3, 'final-accuracy')
    assert results[1]['std'] == pytest.approx(0.003643, abs=1e-6)  # the log's 0.3643, in percent
    assert results[0]['mean'] == pytest.approx(0.678937, abs=1e-6)
    paths = experiments.write_reports(str(tmp_path), results, ['teachers', 'distill-alpha'], 'final-accuracy', 3)
    md = Path(paths[0]).read_text()
    assert '| Experiment (distill-alpha = 0.3) | Trial 1 | Trial 2 | Trial 3 | Mean | Std |' in md
    assert '| teachers = T1: teacher A, T2: teacher B, S: student | 69.7864 | 70.6720 | 70.3247 | **70.2610** | ' \
           '0.3643 |' in md
    assert '| teachers = T: teacher A, S: student | 68.9703 | 67.6680 | 67.0429 | 67.8937 | 0.8029 |' in md
    assert 'ddof 0' in md
    saved = json.loads(Path(paths[2]).read_text())
    assert saved['ddof'] == 0 and saved['metric'] == 'final-accuracy'
    assert [t['value'] for t in saved['cells'][0]['trials']] == log['T: teacher A, S: student']
    assert Path(paths[1]).read_text().splitlines()[0] == 'teachers,distill-alpha,trial_1,trial_2,trial_3,mean,std,trials'
    # The best evaluation instead of the last; a missing trial is said.
    best = experiments.summarise(cells, 3, 'best-accuracy')
    assert best[0]['trials'][0]['value'] == pytest.approx(0.689703)
    (tmp_path / 'T: teacher A, S: student' / 'trial-3' / 'final.npz').unlink()
    partial = experiments.summarise(cells, 3, 'final-accuracy')
    assert len(partial[0]['trials']) == 2
    assert '(2 of 3 trials)' in experiments.markdown(partial, ['teachers', 'distill-alpha'], 'final-accuracy', 3)


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


@pytest.mark.slow
def test_a_sweep_runs_skips_lists_and_reports(tmp_path):
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps(TINY))
    workdir = tmp_path / 'sweep'
    train = ['--dataset', 'digits', '--config', str(config), '--steps', '12', '--warmup-steps', '2',
             '--batch-size', '32', '--eval-every', '6']
    proc = run_cli('vit_jax', 'sweep', '--workdir', workdir, '--trials', '2', '--grid', 'lr=0.05,0.1', '--', *train,
                   check=True)
    assert '0 of 4 run(s) finished' in proc.stderr
    results = json.loads((workdir / 'results.json').read_text())
    assert [c['settings'] for c in results['cells']] == [{'lr': '0.05'}, {'lr': '0.1'}]
    for cell in results['cells']:
        values = [t['value'] for t in cell['trials']]
        assert len(values) == 2 and cell['std'] == pytest.approx(np.std(values))
        assert [t['seed'] for t in cell['trials']] == ['0', '1'] and all(t['step'] == 12 for t in cell['trials'])
    recorded = json.loads((workdir / 'runs' / 'lr-0.1' / 'trial-2' / 'run.json').read_text())
    assert (recorded['lr'], recorded['seed']) == (0.1, 1)
    # Again: nothing to do. A removed final.npz makes its run pending; --list names it, --run-one runs it.
    again = run_cli('vit_jax', 'sweep', '--workdir', workdir, '--trials', '2', '--grid', 'lr=0.05,0.1', '--', *train,
                    check=True)
    assert '4 of 4 run(s) finished' in again.stderr and 'sweep: run ' not in again.stderr
    (workdir / 'runs' / 'lr-0.1' / 'trial-1' / 'final.npz').unlink()
    listed = run_cli('vit_jax', 'sweep', '--workdir', workdir, '--list', check=True).stdout.strip().splitlines()
    assert len(listed) == 1 and listed[0].startswith('2\tpython -m vit_jax train ') and '--lr 0.1 --seed 0' in listed[0]
    run_cli('vit_jax', 'sweep', '--workdir', workdir, '--run-one', '2', check=True)
    assert (workdir / 'runs' / 'lr-0.1' / 'trial-1' / 'final.npz').exists()
    assert run_cli('vit_jax', 'sweep', '--workdir', workdir, '--list', check=True).stdout == ''
    run_cli('vit_jax', 'sweep', '--workdir', workdir, '--report', '--metric', 'final-loss', check=True)
    assert 'test loss of the last evaluation' in (workdir / 'results.md').read_text()
    # Another grid on the same workdir is refused.
    other = run_cli('vit_jax', 'sweep', '--workdir', workdir, '--grid', 'lr=0.2', '--', *train)
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1].startswith('error: --workdir')
    assert 'holds another sweep (grid, trials differ)' in other.stderr
