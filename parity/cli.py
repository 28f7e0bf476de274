"""What the command lines of both frameworks share: arguments, input checks, error handling.

Each framework's `__main__` parses with these, runs its own model, and lets `run`
turn a `UserError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from parity import weights
from parity.config import ViTConfig
from parity.errors import UserError
from parity.files import atomic_path


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Runs a CLI entry point: exit code 2 and one line for a user error, never a traceback."""
    try:
        code = main(argv)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]],
             argv: Optional[Sequence[str]] = None) -> int:
    """`prog COMMAND ARGS...`: imports only the module that serves COMMAND and runs its `main(ARGS)`.

    `commands` maps a name to ('package.module:function', one-line help). Each command
    builds its own parser (with prog `prog COMMAND`), so commands live in their own modules.
    """
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(prog=prog, description=description,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog='commands:\n' + '\n'.join(f'  {n:<10}{h}' for n, (_, h) in commands.items())
                                         + f'\n\n`{prog} COMMAND --help` for the arguments of each.')
        parser.add_argument('command', choices=list(commands), metavar='COMMAND')
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv[:1])  # --help prints help (exit 0); an unknown command is a usage error (exit 2)
        return 2
    target, _ = commands[argv[0]]
    module, function = target.split(':')
    return getattr(importlib.import_module(module), function)(argv[1:])


def add_logits_arguments(parser: argparse.ArgumentParser) -> None:
    """`logits CKPT.npz --config NAME_OR_JSON --input X.npy --output Y.npy [--image-size N]`."""
    parser.add_argument('checkpoint', metavar='CKPT.npz', help='checkpoint in the released (or linen) npz layout')
    add_config_argument(parser)
    parser.add_argument('--input', required=True, metavar='X.npy', help='float32 images, NHWC, in [-1, 1]')
    parser.add_argument('--output', required=True, metavar='Y.npy', help='where to write the float32 logits')
    parser.add_argument('--image-size', type=int, metavar='N',
                        help="build the model at NxN, resizing the position embeddings from the checkpoint's grid "
                             "(default: the checkpoint's own resolution)")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', metavar='NAME_OR_JSON',
                        help='an official config name (ViT-B_16, R50+ViT-B_16, ...) or a JSON file in the official '
                             'field layout; omitted, it is inferred from the checkpoint')


def load_checkpoint(path: str, config: Optional[str], image_size: Optional[int]) -> tuple[ViTConfig, dict]:
    """Reads, configures, resizes and strictly checks a checkpoint for inference (float32)."""
    params = weights.load_npz(path)
    cfg = weights.resolve_config(config, params, image_size)
    if config is None:
        say(f'inferred config: {describe(cfg)}')
    return cfg, weights.prepare_for_inference(params, cfg, path)


def describe(cfg: ViTConfig) -> str:
    name = cfg.name or 'no official name'
    extra = f', representation {cfg.representation_size}' if cfg.representation_size else ''
    return f'{name} ({cfg.classifier}, {cfg.num_classes} classes{extra}, {cfg.image_size}x{cfg.image_size})'


def read_npy(path: str, flag: str) -> np.ndarray:
    """One array from a .npy file given as `flag`, never unpickled, or a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f'{flag} {path}: no such file')
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f'{flag} {path}: not a readable .npy array ({e})') from None
    if not isinstance(x, np.ndarray):
        raise UserError(f'{flag} {path}: expected a single .npy array, found an .npz archive')
    return x


def load_input(path: str, cfg: ViTConfig) -> np.ndarray:
    """A float32 NHWC batch that fits the model, or a one-line error saying what to change."""
    x = read_npy(path, '--input')
    if x.dtype != np.float32:
        raise UserError(f'--input {path}: dtype {x.dtype}, expected float32 (images in [-1, 1])')
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f'--input {path}: shape {x.shape}, expected (batch, height, width, 3) NHWC')
    if x.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise UserError(f'--input {path}: images are {x.shape[1]}x{x.shape[2]} but the model is built at '
                        f'{cfg.image_size}x{cfg.image_size}; pass --image-size {x.shape[1]} '
                        '(square images whose side divides by the patch size)')
    if not np.isfinite(x).all():
        raise UserError(f'--input {path}: holds NaN or infinite values')
    if np.abs(x).max() > 1.001:
        say(f'warning: --input values span [{x.min():.3g}, {x.max():.3g}]; the official models expect [-1, 1]')
    return x


def save_output(path: str, y: np.ndarray) -> None:
    """Writes a float32 array atomically, so a reader never sees half a file."""
    with atomic_path(path, '--output') as tmp:
        with open(tmp, 'wb') as f:
            np.save(f, np.asarray(y, dtype=np.float32))


def say(message: str) -> None:
    print(message, file=sys.stderr)
