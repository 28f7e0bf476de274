"""Command lines of the JAX side: `python -m vit_jax COMMAND ...`."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from parity import cli

COMMANDS = {
    'logits': ('vit_jax.cli:logits_main', 'official-model logits for a batch (float32, highest precision)'),
    'train': ('vit_jax.train:main', 'fine-tune or train a ViT through XLA'),
    'eval': ('vit_jax.evaluate:main', 'accuracy of a checkpoint on a dataset'),
    'predict': ('vit_jax.predict:main', 'top-k classes for image files'),
}


def logits_main(argv: Optional[Sequence[str]] = None) -> int:
    """Official-model logits for a batch, in float32 at the highest matmul precision."""
    parser = argparse.ArgumentParser(prog='python -m vit_jax logits', description=logits_main.__doc__)
    cli.add_logits_arguments(parser)
    args = parser.parse_args(argv)

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
    return cli.dispatch('python -m vit_jax', __doc__, COMMANDS, argv)
