"""Command lines of the PyTorch side: `python -m vit_torch COMMAND ...`."""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from parity import cli, files, weights
from parity.config import ViTConfig
from parity.errors import UserError

COMMANDS = {
    'logits': ('vit_torch.cli:logits_main', 'official-model logits for a batch (float32, TF32 off)'),
    'convert': ('vit_torch.cli:convert_main', 'npz <-> PyTorch state dict (.safetensors, .pt), bit for bit'),
    'eval': ('vit_torch.evaluate:main', 'accuracy of a checkpoint on a dataset'),
    'predict': ('vit_torch.predict:main', 'top-k classes for image files'),
}
TORCH_SUFFIXES = ('.safetensors', '.pt', '.pth')
CONFIG_METADATA_KEY = 'vit_mirror_config'


def _strict_float32() -> None:
    """TF32 off: parity is judged in true float32."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def logits_main(argv: Optional[Sequence[str]] = None) -> int:
    """Official-model logits for a batch, in float32 with TF32 off."""
    parser = argparse.ArgumentParser(prog='python -m vit_torch logits', description=logits_main.__doc__)
    cli.add_logits_arguments(parser)
    args = parser.parse_args(argv)
    import torch

    from vit_torch.checkpoint import build_model

    _strict_float32()
    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    x = cli.load_input(args.input, cfg)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = build_model(cfg, params).to(device)
    with torch.inference_mode():
        y = model(torch.from_numpy(x).permute(0, 3, 1, 2).to(device))  # NHWC file, NCHW model
    cli.save_output(args.output, y.cpu().numpy())
    cli.say(f'vit_torch: {cli.describe(cfg)} on {x.shape[0]} images -> {args.output} {tuple(y.shape)}')
    return 0


def _read_torch(path: str) -> tuple[dict[str, np.ndarray], Optional[ViTConfig]]:
    """A tensors-only state dict (.safetensors or .pt) as NumPy arrays, and the config stored with it."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file')
    if path.endswith('.safetensors'):
        from safetensors import safe_open

        try:
            with safe_open(path, framework='np') as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise UserError(f'{path}: not a readable .safetensors file ({type(e).__name__}: {e})') from None
        cfg = None
        if CONFIG_METADATA_KEY in meta:
            cfg = ViTConfig.from_official_dict(json.loads(meta[CONFIG_METADATA_KEY]), where=path)
        return state, cfg
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # weights_only refuses pickled objects with an UnpicklingError
        # torch's message spans many lines with terminal escapes; keep the line that names the refused object.
        lines = [re.sub(r'\x1b\[[0-9;]*m', '', line).strip() for line in str(e).splitlines()] or ['']
        why = next((line.split('. ')[0] for line in lines if line.startswith('WeightsUnpickler error:')), lines[0])
        raise UserError(f'{path}: not a tensors-only PyTorch state dict ({type(e).__name__}: {why})') from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path}: expected a dict of tensors (a state_dict), found {type(state).__name__}')
    return {k: v.detach().numpy() for k, v in state.items()}, None


def _write_torch(path: str, params: dict[str, np.ndarray], cfg: ViTConfig) -> None:
    """Canonical `params` as a PyTorch state dict file; empties `params`, releasing each array once written."""
    with files.atomic_path(path) as tmp:
        if path.endswith('.safetensors'):  # streamed array by array, without importing torch (~0.6 GB resident)
            config = dict(cfg.to_official_dict(), image_size=cfg.image_size)
            weights.write_safetensors(tmp, weights.torch_views(params, cfg, consume=True),
                                      {CONFIG_METADATA_KEY: json.dumps(config)}, consume=True)
        else:
            import torch

            tensors = {k: torch.from_numpy(v) for k, v in weights.to_torch(params, cfg, consume=True).items()}
            torch.save(tensors, tmp)


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """npz (released layout) to a PyTorch state dict, or back; the direction is read from the extensions."""
    parser = argparse.ArgumentParser(prog='python -m vit_torch convert', description=convert_main.__doc__)
    parser.add_argument('input', metavar='IN', help='.npz, .safetensors, .pt or .pth')
    parser.add_argument('output', metavar='OUT', help='.npz, .safetensors, .pt or .pth (the other kind)')
    cli.add_config_argument(parser)
    args = parser.parse_args(argv)
    src, dst = args.input, args.output
    if src.endswith('.npz') and dst.endswith(TORCH_SUFFIXES):
        params = weights.load_npz(src)
        cfg = weights.resolve_config(args.config, params)
        weights.check_params(params, cfg, src)
        _write_torch(dst, params, cfg)
    elif src.endswith(TORCH_SUFFIXES) and dst.endswith('.npz'):
        state, stored = _read_torch(src)
        shapes = weights.torch_shapes_as_canonical(state)
        if args.config is not None:
            cfg = weights.resolve_config(args.config, shapes)
        elif stored is not None:
            cfg = stored
        else:
            cfg = weights.infer_config_from_torch(state)
            cli.say(f'inferred config: {cli.describe(cfg)}')
        weights.save_npz(dst, weights.from_torch(state, cfg, src))
    else:
        raise UserError(f'convert {src} -> {dst}: expected .npz -> one of {", ".join(TORCH_SUFFIXES)}, or the reverse')
    cli.say(f'vit_torch: {src} -> {dst} ({cli.describe(cfg)})')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.dispatch('python -m vit_torch', __doc__, COMMANDS, argv)
