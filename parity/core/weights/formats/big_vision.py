"""big_vision's ViT checkpoints: `.npz` files as its `utils.save_checkpoint` writes them (`np.savez` of the flat tree).

Its `vit.Model` keeps the official module names, in linen's numbering, with four
differences this module maps (`to_canonical`, `from_canonical`), all as big_vision's own
`vit.load` and `fix_old_checkpoints` treat them:

- the position embeddings sit at the top (`pos_embedding`, (1, h*w, D)) and are added
  *before* the class token is prepended, so the class token gets none: the canonical
  form gets a zero class-token row, which computes exactly that. Written back, an
  official row is folded into the class token (`cls += pos_embedding[:, :1]`), as
  big_vision's `vit.load` does when it reads an official file. Older files keep them
  in `Transformer/pos_embedding`, some with the class-token row still in (1 + h*w).
- with `scan=True` the blocks are one `Transformer/encoderblock/...` whose leaves carry
  a leading depth axis; they are unstacked into `encoderblock_{i}`.
- bfloat16 arrays land on disk as 2-byte void (`<V2`); they are read back as bfloat16
  and upcast to float32, exactly.
- heads and poolings: `MAPHead_0` (multihead attention pooling, also the old inline
  `probe`), `pool_type` `tok`, `gap`, `map`, `0` (first token) or `none`, `rep_size`
  (`pre_logits`). `posemb='sincos2d'` stores no array.

Training checkpoints nest the params under `params/` (or `opt/target/`); two-tower
files (SigLIP) put the image tower under `params/img/` (read as `FILE.npz:img`).
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np

from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.core.weights.spec import POSEMB, Params

POS = 'pos_embedding'  # where big_vision keeps the position embeddings
OLD_POS = 'Transformer/pos_embedding'  # where the widely used version before 2022 kept them
SCAN = re.compile(r'^Transformer/encoderblock/(.+)$')
PREFIX = 'params/'  # what big_vision's training checkpoints and our export nest the params under
# The MAP head's leaves, as the ViT-G era kept them inline (fix_old_checkpoints moves them).
_INLINE_MAP = ('probe', 'MlpBlock_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_0')


def detect(keys) -> bool:
    """A big_vision layout: its position embeddings, scan blocks or MAP head, or no position embeddings at all."""
    return (POS in keys or OLD_POS in keys or any(SCAN.match(k) or k.startswith('MAPHead_0/') for k in keys)
            or ('embedding/kernel' in keys and not any(k.endswith('posembed_input/pos_embedding') for k in keys)))


def bfloat16_to_float32(a: np.ndarray) -> np.ndarray:
    """A bfloat16 array stored as 2-byte void (`<V2`) as float32: the 16 bits are float32's top half, exactly."""
    bits = np.frombuffer(np.ascontiguousarray(a).tobytes(), '<u2').astype(np.uint32) << 16
    return bits.view(np.float32).reshape(a.shape)


def to_canonical(flat: Mapping[str, np.ndarray], where: str) -> Params:
    """A big_vision tree (prefix already taken off) in canonical form."""
    out: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        if v.dtype.kind == 'V':
            if v.dtype.itemsize != 2:
                raise UserError(f'{where}: array {k!r} has an opaque {v.dtype.itemsize}-byte dtype; big_vision '
                                'stores bfloat16 as 2-byte void, nothing else')
            v = bfloat16_to_float32(v)
        if m := SCAN.match(k):
            for i, layer in enumerate(v):
                out[f'Transformer/encoderblock_{i}/{m.group(1)}'] = layer
        elif k.split('/')[0] in _INLINE_MAP and 'MAPHead_0/probe' not in flat and 'probe' in flat:
            out['MAPHead_0/' + k] = v
        else:
            out[k] = v
    pe = out.pop(POS, None)
    pe = out.pop(OLD_POS, None) if pe is None else pe
    if pe is not None:
        if pe.ndim != 3:
            raise UserError(f'{where}: pos_embedding has shape {pe.shape}, expected (1, tokens, width)')
        n = pe.shape[1]
        if 'cls' in out and int(np.sqrt(n)) ** 2 == n:  # added before the class token: it gets none
            pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
        out[POSEMB] = pe
    return out


def from_canonical(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> Params:
    """Canonical params as big_vision's `vit.Model` tree under `params/`, names sorted as big_vision saves them."""
    why = expressible(cfg)
    if why:
        raise UserError(f'big_vision\'s ViT cannot express {why}; write the released npz (--to npz) or a PyTorch '
                        'state dict (--to torch)')
    out = {k: np.asarray(v) for k, v in params.items() if k != POSEMB}
    if POSEMB in params:
        pe = np.asarray(params[POSEMB])
        if cfg.has_cls_token:  # big_vision gives the class token no position: fold its row into the token
            out['cls'] = np.asarray(params['cls']) + pe[:, :1]
            pe = pe[:, 1:]
        out[POS] = pe
    return {PREFIX + k: out[k] for k in sorted(out)}


def expressible(cfg: ViTConfig) -> Optional[str]:
    """Why big_vision's ViT cannot hold `cfg`, or None."""
    if cfg.is_hybrid:
        return 'a hybrid (it has no ResNet stem)'
    if cfg.classifier == 'token_unpooled':
        return "the 'token_unpooled' classifier (its unpooled model has no class token)"
    if cfg.has_dist_token:
        return "DeiT's distillation token"
    return None


POOL_TYPES = {'token': 'tok', 'gap': 'gap', 'map': 'map', 'first': '0', 'unpooled': 'none'}


def model_config(cfg: ViTConfig) -> dict:
    """The keyword arguments of big_vision's `vit.Model` that build `cfg`."""
    return {'num_classes': cfg.num_classes or None, 'patch_size': list(cfg.patch_size), 'width': cfg.hidden_size,
            'depth': cfg.num_layers, 'mlp_dim': cfg.mlp_dim, 'num_heads': cfg.num_heads, 'posemb': cfg.posemb,
            'rep_size': cfg.representation_size or False, 'pool_type': POOL_TYPES[cfg.classifier]}
