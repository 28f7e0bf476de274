"""The canonical form: every parameter a config has, its shape, and the strict check against it.

Canonical form: a flat dict from the official Flax linen parameter names, '/'-joined
(`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`), to NumPy
arrays in the linen layout: exactly what the official model's `init` makes, and
exactly `vit_jax`'s parameter tree. Every file format is read into this form and
written from it.

Shapes: D width, H heads, Dh = D // H, M MLP size, R representation size,
C classes, N tokens, W ResNet width.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import numpy as np

from parity.core.config import ViTConfig
from parity.core.errors import UserError

Params = dict[str, np.ndarray]

POSEMB = 'Transformer/posembed_input/pos_embedding'


def param_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter of `cfg` and its shape: what the official model's init makes."""
    D, H, Dh, M = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    s: dict[str, tuple[int, ...]] = {}
    cin = 3
    if cfg.is_hybrid:
        W = cfg.resnet_width
        s['conv_root/kernel'] = (7, 7, 3, W)
        s['gn_root/scale'] = s['gn_root/bias'] = (W,)
        cin = W
        for i, units in enumerate(cfg.resnet_num_layers):
            nout = W * 2 ** i
            for j in range(units):
                unit = f'block{i + 1}/unit{j + 1}/'
                if j == 0:  # first unit changes width (and stride after stage 1): projected residual
                    s[unit + 'conv_proj/kernel'] = (1, 1, cin, 4 * nout)
                    s[unit + 'gn_proj/scale'] = s[unit + 'gn_proj/bias'] = (4 * nout,)
                for conv, k, ci, co in (('1', 1, cin, nout), ('2', 3, nout, nout), ('3', 1, nout, 4 * nout)):
                    s[unit + f'conv{conv}/kernel'] = (k, k, ci, co)
                    s[unit + f'gn{conv}/scale'] = s[unit + f'gn{conv}/bias'] = (co,)
                cin = 4 * nout
    s['embedding/kernel'] = (*cfg.patch_size, cin, D)
    s['embedding/bias'] = (D,)
    if cfg.has_cls_token:
        s['cls'] = (1, 1, D)
    if cfg.has_dist_token:
        s['dist_token'] = (1, 1, D)
    if cfg.posemb == 'learn':  # sincos2d is computed, never stored
        s[POSEMB] = (1, cfg.num_tokens, D)

    def block(b: str) -> None:
        """The attention, LayerNorm and MLP leaves under prefix `b` (an encoder block's; the MAP head's)."""
        for proj in ('query', 'key', 'value'):
            s[b + f'MultiHeadDotProductAttention_0/{proj}/kernel'] = (D, H, Dh)
            s[b + f'MultiHeadDotProductAttention_0/{proj}/bias'] = (H, Dh)
        s[b + 'MultiHeadDotProductAttention_0/out/kernel'] = (H, Dh, D)
        s[b + 'MultiHeadDotProductAttention_0/out/bias'] = (D,)
        s[b + 'MlpBlock_0/Dense_0/kernel'], s[b + 'MlpBlock_0/Dense_0/bias'] = (D, M), (M,)
        s[b + 'MlpBlock_0/Dense_1/kernel'], s[b + 'MlpBlock_0/Dense_1/bias'] = (M, D), (D,)

    for i in range(cfg.num_layers):
        b = f'Transformer/encoderblock_{i}/'
        for norm in ('LayerNorm_0', 'LayerNorm_1'):
            s[b + norm + '/scale'] = s[b + norm + '/bias'] = (D,)
        block(b)
    s['Transformer/encoder_norm/scale'] = s['Transformer/encoder_norm/bias'] = (D,)
    if cfg.classifier == 'map':  # big_vision's MAPHead, under its own names
        s['MAPHead_0/probe'] = (1, 1, D)
        s['MAPHead_0/LayerNorm_0/scale'] = s['MAPHead_0/LayerNorm_0/bias'] = (D,)
        block('MAPHead_0/')
    features = D
    if cfg.representation_size is not None:
        features = cfg.representation_size
        s['pre_logits/kernel'], s['pre_logits/bias'] = (D, features), (features,)
    if cfg.num_classes:
        s['head/kernel'], s['head/bias'] = (features, cfg.num_classes), (cfg.num_classes,)
        if cfg.has_dist_token:
            s['head_dist/kernel'], s['head_dist/bias'] = (features, cfg.num_classes), (cfg.num_classes,)
    return s


def count_params(cfg: ViTConfig) -> int:
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())


def check_params(params: Mapping[str, np.ndarray], cfg: ViTConfig, where: str,
                 spell: Optional[Callable[[str], str]] = None) -> None:
    """Raises one error naming every missing key, extra key and shape mismatch; else returns.

    `spell` turns a canonical name into the file's own, for the message (the released layout's
    pre-linen numbering); by default the canonical names are the file's.
    """
    spell = spell or (lambda k: k)
    expected = param_shapes(cfg)
    missing = sorted(spell(k) for k in expected.keys() - params.keys())
    extra = sorted(spell(k) for k in params.keys() - expected.keys())
    wrong = [f'{spell(k)} expected {expected[k]} found {tuple(params[k].shape)}'
             for k in expected if k in params and tuple(params[k].shape) != expected[k]]
    if missing or extra or wrong:
        raise misfit(where, cfg, missing, extra, wrong,
                     'pass the config it was trained with, or omit --config to infer it')


def misfit(where: str, cfg: ViTConfig, missing: list, extra: list, wrong: list, advice: str) -> UserError:
    """The one-line strict-check error: every missing key, extra key and shape mismatch, in the file's own names."""
    parts = [f'{len(missing)} missing: {", ".join(missing)}' if missing else '',
             f'{len(extra)} extra: {", ".join(extra)}' if extra else '',
             f'{len(wrong)} shape mismatches: {"; ".join(wrong)}' if wrong else '']
    return UserError(f'{where} does not fit config {cfg.name or "(unnamed)"}: '
                     + ' | '.join(p for p in parts if p) + f' -- {advice}')
