"""Configs read off a checkpoint: inferred from its shapes, or resolved from `--config`.

Every function reads canonical names and shapes only (never values), so a format whose
arrays are not loaded yet can hand in zero-memory stand-ins of the right shape.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from parity.core.config import OFFICIAL_CONFIGS, ViTConfig, heads_for_width, is_square, load_config, official_name_for
from parity.core.errors import UserError
from parity.core.weights.spec import POSEMB


def infer_config(params: Mapping[str, np.ndarray], num_heads: Optional[int] = None) -> ViTConfig:
    """The config a canonical checkpoint was built with, read off its shapes.

    Named after the official variant with the same trunk when there is one. The class
    token tells `token` from `gap`; the unpooled classifiers cannot be told from weights.
    """
    def shape(k):
        if k not in params:
            raise UserError(f'cannot infer a config: the checkpoint has no {k!r}; pass --config')
        return params[k].shape

    kh, kw, _, D = shape('embedding/kernel')
    layers = 0
    while f'Transformer/encoderblock_{layers}/MlpBlock_0/Dense_0/kernel' in params:
        layers += 1
    if not layers:
        raise UserError('cannot infer a config: the checkpoint has no encoder blocks; pass --config')
    q = shape('Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel')
    heads = q[1] if len(q) == 3 else (num_heads or heads_for_width(D))
    if heads is None:
        raise UserError(f'cannot infer the number of heads of a width-{D} model from its PyTorch '
                        'weights; pass --config')
    resnet = None
    width = 1.0
    if 'conv_root/kernel' in params:
        width = shape('conv_root/kernel')[-1] / 64
        resnet = []
        while f'block{len(resnet) + 1}/unit1/conv1/kernel' in params:
            units = 0
            while f'block{len(resnet) + 1}/unit{units + 1}/conv1/kernel' in params:
                units += 1
            resnet.append(units)
    has_cls = 'cls' in params
    cfg = ViTConfig(
        name=None, patch_size=(kh, kw), hidden_size=D, num_layers=layers,
        mlp_dim=shape('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')[1], num_heads=heads,
        classifier='token' if has_cls else 'gap',
        representation_size=params['pre_logits/kernel'].shape[1] if 'pre_logits/kernel' in params else None,
        resnet_num_layers=None if resnet is None else tuple(resnet), resnet_width_factor=width,
        num_classes=params['head/kernel'].shape[1] if 'head/kernel' in params else 0)
    name = official_name_for(cfg)
    if name is not None:  # the official dropout rates come with the name
        official = OFFICIAL_CONFIGS[name]
        cfg = cfg.replace(name=name, dropout_rate=official.dropout_rate,
                          attention_dropout_rate=official.attention_dropout_rate)
    return cfg.replace(image_size=checkpoint_image_size(params, cfg))


def checkpoint_image_size(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> int:
    """The resolution the checkpoint's position embeddings were made for."""
    return checkpoint_grid(params, cfg) * cfg.stem_stride * cfg.patch_size[0]


def checkpoint_grid(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> int:
    """The side of the checkpoint's square patch grid, read off its position embeddings."""
    if POSEMB not in params:
        raise UserError(f'the checkpoint has no {POSEMB!r}; is it a ViT checkpoint?')
    n = params[POSEMB].shape[1] - int(cfg.has_cls_token)
    if not is_square(n):
        raise UserError(f'position embeddings hold {n} patch tokens, not a square grid; '
                        'only square grids can be resized or inferred')
    return math.isqrt(n)


def resolve_config(spec: Optional[str], params: Mapping[str, np.ndarray], image_size: Optional[int] = None) -> ViTConfig:
    """The config to build for `params`, from `--config` (name, JSON path or None).

    None infers it. An official name fixes the trunk; the head size and representation
    layer come from the checkpoint, since the released files differ there (imagenet21k
    files carry a 768-wide `pre_logits` and a 21843-class head). A JSON file is taken
    as written. The resolution is `image_size`, by default the checkpoint's own grid.
    """
    if spec is None:
        cfg = infer_config(params)
    else:
        cfg = load_config(spec)
        if spec in OFFICIAL_CONFIGS:
            cfg = cfg.replace(
                num_classes=params['head/kernel'].shape[-1] if 'head/kernel' in params else 0,
                representation_size=params['pre_logits/kernel'].shape[-1] if 'pre_logits/kernel' in params else None)
    size = image_size or checkpoint_image_size(params, cfg)
    cfg.grid_for(size)
    return cfg.replace(image_size=size)
