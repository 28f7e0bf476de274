"""Training checkpoints: a `TrainState` saved to, listed in and restored from DIR/checkpoints.

Each checkpoint is one `.npz` (`ckpt-STEP.npz`), written atomically (a temporary file,
then a rename) so a run killed at any moment leaves only whole ones; the parameters are
stored under `params/` in canonical names, so `parity.core.weights` reads a training
checkpoint as a model. The params of a model, without the training state, go in and out
of the Flax variables in `vit_jax.params`.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

import jax
from jax.sharding import Mesh

from parity.core import files, weights
from parity.core.errors import UserError
from parity.core.weights import containers
from vit_jax.train import TrainState, replicate, to_host

CHECKPOINTS = 'checkpoints'
CHECKPOINT = re.compile(r'^ckpt-(\d+)\.npz$')


def _leaf_name(path) -> str:
    """A TrainState leaf's name in checkpoints: params under `params/` in canonical names (so
    `weights.load_npz` reads a training checkpoint as a model), the rest by pytree path."""
    field, *rest = path
    if field.name == 'params':
        return 'params/' + '/'.join(str(k.key) for k in rest)
    return field.name + jax.tree_util.keystr(tuple(rest))


def state_arrays(state: TrainState) -> dict[str, Any]:
    """A TrainState (or its abstract shapes) as flat named leaves."""
    return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def save_checkpoint(workdir: str, state: TrainState, keep: int) -> str:
    """Writes DIR/checkpoints/ckpt-STEP.npz atomically (temp file, then rename); keeps the newest `keep`.

    A failed write (a full disk) is a `UserError` and leaves the older checkpoints as they were.
    """
    directory = os.path.join(workdir, CHECKPOINTS)
    files.make_dirs(directory)
    arrays = state_arrays(to_host(state))
    path = os.path.join(directory, f'ckpt-{int(arrays["step"]):07d}.npz')
    containers.write_npz(path, arrays, durable=True)
    for old in list_checkpoints(workdir)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old[1])
    return path


def remove_temporaries(workdir: str) -> list[str]:
    """Deletes what a killed run left half-written in DIR and DIR/checkpoints (`files.TEMPORARY` names).

    Only the workdir's lock holder may call it: nobody else is writing there.
    """
    return files.remove_temporaries(workdir) + files.remove_temporaries(os.path.join(workdir, CHECKPOINTS))


def list_checkpoints(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in DIR/checkpoints, oldest first."""
    directory = os.path.join(workdir, CHECKPOINTS)
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if m := CHECKPOINT.match(name):
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def restore_checkpoint(path: str, template: TrainState, mesh: Mesh) -> TrainState:
    """The TrainState saved at `path`, checked leaf by leaf against `template` (see
    `abstract_train_state`), replicated over `mesh`."""
    saved = weights.read_npz(path)
    want = state_arrays(template)
    wrong = [k for k, v in want.items() if k not in saved or saved[k].shape != v.shape or saved[k].dtype != v.dtype]
    if wrong or saved.keys() != want.keys():
        raise UserError(f'{path}: not a checkpoint of this run ({len(wrong)} arrays missing or different, '
                        f'e.g. {", ".join(wrong[:2])}); use a new --workdir')
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return replicate(treedef.unflatten([saved[_leaf_name(p)] for p, _ in paths]), mesh)
