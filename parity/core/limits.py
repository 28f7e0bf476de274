"""The limits every reader and command checks before it allocates, written down once.

A file declares its sizes (an `.npy` header, a zip directory, a safetensors header); they
are checked against the file itself before anything is allocated, so a few bytes that
declare 10^12 elements are refused. Then two budgets, in bytes:

- what a file may *inflate* to (`read_budget`): compressed npz members, which a few
  megabytes can make gigabytes of. Default 1 GiB; `VIT_MIRROR_MAX_READ` (e.g. `8G`)
  raises it. Stored members, safetensors and zip-format `.pt` files are memory-mapped
  and cost page cache, not this.
- what a command may *hold* (`machine_budget`): data a file really holds but that must
  be copied (`.npy` inputs, legacy `.pt` pickles, bfloat16 upcast to float32) and what a
  command line asks to compute (`--image-size`, `--random`, `--batch-size`, estimated
  from the model by `inference_bytes` and `training_bytes`): half the machine's memory,
  for training on accelerators each device's memory. `VIT_MIRROR_MAX_MEMORY` overrides it.

Images may have at most `MAX_IMAGE_PIXELS` pixels (read from the file's header before
decoding). The estimates count the dominant activations only: a run they refuse could
not fit; a run they pass may still need more.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from parity.core.errors import UserError

READ_ENV, MEMORY_ENV = 'VIT_MIRROR_MAX_READ', 'VIT_MIRROR_MAX_MEMORY'
DEFAULT_READ = 1 << 30
MAX_IMAGE_PIXELS = 40_000_000  # 40 megapixels: 7,300 x 5,500, beyond any camera a ViT is shown
MAX_TEXT_BYTES = 16 << 20  # a config or a list of class names larger than this is neither


def _bytes(text: str, env: str) -> int:
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*', text, re.I)
    if not m:
        raise UserError(f'{env}={text!r}: expected a size such as 8G, 512M or 1073741824')
    return int(float(m.group(1)) * 1024 ** ' KMGT'.index((m.group(2) or ' ').upper()))


def read_budget() -> int:
    """Bytes a file's compressed data may inflate to."""
    text = os.environ.get(READ_ENV)
    return DEFAULT_READ if text is None else _bytes(text, READ_ENV)


def machine_memory() -> int:
    """The machine's physical memory in bytes (0 where it cannot be read)."""
    try:
        return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return 0


def machine_budget() -> int:
    """Bytes a command line may ask to compute with on this machine: half its memory, or VIT_MIRROR_MAX_MEMORY."""
    text = os.environ.get(MEMORY_ENV)
    if text is not None:
        return _bytes(text, MEMORY_ENV)
    return machine_memory() // 2 or 1 << 40  # unknown machine: only the absurd is refused


def check_text(path: str, what: str) -> None:
    """Refuses a text file (a JSON config, an index, a list of names) larger than `MAX_TEXT_BYTES`, before
    reading it."""
    size = os.path.getsize(path)
    if size > MAX_TEXT_BYTES:
        raise UserError(f'{what}: {human(size)}, more than a file of its kind holds ({human(MAX_TEXT_BYTES)} at most); '
                        'is it the file you meant?')


def human(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
        if n < 1024 or unit == 'PiB':
            return f'{n:,.0f} {unit}' if unit == 'B' else f'{n:,.1f} {unit}'
        n /= 1024
    return f'{n:.1f} PiB'


def check_read(nbytes: int, what: str) -> None:
    """Refuses to inflate compressed data to `nbytes` when they exceed the read budget."""
    budget = read_budget()
    if nbytes > budget:
        raise UserError(f'{what} would inflate to {human(nbytes)}, past the {human(budget)} compressed data may '
                        f'inflate to (raise it with {READ_ENV}=SIZE if the file is what you think it is)')


def check_compute(nbytes: int, what: str, budget: Optional[int] = None, where: str = 'this machine') -> None:
    """Refuses a command whose estimated memory `nbytes` exceeds `budget` (default: `machine_budget()`)."""
    budget = machine_budget() if budget is None else budget
    if nbytes > budget:
        raise UserError(f'{what} needs about {human(nbytes)} of memory, more than the {human(budget)} {where} has '
                        f'for it (see the README, "Errors and limits"; {MEMORY_ENV}=SIZE overrides it)')


def _sizes(cfg, image_size: Optional[int]) -> tuple[int, int, int, int, int, int]:
    """(S, N, D, H, M, L): resolution, tokens, width, heads, MLP width, layers."""
    S = image_size or cfg.image_size
    sh, sw = (cfg.stem_stride * p for p in cfg.patch_size)
    N = (S // max(sh, 1)) * (S // max(sw, 1)) + 1
    return S, N, cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, cfg.num_layers


def inference_bytes(cfg, batch: int, image_size: Optional[int] = None) -> int:
    """A forward pass: the images (and a copy), every block's attention weights (XLA keeps them; PyTorch
    frees them as it goes), one block's q, k, v and MLP activations, float32."""
    S, N, D, H, M, L = _sizes(cfg, image_size)
    return 4 * batch * (2 * S * S * 3 + L * H * N * N + 8 * N * D + 2 * N * M)


def training_bytes(cfg, batch: int, image_size: Optional[int] = None, remat: str = 'none') -> int:
    """A training step: what backpropagation keeps of every block (its inputs, q, k, v, the attention
    logits and weights, both MLP activations, the norms), float32.

    With `remat` (`vit_jax train --remat`) a block keeps less and is recomputed in the backward pass,
    one block at a time: 'block' keeps each block's input only, 'dots' its input and its dense layers'
    outputs (q, k, v, the attention's output projection, both MLP layers); either way one block's full
    activations are live again while it is recomputed."""
    S, N, D, H, M, L = _sizes(cfg, image_size)
    full = 10 * N * D + 2 * H * N * N + 2 * N * M
    kept = {'none': full, 'block': N * D, 'dots': 6 * N * D + N * M}[remat]
    return 4 * batch * (S * S * 3 + L * kept + (full if remat != 'none' else 0))


def comparison_bytes(cfg, batch: int, attention: bool = False, image_size: Optional[int] = None) -> int:
    """`parity compare` and `verify`: a forward pass, plus every named intermediate of two implementations,
    kept for the comparison (each block's output and its four sub-steps; the attention weights when asked)."""
    S, N, D, H, M, L = _sizes(cfg, image_size)
    kept = (5 * L + 4) * N * D + (L * H * N * N if attention else 0)
    return inference_bytes(cfg, batch, image_size) + 2 * 4 * batch * kept
