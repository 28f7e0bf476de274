"""Named intermediates of the Flax model (names in `parity.core.intermediates`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from parity.core.intermediates import flat_name, forward_order
from vit_jax.params import variables_from_params


def forward_with_intermediates(model, params: Mapping[str, Any], images, *, attention: bool = False
                               ) -> dict[str, np.ndarray]:
    """Runs `model` on NHWC `images` and returns every named intermediate, in forward order.

    `params` is the canonical flat dict or a `{'params': tree}` variables dict. Attention
    weights (`attention_{i}`) are collected only when `attention` is set.
    """
    variables = params if 'params' in params else variables_from_params(params)
    collections = ['intermediates'] + (['attention'] if attention else [])
    _, state = model.apply({'params': variables['params']}, images, mutable=collections)
    got = {flat_name(path): np.asarray(v[0])
           for c in collections for path, v in traverse_util.flatten_dict(dict(state.get(c, {}))).items()}
    return {name: got[name] for name in forward_order(model.config, attention) if name in got}
