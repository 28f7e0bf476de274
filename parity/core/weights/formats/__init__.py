"""Checkpoint layouts, one module each: how a file's names and array layouts map onto the canonical form.

Each module holds one declarative table (names, layouts) and the two directions built
from it, and nothing else: reading the bytes is `containers`' job, fitting a config is
`spec`'s, resizing is `surgery`'s, and telling the layouts apart is `checkpoints`'.

- `released`: the npz files of google-research/vision_transformer (pre-linen block
  numbering, GroupNorm as (1, 1, 1, C), optional `opt/target/` or `params/` prefix).
- `big_vision`: big_vision's npz (top-level position embeddings added before the class
  token, scan layouts, bfloat16 as void, the MAP head).
- `vit_torch`: this project's PyTorch state dict (`.safetensors` with the config as
  metadata, or `.pt`): the canonical names with '.' for '/', PyTorch layouts.
- `timm`, `hf`: renamings of that state dict (`tables.Table`), with timm's fused qkv.

A new layout is one new module here, and one line in `checkpoints`.
"""
