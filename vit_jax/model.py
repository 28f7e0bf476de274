"""Vision Transformer in Flax linen, parameter for parameter the official model.

The parameter tree is the official one (google-research/vision_transformer), so
released checkpoints drop in once `parity.weights` has put them in canonical form.
`vit_torch/model.py` mirrors this file class for class; read them side by side.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M MLP size,
h x w the patch grid, C channels. Images are NHWC in [-1, 1].

Named intermediates (see `parity.intermediates`) are sown into the 'intermediates'
collection, and attention weights into 'attention'; sowing costs nothing unless the
caller makes that collection mutable.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from parity.config import ViTConfig

Dtype = Any


class Module(nn.Module):
    """`nn.Module` whose `sow` records nothing during `init`, so variables hold parameters only."""

    def sow(self, collection: str, name: str, value) -> None:
        if not self.is_initializing():
            super().sow(collection, name, value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_in_order(x, w, precision):
    """x (M, K) @ w (K, F), whose backward computes dw before dx, never both at once."""
    return jnp.matmul(x, w, precision=precision)


def _matmul_in_order_fwd(x, w, precision):
    return _matmul_in_order(x, w, precision), (x, w)


def _matmul_in_order_bwd(precision, residuals, g):
    x, w = residuals
    dw = jnp.matmul(x.T, g, precision=precision)  # (K, F)
    # The barrier makes dx wait for dw: left independent, XLA:CPU runs the two side by side.
    dw, g = jax.lax.optimization_barrier((dw, g))
    return jnp.matmul(g, w.T, precision=precision), dw  # (M, K), (K, F)


_matmul_in_order.defvjp(_matmul_in_order_fwd, _matmul_in_order_bwd)


def dot_general_in_order(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for dense layers on the CPU fast path: the same product, a faster backward.

    XLA:CPU runs independent operations concurrently, so the two matmuls of a dense layer's
    backward (the input gradient and the kernel gradient, each from a different matmul library)
    share the cores and take 1.6x as long as the one after the other (ViT-Ti/16's MLP on 2
    cores). This orders them. It serves dense layers (the trailing axes of `lhs` contracted
    with the leading axes of `rhs`, no batch axes); any other product goes to `lax.dot_general`.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    if (lhs_batch or rhs_batch or preferred_element_type is not None
            or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rhs_contract) != tuple(range(n))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    K = math.prod(rhs.shape[:n])
    y = _matmul_in_order(lhs.reshape(-1, K), rhs.reshape(K, -1), precision)  # (M, F)
    return y.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


def cpu_fast_path(fast: bool) -> bool:
    """Whether the fast path runs on XLA:CPU, where it also orders dense backwards and embeds patches by matmul."""
    return fast and jax.default_backend() == 'cpu'


def fast_dot_general(fast: bool):
    """The dense layers' matmul: `dot_general_in_order` on the CPU fast path, else None (`lax.dot_general`)."""
    return dot_general_in_order if cpu_fast_path(fast) else None


class MlpBlock(Module):
    """Dense, tanh-approximate GELU, Dense, with dropout after each.

    `dot_general` is the dense layers' matmul (None: `lax.dot_general`; the fast path passes
    `dot_general_in_order` on the CPU).
    """

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    dot_general: Any = None

    @nn.compact
    def __call__(self, x, *, deterministic):
        B, N, D = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                                  bias_init=nn.initializers.normal(stddev=1e-6), dot_general=self.dot_general)
        x = dense(self.mlp_dim, name='Dense_0')(x)  # (B, N, M)
        x = nn.gelu(x, approximate=True)  # the official model's GELU is flax's default, the tanh form
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(D, name='Dense_1')(x)  # (B, N, D)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class Attention(Module):
    """Multi-head self-attention with the parameters of flax's MultiHeadDotProductAttention.

    By hand by default. `use_sdpa` is the fast path: q, k and v from one matmul (the
    three kernels concatenated on the fly, so the parameters keep the official layout)
    and `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU in half precision);
    on the CPU, `fused_cpu`. It takes the by-hand path where it cannot serve: during
    `init` (which creates the parameters), when the caller records attention weights (a
    fused kernel never forms them), and under attention dropout in training (the fused
    call has none).
    """

    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    use_sdpa: bool = False

    @nn.compact
    def __call__(self, x, *, deterministic):
        B, N, D = x.shape
        H = self.num_heads
        Dh = D // H
        if (self.use_sdpa and not self.is_initializing() and not self.is_mutable_collection('attention')
                and (deterministic or not self.dropout_rate)):
            y = self.fused(x)  # (B, N, H, Dh)
        else:
            proj = functools.partial(nn.DenseGeneral, features=(H, Dh), dtype=self.dtype,
                                     kernel_init=nn.initializers.xavier_uniform())
            q = proj(name='query')(x)  # (B, N, H, Dh)
            k = proj(name='key')(x)  # (B, N, H, Dh)
            v = proj(name='value')(x)  # (B, N, H, Dh)
            # Scale the queries rather than the logits, as flax does: same rounding as the official model.
            q = q / jnp.sqrt(Dh).astype(q.dtype)
            logits = jnp.einsum('bqhd,bkhd->bhqk', q, k)  # (B, H, N, N)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)  # (B, H, N, N)
            self.sow('attention', 'attention', weights)
            weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=deterministic)
            y = jnp.einsum('bhqk,bkhd->bqhd', weights, v)  # (B, N, H, Dh)
        return nn.DenseGeneral(features=D, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                               dot_general=fast_dot_general(self.use_sdpa), name='out')(y)  # (B, N, D)

    def fused(self, x):
        """The fast path's attention output (B, N, H, Dh), from the existing query/key/value parameters."""
        p = self.variables['params']
        if jax.default_backend() == 'cpu':
            return self.fused_cpu(x, p)
        B, N, D = x.shape
        H = self.num_heads
        Dh = D // H
        w = jnp.concatenate([p[n]['kernel'].reshape(D, D) for n in ('query', 'key', 'value')], axis=1)  # (D, 3D)
        b = jnp.concatenate([p[n]['bias'].reshape(D) for n in ('query', 'key', 'value')])  # (3D,)
        x, w, b = nn.dtypes.promote_dtype(x, w, b, dtype=self.dtype)
        qkv = (x @ w + b).reshape(B, N, 3, H, Dh)  # (B, N, 3, H, Dh)
        half = jnp.dtype(self.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                            implementation='cudnn' if half and jax.default_backend() == 'gpu'
                                            else None)  # (B, N, H, Dh)

    def fused_cpu(self, x, p):
        """The fast path on XLA:CPU, which has no fused attention kernel: the formulation it runs fastest.

        The heads lead (XLA:CPU runs the einsums of `dot_product_attention`, heads inside,
        a third slower), q, k and v come from three matmuls (concatenating the kernels
        costs more there than it saves), and the softmax is normalised after the product
        with v, on (B, H, N, Dh) rather than on the (B, H, N, N) weights, as flash
        attention does.
        """
        B, N, D = x.shape
        H = self.num_heads
        Dh = D // H
        (x,) = nn.dtypes.promote_dtype(x, dtype=self.dtype)

        def heads(name):
            w, b = nn.dtypes.promote_dtype(p[name]['kernel'].reshape(D, D), p[name]['bias'].reshape(D),
                                           dtype=self.dtype)
            y = dot_general_in_order(x, w, (((2,), (0,)), ((), ()))) + b  # (B, N, D)
            return y.reshape(B, N, H, Dh).transpose(0, 2, 1, 3)  # (B, H, N, Dh)

        q, k, v = heads('query'), heads('key'), heads('value')
        logits = ((q / jnp.sqrt(Dh).astype(q.dtype)) @ k.swapaxes(-1, -2)).astype(jnp.float32)  # (B, H, N, N)
        # Subtracting the row maximum only guards exp against overflow; no gradient flows through it.
        e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))  # (B, H, N, N)
        y = (e.astype(self.dtype) @ v) / e.sum(-1, keepdims=True).astype(self.dtype)  # (B, H, N, Dh)
        return y.transpose(0, 2, 1, 3)  # (B, N, H, Dh)


class EncoderBlock(Module):
    """Pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    use_sdpa: bool = False

    @nn.compact
    def __call__(self, x, *, deterministic):
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_0')(x)
        y = Attention(num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                      use_sdpa=self.use_sdpa, name='MultiHeadDotProductAttention_0')(y, deterministic=deterministic)
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        x = x + y
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='LayerNorm_1')(x)
        y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate, dtype=self.dtype,
                     dot_general=fast_dot_general(self.use_sdpa), name='MlpBlock_0')(y, deterministic=deterministic)
        x = x + y
        self.sow('intermediates', 'output', x)
        return x


class AddPositionEmbs(Module):
    """Adds one learned embedding per token position."""

    @nn.compact
    def __call__(self, x):
        B, N, D = x.shape
        pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, N, D))
        return x + pe.astype(x.dtype)


class Encoder(Module):
    """Position embeddings, `num_layers` blocks, final LayerNorm."""

    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    use_sdpa: bool = False

    @nn.compact
    def __call__(self, x, *, train):
        x = AddPositionEmbs(name='posembed_input')(x)
        self.sow('intermediates', 'with_posemb', x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        for i in range(self.num_layers):
            x = EncoderBlock(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
                             attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype,
                             use_sdpa=self.use_sdpa, name=f'encoderblock_{i}')(x, deterministic=not train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='encoder_norm')(x)
        self.sow('intermediates', 'encoded', x)
        return x


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
    `use_sdpa` switches to the fast path: attention (see `Attention`) and, on the CPU, the
    dense layers' ordered backward (`dot_general_in_order`) and the patch matmul (`embed_patches`).
    """

    config: ViTConfig
    dtype: Dtype = jnp.float32
    use_sdpa: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False):
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
        embedding = nn.Conv(cfg.hidden_size, cfg.patch_size, strides=cfg.patch_size, padding='VALID', dtype=self.dtype,
                            name='embedding')
        if cpu_fast_path(self.use_sdpa) and not self.is_initializing():
            x = self.embed_patches(x, self.variables['params']['embedding'])  # (B, h, w, D)
        else:
            x = embedding(x)  # (B, h, w, D)
        B, h, w, D = x.shape
        x = x.reshape(B, h * w, D)  # (B, N, D)
        self.sow('intermediates', 'patch_tokens', x)
        if cfg.has_cls_token:
            cls = self.param('cls', nn.initializers.zeros, (1, 1, D))
            x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (B, 1, 1)), x], axis=1)  # (B, N, D)
        x = Encoder(cfg.num_layers, cfg.mlp_dim, cfg.num_heads, cfg.dropout_rate, cfg.attention_dropout_rate,
                    self.dtype, self.use_sdpa, name='Transformer')(x, train=train)
        if cfg.classifier == 'token':
            x = x[:, 0]  # (B, D)
        elif cfg.classifier == 'gap':
            x = x.mean(axis=1)  # (B, D)
        if cfg.representation_size is not None:
            x = jnp.tanh(nn.Dense(cfg.representation_size, dtype=self.dtype, name='pre_logits')(x))
        self.sow('intermediates', 'features', x)
        if cfg.num_classes:
            x = nn.Dense(cfg.num_classes, kernel_init=nn.initializers.zeros, name='head')(x.astype(jnp.float32))
        self.sow('intermediates', 'logits', x)
        return x

    def embed_patches(self, x, p):
        """The patch embedding on the CPU fast path: the same product as the strided convolution, as a matmul.

        A convolution whose stride is its kernel size (VALID) multiplies each patch, flattened
        in (row, column, channel) order as the HWIO kernel is, by the kernel. XLA:CPU runs
        the convolution and its kernel gradient half as fast as this matmul.
        """
        B, S1, S2, C = x.shape
        ph, pw = self.config.patch_size
        h, w = S1 // ph, S2 // pw
        x, k, b = nn.dtypes.promote_dtype(x[:, :h * ph, :w * pw], p['kernel'], p['bias'], dtype=self.dtype)
        x = x.reshape(B, h, ph, w, pw, C).transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, ph, pw, C)
        return dot_general_in_order(x, k, (((3, 4, 5), (0, 1, 2)), ((), ()))) + b  # (B, h, w, D)
