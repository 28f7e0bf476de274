"""Image files to model input, the official way: RGB, resized to the model's resolution, pixels in [-1, 1].

Shared by every command that reads photos (`predict`, `explain`, `parity compare --images`),
so both frameworks always see the same array.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Sequence

import numpy as np

from parity.core.errors import UserError, cause
from parity.core.limits import MAX_IMAGE_PIXELS

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def load_image(path: str, size: int) -> np.ndarray:
    """One image file as float32 (size, size, 3) in [-1, 1].

    Its pixel count is read from the header and refused past `MAX_IMAGE_PIXELS` before
    anything is decoded. Grayscale, palette and RGBA images are converted to RGB (alpha composited on white,
    as a viewer shows them), not rejected. Resized with bilinear interpolation, as the
    official eval pipeline does.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not os.path.isfile(path):
        raise UserError(f'{path}: no such image file')
    try:
        with warnings.catch_warnings(), _own_pixel_limit(Image):
            # Its warnings about damaged metadata say nothing the decode does not: an image either decodes or errs.
            warnings.filterwarnings('ignore', category=UserWarning, module='PIL')
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise UserError(f'{path}: {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), more than the '
                                    f'{MAX_IMAGE_PIXELS / 1e6:.0f} an image may have; scale it down first')
                im = ImageOps.exif_transpose(im)  # phones store rotation as a tag; show it upright
                if im.mode in ('RGBA', 'LA') or (im.mode == 'P' and 'transparency' in im.info):
                    rgba = im.convert('RGBA')
                    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(background, rgba)
                rgb = im.convert('RGB').resize((size, size), Image.BILINEAR)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            MemoryError) as e:
        raise UserError(f'{path}: not a readable image ({cause(e)})') from None
    return (np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


@contextlib.contextmanager
def _own_pixel_limit(Image):
    """Pillow's own decompression-bomb check off: the size is checked here, from the header, before decoding."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_images(paths: Sequence[str], size: int) -> np.ndarray:
    """Several image files as one float32 NHWC batch in [-1, 1]."""
    if not paths:
        raise UserError('no image files given')
    return np.stack([load_image(p, size) for p in paths])


def images_in(directory: str) -> list[str]:
    """The image files directly inside `directory`, sorted by name."""
    if not os.path.isdir(directory):
        raise UserError(f'--images {directory}: no such directory')
    found = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.lower().endswith(IMAGE_SUFFIXES))
    if not found:
        raise UserError(f'--images {directory}: holds no image files ({", ".join(IMAGE_SUFFIXES)})')
    return found
