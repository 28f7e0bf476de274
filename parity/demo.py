"""`make demo`: build official-size ViTs, write released-layout checkpoints, load them in both frameworks.

Offline and CPU-only: each model is initialised in Flax, its head and class token
randomised (a fresh head is all zeros, which would hide any difference), written
as a released-layout npz, read back through the shared weight layer into both
frameworks, and run on the same batch. Prints the logit differences.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

OUT = os.path.join('out', 'demo')
MODELS = ('ViT-Ti_16', 'R+ViT-Ti_16', 'ViT-S_32')


def main() -> int:
    import jax
    import torch

    jax.config.update('jax_default_matmul_precision', 'highest')
    torch.backends.cuda.matmul.allow_tf32 = False

    from parity import cli, weights
    from parity.config import OFFICIAL_CONFIGS
    from vit_jax.checkpoint import params_from_variables, variables_from_params
    from vit_jax.model import VisionTransformer as FlaxViT
    from vit_torch.checkpoint import build_model

    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (4, 224, 224, 3)).astype(np.float32)
    print(f'{"model":<14}{"params":>12}{"max |logit|":>13}{"jax vs torch":>14}{"top-1 agree":>13}{"time":>8}')
    worst = 0.0
    for name in MODELS:
        t0 = time.time()
        cfg = OFFICIAL_CONFIGS[name]
        params = params_from_variables(FlaxViT(cfg).init(jax.random.PRNGKey(0), x[:1]))
        for k in ('head/kernel', 'head/bias', 'cls'):
            params[k] = rng.normal(0, 0.5, params[k].shape).astype(np.float32)
        path = os.path.join(OUT, f'{name}.npz')
        weights.save_npz(path, params)

        cfg, loaded = cli.load_checkpoint(path, name, None)
        y_jax = np.asarray(jax.jit(FlaxViT(cfg).apply)(variables_from_params(loaded), x))
        with torch.inference_mode():
            y_torch = build_model(cfg, loaded)(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        diff = float(np.abs(y_jax - y_torch).max())
        worst = max(worst, diff / max(1.0, float(np.abs(y_jax).max())))
        agree = float((y_jax.argmax(-1) == y_torch.argmax(-1)).mean())
        print(f'{name:<14}{weights.count_params(cfg):>12,}{np.abs(y_jax).max():>13.3f}{diff:>14.2e}'
              f'{agree:>13.0%}{time.time() - t0:>7.1f}s')
    print(f'checkpoints written to {OUT}/ in the released layout; try:\n'
          f'  python -m vit_torch logits {OUT}/ViT-Ti_16.npz --config ViT-Ti_16 --input X.npy --output Y.npy')
    ok = worst <= 1e-5
    print('parity: ' + ('OK, within 1e-5 x max(1, max |logit|)' if ok else f'FAILED ({worst:.2e})'))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
