"""The `.npy` arrays commands read and write: `--input` images checked to fit the model, `--output` logits."""

from __future__ import annotations

import os
import zipfile
from typing import Optional

import numpy as np

from parity.cli.contract import say
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.core.files import atomic_path
from parity.core.weights import containers


def read_npy(path: str, flag: str) -> np.ndarray:
    """One array from a .npy file given as `flag`, checked before it is read, never unpickled, or a one-line error."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        raise UserError(f'{flag} {path}: expected a single .npy array, found an .npz archive')
    return containers.read_npy(path, f'{flag} {path}')


def npy_image_size(path: Optional[str], default: int = 224) -> int:
    """The height of the images in an NHWC .npy file, read from its header alone; `default` when there is none."""
    try:
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape = read[version](f)[0]
        return int(shape[1]) if len(shape) == 4 and shape[1] > 0 else default
    except (OSError, ValueError, TypeError, EOFError, KeyError):
        return default  # read_npy explains what is wrong with the file


def load_input(path: str, cfg: ViTConfig) -> np.ndarray:
    """A float32 NHWC batch that fits the model, or a one-line error saying what to change."""
    x = read_npy(path, '--input')
    if x.dtype != np.float32:
        raise UserError(f'--input {path}: dtype {x.dtype}, expected float32 (images in [-1, 1])')
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f'--input {path}: shape {x.shape}, expected (batch, height, width, 3) NHWC')
    if not len(x):
        raise UserError(f'--input {path}: holds no images (shape {x.shape}); give at least one')
    if x.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise UserError(f'--input {path}: images are {x.shape[1]}x{x.shape[2]} but the model is built at '
                        f'{cfg.image_size}x{cfg.image_size}; pass --image-size {x.shape[1]} '
                        '(square images whose side divides by the patch size)')
    if not np.isfinite(x).all():
        raise UserError(f'--input {path}: holds NaN or infinite values')
    if np.abs(x).max() > 1.001:
        say(f'warning: --input values span [{x.min():.3g}, {x.max():.3g}]; the official models expect [-1, 1]')
    return x


def save_output(path: str, y: np.ndarray) -> None:
    """Writes a float32 array atomically, so a reader never sees half a file."""
    with atomic_path(path, '--output') as tmp:
        with open(tmp, 'wb') as f:
            np.save(f, np.asarray(y, dtype=np.float32))
