"""`python -m vit_torch eval CKPT --config NAME_OR_JSON --dataset NAME [--split S] [--json OUT]`."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from parity import cli, data


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Accuracy of a checkpoint on a dataset split, in float32 with TF32 off.

    Prints one JSON line (accuracy, examples, correct, ...); `vit_jax eval` takes the same
    arguments and agrees on every prediction.
    """
    parser = argparse.ArgumentParser(prog='python -m vit_torch eval', description=main.__doc__)
    data.add_eval_arguments(parser)
    args = parser.parse_args(argv)

    import torch

    from vit_torch.checkpoint import build_model
    from vit_torch.cli import _strict_float32

    _strict_float32()
    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = build_model(cfg, params).to(device)

    def predict(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x).permute(0, 3, 1, 2).to(device)).float().cpu().numpy()  # NHWC -> NCHW

    data.run_eval(args, 'vit_torch', predict, cfg)
    return 0
