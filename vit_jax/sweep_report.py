"""The results of a sweep: per-run values from each run's own `metrics.jsonl`, and the tables.

A sweep (`vit_jax.sweep`) is a grid of settings times K trials; every run keeps its own
workdir. `run_value` reads a value per run (`METRICS`), `summarise` makes one cell per grid
point (its trials, their mean and population standard deviation, ddof 0, as experiment
logs keep it), and `write_reports` writes DIR/results.md (one table per value of the
other dimensions, a row per value of the first, the best mean in bold), results.csv and
results.json. Runs still going or not started count as missing trials; a cell says how
many it has. `write_plots` draws the metric against each numeric dimension (mean and std
error bars, a line per value of the others) and every cell's training curves.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional, Sequence

import numpy as np

from parity.cli.plotting import pyplot, save_figure
from parity.core import files

PLOT_DPI = 110
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
        out.append({'settings': cell['settings'], 'labels': dict(cell.get('labels') or cell['settings']),
                    'trials': found, 'expected_trials': trials,
                    'mean': float(values.mean()) if len(values) else None,
                    'std': float(values.std(ddof=DDOF)) if len(values) else None})
    return out


def _format_cell(value: Optional[float], metric: str) -> str:
    """A table cell: accuracies in percent, losses as they are, a missing value empty."""
    if value is None:
        return ''
    return f'{100 * value:.4f}' if metric.endswith('accuracy') else f'{value:.4f}'


def markdown(results: list[dict], dims: Sequence[str], metric: str, trials: int) -> str:
    """One table per value of the dimensions after the first, a row per value of the first."""
    first, rest = dims[0], list(dims[1:])
    groups: dict[tuple, list[dict]] = {}
    for cell in results:
        groups.setdefault(tuple(cell['labels'][d] for d in rest), []).append(cell)
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
            mean = _format_cell(cell['mean'], metric)
            if cell['mean'] is not None and cell['mean'] == best:
                mean = f'**{mean}**'
            label = f'{first} = {cell["labels"][first]}'
            if len(cell['trials']) < trials:
                label += f' ({len(cell["trials"])} of {trials} trials)'
            lines.append(f'| {label} | ' + ' | '.join(_format_cell(v, metric) for v in values)
                         + f' | {mean} | {_format_cell(cell["std"], metric)} |')
        lines += ['', f'Std: the population standard deviation (numpy, ddof {DDOF}) over the trials.', '']
    return '\n'.join(lines).rstrip('\n') + '\n'


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
    files.write_json(paths[2], {'metric': metric, 'ddof': DDOF, 'cells': results})
    return paths


# --------------------------------------------------------------------------- plots

def run_curves(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'test accuracy': (steps, values), 'train loss': (steps, values)} of one run's metrics.jsonl."""
    found: dict[str, dict[int, float]] = {'test accuracy': {}, 'train loss': {}}
    try:
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            for line in f:
                try:
                    r = json.loads(line)
                    if r.get('split') == 'train':
                        found['train loss'][int(r['step'])] = float(r['loss'])
                    elif 'accuracy' in r:
                        found['test accuracy'][int(r['step'])] = float(r['accuracy'])
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut short by a kill
    except FileNotFoundError:
        pass
    return {k: (np.array(sorted(v), np.int64), np.array([v[t] for t in sorted(v)], np.float64))
            for k, v in found.items()}


def _numeric(values: Sequence[str]) -> Optional[list[float]]:
    try:
        out = [float(v) for v in values]
    except ValueError:
        return None
    return out if all(np.isfinite(out)) else None


def _label(settings: dict, dims: Sequence[str]) -> str:
    return ', '.join(f'{d} = {settings[d]}' for d in dims) or 'all'


def write_plots(directory: str, results: list[dict], dims: Sequence[str], metric: str,
                workdirs: Sequence[Sequence[str]]) -> list[str]:
    """DIR/plot-<dim>.png for each numeric dimension of two values or more, and DIR/curves.png.

    `workdirs[i]` are the runs of `results[i]`, finished or not: the curves show runs still going.
    """
    plt = pyplot()
    percent = 100 if metric.endswith('accuracy') else 1
    ylabel = METRICS[metric] + (' (%)' if percent == 100 else '')
    paths = []
    for dim in dims:
        order = list(dict.fromkeys(c['settings'][dim] for c in results))
        xs = _numeric(order)
        if xs is None or len(order) < 2:
            continue
        rest = [d for d in dims if d != dim]
        lines: dict[tuple, list[dict]] = {}
        for cell in results:
            lines.setdefault(tuple(cell['labels'][d] for d in rest), []).append(cell)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        log = min(xs) > 0 and max(xs) / min(xs) >= 10  # learning rates and the like: factors apart
        for j, (key, cells) in enumerate(lines.items()):
            shown = sorted((float(c['settings'][dim]), c) for c in cells if c['mean'] is not None)
            # Each line nudged sideways a little, so that error bars at one x do not hide each other.
            nudge = (j - (len(lines) - 1) / 2) * 0.012
            span = np.log(max(xs) / min(xs)) if log else max(xs) - min(xs)
            if shown:
                ax.errorbar([x * np.exp(nudge * span) if log else x + nudge * span for x, _ in shown],
                            [percent * c['mean'] for _, c in shown],
                            yerr=[percent * c['std'] for _, c in shown], marker='o', capsize=4,
                            label=_label(dict(zip(rest, key)), rest) if rest else None)
        if log:
            ax.set_xscale('log')
        ax.set_xlabel(dim)
        ax.set_ylabel(ylabel)
        ax.set_title(f'mean ± std over the trials (ddof {DDOF})', fontsize=10)
        ax.grid(alpha=0.3)
        if rest:
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(save_figure(fig, os.path.join(directory, f'plot-{dim}.png'), PLOT_DPI))

    # The curves, laid out as the tables are: a row per value of the other dimensions, a colour per
    # value of the first; each finished trial thin, a run still going dashed, and the mean of the
    # finished trials (the runs so far while none has finished) thick.
    first, rest = dims[0], list(dims[1:])
    rows: dict[tuple, list[int]] = {}
    for i, cell in enumerate(results):
        rows.setdefault(tuple(cell['labels'][d] for d in rest), []).append(i)
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.9 * len(rows) + 0.6), squeeze=False)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for row, (key, members) in zip(axes, rows.items()):
        for n, i in enumerate(members):
            done = [os.path.exists(os.path.join(w, 'final.npz')) for w in workdirs[i]]
            curves = [(run_curves(w), d) for w, d in zip(workdirs[i], done)]
            colour = colours[n % len(colours)]
            for ax, name, scale in ((row[0], 'test accuracy', 100), (row[1], 'train loss', 1)):
                runs = [(c[name], d) for c, d in curves if len(c[name][0])]
                marker = '.' if name == 'test accuracy' else None  # evaluations are few: show each
                for (steps, values), d in runs:
                    ax.plot(steps, scale * values, color=colour, lw=0.8, alpha=0.45, ls='-' if d else '--',
                            marker=marker, ms=3)
                averaged = [r for r, d in runs if d] or [r for r, _ in runs]
                if averaged:
                    by_step = [dict(zip(s.tolist(), v.tolist())) for s, v in averaged]
                    common = sorted(set.intersection(*(set(d) for d in by_step)))
                    mean = [np.mean([d[t] for d in by_step]) for t in common]
                    ax.plot(common, scale * np.array(mean), color=colour, lw=2.4, marker=marker, ms=6,
                            label=f'{first} = {results[i]["labels"][first]} ({sum(done)} of {len(done)} '
                                  'finished)')
        title = _label(dict(zip(rest, key)), rest)
        row[0].set_ylabel('test accuracy (%)')
        row[1].set_ylabel('training loss')
        if row[1].lines and all(line.get_ydata().min() > 0 for line in row[1].lines):
            row[1].set_yscale('log')  # the loss falls by orders of magnitude: the late steps would be flat
        for ax in row:
            ax.set_title(title if rest else '', fontsize=10)
            ax.set_xlabel('step')
            ax.grid(alpha=0.3)
        if row[0].lines:
            row[0].legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    paths.append(save_figure(fig, os.path.join(directory, 'curves.png'), PLOT_DPI))
    return paths
