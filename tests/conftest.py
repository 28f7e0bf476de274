"""Shared test set-up: float32 parity settings and the reference vectors beside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

# Parity is judged in true float32: highest matmul precision in JAX, no TF32 in PyTorch.
jax.config.update('jax_default_matmul_precision', 'highest')
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; tests read the vectors in place, never copy them.
REFERENCE = REPO.parent / 'shared' / 'reference'


@pytest.fixture(scope='session')
def reference() -> Path:
    assert REFERENCE.is_dir(), f'reference vectors not found at {REFERENCE}'
    return REFERENCE


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m ARGS...` from the repo root, as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}:\n{proc.stderr}')
    return proc


def random_params(shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Random float32 params for a shape spec: nothing zero, so every parameter matters."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in shapes.items():
        v = rng.normal(0.0, scale, s)
        if k.endswith('/scale'):
            v = 1.0 + v  # norms near identity keep activations in a sane range
        out[k] = v.astype(np.float32)
    return out


from parity.tolerance import bound as tolerance  # noqa: E402  the written policy: 1e-5 x max(1, max |reference|)
