"""Named intermediates of the PyTorch model, in the Flax layout (names in `parity.core.intermediates`)."""

from __future__ import annotations

import numpy as np
import torch

from parity.core.intermediates import flat_name, forward_order
from vit_torch.model import Module, VisionTransformer


class _Recorder:
    """Collects `sow`n values under their flat names; attached to every submodule for one call."""

    def __init__(self, paths: dict[int, tuple[str, ...]], collections: tuple[str, ...]):
        self.paths, self.collections, self.values = paths, collections, {}

    def wants(self, collection: str) -> bool:
        return collection in self.collections

    def __call__(self, collection, module, name, value):
        if collection in self.collections:
            self.values[flat_name(self.paths[id(module)] + (name,))] = value


def forward_with_intermediates(model: VisionTransformer, images: torch.Tensor, *, attention: bool = False
                               ) -> dict[str, np.ndarray]:
    """Runs `model` on NCHW `images`; every named intermediate as NumPy, in forward order.

    Layouts follow the Flax model (the hybrid `stem` comes back NHWC), so the two compare
    name for name.
    """
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, Module)]
    recorder = _Recorder({id(m): tuple(name.split('.')) if name else () for name, m in modules},
                         ('intermediates', 'attention') if attention else ('intermediates',))
    for _, m in modules:
        m.recorder = recorder
    try:
        with torch.no_grad():
            model(images)
    finally:
        for _, m in modules:
            m.recorder = None
    got = {k: v.detach().float().cpu() for k, v in recorder.values.items()}
    if 'stem' in got:
        got['stem'] = got['stem'].permute(0, 2, 3, 1)  # NCHW -> NHWC, as in vit_jax
    return {name: got[name].numpy() for name in forward_order(model.config, attention) if name in got}
