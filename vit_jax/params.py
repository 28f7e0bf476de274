"""Canonical params (see `parity.core.weights`) into and out of the Flax model's variables.

The twin of `vit_torch/params.py`: Flax keeps parameters outside the model (a variables
tree), PyTorch inside it (a state dict), otherwise the functions match one for one.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from parity.core.config import ViTConfig
from vit_jax.model import VisionTransformer


def variables_from_params(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flat '/'-joined canonical params to `{'params': nested tree}` for `model.apply`."""
    return {'params': traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in params.items()})}


def params_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flax params tree (or `{'params': tree}`) to flat canonical NumPy arrays."""
    tree = variables.get('params', variables)
    return {'/'.join(k): np.array(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def build_model(cfg: ViTConfig, params: Mapping[str, np.ndarray],
                fast: bool = False) -> tuple[VisionTransformer, dict[str, Any]]:
    """A float32 `VisionTransformer` for `cfg` and the variables holding `params` (already checked to fit `cfg`):
    `model.apply(variables, x)` runs it. `fast` takes the fast path (`vit_jax.fast`)."""
    return VisionTransformer(cfg, fast=fast), variables_from_params(params)
