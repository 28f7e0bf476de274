"""What every table-driven format shares: a declarative rename table of this project's PyTorch names.

timm's and Hugging Face's ViTs lay every tensor out as the PyTorch mirror does (Linear
(out, in), Conv2d OIHW): they differ from `vit_torch`'s state dict only in names, and in
tensors they keep fused (timm's `qkv`, the three projections one after the other along
the output axis). So their formats are a table of rows

    (ours, theirs)

where `ours` is a `vit_torch` state-dict key, or a tuple of keys that `theirs` holds
concatenated along axis 0, and `{i}` stands for an encoder block's index. `Table`
expands such rows for a config and converts both ways, strictly: every missing key,
extra key and shape mismatch is named in the file's own names.

Shapes: D width, L layers.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence, Union

import numpy as np

from parity.core.config import ViTConfig
from parity.core.weights.containers import Lazy
from parity.core.weights.formats import vit_torch
from parity.core.weights.spec import misfit, param_shapes

Row = tuple[Union[str, tuple[str, ...]], str]


def torch_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every `vit_torch` state-dict key of `cfg` and its shape."""
    out = {}
    for k, shape in param_shapes(cfg).items():
        fwd, _ = vit_torch.LAYOUTS[vit_torch.torch_rule(k)[1]]
        out[vit_torch.torch_name(k)] = fwd(np.broadcast_to(np.zeros((), np.uint8), shape)).shape
    return out


class Table:
    """A format's rename table, for converting state dicts both ways."""

    def __init__(self, name: str, rows: Sequence[Row]):
        self.name = name
        self.rows = [((ours,) if isinstance(ours, str) else tuple(ours), theirs) for ours, theirs in rows]
        # theirs templates as regexes, for reading a file whose config is not known yet
        self._patterns = [(re.compile('^' + re.escape(theirs).replace(r'\{i\}', r'(\d+)') + '$'), ours, theirs)
                          for ours, theirs in self.rows]

    def expand(self, ours_keys: Sequence[str], num_layers: int) -> list[tuple[tuple[str, ...], str]]:
        """The rows that apply to a state dict with `ours_keys`: each {i} filled in for every block."""
        have = set(ours_keys)
        out = []
        for ours, theirs in self.rows:
            for i in (range(num_layers) if '{i}' in theirs else [None]):
                fill = (lambda t: t) if i is None else (lambda t, i=i: t.replace('{i}', str(i)))
                names = tuple(fill(o) for o in ours)
                if all(n in have for n in names):
                    out.append((names, fill(theirs)))
        return out

    def export(self, state: dict, cfg: ViTConfig, consume: bool = False) -> dict:
        """A `vit_torch` state dict (NumPy arrays or views) under this format's names.

        Fused tensors come back as `Lazy`; the others are `state`'s own arrays (moved out of
        `state` with `consume=True`). Raises when a key of `state` has no row here.
        """
        rows = self.expand(list(state), cfg.num_layers)
        covered = {n for names, _ in rows for n in names}
        unmapped = sorted(set(state) - covered)
        if unmapped:
            raise AssertionError(f'{self.name} table has no row for {unmapped}')  # a table bug, not a user error
        take = (lambda n: state.pop(n)) if consume else (lambda n: state[n])
        out = {}
        for names, theirs in rows:
            parts = [take(n) for n in names]
            if len(parts) == 1:
                out[theirs] = parts[0]
            else:
                shape = (sum(p.shape[0] for p in parts),) + parts[0].shape[1:]
                out[theirs] = Lazy(shape, parts[0].dtype, lambda parts=parts: np.concatenate(parts))
        return out

    def expected(self, cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
        """Every key of this format for `cfg`, and its shape."""
        shapes = torch_shapes(cfg)
        return {theirs: (sum(shapes[n][0] for n in names),) + shapes[names[0]][1:]
                for names, theirs in self.expand(list(shapes), cfg.num_layers)}

    def import_(self, theirs: Mapping[str, np.ndarray], cfg: ViTConfig, where: str, advice: str) -> dict:
        """This format's state dict back to a `vit_torch` one; strict, in the file's own names."""
        want = self.expected(cfg)
        missing = sorted(want.keys() - theirs.keys())
        extra = sorted(theirs.keys() - want.keys())
        wrong = [f'{k} expected {want[k]} found {tuple(theirs[k].shape)}'
                 for k in want if k in theirs and tuple(theirs[k].shape) != want[k]]
        if missing or extra or wrong:
            raise misfit(where, cfg, missing, extra, wrong, advice)
        shapes = torch_shapes(cfg)
        out = {}
        for names, key in self.expand(list(shapes), cfg.num_layers):
            a = np.asarray(theirs[key])
            if len(names) == 1:
                out[names[0]] = a
                continue
            at = np.cumsum([shapes[n][0] for n in names])[:-1]
            out.update(zip(names, np.split(a, at)))
        return out

    def ours_shapes(self, theirs: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
        """The `vit_torch` keys and shapes a file of this format holds, its config unknown; and its unknown keys.

        A fused tensor is split into equal parts along axis 0 (timm's qkv holds three of D).
        """
        out, unknown = {}, []
        for key, shape in theirs.items():
            for pattern, ours, _ in self._patterns:
                m = pattern.match(key)
                if m:
                    fill = (lambda t: t) if not m.groups() else (lambda t: t.replace('{i}', m.group(1)))
                    part = (shape[0] // len(ours),) + tuple(shape[1:]) if shape else shape
                    out.update({fill(o): part for o in ours})
                    break
            else:
                unknown.append(key)
        return out, unknown
