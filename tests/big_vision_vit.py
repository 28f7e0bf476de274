"""A stand-in for big_vision's `vit.Model` and `utils.save_checkpoint`, which are not on PyPI.

Written here from what big_vision documents and does (`big_vision/models/vit.py`):
the module names it uses (flax's own `MultiHeadDotProductAttention`, `LayerNorm`,
`Dense`, auto-numbered), the position embeddings added *before* the class token is
prepended (`pos_embedding` at the top of the tree), the pool types `tok`, `gap`, `map`
(`MAPHead`), `0` and `none`, `rep_size`, `posemb='sincos2d'`, and `scan=True` (one
`encoderblock` whose leaves carry a leading depth axis). `save_checkpoint` writes the
flat '/'-joined tree with `np.savez`, names sorted, as big_vision's does. The tests build
checkpoints with it and hold our readers to its logits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    y, x = jnp.mgrid[:h, :w]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
    y = jnp.einsum('m,d->md', y.flatten(), omega)
    x = jnp.einsum('m,d->md', x.flatten(), omega)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


class MlpBlock(nn.Module):
    mlp_dim: Optional[int] = None

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = nn.gelu(nn.Dense(self.mlp_dim or 4 * d)(x))
        return nn.Dense(d)(x)


class Encoder1DBlock(nn.Module):
    mlp_dim: Optional[int] = None
    num_heads: int = 12

    @nn.compact
    def __call__(self, x, _=None):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y)
        y = nn.LayerNorm()(x)
        return x + MlpBlock(self.mlp_dim)(y), None


class Encoder(nn.Module):
    depth: int
    mlp_dim: Optional[int] = None
    num_heads: int = 12
    scan: bool = False

    @nn.compact
    def __call__(self, x):
        if self.scan:
            x, _ = nn.scan(Encoder1DBlock, variable_axes={'params': 0}, split_rngs={'params': True},
                           length=self.depth)(name='encoderblock', mlp_dim=self.mlp_dim, num_heads=self.num_heads)(x)
        else:
            for i in range(self.depth):
                x, _ = Encoder1DBlock(name=f'encoderblock_{i}', mlp_dim=self.mlp_dim, num_heads=self.num_heads)(x)
        return nn.LayerNorm(name='encoder_norm')(x)


class MAPHead(nn.Module):
    mlp_dim: Optional[int] = None
    num_heads: int = 12

    @nn.compact
    def __call__(self, x):
        n, _, d = x.shape
        probe = jnp.tile(self.param('probe', nn.initializers.xavier_uniform(), (1, 1, d)), [n, 1, 1])
        x = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(probe, x)
        y = nn.LayerNorm()(x)
        return (x + MlpBlock(self.mlp_dim)(y))[:, 0]


class Model(nn.Module):
    num_classes: Optional[int] = None
    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: Optional[int] = None
    num_heads: int = 12
    posemb: str = 'learn'
    rep_size: int | bool = False
    pool_type: str = 'gap'
    scan: bool = False

    @nn.compact
    def __call__(self, image):
        x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding='VALID', name='embedding')(image)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        if self.posemb == 'learn':
            x = x + self.param('pos_embedding', nn.initializers.normal(stddev=1 / np.sqrt(c)), (1, h * w, c))
        else:
            x = x + posemb_sincos_2d(h, w, c)
        if self.pool_type == 'tok':
            cls = self.param('cls', nn.initializers.normal(stddev=0.5), (1, 1, c))  # not zero: it must matter
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.scan, name='Transformer')(x)
        if self.pool_type == 'map':
            x = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim)(x)
        elif self.pool_type == 'gap':
            x = x.mean(axis=1)
        elif self.pool_type in ('0', 'tok'):
            x = x[:, 0]
        if self.rep_size:
            x = jnp.tanh(nn.Dense(self.width if self.rep_size is True else self.rep_size, name='pre_logits')(x))
        if self.num_classes:
            x = nn.Dense(self.num_classes, name='head', kernel_init=nn.initializers.normal(0.1))(x)
        return x


def init(model: Model, image_size: int, seed: int = 0) -> dict:
    """Random params of `model` (every leaf nonzero, head included), as a nested tree."""
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(variables['params'], sep='/')
    flat = {k: np.asarray(v) + rng.normal(0, 0.02, np.shape(v)).astype(np.float32) for k, v in flat.items()}
    return traverse_util.unflatten_dict(flat, sep='/')


def logits(model: Model, params: dict, x: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision('highest'):
        return np.asarray(model.apply({'params': params}, x))


def save_checkpoint(tree: dict, path, dtype=None) -> None:
    """big_vision's `utils.save_checkpoint`: `np.savez` of the flat '/'-joined tree, names sorted.

    `dtype` (e.g. ml_dtypes.bfloat16) casts every leaf first, as a bfloat16 run saves it.
    """
    flat = traverse_util.flatten_dict(tree, sep='/')
    np.savez(path, **{k: np.asarray(flat[k]) if dtype is None else np.asarray(flat[k]).astype(dtype)
                      for k in sorted(flat)})
