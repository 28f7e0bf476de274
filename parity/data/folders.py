"""Your own images as a dataset: a folder of class folders, a folder of split folders, or a CSV/JSON-lines list.

`--dataset PATH` names a folder dataset when PATH is an existing folder or ends in `.csv`
or `.jsonl`; anything else stays a tensorflow-datasets name (`datasets.load` decides).

Layouts:

- class folders, torchvision's and timm's `ImageFolder`: `PATH/cat/*.jpg`, `PATH/dog/*.png`.
  Classes are the visible subfolders in sorted name order; images in subfolders of a class
  folder belong to that class; files directly in PATH belong to no class and are ignored,
  as torchvision does. One split, `train`.
- split folders: `PATH/train/<class>/...` beside `PATH/val/<class>/...` or `PATH/test/<class>/...`.
  PATH is read this way when it holds a folder named as the training split (`--train-split`,
  default `train`). The classes are the training split's class folders; a held-out split may
  lack a class but not add one.
- a list: a `.csv` file of `path,label` rows (an optional `path,label` header row) or a
  `.jsonl` file of `{"path": ..., "label": ...}` lines, paths relative to the list's folder.
  Labels are names (classes in sorted name order, as for folders) or, when every label is a
  non-negative integer (a JSON number, or CSV text of digits only), class indices: classes
  0 to the largest, and `class_names` None, since the list names no class. One split, `train`.

`--val-fraction F` holds out the split `val` from `train`: a file goes to `val` when the
first 8 bytes of the SHA-256 of its path relative to the dataset's root (PATH, or the list's
folder), as a fraction of 2^64, are below F. Each file's side depends on its own path only,
so adding, removing or moving other files never moves it; each class holds out about F of
its files (exactly F only on average: small classes vary).

Every split lists its files in (class, path) order, so a folder and a list of the same files
give the same dataset and the same batches. Files are read with the extensions `predict`
reads (`parity.data.images.IMAGE_SUFFIXES`: JPEG, PNG, BMP, GIF, WebP, TIFF); other files and
hidden files and folders (a name starting with a dot) are ignored silently. Symbolic links
are followed; a link that leads back to a folder above it is refused.

The start-up scan opens every file's header (Pillow's `Image.open` and its size, no decode)
and refuses, in one line with the count and the first few paths: a class with no images,
a file that is not a readable image, an image past `MAX_IMAGE_PIXELS`, a list row whose file
is missing. With `skip_bad_images` the bad files are left out instead and listed in
`Folder.skipped` (a class left with no images is still refused). A file whose header reads
but whose data is damaged (a truncated JPEG) can only be found by decoding it: the stream
then stops with one line naming it.

Decoding happens in the `tf.data` stream, through Pillow, as `predict` reads a file
(`parity.data.preprocess.load_image`): EXIF rotation applied, transparency composited on
white, then `convert('RGB')`; the official pipeline's resize and [-1, 1] scaling follow in
TensorFlow, shared with tensorflow-datasets (`parity.data.datasets`). Only the file list is
held in memory.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import posixpath
import re
import warnings
from typing import Iterator, Optional

import numpy as np

from parity.core.errors import UserError, cause
from parity.core.limits import MAX_IMAGE_PIXELS
from parity.data import datasets
from parity.data.images import IMAGE_SUFFIXES

LIST_SUFFIXES = ('.csv', '.jsonl')
SHOWN = 3  # paths an error line shows before '...'

# The folder flags' help, one text for every command that takes them (train, eval, sweep).
DATASET_HELP = ('digits, a tensorflow-datasets name, or your own images: a folder of class folders (PATH/cat/*.jpg), '
                'a folder of split folders (PATH/train/cat/..., PATH/val/cat/...), or a .csv/.jsonl list of path,label '
                'rows (paths relative to the list)')
TRAIN_SPLIT_HELP = ('a folder dataset of split folders: the training split, the folder PATH/NAME (default: train)')
TEST_SPLIT_HELP = ("a folder dataset's held-out split: the folder PATH/NAME (default: val with --val-fraction or "
                   'where PATH/val exists, else test)')
VAL_FRACTION_HELP = ("hold out about this fraction F (0 < F < 1) of each class of a folder dataset's training "
                     'split as the split val, chosen by a hash of each file\'s path (no file moves when files are '
                     'added); the rest is train')
SKIP_BAD_IMAGES_HELP = ('leave out the files of a folder dataset that are not readable images, are past the pixel '
                        'limit, or that a list names but that do not exist, instead of refusing the dataset '
                        '(train lists them in WORKDIR/skipped.txt)')


def is_folder_dataset(name: str) -> bool:
    """Whether `--dataset name` means a folder dataset: an existing folder, or a name ending in .csv/.jsonl."""
    return os.path.isdir(name) or name.lower().endswith(LIST_SUFFIXES)


def _shown(items: list[str]) -> str:
    more = f', ... ({len(items) - SHOWN} more)' if len(items) > SHOWN else ''
    return ', '.join(items[:SHOWN]) + more


def held_out(rel: str, fraction: float) -> bool:
    """Whether the file at `rel` (its path relative to the dataset's root, '/'-separated) goes to `val`."""
    h = int.from_bytes(hashlib.sha256(os.fsencode(rel)).digest()[:8], 'big')
    return h < fraction * 2.0 ** 64


# --------------------------------------------------------------------------- reading one file


@contextlib.contextmanager
def _pillow_quiet():
    """Pillow without its own decompression-bomb check (the scan checks the size) and its metadata warnings."""
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', category=UserWarning, module='PIL')
            yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# How the stream decodes a file (`Split.kinds`): through Pillow, or TensorFlow's own decoder where that gives
# the same pixels and needs no Python: an RGB or grey JPEG without an EXIF rotation (libjpeg's accurate integer
# IDCT, as Pillow's libjpeg decodes it), an 8-bit RGB or grey PNG without transparency, animation or EXIF
# (lossless either way). tests/test_folders.py checks that they agree.
PILLOW, TF_JPEG, TF_PNG = 0, 1, 2


def _png_exif_after_data(fp, pos: int) -> bool:
    """Whether a PNG holds an eXIf chunk after its image data (Pillow's open reads the chunks before it only;
    `predict` applies that rotation): the chunk headers from `pos` on, read and skipped."""
    import struct

    while True:
        fp.seek(pos)
        head = fp.read(8)
        if len(head) < 8:
            return False  # cut short: decoding will say so
        length, kind = struct.unpack('>I4s', head)
        if kind in (b'eXIf', b'IEND'):
            return kind == b'eXIf'
        pos += 12 + length


def _kind(im) -> int:
    """How to decode an opened image (its header read), so that it gives what `decode_file` gives."""
    if im.format == 'JPEG' and im.mode in ('RGB', 'L'):
        return TF_JPEG if im.getexif().get(0x0112, 1) == 1 else PILLOW
    if (im.format == 'PNG' and im.mode in ('RGB', 'L') and len(im.tile) == 1 and im.tile[0][3] in ('RGB', 'L')
            and 'transparency' not in im.info and 'exif' not in im.info and not getattr(im, 'is_animated', False)
            and not _png_exif_after_data(im.fp, im.tile[0][2] - 8)):
        return TF_PNG
    return PILLOW


def check_header(path: str) -> tuple[Optional[str], int]:
    """Why the file at `path` cannot be used (None when it can), and how to decode it (PILLOW or TF_JPEG):
    its header read and its size checked, no decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            kind = _kind(im)
    except UnidentifiedImageError:
        return 'not a readable image (not in a format Pillow reads)', PILLOW
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return f'not a readable image ({cause(e, 100)})', PILLOW
    if w * h > MAX_IMAGE_PIXELS:
        return f'{w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} an image may have; scale it down', PILLOW
    return None, kind


class DecodeError(ValueError):
    """A file whose header read but whose data does not decode (raised inside the tf.data stream)."""


def decode_file(path) -> np.ndarray:
    """One image file as uint8 (h, w, 3), converted as `predict` converts it (`preprocess.load_image`):
    EXIF rotation applied, transparency composited on white, then RGB."""
    from PIL import Image, ImageOps

    path = os.fsdecode(path)
    try:
        with _pillow_quiet(), Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
                rgba = im.convert('RGBA')
                im = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
            return np.asarray(im.convert('RGB'), dtype=np.uint8)
    except Exception as e:  # Pillow's decoders raise many kinds; each is this file's fault
        raise DecodeError(f'{path}: not a readable image ({cause(e, 100)})') from None


def tf_decode(record):
    """A file inside a tf.data map, (path, kind) string and uint8 tensors, to a uint8 (h, w, 3) tensor: the
    pixels `decode_file` gives, through TensorFlow's decoders where they give the same (`TF_JPEG`, `TF_PNG`)."""
    tf = datasets.import_tensorflow()
    path, kind = record

    def pillow():
        return tf.numpy_function(decode_file, [path], tf.uint8, stateful=False)

    def jpeg():
        return tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method='INTEGER_ACCURATE')

    def png():
        return tf.io.decode_png(tf.io.read_file(path), channels=3)

    return tf.ensure_shape(tf.switch_case(tf.cast(kind, tf.int32), [pillow, jpeg, png]), [None, None, 3])


# --------------------------------------------------------------------------- finding the files


@dataclasses.dataclass
class Split:
    """One split's files in (class, path) order: paths relative to the root ('/'-separated) and labels."""

    paths: list[str]
    labels: np.ndarray  # (n,) int32
    kinds: np.ndarray  # (n,) uint8: PILLOW, TF_JPEG or TF_PNG

    def subset(self, keep: np.ndarray) -> 'Split':
        return Split([p for p, k in zip(self.paths, keep) if k], self.labels[keep], self.kinds[keep])

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


class _Scan:
    """The start-up scan of one dataset: files found, bad files, one error line for what cannot be used."""

    def __init__(self, name: str, root: str):
        self.name, self.root = name, root
        self.bad: list[tuple[str, str]] = []

    def walk(self, folder: str, rel: str, ancestors: frozenset = frozenset()) -> Iterator[str]:
        """The image files under `folder` (relative paths, sorted, following links), recursively."""
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                raise UserError(f'--dataset {self.name}: {rel} is a symbolic link loop (it leads back to a folder '
                                'above it); remove the link')
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise UserError(f'--dataset {self.name}: cannot list the folder {rel or "."} ({cause(e, 100)})') from None
        for entry in entries:
            if entry.name.startswith('.'):
                continue
            child = f'{rel}/{entry.name}' if rel else entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                yield from self.walk(entry.path, child, ancestors | {key})
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                yield child

    def usable(self, rel: str) -> Optional[int]:
        """Checks one file's header: how to decode it, or None for a bad one (noted)."""
        path = os.path.join(self.root, rel)
        if os.path.isfile(path):
            reason, kind = check_header(path)
        else:
            reason, kind = ('broken symbolic link' if os.path.islink(path) else 'no such file'), PILLOW
        if reason is not None:
            self.bad.append((rel, reason))
            return None
        return kind

    def refuse_bad(self, skip: bool) -> tuple[tuple[str, str], ...]:
        if self.bad and not skip:
            raise UserError(f'--dataset {self.name}: {len(self.bad)} bad image file(s): '
                            f'{_shown([f"{p} ({r})" for p, r in self.bad])}; fix or remove them, or pass '
                            '--skip-bad-images to go on without them')
        return tuple(self.bad)


def _subfolders(name: str, folder: str) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted(e.name for e in it if not e.name.startswith('.') and e.is_dir())
    except OSError as e:
        raise UserError(f'--dataset {name}: cannot list {folder} ({cause(e, 100)})') from None


def _read_list(name: str) -> list[tuple[str, str, bool]]:
    """(path, label, whether the label is an integer) rows of a .csv or .jsonl list, checked for form."""
    rows = []
    try:
        with open(name, newline='', encoding='utf-8') as f:
            if name.lower().endswith('.csv'):
                reader = csv.reader(f)
                first = True
                for row in reader:
                    cells = [c.strip() for c in row]
                    if not any(cells):
                        continue
                    if first and [c.lower() for c in cells] == ['path', 'label']:
                        first = False
                        continue
                    first = False
                    if len(cells) != 2 or not cells[0] or not cells[1]:
                        raise UserError(f'--dataset {name}: line {reader.line_num} is {",".join(row)[:80]!r}; each row '
                                        'is path,label (an optional path,label header first)')
                    integer = re.fullmatch(r'-?[0-9]+', cells[1]) is not None
                    rows.append((cells[0], str(int(cells[1])) if integer else cells[1], integer))
            else:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        d = json.loads(line)
                    except ValueError as e:
                        raise UserError(f'--dataset {name}: line {lineno} is not JSON ({cause(e, 80)})') from None
                    label = d.get('label') if isinstance(d, dict) else None
                    if (not isinstance(d, dict) or not isinstance(d.get('path'), str) or not d['path']
                            or isinstance(label, bool) or not isinstance(label, (str, int)) or label == ''):
                        raise UserError(f'--dataset {name}: line {lineno} is {line.strip()[:80]!r}; each line is '
                                        '{"path": "...", "label": NAME_OR_INDEX}')
                    rows.append((d['path'], str(label), isinstance(label, int)))
    except OSError as e:
        raise UserError(f'--dataset {name}: cannot read it ({cause(e, 100)})') from None
    except UnicodeDecodeError:
        raise UserError(f'--dataset {name}: not UTF-8 text; save the list as UTF-8') from None
    except csv.Error as e:
        raise UserError(f'--dataset {name}: not a readable CSV ({cause(e, 100)})') from None
    if not rows:
        raise UserError(f'--dataset {name}: holds no rows; each row is path,label')
    return rows


# --------------------------------------------------------------------------- the dataset


class Folder(datasets.Dataset):
    """A folder of images or a list of them, streamed through the official tf.data pipeline (module docstring)."""

    _split_folders: tuple = ()  # the split folders of a split layout, scanned when first asked for

    def __init__(self, name: str, *, train_split: Optional[str] = None, test_split: Optional[str] = None,
                 val_fraction: Optional[float] = None, skip_bad_images: bool = False):
        self.name = name
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise UserError(f'--val-fraction {val_fraction:g}: a fraction between 0 and 1 (0.1 holds out a tenth)')
        self.val_fraction = val_fraction
        if name.lower().endswith(LIST_SUFFIXES) and not os.path.isdir(name):
            splits, classes, names = self._from_list(name, train_split, test_split, skip_bad_images)
        else:
            splits, classes, names = self._from_folder(name, train_split, test_split, skip_bad_images)
        self.num_classes, self.class_names = classes, names
        self._splits = splits
        train = self.preset.train
        self._refuse_empty(splits[train].counts(classes), '')
        if val_fraction is not None:
            whole = splits.pop(train)
            out = np.array([held_out(p, val_fraction) for p in whole.paths], bool)
            splits[train], splits['val'] = whole.subset(~out), whole.subset(out)
            self._refuse_empty(splits[train].counts(classes), ' after --val-fraction held out its files')

    def _refuse_empty(self, counts: np.ndarray, why: str) -> None:
        """One error naming the classes with no training images (`why`: after what), if any."""
        if (counts == 0).any():
            empty = [self._class(i) for i in np.flatnonzero(counts == 0)]
            what = 'no training images' + why if why else 'no images (an empty class folder, or only bad files)'
            raise UserError(f'--dataset {self.name}: {len(empty)} class(es) with {what}: {_shown(empty)}; '
                            'add images to them or remove them' + (', or lower --val-fraction' if why else ''))

    def _class(self, i: int) -> str:
        return self.class_names[i] if self.class_names is not None else str(i)

    # ---- layouts

    def _from_list(self, name, train_split, test_split, skip):
        if not os.path.isfile(name):
            raise UserError(f'--dataset {name}: no such file (a .csv or .jsonl list of path,label rows)')
        for flag, value, allowed in (('--train-split', train_split, ('train',)),
                                     ('--test-split', test_split, ('val',))):
            if value is not None and value not in allowed:
                raise UserError(f'{flag} {value}: a list holds one split, train (and val with --val-fraction)')
        if test_split is not None and self.val_fraction is None:
            raise UserError(f'--test-split {test_split}: a list has no held-out split; pass --val-fraction F')
        rows = _read_list(name)
        if all(integer for _, _, integer in rows):
            if any(text.startswith('-') for _, text, _ in rows):
                raise UserError(f'--dataset {name}: a negative class index; label the classes 0, 1, 2, ...')
            index = {text: int(text) for _, text, _ in rows}
            classes, names = max(index.values()) + 1, None
        else:
            names = tuple(sorted({text for _, text, _ in rows}))
            index = {n: i for i, n in enumerate(names)}
            classes = len(names)
        scan = _Scan(name, os.path.dirname(os.path.abspath(name)))
        entries = sorted((index[text], posixpath.normpath(path.replace(os.sep, '/'))) for path, text, _ in rows)
        with _pillow_quiet():
            kept = [(label, rel, kind) for label, rel in entries for kind in [scan.usable(rel)] if kind is not None]
        self.skipped = scan.refuse_bad(skip)
        self.root = scan.root
        self.preset = datasets.Preset('train', 'val' if self.val_fraction is not None else 'test', 384)
        return {'train': _split_of(kept)}, classes, names

    def _from_folder(self, name, train_split, test_split, skip):
        root = name
        top = _subfolders(name, root)
        train = train_split or 'train'
        self.root = root
        scan = _Scan(name, root)
        if train in top:  # split folders
            if 'val' in top and self.val_fraction is not None:
                raise UserError(f'--val-fraction: {os.path.join(name, "val")} already holds a held-out split; '
                                'drop --val-fraction, or pass --test-split for another split folder')
            test = test_split or ('val' if self.val_fraction is not None or 'val' in top else 'test')
            if test_split is not None and test_split not in top and not (self.val_fraction and test_split == 'val'):
                raise UserError(f'--test-split {test_split}: no folder {os.path.join(name, test_split)}; '
                                f'{name} holds {", ".join(top)}')
            names = tuple(_subfolders(name, os.path.join(root, train)))
            if not names:
                raise UserError(f'--dataset {name}: {os.path.join(name, train)} holds no class folders; '
                                f'put each class\'s images in {os.path.join(name, train, "CLASS")}/')
            self._split_folders, self._scan, self._skip = tuple(top), scan, skip
            splits = {train: self._scan_split(train, names)}
            if test in top and test != train:
                splits[test] = self._scan_split(test, names)
        else:
            if train_split is not None:
                raise UserError(f'--train-split {train_split}: no folder {os.path.join(name, train_split)}; '
                                f'{name} holds the class folders {_shown(top) if top else "(none)"}')
            if test_split is not None and not (self.val_fraction is not None and test_split == 'val'):
                raise UserError(f'--test-split {test_split}: {name} is a folder of class folders, one split; '
                                'hold out a part with --val-fraction F (the split val)')
            if not top:
                raise UserError(f'--dataset {name}: holds no class folders; put each class\'s images in '
                                f'{os.path.join(name, "CLASS")}/ (or the splits in {name}/train/CLASS/)')
            test = 'val' if self.val_fraction is not None else 'test'
            names = tuple(top)
            self._split_folders, self._scan, self._skip = (), scan, skip
            splits = {train: self._scan_classes('', names)}
        self.skipped = scan.refuse_bad(skip)
        self.preset = datasets.Preset(train, test, 384)
        return splits, len(names), names

    def _scan_split(self, split: str, names: tuple[str, ...]) -> Split:
        extra = [c for c in _subfolders(self.name, os.path.join(self.root, split)) if c not in names]
        if extra:
            raise UserError(f'--dataset {self.name}: {os.path.join(self.name, split)} has class folders the '
                            f'training split lacks: {_shown(extra)}; every class must have training images')
        return self._scan_classes(split, names, need_all=False)

    def _scan_classes(self, prefix: str, names: tuple[str, ...], need_all: bool = True) -> Split:
        scan = self._scan
        entries = []
        with _pillow_quiet():
            for label, cls in enumerate(names):
                folder = f'{prefix}/{cls}' if prefix else cls
                if not os.path.isdir(os.path.join(self.root, folder)):
                    continue  # a held-out split may lack a class
                entries += [(label, rel, kind) for rel in scan.walk(os.path.join(self.root, folder), folder)
                            for kind in [scan.usable(rel)] if kind is not None]
        return _split_of(entries)

    # ---- the Dataset interface

    def _split(self, split: str) -> Split:
        if split not in self._splits and split in self._split_folders and self.class_names is not None:
            bad = len(self._scan.bad)
            self._splits[split] = self._scan_split(split, self.class_names)
            if len(self._scan.bad) > bad:
                self.skipped = self._scan.refuse_bad(self._skip)
        if split not in self._splits:
            have = sorted(self._splits) + [s for s in self._split_folders if s not in self._splits]
            hint = '; hold out a part of train with --val-fraction F (the split val)' if self.val_fraction is None \
                else ''
            raise UserError(f'--dataset {self.name}: has no split {split!r}; it has {", ".join(have)}{hint}')
        return self._splits[split]

    def num_examples(self, split: str) -> int:
        return len(self._split(split).paths)

    def counts(self, split: str) -> tuple[int, ...]:
        """Images per class of `split`, in class order."""
        return tuple(int(c) for c in self._split(split).counts(self.num_classes))

    def summary(self) -> str:
        """One line for a command to print: classes, images per split and per class, files skipped."""
        parts = []
        for split in (self.preset.train, self.preset.test):
            if split in self._splits:
                c = self.counts(split)
                parts.append(f'{sum(c):,} {split} images ({min(c):,} to {max(c):,} per class)')
        skipped = f'; {len(self.skipped)} bad file(s) skipped' if self.skipped else ''
        return f'{self.name}: {self.num_classes} classes, {", ".join(parts)}{skipped}'

    def _tensors(self, split: str):
        """The split's records as tensors: ((absolute path, kind), label), n of them."""
        tf = datasets.import_tensorflow()
        s = self._split(split)
        if not s.paths:
            raise UserError(f'--dataset {self.name}: the split {split!r} holds no images'
                            + ('; raise --val-fraction' if split == 'val' and self.val_fraction else ''))
        # Bytes, as the file system names them: a name that is not UTF-8 still reaches the file.
        paths = tf.constant(np.array([os.fsencode(os.path.join(self.root, p)) for p in s.paths], dtype=object),
                            tf.string)
        return (paths, tf.constant(s.kinds, tf.uint8)), tf.constant(s.labels, tf.int32), len(s.paths)

    def train_batches(self, batch_size, image_size, seed, start_step=0, process_index=0, process_count=1,
                      augment=None):
        tf = datasets.import_tensorflow()
        (paths, kinds), labels, n = self._tensors(self.preset.train)

        def epoch(e):
            # The whole epoch's order, a stateless permutation of (seed, epoch): n int64s, beside the list.
            order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=tf.stack(
                [tf.constant(seed, tf.int64), e]))
            return tf.data.Dataset.from_tensor_slices(order).map(
                lambda i: ((tf.gather(paths, i), tf.gather(kinds, i)), tf.gather(labels, i)))

        rows = datasets.local_rows(batch_size, process_index, process_count)

        def files_of(k: int) -> list[str]:  # the files of the k-th batch this stream yields
            g = (start_step + k) * batch_size + np.arange(rows.start, rows.stop)
            found = []
            for e in np.unique(g // n):
                order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=tf.constant(
                    [seed, int(e)], tf.int64)).numpy()
                found += [self._path(self.preset.train, int(i)) for i in order[g[g // n == e] % n]]
            return found

        return _decode_errors(datasets.tf_train_batches(epoch, n, tf_decode, batch_size, image_size, seed, start_step,
                                                        process_index, process_count, augment), files_of)

    def _eval_stream(self, split, batch_size, image_size, rows):
        tf = datasets.import_tensorflow()
        files, labels, n = self._tensors(split)
        records = tf.data.Dataset.from_tensor_slices((files, labels))

        def files_of(k: int) -> list[str]:
            start = k * batch_size
            return [self._path(split, i) for i in range(start + rows.start, min(start + rows.stop, n))]

        return _decode_errors(datasets.tf_eval_batches(records, n, tf_decode, batch_size, image_size, rows), files_of)

    def _path(self, split: str, i: int) -> str:
        return os.path.join(self.root, self._split(split).paths[i])


def _split_of(entries: list[tuple[int, str, int]]) -> Split:
    """A split from (label, relative path, kind) entries, in (class, path) order."""
    entries.sort()
    return Split([rel for _, rel, _ in entries], np.array([label for label, _, _ in entries], np.int32).reshape(-1),
                 np.array([kind for _, _, kind in entries], np.uint8).reshape(-1))


def _decode_errors(batches: Iterator[datasets.Batch], files_of) -> Iterator[datasets.Batch]:
    """A stream whose decode failure (a damaged file the header scan could not see) is one UserError line.

    `files_of(k)` lists the files of the k-th batch: the one that failed is found by decoding
    them again, the way `predict` would.
    """
    op_error = datasets.import_tensorflow().errors.OpError  # held here: at interpreter exit tf may be gone
    done = 0
    try:
        for batch in batches:
            yield batch
            done += 1
    except op_error as e:
        for path in files_of(done):
            try:
                decode_file(path)
            except DecodeError as bad:
                raise UserError(f'{bad}; its header reads but its data does not decode: '
                                'remove or replace it') from None
        raise UserError(f'a file of batch {done} does not decode ({cause(e, 160)}); '
                        'remove or replace the damaged file') from None
