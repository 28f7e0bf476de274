"""The commands both frameworks share (`SHARED`), and `logits`, the first of them.

Each is written once and takes the framework's forward pass, a `Forward`;
`framework_command` hands `FRAMEWORK.runtime.forward` to it when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

import numpy as np

from parity.cli import loading
from parity.cli.arrays import load_input, npy_image_size, save_output
from parity.cli.contract import resolve, say
from parity.cli.types import positive_int
from parity.core.config import ViTConfig

Forward = Callable[[np.ndarray], np.ndarray]  # NHWC float32 batch in [-1, 1] -> (B, C) float32 logits


def add_logits_arguments(parser: argparse.ArgumentParser) -> None:
    """`logits CKPT.npz --config NAME_OR_JSON --input X.npy --output Y.npy [--image-size N]`."""
    loading.add_checkpoint_argument(parser)
    loading.add_config_argument(parser)
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
    loading.check_outputs({'--output': args.output}, [args.checkpoint], [args.input, args.config])
    # A model with no stored grid (sincos2d) is built at the input's resolution unless --image-size says.
    cfg, params = loading.load_checkpoint(args.checkpoint, args.config, args.image_size, npy_image_size(args.input),
                                          args.numerics)
    x = load_input(args.input, cfg)
    loading.check_inference(cfg, len(x))
    y = make_forward(cfg, params)(x)
    save_output(args.output, y)
    say(f'{framework}: {loading.describe_config(cfg)} on {x.shape[0]} images -> {args.output} {tuple(y.shape)}')
    return 0


# The commands both frameworks share, written once: 'module:function' taking (framework, forward, argv).
SHARED = {'logits': 'parity.cli.logits:logits_main', 'eval': 'parity.cli.evaluate:main',
          'predict': 'parity.cli.predict:main'}


def framework_command(framework: str, command: str) -> Callable[[Optional[Sequence[str]]], int]:
    """`python -m FRAMEWORK COMMAND` for a `SHARED` command, run with `FRAMEWORK.runtime.forward`.

    Both are imported when the command runs, so `--help` of another command stays quick.
    """
    def main(argv: Optional[Sequence[str]] = None) -> int:
        return resolve(SHARED[command])(framework, resolve(f'{framework}.runtime:forward'), argv)

    main.__doc__ = f'`python -m {framework} {command}` (see `{SHARED[command].split(":")[0]}`).'
    return main
