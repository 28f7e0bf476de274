"""Adapting canonical params to the model they are loaded into: resolution and fine-tuning surgery.

Both follow the official `load_pretrained`: position embeddings resized on the patch
grid with `scipy.ndimage.zoom` (order 1), `pre_logits` dropped when the new config has
no representation layer, a zero head for a new class count. Each ends with the strict
check, so what comes out fits the config exactly.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from parity.core.config import ViTConfig, is_square
from parity.core.errors import UserError
from parity.core.weights.spec import POSEMB, Params, check_params, param_shapes


def resize_posemb(posemb: np.ndarray, grid: tuple[int, int], prefix_tokens: int) -> np.ndarray:
    """Position embeddings (1, N, D) for a new patch grid, as the official `load_pretrained` does.

    Bilinear (`scipy.ndimage.zoom`, order=1) on the square patch grid only; the rows of the
    `prefix_tokens` before the patches (the class token, DeiT's distillation token) are kept.
    """
    import scipy.ndimage

    tok, patch = posemb[:, :prefix_tokens], posemb[0, prefix_tokens:]
    n, D = patch.shape
    if not is_square(n):
        raise UserError(f'position embeddings hold {n} patch tokens, not a square grid; cannot resize them')
    gs = math.isqrt(n)
    patch = patch.reshape(gs, gs, D)
    patch = scipy.ndimage.zoom(patch, (grid[0] / gs, grid[1] / gs, 1), order=1)
    patch = patch.reshape(1, grid[0] * grid[1], D)
    return np.concatenate([tok, patch], axis=1).astype(posemb.dtype)


def adapt_resolution(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> Params:
    """Resizes the position embeddings to `cfg.image_size` when the grids differ."""
    out = dict(params)
    want = param_shapes(cfg).get(POSEMB)  # None for sincos2d, which is computed for any grid
    if want is not None and POSEMB in out and out[POSEMB].shape != want:
        out[POSEMB] = resize_posemb(out[POSEMB], cfg.grid_size, cfg.num_prefix_tokens)
    return out


def prepare_for_inference(params: Mapping[str, np.ndarray], cfg: ViTConfig, where: str) -> Params:
    """Resolution adapted, strictly checked, float32: ready to load into either model."""
    out = adapt_resolution(params, cfg)
    check_params(out, cfg, where)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def prepare_for_finetuning(params: Mapping[str, np.ndarray], cfg: ViTConfig, where: str) -> Params:
    """Fine-tune surgery as the official code does it, then the strict check.

    Position embeddings resized to the new grid; `pre_logits` dropped when the new config
    has no representation layer; a zero head when the class count changes. A checkpoint with a
    class token fine-tuned into DeiT's `token_distilled` model gets its distillation token,
    and that token's position embedding, started as copies of the class token's, and a zero
    distillation head.
    """
    out = dict(params)
    if cfg.has_dist_token and 'dist_token' not in out and 'cls' in out:
        out['dist_token'] = np.array(out['cls'])
        if POSEMB in out:
            pe = np.asarray(out[POSEMB])
            out[POSEMB] = np.concatenate([pe[:, :1], pe[:, :1], pe[:, 1:]], axis=1)  # (1, N + 2, D)
    out = adapt_resolution(out, cfg)
    if cfg.representation_size is None:
        out.pop('pre_logits/kernel', None)
        out.pop('pre_logits/bias', None)
    shapes = param_shapes(cfg)
    for k in ('head/kernel', 'head/bias', 'head_dist/kernel', 'head_dist/bias'):
        if k in shapes and (k not in out or out[k].shape != shapes[k]):
            out[k] = np.zeros(shapes[k], np.float32)
    if not cfg.num_classes:
        for k in ('head/kernel', 'head/bias', 'head_dist/kernel', 'head_dist/bias'):
            out.pop(k, None)
    check_params(out, cfg, where)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
