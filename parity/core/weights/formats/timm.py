"""timm's ViT state dicts (`timm.models.vision_transformer.VisionTransformer`): `.safetensors`, `.pth`, `.bin`.

Every tensor is laid out as in the PyTorch mirror; the names differ, and each block's
`attn.qkv` holds the query, key and value projections concatenated (as does the MAP
head's `attn_pool.kv`, key then value). `TIMM` is the table. timm's `global_pool='map'`
(`attn_pool.*`) is big_vision's MAP head. What the official model cannot compute is
refused by name: a LayerNorm after pooling (`fc_norm`, timm's `avg` default), register
tokens, a pre-norm (CLIP), a hybrid backbone. DeiT's distilled models (`VisionTransformerDistilled`:
`dist_token`, `head_dist`) read as the `token_distilled` classifier.

A timm file records neither the head count nor the pooling: they come from `--config`,
or from the `config.json` timm writes beside a hub checkpoint (its `architecture`
names the variant). Position embeddings with no class-token row (`no_embed_class`, as
deit3 and big_vision) get a zero row in the canonical form.

timm builds every ViT with `nn.GELU` (the exact erf form) and LayerNorm eps 1e-6, not the
official tanh GELU; that is what such a file runs by default (`numerics_from`), unless
the hub `config.json`'s `model_args` name another `act_layer` or `norm_layer`.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from parity.core.config import BIG_VISION_VARIANTS, Numerics, ViTConfig, format_eps
from parity.core.errors import UserError
from parity.core.weights.formats.tables import Table

_B, _A, _M = 'Transformer.encoderblock_{i}.', 'Transformer.encoderblock_{i}.MultiHeadDotProductAttention_0.', \
    'MAPHead_0.MultiHeadDotProductAttention_0.'
TIMM = Table('timm', [
    # ours (vit_torch state dict)                                   timm
    ('cls',                                                         'cls_token'),
    ('Transformer.posembed_input.pos_embedding',                    'pos_embed'),
    ('embedding.weight',                                            'patch_embed.proj.weight'),
    ('embedding.bias',                                              'patch_embed.proj.bias'),
    (_B + 'LayerNorm_0.weight',                                     'blocks.{i}.norm1.weight'),
    (_B + 'LayerNorm_0.bias',                                       'blocks.{i}.norm1.bias'),
    ((_A + 'query.weight', _A + 'key.weight', _A + 'value.weight'), 'blocks.{i}.attn.qkv.weight'),
    ((_A + 'query.bias', _A + 'key.bias', _A + 'value.bias'),       'blocks.{i}.attn.qkv.bias'),
    (_A + 'out.weight',                                             'blocks.{i}.attn.proj.weight'),
    (_A + 'out.bias',                                               'blocks.{i}.attn.proj.bias'),
    (_B + 'LayerNorm_1.weight',                                     'blocks.{i}.norm2.weight'),
    (_B + 'LayerNorm_1.bias',                                       'blocks.{i}.norm2.bias'),
    (_B + 'MlpBlock_0.Dense_0.weight',                              'blocks.{i}.mlp.fc1.weight'),
    (_B + 'MlpBlock_0.Dense_0.bias',                                'blocks.{i}.mlp.fc1.bias'),
    (_B + 'MlpBlock_0.Dense_1.weight',                              'blocks.{i}.mlp.fc2.weight'),
    (_B + 'MlpBlock_0.Dense_1.bias',                                'blocks.{i}.mlp.fc2.bias'),
    ('Transformer.encoder_norm.weight',                             'norm.weight'),
    ('Transformer.encoder_norm.bias',                               'norm.bias'),
    ('MAPHead_0.probe',                                             'attn_pool.latent'),
    (_M + 'query.weight',                                           'attn_pool.q.weight'),
    (_M + 'query.bias',                                             'attn_pool.q.bias'),
    ((_M + 'key.weight', _M + 'value.weight'),                      'attn_pool.kv.weight'),
    ((_M + 'key.bias', _M + 'value.bias'),                          'attn_pool.kv.bias'),
    (_M + 'out.weight',                                             'attn_pool.proj.weight'),
    (_M + 'out.bias',                                               'attn_pool.proj.bias'),
    ('MAPHead_0.LayerNorm_0.weight',                                'attn_pool.norm.weight'),
    ('MAPHead_0.LayerNorm_0.bias',                                  'attn_pool.norm.bias'),
    ('MAPHead_0.MlpBlock_0.Dense_0.weight',                         'attn_pool.mlp.fc1.weight'),
    ('MAPHead_0.MlpBlock_0.Dense_0.bias',                           'attn_pool.mlp.fc1.bias'),
    ('MAPHead_0.MlpBlock_0.Dense_1.weight',                         'attn_pool.mlp.fc2.weight'),
    ('MAPHead_0.MlpBlock_0.Dense_1.bias',                           'attn_pool.mlp.fc2.bias'),
    ('head.weight',                                                 'head.weight'),
    ('head.bias',                                                   'head.bias'),
    ('dist_token',                                                  'dist_token'),  # DeiT's distilled models
    ('head_dist.weight',                                            'head_dist.weight'),
    ('head_dist.bias',                                              'head_dist.bias'),
])
SIGNATURE = 'patch_embed.proj.weight'
# What timm can hold and the official model cannot compute, by the key that shows it.
REFUSED = {
    'fc_norm.weight': "a LayerNorm after the pooling (timm's fc_norm, its default for global_pool='avg')",
    'reg_token': 'register tokens',
    'norm_pre.weight': 'a LayerNorm before the blocks (norm_pre, as in CLIP)',
    'patch_embed.backbone': 'a hybrid backbone (timm ResNetV2); convert the official R50 npz instead',
}
# timm's size names in ViT model names, and big_vision's variant each one is.
_SIZES = {'tiny': 'Ti', 'small': 'S', 'medium': 'M', 'base': 'B', 'large': 'L', 'huge': 'H', 'giant': 'g',
          'so400m': 'So400m', 'mu': 'mu'}


def detect(keys) -> bool:
    return SIGNATURE in keys


def refuse_unsupported(keys, where: str) -> None:
    """One error naming what the file holds that the official model cannot compute."""
    found = [why for key, why in REFUSED.items() if any(k == key or k.startswith(key + '.') for k in keys)]
    if found:
        raise UserError(f'{where}: a timm ViT with {"; ".join(found)}, which the official model does not compute; '
                        'only plain timm ViTs are read (token, avg with fc_norm=False, map or no pooling)')


def heads_from_config(d: Optional[object]) -> Optional[tuple[int, Optional[str]]]:
    """(heads, global_pool) from the `config.json` timm writes beside a hub checkpoint (`d`, as read), if it says:
    its `model_args`' `num_heads`, else the variant its `architecture` names."""
    if not isinstance(d, dict) or not isinstance(d.get('architecture'), str):
        return None
    pool = d.get('global_pool') or (d.get('pretrained_cfg') or {}).get('global_pool')
    pool = pool if isinstance(pool, str) else None
    args = d.get('model_args')
    if isinstance(args, dict) and isinstance(args.get('num_heads'), int) and not isinstance(args['num_heads'], bool):
        return args['num_heads'], args.get('global_pool', pool) if isinstance(args.get('global_pool'), str) else pool
    m = re.match(r'^(?:vit|deit3?)_([a-z0-9]+)_', d['architecture'])
    size = _SIZES.get(m.group(1)) if m else None
    if size is None:
        return None
    return BIG_VISION_VARIANTS[size][3], pool


def labels_from(d: Optional[object]) -> Optional[list[str]]:
    """The class names of a timm hub `config.json`'s `label_names` (a list, or a dict of index to name), in logit
    order; None when it has none or they are not one name per index."""
    names = d.get('label_names') if isinstance(d, dict) else None
    if isinstance(names, dict):
        try:
            names = [names[k] for k in sorted(names, key=int)]
        except (ValueError, TypeError):
            return None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return names


# A model timm registers for each size (`hub_config`'s `architecture`): timm builds it with the `model_args` given.
_ARCHITECTURES = {'tiny': 'vit_tiny_patch16_224', 'small': 'vit_small_patch16_224', 'base': 'vit_base_patch16_224',
                  'large': 'vit_large_patch16_224', 'huge': 'vit_huge_patch14_224', 'giant': 'vit_giant_patch14_224'}
_DISTILLED_ARCHITECTURES = {'tiny': 'deit_tiny_distilled_patch16_224', 'small': 'deit_small_distilled_patch16_224',
                            'base': 'deit_base_distilled_patch16_224'}


def hub_config(cfg: ViTConfig, labels: Optional[list[str]] = None) -> dict:
    """The `config.json` of a timm hub folder for `cfg` (as timm's `save_for_hf` writes one): `architecture` the
    nearest timm model name, `model_args` every size and the numerics, so that `timm.create_model` on the folder
    builds this model whatever its sizes; `label_names` the class names."""
    pool, class_token = POOLS[cfg.classifier]
    size = next((name for name, v in _SIZES.items() if v in BIG_VISION_VARIANTS
                 and BIG_VISION_VARIANTS[v][:3] == (cfg.hidden_size, cfg.num_layers, cfg.mlp_dim)), None)
    names = _DISTILLED_ARCHITECTURES if cfg.classifier == 'token_distilled' else _ARCHITECTURES
    architecture = names.get(size, names['base'])  # a name timm registers; model_args set every size
    args = {'img_size': cfg.image_size, 'patch_size': cfg.patch_size[0], 'embed_dim': cfg.hidden_size,
            'depth': cfg.num_layers, 'num_heads': cfg.num_heads, 'mlp_ratio': cfg.mlp_dim / cfg.hidden_size,
            'class_token': class_token, 'global_pool': pool, 'num_classes': cfg.num_classes}
    if pool == 'avg':
        args['fc_norm'] = False  # timm puts a LayerNorm after average pooling unless told not to
    if cfg.gelu != 'erf':
        args['act_layer'] = WRITTEN_ACTIVATION[cfg.gelu]
    d = {'architecture': architecture,
         'num_classes': cfg.num_classes, 'num_features': cfg.hidden_size, 'global_pool': pool,
         'model_args': args,
         'pretrained_cfg': {'input_size': [3, cfg.image_size, cfg.image_size], 'interpolation': 'bilinear',
                            'crop_pct': 1.0, 'crop_mode': 'center', 'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5],
                            'num_classes': cfg.num_classes, 'classifier': 'head'}}
    if labels:
        d['label_names'] = list(labels)
    return d


# timm's names (`get_act_layer`) of the GELU forms this model computes, and what it is given for each.
ACTIVATIONS = {'gelu': 'erf', 'gelu_tanh': 'tanh'}
WRITTEN_ACTIVATION = {'erf': 'gelu', 'tanh': 'gelu_tanh'}
NORMS = ('layernorm', 'layer_norm', 'LayerNorm')  # timm's LayerNorm, eps 1e-6 unless a partial says otherwise
DEFAULTS = Numerics('erf', 1e-6, "timm's ViT defaults: nn.GELU, LayerNorm eps 1e-6")


def numerics_from(d: Optional[object], where: str) -> Numerics:
    """The numerics timm builds a file's model with: its defaults, or what the hub config.json's `model_args` say
    (`d`, as read; None for none). Another activation or norm is refused by name."""
    args = d.get('model_args') if isinstance(d, dict) and isinstance(d.get('architecture'), str) else None
    if not isinstance(args, dict) or (args.get('act_layer') is None and args.get('norm_layer') is None):
        return DEFAULTS
    act, norm = args.get('act_layer'), args.get('norm_layer')
    if act is not None and act not in ACTIVATIONS:
        raise UserError(f'{where}: config.json model_args act_layer {act!r} is not a GELU this model computes '
                        f'({", ".join(ACTIVATIONS)}); pass --numerics official to run the official tanh GELU')
    if norm is not None and norm not in NORMS:
        raise UserError(f'{where}: config.json model_args norm_layer {norm!r} is not a LayerNorm; '
                        'pass --numerics official to run the official LayerNorm')
    said = ', '.join(f'{k} {v!r}' for k, v in (('act_layer', act), ('norm_layer', norm)) if v is not None)
    return Numerics(ACTIVATIONS.get(act, 'erf'), 1e-6, f'config.json model_args {said}')


def build_notes(cfg: ViTConfig) -> list[str]:
    """How timm must be told to build `cfg`'s function, where its defaults (nn.GELU, eps 1e-6) differ; [] if not."""
    args = []
    if cfg.gelu != 'erf':
        args.append(f"act_layer='{WRITTEN_ACTIVATION[cfg.gelu]}'")
    if cfg.layer_norm_eps != 1e-6:
        args.append(f'norm_layer=partial(LayerNorm, eps={format_eps(cfg.layer_norm_eps)})')
    return [f'note: timm builds ViTs with nn.GELU (erf) and LayerNorm eps 1e-6; this model computes '
            f'{cfg.gelu} GELU with eps {format_eps(cfg.layer_norm_eps)}: pass {", ".join(args)} to timm.create_model'] \
        if args else []


def zero_class_row(state: dict) -> dict:
    """`no_embed_class` files (position embeddings for the patches only) with a zero class-token row added."""
    pe = state.get('pos_embed')
    if pe is None or 'cls_token' not in state or pe.ndim != 3:
        return state
    n = pe.shape[1]
    if int(np.sqrt(n)) ** 2 == n:  # a square grid alone: no class-token row
        state = dict(state, pos_embed=np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1))
    return state


def expressible(cfg: ViTConfig) -> Optional[str]:
    """Why timm's VisionTransformer cannot hold `cfg`, or None."""
    if cfg.is_hybrid:
        return 'a hybrid here (its hybrids are ResNetV2 backbones of their own)'
    if cfg.representation_size is not None:
        return 'a pre_logits (representation) layer'
    if cfg.posemb != 'learn':
        return 'sincos2d position embeddings'
    return None


# How timm builds each classifier: (global_pool, class_token).
POOLS = {'token': ('token', True), 'gap': ('avg', False), 'unpooled': ('', False), 'token_unpooled': ('', True),
         'map': ('map', False), 'first': ('token', False), 'token_distilled': ('token', True)}
