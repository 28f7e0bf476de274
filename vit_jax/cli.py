"""Command lines of the JAX side: `python -m vit_jax COMMAND ...`.

`logits`, `eval` and `predict` are written once in `parity.cli` for both frameworks;
this side hands in its forward pass (`vit_jax.runtime.forward`). `train` is its own
(`vit_jax.train_cli`), and `sweep` runs grids of it (`vit_jax.sweep`).
"""

from __future__ import annotations

from typing import Optional, Sequence

from parity import cli

COMMANDS = {
    'logits': ('vit_jax.cli:logits_main', 'official-model logits for a batch (float32, highest precision)'),
    'train': ('vit_jax.train_cli:main', 'fine-tune or train a ViT through XLA'),
    'sweep': ('vit_jax.sweep:main', 'a grid of train runs, K trials each, and their results tables'),
    'eval': ('vit_jax.cli:eval_main', 'accuracy of a checkpoint on a dataset'),
    'predict': ('vit_jax.cli:predict_main', 'top-k classes for image files'),
    'models': ('parity.cli.models:main', 'the catalogue of Google\'s checkpoints, AugReg\'s index, the download cache'),
}


logits_main = cli.framework_command('vit_jax', 'logits')
eval_main = cli.framework_command('vit_jax', 'eval')
predict_main = cli.framework_command('vit_jax', 'predict')


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.dispatch('python -m vit_jax', __doc__, COMMANDS, argv)
