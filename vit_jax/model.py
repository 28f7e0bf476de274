"""Vision Transformer in Flax linen, parameter for parameter the official model.

The parameter tree is the official one (google-research/vision_transformer), so
released checkpoints drop in once `parity.core.weights` has put them in canonical form.
`vit_torch/model.py` mirrors this file class for class; read them side by side.

Shapes: B batch, N tokens, Q query tokens (N in self-attention), D width, H heads,
Dh = D // H, M MLP size, h x w the patch grid, C channels. Images are NHWC in [-1, 1].

Named intermediates (see `parity.core.intermediates`) are sown into the 'intermediates'
collection, and attention weights into 'attention'; sowing costs nothing unless the
caller makes that collection mutable.

`fast=True` takes the fast path where it serves: the same function from the same
parameters, with the kernels of `vit_jax.fast`. This file chooses it in one place per
layer (the attention, the dense layers, the patch embedding); what is written here is
the teaching path.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from parity.core import posemb
from parity.core.config import ViTConfig
from vit_jax import fast as fast_path

Dtype = Any


class Module(nn.Module):
    """`nn.Module` whose `sow` records nothing during `init`, so variables hold parameters only."""

    def sow(self, collection: str, name: str, value) -> None:
        if not self.is_initializing():
            super().sow(collection, name, value)


class MlpBlock(Module):
    """Dense, GELU, Dense, with dropout after each; the official GELU is the tanh approximation."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    fast: bool = False
    gelu: str = 'tanh'  # 'erf' for files whose library computes the exact GELU (timm, transformers' "gelu")

    @nn.compact
    def __call__(self, x, *, deterministic):
        B, N, D = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                                  bias_init=nn.initializers.normal(stddev=1e-6),
                                  dot_general=fast_path.dot_general(self.fast))
        x = dense(self.mlp_dim, name='Dense_0')(x)  # (B, N, M)
        x = nn.gelu(x, approximate=self.gelu == 'tanh')  # the official model's is flax's default, the tanh form
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(D, name='Dense_1')(x)  # (B, N, D)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class Attention(Module):
    """Multi-head attention with the parameters of flax's MultiHeadDotProductAttention.

    By hand, as the paper writes it; `fast` takes `vit_jax.fast.attention` where it can serve.
    Self-attention unless `kv` is given: then the queries come from `x`, keys and values from
    `kv` (the MAP head's probe attending over the tokens).
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    fast: bool = False

    @nn.compact
    def __call__(self, x, kv=None, *, deterministic):
        if self.fast and kv is None and fast_path.serves_attention(self, deterministic):
            return fast_path.attention(self, x)  # (B, N, D)
        kv = x if kv is None else kv
        B, Q, D = x.shape
        H = self.num_heads
        Dh = D // H
        proj = functools.partial(nn.DenseGeneral, features=(H, Dh), dtype=self.dtype,
                                 kernel_init=nn.initializers.xavier_uniform())
        q = proj(name='query')(x)  # (B, Q, H, Dh)
        k = proj(name='key')(kv)  # (B, N, H, Dh)
        v = proj(name='value')(kv)  # (B, N, H, Dh)
        # Scale the queries rather than the logits, as flax does: same rounding as the official model.
        q = q / jnp.sqrt(Dh).astype(q.dtype)
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)  # (B, H, Q, N)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)  # (B, H, Q, N)
        self.sow('attention', 'attention', weights)
        weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=deterministic)
        y = jnp.einsum('bhqk,bkhd->bqhd', weights, v)  # (B, Q, H, Dh)
        return nn.DenseGeneral(features=D, axis=(-2, -1), dtype=self.dtype,
                               kernel_init=nn.initializers.xavier_uniform(), name='out')(y)  # (B, Q, D)


class DropPath(Module):
    """Stochastic depth: drops a residual branch for a whole example with probability `rate`.

    The kept examples' branches are scaled by 1 / (1 - rate), so the expected sum is
    unchanged and evaluation (or rate 0) is the identity, as in timm and DeiT.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, deterministic):
        if deterministic or self.rate == 0.0:
            return x
        B, N, D = x.shape
        keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.rate, (B, 1, 1))  # one draw per example
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class EncoderBlock(Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    fast: bool = False
    gelu: str = 'tanh'
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, *, deterministic):
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='LayerNorm_0')(x)
        y = Attention(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                      fast=self.fast, name='MultiHeadDotProductAttention_0')(y, deterministic=deterministic)
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        x = x + DropPath(self.drop_path_rate, name='DropPath_0')(y, deterministic=deterministic)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='LayerNorm_1')(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype, fast=self.fast,
                     gelu=self.gelu, name='MlpBlock_0')(y, deterministic=deterministic)
        x = x + DropPath(self.drop_path_rate, name='DropPath_1')(y, deterministic=deterministic)
        self.sow('intermediates', 'output', x)
        return x


class AddPositionEmbs(Module):
    """Adds one embedding per token position: learned, or big_vision's fixed sincos2d table for `grid`."""

    posemb: str = 'learn'
    grid: tuple[int, int] = (0, 0)  # the patch grid (h, w), which the sincos2d table is computed for

    @nn.compact
    def __call__(self, x):
        B, N, D = x.shape
        if self.posemb == 'sincos2d':  # the class token, first, gets a zero row: no position
            pe = jnp.asarray(posemb.sincos_2d(self.grid, D, N - self.grid[0] * self.grid[1]))  # (1, N, D)
        else:
            pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, N, D))
        return x + pe.astype(x.dtype)


class Encoder(Module):
    """Position embeddings, `num_layers` blocks, final LayerNorm."""

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rates: tuple[float, ...] = ()  # one per block (`ViTConfig.drop_path_rates`); empty: none
    dtype: Dtype = jnp.float32
    fast: bool = False
    posemb: str = 'learn'
    grid: tuple[int, int] = (0, 0)
    gelu: str = 'tanh'
    layer_norm_eps: float = 1e-6
    remat: str = 'none'  # recompute each block in the backward pass: `vit_jax.fast.remat_block`

    @nn.compact
    def __call__(self, x, *, train):
        block = fast_path.remat_block(EncoderBlock, self.remat)
        x = AddPositionEmbs(self.posemb, self.grid, name='posembed_input')(x)
        self.sow('intermediates', 'with_posemb', x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        for i in range(self.num_layers):
            x = block(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                      attention_dropout_rate=self.attention_dropout_rate,
                      drop_path_rate=self.drop_path_rates[i] if self.drop_path_rates else 0.0,
                      dtype=self.dtype, fast=self.fast, gelu=self.gelu, layer_norm_eps=self.layer_norm_eps,
                      name=f'encoderblock_{i}')(x, deterministic=not train)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='encoder_norm')(x)
        self.sow('intermediates', 'encoded', x)
        return x


class MAPHead(Module):
    """Multihead attention pooling, as big_vision's MAPHead: a learned probe attends over the tokens.

    The attention's output gets an MLP with a residual; the LayerNorm eps and GELU are the
    trunk's (1e-6 and tanh in the official numerics).
    """

    mlp_dim: int
    num_heads: int
    dtype: Dtype = jnp.float32
    gelu: str = 'tanh'
    layer_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        B, N, D = x.shape
        probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, D))
        probe = jnp.tile(probe.astype(x.dtype), (B, 1, 1))  # (B, 1, D)
        x = Attention(num_heads=self.num_heads, dtype=self.dtype,
                      name='MultiHeadDotProductAttention_0')(probe, x, deterministic=True)  # (B, 1, D)
        y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='LayerNorm_0')(x)
        mlp = MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, gelu=self.gelu, name='MlpBlock_0')
        x = x + mlp(y, deterministic=True)
        return x[:, 0]  # (B, D)


class StdConv(Module):
    """Convolution with weight standardisation, TF `SAME` padding, no bias."""

    features: int
    kernel_size: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, h, w, C = x.shape
        k = self.param('kernel', nn.initializers.lecun_normal(),
                       (self.kernel_size, self.kernel_size, C, self.features))
        # Standardise over (kh, kw, in) per output channel; eps added to the std, not the variance.
        k = (k - k.mean(axis=(0, 1, 2))) / (k.std(axis=(0, 1, 2)) + 1e-5)
        return jax.lax.conv_general_dilated(
            x, k.astype(self.dtype), (self.strides, self.strides), 'SAME',
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class ResidualUnit(Module):
    """Post-activation bottleneck: 1x1, 3x3 (strided), 1x1, each GroupNorm'd; projected residual."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(StdConv, dtype=self.dtype)
        norm = functools.partial(nn.GroupNorm, num_groups=32, epsilon=1e-6, dtype=self.dtype)
        residual = x
        if x.shape[-1] != self.features * 4 or self.strides != 1:
            residual = conv(self.features * 4, 1, self.strides, name='conv_proj')(x)
            residual = norm(name='gn_proj')(residual)
        y = nn.relu(norm(name='gn1')(conv(self.features, 1, name='conv1')(x)))
        y = nn.relu(norm(name='gn2')(conv(self.features, 3, self.strides, name='conv2')(y)))
        # A zero scale starts each unit as the identity.
        y = norm(name='gn3', scale_init=nn.initializers.zeros)(conv(self.features * 4, 1, name='conv3')(y))
        return nn.relu(residual + y)


class ResNetStage(Module):
    """`block_size` residual units; the first may stride."""

    block_size: int
    nout: int
    first_stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResidualUnit(self.nout, self.first_stride, self.dtype, name='unit1')(x)
        for i in range(1, self.block_size):
            x = ResidualUnit(self.nout, 1, self.dtype, name=f'unit{i + 1}')(x)
        return x


class VisionTransformer(Module):
    """The official ViT (and R+ViT hybrid) for one `ViTConfig`.

    `dtype` is the compute dtype (bfloat16 for speed); parameters stay float32 and the
    head runs in float32. Call with `train=True` (and a 'dropout' rng) to enable dropout.
    `fast` takes the fast path (`vit_jax.fast`): fused attention, and on the CPU the dense
    layers' ordered backward and the patch embedding as a matmul. With the `token_distilled`
    classifier (DeiT) the class and distillation heads' logits are averaged, or with
    `both_heads=True` returned as a pair (class head, distillation head) for training.
    """

    config: ViTConfig
    dtype: Dtype = jnp.float32
    fast: bool = False
    remat: str = 'none'  # 'block' or 'dots': each encoder block recomputed in the backward (`vit_jax.fast`)

    @nn.compact
    def __call__(self, images, *, train: bool = False, both_heads: bool = False):
        cfg = self.config
        x = images.astype(self.dtype)  # (B, h, w, 3)
        if cfg.is_hybrid:
            W = cfg.resnet_width
            x = StdConv(W, 7, 2, self.dtype, name='conv_root')(x)  # (B, h/2, w/2, W)
            x = nn.relu(nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=self.dtype, name='gn_root')(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')  # (B, h/4, w/4, W)
            for i, units in enumerate(cfg.resnet_num_layers):
                x = ResNetStage(units, W * 2 ** i, 1 if i == 0 else 2, self.dtype, name=f'block{i + 1}')(x)
            self.sow('intermediates', 'stem', x)
        if self.fast and fast_path.serves_embedding(self):
            x = fast_path.embed_patches(x, self.variables['params']['embedding'], cfg.patch_size, self.dtype)
        else:
            x = nn.Conv(cfg.hidden_size, cfg.patch_size, strides=cfg.patch_size, padding='VALID', dtype=self.dtype,
                        name='embedding')(x)  # (B, h, w, D)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # (B, N, D)
        self.sow('intermediates', 'patch_tokens', x)
        if cfg.has_dist_token:  # DeiT's distillation token goes after the class token
            dist = self.param('dist_token', nn.initializers.normal(stddev=0.02), (1, 1, D))
            x = jnp.concatenate([jnp.tile(dist.astype(x.dtype), (B, 1, 1)), x], axis=1)  # (B, N, D)
        if cfg.has_cls_token:
            cls = self.param('cls', nn.initializers.zeros, (1, 1, D))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (B, 1, 1)), x], axis=1)  # (B, N, D)
        x = Encoder(cfg.num_layers, cfg.mlp_dim, cfg.num_heads, cfg.dropout_rate, cfg.attention_dropout_rate,
                    cfg.drop_path_rates, self.dtype, self.fast, cfg.posemb, (h, w), cfg.gelu, cfg.layer_norm_eps,
                    self.remat, name='Transformer')(x, train=train)
        if cfg.has_dist_token:
            x, x_dist = x[:, 0], x[:, 1]  # (B, D) each
        elif cfg.classifier in ('token', 'first'):
            x = x[:, 0]  # (B, D)
        elif cfg.classifier == 'gap':
            x = x.mean(axis=1)  # (B, D)
        elif cfg.classifier == 'map':
            x = MAPHead(cfg.mlp_dim, cfg.num_heads, self.dtype, cfg.gelu, cfg.layer_norm_eps,
                        name='MAPHead_0')(x)  # (B, D)
        if cfg.representation_size is not None:
            x = jnp.tanh(nn.Dense(cfg.representation_size, dtype=self.dtype, name='pre_logits')(x))
        self.sow('intermediates', 'features', x)
        if cfg.num_classes:
            x = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros, name='head')(x.astype(jnp.float32))
            if cfg.has_dist_token:
                x_dist = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros,
                                  name='head_dist')(x_dist.astype(jnp.float32))
                if both_heads:
                    return x, x_dist
                x = (x + x_dist) / 2  # DeiT's inference: the mean of the two heads
        self.sow('intermediates', 'logits', x)
        return x
