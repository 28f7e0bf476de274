"""Image folders, and image files to model input the official way (`parity.data.preprocess` does the work).

Shared by every command that reads photos, so both frameworks always see the same array;
`preprocess` holds the other sources' pipelines (hf, timm).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from parity.core.errors import UserError
from parity.data import preprocess

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def load_image(path: str, size: int) -> np.ndarray:
    """One image file as float32 (size, size, 3) in [-1, 1], the official way (`preprocess.Pipeline('official')`).

    tf.image.resize bilinear without antialiasing, alpha composited on white, EXIF rotation
    applied; the pixel count is checked from the header before decoding.
    """
    return preprocess.load_image(path, preprocess.Pipeline('official', size))


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
    """Several image files as one float32 NHWC batch in [-1, 1], the official way."""
    return preprocess.load_images(paths, preprocess.Pipeline('official', size))


def images_in(directory: str) -> list[str]:
    """The image files directly inside `directory`, sorted by name."""
    if not os.path.isdir(directory):
        raise UserError(f'--images {directory}: no such directory')
    found = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise UserError(f'--images {directory}: holds no image files ({", ".join(IMAGE_SUFFIXES)})')
    return found
