"""Fixed position-embedding tables both models compute the same way: big_vision's `sincos2d`.

The table is computed here once, in NumPy, so vit_jax and vit_torch add the very same
numbers; it depends on the patch grid alone, so a new resolution just computes a new
table (nothing is resized, nothing is stored).

Shapes: h x w the patch grid, D width, P prefix tokens (the class token, which gets a
zero row: big_vision adds the table before it prepends the class token).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=16)
def sincos_2d(grid: tuple[int, int], width: int, prefix_tokens: int = 0, temperature: float = 10_000.0) -> np.ndarray:
    """(1, P + h*w, D) float32: zeros for the prefix tokens, then big_vision's `posemb_sincos_2d` (MoCo v3).

    Per patch at row y, column x: [sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)] with
    w_k = temperature ** -(k / (D/4 - 1)), k = 0 .. D/4 - 1. Read-only: it is shared.
    """
    h, w = grid
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))  # (D/4,)
    x = x.reshape(-1, 1) * omega  # (h*w, D/4)
    y = y.reshape(-1, 1) * omega  # (h*w, D/4)
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)  # (h*w, D)
    table = np.concatenate([np.zeros((prefix_tokens, width)), table])[None].astype(np.float32)  # (1, P + h*w, D)
    table.setflags(write=False)
    return table
