"""`python -m vit_jax predict IMAGE... --checkpoint CKPT`: top-k classes for image files, through Flax.

Everything but the forward pass is shared with `vit_torch predict` (`parity.predict`),
so both print the same classes and probabilities.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from parity import predict
from parity.config import ViTConfig


def forward(cfg: ViTConfig, params: dict) -> predict.Forward:
    """The Flax model as NHWC images -> logits, float32 at the highest matmul precision."""
    import jax

    jax.config.update('jax_default_matmul_precision', 'highest')
    from vit_jax.checkpoint import variables_from_params
    from vit_jax.model import VisionTransformer

    apply = jax.jit(VisionTransformer(cfg).apply)
    variables = variables_from_params(params)
    return lambda x: np.asarray(apply(variables, x))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Top-k classes for image files (see `parity.predict.main`)."""
    return predict.main('vit_jax', forward, argv)
