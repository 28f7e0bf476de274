"""The released layout: the `.npz` checkpoints of google-research/vision_transformer.

They were written by pre-linen Flax, which numbered the submodules of an encoder block
in call order across types, where linen numbers them per type (`PRE_LINEN_BLOCK`, the
one place the two namings differ, used in both directions); they keep GroupNorm
scale/bias as (1, 1, 1, C) where linen has (C,); training checkpoints nest the params
under `opt/target/` (the official trainer) or `params/` (this project's). Linen-numbered
files (what `vit_jax` itself writes out of a tree) are read as well.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np

from parity.core.weights import containers
from parity.core.weights.spec import Params

PRE_LINEN_BLOCK = {
    # released (pre-linen)               canonical (linen)
    'LayerNorm_0':                       'LayerNorm_0',
    'MultiHeadDotProductAttention_1':    'MultiHeadDotProductAttention_0',
    'LayerNorm_2':                       'LayerNorm_1',
    'MlpBlock_3':                        'MlpBlock_0',
}
LINEN_BLOCK = {v: k for k, v in PRE_LINEN_BLOCK.items()}
_PRE_LINEN_ONLY = set(PRE_LINEN_BLOCK) - set(LINEN_BLOCK)  # names that only a pre-linen file uses
PREFIXES = ('opt/target/', 'params/')  # training checkpoints: the params subtree, beside optimizer state
_BLOCK_CHILD = re.compile(r'^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$')
_GROUPNORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')  # stored (1, 1, 1, C), canonical (C,)


def params_subtree(flat: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """The params of a training checkpoint, which nests them beside optimizer state; any other file as it is.

    The one place the prefixes are taken off, for `load` (every npz tree) and `load_npz`.
    """
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in flat):
            return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    return flat


def _is_pre_linen(flat: Mapping[str, np.ndarray]) -> bool:
    return any((m := _BLOCK_CHILD.match(k)) and m.group(2) in _PRE_LINEN_ONLY for k in flat)


def spelling(flat: Mapping[str, np.ndarray]) -> Callable[[str], str]:
    """How the params `flat` (`params_subtree`'s) spell a canonical name (their block numbering): for messages."""
    pre_linen = _is_pre_linen(flat)

    def spell(k: str) -> str:
        if pre_linen and (m := _BLOCK_CHILD.match(k)):
            k = m.group(1) + LINEN_BLOCK.get(m.group(2), m.group(2)) + m.group(3)
        return k
    return spell


def canonicalize(flat: Mapping[str, np.ndarray]) -> Params:
    """Released or linen-numbered params (`params_subtree`'s) to the canonical form.

    Renames pre-linen block numbering and squeezes GroupNorm parameters to (C,).
    """
    pre_linen = _is_pre_linen(flat)
    out = {}
    for k, v in flat.items():
        if pre_linen and (m := _BLOCK_CHILD.match(k)):
            k = m.group(1) + PRE_LINEN_BLOCK.get(m.group(2), m.group(2)) + m.group(3)
        if _GROUPNORM.search(k) and v.ndim == 4:
            v = v.reshape(v.shape[-1])
        out[k] = v
    return out


def to_released(params: Mapping[str, np.ndarray]) -> Params:
    """Canonical form to the released layout: pre-linen names, GroupNorm as (1, 1, 1, C)."""
    out = {}
    for k, v in params.items():
        if m := _BLOCK_CHILD.match(k):
            k = m.group(1) + LINEN_BLOCK.get(m.group(2), m.group(2)) + m.group(3)
        if _GROUPNORM.search(k):
            v = v.reshape(1, 1, 1, -1)
        out[k] = np.asarray(v)
    return out


def load_npz(path: str) -> Params:
    """A checkpoint file (released, linen, or training layout) in canonical form."""
    return canonicalize(params_subtree(containers.read_npz(path)))


def save_npz(path: str, params: Mapping[str, np.ndarray]) -> None:
    """Writes canonical params as a released-layout .npz, atomically (temp file, then rename)."""
    containers.write_npz(path, to_released(params))
