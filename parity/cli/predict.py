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
from parity.core import files, limits
from parity.core.config import ViTConfig, format_eps
from parity.core.errors import UserError
from parity.data import preprocess
from parity.data.class_names import labels_for

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
    parser.add_argument('--json', metavar='OUT.json',
                        help='also write each image\'s top-k and raw logits, with the checkpoint, numerics and '
                             'preprocessing used, as JSON')


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """What `predict` and `explain` share: the checkpoint, its config, class names and resolution."""
    cli.add_checkpoint_argument(parser, '--checkpoint')
    cli.add_config_argument(parser)
    parser.add_argument('--labels', metavar='FILE',
                        help='class names, one per line in logit order, or a bundled list (imagenet2012, '
                             'imagenet21k); default: the checkpoint\'s own (a train run\'s labels.txt, a Hugging Face '
                             'id2label, a timm hub folder\'s label_names), else chosen by the head size (1000, 21843), '
                             'else class indices')
    parser.add_argument('--image-size', type=cli.positive_int, metavar='N',
                        help="resize images to NxN and build the model there, resizing the position embeddings "
                             "(default: the checkpoint's own resolution; 224 for sincos2d models, which store none)")
    preprocess.add_preprocess_argument(parser)


def load(args: argparse.Namespace,
         images: Sequence[str]) -> tuple[ViTConfig, dict, list[str], str, preprocess.Pipeline]:
    """Checkpoint (checked to classify), its class names and where they came from, and its image pipeline."""
    for path in images:
        if not os.path.isfile(path):  # before the checkpoint is read: fail fast on a typo
            raise UserError(f'{path}: no such image file')
    model = cli.load_model(args.checkpoint, args.config, args.image_size, numerics=args.numerics)
    cfg, params = model.cfg, model.params
    check_head(params, cfg, args.checkpoint)
    pipeline = pipeline_for(args, model, cfg)
    own = model.checkpoint.labels
    if args.labels is None and own is not None and len(own) == cfg.num_classes:
        return cfg, params, own, f'{args.checkpoint} ({model.checkpoint.labels_source or "its own"})', pipeline
    labels, source = labels_for(cfg.num_classes, args.labels)
    return cfg, params, labels, source, pipeline


def pipeline_for(args: argparse.Namespace, model: cli.LoadedCheckpoint, cfg: ViTConfig) -> preprocess.Pipeline:
    """`--preprocess`, or the checkpoint's source's pipeline; refused when it does not give the model's shape."""
    ckpt = model.checkpoint
    pipeline = preprocess.pipeline_for(args.preprocess, ckpt.format, ckpt.where, cfg.image_size,
                                       distilled=cfg.classifier == 'token_distilled')
    if pipeline.shortest_edge or not pipeline.resize or pipeline.hw != (cfg.image_size,) * 2:
        shape = 'images of their own shape' if pipeline.shortest_edge or not pipeline.resize else \
            '{}x{} images'.format(*pipeline.hw)
        raise UserError(f'{args.checkpoint}: {pipeline.describe()} gives {shape}, but the model takes '
                        f'{cfg.image_size}x{cfg.image_size}; pass --image-size to match it, or --preprocess official')
    return pipeline


def describe_numerics(cfg: ViTConfig) -> str:
    """The numerics a forward pass uses, in one phrase, as the config line writes them: `tanh GELU, LayerNorm eps
    1e-6`."""
    return f'{cfg.gelu} GELU, LayerNorm eps {format_eps(cfg.layer_norm_eps)}'


def predict(forward: cli.Forward, images: np.ndarray) -> np.ndarray:
    """Probabilities for a batch, BATCH images at a time; the last chunk is padded to keep one shape."""
    return softmax(logits_of(forward, images))


def logits_of(forward: cli.Forward, images: np.ndarray) -> np.ndarray:
    """Raw logits for a batch, BATCH images at a time; the last chunk is padded to keep one shape."""
    out = []
    for start in range(0, len(images), BATCH):
        chunk = images[start:start + BATCH]
        n = len(chunk)
        if start and n < BATCH:
            chunk = np.concatenate([chunk, np.zeros((BATCH - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(forward(chunk))[:n])
    return np.concatenate(out)


def report(args: argparse.Namespace, cfg: ViTConfig, pipeline: preprocess.Pipeline, logits: np.ndarray,
           probs: np.ndarray, labels: Sequence[str], k: int) -> dict:
    """What `--json` writes: per image its top-k and raw logits (null where not a number)."""
    def number(v):
        return float(v) if np.isfinite(v) else None

    return {'checkpoint': args.checkpoint, 'numerics': describe_numerics(cfg), 'preprocess': pipeline.as_dict(),
            'images': [{'file': path,
                        'top': [{'index': int(c), 'name': labels[c], 'probability': number(p[c])} for c in best],
                        'logits': [number(v) for v in z]}
                       for path, z, p, best in zip(args.images, logits, probs, top_k(probs, k))]}


def main(framework: str, make_forward: Callable[[ViTConfig, dict], cli.Forward],
         argv: Optional[Sequence[str]] = None) -> int:
    """`python -m FRAMEWORK predict IMAGE... --checkpoint CKPT [--config C] [--top K] [--labels F]`."""
    parser = argparse.ArgumentParser(
        prog=f'python -m {framework} predict',
        description="Top-k classes for image files, prepared as the checkpoint's source prepares them (--preprocess: "
                    'official tf.image.resize bilinear to [-1, 1], hf ViTImageProcessor, timm eval transform).')
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UserError(f'--top {args.top}: must be at least 1')
    cli.check_outputs({'--json': args.json}, [args.checkpoint], list(args.images) + [args.config, args.labels])
    cfg, params, labels, source, pipeline = load(args, args.images)
    limits.check_compute(len(args.images) * cfg.image_size ** 2 * 3 * 4 + limits.inference_bytes(cfg, BATCH),
                         f'{len(args.images)} images at {cfg.image_size}x{cfg.image_size}')
    cli.say(f'{framework}: {cli.describe_config(cfg)}, labels: {source}; {pipeline.describe()}')
    images = preprocess.load_images(args.images, pipeline)
    logits = logits_of(make_forward(cfg, params), images)
    probs = softmax(logits)
    for path, p in zip(args.images, probs):
        if not np.isfinite(p).all():
            cli.say(f'warning: {path}: the logits are not numbers (NaN or Inf), so neither are its probabilities')
    k = min(args.top, cfg.num_classes)
    print(format_predictions(args.images, probs, labels, k))
    if args.json:
        files.write_json(args.json, report(args, cfg, pipeline, logits, probs, labels, k), '--json')
    return 0
