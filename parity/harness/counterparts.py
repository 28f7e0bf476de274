"""The candidates a reference is compared with: vit_torch, timm, transformers, or your own function.

Each returns the named intermediates of `parity.core.intermediates` (Flax layouts) and, where
it can, the sub-step outputs the diagnosis uses (`parity.harness.diagnosis.substep_key`):
vit_torch, timm and transformers through forward hooks, a user's function through
whatever it returns.

`--against timm:MODEL` builds timm's model for the checkpoint's structure (classes,
resolution, pooling) and loads the checkpoint with timm's own npz loader
(`_load_weights`); numerics stay timm's defaults (erf GELU). `--against hf` converts
the canonical params to transformers' ViT with the tables of `parity.core.weights.formats.hf`
(the weight layer's own, which reads and writes Hugging Face folders) and runs
transformers' own model: built from a Hugging Face folder's own config.json when the
checkpoint is one (so its `hidden_act` and `layer_norm_eps`, as transformers runs it),
else with transformers' defaults (LayerNorm eps 1e-12, erf GELU).

Shapes: B batch, N tokens, D width, H heads; images NHWC here, NCHW inside torch models.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys
import tempfile
import traceback
from typing import Any, Callable, Mapping, Optional

import numpy as np

from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.core.intermediates import forward_order
from parity.core.weights.formats import hf as hf_format, timm as timm_format, vit_torch as torch_format
from parity.harness.diagnosis import SUBSTEPS, substep_key

Intermediates = dict[str, np.ndarray]

# --------------------------------------------------------------------------- torch plumbing


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any device, bf16 included), JAX array or array-like as a NumPy array."""
    if hasattr(value, 'detach'):
        value = value.detach()
        if str(value.dtype) in ('torch.bfloat16', 'torch.float16'):
            value = value.float()
        value = value.cpu().numpy()
    return np.asarray(value)


# Which module of a torch model gives which of our intermediates: (our name, module path,
# what to take). Paths and names may hold {i} (a block) and {block} (its canonical path).
Tap = tuple[str, str, str]


def _expand(taps: tuple[Tap, ...], cfg: ViTConfig) -> list[Tap]:
    out = []
    for ours, path, what in taps:
        blocks = range(cfg.num_layers) if '{i}' in path else [None]
        for i in blocks:
            fill = {} if i is None else {'i': i, 'block': f'Transformer/encoderblock_{i}'}
            out.append((ours.format(**fill), path.format(**fill), what))
    return out


@contextlib.contextmanager
def tapped(model, taps: list[Tap]):
    """Forward hooks that record each tap's tensor (as NumPy) into the yielded dict."""
    modules = dict(model.named_modules())
    got: Intermediates = {}
    handles = []
    for ours, path, what in taps:
        if path not in modules:
            raise UserError(f'{type(model).__name__} has no module {path!r} (needed for {ours}); '
                            'this library version is not supported by the harness')

        def hook(module, inputs, output, ours=ours, what=what):
            value = inputs[0] if what == 'input' else output
            if what.startswith('output['):
                value = output[int(what[7:-1])]
            elif what == 'output' and isinstance(value, (tuple, list)):  # (hidden, weights, ...) in older versions
                value = value[0]
            if value is not None:
                got[ours] = to_numpy(value)

        handles.append(modules[path].register_forward_hook(hook))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _finish(got: Intermediates, cfg: ViTConfig, logits, attention: bool) -> Intermediates:
    """Flax layouts (NHWC stem) and forward order; sub-step outputs after the named ones."""
    got = dict(got)
    got['logits'] = to_numpy(logits)
    if 'stem' in got:
        got['stem'] = got['stem'].transpose(0, 2, 3, 1)  # NCHW -> NHWC, as in vit_jax
    names = forward_order(cfg, attention)
    out = {n: got.pop(n).astype(np.float32) for n in names if n in got}
    out.update({k: v.astype(np.float32) for k, v in got.items() if attention or not k.startswith('attention_')})
    return out


# --------------------------------------------------------------------------- vit_torch

VIT_TORCH_TAPS: tuple[Tap, ...] = tuple(
    (f'{{block}}/{s}', f'Transformer.encoderblock_{{i}}.{s}', 'output') for s in SUBSTEPS)


def run_vit_torch(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, precision: str = 'fp32',
                  attention: bool = False) -> Intermediates:
    """vit_torch at `precision`: its named intermediates and every block's sub-steps."""
    from vit_torch import inspect, params as torch_params, runtime

    device = runtime.device()
    model = torch_params.build_model(cfg, params).to(device)
    with runtime.precision(precision, device), tapped(model, _expand(VIT_TORCH_TAPS, cfg)) as subs:
        named = inspect.forward_with_intermediates(model, runtime.to_nchw(x, device), attention=attention)
    return {**named, **{k: v.astype(np.float32) for k, v in subs.items()}}


# --------------------------------------------------------------------------- timm

TIMM_TAPS: tuple[Tap, ...] = (
    ('embedding', 'patch_embed', 'output'),
    ('with_posemb', 'pos_drop', 'output'),
    ('{block}/LayerNorm_0', 'blocks.{i}.norm1', 'output'),
    ('{block}/MultiHeadDotProductAttention_0', 'blocks.{i}.attn', 'output'),
    ('attention_{i}', 'blocks.{i}.attn.attn_drop', 'input'),
    ('{block}/LayerNorm_1', 'blocks.{i}.norm2', 'output'),
    ('{block}/MlpBlock_0', 'blocks.{i}.mlp', 'output'),
    ('encoderblock_{i}', 'blocks.{i}', 'output'),
    ('encoder_norm', 'norm', 'output'),
    ('pre_logits', 'head', 'input'),
)


def _timm_structure(model) -> dict[str, Any]:
    blk = model.blocks[0]
    return {'width': model.embed_dim, 'depth': len(model.blocks), 'heads': blk.attn.num_heads,
            'MLP': blk.mlp.fc1.out_features, 'patch': tuple(model.patch_embed.patch_size),
            'hybrid': hasattr(model.patch_embed, 'backbone')}


def build_timm(name: str, cfg: ViTConfig, raw: Mapping[str, np.ndarray]):
    """timm's `name` shaped for the checkpoint (classes, resolution, pooling), loaded by timm's npz loader.

    `raw` is the checkpoint as read (position embeddings not resized: timm's loader resizes
    them itself). Numerics are timm's defaults.
    """
    import timm
    from timm.models.vision_transformer import _load_weights

    why = timm_format.expressible(cfg)
    if why:
        raise UserError(f'--against timm:{name}: timm\'s VisionTransformer cannot express {why}, which this '
                        'checkpoint has; compare it against vit_torch')
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models('vit_*'), n=3)
        raise UserError(f'--against timm:{name}: timm has no such model' + (f'; did you mean {", ".join(close)}?'
                                                                            if close else ''))
    try:
        pool, class_token = timm_format.POOLS[cfg.classifier]
        model = timm.create_model(name, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.image_size,
                                  class_token=class_token, global_pool=pool, fc_norm=False)
    except Exception as e:  # timm raises assorted errors for kwargs a model cannot take
        raise UserError(f'--against timm:{name}: timm cannot build it for this checkpoint '
                        f'({type(e).__name__}: {e})') from None
    have = _timm_structure(model)
    want = {'width': cfg.hidden_size, 'depth': cfg.num_layers, 'heads': cfg.num_heads, 'MLP': cfg.mlp_dim,
            'patch': cfg.patch_size, 'hybrid': cfg.is_hybrid}
    wrong = [f'{k} {have[k]} vs {want[k]}' for k in want if have[k] != want[k]]
    if wrong:
        raise UserError(f'--against timm:{name}: the timm model does not fit the checkpoint ({"; ".join(wrong)}, '
                        'timm vs checkpoint); pick the timm name of the same variant')
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'released.npz')
        # The layouts timm's loader reads: the released one, or big_vision's for what the official model lacks.
        weights.save(path, dict(raw), cfg, 'npz' if cfg.is_official else 'big_vision')
        try:
            _load_weights(model, path)
        except Exception as e:  # KeyError for a missing array, RuntimeError for a shape
            raise UserError(f'--against timm:{name}: timm\'s npz loader cannot load this checkpoint into it '
                            f'({type(e).__name__}: {e})') from None
    return model.eval()


def run_timm(name: str, cfg: ViTConfig, raw: Optional[Mapping[str, np.ndarray]], x: np.ndarray,
             precision: str = 'fp32', attention: bool = False, model=None) -> Intermediates:
    """timm's model (`model` when already built by `build_timm`, else built from `raw`) on x."""
    from vit_torch import runtime

    device = runtime.device()
    model = (model if model is not None else build_timm(name, cfg, raw)).to(device)
    taps = _expand(TIMM_TAPS, cfg)
    if cfg.is_hybrid:
        taps.append(('stem', 'patch_embed.proj', 'input'))
    if attention:
        for blk in model.blocks:
            blk.attn.fused_attn = False  # the fused kernel never forms the weights
    else:
        taps = [t for t in taps if not t[0].startswith('attention_')]
    with runtime.precision(precision, device), tapped(model, taps) as got:
        logits = model(runtime.to_nchw(x, device))
    return _finish(got, cfg, logits, attention)


def timm_notes(name: str) -> list[str]:
    return [f'timm {name}: GELU exact erf (nn.GELU), LayerNorm eps 1e-6, checkpoint read by timm\'s _load_weights '
            '(which resizes position embeddings with torch bilinear, align_corners=False)']


# --------------------------------------------------------------------------- transformers

# {L} is block i's module: vit.layers.{i} (transformers >= 5) or vit.encoder.layer.{i} (4).
HF_TAPS = (
    # our name                                 transformers >= 5           transformers 4 (None: same)  take
    ('embedding',                              'vit.embeddings.patch_embeddings', None,                 'output'),
    ('with_posemb',                            'vit.embeddings',           None,                        'output'),
    ('{block}/LayerNorm_0',                    '{L}.layernorm_before',     None,                        'output'),
    ('{block}/MultiHeadDotProductAttention_0', '{L}.attention',            None,                        'output'),
    ('attention_{i}',                          '{L}.attention',            '{L}.attention.attention',   'output[1]'),
    ('{block}/LayerNorm_1',                    '{L}.layernorm_after',      None,                        'output'),
    ('{block}/MlpBlock_0',                     '{L}.mlp',                  '{L}.output.dense',          'output'),
    ('encoderblock_{i}',                       '{L}',                      None,                        'output'),
    ('encoder_norm',                           'vit.layernorm',            None,                        'output'),
    ('pre_logits',                             'classifier',               None,                        'input'),
)


def _hf_generation() -> int:
    """5 for transformers >= 5 (q_proj/o_proj, vit.layers), else 4 (attention.attention.query, vit.encoder.layer)."""
    import transformers

    return 5 if int(transformers.__version__.split('.')[0]) >= 5 else 4


def hf_taps(generation: int) -> tuple[Tap, ...]:
    """HF_TAPS with block i's module path filled in for one transformers generation."""
    layer = 'vit.layers.{i}' if generation >= 5 else 'vit.encoder.layer.{i}'
    return tuple((ours, (v5 if generation >= 5 else v4 or v5).replace('{L}', layer), what)
                 for ours, v5, v4, what in HF_TAPS)


def check_hf_expressible(cfg: ViTConfig) -> None:
    """transformers' ViTForImageClassification: a class-token classifier straight off the final LayerNorm."""
    why = hf_format.expressible(cfg) or ('a model without a head (ViTForImageClassification classifies)'
                                         if not cfg.num_classes else None)
    if why:
        raise UserError(f'--against hf: transformers\' ViTForImageClassification cannot express {why}; '
                        'it classifies the class token straight off the final LayerNorm')


def to_hf(params: Mapping[str, np.ndarray], cfg: ViTConfig, generation: Optional[int] = None) -> dict[str, np.ndarray]:
    """Canonical params as a transformers ViTForImageClassification state dict (NumPy), in memory's names.

    The names are `parity.core.weights.formats.hf`'s table for the running transformers
    (`V5` for transformers 5, `HUB` for 4); the trunk goes under `vit.`, the head outside it.
    """
    check_hf_expressible(cfg)
    table = hf_format.V5 if (generation or _hf_generation()) >= 5 else hf_format.HUB
    state = table.export(torch_format.to_torch(params, cfg), cfg)
    return {k if k.startswith('classifier.') else hf_format.PREFIX + k: v for k, v in state.items()}


def _hf_config(cfg: ViTConfig, hub_config: Optional[Mapping]):
    """transformers' config: the folder's own config.json as transformers reads it (at the resolution the command
    runs), or transformers' defaults around `cfg`'s shapes."""
    from transformers import ViTConfig as HFConfig

    if hub_config is not None:
        return HFConfig.from_dict(dict(hub_config, image_size=cfg.image_size), attn_implementation='eager')
    return HFConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                    num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, image_size=cfg.image_size,
                    patch_size=cfg.patch_size[0], num_labels=cfg.num_classes, attn_implementation='eager')


def build_hf(cfg: ViTConfig, params: Mapping[str, np.ndarray], hub_config: Optional[Mapping] = None):
    import torch
    from transformers import ViTForImageClassification

    state = to_hf(params, cfg)
    hf_cfg = _hf_config(cfg, hub_config)
    model = ViTForImageClassification(hf_cfg)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise UserError(f'--against hf: this transformers version names ViT weights differently '
                        f'(missing {missing[:3]}, unexpected {unexpected[:3]}); update the tables of '
                        'parity.core.weights.formats.hf')
    return model.eval()


def run_hf(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, precision: str = 'fp32',
           attention: bool = False, hub_config: Optional[Mapping] = None) -> Intermediates:
    """transformers' ViTForImageClassification on `x`; `hub_config`: the checkpoint's own config.json, if it is a
    Hugging Face folder."""
    from vit_torch import runtime

    device = runtime.device()
    model = build_hf(cfg, params, hub_config).to(device)
    taps = [t for t in _expand(hf_taps(_hf_generation()), cfg) if attention or not t[0].startswith('attention_')]
    with runtime.precision(precision, device), tapped(model, taps) as got:
        logits = model(pixel_values=runtime.to_nchw(x, device)).logits
    return _finish(got, cfg, logits, attention)


def hf_notes(cfg: ViTConfig, hub_config: Optional[Mapping] = None) -> list[str]:
    d = _hf_config(cfg, hub_config)
    form = 'exact erf GELU' if hf_format.ACTIVATIONS.get(d.hidden_act) == 'erf' else 'tanh GELU'
    whose = "the folder's config.json" if hub_config is not None else 'defaults'
    return [f'transformers ViTForImageClassification, {whose}: hidden_act={d.hidden_act!r} ({form}), '
            f'layer_norm_eps={d.layer_norm_eps:g}; the query scaling is applied to the logits']


# --------------------------------------------------------------------------- a user's function

def load_function(spec: str) -> Callable:
    """`FILE.py:FUNCTION` loaded from its path with importlib (any framework inside)."""
    from parity.harness.child import check_spec

    path, name = check_spec(spec), spec.rpartition(':')[2]
    module_name = f'_parity_verify_{abs(hash(os.path.abspath(path)))}'
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UserError(f'{spec}: {path} cannot be imported as a Python file')
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    with _beside(path):
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # anything the user's module raises at import time
            raise UserError(f'{spec}: importing {path} raised {_where(e, path)}') from None
    fn = getattr(module, name, None)
    if not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith('_')
                 and getattr(v, '__module__', None) == module_name]
        defines = f'; it defines {", ".join(names)}' if names else ''
        raise UserError(f'{spec}: {path} has no function {name!r}{defines}')
    fn._parity_path = path  # for error locations
    return fn


@contextlib.contextmanager
def _beside(path: str):
    """The file's folder on sys.path, so it can import its neighbours."""
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _where(e: BaseException, path: str) -> str:
    """`TypeError: message (at file.py:12)`, naming the deepest frame in the user's file."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)] or frames
    at = f' (at {os.path.basename(mine[-1].filename)}:{mine[-1].lineno})' if mine else ''
    message = str(e).splitlines()[0] if str(e) else ''
    return f'{type(e).__name__}: {message}{at}'


def run_function(fn: Callable, spec: str, params: Mapping[str, np.ndarray], x: np.ndarray
                 ) -> tuple[dict[str, Any], list[str]]:
    """Calls fn(params, x) on copies; returns its outputs as NumPy arrays and notes on how they were read."""
    path = getattr(fn, '_parity_path', spec)
    with _beside(path):
        try:
            result = fn({k: np.array(v, np.float32) for k, v in params.items()}, np.array(x, np.float32))
        except Exception as e:  # the implementation under test failed; say where, in one line
            raise UserError(f'{spec} raised {_where(e, path)}') from None
    notes = []
    if not isinstance(result, Mapping):
        if hasattr(result, 'shape') or isinstance(result, (list, tuple)):
            notes.append(f'{spec} returned one array, not a dict; read as logits')
            result = {'logits': result}
        else:
            raise UserError(f'{spec} returned {type(result).__name__}; return a dict of intermediates with '
                            "'logits' at least")
    out = {}
    for k, v in result.items():
        try:
            a = to_numpy(v).astype(np.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            notes.append(f'{k!r}: not an array ({type(e).__name__}), ignored')
            continue
        out[str(k)] = a
    if 'logits' not in out:
        raise UserError(f'{spec} returned no \'logits\' (keys: {", ".join(map(str, result)) or "none"}); '
                        'the dict must hold logits at least')
    return out, notes


def known_names(cfg: ViTConfig) -> list[str]:
    """Every key `verify` reads: the named intermediates, attention weights and block sub-steps."""
    names = forward_order(cfg, attention=True)
    return names + [substep_key(i, s) for i in range(cfg.num_layers) for s in SUBSTEPS]


def _merges(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True when one shape is the other with runs of adjacent axes merged (a C-order reshape of the same layout)."""
    a, b = [d for d in a if d != 1], [d for d in b if d != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        pa, pb = a[i], b[j]
        while pa != pb:
            if pa < pb and i + 1 < len(a):
                i += 1
                pa *= a[i]
            elif pb < pa and j + 1 < len(b):
                j += 1
                pb *= b[j]
            else:
                return False
        i, j = i + 1, j + 1
    return i == len(a) and j == len(b)


def align(name: str, ref_shape: tuple[int, ...], got: np.ndarray) -> tuple[Optional[np.ndarray], Optional[str]]:
    """`got` in the reference's layout when it is only a convention away, and a note saying how it was read.

    Accepted: channels-first 4-D tensors (a torch stem), and tensors of another rank that
    are the same layout with adjacent axes merged or split (an unflattened (B, h, w, D)
    patch grid, (B, 1, D) pooled features). Anything else is not compared.
    """
    if got.shape == ref_shape:
        return got, None
    if got.ndim == 4 and len(ref_shape) == 4 and got.transpose(0, 2, 3, 1).shape == ref_shape:
        return got.transpose(0, 2, 3, 1), f'{name}: returned {got.shape}, read as channels-first (NCHW) and transposed'
    if got.ndim != len(ref_shape) and got.size == int(np.prod(ref_shape)):
        tries = [('', got)]
        if got.ndim == 4:
            tries.append(('channels-first, transposed and ', got.transpose(0, 2, 3, 1)))
        for how, a in tries:
            if _merges(a.shape, ref_shape):
                return a.reshape(ref_shape), f'{name}: returned {got.shape}, read as {how}reshaped to {ref_shape}'
    return None, f'{name}: returned shape {got.shape}, expected {ref_shape}; not compared'
