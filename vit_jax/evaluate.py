"""`python -m vit_jax eval CKPT --config NAME_OR_JSON --dataset NAME [--split S] [--json OUT]`."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import numpy as np

from parity import cli, data


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Accuracy of a checkpoint on a dataset split, in float32 at the highest matmul precision.

    Prints one JSON line (accuracy, examples, correct, ...); `vit_torch eval` takes the same
    arguments and agrees on every prediction.
    """
    parser = argparse.ArgumentParser(prog='python -m vit_jax eval', description=main.__doc__)
    data.add_eval_arguments(parser)
    args = parser.parse_args(argv)

    import jax

    jax.config.update('jax_default_matmul_precision', 'highest')
    from vit_jax.checkpoint import variables_from_params
    from vit_jax.model import VisionTransformer

    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    variables = variables_from_params(params)
    apply = jax.jit(VisionTransformer(cfg).apply)  # eval batches are padded to one shape: one compilation
    data.run_eval(args, 'vit_jax', lambda x: np.asarray(apply(variables, x)), cfg)
    return 0
