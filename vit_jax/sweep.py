"""`python -m vit_jax sweep --workdir DIR [--trials K] [--grid NAME=V1,V2 ...] -- TRAIN_ARGS...`

The cross product of the grid's values times K trials (`--seed` 0 .. K-1 unless the grid
sets seeds), each run an ordinary `python -m vit_jax train` in DIR/runs/<cell>/trial-<k>/
with its own run.json, metrics.jsonl and final.npz. Finished runs are skipped; a killed
run resumes bit-exactly (train's own resume), so stopping and restarting the sweep loses
at most the steps since each run's last checkpoint. DIR/sweep.json records the sweep; the
same DIR takes only the same sweep.

Every cell's flags are checked as `train` checks them before the first run starts. A flag
that repeats (`--teacher`) takes a grid value of several words, one flag each:
`teacher=a.npz;a.npz b.npz` is one teacher, then two. Runs go one after another, or
`--parallel N` at once, each pinned to its own devices: its own GPUs
(CUDA_VISIBLE_DEVICES) where there are GPUs, else its own CPU cores.

`--list` prints each pending run as `INDEX<TAB>COMMAND`; `--run-one INDEX` runs that one
(indices count every run of the grid, so they stay put while runs finish): a SLURM array
job or `xargs -P` fans a sweep out without a scheduler of ours. `--report` writes
DIR/results.md, results.csv, results.json and the plots from the runs' own metrics
(`vit_jax.sweep_report`), at any time; every sweep writes them when it ends.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

from parity import cli
from parity.core import files
from parity.core.errors import UserError, cause
from vit_jax import sweep_report
from vit_jax.settings import flag_names

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
    p.add_argument('--labels', action='append', default=[], metavar='NAME=L1,L2,...',
                   help="what the tables, plots and cell folders call a dimension's values, in order "
                        "(teacher='wide;wide + digits'); ';' or ',' as in --grid")
    p.add_argument('--name', metavar='TEMPLATE',
                   help='the cell folder name, e.g. "a{distill-alpha}" (default: NAME-VALUE pairs joined by _)')
    p.add_argument('--metric', choices=tuple(sweep_report.METRICS), default='final-accuracy',
                   help='what the results tables show (default final-accuracy)')
    p.add_argument('--parallel', type=cli.positive_int, default=1, metavar='N',
                   help='runs at once, each pinned to its own GPUs, or on CPU to its own cores (default 1)')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--list', action='store_true', help='print the pending runs, INDEX<TAB>COMMAND, and stop')
    what.add_argument('--run-one', type=int, metavar='INDEX', help='run the run of this index (see --list)')
    what.add_argument('--report', action='store_true', help='write the results from the runs as they are, and stop')
    return p


@dataclasses.dataclass(frozen=True)
class TrainFlags:
    """The flags `train` takes (without dashes), and those of them that repeat."""
    names: frozenset
    repeated: frozenset


def train_flags() -> TrainFlags:
    return TrainFlags(*flag_names())


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


def parse_labels(specs: Sequence[str], grid: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """`NAME=L1,L2` items to {name: {value: label}}, one label per value of the grid's NAME, in order."""
    labels: dict[str, dict[str, str]] = {}
    for spec in specs:
        name, eq, text = spec.partition('=')
        if not eq or name not in grid:
            raise UserError(f'--labels {spec!r}: expected NAME=L1,L2,... with NAME a --grid dimension '
                            f'({", ".join(grid) or "there is none"})')
        split = [v.strip() for v in (text.split(';') if ';' in text else text.split(','))]
        if len(split) != len(grid[name]) or not all(split) or len(set(split)) != len(split):
            raise UserError(f'--labels {spec!r}: give {len(grid[name])} different labels, one per value of '
                            f'--grid {name} in the same order')
        labels[name] = dict(zip(grid[name], split))
    return labels


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


def _flags(name: str, value: str, repeated: frozenset) -> list[str]:
    """A grid value as train flags: a repeating flag once per word of its value."""
    if name not in repeated:
        return [f'--{name}', value]
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise UserError(f'--grid {name}={value!r}: {cause(e)}; quote a word that holds spaces') from None
    return [a for word in words for a in (f'--{name}', word)]


def plan(directory: str, grid: dict[str, list[str]], trials: int, train_args: Sequence[str],
         template: Optional[str], repeated: frozenset = frozenset(),
         labels: Optional[dict[str, dict[str, str]]] = None) -> list[dict]:
    """Every cell: its settings, their labels, its folder and runs (seed, workdir, the train arguments)."""
    cells, names = [], set()
    for values in itertools.product(*grid.values()) if grid else [()]:
        settings = dict(zip(grid, values))
        shown = {k: (labels or {}).get(k, {}).get(v, v) for k, v in settings.items()}
        name = _cell_name(shown, template)
        if name in names:
            raise UserError(f'--name {template!r} gives two cells the folder {name!r}; name every dimension in it')
        names.add(name)
        flags = [a for k, v in settings.items() for a in _flags(k, v, repeated)]
        seeds = [settings['seed']] if 'seed' in settings else [str(k) for k in range(trials)]
        runs = []
        for k, seed in enumerate(seeds):
            workdir = os.path.join(directory, 'runs', name, f'trial-{k + 1}')
            seed_flags = [] if 'seed' in settings else ['--seed', seed]
            runs.append({'seed': seed, 'workdir': workdir,
                         'args': ['train', *train_args, *flags, *seed_flags, '--workdir', workdir]})
        cells.append({'settings': settings, 'labels': shown, 'name': name, 'runs': runs})
    return cells


def finished(run: dict) -> bool:
    return os.path.exists(os.path.join(run['workdir'], 'final.npz'))


def command(run: dict) -> str:
    return shlex.join(['python', '-m', 'vit_jax', *run['args']])


def _check_manifest(directory: str, record: dict) -> Optional[dict]:
    """DIR/sweep.json must hold this sweep (or nothing yet; it is written once the checks pass); returns it."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    theirs = _read_manifest(directory, 'use a new --workdir')
    # Sweeps written before --labels recorded none.
    differ = files.record_differences(theirs, record, ('grid', 'trials', 'train_args', 'name', 'labels'),
                                      {'labels': {}})
    if differ:
        raise UserError(f'--workdir {directory} holds another sweep ({", ".join(differ)} differ); repeat its '
                        f'command (see {path}) or use a new --workdir')
    return theirs


def _load_manifest(directory: str) -> dict:
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        raise UserError(f'--workdir {directory} holds no sweep ({MANIFEST} is missing); start one with --grid '
                        'and -- TRAIN_ARGS')
    return _read_manifest(directory)


def _read_manifest(directory: str, advice: Optional[str] = None) -> dict:
    return files.read_json_object(os.path.join(directory, MANIFEST), f'--workdir {directory}: {MANIFEST}',
                                  'the record of a sweep', advice)


def check_cells(cells: list[dict], flags: TrainFlags) -> None:
    """Every run's flags as `train` would take them, before any starts: one error line naming the cell."""
    from vit_jax import train_cli
    unknown = [k for k in cells[0]['settings'] if k not in flags.names]
    if unknown:
        raise UserError(f'--grid {unknown[0]}: train has no flag --{unknown[0]} (see python -m vit_jax train --help)')
    for cell in cells:
        for run in cell['runs']:
            try:
                train_cli.check_flags(run['args'][1:])
            except UserError as e:
                where = ', '.join(f'{k}={v}' for k, v in cell['settings'].items())
                raise UserError(f'the cell {where or "of the sweep"} would fail: {e}') from None


# --------------------------------------------------------------------------- running

@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one of `--parallel N` runs goes: its environment's device variables, its CPU cores."""
    env: dict
    cpus: Optional[frozenset]
    label: str


def visible_gpus() -> list[str]:
    """The GPUs a run could see: CUDA_VISIBLE_DEVICES when set, else those `nvidia-smi -L` lists."""
    if 'CUDA_VISIBLE_DEVICES' in os.environ:
        return [d for d in os.environ['CUDA_VISIBLE_DEVICES'].split(',') if d.strip() and d.strip() != '-1']
    if not shutil.which('nvidia-smi'):
        return []
    try:
        listed = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [m.group(1) for m in re.finditer(r'^GPU (\d+):', listed, re.M)]


def device_slots(n: int, gpus: Sequence[str], cpus: Sequence[int]) -> list[Slot]:
    """`n` disjoint shares of the machine: equal groups of GPUs if it has any, else of CPU cores."""
    if n == 1:
        return [Slot({}, None, '')]  # one run at a time sees the whole machine, as a plain train does
    pool, kind = (list(gpus), 'GPU') if gpus else (sorted(cpus), 'CPU core')
    if n > len(pool):
        raise UserError(f'--parallel {n}: this machine has {len(pool)} {kind}(s) for the runs and each run needs '
                        f'its own; pass --parallel {len(pool)} or less')
    size = len(pool) // n  # equal shares, so that runs of one grid get the same hardware
    groups = [pool[k * size:(k + 1) * size] for k in range(n)]
    if gpus:
        return [Slot({'CUDA_VISIBLE_DEVICES': ','.join(g)}, None, f'GPU {",".join(g)}') for g in groups]
    return [Slot({}, frozenset(g), f'CPU {",".join(map(str, g))}') for g in groups]


def _child_setup(cpus: Optional[frozenset]):
    def setup():
        try:  # the run dies with the sweep, even a killed one, instead of going on holding its workdir
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


def start_training(run: dict, log_dir: str, slot: Slot) -> subprocess.Popen:
    """One `python -m vit_jax train` on `slot`, its output appended to its log in DIR/logs/."""
    files.make_dirs(log_dir)
    log = os.path.join(log_dir, os.path.relpath(run['workdir'], os.path.dirname(log_dir)).replace(os.sep, '__')
                       + '.log')
    with open(log, 'a') as out:
        out.write(f'$ {command(run)}' + (f'  # on {slot.label}' if slot.label else '') + '\n')
        out.flush()
        return subprocess.Popen([sys.executable, '-m', 'vit_jax', *run['args']], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL, env={**os.environ, **slot.env},
                                preexec_fn=_child_setup(slot.cpus))


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the runs are stopped below, resumable


def run_all(todo: list[tuple[int, dict]], log_dir: str, slots: list[Slot]) -> list[int]:
    """The runs, len(slots) at a time, each on its own slot; returns the indices of those that failed."""
    pending, running, failed = list(todo), {}, []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        while pending or running:
            for k, slot in enumerate(slots):
                if k not in running and pending:
                    i, run = pending.pop(0)
                    cli.say(f'sweep: run {i}' + (f' on {slot.label}' if slot.label else '') + f': {command(run)}')
                    running[k] = (i, start_training(run, log_dir, slot))
            time.sleep(0.1)
            for k, (i, proc) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[k]
                if code:
                    failed.append(i)
                    cli.say(f'sweep: run {i} failed (exit {code}); its log is in {log_dir}')
    finally:
        for _, proc in running.values():  # stopped, not left holding their workdirs
            proc.terminate()
        for _, proc in running.values():
            proc.wait()
        signal.signal(signal.SIGTERM, previous)
    return failed


def report(directory: str, record: dict, cells: list[dict], metric: str) -> list[str]:
    """DIR/results.md, .csv, .json and the plots, from the runs as they are now; their paths."""
    results = sweep_report.summarise(cells, record['trials'], metric)
    dims = list(record['grid']) or ['sweep']
    if not record['grid']:  # one cell, named by --name (default: default)
        for cell, planned in zip(results, cells):
            cell['settings'], cell['labels'] = {'sweep': 'default'}, {'sweep': planned['name']}
    paths = sweep_report.write_reports(directory, results, dims, metric, record['trials'])
    workdirs = [[run['workdir'] for run in cell['runs']] for cell in cells]
    return paths + sweep_report.write_plots(directory, results, dims, metric, workdirs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """A grid of `vit_jax train` runs, K trials each, one after another or N at once; then the results."""
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
        record = {'grid': grid, 'trials': args.trials, 'train_args': list(train_args), 'name': args.name,
                  'labels': parse_labels(args.labels, grid), 'cwd': os.getcwd()}
        record['cwd'] = (_check_manifest(directory, record) or record).get('cwd', record['cwd'])
    # Relative paths in the train arguments mean what they meant where the sweep was declared, also for
    # a --run-one started elsewhere (a scheduler's job starts in its own folder).
    start = record.get('cwd', os.getcwd())
    if not os.path.isdir(start):
        raise UserError(f'--workdir {directory}: {MANIFEST} starts its runs in {start}, which this machine does not '
                        'have; run the sweep where that folder exists')
    os.chdir(start)
    flags = train_flags()
    cells = plan(directory, record['grid'], record['trials'], record['train_args'], record['name'], flags.repeated,
                 record.get('labels'))
    runs = [run for cell in cells for run in cell['runs']]

    if args.report:
        for path in report(directory, record, cells, args.metric):
            cli.say(f'wrote {path}')
        return 0
    todo = list(enumerate(runs))
    if args.run_one is not None:
        if not 0 <= args.run_one < len(runs):
            raise UserError(f'--run-one {args.run_one}: the sweep has runs 0 .. {len(runs) - 1}')
        todo = [todo[args.run_one]]
    check_cells(cells, flags)
    pending = [(i, run) for i, run in todo if not finished(run)]
    slots = [] if args.list else device_slots(min(args.parallel, max(1, len(pending))), visible_gpus(),
                                               sorted(os.sched_getaffinity(0)))
    # The record goes down once every check passed: --list too, so --run-one I needs only --workdir.
    files.make_dirs(directory, '--workdir')
    if not os.path.exists(os.path.join(directory, MANIFEST)):
        files.write_json(os.path.join(directory, MANIFEST), record)
    if args.list:
        for i, run in pending:
            print(f'{i}\t{command(run)}')
        return 0
    cli.say(f'sweep: {len(cells)} cell(s) x {record["trials"]} trial(s); {len(todo) - len(pending)} of {len(todo)} '
            'run(s) finished' + (f'; {len(slots)} at a time' if len(slots) > 1 else ''))
    log_dir = os.path.join(directory, 'logs')
    failed = run_all(pending, log_dir, slots)
    paths = report(directory, record, cells, args.metric)
    cli.say(f'sweep: results in {paths[0]}')
    if failed:
        raise UserError(f'{len(failed)} run(s) failed ({", ".join(map(str, failed[:10]))}); their logs are in '
                        f'{log_dir}; run the same sweep again to retry them')
    return 0
