"""The shared weight layer: every checkpoint format to and from one canonical form. NumPy only.

Canonical form: a flat dict from the official Flax linen parameter names, '/'-joined
(`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`), to NumPy
arrays in the linen layout. `vit_jax` params are exactly this tree; `vit_torch` module
paths are the same names with '.' for '/', and `TORCH_LAYOUT` below is the one table
that says how each leaf is named and laid out there.

Shapes: D width, H heads, Dh = D // H, M MLP size, R representation size,
C classes, N tokens, W ResNet width.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import zipfile
import zlib
from typing import Mapping, Optional

import numpy as np

from parity.config import OFFICIAL_CONFIGS, ViTConfig, heads_for_width, is_square, load_config, official_name_for
from parity.errors import UserError

Params = dict[str, np.ndarray]

POSEMB = 'Transformer/posembed_input/pos_embedding'

# Released files were written by pre-linen Flax, which numbered the submodules of an
# encoder block in call order across types; linen numbers them per type. This is the
# only place the two namings differ, used in both directions.
PRE_LINEN_BLOCK = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'MlpBlock_0',
}
LINEN_BLOCK = {v: k for k, v in PRE_LINEN_BLOCK.items()}
_BLOCK_CHILD = re.compile(r'^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$')
# Released files keep GroupNorm scale/bias as (1, 1, 1, C); linen has (C,).
_GROUPNORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')

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
_LAYOUTS = {
    'same': (lambda a: a, lambda a, shape: a),
    'dense': (lambda a: a.T, lambda a, shape: a.T),
    'conv': (lambda a: a.transpose(3, 2, 0, 1), lambda a, shape: a.transpose(2, 3, 1, 0)),
    'heads_in': (lambda a: a.reshape(a.shape[0], -1).T, lambda a, shape: a.T.reshape(shape)),
    'heads_bias': (lambda a: a.reshape(-1), lambda a, shape: a.reshape(shape)),
    'heads_out': (lambda a: a.reshape(-1, a.shape[-1]).T, lambda a, shape: a.T.reshape(shape)),
}


# --------------------------------------------------------------------------- the spec

def param_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical parameter of `cfg` and its shape: what the official model's init makes."""
    D, H, Dh, M = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    s: dict[str, tuple[int, ...]] = {}
    cin = 3
    if cfg.is_hybrid:
        W = cfg.resnet_width
        s['conv_root/kernel'] = (7, 7, 3, W)
        s['gn_root/scale'] = s['gn_root/bias'] = (W,)
        cin = W
        for i, units in enumerate(cfg.resnet_num_layers):
            nout = W * 2 ** i
            for j in range(units):
                unit = f'block{i + 1}/unit{j + 1}/'
                if j == 0:  # first unit changes width (and stride after stage 1): projected residual
                    s[unit + 'conv_proj/kernel'] = (1, 1, cin, 4 * nout)
                    s[unit + 'gn_proj/scale'] = s[unit + 'gn_proj/bias'] = (4 * nout,)
                for conv, k, ci, co in (('1', 1, cin, nout), ('2', 3, nout, nout), ('3', 1, nout, 4 * nout)):
                    s[unit + f'conv{conv}/kernel'] = (k, k, ci, co)
                    s[unit + f'gn{conv}/scale'] = s[unit + f'gn{conv}/bias'] = (co,)
                cin = 4 * nout
    s['embedding/kernel'] = (*cfg.patch_size, cin, D)
    s['embedding/bias'] = (D,)
    if cfg.has_cls_token:
        s['cls'] = (1, 1, D)
    s[POSEMB] = (1, cfg.num_tokens, D)
    for i in range(cfg.num_layers):
        b = f'Transformer/encoderblock_{i}/'
        for norm in ('LayerNorm_0', 'LayerNorm_1'):
            s[b + norm + '/scale'] = s[b + norm + '/bias'] = (D,)
        for proj in ('query', 'key', 'value'):
            s[b + f'MultiHeadDotProductAttention_0/{proj}/kernel'] = (D, H, Dh)
            s[b + f'MultiHeadDotProductAttention_0/{proj}/bias'] = (H, Dh)
        s[b + 'MultiHeadDotProductAttention_0/out/kernel'] = (H, Dh, D)
        s[b + 'MultiHeadDotProductAttention_0/out/bias'] = (D,)
        s[b + 'MlpBlock_0/Dense_0/kernel'], s[b + 'MlpBlock_0/Dense_0/bias'] = (D, M), (M,)
        s[b + 'MlpBlock_0/Dense_1/kernel'], s[b + 'MlpBlock_0/Dense_1/bias'] = (M, D), (D,)
    s['Transformer/encoder_norm/scale'] = s['Transformer/encoder_norm/bias'] = (D,)
    features = D
    if cfg.representation_size is not None:
        features = cfg.representation_size
        s['pre_logits/kernel'], s['pre_logits/bias'] = (D, features), (features,)
    if cfg.num_classes:
        s['head/kernel'], s['head/bias'] = (features, cfg.num_classes), (cfg.num_classes,)
    return s


def count_params(cfg: ViTConfig) -> int:
    return sum(math.prod(shape) for shape in param_shapes(cfg).values())


def check_params(params: Mapping[str, np.ndarray], cfg: ViTConfig, where: str) -> None:
    """Raises one error naming every missing key, extra key and shape mismatch; else returns."""
    expected = param_shapes(cfg)
    missing = sorted(expected.keys() - params.keys())
    extra = sorted(params.keys() - expected.keys())
    wrong = [f'{k} expected {expected[k]} found {tuple(params[k].shape)}'
             for k in expected if k in params and tuple(params[k].shape) != expected[k]]
    if missing or extra or wrong:
        parts = [f'{len(missing)} missing: {", ".join(missing)}' if missing else '',
                 f'{len(extra)} extra: {", ".join(extra)}' if extra else '',
                 f'{len(wrong)} shape mismatches: {"; ".join(wrong)}' if wrong else '']
        raise UserError(f'{where} does not fit config {cfg.name or "(unnamed)"}: '
                        + ' | '.join(p for p in parts if p)
                        + ' -- pass the config it was trained with, or omit --config to infer it')


# --------------------------------------------------------------------------- npz files

def read_npz(path: str) -> Params:
    """Every array of an npz file, fully read (so a damaged file fails here, whole)."""
    if not os.path.exists(path):
        raise UserError(f'{path}: no such file')
    if os.path.isdir(path):
        raise UserError(f'{path}: is a directory, expected an .npz checkpoint')
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a plain .npy loads as an ndarray, no context manager
            raise UserError(f'{path}: is a single .npy array, not an .npz checkpoint')
        with z:
            out = {}
            for k in z.files:
                try:
                    out[k] = z[k]
                except ValueError as e:
                    if 'allow_pickle' in str(e):
                        raise UserError(f'{path}: array {k!r} holds pickled Python objects, '
                                        'which are never loaded; re-save it with plain arrays') from None
                    raise
    except UserError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        if 'allow_pickle' in str(e):
            raise UserError(f'{path}: not an .npz archive (it would need unpickling, which is never done)') from None
        raise UserError(f'{path}: truncated or corrupted .npz ({type(e).__name__}: {e}); '
                        'download or copy it again') from None
    if not out:
        raise UserError(f'{path}: the .npz archive is empty')
    bad = [k for k, v in out.items() if v.dtype.kind not in 'fiub']
    if bad:
        raise UserError(f'{path}: arrays {", ".join(bad)} are not numeric (dtype {out[bad[0]].dtype})')
    return out


def canonicalize(flat: Mapping[str, np.ndarray]) -> Params:
    """Any released or linen-numbered flat dict to the canonical form.

    Keeps only the subtree under `opt/target/` or `params/` when present (training
    checkpoints also hold optimizer state), renames pre-linen block numbering and
    squeezes GroupNorm parameters to (C,).
    """
    for prefix in ('opt/target/', 'params/'):
        if any(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            break
    pre_linen = any((m := _BLOCK_CHILD.match(k)) and m.group(2) in ('MultiHeadDotProductAttention_1', 'MlpBlock_3', 'LayerNorm_2')
                    for k in flat)
    out = {}
    for k, v in flat.items():
        if pre_linen and (m := _BLOCK_CHILD.match(k)):
            k = m.group(1) + PRE_LINEN_BLOCK.get(m.group(2), m.group(2)) + m.group(3)
        if _GROUPNORM.search(k) and v.ndim == 4:
            v = v.reshape(v.shape[-1])
        out[k] = v
    return out


def to_released(params: Mapping[str, np.ndarray]) -> Params:
    """Canonical form to the released layout: pre-linen names, GroupNorm as (1, 1, 1, C)."""
    out = {}
    for k, v in params.items():
        if m := _BLOCK_CHILD.match(k):
            k = m.group(1) + LINEN_BLOCK.get(m.group(2), m.group(2)) + m.group(3)
        if _GROUPNORM.search(k):
            v = v.reshape(1, 1, 1, -1)
        out[k] = np.asarray(v)
    return out


def load_npz(path: str) -> Params:
    """A checkpoint file (released, linen, or training layout) in canonical form."""
    return canonicalize(read_npz(path))


def save_npz(path: str, params: Mapping[str, np.ndarray]) -> None:
    """Writes canonical params as a released-layout .npz, atomically (temp file, then rename)."""
    released = to_released(params)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp-', suffix='.npz')
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **released)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- configs

def infer_config(params: Mapping[str, np.ndarray], num_heads: Optional[int] = None) -> ViTConfig:
    """The config a canonical checkpoint was built with, read off its shapes.

    Named after the official variant with the same trunk when there is one. The class
    token tells `token` from `gap`; the unpooled classifiers cannot be told from weights.
    """
    def shape(k):
        if k not in params:
            raise UserError(f'cannot infer a config: the checkpoint has no {k!r}; pass --config')
        return params[k].shape

    kh, kw, _, D = shape('embedding/kernel')
    layers = 0
    while f'Transformer/encoderblock_{layers}/MlpBlock_0/Dense_0/kernel' in params:
        layers += 1
    if not layers:
        raise UserError('cannot infer a config: the checkpoint has no encoder blocks; pass --config')
    q = shape('Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel')
    heads = q[1] if len(q) == 3 else (num_heads or heads_for_width(D))
    if heads is None:
        raise UserError(f'cannot infer the number of heads of a width-{D} model from its PyTorch '
                        'weights; pass --config')
    resnet = None
    width = 1.0
    if 'conv_root/kernel' in params:
        width = shape('conv_root/kernel')[-1] / 64
        resnet = []
        while f'block{len(resnet) + 1}/unit1/conv1/kernel' in params:
            units = 0
            while f'block{len(resnet) + 1}/unit{units + 1}/conv1/kernel' in params:
                units += 1
            resnet.append(units)
    has_cls = 'cls' in params
    cfg = ViTConfig(
        name=None, patch_size=(kh, kw), hidden_size=D, num_layers=layers,
        mlp_dim=shape('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')[1], num_heads=heads,
        classifier='token' if has_cls else 'gap',
        representation_size=params['pre_logits/kernel'].shape[1] if 'pre_logits/kernel' in params else None,
        resnet_num_layers=None if resnet is None else tuple(resnet), resnet_width_factor=width,
        num_classes=params['head/kernel'].shape[1] if 'head/kernel' in params else 0)
    name = official_name_for(cfg)
    if name is not None:  # the official dropout rates come with the name
        official = OFFICIAL_CONFIGS[name]
        cfg = cfg.replace(name=name, dropout_rate=official.dropout_rate,
                          attention_dropout_rate=official.attention_dropout_rate)
    return cfg.replace(image_size=checkpoint_image_size(params, cfg))


def checkpoint_image_size(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> int:
    """The resolution the checkpoint's position embeddings were made for."""
    return checkpoint_grid(params, cfg) * cfg.stem_stride * cfg.patch_size[0]


def checkpoint_grid(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> int:
    if POSEMB not in params:
        raise UserError(f'the checkpoint has no {POSEMB!r}; is it a ViT checkpoint?')
    n = params[POSEMB].shape[1] - int(cfg.has_cls_token)
    if not is_square(n):
        raise UserError(f'position embeddings hold {n} patch tokens, not a square grid; '
                        'only square grids can be resized or inferred')
    return math.isqrt(n)


def resolve_config(spec: Optional[str], params: Mapping[str, np.ndarray], image_size: Optional[int] = None) -> ViTConfig:
    """The config to build for `params`, from `--config` (name, JSON path or None).

    None infers it. An official name fixes the trunk; the head size and representation
    layer come from the checkpoint, since the released files differ there (imagenet21k
    files carry a 768-wide `pre_logits` and a 21843-class head). A JSON file is taken
    as written. The resolution is `image_size`, by default the checkpoint's own grid.
    """
    if spec is None:
        cfg = infer_config(params)
    else:
        cfg = load_config(spec)
        if spec in OFFICIAL_CONFIGS:
            cfg = cfg.replace(
                num_classes=params['head/kernel'].shape[-1] if 'head/kernel' in params else 0,
                representation_size=params['pre_logits/kernel'].shape[-1] if 'pre_logits/kernel' in params else None)
    size = image_size or checkpoint_image_size(params, cfg)
    cfg.grid_for(size)
    return cfg.replace(image_size=size)


# --------------------------------------------------------------------------- adapting

def resize_posemb(posemb: np.ndarray, grid: tuple[int, int], has_cls: bool) -> np.ndarray:
    """Position embeddings (1, N, D) for a new patch grid, as the official `load_pretrained` does.

    Bilinear (`scipy.ndimage.zoom`, order=1) on the square patch grid only; the class-token
    row, when there is one, is kept as it is.
    """
    import scipy.ndimage

    tok, patch = (posemb[:, :1], posemb[0, 1:]) if has_cls else (posemb[:, :0], posemb[0])
    n, D = patch.shape
    if not is_square(n):
        raise UserError(f'position embeddings hold {n} patch tokens, not a square grid; cannot resize them')
    gs = math.isqrt(n)
    patch = patch.reshape(gs, gs, D)
    patch = scipy.ndimage.zoom(patch, (grid[0] / gs, grid[1] / gs, 1), order=1)
    patch = patch.reshape(1, grid[0] * grid[1], D)
    return np.concatenate([tok, patch], axis=1).astype(posemb.dtype)


def adapt_resolution(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> Params:
    """Resizes the position embeddings to `cfg.image_size` when the grids differ."""
    out = dict(params)
    want = param_shapes(cfg)[POSEMB]
    if POSEMB in out and out[POSEMB].shape != want:
        out[POSEMB] = resize_posemb(out[POSEMB], cfg.grid_size, cfg.has_cls_token)
    return out


def prepare_for_inference(params: Mapping[str, np.ndarray], cfg: ViTConfig, where: str) -> Params:
    """Resolution adapted, strictly checked, float32: ready to load into either model."""
    out = adapt_resolution(params, cfg)
    check_params(out, cfg, where)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def prepare_for_finetuning(params: Mapping[str, np.ndarray], cfg: ViTConfig, where: str) -> Params:
    """Fine-tune surgery as the official code does it, then the strict check.

    Position embeddings resized to the new grid; `pre_logits` dropped when the new config
    has no representation layer; a zero head when the class count changes.
    """
    out = adapt_resolution(params, cfg)
    if cfg.representation_size is None:
        out.pop('pre_logits/kernel', None)
        out.pop('pre_logits/bias', None)
    shapes = param_shapes(cfg)
    for k in ('head/kernel', 'head/bias'):
        if k in shapes and (k not in out or out[k].shape != shapes[k]):
            out[k] = np.zeros(shapes[k], np.float32)
    if not cfg.num_classes:
        out.pop('head/kernel', None)
        out.pop('head/bias', None)
    check_params(out, cfg, where)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


# --------------------------------------------------------------------------- PyTorch

def _torch_rule(name: str):
    for pattern, leaf, layout in _TORCH_LAYOUT:
        if pattern.search(name):
            return leaf, layout
    raise AssertionError(name)  # the last rule matches everything


def torch_name(name: str) -> str:
    """The PyTorch state-dict key of a canonical parameter name."""
    leaf, _ = _torch_rule(name)
    path = name.split('/')
    if leaf:
        path[-1] = leaf
    return '.'.join(path)


def to_torch(params: Mapping[str, np.ndarray], cfg: ViTConfig) -> Params:
    """Canonical params to a PyTorch state dict of contiguous NumPy arrays (wrap with torch.from_numpy)."""
    check_params(params, cfg, 'params')
    return {torch_name(k): np.ascontiguousarray(_LAYOUTS[_torch_rule(k)[1]][0](v)) for k, v in params.items()}


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
        fwd, back = _LAYOUTS[_torch_rule(k)[1]]
        want = fwd(np.empty(shapes[k], np.uint8)).shape
        if tuple(state[t].shape) != want:
            wrong.append(f'{t} expected {want} found {tuple(state[t].shape)}')
            continue
        out[k] = np.ascontiguousarray(back(np.asarray(state[t]), shapes[k]))
    if missing or extra or wrong:
        parts = [f'{len(missing)} missing: {", ".join(torch_name(k) for k in missing)}' if missing else '',
                 f'{len(extra)} extra: {", ".join(extra)}' if extra else '',
                 f'{len(wrong)} shape mismatches: {"; ".join(wrong)}' if wrong else '']
        raise UserError(f'{where} does not fit config {cfg.name or "(unnamed)"}: '
                        + ' | '.join(p for p in parts if p)
                        + ' -- pass the config it was trained with')
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
        layout = _torch_rule(name)[1]
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
