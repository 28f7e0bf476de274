"""`predict`, framework-neutral: class names, the head checks, softmax, top-k and the printed table.

`vit_jax.predict` and `vit_torch.predict` only say how their model turns a batch of
images into logits; everything a user sees is decided here, once, so both print the
same thing. Bundled class names live in `parity/labels/` (see the README there).

Shapes: B images, C classes.
"""

from __future__ import annotations

import argparse
import os
from importlib import resources
from typing import Callable, Optional, Sequence

import numpy as np

from parity import cli
from parity.config import ViTConfig
from parity.errors import UserError
from parity.images import load_images

# Which bundled list names a head of this size.
BUNDLED = {1000: 'imagenet2012', 21843: 'imagenet21k'}
BATCH = 16  # images per forward pass: bounds memory on large models, one compiled shape in JAX

Forward = Callable[[np.ndarray], np.ndarray]  # NHWC float32 batch in [-1, 1] -> (B, C) logits


def bundled_labels(name: str) -> list[str]:
    """One of the class-name lists that ship with the package (`imagenet2012`, `imagenet21k`)."""
    if name not in BUNDLED.values():
        raise UserError(f'--labels {name}: no such file, nor a bundled list ({", ".join(BUNDLED.values())})')
    return _read_names(resources.files('parity').joinpath('labels', f'{name}.txt').read_text('utf-8'))


def _read_names(text: str) -> list[str]:
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:  # a trailing blank line is not a class
        names.pop()
    return names


def labels_for(num_classes: int, spec: Optional[str] = None) -> tuple[list[str], str]:
    """Class names for a head of `num_classes`, and where they came from.

    `spec` is a text file (one name per line) or a bundled list's name. Without it the
    head size picks: 1000 -> imagenet2012, 21843 -> imagenet21k, otherwise class indices.
    """
    if spec is None:
        if num_classes in BUNDLED:
            return bundled_labels(BUNDLED[num_classes]), BUNDLED[num_classes]
        return [f'class {i}' for i in range(num_classes)], 'class indices (pass --labels FILE for names)'
    if os.path.isfile(spec):
        try:
            with open(spec, encoding='utf-8') as f:
                names = _read_names(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f'--labels {spec}: cannot read it as UTF-8 text ({e})') from None
        source = spec
    else:
        names, source = bundled_labels(spec), spec
    if len(names) != num_classes:
        raise UserError(f'--labels {spec}: {len(names)} names for a head of {num_classes} classes; '
                        'pass a list with one name per line for every class, in logit order')
    return names, source


def check_head(params: dict, cfg: ViTConfig, where: str) -> None:
    """Refuses checkpoints that cannot classify an image, saying what to use instead."""
    instead = ('use a checkpoint fine-tuned for classification (e.g. an imagenet21k+imagenet2012 one) or '
               f'fine-tune this one: python -m vit_jax train --checkpoint {where} --dataset NAME --workdir DIR')
    if not cfg.num_classes:
        raise UserError(f'{where}: has no classification head (no head/kernel), it returns features, '
                        f'not classes; {instead}')
    if cfg.classifier in ('unpooled', 'token_unpooled'):
        raise UserError(f'{where}: classifier {cfg.classifier!r} gives one output per token, not one '
                        'prediction per image; pass --config with a token or gap classifier')
    if not np.any(params['head/kernel']):
        raise UserError(f'{where}: the classification head is all zeros, so every image gets the same '
                        'prediction; the raw ImageNet-21k checkpoints were released this way, for fine-tuning '
                        f'-- {instead}')


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64 so both frameworks round the same way."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities per row, largest first (ties: lower index first)."""
    return np.argsort(-probs, axis=-1, kind='stable')[..., :k]


def format_predictions(paths: Sequence[str], probs: np.ndarray, labels: Sequence[str], k: int) -> str:
    """The printed table: each image, then one `probability  index  name` line per class."""
    width = len(str(len(labels) - 1))
    lines = []
    for path, p, best in zip(paths, probs, top_k(probs, k)):
        lines.append(path)
        lines += [f'  {p[c]:.6f}  {c:>{width}}  {labels[c]}' for c in best]
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`IMAGE... --checkpoint CKPT [--config C] [--top K] [--labels F] [--image-size N]`."""
    parser.add_argument('images', nargs='+', metavar='IMAGE',
                        help='JPEG/PNG files (grayscale and RGBA are converted to RGB)')
    add_checkpoint_arguments(parser)
    parser.add_argument('--top', type=int, default=5, metavar='K', help='classes to print per image (default 5)')


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """What `predict` and `explain` share: the checkpoint, its config, class names and resolution."""
    parser.add_argument('--checkpoint', required=True, metavar='CKPT.npz',
                        help='a checkpoint with a classification head, released (or linen) npz layout')
    cli.add_config_argument(parser)
    parser.add_argument('--labels', metavar='FILE',
                        help='class names, one per line in logit order, or a bundled list (imagenet2012, '
                             'imagenet21k); default: chosen by the head size (1000, 21843), else class indices')
    parser.add_argument('--image-size', type=int, metavar='N',
                        help="resize images to NxN and build the model there, resizing the position embeddings "
                             "(default: the checkpoint's own resolution)")


def load(args: argparse.Namespace, images: Sequence[str]) -> tuple[ViTConfig, dict, list[str], str]:
    """Checkpoint (checked to classify), its class names and where they came from."""
    for path in images:
        if not os.path.isfile(path):  # before the checkpoint is read: fail fast on a typo
            raise UserError(f'{path}: no such image file')
    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    check_head(params, cfg, args.checkpoint)
    labels, source = labels_for(cfg.num_classes, args.labels)
    return cfg, params, labels, source


def predict(forward: Forward, images: np.ndarray) -> np.ndarray:
    """Probabilities for a batch, BATCH images at a time; the last chunk is padded to keep one shape."""
    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        n = len(chunk)
        if start and n < BATCH:
            chunk = np.concatenate([chunk, np.zeros((BATCH - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(softmax(forward(chunk))[:n])
    return np.concatenate(out)


def main(framework: str, make_forward: Callable[[ViTConfig, dict], Forward],
         argv: Optional[Sequence[str]] = None) -> int:
    """`python -m FRAMEWORK predict IMAGE... --checkpoint CKPT [--config C] [--top K] [--labels F]`."""
    parser = argparse.ArgumentParser(
        prog=f'python -m {framework} predict',
        description='Top-k classes for image files, with the official preprocessing: RGB, resized to the '
                    "model's resolution (bilinear), pixels scaled to [-1, 1].")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UserError(f'--top {args.top}: must be at least 1')
    cfg, params, labels, source = load(args, args.images)
    images = load_images(args.images, cfg.image_size)
    probs = predict(make_forward(cfg, params), images)
    cli.say(f'{framework}: {cli.describe(cfg)}, labels: {source}')
    print(format_predictions(args.images, probs, labels, min(args.top, cfg.num_classes)))
    return 0
