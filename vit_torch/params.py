"""Canonical params (see `parity.core.weights`) into and out of the PyTorch model.

The twin of `vit_jax/params.py`: PyTorch keeps parameters inside the model (a state dict),
Flax outside it (a variables tree), otherwise the functions match one for one.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from parity.core.config import ViTConfig
from parity.core.weights.formats import vit_torch as torch_format
from vit_torch.model import VisionTransformer


def state_dict_from_params(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> dict[str, torch.Tensor]:
    """Canonical params as a PyTorch state dict for `VisionTransformer(cfg)`."""
    return {k: torch.from_numpy(v) for k, v in torch_format.to_torch(params, cfg).items()}


def params_from_state_dict(state: Mapping[str, torch.Tensor], cfg: ViTConfig, where: str = 'state dict'):
    """A `VisionTransformer(cfg)` state dict back to canonical params (bit for bit)."""
    return torch_format.from_torch({k: v.detach().cpu().numpy() for k, v in state.items()}, cfg, where)


def build_model(cfg: ViTConfig, params: Mapping[str, np.ndarray], fast: bool = False) -> VisionTransformer:
    """A float32 `VisionTransformer` in eval mode holding `params` (already checked to fit `cfg`).

    The model is built on the meta device and adopts the converted arrays as its
    parameters (`assign=True`), so loading makes one copy of the weights (the PyTorch
    layout) and no random initialisation besides. The model never shares memory with
    `params`. `fast` takes the fast path (`vit_torch.fast`).
    """
    with torch.device('meta'):
        model = VisionTransformer(cfg, fast=fast)
    state = {k: v.float() for k, v in state_dict_from_params(params, cfg).items()}  # no copy when float32
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
