"""The fast path of `vit_torch.model`: the same function from the same parameters, faster kernels.

`VisionTransformer(cfg, fast=True)` (or `params.build_model(cfg, params, fast=True)`)
takes it; `model.py` chooses it in one place and stays the teaching path. It is the
attention alone: q, k and v from one matmul (the three weights concatenated on the fly,
so the parameters keep the official layout) and `F.scaled_dot_product_attention`
(flash or memory-efficient kernels on a GPU, fused kernels on the CPU). PyTorch's
dense layers and convolutions need nothing of the kind.

Proven equal to the teaching path, forward and gradients, in `tests/test_fast_paths.py`.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def serves_attention(module: nn.Module) -> bool:
    """Whether the fused attention can stand in for `module` (a `model.Attention`): not while weights are recorded."""
    return not module.sowing('attention')


def attention(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention branch of `module` (a `model.Attention`) on x (B, N, D), from its own parameters: (B, N, D)."""
    B, N, D = x.shape
    H = module.num_heads
    Dh = D // H
    w = torch.cat([module.query.weight, module.key.weight, module.value.weight])  # (3D, D)
    b = torch.cat([module.query.bias, module.key.bias, module.value.bias])  # (3D,)
    q, k, v = F.linear(x, w, b).view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, N, Dh)
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=module.dropout_rate if module.training else 0.0)
    y = y.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
    return module.out(y)
