"""`python -m vit_jax sweep --workdir DIR [--trials K] [--grid NAME=V1,V2 ...] -- TRAIN_ARGS...`

The cross product of the grid's values times K trials (`--seed` 0 .. K-1 unless the grid
sets seeds), each run an ordinary `python -m vit_jax train` in DIR/runs/<cell>/trial-<k>/
with its own run.json, metrics.jsonl and final.npz. Finished runs are skipped; a killed
run resumes bit-exactly (train's own resume), so stopping and restarting the sweep loses
at most the steps since each run's last checkpoint. DIR/sweep.json records the sweep; the
same DIR takes only the same sweep.

`--list` prints each pending run as `INDEX<TAB>COMMAND`; `--run-one INDEX` runs that one
(indices count every run of the grid, so they stay put while runs finish): a SLURM array
job or `xargs -P` fans a sweep out without a scheduler of ours. `--report` writes
DIR/results.md, results.csv and results.json from the runs' own metrics
(`parity.tools.experiments`), at any time; every sweep writes them when it ends.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Optional, Sequence

from parity import cli
from parity.core import files, limits
from parity.core.errors import UserError, cause
from parity.tools import experiments

MANIFEST = 'sweep.json'
OWNED = ('--workdir',)  # the sweep sets these itself


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m vit_jax sweep', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--workdir', required=True, metavar='DIR', help='runs/, logs/, sweep.json and the results')
    p.add_argument('--trials', type=cli.positive_int, default=3, metavar='K', help='trials per cell (default 3)')
    p.add_argument('--grid', action='append', default=[], metavar='NAME=V1,V2,...',
                   help="a train flag without its dashes and its values; separate values that hold commas "
                        "with ';' (teacher-weights=0.3,0.7;0.5,0.5); repeat for more dimensions")
    p.add_argument('--name', metavar='TEMPLATE',
                   help='the cell folder name, e.g. "a{distill-alpha}" (default: NAME-VALUE pairs joined by _)')
    p.add_argument('--metric', choices=tuple(experiments.METRICS), default='final-accuracy',
                   help='what the results tables show (default final-accuracy)')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--list', action='store_true', help='print the pending runs, INDEX<TAB>COMMAND, and stop')
    what.add_argument('--run-one', type=int, metavar='INDEX', help='run the run of this index (see --list)')
    what.add_argument('--report', action='store_true', help='write the results from the runs as they are, and stop')
    return p


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=V1,V2` items to {name: [values]}, in order; ';' separates values when any is present."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        name, eq, values = spec.partition('=')
        if not eq or not re.fullmatch(r'[a-z][a-z0-9-]*', name) or not values:
            raise UserError(f'--grid {spec!r}: expected NAME=V1,V2,... with NAME a train flag without its dashes '
                            '(distill-alpha=0.1,0.3)')
        if name in grid:
            raise UserError(f'--grid {name} is given twice; give all its values in one --grid')
        if name == 'workdir':
            raise UserError('--grid workdir: the sweep gives every run its own workdir')
        split = values.split(';') if ';' in values else values.split(',')
        if any(not v for v in split) or len(set(split)) != len(split):
            raise UserError(f'--grid {spec!r}: empty or repeated values')
        grid[name] = split
    return grid


def _cell_name(settings: dict, template: Optional[str]) -> str:
    if template:
        try:
            name = template.format(**settings)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f'--name {template!r}: {cause(e)}; use {{NAME}} for grid dimensions '
                            f'({", ".join(settings) or "none"})') from None
    else:
        name = '_'.join(f'{k}-{v}' for k, v in settings.items()) or 'default'
    name = re.sub(r'[^A-Za-z0-9._=-]+', '+', name)
    if name in ('', '.', '..'):
        raise UserError(f'--name {template!r} makes an empty folder name')
    return name


def plan(directory: str, grid: dict[str, list[str]], trials: int, train_args: Sequence[str],
         template: Optional[str]) -> list[dict]:
    """Every cell: its settings, folder and runs (seed, workdir, the train command's arguments)."""
    cells, names = [], set()
    for values in itertools.product(*grid.values()) if grid else [()]:
        settings = dict(zip(grid, values))
        name = _cell_name(settings, template)
        if name in names:
            raise UserError(f'--name {template!r} gives two cells the folder {name!r}; name every dimension in it')
        names.add(name)
        flags = [a for k, v in settings.items() for a in (f'--{k}', v)]
        seeds = [settings['seed']] if 'seed' in settings else [str(k) for k in range(trials)]
        runs = []
        for k, seed in enumerate(seeds):
            workdir = os.path.join(directory, 'runs', name, f'trial-{k + 1}')
            seed_flags = [] if 'seed' in settings else ['--seed', seed]
            runs.append({'seed': seed, 'workdir': workdir,
                         'args': ['train', *train_args, *flags, *seed_flags, '--workdir', workdir]})
        cells.append({'settings': settings, 'name': name, 'runs': runs})
    return cells


def finished(run: dict) -> bool:
    return os.path.exists(os.path.join(run['workdir'], 'final.npz'))


def command(run: dict) -> str:
    return shlex.join(['python', '-m', 'vit_jax', *run['args']])


def _check_manifest(directory: str, record: dict) -> None:
    """DIR/sweep.json must hold this sweep (or nothing yet); written once the checks pass."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return
    limits.check_text(path, f'--workdir {directory}: {MANIFEST}')
    try:
        with open(path) as f:
            theirs = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir {directory}: {MANIFEST} is unreadable ({cause(e)}); use a new --workdir') from None
    if not isinstance(theirs, dict):
        raise UserError(f'--workdir {directory}: {MANIFEST} is not the record of a sweep; use a new --workdir')
    differ = [k for k in ('grid', 'trials', 'train_args', 'name') if theirs.get(k) != record[k]]
    if differ:
        raise UserError(f'--workdir {directory} holds another sweep ({", ".join(differ)} differ); repeat its '
                        f'command (see {path}) or use a new --workdir')


def _load_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        limits.check_text(path, f'--workdir {directory}: {MANIFEST}')
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise UserError(f'--workdir {directory} holds no sweep ({MANIFEST} is missing); start one with --grid '
                        'and -- TRAIN_ARGS') from None
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir {directory}: {MANIFEST} is unreadable ({cause(e)})') from None
    return record


def run_training(run: dict, log_dir: str) -> int:
    """One `python -m vit_jax train`, its output appended to DIR/logs/; returns its exit code."""
    files.make_dirs(log_dir)
    log = os.path.join(log_dir, os.path.relpath(run['workdir'], os.path.dirname(log_dir)).replace(os.sep, '__')
                       + '.log')
    with open(log, 'a') as out:
        out.write(f'$ {command(run)}\n')
        out.flush()
        return subprocess.run([sys.executable, '-m', 'vit_jax', *run['args']], stdout=out, stderr=out).returncode


def report(directory: str, record: dict, cells: list[dict], metric: str) -> list[str]:
    results = experiments.summarise(cells, record['trials'], metric)
    dims = list(record['grid']) or ['sweep']
    if not record['grid']:
        for cell in results:
            cell['settings'] = {'sweep': 'default'}
    return experiments.write_reports(directory, results, dims, metric, record['trials'])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """A grid of `vit_jax train` runs, K trials each, one after another; then the results tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, train_args = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    args = _parser().parse_args(ours)
    directory = os.path.abspath(args.workdir)
    if args.report or args.list or args.run_one is not None:
        record = _load_manifest(directory) if not train_args else None
    else:
        record = None
    if record is None:
        if not train_args:
            raise UserError('sweep needs the train arguments after --, e.g. sweep --workdir DIR --grid lr=0.1,0.03 '
                            '-- --dataset digits')
        owned = [a for a in train_args if a.split('=')[0] in OWNED]
        if owned:
            raise UserError(f'{owned[0]} after --: the sweep gives every run its own workdir under --workdir')
        grid = parse_grid(args.grid)
        clash = [k for k in grid if f'--{k}' in train_args]
        if clash:
            raise UserError(f'--grid {clash[0]} and --{clash[0]} after -- both set it; keep one')
        if '--seed' in train_args and 'seed' not in grid:
            raise UserError('--seed after --: each trial takes its own seed (0 .. K-1); set seeds with '
                            '--grid seed=... instead')
        record = {'grid': grid, 'trials': args.trials, 'train_args': list(train_args), 'name': args.name}
        _check_manifest(directory, record)
    cells = plan(directory, record['grid'], record['trials'], record['train_args'], record['name'])
    runs = [run for cell in cells for run in cell['runs']]

    if args.list:
        for i, run in enumerate(runs):
            if not finished(run):
                print(f'{i}\t{command(run)}')
        return 0
    if args.report:
        for path in report(directory, record, cells, args.metric):
            cli.say(f'wrote {path}')
        return 0
    files.make_dirs(directory, '--workdir')
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        files.write_text(os.path.join(directory, MANIFEST), json.dumps(record, indent=2) + '\n')
    todo = list(enumerate(runs))
    if args.run_one is not None:
        if not 0 <= args.run_one < len(runs):
            raise UserError(f'--run-one {args.run_one}: the sweep has runs 0 .. {len(runs) - 1}')
        todo = [todo[args.run_one]]
    failed = []
    done = sum(finished(run) for _, run in todo)
    cli.say(f'sweep: {len(cells)} cell(s) x {record["trials"]} trial(s); {done} of {len(todo)} run(s) finished')
    for i, run in todo:
        if finished(run):
            continue
        cli.say(f'sweep: run {i}: {command(run)}')
        code = run_training(run, os.path.join(directory, 'logs'))
        if code:
            failed.append(i)
            cli.say(f'sweep: run {i} failed (exit {code}); its log is in {os.path.join(directory, "logs")}')
    paths = report(directory, record, cells, args.metric)
    cli.say(f'sweep: results in {paths[0]}')
    if failed:
        raise UserError(f'{len(failed)} run(s) failed ({", ".join(map(str, failed[:10]))}); their logs are in '
                        f'{os.path.join(directory, "logs")}; run the same sweep again to retry them')
    return 0
