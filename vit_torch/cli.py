"""Command lines of the PyTorch side: `python -m vit_torch COMMAND ...`.

`logits`, `eval` and `predict` are written once in `parity.cli` for both frameworks;
this side hands in its forward pass (`vit_torch.runtime.forward`). `convert` is its own.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from parity import cli
from parity.cli import remote
from parity.core import weights

COMMANDS = {
    'logits': ('vit_torch.cli:logits_main', 'official-model logits for a batch (float32, TF32 off)'),
    'convert': ('vit_torch.cli:convert_main', 'any checkpoint layout to another: npz, big_vision, torch, timm, hf'),
    'eval': ('vit_torch.cli:eval_main', 'accuracy of a checkpoint on a dataset'),
    'predict': ('vit_torch.cli:predict_main', 'top-k classes for image files'),
    'models': ('parity.cli.models:main', 'the catalogue of Google\'s checkpoints, AugReg\'s index, the download cache'),
}


logits_main = cli.framework_command('vit_torch', 'logits')
eval_main = cli.framework_command('vit_torch', 'eval')
predict_main = cli.framework_command('vit_torch', 'predict')


CONVERT_HELP = """\
Reads a checkpoint of any layout and writes it in another, through the canonical form:
bit for bit where both layouts hold the same arrays.

IN: the released or big_vision npz (IN.npz:SUBTREE for a nested tower, e.g. a SigLIP
file's :img), a .safetensors or .pt/.pth/.bin state dict (this project's or timm's), or
a Hugging Face folder; the layout is found from the contents.

--to (default: from OUT's extension, .npz the released npz, .safetensors/.pt this
project's state dict):
""" + '\n'.join(f'  {name:<11} {what}' for name, what in weights.WRITERS.items()) + """

A model a layout cannot express (a MAP head in the released npz, a hybrid in Hugging
Face's) is an error that names a layout that can. Exit 2 for a user error."""


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """Any checkpoint layout to any other (see CONVERT_HELP)."""
    parser = argparse.ArgumentParser(prog='python -m vit_torch convert', description=CONVERT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('input', metavar='IN', help=cli.CHECKPOINT_HELP)
    parser.add_argument('output', metavar='OUT', help='the file to write (a folder for --to hf)')
    parser.add_argument('--to', choices=tuple(weights.WRITERS), help='the layout to write (default: from OUT)')
    cli.add_config_argument(parser)
    cli.add_numerics_argument(parser)
    remote.add_offline_argument(parser)
    args = parser.parse_args(argv)
    src, dst = args.input, args.output
    to = args.to or weights.format_for(dst)
    if to != 'hf':  # a Hugging Face export is a new folder, checked by the writer
        cli.check_outputs({'OUT': dst}, [src], [args.config])
    ckpt = weights.load(remote.resolve(src))
    for note in ckpt.notes:
        cli.say(note)
    cfg = weights.configure(ckpt, args.config, numerics=args.numerics)
    cli.say_config(ckpt, cfg, args.config, args.numerics)
    params = ckpt.params(cfg)
    weights.check_params(params, cfg, src)
    for note in weights.save(dst, params, cfg, to, labels=ckpt.labels):
        cli.say(note)
    cli.say(f'vit_torch: {src} ({ckpt.format}) -> {dst} ({to}; {cli.describe_config(cfg)})')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.dispatch('python -m vit_torch', __doc__, COMMANDS, argv)
