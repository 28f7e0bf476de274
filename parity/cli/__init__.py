"""Tier 2, what the command lines of both frameworks share: arguments, input checks, error handling.

Each framework's `__main__` parses with these, runs its own model, and lets `run`
turn a `UserError` into one line on stderr and exit code 2. A command that both
frameworks have is written here once (`logits_main`, `predict.main`, `evaluate.main`),
and each framework only hands in its forward pass, a `Forward`.

    predict   top-k classes for image files, the head checks and the printed table
    evaluate  accuracy of a checkpoint on a dataset split
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import zipfile
from typing import Callable, Optional, Sequence

import numpy as np

from parity.core import files, limits, weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.core.files import atomic_path
from parity.core.weights import containers


Forward = Callable[[np.ndarray], np.ndarray]  # NHWC float32 batch in [-1, 1] -> (B, C) float32 logits


DEBUG_ENV = 'VIT_MIRROR_DEBUG'  # =1: every failure with its traceback (also `--debug` on any command)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    """Runs a CLI entry point: the one place failures become the promised line.

    A `UserError`, an operating-system refusal (a full disk, a missing permission) and
    running out of memory end in one `error: ...` line, always the last line on stderr,
    and exit code 2. Anything else is a bug and keeps its traceback; `--debug` (or
    VIT_MIRROR_DEBUG=1) shows the traceback of every failure.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV) == '1' or '--debug' in argv
    argv = [a for a in argv if a != '--debug']
    try:
        code = main(argv)
    except KeyboardInterrupt:
        code = 130
    except (UserError, OSError, MemoryError) as e:
        if debug:
            raise
        _fail(_user_line(e))
    sys.exit(code)


def _user_line(e: BaseException) -> str:
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MemoryError):
        return ('out of memory; lower --batch-size or --image-size, or run on a machine with more memory '
                '(the limits are in the README, "Errors and limits")')
    if e.errno in files.WRITE_ERRNOS:  # a write the writers did not see themselves: say what to do all the same
        return str(files.write_error(e.filename or 'an output', e))
    where = f'{e.filename}: ' if getattr(e, 'filename', None) else ''
    return f'{where}{e.strerror or type(e).__name__} (errno {e.errno}); check the path and its permissions'


def _fail(message: str) -> None:
    """One line on stderr, the last thing the process prints, and exit code 2 (no exit handlers run after it)."""
    sys.stdout.flush()
    print('error: ' + ' '.join(message.split()), file=sys.stderr, flush=True)
    os._exit(2)


def dispatch(prog: str, description: str, commands: dict[str, tuple[str, str]],
             argv: Optional[Sequence[str]] = None) -> int:
    """`prog COMMAND ARGS...`: imports only the module that serves COMMAND and runs its `main(ARGS)`.

    `commands` maps a name to ('package.module:function', one-line help). Each command
    builds its own parser (with prog `prog COMMAND`), so commands live in their own modules.
    """
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
    return _resolve(target)(argv[1:])


def add_logits_arguments(parser: argparse.ArgumentParser) -> None:
    """`logits CKPT.npz --config NAME_OR_JSON --input X.npy --output Y.npy [--image-size N]`."""
    add_checkpoint_argument(parser)
    add_config_argument(parser)
    parser.add_argument('--input', required=True, metavar='X.npy', help='float32 images, NHWC, in [-1, 1]')
    parser.add_argument('--output', required=True, metavar='Y.npy', help='where to write the float32 logits')
    parser.add_argument('--image-size', type=positive_int, metavar='N',
                        help="build the model at NxN, resizing the position embeddings from the checkpoint's grid "
                             "(default: the checkpoint's own resolution)")


def logits_main(framework: str, make_forward: Callable[[ViTConfig, dict], Forward],
                argv: Optional[Sequence[str]] = None) -> int:
    """`python -m FRAMEWORK logits ...`: `make_forward` builds the framework's model, set up for true float32."""
    parser = argparse.ArgumentParser(prog=f'python -m {framework} logits',
                                     description='Official-model logits for a batch, in true float32 (JAX at the '
                                                 'highest matmul precision, PyTorch with TF32 off).')
    add_logits_arguments(parser)
    args = parser.parse_args(argv)
    check_outputs({'--output': args.output}, [args.checkpoint], [args.input, args.config])
    # A model with no stored grid (sincos2d) is built at the input's resolution unless --image-size says.
    cfg, params = load_checkpoint(args.checkpoint, args.config, args.image_size, npy_image_size(args.input))
    x = load_input(args.input, cfg)
    check_inference(cfg, len(x))
    y = make_forward(cfg, params)(x)
    save_output(args.output, y)
    say(f'{framework}: {describe(cfg)} on {x.shape[0]} images -> {args.output} {tuple(y.shape)}')
    return 0


# The commands both frameworks share, written once: 'module:function' taking (framework, forward, argv).
SHARED = {'logits': 'parity.cli:logits_main', 'eval': 'parity.cli.evaluate:main', 'predict': 'parity.cli.predict:main'}


def _resolve(target: str) -> Callable:
    """'package.module:function', imported now."""
    module, function = target.split(':')
    return getattr(importlib.import_module(module), function)


def framework_command(framework: str, command: str) -> Callable[[Optional[Sequence[str]]], int]:
    """`python -m FRAMEWORK COMMAND` for a `SHARED` command, run with `FRAMEWORK.runtime.forward`.

    Both are imported when the command runs, so `--help` of another command stays quick.
    """
    def main(argv: Optional[Sequence[str]] = None) -> int:
        return _resolve(SHARED[command])(framework, _resolve(f'{framework}.runtime:forward'), argv)

    main.__doc__ = f'`python -m {framework} {command}` (see `{SHARED[command].split(":")[0]}`).'
    return main


CHECKPOINT_HELP = ('a checkpoint of any layout: the released or big_vision npz (FILE.npz:SUBTREE for a nested '
                   'tower), a .safetensors/.pt state dict (this project\'s or timm\'s), or a Hugging Face folder')


def add_checkpoint_argument(parser: argparse.ArgumentParser, flag: Optional[str] = None) -> None:
    """The checkpoint a command reads: positional CKPT, or `flag` (--checkpoint)."""
    if flag:
        parser.add_argument(flag, required=True, metavar='CKPT', help=CHECKPOINT_HELP)
    else:
        parser.add_argument('checkpoint', metavar='CKPT', help=CHECKPOINT_HELP)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', metavar='NAME_OR_JSON',
                        help='an official config name (ViT-B_16, R50+ViT-B_16, ...) or a JSON file: the official '
                             'field layout, or big_vision\'s model config ({"variant": "B/16", "pool_type": "map"}); '
                             'omitted, it is the file\'s own (Hugging Face) or inferred from the checkpoint')


@dataclasses.dataclass
class Model:
    """A checkpoint ready for inference: its config, canonical float32 params at that resolution, the file read."""

    cfg: ViTConfig
    params: dict
    checkpoint: weights.Checkpoint


def load_model(path: str, config: Optional[str], image_size: Optional[int], fallback_size: int = 224) -> Model:
    """Reads any checkpoint format, configures it, resizes and strictly checks it for inference (float32).

    `fallback_size` is the resolution of a model with no stored grid (sincos2d) when
    `--image-size` does not say. The file's notes, and the config when it was inferred,
    go to stderr.
    """
    ckpt = weights.load(path)
    for note in ckpt.notes:
        say(note)
    cfg = weights.configure(ckpt, config, image_size, fallback_size)
    if config is None:
        say(f'{"inferred config" if ckpt.config is None else "config from the file"}: {describe(cfg)}')
    check_inference(cfg, 1)
    params = weights.prepare_for_inference(ckpt.params(cfg), cfg, path)
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad:
        say(f'warning: {path}: {len(bad)} arrays hold NaN or Inf ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""})'
            '; what the model computes from them is not a number either')
    return Model(cfg, params, ckpt)


def check_outputs(outputs: dict[str, Optional[str]], checkpoints: Sequence[Optional[str]] = (),
                  inputs: Sequence[Optional[str]] = ()) -> None:
    """`files.check_outputs` for a command whose inputs include checkpoint specs (`FILE.npz:SUBTREE`)."""
    paths = [weights.split_spec(c)[0] for c in checkpoints if c]
    files.check_outputs(outputs, paths + list(inputs))


def check_inference(cfg: ViTConfig, batch: int) -> None:
    """Refuses a forward pass of `batch` images at `cfg`'s resolution that this machine cannot hold."""
    limits.check_compute(limits.inference_bytes(cfg, batch),
                         f'{describe(cfg)} on {batch} image{"s" if batch != 1 else ""}')


def _finite(text: str, ok: Callable[[float], bool], what: str) -> float:
    """`text` as a finite number for which `ok` holds; else argparse's error, `what` saying the range."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f'{text}: must be a finite number {what}')
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a learning rate, a timeout)."""
    return _finite(text, lambda v: v > 0, 'above 0')


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number of 0 or more (a weight decay)."""
    return _finite(text, lambda v: v >= 0, 'of 0 or more')


def unit_float(text: str) -> float:
    """An argparse type: a number in [0, 1] (a smoothing, a weight between two losses)."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f'{text}: must lie in [0, 1]')
    return value


def seed_int(text: str) -> int:
    """An argparse type: a random seed, a whole number in 0 .. 2**32 - 1 (what every generator takes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f'{value}: a seed is a whole number from 0 to {2 ** 32 - 1}')
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value}: must be at least 1')
    return value


def load_checkpoint(path: str, config: Optional[str], image_size: Optional[int],
                    fallback_size: int = 224) -> tuple[ViTConfig, dict]:
    """`load_model`'s config and params."""
    model = load_model(path, config, image_size, fallback_size)
    return model.cfg, model.params


def describe(cfg: ViTConfig) -> str:
    name = cfg.name or 'no official name'
    extra = f', representation {cfg.representation_size}' if cfg.representation_size else ''
    return f'{name} ({cfg.classifier}, {cfg.num_classes} classes{extra}, {cfg.image_size}x{cfg.image_size})'


def read_npy(path: str, flag: str) -> np.ndarray:
    """One array from a .npy file given as `flag`, checked before it is read, never unpickled, or a one-line error."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        raise UserError(f'{flag} {path}: expected a single .npy array, found an .npz archive')
    return containers.read_npy(path, f'{flag} {path}')


def npy_image_size(path: Optional[str], default: int = 224) -> int:
    """The height of the images in an NHWC .npy file, read from its header alone; `default` when there is none."""
    try:
        with open(path, 'rb') as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape = read[version](f)[0]
        return int(shape[1]) if len(shape) == 4 and shape[1] > 0 else default
    except (OSError, ValueError, TypeError, EOFError, KeyError):
        return default  # read_npy explains what is wrong with the file


def load_input(path: str, cfg: ViTConfig) -> np.ndarray:
    """A float32 NHWC batch that fits the model, or a one-line error saying what to change."""
    x = read_npy(path, '--input')
    if x.dtype != np.float32:
        raise UserError(f'--input {path}: dtype {x.dtype}, expected float32 (images in [-1, 1])')
    if x.ndim != 4 or x.shape[-1] != 3:
        raise UserError(f'--input {path}: shape {x.shape}, expected (batch, height, width, 3) NHWC')
    if not len(x):
        raise UserError(f'--input {path}: holds no images (shape {x.shape}); give at least one')
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
