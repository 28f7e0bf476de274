"""Checkpoint layouts, one module each: how a file's names and array layouts map onto the canonical form.

Each module holds one declarative table (names, layouts) and the two directions built
from it, and nothing else: reading the bytes is `containers`' job, fitting a config is
`spec`'s, resizing is `surgery`'s.

- `released`: the npz files of google-research/vision_transformer (pre-linen block
  numbering, GroupNorm as (1, 1, 1, C), optional `opt/target/` or `params/` prefix).
- `vit_torch`: this project's PyTorch state dict (`.safetensors` with the config as
  metadata, or `.pt`): the canonical names with '.' for '/', PyTorch layouts.
"""
