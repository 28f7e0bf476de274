"""A checkpoint read for inference: the `CKPT`, `--numerics` and `--config` arguments, `load_model`, and the checks
around it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional, Sequence

import numpy as np

from parity.cli import remote
from parity.cli.contract import say
from parity.core import files, limits, weights
from parity.core.config import NUMERICS_MODES, OFFICIAL_NUMERICS, ViTConfig

CHECKPOINT_HELP = ('a checkpoint of any layout: the released or big_vision npz (FILE.npz:SUBTREE for a nested '
                   'tower), a .safetensors/.pt state dict (this project\'s or timm\'s), or a Hugging Face folder; or a '
                   'name of `python -m vit_jax models` (ViT-B_16@imagenet21k+imagenet2012), an AugReg filename, a '
                   'gs://vit_models/... or https:// URL, hf-hub:ORG/NAME[@REVISION] or timm/NAME, downloaded once into '
                   'the cache ($VIT_MIRROR_CACHE)')


NUMERICS_HELP = ("source (default): the GELU and LayerNorm eps the file's own library runs it with (timm: erf GELU; "
                 "a Hugging Face folder: its config.json's hidden_act and layer_norm_eps); official: Google's "
                 "(tanh GELU, LayerNorm eps 1e-6), whatever the file")


def add_checkpoint_argument(parser: argparse.ArgumentParser, flag: Optional[str] = None) -> None:
    """The checkpoint a command reads: positional CKPT, or `flag` (--checkpoint); `--numerics` to run it with, and
    `--offline` (names and URLs from the download cache only)."""
    if flag:
        parser.add_argument(flag, required=True, metavar='CKPT', help=CHECKPOINT_HELP)
    else:
        parser.add_argument('checkpoint', metavar='CKPT', help=CHECKPOINT_HELP)
    add_numerics_argument(parser)
    remote.add_offline_argument(parser)


def add_numerics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--numerics', choices=NUMERICS_MODES, default='source', help=NUMERICS_HELP)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', metavar='NAME_OR_JSON',
                        help='an official config name (ViT-B_16, R50+ViT-B_16, ...) or a JSON file: the official '
                             'field layout, or big_vision\'s model config ({"variant": "B/16", "pool_type": "map"}); '
                             'omitted, it is the file\'s own (Hugging Face) or inferred from the checkpoint')


@dataclasses.dataclass
class LoadedCheckpoint:
    """A checkpoint ready for inference: its config, canonical float32 params at that resolution, the file read."""

    cfg: ViTConfig
    params: dict
    checkpoint: weights.Checkpoint


def load_model(path: str, config: Optional[str], image_size: Optional[int],
               fallback_size: int = 224, numerics: str = 'source') -> LoadedCheckpoint:
    """Reads any checkpoint format, configures it, resizes and strictly checks it for inference (float32).

    `fallback_size` is the resolution of a model with no stored grid (sincos2d) when
    `--image-size` does not say; `numerics` is `--numerics`. The file's notes, and the
    config (when it was inferred) or its numerics (when they are not the official ones), go to stderr.
    """
    path = remote.resolve(path)  # a name or URL: the cached file, downloaded first if need be
    ckpt = weights.load(path)
    for note in ckpt.notes:
        say(note)
    cfg = weights.configure(ckpt, config, image_size, fallback_size, numerics)
    say_config(ckpt, cfg, config, numerics)
    check_inference(cfg, 1)
    params = weights.prepare_for_inference(ckpt.params(cfg), cfg, path)
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad:
        more = ', ...' if len(bad) > 3 else ''
        say(f'warning: {path}: {len(bad)} arrays hold NaN or Inf ({", ".join(bad[:3])}{more}); what the model '
            'computes from them is not a number either')
    return LoadedCheckpoint(cfg, params, ckpt)


def load_checkpoint(path: str, config: Optional[str], image_size: Optional[int],
                    fallback_size: int = 224, numerics: str = 'source') -> tuple[ViTConfig, dict]:
    """`load_model`'s config and params."""
    loaded = load_model(path, config, image_size, fallback_size, numerics)
    return loaded.cfg, loaded.params


def check_outputs(outputs: dict[str, Optional[str]], checkpoints: Sequence[Optional[str]] = (),
                  inputs: Sequence[Optional[str]] = ()) -> None:
    """`files.check_outputs` for a command whose inputs include checkpoint specs (`FILE.npz:SUBTREE`)."""
    paths = [weights.split_spec(c)[0] for c in checkpoints if c]
    files.check_outputs(outputs, paths + list(inputs))


def check_inference(cfg: ViTConfig, batch: int) -> None:
    """Refuses a forward pass of `batch` images at `cfg`'s resolution that this machine cannot hold."""
    limits.check_compute(limits.inference_bytes(cfg, batch),
                         f'{describe_config(cfg)} on {batch} image{"s" if batch != 1 else ""}')


def say_config(ckpt: weights.Checkpoint, cfg: ViTConfig, config: Optional[str], numerics: str) -> None:
    """The config line a command prints for a checkpoint: the config when it was not given, and the numerics in use
    and where they came from (always when not given; with `--config`, only when the file or `--numerics` set them)."""
    n = weights.numerics_for(ckpt, cfg, numerics, config)
    if config is None:
        say(f'{"inferred config" if ckpt.config is None else "config from the file"}: {describe_config(cfg)}; '
            f'numerics: {n.describe()}')
    elif n != OFFICIAL_NUMERICS:
        say(f'numerics: {n.describe()}')


def describe_config(cfg: ViTConfig) -> str:
    """A config in one phrase for messages: `ViT-B_16 (token, 1000 classes, 224x224)`."""
    name = cfg.name or 'no official name'
    extra = f', representation {cfg.representation_size}' if cfg.representation_size else ''
    return f'{name} ({cfg.classifier}, {cfg.num_classes} classes{extra}, {cfg.image_size}x{cfg.image_size})'
