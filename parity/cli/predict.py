"""`python -m vit_jax|vit_torch predict`, framework-neutral: the head checks, softmax, top-k and the table.

Each framework only says how its model turns a batch of images into logits (a
`cli.Forward`); everything a user sees is decided here, once, so both print the same
thing. Class names come from `parity.data.class_names`.

Shapes: B images, C classes.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional, Sequence

import numpy as np

from parity import cli
from parity.core import limits
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data.class_names import labels_for
from parity.data.images import load_images

BATCH = 16  # images per forward pass: bounds memory on large models, one compiled shape in JAX


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
    cli.add_checkpoint_argument(parser, '--checkpoint')
    cli.add_config_argument(parser)
    parser.add_argument('--labels', metavar='FILE',
                        help='class names, one per line in logit order, or a bundled list (imagenet2012, '
                             'imagenet21k); default: the checkpoint\'s own (a Hugging Face id2label), else chosen by '
                             'the head size (1000, 21843), else class indices')
    parser.add_argument('--image-size', type=cli.positive_int, metavar='N',
                        help="resize images to NxN and build the model there, resizing the position embeddings "
                             "(default: the checkpoint's own resolution; 224 for sincos2d models, which store none)")


def load(args: argparse.Namespace, images: Sequence[str]) -> tuple[ViTConfig, dict, list[str], str]:
    """Checkpoint (checked to classify), its class names and where they came from."""
    for path in images:
        if not os.path.isfile(path):  # before the checkpoint is read: fail fast on a typo
            raise UserError(f'{path}: no such image file')
    model = cli.load_model(args.checkpoint, args.config, args.image_size, numerics=args.numerics)
    cfg, params = model.cfg, model.params
    check_head(params, cfg, args.checkpoint)
    own = model.checkpoint.labels
    if args.labels is None and own is not None and len(own) == cfg.num_classes:
        return cfg, params, own, f'{args.checkpoint} (its id2label)'
    labels, source = labels_for(cfg.num_classes, args.labels)
    return cfg, params, labels, source


def predict(forward: cli.Forward, images: np.ndarray) -> np.ndarray:
    """Probabilities for a batch, BATCH images at a time; the last chunk is padded to keep one shape."""
    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        n = len(chunk)
        if start and n < BATCH:
            chunk = np.concatenate([chunk, np.zeros((BATCH - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(softmax(forward(chunk))[:n])
    return np.concatenate(out)


def main(framework: str, make_forward: Callable[[ViTConfig, dict], cli.Forward],
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
    limits.check_compute(len(args.images) * cfg.image_size ** 2 * 3 * 4 + limits.inference_bytes(cfg, BATCH),
                         f'{len(args.images)} images at {cfg.image_size}x{cfg.image_size}')
    images = load_images(args.images, cfg.image_size)
    probs = predict(make_forward(cfg, params), images)
    cli.say(f'{framework}: {cli.describe_config(cfg)}, labels: {source}')
    for path, p in zip(args.images, probs):
        if not np.isfinite(p).all():
            cli.say(f'warning: {path}: the logits are not numbers (NaN or Inf), so neither are its probabilities')
    print(format_predictions(args.images, probs, labels, min(args.top, cfg.num_classes)))
    return 0
