"""The results of a sweep: per-run values from each run's own `metrics.jsonl`, and the tables.

A sweep (`vit_jax.sweep`) is a grid of settings times K trials; every run keeps its own
workdir. `collect` reads a value per run (`METRICS`), `summarise` makes one cell per grid
point (its trials, their mean and population standard deviation, ddof 0, as experiment
logs keep it), and `write_reports` writes DIR/results.md (one table per value of the
other dimensions, a row per value of the first, the best mean in bold), results.csv and
results.json. Runs still going or not started count as missing trials; a cell says how
many it has.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from parity.core import files

DDOF = 0  # numpy's default, the population standard deviation: what experiment logs print as Std
METRICS = {
    'final-accuracy': 'the test accuracy of the last evaluation',
    'best-accuracy': 'the best test accuracy of any evaluation',
    'final-loss': 'the test loss of the last evaluation',
}


def run_value(workdir: str, metric: str) -> Optional[tuple[float, int]]:
    """(value, step) of one run by `metric`, from its metrics.jsonl; None when it has no evaluation yet."""
    path = os.path.join(workdir, 'metrics.jsonl')
    evaluations = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(record, dict) and record.get('split') != 'train' and 'accuracy' in record:
                    evaluations.append(record)
    except FileNotFoundError:
        return None
    if not evaluations:
        return None
    if metric == 'best-accuracy':
        best = max(evaluations, key=lambda r: r['accuracy'])
        return float(best['accuracy']), int(best['step'])
    last = evaluations[-1]
    return float(last['loss' if metric == 'final-loss' else 'accuracy']), int(last['step'])


def summarise(cells: Sequence[dict], trials: int, metric: str) -> list[dict]:
    """`cells`: [{'settings': {...}, 'runs': [{'seed', 'workdir'}, ...]}] -> the results.json cells."""
    out = []
    for cell in cells:
        found = []
        for run in cell['runs']:
            value = run_value(run['workdir'], metric)
            if value is not None and os.path.exists(os.path.join(run['workdir'], 'final.npz')):
                found.append({'seed': run['seed'], 'workdir': run['workdir'], 'value': value[0], 'step': value[1]})
        values = np.array([t['value'] for t in found], np.float64)
        out.append({'settings': cell['settings'], 'trials': found, 'expected_trials': trials,
                    'mean': float(values.mean()) if len(values) else None,
                    'std': float(values.std(ddof=DDOF)) if len(values) else None})
    return out


def _number(value: Optional[float], metric: str) -> str:
    if value is None:
        return ''
    return f'{100 * value:.4f}' if metric.endswith('accuracy') else f'{value:.4f}'


def markdown(results: list[dict], dims: Sequence[str], metric: str, trials: int) -> str:
    """One table per value of the dimensions after the first, a row per value of the first."""
    first, rest = dims[0], list(dims[1:])
    groups: dict[tuple, list[dict]] = {}
    for cell in results:
        groups.setdefault(tuple(cell['settings'][d] for d in rest), []).append(cell)
    higher_is_better = metric.endswith('accuracy')
    lines = [f'# Results: {METRICS[metric]}' + (' (%)' if higher_is_better else ''), '']
    for key, cells in groups.items():
        title = ', '.join(f'{d} = {v}' for d, v in zip(rest, key))
        lines.append(f'| Experiment{f" ({title})" if title else ""} | '
                     + ' | '.join(f'Trial {k + 1}' for k in range(trials)) + ' | Mean | Std |')
        lines.append('| --- ' * (trials + 3) + '|')
        means = [c['mean'] for c in cells if c['mean'] is not None]
        best = (max(means) if higher_is_better else min(means)) if means else None
        for cell in cells:
            values = [t['value'] for t in cell['trials']] + [None] * (trials - len(cell['trials']))
            mean = _number(cell['mean'], metric)
            if cell['mean'] is not None and cell['mean'] == best:
                mean = f'**{mean}**'
            label = f'{first} = {cell["settings"][first]}'
            if len(cell['trials']) < trials:
                label += f' ({len(cell["trials"])} of {trials} trials)'
            lines.append(f'| {label} | ' + ' | '.join(_number(v, metric) for v in values)
                         + f' | {mean} | {_number(cell["std"], metric)} |')
        lines += ['', f'Std: the population standard deviation (numpy, ddof {DDOF}) over the trials.', '']
    return '\n'.join(lines)


def write_reports(directory: str, results: list[dict], dims: Sequence[str], metric: str, trials: int) -> list[str]:
    """DIR/results.md, results.csv and results.json (each atomic); returns their paths."""
    paths = [os.path.join(directory, f'results.{ext}') for ext in ('md', 'csv', 'json')]
    files.write_text(paths[0], markdown(results, dims, metric, trials))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*dims, *(f'trial_{k + 1}' for k in range(trials)), 'mean', 'std', 'trials'])
    for cell in results:
        values = [t['value'] for t in cell['trials']] + [''] * (trials - len(cell['trials']))
        writer.writerow([*(cell['settings'][d] for d in dims), *values,
                         '' if cell['mean'] is None else cell['mean'], '' if cell['std'] is None else cell['std'],
                         len(cell['trials'])])
    files.write_text(paths[1], buffer.getvalue())
    files.write_text(paths[2], json.dumps({'metric': metric, 'ddof': DDOF, 'cells': results}, indent=1) + '\n')
    return paths
