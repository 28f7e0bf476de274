"""How vit_jax runs for the command lines and tools: its numerics switches and the jitted forward pass.

Parity is judged in true float32: JAX's default matmul precision on GPUs and TPUs
rounds operands (to TF32 or bfloat16), so `strict_float32` asks for the highest
precision everywhere, and `matmul_precision` chooses it for one block of code.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import numpy as np

from parity import cli
from parity.core.config import ViTConfig
from vit_jax.params import build_model


def strict_float32() -> None:
    """Every JAX matmul and convolution from here on at the highest precision (true float32)."""
    jax.config.update('jax_default_matmul_precision', 'highest')


def device_memory() -> tuple[Optional[int], str]:
    """(bytes one accelerator may use, its name); (None, 'this machine') on CPU, where devices share the host's."""
    device = jax.local_devices()[0]
    if device.platform == 'cpu':
        return None, 'this machine'
    stats = device.memory_stats() or {}
    return stats.get('bytes_limit'), getattr(device, 'device_kind', device.platform)


def matmul_precision(precision: str = 'fp32'):
    """A context in which JAX's matmuls run at `precision`: fp32 the highest, tf32 and bf16 XLA's default."""
    return jax.default_matmul_precision('highest' if precision == 'fp32' else 'default')


def forward(cfg: ViTConfig, params: Mapping[str, np.ndarray]) -> cli.Forward:
    """The Flax model as NHWC images -> logits (NumPy), float32 at the highest matmul precision, jitted."""
    strict_float32()
    model, variables = build_model(cfg, params)
    apply = jax.jit(model.apply)  # batches of one shape compile once
    return lambda x: np.asarray(apply(variables, x))
