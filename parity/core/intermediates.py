"""Named intermediates: the same names and layouts from both models, in forward order.

Names: `stem` (hybrid ResNet output, NHWC), `embedding` (patch tokens, (B, N, D)),
`with_posemb` (after class token and position embeddings), `encoderblock_{i}` (output of
block i), `attention_{i}` (softmax weights of block i, (B, H, N, N), on request),
`encoder_norm`, `pre_logits` (what the head reads), `logits`.

The models sow under local names that cannot clash with their submodules (flax forbids
a value and a submodule of one name in one scope); `flat_name` maps a sow path
(module names, then the local name) to the names above, for both frameworks.
"""

from __future__ import annotations

from parity.core.config import ViTConfig

_LOCAL = {'patch_tokens': 'embedding', 'features': 'pre_logits', 'encoded': 'encoder_norm'}


def flat_name(path: tuple[str, ...]) -> str:
    """('Transformer', 'encoderblock_3', 'output') -> 'encoderblock_3', and so on."""
    *scope, leaf = path
    block = next((s for s in scope if s.startswith('encoderblock_')), None)
    if block is not None and leaf == 'attention':
        return 'attention_' + block.split('_', 1)[1]
    if block is not None and leaf == 'output':
        return block
    return _LOCAL.get(leaf, leaf)


def forward_order(cfg: ViTConfig, attention: bool = False) -> list[str]:
    """Every intermediate `cfg` produces, in the order the forward pass computes them."""
    names = ['stem'] if cfg.is_hybrid else []
    names += ['embedding', 'with_posemb']
    for i in range(cfg.num_layers):
        names += [f'attention_{i}', f'encoderblock_{i}'] if attention else [f'encoderblock_{i}']
    return names + ['encoder_norm', 'pre_logits', 'logits']
