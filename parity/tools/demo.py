"""`make demo`: train a ViT on the bundled digits through XLA, then score it in both frameworks.

Offline and CPU-only, about a minute on 2 cores. Runs the commands a user would:
`python -m vit_jax train --dataset digits` with its defaults (a small ViT from scratch,
the official SGD recipe), then `vit_jax eval` and `vit_torch eval` of the released-layout
`final.npz` on the 360 test images. Prints both accuracies and the parity figures: the
largest logit difference between the frameworks and how many predictions agree.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np

WORKDIR = os.path.join('out', 'demo', 'digits')


def run(*args: str) -> dict:
    """`python -m ARGS...`, echoed; stderr passes through; returns the JSON line it prints last."""
    print('$ python -m ' + shlex.join(args), flush=True)
    proc = subprocess.run([sys.executable, '-m', *args], stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(proc.returncode)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    from parity.harness import tolerance

    shutil.rmtree(WORKDIR, ignore_errors=True)  # the demo's own output: train afresh every time
    trained = run('vit_jax', 'train', '--dataset', 'digits', '--workdir', WORKDIR)
    final, config = trained['final'], trained['config']
    scores, logits = {}, {}
    for fw in ('vit_jax', 'vit_torch'):
        out = os.path.join(WORKDIR, f'logits_{fw}.npy')
        scores[fw] = run(fw, 'eval', final, '--config', config, '--dataset', 'digits', '--logits', out)
        logits[fw] = np.load(out)

    a, b = logits['vit_jax'], logits['vit_torch']
    bound = tolerance.bound(a)
    diff = float(np.abs(a - b).max())
    top2 = np.sort(a, axis=-1)[:, -2:]
    differ = a.argmax(-1) != b.argmax(-1)
    ties = differ & (top2[:, 1] - top2[:, 0] <= bound)  # a float32 tie may fall either way
    n = len(a)
    print(f'\n{"framework":<12}{"accuracy":>10}{"correct":>10}')
    for fw, r in scores.items():
        print(f'{fw:<12}{r["accuracy"]:>10.2%}{r["correct"]:>6}/{r["examples"]}')
    print(f'trained in {trained["seconds"]:.0f} s at {trained["img_per_sec"]:,.0f} img/s '
          f'(jax {trained["accuracy"]:.2%} at the last step); files in {WORKDIR}/')
    ok = diff <= bound and not (differ & ~ties).any()
    print(f'parity: max |logit difference| {diff:.1e} (bound {bound:.1e}), predictions agree on '
          f'{n - int(differ.sum())}/{n}' + (f' ({int(ties.sum())} float32 ties)' if ties.any() else '')
          + (': OK' if ok else ': FAILED'))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
