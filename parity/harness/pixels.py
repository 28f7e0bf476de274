"""The `pixels` row: our preprocessing of image files against another's, and which setting makes them differ.

`compare --images DIR --against hf|timm:MODEL` compares the pipeline the command uses
(`parity.data.preprocess`) with the counterpart library's own processor on the same
files; `verify --preprocess FILE.py:NAME --images DIR` compares a user's own
`NAME(path, size)` with the reference pipeline. Either way the row is held to
`tolerance.PIXELS_RTOL` and, when it fails, the cause is found by search, not guessed:
every combination of the known alternatives (the resize: tf.image.resize without
antialiasing, PIL's antialiased filters or torchvision's on uint8 tensors; a centre crop or none; the normalisation:
0.5, ImageNet's mean/std, [0, 1], [0, 255]; RGB or BGR) is computed from the same
decoded files, and the one that reproduces the other side, with the fewest changes from
ours, is named, one line per setting that differs.

Shapes: images HWC, batches NHWC, pixels float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from parity.core.errors import UserError
from parity.data import preprocess
from parity.data.preprocess import HALF, IMAGENET_MEAN, IMAGENET_STD, Pipeline
from parity.harness import tolerance
from parity.harness.diagnosis import finding

ROW = 'pixels'
FILTERS = ('bilinear', 'bicubic', 'lanczos', 'box', 'hamming', 'nearest')  # PIL's
CROPS = (None, 0.875, 0.9, 0.95, 1.0)  # timm's default, its ViT/DeiT configs', and a short-side resize
DIAGNOSE_AT_MOST = 4  # images the search runs on: enough to tell the settings apart, cheap at 224x224


# --------------------------------------------------------------------------- the other side

def load_pil(path: str):
    """An image file as an RGB PIL image, as transformers' and timm's own loaders open it."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert('RGB')


def hf_processor_pixels(paths: Sequence[str], folder: Optional[str], size: int) -> tuple[np.ndarray, str]:
    """transformers' own `ViTImageProcessor` on the files: NHWC, and what it was.

    From the folder's preprocessor_config.json when the checkpoint is a Hugging Face
    folder that has one, else the class's defaults at the model's resolution.
    """
    from transformers import ViTImageProcessor

    if folder and os.path.isfile(os.path.join(folder, 'preprocessor_config.json')):
        processor, what = ViTImageProcessor.from_pretrained(folder), f'ViTImageProcessor from {folder}'
    else:
        processor = ViTImageProcessor(size={'height': size, 'width': size})
        what = f'ViTImageProcessor defaults at {size}x{size}'
    out = processor(images=[load_pil(p) for p in paths], return_tensors='np')['pixel_values']
    return np.asarray(out, np.float32).transpose(0, 2, 3, 1), f'transformers {what}'


def timm_transform_pixels(paths: Sequence[str], model, size: int) -> tuple[np.ndarray, str, list[str]]:
    """timm's own eval transform for `model` on the files: NHWC, what it was, notes.

    `resolve_data_config({}, model=model)` reads the model's pretrained_cfg, whose
    input_size is the released resolution even for a model built at another; the
    transform is made at the model's own resolution then, and a note says so.
    """
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    notes = []
    if tuple(config['input_size'][1:]) != (size, size):
        notes.append(f'timm\'s data config says {config["input_size"][1]}x{config["input_size"][2]}; its transform '
                     f'is made at the model\'s {size}x{size}')
        config['input_size'] = (3, size, size)
    transform = timm.data.create_transform(**config)
    out = np.stack([transform(load_pil(p)).numpy() for p in paths]).astype(np.float32)
    what = (f'timm create_transform ({config["interpolation"]}, crop_pct {config["crop_pct"]}, '
            f'mean {tuple(round(float(m), 4) for m in config["mean"])}, '
            f'std {tuple(round(float(s), 4) for s in config["std"])})')
    return out.transpose(0, 2, 3, 1), what, notes


def user_pixels(fn: Callable, spec: str, paths: Sequence[str], size: int) -> np.ndarray:
    """The user's PREPROCESS(path, size) on every file, checked: float (size, size, 3), finite; NHWC float32."""
    from parity.harness.counterparts import _beside, _where, to_numpy

    out = []
    where = getattr(fn, '_parity_path', spec)
    for path in paths:
        with _beside(where):
            try:
                got = fn(path, size)
            except Exception as e:  # the function under test failed; say where, in one line
                raise UserError(f'{spec} raised {_where(e, where)} on {path}') from None
            except SystemExit as e:
                raise UserError(f'{spec}: called sys.exit({e.code!r}) on {path} instead of returning an array') \
                    from None
        try:
            a = to_numpy(got)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f'{spec} returned {type(got).__name__} for {path}, not an array ({e})') from None
        if a.dtype.kind not in 'biuf':
            raise UserError(f'{spec} returned {type(got).__name__} for {path}, not an array of numbers')
        if a.dtype.kind != 'f':
            raise UserError(f'{spec} returned dtype {a.dtype} for {path}; return float pixels (float32 HWC)')
        if a.shape != (size, size, 3):
            hint = ' (channels first? return HWC)' if a.shape == (3, size, size) else ''
            raise UserError(f'{spec} returned shape {a.shape} for {path}; expected ({size}, {size}, 3), '
                            f'HWC at the model\'s {size}x{size}{hint}')
        if not np.isfinite(a).all():
            raise UserError(f'{spec} returned NaN or Inf for {path}')
        out.append(a.astype(np.float32))
    return np.stack(out)


# --------------------------------------------------------------------------- the search

@dataclasses.dataclass(frozen=True)
class Resize:
    """One way to bring a file to the model's square: who resizes, with which filter, cropped or not."""

    kind: str  # 'tf' (tf.image.resize, no antialiasing), 'pil' (PIL, antialiased, 8-bit) or 'tv' (torchvision, uint8)
    filter: str
    crop_pct: Optional[float]  # centre crop after resizing the short side to size / crop_pct; None: squash

    def how(self) -> str:
        return {'tf': f'tf.image.resize {self.filter}', 'pil': f'PIL {self.filter} on 8-bit pixels',
                'tv': f'torchvision {self.filter} with antialiasing on uint8 tensors (transformers 5\'s default '
                      'backend)'}[self.kind]

    def crop_words(self) -> str:
        return 'no crop' if self.crop_pct is None else f'centre crop (crop_pct {self.crop_pct:g})'


@dataclasses.dataclass(frozen=True)
class Norm:
    """value = (pixel * scale - mean) / std, per channel, pixel in 0..255."""

    name: str
    mean: tuple
    std: tuple
    scale: float = 1 / 255

    def words(self) -> str:
        return {'half': '0.5 ([-1, 1])', 'imagenet': "ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)",
                'unit': '[0, 1]', 'raw': '[0, 255]'}.get(self.name, f'{self.mean} / {self.std}')


RANGES = {'half': '[-1, 1]', 'unit': '[0, 1]', 'raw': '[0, 255]'}
NORMS = (Norm('half', HALF, HALF), Norm('imagenet', IMAGENET_MEAN, IMAGENET_STD), Norm('unit', (0.0,) * 3, (1.0,) * 3),
         Norm('raw', (0.0,) * 3, (1.0,) * 3, 1.0))


def decompose(p: Pipeline) -> Optional[tuple[Resize, Norm]]:
    """A pipeline as (resize, normalisation); None for what the search does not model (shortest_edge, no resize)."""
    if p.mode == 'official':
        return Resize('tf', 'bilinear', None), NORMS[0]
    if p.shortest_edge or not p.resize or p.crop_mode != 'center' or p.hw[0] != p.hw[1]:
        return None
    kind = 'tv' if p.mode == 'hf' and p.backend != 'pil' else 'pil'
    resize = Resize(kind, p.resample, p.crop_pct if p.mode == 'timm' else None)
    if p.mean is None:
        norm = Norm('raw' if p.rescale is None else 'custom', (0.0,) * 3, (1.0,) * 3, p.rescale or 1.0)
    else:
        norm = Norm('custom', tuple(p.mean), tuple(p.std), p.rescale or 1.0)
    same = next((n for n in NORMS if n.mean == norm.mean and n.std == norm.std
                 and math.isclose(n.scale, norm.scale)), None)
    return resize, same or norm


def _resized(paths: Sequence[str], p: Pipeline, r: Resize) -> np.ndarray:
    """The files through one resize, as pixel values 0..255 (float64, NHWC)."""
    size = p.hw[0]
    if r.kind in ('pil', 'tv'):  # tv: transformers 5's default backend, torch's own uint8 rounding
        backend = 'torchvision' if r.kind == 'tv' else 'pil'
        alt = Pipeline('timm' if r.crop_pct else 'hf', size, r.filter, True, r.crop_pct, None, None,
                       None if r.kind == 'tv' else 1.0, alpha=p.alpha, exif=p.exif, backend=backend)
        got = preprocess.load_images(paths, alt).astype(np.float64)
        return got * 255 if r.crop_pct else got  # timm's branch always divides by 255
    raw = Pipeline('hf', size, mean=None, std=None, rescale=None, alpha=p.alpha, exif=p.exif, resize=False)
    out = []
    for path in paths:
        img = preprocess.load_image(path, raw)
        if r.crop_pct is None:
            out.append(preprocess.tf_resize_bilinear(img, size, size))
            continue
        h, w = img.shape[:2]
        short = math.floor(size / r.crop_pct)
        nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        big = preprocess.tf_resize_bilinear(img, nh, nw)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        out.append(big[top:top + size, left:left + size])
    return np.stack(out).astype(np.float64)


def _normalised(pixels: np.ndarray, n: Norm, bgr: bool) -> np.ndarray:
    x = (pixels * n.scale - np.asarray(n.mean)) / np.asarray(n.std)
    return x[..., ::-1] if bgr else x


def _resizes(ours: Resize) -> list[Resize]:
    tf = [Resize('tf', 'bilinear', c) for c in CROPS]
    pil = [Resize('pil', f, c) for f in FILTERS for c in CROPS]
    tv = [Resize('tv', f, None) for f in preprocess.TORCH_FILTERS]
    return [ours] + [r for r in tf + pil + tv if r != ours]


@dataclasses.dataclass(frozen=True)
class Words:
    """How a finding names the two sides: compare says ours/theirs, verify the reference/yours."""

    ours: str = 'ours'
    theirs: str = 'theirs'


COMPARE, VERIFY = Words(), Words('the reference', 'yours')


def explain(paths: Sequence[str], p: Pipeline, theirs: np.ndarray, diff: float, bound: float,
            words: Words = COMPARE) -> list[dict]:
    """Which settings of ours, changed, reproduce their pixels: one finding per setting that differs."""
    ours = decompose(p)
    if ours is None:
        return [finding('unexplained', ROW, f'{ROW}: differ by {diff:.2e}; {p.describe()} is not one the search '
                        'models (a shortest-edge or no resize), so no cause is named')]
    paths, theirs = list(paths)[:DIAGNOSE_AT_MOST], np.asarray(theirs, np.float64)[:DIAGNOSE_AT_MOST]
    best = None  # (changes, gap, resize, norm, bgr)
    for r in _resizes(ours[0]):
        try:
            pixels = _resized(paths, p, r)
        except UserError:  # a crop larger than a tiny image: that setting cannot be theirs
            continue
        if pixels.shape != theirs.shape:
            continue
        norms = [ours[1]] + [n for n in NORMS if n != ours[1]]
        for n, bgr in itertools.product(norms, (False, True)):
            gap = float(np.abs(_normalised(pixels, n, bgr) - theirs).max())
            changes = (r.kind, r.filter) != (ours[0].kind, ours[0].filter)
            changes += (r.crop_pct != ours[0].crop_pct) + (n != ours[1]) + bgr
            key = (gap > bound, changes if gap <= bound else 0, gap)
            if best is None or key < best[0]:
                best = (key, r, n, bgr)
    if best is None or best[0][0] and best[0][2] > 0.25 * diff:
        return [finding('unexplained', ROW, f'{ROW}: differ by {diff:.2e} (bound {bound:.1e}); no combination of '
                        'antialiasing, resize filter, centre crop, mean/std, range and channel order reproduces '
                        f'{words.theirs}')]
    (_, _, gap), r, n, bgr = best
    how = '' if gap <= bound else f' (the nearest explanation: it reproduces {words.theirs} to {gap:.1e})'
    return [dict(f, message=f['message'] + how, reproduced_to=gap) for f in _name(ours, (r, n, bgr), words)]


def _name(ours: tuple[Resize, Norm], theirs: tuple[Resize, Norm, bool], w: Words) -> list[dict]:
    (r0, n0), (r, n, bgr) = ours, theirs
    out = []
    if r.filter != r0.filter:
        aa = '' if r.kind == r0.kind else (' without antialiasing' if r.kind == 'tf' else ' with antialiasing')
        aa0 = '' if r.kind == r0.kind else (' without' if r0.kind == 'tf' else ' with')
        out.append(finding('cause', ROW, f'{ROW}: {w.theirs} resize {r.filter}{aa} ({r.how()}), '
                           f'{w.ours} {r0.filter}{aa0} ({r0.how()})', 'resample', theirs=r.filter, ours=r0.filter))
    elif r.kind != r0.kind and 'tf' not in (r.kind, r0.kind):
        # Both are PIL's filters in fixed point, with different precisions: transformers' PIL and torchvision
        # backends differ this way and no other
        out.append(finding('cause', ROW, f'{ROW}: {w.theirs} resize {r.how()}, {w.ours} {r0.how()} (fixed-point '
                           'rounding apart)', 'resize_rounding', theirs=r.kind, ours=r0.kind))
    elif r.kind != r0.kind:
        with_, without = (w.ours, w.theirs) if r.kind == 'tf' else (w.theirs, w.ours)
        out.append(finding('cause', ROW, f'{ROW}: {with_} resize with antialiasing, {without} without '
                           f'({w.theirs}: {r.how()}; {w.ours}: {r0.how()})', 'antialias',
                           theirs=r.kind != 'tf', ours=r0.kind != 'tf'))
    if r.crop_pct != r0.crop_pct:
        out.append(finding('cause', ROW, f'{ROW}: {w.theirs} {r.crop_words()}, {w.ours} {r0.crop_words()}', 'crop',
                           theirs=r.crop_pct, ours=r0.crop_pct))
    if n != n0:
        if n.name in RANGES and n0.name in RANGES:
            out.append(finding('cause', ROW, f'{ROW}: {w.theirs} in {RANGES[n.name]}, {w.ours} in {RANGES[n0.name]}',
                               'range', theirs=RANGES[n.name], ours=RANGES[n0.name]))
        else:
            out.append(finding('cause', ROW, f'{ROW}: mean/std {w.theirs} {n.words()}, {w.ours} {n0.words()}',
                               'mean_std', theirs=[list(n.mean), list(n.std)], ours=[list(n0.mean), list(n0.std)]))
    if bgr:
        out.append(finding('cause', ROW, f'{ROW}: {w.theirs} channels in BGR order, {w.ours} RGB', 'channel_order'))
    return out


# --------------------------------------------------------------------------- the row

def compare(paths: Sequence[str], p: Pipeline, ours: np.ndarray, theirs: np.ndarray, words: Words = COMPARE
            ) -> tuple[dict, list[dict]]:
    """The `pixels` row (ours the reference side) and, when it fails, the findings that name the cause."""
    row = tolerance.measure(ROW, ours, theirs, tolerance.PIXELS_RTOL)
    if row['ok']:
        return row, []
    if 'candidate_shape' in row:
        h, w = row['candidate_shape'][1:3]
        return row, [finding('cause', ROW, f'{ROW}: {words.theirs} {h}x{w}, {words.ours} {ours.shape[1]}x'
                             f'{ours.shape[2]}', 'size')]
    if 'note' in row:
        return row, [finding('unexplained', ROW, f'{ROW}: {words.theirs} hold NaN or Inf')]
    return row, explain(paths, p, theirs, row['max_abs_diff'], row['bound'], words)
