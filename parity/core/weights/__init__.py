"""The shared weight layer: every checkpoint format to and from one canonical form. NumPy only.

Canonical form: a flat dict from the official Flax linen parameter names, '/'-joined
(`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`), to NumPy
arrays in the linen layout. `vit_jax` params are exactly this tree; `vit_torch` module
paths are the same names with '.' for '/'. Every file goes through this package, one
module per concern:

    spec         the canonical parameter spec of a config, and the strict check against it
    configs      configs read off a checkpoint's shapes, and `--config` resolution
    surgery      resolution and fine-tuning surgery (position embeddings, pre_logits, head)
    containers   bytes on disk to named arrays and back: .npz (memory-mapped, CRC-checked),
                 .safetensors (streamed), .pt (torch.load(weights_only=True) only)
    formats/     one module per checkpoint layout, each a declarative name-and-layout table:
                 `released` (the official vit_jax npz), `big_vision`, `vit_torch` (this
                 project's state dict), `timm`, `hf` (Hugging Face transformers)
    checkpoints  the one door: `load` finds a file's container and layout from its contents,
                 `configure` its config, `save` writes any format

The names below are the ones most callers need; the modules hold the rest.
"""

from parity.core.weights.checkpoints import (
    FORMATS,
    WRITERS,
    Checkpoint,
    configure,
    format_for,
    load,
    numerics_for,
    save,
    split_spec,
)
from parity.core.weights.configs import checkpoint_grid, checkpoint_image_size, infer_config, resolve_config
from parity.core.weights.containers import read_npz
from parity.core.weights.formats.released import load_npz, save_npz
from parity.core.weights.spec import POSEMB, Params, check_params, count_params, param_shapes
from parity.core.weights.surgery import adapt_resolution, prepare_for_finetuning, prepare_for_inference, resize_posemb

__all__ = ['FORMATS', 'POSEMB', 'WRITERS', 'Checkpoint', 'Params', 'adapt_resolution', 'check_params',
           'checkpoint_grid', 'checkpoint_image_size', 'configure', 'count_params', 'format_for', 'infer_config',
           'load', 'load_npz', 'numerics_for', 'param_shapes', 'prepare_for_finetuning', 'prepare_for_inference',
           'read_npz', 'resize_posemb', 'resolve_config', 'save', 'save_npz', 'split_spec']
