"""Hugging Face transformers' ViT: a folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`).

`ViTForImageClassification` (names under `vit.`, the head `classifier`) and `ViTModel`
(no prefix, the tanh `pooler.dense`, which is the official `pre_logits`). Files on the
hub and what `save_pretrained` writes use the names of transformers 4 (`HUB`);
transformers 5 renamed the modules in memory (`V5`) and converts on load, so both are
read. The layouts are the PyTorch mirror's. `config.json` gives the shapes, the head
count, the class names (`id2label`) and the numerics transformers runs the folder with
(`numerics_from`: `hidden_act` and `layer_norm_eps`, transformers' defaults `gelu`, the
exact erf form, and 1e-12, which Google's hub configs also say); those run by default, and
`--numerics official` runs the official tanh GELU and 1e-6 instead. Written folders say
the config's numerics (`gelu_pytorch_tanh` and 1e-6 for the official ones), so
transformers itself computes the same function, and carry a `preprocessor_config.json`
with the official [-1, 1] input scaling.
"""

from __future__ import annotations

import os
from typing import Optional

from parity.core.config import Numerics, ViTConfig, format_eps, official_name_for, whole_number
from parity.core.errors import UserError
from parity.core.weights.formats.tables import Table

_B, _A = 'Transformer.encoderblock_{i}.', 'Transformer.encoderblock_{i}.MultiHeadDotProductAttention_0.'


def _rows(layer: str, names: dict) -> list:
    """The rows for one naming of a block's modules (`layer` holds {i})."""
    rows = [
        # ours (vit_torch state dict)                theirs
        ('cls',                                      'embeddings.cls_token'),
        ('Transformer.posembed_input.pos_embedding', 'embeddings.position_embeddings'),
        ('embedding.weight',                         'embeddings.patch_embeddings.projection.weight'),
        ('embedding.bias',                           'embeddings.patch_embeddings.projection.bias'),
        ('Transformer.encoder_norm.weight',          'layernorm.weight'),
        ('Transformer.encoder_norm.bias',            'layernorm.bias'),
        ('pre_logits.weight',                        'pooler.dense.weight'),
        ('pre_logits.bias',                          'pooler.dense.bias'),
        ('head.weight',                              'classifier.weight'),
        ('head.bias',                                'classifier.bias'),
    ]
    for ours, theirs in names.items():
        rows += [(ours + '.weight', layer + theirs + '.weight'), (ours + '.bias', layer + theirs + '.bias')]
    return rows


# Block i's modules: ours, then transformers' (the hub's and transformers 4's; transformers 5's in memory).
HUB = Table('Hugging Face', _rows('encoder.layer.{i}.', {
    _B + 'LayerNorm_0': 'layernorm_before', _A + 'query': 'attention.attention.query',
    _A + 'key': 'attention.attention.key', _A + 'value': 'attention.attention.value',
    _A + 'out': 'attention.output.dense', _B + 'LayerNorm_1': 'layernorm_after',
    _B + 'MlpBlock_0.Dense_0': 'intermediate.dense', _B + 'MlpBlock_0.Dense_1': 'output.dense'}))
V5 = Table('Hugging Face (transformers 5)', _rows('layers.{i}.', {
    _B + 'LayerNorm_0': 'layernorm_before', _A + 'query': 'attention.q_proj', _A + 'key': 'attention.k_proj',
    _A + 'value': 'attention.v_proj', _A + 'out': 'attention.o_proj', _B + 'LayerNorm_1': 'layernorm_after',
    _B + 'MlpBlock_0.Dense_0': 'mlp.fc1', _B + 'MlpBlock_0.Dense_1': 'mlp.fc2'}))
PREFIX = 'vit.'  # ViTForImageClassification's trunk; its head `classifier` sits outside it
SIGNATURE = 'embeddings.patch_embeddings.projection.weight'
WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
# transformers' `hidden_act` names of the GELU forms this model computes; what it writes for each.
ACTIVATIONS = {'gelu': 'erf', 'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu_fast': 'tanh'}
WRITTEN_ACTIVATION = {'erf': 'gelu', 'tanh': 'gelu_pytorch_tanh'}
DEFAULT_ACTIVATION, DEFAULT_LAYER_NORM_EPS = 'gelu', 1e-12  # transformers' ViTConfig defaults


def detect(keys) -> bool:
    return SIGNATURE in keys or PREFIX + SIGNATURE in keys


def strip_prefix(state: dict) -> dict:
    """A ViTForImageClassification state dict under ViTModel's names (the head keeps its own)."""
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def table_for(keys) -> Table:
    """The naming a state dict uses: the hub's (and transformers 4's), or transformers 5's."""
    return V5 if any(k.startswith(('layers.', 'vit.layers.')) for k in keys) else HUB


def check_config(d: Optional[object], folder: str, where: str) -> dict:
    """The config.json of transformers ViT folder `folder`, as read (None: the folder has none), checked to be one."""
    path = os.path.join(folder, 'config.json')
    if d is None:
        raise UserError(f'{where}: a Hugging Face folder needs its config.json (not found in {folder}); '
                        'pass the folder transformers wrote with save_pretrained')
    if not isinstance(d, dict):
        raise UserError(f'{path}: expected a JSON object (a transformers config)')
    if d.get('model_type') != 'vit':
        raise UserError(f'{path}: model_type {d.get("model_type")!r}, not a transformers ViT (model_type "vit")')
    return d


def config_from(d: dict, shapes: dict, where: str) -> ViTConfig:
    """The ViTConfig a transformers config.json describes; the head and pooler as the weights (`shapes`) hold them."""
    try:
        D = whole_number(d['hidden_size'], f'{where}: hidden_size')
        patch = whole_number(d.get('patch_size', 16), f'{where}: patch_size')
        pooled = 'pooler.dense.weight' in shapes
        classes = shapes['classifier.weight'][0] if 'classifier.weight' in shapes else 0
        if d.get('qkv_bias') is False:
            raise UserError(f'{where}: qkv_bias false: the official model has biases on queries, keys and values')
        cfg = ViTConfig(
            name=None, patch_size=(patch, patch), hidden_size=D,
            num_layers=whole_number(d['num_hidden_layers'], f'{where}: num_hidden_layers'),
            mlp_dim=whole_number(d['intermediate_size'], f'{where}: intermediate_size'),
            num_heads=whole_number(d['num_attention_heads'], f'{where}: num_attention_heads'),
            classifier='token',
            representation_size=shapes['pooler.dense.weight'][0] if pooled else None,
            num_classes=classes, image_size=whole_number(d.get('image_size', 224), f'{where}: image_size'))
        return cfg.replace(name=official_name_for(cfg))
    except KeyError as e:
        raise UserError(f'{where}: config.json has no {e.args[0]!r}; it is not a complete ViT config') from None


def labels_from(d: dict) -> Optional[list[str]]:
    """The class names of `id2label`, in logit order; None when they are transformers' LABEL_i placeholders."""
    id2label = d.get('id2label') or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (ValueError, TypeError):
        return None
    if not names or names == [f'LABEL_{i}' for i in range(len(names))]:
        return None
    return names


def numerics_from(d: dict, where: str) -> Numerics:
    """The numerics transformers runs a folder with: config.json's `hidden_act` and `layer_norm_eps`
    (transformers' defaults where it says nothing); another activation is refused by name (`where`: config.json)."""
    act, eps = d.get('hidden_act', DEFAULT_ACTIVATION), d.get('layer_norm_eps', DEFAULT_LAYER_NORM_EPS)
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise UserError(f'{where}: hidden_act {act!r} is not a GELU this model computes '
                        f'({", ".join(ACTIVATIONS)}); pass --numerics official to run the official tanh GELU')
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise UserError(f'{where}: layer_norm_eps {eps!r} is not a number in (0, 1); '
                        'pass --numerics official to run the official 1e-6')
    return Numerics(ACTIVATIONS[act], float(eps), f'config.json hidden_act {act!r}, layer_norm_eps {format_eps(eps)}')


def config_json(cfg: ViTConfig, labels: Optional[list[str]] = None) -> dict:
    """A transformers config.json for `cfg`, with its numerics (so transformers computes the same function)."""
    names = labels or [f'LABEL_{i}' for i in range(cfg.num_classes)]
    d = {
        'architectures': ['ViTForImageClassification' if cfg.num_classes else 'ViTModel'],
        'model_type': 'vit', 'hidden_size': cfg.hidden_size, 'num_hidden_layers': cfg.num_layers,
        'num_attention_heads': cfg.num_heads, 'intermediate_size': cfg.mlp_dim, 'image_size': cfg.image_size,
        'patch_size': cfg.patch_size[0], 'num_channels': 3, 'qkv_bias': True,
        'hidden_act': WRITTEN_ACTIVATION[cfg.gelu], 'layer_norm_eps': cfg.layer_norm_eps,
        'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0, 'encoder_stride': cfg.patch_size[0],
    }
    if cfg.num_classes:
        d['id2label'] = {str(i): n for i, n in enumerate(names)}
        d['label2id'] = {n: i for i, n in enumerate(names)}
    if cfg.representation_size is not None:
        d['pooler_output_size'], d['pooler_act'] = cfg.representation_size, 'tanh'
    return d


def preprocessor_json(cfg: ViTConfig) -> dict:
    """ViTImageProcessor settings that give the official input: bilinear resize, pixels to [-1, 1]."""
    return {'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
            'size': {'height': cfg.image_size, 'width': cfg.image_size}, 'resample': 2, 'do_rescale': True,
            'rescale_factor': 1 / 255, 'do_normalize': True, 'image_mean': [0.5, 0.5, 0.5],
            'image_std': [0.5, 0.5, 0.5]}


def expressible(cfg: ViTConfig) -> Optional[str]:
    """Why transformers' ViT cannot hold `cfg`, or None."""
    if cfg.is_hybrid:
        return 'a hybrid (ResNet stem)'
    if cfg.classifier != 'token' or cfg.posemb != 'learn':
        return f'the {cfg.classifier!r} classifier with {cfg.posemb} position embeddings (it has a class token ' \
               'and learned position embeddings only)'
    if cfg.representation_size is not None and cfg.num_classes:
        return 'a pre_logits (representation) layer below a head (ViTForImageClassification has no pooler)'
    if cfg.patch_size[0] != cfg.patch_size[1]:
        return 'non-square patches'
    return None
