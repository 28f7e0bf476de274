"""This project's PyTorch state dict: `vit_torch`'s own names and layouts, as `.safetensors` or `.pt`.

The torch mirror's module paths are the canonical names with '.' for '/' (its modules
carry the official names); `kernel`/`scale` leaves become `weight`. `TORCH_LAYOUT` is the
one table that says how each leaf is named and laid out there. `.safetensors` files
carry the config as metadata (`CONFIG_METADATA_KEY`, the official field layout), so the
way back needs no `--config`; `.pt` files hold tensors only.

Shapes: D width, H heads, Dh = D // H, kh x kw a kernel, I / O input / output channels.
"""

from __future__ import annotations

import json
import re
from typing import Mapping, Optional

import numpy as np

from parity.core.config import ViTConfig
from parity.core.weights import containers
from parity.core.weights.configs import infer_config
from parity.core.weights.spec import Params, check_params, misfit, param_shapes

SUFFIXES = ('.safetensors', '.pt', '.pth')
CONFIG_METADATA_KEY = 'vit_mirror_config'

# How each canonical leaf is named and laid out in the PyTorch mirror. First match wins.
TORCH_LAYOUT = (
    # canonical-name pattern              torch leaf  layout
    (r'/(query|key|value)/kernel$',       'weight',   'heads_in'),    # (D, H, Dh) <-> (H*Dh, D)
    (r'/(query|key|value)/bias$',         'bias',     'heads_bias'),  # (H, Dh) <-> (H*Dh,)
    (r'/out/kernel$',                     'weight',   'heads_out'),   # (H, Dh, D) <-> (D, H*Dh)
    (r'(^|/)(embedding|conv\w*)/kernel$', 'weight',   'conv'),        # (kh, kw, I, O) <-> (O, I, kh, kw)
    (r'/kernel$',                         'weight',   'dense'),       # (I, O) <-> (O, I)
    (r'/scale$',                          'weight',   'same'),
    (r'',                                 None,       'same'),        # bias, cls, pos_embedding
)
_TORCH_LAYOUT = tuple((re.compile(p), leaf, layout) for p, leaf, layout in TORCH_LAYOUT)

# Each layout as (canonical -> torch, torch -> canonical given the canonical shape).
LAYOUTS = {
    'same': (lambda a: a, lambda a, shape: a),
    'dense': (lambda a: a.T, lambda a, shape: a.T),
    'conv': (lambda a: a.transpose(3, 2, 0, 1), lambda a, shape: a.transpose(2, 3, 1, 0)),
    'heads_in': (lambda a: a.reshape(a.shape[0], -1).T, lambda a, shape: a.T.reshape(shape)),
    'heads_bias': (lambda a: a.reshape(-1), lambda a, shape: a.reshape(shape)),
    'heads_out': (lambda a: a.reshape(-1, a.shape[-1]).T, lambda a, shape: a.T.reshape(shape)),
}


def torch_rule(name: str) -> tuple[Optional[str], str]:
    """(torch leaf name or None to keep it, layout) of a canonical parameter name."""
    for pattern, leaf, layout in _TORCH_LAYOUT:
        if pattern.search(name):
            return leaf, layout
    raise AssertionError(name)  # the last rule matches everything


def torch_name(name: str) -> str:
    """The PyTorch state-dict key of a canonical parameter name."""
    leaf, _ = torch_rule(name)
    path = name.split('/')
    if leaf:
        path[-1] = leaf
    return '.'.join(path)


def torch_views(params: dict, cfg: ViTConfig, consume: bool = False) -> Params:
    """The PyTorch state dict of canonical `params` as views of their arrays: nothing copied, nothing read.

    What a streaming writer (`containers.write_safetensors`) consumes. `consume=True` moves
    the arrays out of `params`, so the views hold the only references to them.
    """
    check_params(params, cfg, 'params')
    return {torch_name(k): LAYOUTS[torch_rule(k)[1]][0](params.pop(k) if consume else params[k])
            for k in list(params)}


def to_torch(params: Mapping[str, np.ndarray], cfg: ViTConfig, consume: bool = False) -> Params:
    """Canonical params to a PyTorch state dict of fresh contiguous NumPy arrays (wrap with torch.from_numpy).

    The arrays never share memory with `params`. `consume=True` pops each entry from
    `params` (then a dict) as it is converted, so the memory-mapped arrays of `read_npz`
    are unmapped as it goes: converting holds one copy, not the file's pages and a copy.
    """
    views = torch_views(params if consume else dict(params), cfg, consume=True)
    return {k: containers.contiguous_copy(views.pop(k)) for k in list(views)}


def from_torch(state: Mapping[str, np.ndarray], cfg: ViTConfig, where: str = 'state dict') -> Params:
    """A PyTorch state dict (NumPy arrays) back to canonical params; strict like `check_params`."""
    shapes = param_shapes(cfg)
    names = {torch_name(k): k for k in shapes}
    missing = sorted(names[t] for t in names.keys() - state.keys())
    extra = sorted(state.keys() - names.keys())
    out, wrong = {}, []
    for t, k in names.items():
        if t not in state:
            continue
        fwd, back = LAYOUTS[torch_rule(k)[1]]
        want = fwd(np.empty(shapes[k], np.uint8)).shape
        if tuple(state[t].shape) != want:
            wrong.append(f'{t} expected {want} found {tuple(state[t].shape)}')
            continue
        out[k] = np.ascontiguousarray(back(np.asarray(state[t]), shapes[k]))
    if missing or extra or wrong:
        raise misfit(where, cfg, [torch_name(k) for k in missing], extra, wrong, 'pass the config it was trained with')
    return out


def torch_shapes_as_canonical(state: Mapping[str, np.ndarray]) -> Params:
    """Stand-ins (zero-memory arrays of the right shape) under canonical names for a PyTorch state dict.

    Enough for `infer_config` and `resolve_config`, which read shapes only. Query weights
    are stored flat (H*Dh, D) in PyTorch and stay 2-D here.
    """
    out = {}
    for t, v in state.items():
        path = t.split('.')
        if path[-1] == 'weight':
            path[-1] = 'kernel' if v.ndim > 1 else 'scale'
        name = '/'.join(path)
        layout = torch_rule(name)[1]
        shape = tuple(v.shape)
        if layout in ('dense', 'heads_in', 'heads_out'):
            shape = shape[::-1]
        elif layout == 'conv':
            shape = shape[2:] + (shape[1], shape[0])
        out[name] = np.broadcast_to(np.zeros((), np.uint8), shape)
    return out


def infer_config_from_torch(state: Mapping[str, np.ndarray]) -> ViTConfig:
    """The config of a PyTorch state dict, read off its shapes.

    The head count comes from the official variant of the same width, since PyTorch
    keeps attention weights flat; other widths need --config.
    """
    return infer_config(torch_shapes_as_canonical(state))


def write(path: str, params: dict, cfg: ViTConfig) -> None:
    """Canonical `params` as a state dict file; empties `params`, releasing each array once written.

    `.safetensors` is streamed array by array without importing torch (about 0.6 GB
    resident) and carries the config; `.pt` holds the tensors alone.
    """
    if path.endswith('.safetensors'):
        config = dict(cfg.to_official_dict(), image_size=cfg.image_size)
        containers.write_safetensors(path, torch_views(params, cfg, consume=True),
                                     {CONFIG_METADATA_KEY: json.dumps(config)}, consume=True)
    else:
        containers.write_pt(path, to_torch(params, cfg, consume=True))
