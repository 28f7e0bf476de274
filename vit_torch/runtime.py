"""How vit_torch runs for the command lines and tools: its device, its numerics switches, the forward pass.

Parity is judged in true float32: PyTorch may run float32 matmuls and convolutions as
TF32 on NVIDIA GPUs, so `strict_float32` turns that off, and `precision` chooses fp32,
tf32 or bf16 (autocast) for one block of code.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import numpy as np
import torch

from parity import cli
from parity.core.config import ViTConfig
from vit_torch.params import build_model


def device() -> str:
    """Where vit_torch runs: the GPU when PyTorch sees one, else the CPU."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def strict_float32() -> None:
    """TF32 off for matmuls and convolutions from here on: float32 is true float32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@contextlib.contextmanager
def precision(precision: str, where: str) -> Iterator[None]:
    """No gradients, and fp32 (TF32 off), tf32 (TF32 matmuls and convolutions) or bf16 (autocast) on `where`."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == 'tf32'
    try:
        with torch.no_grad(), torch.autocast(where, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    """An NHWC NumPy batch as the NCHW tensor the torch models take, on `where`."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).to(where)


def forward(cfg: ViTConfig, params: Mapping[str, np.ndarray]) -> cli.Forward:
    """The PyTorch model as NHWC images -> logits (NumPy), float32 with TF32 off, on `device()`."""
    strict_float32()
    where = device()
    model = build_model(cfg, params).to(where)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(to_nchw(x, where)).float().cpu().numpy()

    return run
