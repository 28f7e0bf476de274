"""Command lines of the PyTorch side: `python -m vit_torch COMMAND ...`.

`logits`, `eval` and `predict` are written once in `parity.cli` for both frameworks;
this side hands in its forward pass (`vit_torch.runtime.forward`). `convert` is its own.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from parity import cli
from parity.core import weights
from parity.core.errors import UserError
from parity.core.weights.formats import vit_torch as torch_format

COMMANDS = {
    'logits': ('vit_torch.cli:logits_main', 'official-model logits for a batch (float32, TF32 off)'),
    'convert': ('vit_torch.cli:convert_main', 'npz <-> PyTorch state dict (.safetensors, .pt), bit for bit'),
    'eval': ('vit_torch.cli:eval_main', 'accuracy of a checkpoint on a dataset'),
    'predict': ('vit_torch.cli:predict_main', 'top-k classes for image files'),
}


logits_main = cli.framework_command('vit_torch', 'logits')
eval_main = cli.framework_command('vit_torch', 'eval')
predict_main = cli.framework_command('vit_torch', 'predict')


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """npz (released layout) to a PyTorch state dict, or back; the direction is read from the extensions."""
    parser = argparse.ArgumentParser(prog='python -m vit_torch convert', description=convert_main.__doc__)
    parser.add_argument('input', metavar='IN', help='.npz, .safetensors, .pt or .pth')
    parser.add_argument('output', metavar='OUT', help='.npz, .safetensors, .pt or .pth (the other kind)')
    cli.add_config_argument(parser)
    args = parser.parse_args(argv)
    src, dst = args.input, args.output
    if src.endswith('.npz') and dst.endswith(torch_format.SUFFIXES):
        params = weights.load_npz(src)
        cfg = weights.resolve_config(args.config, params)
        weights.check_params(params, cfg, src)
        torch_format.write(dst, params, cfg)
    elif src.endswith(torch_format.SUFFIXES) and dst.endswith('.npz'):
        state, stored = torch_format.read(src)
        shapes = torch_format.torch_shapes_as_canonical(state)
        if args.config is not None:
            cfg = weights.resolve_config(args.config, shapes)
        elif stored is not None:
            cfg = stored
        else:
            cfg = torch_format.infer_config_from_torch(state)
            cli.say(f'inferred config: {cli.describe(cfg)}')
        weights.save_npz(dst, torch_format.from_torch(state, cfg, src))
    else:
        raise UserError(f'convert {src} -> {dst}: expected .npz -> one of {", ".join(torch_format.SUFFIXES)}, '
                        'or the reverse')
    cli.say(f'vit_torch: {src} -> {dst} ({cli.describe(cfg)})')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.dispatch('python -m vit_torch', __doc__, COMMANDS, argv)
