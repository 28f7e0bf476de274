"""`python -m parity.tools.distill_digits`: knowledge distillation on digits, measured, as the README reports it.

Trains two teachers (the digits config at twice the width, and the digits config itself),
then a student of a seventh of the smaller teacher's parameters alone, with the wide
teacher and with both, at each distillation weight alpha, each over several seeds, all
with `python -m vit_jax train` as a user would run it. Prints one table (mean and
standard deviation of test accuracy per setting) and writes every run's summary to
OUT/results.json. About 15 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from typing import Optional, Sequence

import numpy as np

from parity.core import files

DIGITS = {'patches': {'size': [4, 4]}, 'classifier': 'token', 'representation_size': None, 'num_classes': 10}
MODELS = {  # name: (width, depth, heads)
    'teacher-wide': (128, 4, 4),  # the digits config at twice the width
    'teacher-digits': (64, 4, 4),  # the digits config
    'student': (32, 2, 2),
}


def write_config(folder: str, name: str) -> str:
    width, depth, heads = MODELS[name]
    path = os.path.join(folder, f'{name}.json')
    config = dict(DIGITS, model_name=name, hidden_size=width,
                  transformer={'mlp_dim': 2 * width, 'num_heads': heads, 'num_layers': depth})
    files.write_text(path, json.dumps(config, indent=2) + '\n')
    return path


def train(workdir: str, *flags: str) -> dict:
    """`python -m vit_jax train --dataset digits FLAGS`; its summary line. A finished workdir is read again."""
    args = ['vit_jax', 'train', '--dataset', 'digits', '--eval-every', '0', '--workdir', workdir, *flags]
    print('$ python -m ' + shlex.join(args), file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, '-m', *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m parity.tools.distill_digits', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default=os.path.join('out', 'distill-digits'), metavar='DIR')
    p.add_argument('--seeds', type=int, default=3, metavar='N', help='trials per setting (default 3)')
    p.add_argument('--alphas', default='0.1,0.3,0.5,0.7,0.9', metavar='A1,A2,...')
    p.add_argument('--distill', choices=('soft', 'hard'), default='soft')
    p.add_argument('--temperature', default='1', metavar='T')
    args = p.parse_args(argv)
    files.make_dirs(args.out, '--out')
    configs = {name: write_config(args.out, name) for name in MODELS}
    results: dict[str, list[dict]] = {}

    teachers = {}
    for name in ('teacher-wide', 'teacher-digits'):
        r = train(os.path.join(args.out, name), '--config', configs[name], '--seed', '100')
        teachers[name] = r['final']
        results[name] = [r]
    for seed in range(args.seeds):
        results.setdefault('student alone', []).append(
            train(os.path.join(args.out, f'alone-{seed}'), '--config', configs['student'], '--seed', str(seed)))
    for alpha in args.alphas.split(','):
        for label, names in (('1 teacher', ['teacher-wide']), ('2 teachers', ['teacher-wide', 'teacher-digits'])):
            for seed in range(args.seeds):
                flags = ['--config', configs['student'], '--seed', str(seed), '--distill', args.distill,
                         '--distill-alpha', alpha, '--distill-temperature', args.temperature]
                for name in names:
                    flags += ['--teacher', teachers[name]]
                workdir = os.path.join(args.out, f'{len(names)}t-a{alpha}-{seed}')
                results.setdefault(f'{label}, alpha {alpha}', []).append(train(workdir, *flags))
    files.write_text(os.path.join(args.out, 'results.json'), json.dumps(results, indent=1) + '\n')

    alone = np.array([r['accuracy'] for r in results['student alone']])
    print(f'| setting | test accuracy, mean ± std over {args.seeds} seeds | img/s |')
    print('|---|---|---|')
    for label, runs in results.items():
        acc = np.array([r['accuracy'] for r in runs])
        rate = np.mean([r['img_per_sec'] for r in runs])
        std = f' ± {acc.std(ddof=1):.2%}' if len(acc) > 1 else ''
        print(f'| {label} | {acc.mean():.2%}{std} | {rate:,.0f} |')
    best = max((k for k in results if 'alpha' in k), key=lambda k: np.mean([r['accuracy'] for r in results[k]]))
    gain = np.mean([r['accuracy'] for r in results[best]]) - alone.mean()
    print(f'\nbest: {best}, {gain:+.2%} over the student alone (its std {alone.std(ddof=1):.2%})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
