"""Canonical params (see `parity.core.weights`) into and out of the Flax model's variables."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util


def variables_from_params(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flat '/'-joined canonical params to `{'params': nested tree}` for `model.apply`."""
    return {'params': traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in params.items()})}


def params_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Flax params tree (or `{'params': tree}`) to flat canonical NumPy arrays."""
    tree = variables.get('params', variables)
    return {'/'.join(k): np.array(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}
