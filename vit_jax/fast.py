"""The fast path of `vit_jax.model`: the same function from the same parameters, faster kernels.

`VisionTransformer(cfg, fast=True)` takes it. `model.py` chooses it in one place per
layer and stays the teaching path; the kernels live here:

- attention (`attention`), where it can serve (`serves_attention`): on GPUs and TPUs, q,
  k and v from one matmul (the three kernels concatenated on the fly, so the parameters
  keep the official layout) and `jax.nn.dot_product_attention` (cuDNN's fused kernel on
  a GPU in half precision). XLA:CPU has no fused attention kernel, so on the CPU it is
  the formulation XLA:CPU runs fastest (`attention_cpu`).
- dense layers on the CPU (`dot_general`): the backward computes the kernel gradient
  before the input gradient (`dot_general_in_order`).
- the patch embedding on the CPU (`embed_patches`): the strided convolution as a matmul.

Each is proven equal to the teaching path, forward and gradients, in
`tests/test_fast_paths.py`; `README.md` ("Speed and memory") has the measurements
behind each choice.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M rows of a matmul, K its
contracted size, F its features; h x w the patch grid, ph x pw a patch, C channels.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from parity.core.config import REMAT_MODES


def on_cpu() -> bool:
    """Whether XLA runs on the CPU, where the dense backward and the patch embedding change too."""
    return jax.default_backend() == 'cpu'


# --------------------------------------------------------------------------- dense layers

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
    """`lax.dot_general` for dense layers on the CPU: the same product, a faster backward.

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


def dot_general(fast: bool) -> Optional[Any]:
    """The matmul of the dense layers: `dot_general_in_order` on the CPU fast path, else None (flax's own)."""
    return dot_general_in_order if fast and on_cpu() else None


def _dense(x, p: dict, axes: int, dtype):
    """`x`'s trailing `axes` axes times the kernel's leading ones, plus the bias: a flax DenseGeneral by hand."""
    x, kernel, bias = nn.dtypes.promote_dtype(x, p['kernel'], p['bias'], dtype=dtype)
    dims = ((tuple(range(x.ndim - axes, x.ndim)), tuple(range(axes))), ((), ()))
    return (dot_general(True) or jax.lax.dot_general)(x, kernel, dims) + bias


# --------------------------------------------------------------------------- attention

def serves_attention(module: nn.Module, deterministic: bool) -> bool:
    """Whether the fast attention can stand in for `module` (a `model.Attention`) in this call.

    Not during `init` (the teaching path creates the parameters), not while the caller
    records attention weights (a fused kernel never forms them), and not under attention
    dropout in training (the fused call has none).
    """
    return (not module.is_initializing() and not module.is_mutable_collection('attention')
            and (deterministic or not module.dropout_rate))


def attention(module: nn.Module, x):
    """The attention branch of `module` (a `model.Attention`) on x (B, N, D), from its own parameters: (B, N, D)."""
    p = module.variables['params']
    y = attention_cpu(x, p, module.num_heads, module.dtype) if on_cpu() else \
        attention_fused(x, p, module.num_heads, module.dtype)  # (B, N, H, Dh)
    return _dense(y, p['out'], 2, module.dtype)  # (B, N, D)


def attention_fused(x, p: dict, num_heads: int, dtype):
    """q, k and v from one matmul, then `jax.nn.dot_product_attention`: (B, N, H, Dh)."""
    B, N, D = x.shape
    H = num_heads
    Dh = D // H
    w = jnp.concatenate([p[n]['kernel'].reshape(D, D) for n in ('query', 'key', 'value')], axis=1)  # (D, 3D)
    b = jnp.concatenate([p[n]['bias'].reshape(D) for n in ('query', 'key', 'value')])  # (3D,)
    x, w, b = nn.dtypes.promote_dtype(x, w, b, dtype=dtype)
    qkv = (x @ w + b).reshape(B, N, 3, H, Dh)  # (B, N, 3, H, Dh)
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                        implementation='cudnn' if half and jax.default_backend() == 'gpu'
                                        else None)  # (B, N, H, Dh)


def attention_cpu(x, p: dict, num_heads: int, dtype):
    """The attention on XLA:CPU, which has no fused attention kernel: the formulation it runs fastest, (B, N, H, Dh).

    The heads lead (XLA:CPU runs the einsums of `dot_product_attention`, heads inside,
    a third slower), q, k and v come from three matmuls (concatenating the kernels
    costs more there than it saves), and the softmax is normalised after the product
    with v, on (B, H, N, Dh) rather than on the (B, H, N, N) weights, as flash
    attention does.
    """
    B, N, D = x.shape
    H = num_heads
    Dh = D // H
    (x,) = nn.dtypes.promote_dtype(x, dtype=dtype)

    def heads(name):
        w, b = nn.dtypes.promote_dtype(p[name]['kernel'].reshape(D, D), p[name]['bias'].reshape(D), dtype=dtype)
        y = dot_general_in_order(x, w, (((2,), (0,)), ((), ()))) + b  # (B, N, D)
        return y.reshape(B, N, H, Dh).transpose(0, 2, 1, 3)  # (B, H, N, Dh)

    q, k, v = heads('query'), heads('key'), heads('value')
    logits = ((q / jnp.sqrt(Dh).astype(q.dtype)) @ k.swapaxes(-1, -2)).astype(jnp.float32)  # (B, H, N, N)
    # Subtracting the row maximum only guards exp against overflow; no gradient flows through it.
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))  # (B, H, N, N)
    y = (e.astype(dtype) @ v) / e.sum(-1, keepdims=True).astype(dtype)  # (B, H, N, Dh)
    return y.transpose(0, 2, 1, 3)  # (B, N, H, Dh)


# --------------------------------------------------------------------------- patch embedding

def serves_embedding(module: nn.Module) -> bool:
    """Whether the patch matmul stands in for the patch convolution: on the CPU, once the parameters exist."""
    return on_cpu() and not module.is_initializing()


def embed_patches(x, p: dict, patch_size: tuple[int, int], dtype):
    """The patch embedding as a matmul: the same product as the strided convolution, (B, h, w, D).

    A convolution whose stride is its kernel size (VALID) multiplies each patch, flattened
    in (row, column, channel) order as the HWIO kernel is, by the kernel. XLA:CPU runs
    the convolution and its kernel gradient half as fast as this matmul.
    """
    B, S1, S2, C = x.shape
    ph, pw = patch_size
    h, w = S1 // ph, S2 // pw
    x = x[:, :h * ph, :w * pw].reshape(B, h, ph, w, pw, C).transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, ph, pw, C)
    return _dense(x, p, 3, dtype)  # (B, h, w, D)


# --------------------------------------------------------------------------- rematerialisation

# `--remat`: what each encoder block keeps for the backward pass. 'block' keeps its input only and recomputes
# the rest (big_vision's 'nothing_saveable'); 'dots' also keeps the dense layers' outputs, recomputing the
# cheap element-wise work and the attention (big_vision's 'dots_with_no_batch_dims_saveable').
REMAT_POLICIES = {
    'block': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block: type, remat: str) -> type:
    """`block` (an encoder block class), rematerialised as `remat` says ('none': `block` itself).

    Called as `block` is, `deterministic` by keyword, under the module name the caller gives:
    the parameter tree is the same. `jax.checkpoint` traces keyword arguments, and the dropout
    layers branch on `deterministic` as a Python bool, so inside, the lifted class takes it
    positionally, as a static argument.
    """
    if remat == 'none':
        return block
    if remat not in REMAT_POLICIES:
        raise ValueError(f'remat {remat!r}: expected one of {", ".join(REMAT_MODES)}')

    class Positional(block):
        def __call__(self, x, deterministic):
            return super().__call__(x, deterministic=deterministic)

    # static_argnums counts `self`: 2 is `deterministic`. prevent_cse=False as big_vision: the blocks are not
    # under a scan here, and CSE protection would only cost speed.
    lifted = nn.remat(Positional, prevent_cse=False, static_argnums=(2,), policy=REMAT_POLICIES[remat])

    class Rematerialised(lifted):
        def __call__(self, x, *, deterministic):
            return super().__call__(x, deterministic)

    Rematerialised.__name__ = Rematerialised.__qualname__ = block.__name__
    return Rematerialised
