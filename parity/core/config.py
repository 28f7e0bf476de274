"""The model config: one frozen dataclass for both frameworks, and the official variants.

`ViTConfig` holds exactly what the official `VisionTransformer` is built from
(`vit_jax/configs/models.py` in google-research/vision_transformer), flattened, plus
the resolution the model is built at, plus what big_vision's ViT adds: the `map` and
`first` poolings and fixed `sincos2d` position embeddings. JSON files use the official
field layout (`hidden_size`, `patches.size`, `transformer.*`, `classifier`,
`representation_size`, `resnet.*`, `num_classes`, and `posemb` when it is not the
official `learn`), so a config of an official model drops into the official code.
`load_config` also reads big_vision's model config (the keyword arguments of its
`vit.Model`: `variant`, `pool_type`, `posemb`, `rep_size`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

from parity.core.errors import UserError, cause
from parity.core.files import read_json_object

# The official classifiers, then big_vision's multihead attention pooling and its first-token pooling, then
# DeiT's class and distillation tokens.
CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled', 'map', 'first', 'token_distilled')
OFFICIAL_CLASSIFIERS = CLASSIFIERS[:4]
POSEMBS = ('learn', 'sincos2d')  # learned (stored), or big_vision's fixed 2-D sine-cosine table (computed)
# The GELU forms: the official model's (flax's default, the tanh approximation), and the exact erf one that
# nn.GELU (timm) and transformers' `hidden_act: "gelu"` compute.
GELUS = ('tanh', 'erf')
OFFICIAL_GELU, OFFICIAL_LAYER_NORM_EPS = 'tanh', 1e-6


@dataclasses.dataclass(frozen=True)
class Numerics:
    """The GELU form and LayerNorm eps a model computes with, and where they came from (for messages)."""

    gelu: str
    layer_norm_eps: float
    source: str

    def describe(self) -> str:
        """`erf GELU, LayerNorm eps 1e-12 (config.json)`."""
        return f'{describe_numerics(self.gelu, self.layer_norm_eps)} ({self.source})'


OFFICIAL_NUMERICS = Numerics(OFFICIAL_GELU, OFFICIAL_LAYER_NORM_EPS, "the official model's")
NUMERICS_MODES = ('source', 'official')  # --numerics: what the file's library runs, or Google's official numerics


def describe_numerics(gelu: str, layer_norm_eps: float) -> str:
    return f'{gelu} GELU, LayerNorm eps {format_eps(layer_norm_eps)}'


def format_eps(eps: float) -> str:
    """An eps as people write it: 1e-6, 1e-12, 0.001."""
    return f'{eps:g}'.replace('e-0', 'e-')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of one Vision Transformer, framework-neutral.

    `resnet_num_layers` is None for a plain ViT; a tuple (possibly empty, the stem
    alone) makes it a hybrid whose ResNet feeds the patch embedding.
    `num_classes` 0 builds no head (the model returns pre-logits features).
    `classifier`: `token` (the class token), `gap` (mean of the tokens), `unpooled` and
    `token_unpooled` (every token), `map` (big_vision's multihead attention pooling: a
    learned probe attends over the tokens) or `first` (the first token, no class token:
    big_vision's `pool_type='0'`) or `token_distilled` (DeiT: a class token and a distillation
    token, each with its own head, their logits averaged in evaluation). `posemb`: `learn`, or
    `sincos2d` (computed for the patch grid, never stored; the class token gets no position embedding).
    """

    name: Optional[str]
    patch_size: tuple[int, int]
    hidden_size: int
    num_layers: int
    mlp_dim: int
    num_heads: int
    classifier: str = 'token'
    representation_size: Optional[int] = None
    resnet_num_layers: Optional[tuple[int, ...]] = None
    resnet_width_factor: float = 1.0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0  # drop-path of the last block's residual branches (training only)
    num_classes: int = 1000
    image_size: int = 224
    posemb: str = 'learn'
    gelu: str = OFFICIAL_GELU  # the MLPs' GELU (encoder blocks, MAP head): 'tanh' (official) or 'erf'
    layer_norm_eps: float = OFFICIAL_LAYER_NORM_EPS  # every LayerNorm's (the ResNet stem's GroupNorm keeps 1e-6)

    def __post_init__(self):
        where = f'config {self.name or "(unnamed)"}'
        if self.classifier not in CLASSIFIERS:
            raise UserError(f'{where}: classifier {self.classifier!r} is not one of {", ".join(CLASSIFIERS)}')
        if self.posemb not in POSEMBS:
            raise UserError(f'{where}: posemb {self.posemb!r} is not one of {", ".join(POSEMBS)}')
        if self.gelu not in GELUS:
            raise UserError(f'{where}: gelu {self.gelu!r} is not one of {", ".join(GELUS)}')
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise UserError(f'{where}: layer_norm_eps {eps!r} must be a number in (0, 1)')
        if self.posemb == 'sincos2d' and (self.hidden_size % 4 or self.hidden_size < 8):
            raise UserError(f'{where}: sincos2d position embeddings need a width of 8 or more, divisible by 4, '
                            f'not {self.hidden_size}')
        if min(self.patch_size) < 1 or min(self.hidden_size, self.num_layers, self.mlp_dim, self.num_heads) < 1:
            raise UserError(f'{where}: patch size, width, depth, MLP size and heads must be positive')
        if self.num_classes < 0 or (self.representation_size is not None and self.representation_size < 1):
            raise UserError(f'{where}: num_classes must be 0 or more and representation_size positive (or null)')
        if self.image_size < 1:
            raise UserError(f'{where}: image_size {self.image_size} must be positive')
        if self.hidden_size % self.num_heads:
            raise UserError(f'{where}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}')
        if self.resnet_num_layers is not None and (self.resnet_width < 32 or self.resnet_width % 32
                                                   or min(self.resnet_num_layers, default=1) < 1):
            raise UserError(f'{where}: ResNet width 64*{self.resnet_width_factor} = {self.resnet_width} '
                            'must be a positive multiple of 32 (GroupNorm uses 32 groups), and every stage '
                            'at least one unit')
        if self.has_dist_token and self.representation_size is not None:
            raise UserError(f'{where}: the token_distilled classifier has no representation layer (DeiT has none); '
                            'set representation_size to null')
        if not all(0 <= r < 1 for r in (self.dropout_rate, self.attention_dropout_rate,
                                         self.stochastic_depth_rate)):
            raise UserError(f'{where}: dropout and stochastic depth rates must lie in [0, 1)')

    # Derived quantities, so no caller recomputes them its own way.
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Each block's drop-path rate: 0 at the first, rising linearly to `stochastic_depth_rate` at the last
        (timm's and DeiT's `linspace(0, rate, depth)`)."""
        L = self.num_layers
        return tuple(self.stochastic_depth_rate * i / max(L - 1, 1) for i in range(L))

    @property
    def is_hybrid(self) -> bool:
        return self.resnet_num_layers is not None

    @property
    def resnet_width(self) -> int:
        return int(64 * self.resnet_width_factor)

    @property
    def stem_stride(self) -> int:
        """Downscaling before the patch embedding: root conv and max-pool, then one per later stage."""
        if not self.is_hybrid:
            return 1
        return 4 * 2 ** max(len(self.resnet_num_layers) - 1, 0)

    @property
    def has_cls_token(self) -> bool:
        return self.classifier in ('token', 'token_unpooled', 'token_distilled')

    @property
    def has_dist_token(self) -> bool:
        """DeiT's distillation token, after the class token, with its own head `head_dist`."""
        return self.classifier == 'token_distilled'

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, and DeiT's distillation token after it."""
        return int(self.has_cls_token) + int(self.has_dist_token)

    @property
    def numerics(self) -> Numerics:
        """The config's GELU form and LayerNorm eps (`source` says only whether they are the official ones)."""
        official = (self.gelu, self.layer_norm_eps) == (OFFICIAL_GELU, OFFICIAL_LAYER_NORM_EPS)
        return Numerics(self.gelu, self.layer_norm_eps, "the official model's" if official else 'the config')

    def with_numerics(self, numerics: Numerics) -> 'ViTConfig':
        return self.replace(gelu=numerics.gelu, layer_norm_eps=float(numerics.layer_norm_eps))

    @property
    def is_official(self) -> bool:
        """Whether the official model (and so its released npz layout) can express this config."""
        return self.classifier in OFFICIAL_CLASSIFIERS and self.posemb == 'learn'

    @property
    def fits_released_npz(self) -> bool:
        """The released npz layout can hold it: the official model, or DeiT's (its extra arrays under their names)."""
        return (self.is_official or self.has_dist_token) and self.posemb == 'learn'

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (h, w) at `image_size`; raises when the size does not divide."""
        return self.grid_for(self.image_size)

    def grid_for(self, image_size: int) -> tuple[int, int]:
        sh, sw = (self.stem_stride * p for p in self.patch_size)
        if image_size % sh or image_size % sw:
            raise UserError(f'image size {image_size} is not divisible by the effective patch size '
                            f'{sh}x{sw} of config {self.name or "(unnamed)"}; pick a multiple of it')
        return image_size // sh, image_size // sw

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_size
        return h * w + self.num_prefix_tokens

    def replace(self, **changes: Any) -> 'ViTConfig':
        return dataclasses.replace(self, **changes)

    def same_architecture(self, other: 'ViTConfig') -> bool:
        """True when both build the same trunk (heads and resolution aside)."""
        keys = ('patch_size', 'hidden_size', 'num_layers', 'mlp_dim', 'num_heads', 'classifier',
                'resnet_num_layers', 'resnet_width_factor', 'posemb')
        return all(getattr(self, k) == getattr(other, k) for k in keys)

    # The official JSON layout.
    def to_official_dict(self) -> dict:
        """The config as the official code's ConfigDict would print it; `posemb`, `gelu` and
        `layer_norm_eps` only when not the official values."""
        d = {
            'model_name': self.name,
            'hidden_size': self.hidden_size,
            'patches': {'size': list(self.patch_size)},
            'transformer': {
                'mlp_dim': self.mlp_dim,
                'num_heads': self.num_heads,
                'num_layers': self.num_layers,
                'attention_dropout_rate': self.attention_dropout_rate,
                'dropout_rate': self.dropout_rate,
            },
            'classifier': self.classifier,
            'representation_size': self.representation_size,
            'resnet': None if not self.is_hybrid else {
                'num_layers': list(self.resnet_num_layers),
                'width_factor': self.resnet_width_factor,
            },
            'num_classes': self.num_classes,
        }
        if self.stochastic_depth_rate:  # an extension: the official code has no stochastic depth
            d['transformer']['stochastic_depth_rate'] = self.stochastic_depth_rate
        if self.posemb != 'learn':
            d['posemb'] = self.posemb
        if self.gelu != OFFICIAL_GELU:
            d['gelu'] = self.gelu
        if self.layer_norm_eps != OFFICIAL_LAYER_NORM_EPS:
            d['layer_norm_eps'] = self.layer_norm_eps
        return d

    @classmethod
    def from_official_dict(cls, d: dict, where: str = 'config') -> 'ViTConfig':
        """Reads the official field layout; `image_size` is accepted as an extension."""
        try:
            t = d['transformer']
            resnet = d.get('resnet')
            patch = d['patches']['size']
            n = lambda v, k: whole_number(v, f'{where}: {k}')  # noqa: E731
            name = d.get('model_name') or d.get('name')
            return cls(
                name=None if name is None else str(name),
                patch_size=(n(patch[0], 'patches.size'), n(patch[1], 'patches.size')),
                hidden_size=n(d['hidden_size'], 'hidden_size'),
                num_layers=n(t['num_layers'], 'transformer.num_layers'),
                mlp_dim=n(t['mlp_dim'], 'transformer.mlp_dim'),
                num_heads=n(t['num_heads'], 'transformer.num_heads'),
                classifier=str(d.get('classifier', 'token')),
                representation_size=(None if d.get('representation_size') is None
                                     else n(d['representation_size'], 'representation_size')),
                resnet_num_layers=None if resnet is None else tuple(n(k, 'resnet.num_layers')
                                                                    for k in resnet['num_layers']),
                resnet_width_factor=1.0 if resnet is None else _finite_float(resnet.get('width_factor', 1),
                                                                             f'{where}: resnet.width_factor'),
                dropout_rate=_finite_float(t.get('dropout_rate', 0.0), f'{where}: dropout_rate'),
                attention_dropout_rate=_finite_float(t.get('attention_dropout_rate', 0.0),
                                                     f'{where}: attention_dropout_rate'),
                stochastic_depth_rate=_finite_float(t.get('stochastic_depth_rate', 0.0),
                                                    f'{where}: stochastic_depth_rate'),
                num_classes=n(d.get('num_classes') or 0, 'num_classes'),
                image_size=n(d.get('image_size', 224), 'image_size'),
                posemb=str(d.get('posemb', 'learn')),
                gelu=str(d.get('gelu', OFFICIAL_GELU)),
                layer_norm_eps=_finite_float(d.get('layer_norm_eps', OFFICIAL_LAYER_NORM_EPS),
                                             f'{where}: layer_norm_eps'),
            )
        except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f'{where}: not an official ViT config ({cause(e)}); '
                            'expected hidden_size, patches.size, transformer.{mlp_dim,num_heads,num_layers}') from None


def _v(name, patch, width, depth, mlp, heads, **kw) -> ViTConfig:
    return ViTConfig(name, (patch, patch), width, depth, mlp, heads, **kw)


_R = dict(patch=1)  # hybrids embed the ResNet output 1x1

# The official variant table (google-research/vision_transformer, configs/models.py).
# Columns: name, patch, width, depth, MLP, heads; counts at 224x224 with 1000 classes.
OFFICIAL_CONFIGS: dict[str, ViTConfig] = {c.name: c for c in (
    _v('testing', 16, 10, 1, 10, 2, dropout_rate=0.1),                              # 21K params
    _v('testing-unpooled', 16, 10, 1, 10, 2, dropout_rate=0.1, classifier='unpooled'),  # 21K params
    _v('ViT-Ti_16', 16, 192, 12, 768, 3),                                          # 5.7M params
    _v('ViT-S_16', 16, 384, 12, 1536, 6),                                          # 22M params
    _v('ViT-S_32', 32, 384, 12, 1536, 6),                                          # 23M params
    _v('ViT-B_8', 8, 768, 12, 3072, 12),                                           # 87M params
    _v('ViT-B_16', 16, 768, 12, 3072, 12),                                         # 86M params
    _v('ViT-B_32', 32, 768, 12, 3072, 12),                                         # 88M params
    _v('ViT-L_16', 16, 1024, 24, 4096, 16, dropout_rate=0.1),                      # 304M params
    _v('ViT-L_32', 32, 1024, 24, 4096, 16),                                        # 307M params
    _v('ViT-H_14', 14, 1280, 32, 5120, 16, dropout_rate=0.1),                      # 632M params
    _v('ViT-S_16-gap-norep', 16, 384, 12, 1536, 6, classifier='gap'),              # 22M params
    _v('ViT-B_16-gap-norep', 16, 768, 12, 3072, 12, classifier='gap'),             # 86M params
    _v('ViT-S_32-gap-norep', 32, 384, 12, 1536, 6, classifier='gap'),              # 23M params
    _v('ViT-B_32-gap-norep', 32, 768, 12, 3072, 12, classifier='gap'),             # 88M params
    # Hybrids: the ResNet root (stride 4) and stages (stride 2 after the first).
    _v('R+ViT-Ti_16', 8, 192, 12, 768, 3, resnet_num_layers=()),                   # 6.3M params
    _v('R50+ViT-B_16', 1, 768, 12, 3072, 12, resnet_num_layers=(3, 4, 9),
       dropout_rate=0.1),                                                          # 99M params
    _v('R26+ViT-B_32', 1, 768, 12, 3072, 12, resnet_num_layers=(2, 2, 2, 2)),      # 101M params
    _v('R26+ViT-S_32', 1, 384, 12, 1536, 6, resnet_num_layers=(2, 2, 2, 2)),       # 36M params
    _v('R50+ViT-L_32', 1, 1024, 24, 4096, 16, resnet_num_layers=(3, 4, 6, 3),
       dropout_rate=0.1),                                                          # 329M params
)}


# big_vision's variant names (`vit.decode_variant`, Table 2 of "Scaling Vision Transformers"):
# width, depth, MLP, heads. "B/16" adds the patch size.
BIG_VISION_VARIANTS = {
    'mu': (32, 1, 128, 2), 'Ti': (192, 12, 768, 3), 'S': (384, 12, 1536, 6), 'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12), 'L': (1024, 24, 4096, 16), 'So400m': (1152, 27, 4304, 16), 'H': (1280, 32, 5120, 16),
    'g': (1408, 40, 6144, 16), 'g-opt': (1536, 40, 6144, 16), 'G': (1664, 48, 8192, 16),
    'G-opt': (1536, 48, 8192, 16), 'e': (1792, 56, 15360, 16),
}
# big_vision's pool_type values and the classifier each one is.
BIG_VISION_POOLS = {'tok': 'token', 'gap': 'gap', 'map': 'map', '0': 'first', 'none': 'unpooled'}
# `vit_jax train --remat`: what each encoder block keeps for the backward pass (`vit_jax.fast.remat_block`).
REMAT_MODES = ('none', 'block', 'dots')
# big_vision's remat_policy (a name in jax.checkpoint_policies, or 'none') as the --remat that does the same or
# saves less: 'dots_saveable' keeps batched matmuls too, 'dots' here keeps the unbatched ones only.
BIG_VISION_REMAT = {'none': 'none', 'nothing_saveable': 'block', 'dots_with_no_batch_dims_saveable': 'dots',
                    'dots_saveable': 'dots'}
# Keys of big_vision's vit.Model that do not change the function it computes (remat_policy: `big_vision_remat`).
_BIG_VISION_OTHER = {'head_zeroinit', 'scan', 'remat_policy', 'dtype_mm', 'dropout'}
_BIG_VISION_KEYS = {'num_classes', 'variant', 'patch_size', 'width', 'depth', 'mlp_dim', 'num_heads', 'posemb',
                    'rep_size', 'pool_type', 'image_size'} | _BIG_VISION_OTHER


def from_big_vision_dict(d: dict, where: str = 'config') -> ViTConfig:
    """A big_vision `vit.Model` config (its keyword arguments, as JSON) as a ViTConfig.

    big_vision's defaults apply: `pool_type` 'gap', `posemb` 'learn', `mlp_dim` 4 x width,
    no representation layer, `num_classes` null (no head: the model returns its pooled
    features). `image_size` is accepted as an extension.
    """
    unknown = sorted(set(d) - _BIG_VISION_KEYS)
    if unknown:
        raise UserError(f'{where}: {", ".join(unknown)}: not keyword arguments of big_vision\'s vit.Model '
                        f'(expected {", ".join(sorted(_BIG_VISION_KEYS))})')
    _remat_of(d, where)
    try:
        arch = {}
        variant = d.get('variant')
        if variant is not None:
            v, _, patch = str(variant).partition('/')
            if v not in BIG_VISION_VARIANTS:
                raise UserError(f'{where}: variant {variant!r}: not one of big_vision\'s '
                                f'({", ".join(BIG_VISION_VARIANTS)}), optionally with /PATCH')
            arch = dict(zip(('width', 'depth', 'mlp_dim', 'num_heads'), BIG_VISION_VARIANTS[v]))
            if patch:
                arch['patch_size'] = (int(patch), int(patch))
        arch.update({k: d[k] for k in ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size') if d.get(k) is not None})
        width = whole_number(arch.get('width', 768), f'{where}: width')
        pool = d.get('pool_type', 'gap')
        if pool not in BIG_VISION_POOLS:
            raise UserError(f'{where}: pool_type {pool!r}: not one of {", ".join(BIG_VISION_POOLS)}')
        rep = d.get('rep_size', False)
        patch = arch.get('patch_size', (16, 16))
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return ViTConfig(
            name=None,
            patch_size=(whole_number(patch[0], f'{where}: patch_size'), whole_number(patch[1], f'{where}: patch_size')),
            hidden_size=width, num_layers=whole_number(arch.get('depth', 12), f'{where}: depth'),
            mlp_dim=whole_number(arch.get('mlp_dim', 4 * width), f'{where}: mlp_dim'),
            num_heads=whole_number(arch.get('num_heads', 12), f'{where}: num_heads'),
            classifier=BIG_VISION_POOLS[pool],
            representation_size=None if rep is False or rep is None or rep == 0 else
            width if rep is True else whole_number(rep, f'{where}: rep_size'),
            num_classes=whole_number(d.get('num_classes') or 0, f'{where}: num_classes'),
            image_size=whole_number(d.get('image_size', 224), f'{where}: image_size'),
            posemb=d.get('posemb', 'learn'))
    except (TypeError, ValueError, IndexError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f'{where}: not a big_vision ViT config ({cause(e)})') from None


def _remat_of(d: dict, where: str) -> str:
    """The --remat of a big_vision config's remat_policy (absent or null: none); an unknown name is one error."""
    policy = d.get('remat_policy')
    if policy is None:
        return 'none'
    if not isinstance(policy, str) or policy not in BIG_VISION_REMAT:
        raise UserError(f'{where}: remat_policy {policy!r}: expected one of {", ".join(BIG_VISION_REMAT)}')
    return BIG_VISION_REMAT[policy]


def big_vision_remat(name_or_path: str) -> Optional[str]:
    """The --remat a big_vision config file asks for with its remat_policy; None for any other config, or one
    that does not say. A training setting, not architecture: the ViTConfig does not hold it."""
    if name_or_path in OFFICIAL_CONFIGS or not os.path.isfile(name_or_path):
        return None
    d = read_json_object(name_or_path, f'--config {name_or_path}', 'a JSON object in the official config layout')
    if 'hidden_size' in d or 'remat_policy' not in d:
        return None
    return _remat_of(d, f'--config {name_or_path}')


def _finite_float(value, where: str) -> float:
    """`value` as a finite float, refusing what is not a number (a string, a bool, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f'{where} {value!r}: expected a number')
    return float(value)


def whole_number(value, where: str) -> int:
    """`value` as an int, refusing what is not one (a bool, 64.7, "12", infinity)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or int(value) != value:
        raise UserError(f'{where} {value!r}: expected a whole number')
    return int(value)


def load_config(name_or_path: str) -> ViTConfig:
    """An official config by name, or a JSON file: the official field layout, or big_vision's model config."""
    if name_or_path in OFFICIAL_CONFIGS:
        return OFFICIAL_CONFIGS[name_or_path]
    if not (name_or_path.endswith('.json') or os.path.exists(name_or_path)):
        raise UserError(f'--config {name_or_path!r}: not an official config name nor a JSON file; '
                        f'names are: {", ".join(OFFICIAL_CONFIGS)}')
    d = read_json_object(name_or_path, f'--config {name_or_path}', 'a JSON object in the official config layout')
    if 'hidden_size' not in d and set(d) & {'variant', 'width', 'pool_type', 'depth'}:
        return from_big_vision_dict(d, where=f'--config {name_or_path}')
    return ViTConfig.from_official_dict(d, where=f'--config {name_or_path}')


def official_name_for(config: ViTConfig) -> Optional[str]:
    """The official variant with the same trunk as `config`, if any."""
    for name, c in OFFICIAL_CONFIGS.items():
        if c.same_architecture(config):
            return name
    return None


def heads_for_width(width: int) -> Optional[int]:
    """Heads of the official variants of this width (all agree), or None."""
    heads = {c.num_heads for c in OFFICIAL_CONFIGS.values() if c.hidden_size == width}
    return heads.pop() if len(heads) == 1 else None


def is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n
