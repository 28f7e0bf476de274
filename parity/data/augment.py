"""Training augmentation beyond the official crop and flip: the `--augment` list and RandAugment.

`--augment` is a comma-separated list of transforms, applied in this order:

- `crop`: the official Inception crop (area 0.05 to 1, any aspect ratio), resized to the
  training size; without it the whole image is resized (the CIFAR-10 recipe's `Resize`).
- `flip`: left-right, half the time.
- `rotate=D`: a random rotation by U(-D, D) degrees about the centre, bilinear, the corners
  filled black (torchvision's `RandomRotation` fill).
- `jitter=F` or `jitter=B:C:S:H`: torchvision's `ColorJitter` in a fixed order, brightness
  and contrast and saturation factors from U(1 - F, 1 + F), the hue shifted by U(-H, H)
  of the colour circle (`jitter=F` takes H = F / 4: `jitter=0.4` is 0.4, 0.4, 0.4, 0.1).
- `shift=P`: digits only, a sub-pixel shift of up to P pixels each way (its default).
- `none`: nothing.

The default is `crop,flip` for tensorflow-datasets (the official pipeline) and `shift=1`
for digits, where flips and crops make no sense on an 8x8 digit (`rotate` is allowed).

`--randaug N,M` is big_vision's RandAugment (`pp/autoaugment.py`, from the TPU EfficientNet
code): N times, one of 16 operations chosen uniformly, at magnitude M on its scale of 10
(M above 10 extrapolates, as AugReg's 15 and 20 do), on the uint8 image after the list
above; grey 128 fills what geometric operations uncover.

Every random draw is stateless: example g of a run with seed s draws from seeds folded
from (s, g), so an example's augmentation is the same whenever (and on whichever process)
it is made, and resuming needs only the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from parity.core.errors import UserError

ITEMS = ('crop', 'flip', 'rotate', 'jitter', 'shift', 'none')
DIGITS_ITEMS = ('shift', 'rotate', 'none')
RANDAUG_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color', 'Contrast',
               'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
DIGITS_SHIFT = 1.0  # pixels each way: the digits default
MAX_LEVEL = 10.0
GREY = 128  # what RandAugment's geometric operations fill in
CUTOUT_CONST, TRANSLATE_CONST = 40, 100  # big_vision's RandAugment hyper-parameters

# Seed streams folded into an example's seed (crop and flip keep the official pair).
ROTATE_STREAM, JITTER_STREAM, RANDAUG_STREAM = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Augment:
    """One training augmentation, parsed and checked; `spec()` gives it back as the flag says it."""

    crop: bool = False
    flip: bool = False
    rotate: float = 0.0  # degrees
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue
    shift: float = 0.0  # pixels (digits)
    randaug: Optional[tuple[int, int]] = None  # (layers, magnitude)

    def spec(self) -> str:
        items = [name for name in ('crop', 'flip') if getattr(self, name)]
        if self.rotate:
            items.append(f'rotate={self.rotate:g}')
        if any(self.jitter):
            items.append('jitter=' + ':'.join(f'{v:g}' for v in self.jitter))
        if self.shift:
            items.append(f'shift={self.shift:g}')
        return ','.join(items) or 'none'

    @property
    def is_official(self) -> bool:
        """The official tfds pipeline, crop then flip and nothing else: its code path, bit for bit."""
        return self == Augment(crop=True, flip=True)


def _parse_item_number(item: str, text: str, low: float, high: float) -> float:
    """The number `text` of the --augment item `item`, in [low, high], or a one-line error naming the item."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise UserError(f'--augment {item}: expected a number from {low:g} to {high:g}')
    return value


def parse(spec: Optional[str], randaug: Optional[str], digits: bool) -> Augment:
    """`--augment SPEC` and `--randaug N,M` for a dataset (digits or tfds); None: the dataset's default."""
    if spec is None:
        spec = f'shift={DIGITS_SHIFT:g}' if digits else 'crop,flip'
    fields: dict = {}
    for item in (i.strip() for i in spec.split(',')):
        name, _, value = item.partition('=')
        allowed = DIGITS_ITEMS if digits else tuple(i for i in ITEMS if i != 'shift')
        if name not in ITEMS:
            raise UserError(f'--augment {spec}: unknown transform {name!r}; expected some of {", ".join(allowed)}, '
                            'comma-separated')
        if name not in allowed:
            why = ('an 8x8 digit mirrored or cropped is another digit or none' if digits
                   else 'shift is the digits transform; use crop or rotate')
            raise UserError(f'--augment {spec}: {name} is not available on this dataset ({why}); '
                            f'expected some of {", ".join(allowed)}')
        if name in fields:
            raise UserError(f'--augment {spec}: {name} is given twice')
        needs_value = name in ('rotate', 'jitter', 'shift')
        if needs_value != bool(value):
            raise UserError(f'--augment {spec}: {name} ' + (f'needs a value ({name}=...)' if needs_value
                                                            else 'takes no value'))
        if name in ('crop', 'flip'):
            fields[name] = True
        elif name == 'rotate':
            fields[name] = _parse_item_number(item, value, 0, 180)
        elif name == 'shift':
            fields[name] = _parse_item_number(item, value, 0, 4)
        elif name == 'jitter':
            parts = value.split(':')
            if len(parts) == 1:
                f = _parse_item_number(item, parts[0], 0, 1)
                fields[name] = (f, f, f, min(f / 4, 0.5))
            elif len(parts) == 4:
                fields[name] = tuple(_parse_item_number(item, p, 0, 0.5 if i == 3 else 1)
                                     for i, p in enumerate(parts))
            else:
                raise UserError(f'--augment {item}: expected jitter=F or jitter=B:C:S:H')
        else:
            fields['none'] = True
    if fields.pop('none', False) and fields:
        raise UserError(f'--augment {spec}: none cannot go with other transforms')
    if randaug is not None:
        try:
            n, m = (int(v) for v in randaug.split(','))
        except ValueError:
            raise UserError(f'--randaug {randaug}: expected N,M, two whole numbers (layers and magnitude)') from None
        if not (0 <= n <= 10 and 0 <= m <= 30):
            raise UserError(f'--randaug {randaug}: layers must lie in 0..10 and magnitude in 0..30')
        if digits and n:
            raise UserError(f'--randaug {randaug}: RandAugment works on colour photographs (uint8 RGB) and digits '
                            'has none; pass --randaug 0,0 to turn it off')
        fields['randaug'] = (n, m) if n else None
    return Augment(**fields)


# --------------------------------------------------------------------------- TensorFlow (tf.data)

def tf_ops():
    """The TensorFlow transforms, built on first use (TensorFlow loads only for tfds datasets)."""
    from parity.data.datasets import import_tensorflow

    tf = import_tensorflow()

    def seeds(seed, stream, n):
        return tf.unstack(tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(seed, stream), n))

    def transform(image, matrix, fill, interpolation='BILINEAR'):
        """`image` (h, w, 3) float through the projective `matrix` (8 numbers, output to input)."""
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
            output_shape=tf.shape(image)[:2], fill_value=tf.cast(fill, tf.float32), interpolation=interpolation,
            fill_mode='CONSTANT')
        return out[0]

    def rotation(image, radians, fill, interpolation='BILINEAR'):
        """Counter-clockwise about the centre, as tensorflow-addons' `rotate`."""
        h, w = (tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(image)[:2]))
        c, s = tf.cos(radians), tf.sin(radians)
        dx = ((w - 1) - (c * (w - 1) - s * (h - 1))) / 2
        dy = ((h - 1) - (s * (w - 1) + c * (h - 1))) / 2
        return transform(image, tf.stack([c, -s, dx, s, c, dy, 0.0, 0.0]), fill, interpolation)

    def grey(image):
        return tf.image.rgb_to_grayscale(image)  # (h, w, 1), ITU-R 601 weights as torchvision

    def rotate(image, degrees, seed):
        angle = tf.random.stateless_uniform([], seed, -degrees, degrees) * (math.pi / 180)
        return rotation(image, angle, 0.0)

    def jitter(image, amounts, seed):
        """torchvision's ColorJitter on a float image in [0, 255]: brightness, contrast, saturation, hue."""
        b, c, s, h = amounts
        kb, kc, ks, kh = seeds(seed, 0, 4)
        factor = lambda f, k: tf.random.stateless_uniform([], k, max(0.0, 1 - f), 1 + f)  # noqa: E731
        if b:
            image = tf.clip_by_value(image * factor(b, kb), 0, 255)
        if c:
            mean = tf.reduce_mean(grey(image))
            image = tf.clip_by_value(mean + factor(c, kc) * (image - mean), 0, 255)
        if s:
            g = grey(image)
            image = tf.clip_by_value(g + factor(s, ks) * (image - g), 0, 255)
        if h:
            image = tf.image.adjust_hue(image / 255.0, tf.random.stateless_uniform([], kh, -h, h)) * 255.0
        return image

    # RandAugment's operations, on uint8 images, each `(image, level, sign, seed) -> image`.
    def blend(a, b, factor):
        """a + factor (b - a) in float, clipped to uint8 (factor 0: a, 1: b, above 1 extrapolates)."""
        a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
        return tf.cast(tf.clip_by_value(a + factor * (b - a), 0, 255), tf.uint8)

    def enhance(level):
        return level / MAX_LEVEL * 1.8 + 0.1

    def geometric(image, matrix):
        return tf.cast(transform(tf.cast(image, tf.float32), matrix, GREY, 'NEAREST'), tf.uint8)

    def autocontrast(image, *_):
        def channel(x):
            lo, hi = tf.cast(tf.reduce_min(x), tf.float32), tf.cast(tf.reduce_max(x), tf.float32)
            scale = 255.0 / tf.maximum(hi - lo, 1e-6)
            scaled = tf.cast(tf.clip_by_value((tf.cast(x, tf.float32) - lo) * scale, 0, 255), tf.uint8)
            return tf.where(hi > lo, scaled, x)
        return tf.stack([channel(image[..., i]) for i in range(3)], -1)

    def equalize(image, *_):
        def channel(x):
            x = tf.cast(x, tf.int32)
            hist = tf.histogram_fixed_width(x, [0, 255], nbins=256)
            nonzero = tf.boolean_mask(hist, hist > 0)
            step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
            lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
            lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
            return tf.cast(tf.where(step == 0, x, tf.gather(lut, x)), tf.uint8)
        return tf.stack([channel(image[..., i]) for i in range(3)], -1)

    def invert(image, *_):
        return 255 - image

    def rotate_op(image, level, sign, _):
        radians = sign * level / MAX_LEVEL * 30.0 * (math.pi / 180)
        return tf.cast(rotation(tf.cast(image, tf.float32), radians, GREY, 'NEAREST'), tf.uint8)

    def posterize(image, level, *_):
        shift = max(8 - int(level / MAX_LEVEL * 4), 0)  # magnitudes past 20 keep every bit
        return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)

    def solarize(image, level, *_):
        threshold = int(level / MAX_LEVEL * 256)
        return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)

    def solarize_add(image, level, *_):
        added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + int(level / MAX_LEVEL * 110), 0, 255), tf.uint8)
        return tf.where(image < 128, added, image)

    def color(image, level, *_):
        return blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, enhance(level))

    def contrast(image, level, *_):
        mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
        degenerate = tf.cast(tf.fill(tf.shape(image), tf.clip_by_value(mean, 0, 255)), tf.uint8)
        return blend(degenerate, image, enhance(level))

    def brightness(image, level, *_):
        return blend(tf.zeros_like(image), image, enhance(level))

    def sharpness(image, level, *_):
        x = tf.cast(image, tf.float32)[None]
        kernel = tf.tile(tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32, [3, 3, 1, 1]) / 13.0,
                         [1, 1, 3, 1])
        smooth = tf.cast(tf.clip_by_value(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID'), 0, 255),
                         tf.uint8)[0]
        inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])  # the border keeps the original pixels
        smooth = tf.where(inner == 1, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
        return blend(smooth, image, enhance(level))

    def shear_x(image, level, sign, _):
        return geometric(image, tf.stack([1.0, sign * level / MAX_LEVEL * 0.3, 0, 0, 1, 0, 0, 0]))

    def shear_y(image, level, sign, _):
        return geometric(image, tf.stack([1.0, 0, 0, sign * level / MAX_LEVEL * 0.3, 1, 0, 0, 0]))

    def translate_x(image, level, sign, _):
        return geometric(image, tf.stack([1.0, 0, sign * level / MAX_LEVEL * TRANSLATE_CONST, 0, 1, 0, 0, 0]))

    def translate_y(image, level, sign, _):
        return geometric(image, tf.stack([1.0, 0, 0, 0, 1, sign * level / MAX_LEVEL * TRANSLATE_CONST, 0, 0]))

    def cutout(image, level, _, seed):
        pad = int(level / MAX_LEVEL * CUTOUT_CONST)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        ky, kx = seeds(seed, 0, 2)
        cy = tf.random.stateless_uniform([], ky, 0, h, dtype=tf.int32)
        cx = tf.random.stateless_uniform([], kx, 0, w, dtype=tf.int32)
        ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
        inside = (ys >= cy - pad) & (ys < cy + pad) & (xs >= cx - pad) & (xs < cx + pad)  # a 2 pad square
        return tf.where(inside[..., None], tf.constant(GREY, tf.uint8), image)

    ops = dict(zip(RANDAUG_OPS, (autocontrast, equalize, invert, rotate_op, posterize, solarize, color, contrast,
                                 brightness, sharpness, shear_x, shear_y, translate_x, translate_y, cutout,
                                 solarize_add)))

    def randaug(image, layers: int, magnitude: int, seed):
        """RandAugment on a uint8 (h, w, 3) image: `layers` operations, each chosen uniformly."""
        for layer in range(layers):
            k_op, k_sign, k_op_seed = seeds(seed, layer, 3)
            which = tf.random.stateless_uniform([], k_op, 0, len(RANDAUG_OPS), dtype=tf.int32)
            sign = tf.where(tf.random.stateless_uniform([], k_sign) < 0.5, -1.0, 1.0)
            branches = [lambda f=ops[name]: f(image, float(magnitude), sign, k_op_seed) for name in RANDAUG_OPS]
            image = tf.switch_case(which, branches)
            image.set_shape([None, None, 3])
        return image

    return dataclasses.make_dataclass('TfOps', ['seeds', 'rotate', 'jitter', 'randaug', 'ops'])(
        seeds, rotate, jitter, randaug, ops)
