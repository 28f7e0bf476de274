"""Command lines of the JAX side."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from parity import cli


def logits(args: argparse.Namespace) -> int:
    """Official-model logits for a batch, in float32 at the highest matmul precision."""
    import jax

    jax.config.update('jax_default_matmul_precision', 'highest')
    from vit_jax.checkpoint import variables_from_params
    from vit_jax.model import VisionTransformer

    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    x = cli.load_input(args.input, cfg)
    y = jax.jit(VisionTransformer(cfg).apply)(variables_from_params(params), x)
    cli.save_output(args.output, jax.device_get(y))
    cli.say(f'vit_jax: {cli.describe(cfg)} on {x.shape[0]} images -> {args.output} {tuple(y.shape)}')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m vit_jax', description=__doc__)
    commands = parser.add_subparsers(dest='command', required=True)
    p = commands.add_parser('logits', help=logits.__doc__, description=logits.__doc__)
    cli.add_logits_arguments(p)
    p.set_defaults(func=logits)
    args = parser.parse_args(argv)
    return args.func(args)
