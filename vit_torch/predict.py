"""`python -m vit_torch predict IMAGE... --checkpoint CKPT`: top-k classes for image files, through PyTorch.

Everything but the forward pass is shared with `vit_jax predict` (`parity.predict`),
so both print the same classes and probabilities.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from parity import predict
from parity.config import ViTConfig


def forward(cfg: ViTConfig, params: dict) -> predict.Forward:
    """The PyTorch model as NHWC images -> logits, float32 with TF32 off (on the GPU when there is one)."""
    import torch

    from vit_torch.checkpoint import build_model
    from vit_torch.cli import _strict_float32

    _strict_float32()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = build_model(cfg, params).to(device)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).permute(0, 3, 1, 2).to(device)).cpu().numpy()  # NHWC -> NCHW

    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Top-k classes for image files (see `parity.predict.main`)."""
    return predict.main('vit_torch', forward, argv)
