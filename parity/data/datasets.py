"""Datasets for training and evaluation, shared by both frameworks: NumPy batches, NHWC float32 in [-1, 1].

Three sources behind one interface (`load(name)` returns a `Dataset`):

- `digits`: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, 10 classes,
  shipped inside the scikit-learn wheel, so no download). The split is fixed:
  `np.random.RandomState(0).permutation(1797)`, the first 1,437 images train and the last
  360 test. Pixels (0..16) are scaled to [-1, 1] and copied to 3 channels; other sizes
  are a bilinear resize. Training augmentation is by default a random sub-pixel shift of up
  to `augment.DIGITS_SHIFT` pixels each way (bilinear, background fills in), and may add a
  rotation: the official crop and flip would mirror digits and crop most of an 8x8 image away.
- any image-classification dataset of tensorflow-datasets, with the official ViT input
  pipeline (google-research/vision_transformer, `input_pipeline.py`): train images are
  randomly cropped (`sample_distorted_bounding_box`, area 0.05 to 1, any aspect ratio),
  resized to the crop size and flipped left-right half the time (`parity.data.augment` adds
  rotations, colour jitter and RandAugment, or replaces the crop); eval images are plainly
  resized; pixels map to [-1, 1] as `(x - 127.5) / 127.5`. Splits follow the official
  configs (`PRESETS`). TensorFlow is imported only when such a dataset is used.
- your own images (`parity.data.folders`): a folder of class folders, a folder of split
  folders, or a .csv/.jsonl list, read file by file through the same tf.data pipeline
  (`tf_train_batches`, `tf_eval_batches`: one function each, whatever the records are).

Determinism: the training stream is a pure function of (seed, step). Epoch e visits the
training split in an order fixed by (seed, e); global example g = step * B + i takes its
augmentation from the stateless seed (seed, g). `train_batches(start_step=k)` therefore
yields exactly what a fresh stream yields from its k-th batch on: resuming needs only the
step. With several processes, process p receives rows [p * B/P, (p+1) * B/P) of every
global batch, so the global batch is the same for any process count.

Eval batches are padded to the full batch size and carry a boolean `mask`; every split
yields ceil(n / B) batches on every process, so a jitted step sees fixed shapes.

Shapes: B global batch, Bl = B / P rows per process, S image size.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Iterator, Optional

import numpy as np

from parity.core.errors import UserError
from parity.data import augment as augmentation
from parity.data.augment import Augment

Batch = dict[str, np.ndarray]  # 'image' (Bl, S, S, 3) float32, 'label' (Bl,) int32, eval also 'mask' (Bl,) bool

DIGITS = 'digits'
DIGITS_TEST_SIZE = 360
SHUFFLE_BUFFER = 50_000  # the official config's shuffle_buffer


@dataclasses.dataclass(frozen=True)
class Preset:
    """Splits and crop size of the official fine-tuning configs."""

    train: str
    test: str
    image_size: int


# configs/common.py (cifar, imagenet); configs/augreg.py (pets with train[:90%], and the
# train/test default); every official fine-tuning crop is 384.
PRESETS = {
    'cifar10': Preset('train[:98%]', 'test', 384),
    'cifar100': Preset('train[:98%]', 'test', 384),
    'imagenet2012': Preset('train[:99%]', 'validation', 384),
    'oxford_iiit_pet': Preset('train[:90%]', 'test', 384),
    'oxford_flowers102': Preset('train', 'test', 384),
}
DEFAULT_PRESET = Preset('train', 'test', 384)


def local_rows(batch_size: int, process_index: int = 0, process_count: int = 1) -> slice:
    """The rows of each global batch that belong to one process."""
    if batch_size % process_count:
        raise UserError(f'batch size {batch_size} is not divisible by the {process_count} processes; '
                        f'pick a multiple of {process_count}')
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


def _pad(batch: Batch, rows: int) -> Batch:
    """A short eval batch padded with masked-out zero rows to `rows`."""
    n = len(batch['label'])
    out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out['mask'] = np.arange(rows) < n
    return out


class Dataset:
    """One dataset: its classes, splits, and deterministic batch streams (see the module docstring).

    `class_names` are the classes in logit order where the dataset names them (None where it
    does not); `skipped` lists the (path relative to the dataset's root, reason) of every file
    `--skip-bad-images` left out (empty for datasets that are not folders).
    """

    name: str
    num_classes: int
    preset: Preset
    class_names: Optional[tuple[str, ...]] = None
    skipped: tuple[tuple[str, str], ...] = ()

    def num_examples(self, split: str) -> int:
        raise NotImplementedError

    def train_batches(self, batch_size: int, image_size: int, seed: int, start_step: int = 0,
                      process_index: int = 0, process_count: int = 1,
                      augment: Optional[Augment] = None) -> Iterator[Batch]:
        """Endless augmented training batches of Bl rows, from global step `start_step` on.

        `augment` (see `parity.data.augment`; None: the dataset's default) says how.
        """
        raise NotImplementedError

    def _eval_stream(self, split: str, batch_size: int, image_size: int, rows: slice) -> Iterator[Batch]:
        """Unpadded local eval batches: this process's rows of each global batch, in order."""
        raise NotImplementedError

    def eval_batches(self, split: Optional[str], batch_size: int, image_size: int,
                     process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
        """Every example of `split` (default: the test split) once, in order, in ceil(n / B) padded batches."""
        split = split or self.preset.test
        rows = local_rows(batch_size, process_index, process_count)
        per = rows.stop - rows.start
        expected = math.ceil(self.num_examples(split) / batch_size)
        done = 0
        for batch in self._eval_stream(split, batch_size, image_size, rows):
            yield _pad(batch, per)
            done += 1
        empty = {'image': np.zeros((0, image_size, image_size, 3), np.float32), 'label': np.zeros((0,), np.int32)}
        for _ in range(done, expected):  # this process's rows of the last global batch may all be padding
            yield _pad(empty, per)


# --------------------------------------------------------------------------- digits

class Digits(Dataset):
    """scikit-learn's handwritten digits, held in memory; augmentation in NumPy."""

    name = DIGITS
    num_classes = 10
    preset = Preset('train', 'test', 8)
    class_names = tuple(str(i) for i in range(10))

    def __init__(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = d.images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
        order = np.random.RandomState(0).permutation(len(images))
        train, test = order[:-DIGITS_TEST_SIZE], order[-DIGITS_TEST_SIZE:]
        self._splits = {'train': (images[train], d.target[train].astype(np.int32)),
                        'test': (images[test], d.target[test].astype(np.int32))}

    def _split(self, split: str):
        if split not in self._splits:
            raise UserError(f'dataset digits has no split {split!r}; it has {", ".join(self._splits)}')
        return self._splits[split]

    def num_examples(self, split: str) -> int:
        return len(self._split(split)[1])

    @staticmethod
    def _sample(images: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Bilinear samples of (B, h, w) grey images at input positions `ys`, `xs` (broadcasting to (B, S, S),
        +1 for the padding row, clipped), background (-1) outside: (B, S, S, 3)."""
        B, h, w = images.shape
        y0, x0 = np.minimum(ys.astype(np.int64), h), np.minimum(xs.astype(np.int64), w)
        fy, fx = ys - y0, xs - x0
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)  # (B, h+2, w+2)
        b = np.arange(B)[:, None, None]
        at = lambda dy, dx: padded[b, y0 + dy, x0 + dx]  # noqa: E731 (B, S, S)
        out = (at(0, 0) * (1 - fy) * (1 - fx) + at(0, 1) * (1 - fy) * fx
               + at(1, 0) * fy * (1 - fx) + at(1, 1) * fy * fx)
        return np.repeat(out.astype(np.float32)[..., None], 3, axis=-1)  # (B, S, S, 3)

    @classmethod
    def _render(cls, images: np.ndarray, shifts: np.ndarray, image_size: int) -> np.ndarray:
        """(B, 8, 8) grey images moved by `shifts` (B, 2) pixels and resized: (B, S, S, 3).

        Bilinear with half-pixel centres, like `tf.image.resize`; background (-1) fills in
        from outside. With zero shifts and S = 8 the images come back exactly.
        """
        B, h, w = images.shape
        centres = (np.arange(image_size) + 0.5) * h / image_size - 0.5  # output pixel centres in input pixels
        ys = np.clip(centres[None, :] - shifts[:, :1] + 1, 0, h + 1)  # (B, S), +1 for the padding row
        xs = np.clip(centres[None, :] - shifts[:, 1:] + 1, 0, w + 1)  # (B, S)
        return cls._sample(images, ys[:, :, None], xs[:, None, :])  # separable: rows and columns apart

    @classmethod
    def _render_rotated(cls, images: np.ndarray, shifts: np.ndarray, angles: np.ndarray,
                        image_size: int) -> np.ndarray:
        """`_render` with each image also rotated by `angles` (B,) radians about its centre: bilinear sampling
        of the rotated, shifted output grid, background (-1) outside."""
        B, h, w = images.shape
        centres = (np.arange(image_size) + 0.5) * h / image_size - 0.5  # output pixel centres in input pixels
        mid = (h - 1) / 2
        c, s = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]  # (B, 1, 1)
        oy, ox = centres[None, :, None] - mid, centres[None, None, :] - mid  # (1, S, 1), (1, 1, S)
        # Inverse map: where in the input each output pixel comes from, then 1 for the padding row.
        ys = np.clip(c * oy + s * ox + mid - shifts[:, :1, None] + 1, 0, h + 1)  # (B, S, S)
        xs = np.clip(-s * oy + c * ox + mid - shifts[:, 1:, None] + 1, 0, w + 1)  # (B, S, S)
        return cls._sample(images, ys, xs)

    def train_batches(self, batch_size, image_size, seed, start_step=0, process_index=0, process_count=1,
                      augment=None):
        aug = augment if augment is not None else augmentation.parse(None, None, digits=True)
        if aug.crop or aug.flip or any(aug.jitter) or aug.randaug:
            raise UserError(f'--augment {aug.spec()}: digits takes shift and rotate only')
        images, labels = self._split('train')
        n = len(labels)
        rows = local_rows(batch_size, process_index, process_count)
        orders: dict[int, np.ndarray] = {}
        step = start_step
        while True:
            g = step * batch_size + np.arange(batch_size)[rows]  # global example numbers of this process's rows
            idx = np.empty(len(g), np.int64)
            for e in map(int, np.unique(g // n)):
                if e not in orders:
                    orders = {e: np.random.default_rng([seed, e]).permutation(n)}  # one epoch's order
                sel = g // n == e
                idx[sel] = orders[e][g[sel] % n]
            # Shifts are drawn for the whole global batch, then sliced: the same for any process count.
            shifts = np.random.default_rng([seed, 2 ** 31, step]).uniform(-aug.shift, aug.shift, (batch_size, 2))
            if aug.rotate:
                angles = np.random.default_rng([seed, 2 ** 31 + 1, step]).uniform(-aug.rotate, aug.rotate, batch_size)
                out = self._render_rotated(images[idx], shifts[rows], np.deg2rad(angles[rows]), image_size)
            else:  # the shift alone keeps its separable sampling, bit for bit as before rotations existed
                out = self._render(images[idx], shifts[rows], image_size)
            yield {'image': out, 'label': labels[idx]}
            step += 1

    def _eval_stream(self, split, batch_size, image_size, rows):
        images, labels = self._split(split)
        for start in range(0, len(labels), batch_size):
            sl = slice(min(start + rows.start, len(labels)), min(start + rows.stop, len(labels)))
            yield {'image': self._render(images[sl], np.zeros((sl.stop - sl.start, 2)), image_size),
                   'label': labels[sl]}


# --------------------------------------------------------------------------- tensorflow-datasets

def import_tensorflow():
    """TensorFlow, imported on first use only and kept off any GPU (JAX and PyTorch own those)."""
    import importlib.util

    if 'tensorflow' not in sys.modules and importlib.util.find_spec('triton') is not None:
        # PyTorch loads triton lazily, and triton segfaults when it loads after TensorFlow (both
        # carry their own LLVM): load it first, so eval and tests can hold both frameworks.
        import triton  # noqa: F401
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], 'GPU')
    except RuntimeError:  # already initialised by an earlier call; nothing to change
        pass
    return tf


def _online(host: str = 'storage.googleapis.com') -> bool:
    """Whether the host that serves tfds's data resolves: a quick look for a network before downloading."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _how_to_prepare(name: str, data_dir: Optional[str]) -> str:
    where = data_dir or '~/tensorflow_datasets'
    return (f'prepare it where there is network with `tfds build {name} --data_dir {where}` '
            f"(or tfds.builder('{name}', data_dir='{where}').download_and_prepare()), "
            f'then pass --data-dir {where}')


class Tfds(Dataset):
    """A tensorflow-datasets image-classification dataset through the official pipeline."""

    def __init__(self, name: str, data_dir: Optional[str] = None):
        import_tensorflow()
        import tensorflow_datasets as tfds

        self.name, self.data_dir, self._tfds = name, data_dir, tfds
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(f'--dataset {name}: unknown dataset; use digits or a tensorflow-datasets name '
                            f'such as {", ".join(PRESETS)}') from None
        features = self.builder.info.features
        if 'image' not in features or 'label' not in features or not hasattr(features['label'], 'num_classes'):
            raise UserError(f'--dataset {name}: not an image-classification dataset (needs image and label features)')
        self.num_classes = features['label'].num_classes
        names = getattr(features['label'], 'names', None)
        self.class_names = tuple(names) if names and len(names) == self.num_classes else None
        self.preset = PRESETS.get(name, DEFAULT_PRESET)
        if not self.builder.is_prepared():
            where = data_dir or 'the default data dir'
            # tfds retries a failing download for minutes: without network, say so at once.
            if not _online():
                raise UserError(f'--dataset {name}: not prepared in {where} and there is no network to download it; '
                                + _how_to_prepare(name, data_dir))
            try:  # as the official pipeline does
                self.builder.download_and_prepare()
            except Exception as e:  # download and preparation raise many kinds of errors
                raise UserError(f'--dataset {name}: not prepared in {where} and it could not be downloaded '
                                f'({type(e).__name__}: {str(e).splitlines()[0][:120]}); '
                                + _how_to_prepare(name, data_dir)) from None
        self._counts = {}

    def _read(self, split: str, shuffle_seed: Optional[int] = None):
        """(image bytes, label) records of `split`, undecoded (decoding waits until after shuffling)."""
        tfds = self._tfds
        try:
            ds = self.builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()},
                                         shuffle_files=shuffle_seed is not None,
                                         read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
        except (ValueError, KeyError, AssertionError) as e:
            raise UserError(f'--dataset {self.name}: cannot read split {split!r} '
                            f'({str(e).splitlines()[0][:160]})') from None
        return ds.map(lambda ex: (ex['image'], ex['label']))

    def num_examples(self, split: str) -> int:
        if split not in self._counts:
            n = int(self._read(split).cardinality().numpy())
            if n < 0:  # unknown cardinality: count once
                n = sum(1 for _ in self._read(split))
            self._counts[split] = n
        return self._counts[split]

    def _decode(self, image):
        tf = import_tensorflow()
        im = self.builder.info.features['image'].decode_example(image)
        if im.shape[-1] == 1:
            im = tf.image.grayscale_to_rgb(im)
        return im

    def train_batches(self, batch_size, image_size, seed, start_step=0, process_index=0, process_count=1,
                      augment=None):
        split = self.preset.train
        n = self.num_examples(split)
        base = self._read(split, shuffle_seed=seed)
        buffer = min(n, SHUFFLE_BUFFER)

        def epoch(e):
            return base.shuffle(buffer, seed=e + seed * 2 ** 32, reshuffle_each_iteration=False)

        return tf_train_batches(epoch, n, self._decode, batch_size, image_size, seed, start_step, process_index,
                                process_count, augment)

    def _eval_stream(self, split, batch_size, image_size, rows):
        return tf_eval_batches(self._read(split), self.num_examples(split), self._decode, batch_size, image_size,
                               rows)


# --------------------------------------------------------------------------- the official tf.data pipeline

def tf_train_batches(epoch, n: int, decode, batch_size: int, image_size: int, seed: int, start_step: int = 0,
                     process_index: int = 0, process_count: int = 1,
                     augment: Optional[Augment] = None) -> Iterator[Batch]:
    """The official training stream over any source of records, as NumPy batches of this process's rows.

    `epoch(e)` (e an int64 tensor) is the tf.data.Dataset of epoch e's n (image, label) records
    in that epoch's order, a pure function of (seed, e); `decode(image)` turns a record's image
    (encoded bytes, a path) into a uint8 (h, w, 3) tensor. Global example g = e * n + i takes
    its augmentation from the stateless seed (seed, g) (see the module docstring).
    """
    tf = import_tensorflow()
    aug = augment if augment is not None else augmentation.parse(None, None, digits=False)
    ops = None if aug.is_official else augmentation.tf_ops()
    rows = local_rows(batch_size, process_index, process_count)

    def numbered(e):
        return tf.data.Dataset.zip(tf.data.Dataset.range(e * n, (e + 1) * n), epoch(e))

    def transform(g, image, label):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
            tf.stack([tf.constant(seed, tf.int64), g]), 2))
        im = decode(image)
        if aug.crop:
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(im), tf.zeros([0, 0, 4], tf.float32), seed=crop_seed, area_range=(0.05, 1.0),
                min_object_covered=0, use_image_if_no_bounding_boxes=True)
            im = tf.slice(im, begin, size)
            im.set_shape([None, None, 3])  # slicing loses the channel count
        im = tf.image.resize(im, [image_size, image_size])
        if aug.flip:
            im = tf.image.stateless_random_flip_left_right(im, seed=flip_seed)
        if ops is not None:
            example = tf.stack([tf.constant(seed, tf.int64), g])
            if aug.rotate:
                im = ops.rotate(im, aug.rotate, ops.seeds(example, augmentation.ROTATE_STREAM, 1)[0])
            if any(aug.jitter):
                im = ops.jitter(im, aug.jitter, ops.seeds(example, augmentation.JITTER_STREAM, 1)[0])
            if aug.randaug:
                im = tf.image.convert_image_dtype(im / 255.0, tf.uint8, saturate=True)
                im = tf.cast(ops.randaug(im, *aug.randaug, ops.seeds(example, augmentation.RANDAUG_STREAM, 1)[0]),
                             tf.float32)
        return (im - 127.5) / 127.5, tf.cast(label, tf.int32)

    first = start_step * batch_size
    ds = tf.data.Dataset.range(first // n, 2 ** 62).flat_map(numbered).skip(first % n)
    if process_count > 1:
        ds = ds.filter(lambda g, record: (g % batch_size >= rows.start) & (g % batch_size < rows.stop))
    ds = ds.map(lambda g, record: transform(g, *record), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(rows.stop - rows.start, drop_remainder=True).prefetch(2)
    for image, label in ds.as_numpy_iterator():
        yield {'image': image, 'label': label}


def tf_eval_batches(records, n: int, decode, batch_size: int, image_size: int, rows: slice) -> Iterator[Batch]:
    """The official eval stream: `records` ((image, label), n of them, in order) plainly resized, this
    process's rows of each global batch, unpadded (`Dataset.eval_batches` pads them)."""
    tf = import_tensorflow()
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(n), records)
    ds = ds.filter(lambda g, record: (g % batch_size >= rows.start) & (g % batch_size < rows.stop))

    def resize(g, image, label):
        im = tf.image.resize(decode(image), [image_size, image_size])
        return (im - 127.5) / 127.5, tf.cast(label, tf.int32)

    ds = ds.map(lambda g, record: resize(g, *record), num_parallel_calls=tf.data.AUTOTUNE)
    for image, label in ds.batch(rows.stop - rows.start).prefetch(2).as_numpy_iterator():
        yield {'image': image, 'label': label}


def load(name: str, data_dir: Optional[str] = None, *, train_split: Optional[str] = None,
         test_split: Optional[str] = None, val_fraction: Optional[float] = None,
         skip_bad_images: bool = False) -> Dataset:
    """`digits`, a folder of images or a `.csv`/`.jsonl` list of them (`parity.data.folders`), or a
    tensorflow-datasets name; one-line errors for unknown or unprepared datasets.

    `train_split`, `test_split`, `val_fraction` and `skip_bad_images` are for folders only
    (`--train-split`, `--test-split`, `--val-fraction`, `--skip-bad-images`).
    """
    from parity.data import folders  # it builds on this module

    if folders.is_folder_dataset(name):
        if data_dir is not None:
            raise UserError(f'--data-dir {data_dir}: for tensorflow-datasets only; --dataset {name} is a folder '
                            'dataset, read where it is')
        return folders.Folder(name, train_split=train_split, test_split=test_split, val_fraction=val_fraction,
                              skip_bad_images=skip_bad_images)
    given = [flag for flag, value in (('--train-split', train_split), ('--test-split', test_split),
                                      ('--val-fraction', val_fraction), ('--skip-bad-images', skip_bad_images or None))
             if value is not None]
    if given:
        raise UserError(f'{" and ".join(given)}: for a folder of images or a .csv/.jsonl list only, not for '
                        f'--dataset {name} (its splits are fixed; pass --split to eval)')
    if name == DIGITS:
        return Digits()
    return Tfds(name, data_dir)
