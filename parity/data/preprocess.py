"""Image files to model input, the way each checkpoint's own library prepares them.

Three pipelines, one per source of checkpoints (`MODES`):

- `official`: what google-research/vision_transformer and big_vision evaluate with:
  `tf.image.resize(bilinear)` straight to the model's square (half-pixel centres, no
  antialiasing, no crop), then `(x - 127.5) / 127.5`. The resize is reimplemented here in
  NumPy, step for step, so TensorFlow is not needed to read a photo. Transparent images are
  composited on white (as a viewer shows them); EXIF rotation is applied.
- `hf`: transformers' `ViTImageProcessor` settings from the folder's
  `preprocessor_config.json` (defaults: bilinear to 224x224, x/255, mean/std 0.5),
  applied as transformers 5's default (torchvision) backend does, which is what
  `AutoImageProcessor.from_pretrained` returns: torch's antialiased resize of uint8
  pixels (reimplemented here in NumPy, bit for bit), then rescale and normalise fused in
  float32. `backend='pil'` is its PIL backend instead (`ViTImageProcessorPil`:
  `PIL.Image.resize`), one grey level apart at most when both sides shrink. Images are
  opened as `transformers.image_utils.load_image` opens them: EXIF rotation applied,
  alpha dropped (`convert('RGB')`).
- `timm`: `timm.data.create_transform(**resolve_data_config({}, model=model))` for
  evaluation: the short side resized to `size / crop_pct` (PIL, bicubic by default), a
  centre crop of `size`, /255, mean/std. Images are opened as timm's `ImageDataset`
  opens them: no EXIF rotation, alpha dropped (`convert('RGB')`).

NumPy and Pillow only; every resize lives here, once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import warnings
from typing import Optional, Sequence, Union

import numpy as np

from parity.core.errors import UserError, cause
from parity.core.limits import MAX_IMAGE_PIXELS

MODES = ('official', 'hf', 'timm')

# PIL's resampling enum, as preprocessor_config.json stores it.
_PIL_RESAMPLE = {0: 'nearest', 1: 'lanczos', 2: 'bilinear', 3: 'bicubic', 4: 'box', 5: 'hamming'}
_FILTERS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')
# torchvision resizes uint8 tensors natively on the CPU for these (bilinear: where the CPU has AVX2, or is
# ARM; the rest fall back to float32, see docs/preprocessing.md), through ATen's separable antialiased
# kernels; nearest goes to 'nearest-exact'. Box and hamming are not filters torch has: transformers fails.
TORCH_FILTERS = ('nearest', 'bilinear', 'bicubic', 'lanczos')
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """How one image file becomes a float32 HWC array, and where those settings came from."""

    mode: str  # one of MODES
    size: Union[int, tuple]  # the square side, or (height, width) where a processor says so
    resample: str = 'bilinear'  # the filter, as the mode's library names it
    antialias: bool = False  # whether the resize low-pass filters when shrinking
    crop_pct: Optional[float] = None  # timm's centre crop: resize to size / crop_pct first; None: no crop
    mean: Optional[tuple] = HALF  # on the [0, 1] scale; None: no normalisation (hf's do_normalize false)
    std: Optional[tuple] = HALF
    rescale: Optional[float] = 1 / 255  # hf's rescale_factor when do_rescale, else None; the others /255
    alpha: str = 'white'  # 'white': composite transparency on white; 'drop': convert('RGB') ignores it
    source: str = 'the official eval pipeline'
    crop_mode: str = 'center'  # timm's: 'center' keeps the aspect ratio, 'squash' does not
    shortest_edge: bool = False  # hf's {"shortest_edge": N}: size is the short side, the aspect ratio kept
    exif: bool = True  # apply the EXIF orientation tag before anything else
    resize: bool = True  # hf's do_resize
    backend: str = 'torchvision'  # hf's: transformers' default 'torchvision' backend, or its 'pil' one

    def describe(self) -> str:
        """One phrase for a command's first line."""
        h, w = self.hw
        shape = f'short side {h}' if self.shortest_edge else f'{h}x{w}'
        if self.mode == 'official':
            return f'preprocess: official (tf.image.resize bilinear, no antialias, {shape}, [-1, 1])'
        if self.mode == 'hf':
            lib = 'PIL' if self.backend == 'pil' else 'torchvision uint8'
            resize = f'{lib} {self.resample}, {shape}' if self.resize else 'no resize'
        else:
            crop = f'{self.crop_mode} crop {h}x{w}' if self.crop_pct else f'{h}x{w}'
            resize = f'PIL {self.resample}, crop_pct {self.crop_pct}, {crop}'
        norm = 'mean/std 0.5 [-1, 1]' if self.mean == HALF and self.std == HALF else \
            f'mean {_fmt(self.mean)} std {_fmt(self.std)}' if self.mean is not None else 'no normalisation'
        return f'preprocess: {self.mode} ({resize}, {norm}; from {self.source})'

    @property
    def hw(self) -> tuple:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    def to_unit(self, x: np.ndarray) -> np.ndarray:
        """This pipeline's output back on the [0, 1] scale, for showing the image as the model saw it."""
        if self.mean is not None:
            x = x * np.asarray(self.std) + np.asarray(self.mean)
        if self.mode == 'hf':  # pixels times rescale_factor (or 1 when do_rescale is off)
            x = x / ((self.rescale or 1.0) * 255)
        return np.clip(x, 0, 1)

    def as_dict(self) -> dict:
        """The fields a JSON report records."""
        return {'mode': self.mode, 'resample': self.resample, 'antialias': self.antialias,
                'size': list(self.hw), 'crop_pct': self.crop_pct, 'mean': _list(self.mean), 'std': _list(self.std),
                'source': self.source, **({'backend': self.backend} if self.mode == 'hf' else {})}


def _fmt(t) -> str:
    return '(' + ', '.join(f'{v:g}' for v in t) + ')'


def _list(t):
    return None if t is None else list(t)


# --------------------------------------------------------------------------- which pipeline


def pipeline_for(mode: Optional[str], checkpoint_format: str, checkpoint_path: str, image_size: int, *,
                 distilled: bool = False) -> Pipeline:
    """The pipeline for a checkpoint: `mode`, or (None) the one its source's library uses.

    `checkpoint_format` is `weights.load(path).format`: 'hf' follows transformers (the folder's
    preprocessor_config.json), 'timm' follows timm (a hub folder's config.json pretrained_cfg,
    else timm's defaults for a ViT, or for DeiT when `distilled`), anything else the official
    pipeline. `image_size` is the model's resolution.
    """
    if mode is None:
        mode = {'hf': 'hf', 'timm': 'timm'}.get(checkpoint_format, 'official')
    if mode not in MODES:
        raise UserError(f'--preprocess {mode}: not a preprocessing mode; use one of {", ".join(MODES)}')
    folder = checkpoint_path if os.path.isdir(checkpoint_path) else os.path.dirname(os.path.abspath(checkpoint_path))
    if mode == 'hf':
        return _hf_pipeline(folder if checkpoint_format == 'hf' else None, image_size)
    if mode == 'timm':
        return _timm_pipeline(folder if checkpoint_format == 'timm' else None, image_size, distilled)
    return Pipeline('official', image_size)


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path}: not readable JSON ({cause(e)}); fix or remove it, or pass --preprocess') from None
    if not isinstance(d, dict):
        raise UserError(f'{path}: holds a JSON {type(d).__name__}, not an object; fix or remove it, '
                        'or pass --preprocess')
    return d


def _triple(d: dict, key: str, default: tuple, where: str) -> tuple:
    v = d.get(key, default)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v] * 3
    if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
        raise UserError(f'{where}: {key} is {v!r}, not three numbers; fix it or pass --preprocess')
    if key.endswith('std') and not all(x > 0 for x in v):
        raise UserError(f'{where}: {key} is {v!r}; a standard deviation must be positive')
    return tuple(float(x) for x in v)


def _hf_pipeline(folder: Optional[str], image_size: int) -> Pipeline:
    """ViTImageProcessor's settings: the folder's preprocessor_config.json over the class defaults."""
    path = os.path.join(folder, 'preprocessor_config.json') if folder else None
    d = _read_json(path) if path else None
    source = 'preprocessor_config.json' if d is not None else "ViTImageProcessor's defaults"
    d = d or {}
    where = path or source
    code = d.get('resample', 2)
    if code not in _PIL_RESAMPLE:
        raise UserError(f'{where}: resample {code!r} is not a PIL filter (0-5); fix it or pass --preprocess')
    size, shortest = d.get('size', {'height': image_size, 'width': image_size}), False
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)  # an old config's int means a square, as ViTImageProcessor reads it
    elif isinstance(size, dict) and {'height', 'width'} <= set(size):
        size = (int(size['height']), int(size['width']))
    elif isinstance(size, dict) and 'shortest_edge' in size:
        size, shortest = int(size['shortest_edge']), True
    else:
        raise UserError(f'{where}: size {size!r} is neither {{"height", "width"}}, {{"shortest_edge"}} nor an '
                        'int; fix it or pass --preprocess')
    if not shortest and size[0] == size[1]:
        size = size[0]
    if _PIL_RESAMPLE[code] not in TORCH_FILTERS and d.get('do_resize', True):
        raise UserError(f'{where}: resample {code} ({_PIL_RESAMPLE[code]}) is a filter torchvision lacks, so '
                        "transformers' ViTImageProcessor fails on it; fix it or pass --preprocess official or timm")
    normalize = bool(d.get('do_normalize', True))
    rescale = float(d.get('rescale_factor', 1 / 255)) if d.get('do_rescale', True) else None
    return Pipeline('hf', size, _PIL_RESAMPLE[code], True,
                    mean=_triple(d, 'image_mean', HALF, where) if normalize else None,
                    std=_triple(d, 'image_std', HALF, where) if normalize else None,
                    rescale=rescale, alpha='drop', source=source, shortest_edge=shortest,
                    resize=bool(d.get('do_resize', True)))


def _timm_pipeline(folder: Optional[str], image_size: int, distilled: bool) -> Pipeline:
    """timm's eval transform: a hub folder's pretrained_cfg, else timm's defaults for ViT (or DeiT)."""
    path = os.path.join(folder, 'config.json') if folder else None
    d = _read_json(path) if path else None
    cfg = d.get('pretrained_cfg') if isinstance(d, dict) else None
    if isinstance(cfg, dict):
        source = 'config.json pretrained_cfg'
    elif distilled:
        # timm's pretrained_cfg for deit_*_distilled_patch16_224 (crop 0.9) and _384 (crop 1.0): ImageNet statistics.
        cfg, source = {'mean': IMAGENET_MEAN, 'std': IMAGENET_STD,
                       'crop_pct': 1.0 if image_size >= 384 else 0.9}, "timm's DeiT distilled defaults"
    else:
        # vision_transformer.py's _cfg (crop 0.9); Google's 384 fine-tunes there (augreg, orig) say crop 1.0.
        cfg, source = {'crop_pct': 1.0 if image_size >= 384 else 0.9}, "timm's ViT defaults"
    where = f'{path} pretrained_cfg' if source.startswith('config') else source
    size = image_size
    shape = cfg.get('input_size')
    if shape is not None:
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(x, int) for x in shape)):
            raise UserError(f'{where}: input_size {shape!r} is not (channels, height, width)')
        size = shape[1] if shape[1] == shape[2] else (shape[1], shape[2])
    crop_pct = cfg.get('crop_pct') or 0.875  # timm's DEFAULT_CROP_PCT where a cfg names none
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise UserError(f'{where}: crop_pct {crop_pct!r} is not a number in (0, 1]')
    interpolation = cfg.get('interpolation', 'bicubic')
    if interpolation not in _FILTERS:
        raise UserError(f'{where}: interpolation {interpolation!r} is not one of {", ".join(_FILTERS)}')
    crop_mode = cfg.get('crop_mode') or 'center'
    if crop_mode not in ('center', 'squash'):
        raise UserError(f'{where}: crop_mode {crop_mode!r} is not read here (center and squash are); '
                        'pass --preprocess official or hf')
    return Pipeline('timm', size, interpolation, True, float(crop_pct), _triple(cfg, 'mean', HALF, where),
                    _triple(cfg, 'std', HALF, where), 1 / 255, 'drop', source, crop_mode, exif=False)


def add_preprocess_argument(parser: argparse.ArgumentParser) -> None:
    """`--preprocess official|hf|timm`, default the checkpoint's source."""
    parser.add_argument('--preprocess', choices=MODES, metavar='MODE',
                        help="how images become pixels: official (tf.image.resize bilinear, no antialias, [-1, 1]), "
                             "hf (the folder's preprocessor_config.json, as transformers' ViTImageProcessor), timm "
                             "(timm's eval transform: resize, centre crop, mean/std); default: the checkpoint's "
                             'source (hf for a Hugging Face folder, timm for a timm file, official otherwise)')


# --------------------------------------------------------------------------- reading


def load_image(path: str, pipeline: Pipeline) -> np.ndarray:
    """One image file as a float32 HWC array, prepared by `pipeline`.

    Its pixel count is read from the header and refused past `MAX_IMAGE_PIXELS` before
    anything is decoded; an unreadable file is one UserError line.
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
                if pipeline.exif:
                    im = ImageOps.exif_transpose(im)  # phones store rotation as a tag; show it upright
                if pipeline.alpha == 'white' and (im.mode in ('RGBA', 'LA', 'PA')
                                                  or (im.mode == 'P' and 'transparency' in im.info)):
                    rgba = im.convert('RGBA')
                    im = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
                rgb = im.convert('RGB')
                rgb.load()
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            MemoryError) as e:
        raise UserError(f'{path}: not a readable image ({cause(e)})') from None
    return _prepare(rgb, pipeline)


def load_images(paths: Sequence[str], pipeline: Pipeline) -> np.ndarray:
    """Several image files as one float32 NHWC batch."""
    if not paths:
        raise UserError('no image files given')
    arrays = [load_image(p, pipeline) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f'{pipeline.describe()} gives images of different shapes ({", ".join(map(str, shapes))}); '
                        'pass --preprocess official or timm, which give one shape')
    return np.stack(arrays)


@contextlib.contextmanager
def _own_pixel_limit(Image):
    """Pillow's own decompression-bomb check off: the size is checked here, from the header, before decoding."""
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _prepare(rgb, p: Pipeline) -> np.ndarray:
    """An RGB PIL image through the pipeline's resize, crop and normalisation."""
    from PIL import Image

    h, w = p.hw
    if p.mode == 'official':
        x = tf_resize_bilinear(np.asarray(rgb, dtype=np.float32), h, w)
        return ((x - np.float32(127.5)) / np.float32(127.5)).astype(np.float32)
    pil_filter = getattr(Image.Resampling, p.resample.upper())
    if p.mode == 'hf' and p.backend != 'pil':
        return _hf_torchvision(rgb, p)
    if p.mode == 'hf':
        if p.resize:
            size = _short_side(rgb.size, p.size) if p.shortest_edge else (w, h)
            rgb = rgb.resize(size, pil_filter)
        x = np.asarray(rgb, dtype=np.float64)
        if p.rescale is not None:
            x = x * p.rescale
    else:  # timm
        scale_h, scale_w = math.floor(h / p.crop_pct), math.floor(w / p.crop_pct)
        if p.crop_mode == 'squash':
            rgb = rgb.resize((scale_w, scale_h), pil_filter)
        elif scale_h == scale_w:
            rgb = rgb.resize(_short_side(rgb.size, scale_h), pil_filter)  # torchvision's Resize(int) on PIL
        else:  # timm's ResizeKeepRatio (longest=0), its arithmetic: both sides at least the target's
            iw, ih = rgb.size
            ratio = min(ih / scale_h, iw / scale_w)
            rgb = rgb.resize((round(iw / ratio), round(ih / ratio)), pil_filter)
        iw, ih = rgb.size
        if ih < h or iw < w:
            raise UserError(f'{p.describe()}: crop larger than the resized image ({iw}x{ih}); '
                            'a crop_pct above 1 is not supported here, pass --preprocess official')
        top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))  # torchvision's CenterCrop
        x = np.asarray(rgb, dtype=np.float64)[top:top + h, left:left + w] / 255
    if p.mean is not None:
        x = (x - np.asarray(p.mean)) / np.asarray(p.std)
    return x.astype(np.float32)


def _hf_torchvision(rgb, p: Pipeline) -> np.ndarray:
    """transformers 5's torchvision backend: uint8 resize, then rescale and normalise in float32, its way.

    With both on, it folds the rescale into the statistics (mean / rescale_factor,
    std / rescale_factor, in float32) and normalises the 0..255 values once: the same
    float32 operations here give the same bits.
    """
    h, w = p.hw
    pixels = np.asarray(rgb, dtype=np.uint8)
    if p.resize:
        nw, nh = _short_side(rgb.size, p.size) if p.shortest_edge else (w, h)
        pixels = torch_resize_uint8(pixels, nh, nw, p.resample)
    x = pixels.astype(np.float32)
    if p.mean is not None:
        mean, std = np.asarray(p.mean, np.float32), np.asarray(p.std, np.float32)
        if p.rescale is not None:
            inverse = np.float32(1.0 / p.rescale)
            mean, std = mean * inverse, std * inverse
        return (x - mean) / std
    if p.rescale is not None:
        return x * np.float32(p.rescale)
    return x


def _short_side(size: tuple, short: int) -> tuple:
    """(width, height) with the short side `short`: torchvision's Resize(int) and transformers' shortest_edge."""
    w, h = size
    if w <= h:
        return (short, int(short * h / w)) if w != short else (w, h)
    return (int(short * w / h), short) if h != short else (w, h)


def tf_resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """`tf.image.resize(image, (height, width), 'bilinear', antialias=False)` on a float32 HWC array.

    TensorFlow's ResizeBilinear with half-pixel centres, in its float32 arithmetic: source
    coordinate (i + 0.5) * in / out - 0.5, the two neighbours clamped to the image, rows
    interpolated along x first, then along y.
    """
    image = np.asarray(image, dtype=np.float32)
    ylo, yhi, yl = _taps(image.shape[0], height)
    xlo, xhi, xl = _taps(image.shape[1], width)
    top, bottom = image[ylo], image[yhi]
    top = top[:, xlo] + (top[:, xhi] - top[:, xlo]) * xl[None, :, None]
    bottom = bottom[:, xlo] + (bottom[:, xhi] - bottom[:, xlo]) * xl[None, :, None]
    return top + (bottom - top) * yl[:, None, None]


def _taps(size_in: int, size_out: int) -> tuple:
    scale = np.float32(size_in) / np.float32(size_out)
    where = (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(where)
    lo = np.maximum(floor, 0).astype(np.int64)
    hi = np.minimum(np.ceil(where), size_in - 1).astype(np.int64)
    return lo, hi, (where - floor).astype(np.float32)


# --------------------------------------------------------------------------- torchvision's uint8 resize

_SUPPORT = {'bilinear': 1.0, 'bicubic': 2.0, 'lanczos': 3.0}  # half the filter's width at scale 1


def _filter(name: str, x: np.ndarray) -> np.ndarray:
    """ATen's aa_filter for `name` (PIL's, from Resample.c), in double, on |x|."""
    x = np.abs(x)
    if name == 'bilinear':
        return np.where(x < 1.0, 1.0 - x, 0.0)
    if name == 'bicubic':  # Keys' cubic convolution, a = -0.5, in ATen's operation order
        a = -0.5
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
    with np.errstate(invalid='ignore', divide='ignore'):  # lanczos, a = 3: sinc(x) sinc(x / 3)
        px, px3 = x * np.pi, x / 3 * np.pi
        s = np.where(x == 0, 1.0, np.sin(px) / px) * np.where(x == 0, 1.0, np.sin(px3) / px3)
    return np.where(x < 3.0, s, 0.0)


def _int16_weights(size_in: int, size_out: int, name: str) -> tuple:
    """ATen's `_compute_indices_int16_weights_aa`: an (out, in) int64 matrix of int16 weights and their precision.

    Weights are PIL's (support widened by the downscale factor, normalised per output pixel),
    computed in double, then scaled by 2**precision with the precision the largest weight
    allows in int16, and rounded half away from zero.
    """
    scale = size_in / size_out
    support = _SUPPORT[name] * scale if scale >= 1.0 else _SUPPORT[name]
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(size_out) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's cast truncates toward zero
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), size_in)
    j = np.arange(size_in)
    inside = (j[None] >= xmin[:, None]) & (j[None] < xmax[:, None])
    w = np.where(inside, _filter(name, (j[None] - center[:, None] + 0.5) * invscale), 0.0)
    total = w.sum(axis=1, keepdims=True)  # ATen sums left to right; a row holds few non-zero taps
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    w_max = w.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    q = w * (1 << precision)
    return np.trunc(np.where(q < 0, q - 0.5, q + 0.5)).astype(np.int64), precision


def _convolve(pixels: np.ndarray, weights: np.ndarray, precision: int, axis: int) -> np.ndarray:
    """One separable pass on uint8 pixels: integer sums from 1 << (precision - 1), shifted, clamped to uint8."""
    x = np.moveaxis(pixels.astype(np.int64), axis, -1)
    acc = (x @ weights.T + (1 << (precision - 1))) >> precision
    return np.moveaxis(np.clip(acc, 0, 255).astype(np.uint8), -1, axis)


def torch_resize_uint8(pixels: np.ndarray, height: int, width: int, name: str = 'bilinear') -> np.ndarray:
    """`torchvision.transforms.v2.functional.resize(antialias=True)` on a uint8 HWC array, bit for bit.

    ATen's uint8 kernels (`upsample_avx_bilinear_bicubic_uint8` and its generic fallback):
    the horizontal pass first, rounded to uint8, then the vertical one; an axis whose size
    does not change is not touched. 'nearest' is torchvision's NEAREST_EXACT, which is what
    transformers maps PIL's NEAREST to.
    """
    pixels = np.asarray(pixels, dtype=np.uint8)
    h, w = pixels.shape[:2]
    if name == 'nearest':
        rows = _nearest_exact(h, height)
        cols = _nearest_exact(w, width)
        return pixels[rows][:, cols]
    if name not in _SUPPORT:
        raise UserError(f'resample {name}: torchvision has no {name} filter for tensors, so transformers\' '
                        'ViTImageProcessor fails on it; use bilinear, bicubic, lanczos or nearest')
    if w != width:
        pixels = _convolve(pixels, *_int16_weights(w, width, name), axis=1)
    if h != height:
        pixels = _convolve(pixels, *_int16_weights(h, height, name), axis=0)
    return pixels


def _nearest_exact(size_in: int, size_out: int) -> np.ndarray:
    # ATen: min(floorf((i + 0.5) * scale), in - 1), scale = in / out in float32
    scale = np.float32(size_in) / np.float32(size_out)
    where = ((np.arange(size_out) + 0.5) * np.float64(scale)).astype(np.float32)
    return np.minimum(np.floor(where).astype(np.int64), size_in - 1)
