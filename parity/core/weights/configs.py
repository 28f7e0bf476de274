"""Configs read off a checkpoint: inferred from its shapes, or resolved from `--config`.

Every function reads canonical names and shapes only (never values), so a format whose
arrays are not loaded yet can hand in zero-memory stand-ins of the right shape.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import numpy as np

from parity.core.config import OFFICIAL_CONFIGS, ViTConfig, heads_for_width, is_square, load_config, official_name_for
from parity.core.errors import UserError
from parity.core.weights.spec import POSEMB


def infer_config(params: Mapping[str, np.ndarray], num_heads: Optional[int] = None,
                 pool_without_token: Optional[str] = 'gap', where: str = 'the checkpoint',
                 spell: Optional[Callable[[str], str]] = None) -> ViTConfig:
    """The config a canonical checkpoint was built with, read off its shapes.

    Named after the official variant with the same trunk when there is one. The class
    token tells `token`, the MAP head `map`; a checkpoint with neither pools as
    `pool_without_token` (`gap` in the official layout, where it is the only choice;
    None where `gap` and `first` look alike, which is an error naming --config). The
    unpooled classifiers cannot be told from weights. No stored position embeddings
    means `sincos2d`, and no stored resolution: the caller picks it. `spell` gives the
    file's own name of a canonical one, for the messages.
    """
    spell = spell or (lambda k: k)

    def shape(k, *ranks):
        if k not in params:
            raise UserError(f'cannot infer a config: the checkpoint has no {spell(k)!r}; pass --config')
        s = tuple(params[k].shape)
        if len(s) not in ranks or not all(s):
            raise UserError(f'{where}: {spell(k)} has shape {s}, expected {" or ".join(str(r) for r in ranks)} '
                            'nonzero dimensions; is it a ViT checkpoint?')
        return s

    kh, kw, _, D = shape('embedding/kernel', 4)
    layers = 0
    while f'Transformer/encoderblock_{layers}/MlpBlock_0/Dense_0/kernel' in params:
        layers += 1
    if not layers:
        raise UserError('cannot infer a config: the checkpoint has no encoder blocks; pass --config')
    q = shape('Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel', 2, 3)
    heads = q[1] if len(q) == 3 else (num_heads or heads_for_width(D))
    if heads is None:
        raise UserError(f'cannot infer the number of heads of a width-{D} model from its PyTorch '
                        'weights; pass --config')
    resnet = None
    width = 1.0
    if 'conv_root/kernel' in params:
        width = shape('conv_root/kernel', 4)[-1] / 64
        resnet = []
        while f'block{len(resnet) + 1}/unit1/conv1/kernel' in params:
            units = 0
            while f'block{len(resnet) + 1}/unit{units + 1}/conv1/kernel' in params:
                units += 1
            resnet.append(units)
    classifier = ('token_distilled' if 'dist_token' in params else 'token' if 'cls' in params
                  else 'map' if 'MAPHead_0/probe' in params else pool_without_token)
    if classifier is None:
        raise UserError(f'{where}: has no class token and no MAP head, and its layout does not record how it '
                        'pools: pass --config, e.g. a JSON file {"variant": "B/16", "pool_type": "gap"} '
                        '(mean of the tokens) or "pool_type": "0" (the first token), with its variant')
    cfg = ViTConfig(
        name=None, patch_size=(kh, kw), hidden_size=D, num_layers=layers,
        mlp_dim=shape('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel', 2)[1], num_heads=heads,
        classifier=classifier, posemb='learn' if POSEMB in params else 'sincos2d',
        representation_size=shape('pre_logits/kernel', 2)[1] if 'pre_logits/kernel' in params else None,
        resnet_num_layers=None if resnet is None else tuple(resnet), resnet_width_factor=width,
        num_classes=shape('head/kernel', 2)[1] if 'head/kernel' in params else 0)
    name = official_name_for(cfg)
    if name is not None:  # the official dropout rates come with the name
        official = OFFICIAL_CONFIGS[name]
        cfg = cfg.replace(name=name, dropout_rate=official.dropout_rate,
                          attention_dropout_rate=official.attention_dropout_rate)
    size = checkpoint_image_size(params, cfg)
    return cfg if size is None else cfg.replace(image_size=size)


def checkpoint_image_size(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> Optional[int]:
    """The resolution the checkpoint's position embeddings were made for; None without stored ones."""
    grid = checkpoint_grid(params, cfg)
    return None if grid is None else grid * cfg.stem_stride * cfg.patch_size[0]


def checkpoint_grid(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> Optional[int]:
    """The side of the checkpoint's square patch grid, read off its position embeddings; None without them."""
    if POSEMB not in params:
        if cfg.posemb == 'learn':
            raise UserError(f'the checkpoint has no {POSEMB!r}; is it a ViT checkpoint?')
        return None
    if len(params[POSEMB].shape) != 3:
        raise UserError(f'{POSEMB} has shape {tuple(params[POSEMB].shape)}, expected (1, tokens, width)')
    n = params[POSEMB].shape[1] - cfg.num_prefix_tokens
    if not is_square(n):
        raise UserError(f'position embeddings hold {n} patch tokens, not a square grid; '
                        'only square grids can be resized or inferred')
    return math.isqrt(n)


def with_checkpoint_head(cfg: ViTConfig, params: Mapping[str, np.ndarray]) -> ViTConfig:
    """`cfg` with the head size and representation layer the checkpoint has.

    A kernel that is not a matrix says nothing about them: `cfg`'s stand, and the strict
    check names the misfit.
    """
    def width(k: str, absent):
        if k not in params:
            return absent
        shape = params[k].shape
        return shape[-1] if len(shape) == 2 else getattr(cfg, 'num_classes' if k == 'head/kernel'
                                                         else 'representation_size')
    return cfg.replace(num_classes=width('head/kernel', 0), representation_size=width('pre_logits/kernel', None))


def resolve_config(spec: Optional[str], params: Mapping[str, np.ndarray], image_size: Optional[int] = None,
                   fallback_size: int = 224, stored: Optional[ViTConfig] = None, **infer) -> ViTConfig:
    """The config to build for `params`, from `--config` (name, JSON path or None).

    None takes the config the file itself `stored`, else infers it (`infer` goes to
    `infer_config`). An official name fixes the trunk; the head size and representation
    layer come from the checkpoint, since the released files differ there (imagenet21k
    files carry a 768-wide `pre_logits` and a 21843-class head). A JSON file is taken
    as written. The resolution is `image_size`, else the checkpoint's own grid, else
    (no stored position embeddings: sincos2d) `fallback_size`.
    """
    if spec is None:
        cfg = stored if stored is not None else infer_config(params, **infer)
    else:
        cfg = load_config(spec)
        if spec in OFFICIAL_CONFIGS:
            cfg = with_checkpoint_head(cfg, params)
    size = image_size or checkpoint_image_size(params, cfg) or fallback_size
    cfg.grid_for(size)
    return cfg.replace(image_size=size)
