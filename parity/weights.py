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

import concurrent.futures
import json
import math
import os
import re
import zipfile
import zlib
from typing import Mapping, Optional

import numpy as np

from parity.config import OFFICIAL_CONFIGS, ViTConfig, heads_for_width, is_square, load_config, official_name_for
from parity.errors import UserError
from parity.files import atomic_path

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
        raise _misfit(where, cfg, missing, extra, wrong, 'pass the config it was trained with, or omit --config to infer it')


def _misfit(where: str, cfg: ViTConfig, missing: list, extra: list, wrong: list, advice: str) -> UserError:
    """The one-line strict-check error: every missing key, extra key and shape mismatch."""
    parts = [f'{len(missing)} missing: {", ".join(missing)}' if missing else '',
             f'{len(extra)} extra: {", ".join(extra)}' if extra else '',
             f'{len(wrong)} shape mismatches: {"; ".join(wrong)}' if wrong else '']
    return UserError(f'{where} does not fit config {cfg.name or "(unnamed)"}: '
                     + ' | '.join(p for p in parts if p) + f' -- {advice}')


# --------------------------------------------------------------------------- npz files

# Stored (uncompressed) members at least this large are memory-mapped instead of read:
# a large checkpoint then costs page cache rather than a private copy, and a converter
# that drops each array when done holds one array at a time. np.load cannot map an
# npz; a stored member's bytes are a plain .npy file at a known offset, so they can be.
MMAP_MIN_BYTES = 1 << 20
_NPY_MAGIC = b'\x93NUMPY'
_ZIP_LOCAL_HEADER = 30  # fixed part of a zip local file header; name and extra field follow
_CRC_CHUNK = 1 << 22


def read_npz(path: str) -> Params:
    """Every array of an npz file, checked whole (so a damaged file fails here, before any use).

    Large stored members (as `np.savez` and the released checkpoints write them) come back
    memory-mapped copy-on-write: plain writable ndarrays whose writes stay private, read
    from the file only when touched. Their CRC-32 is checked here by streaming the bytes,
    so corruption is caught as `np.load` would catch it. Compressed and small members are
    read into memory.
    """
    if not os.path.exists(path):
        raise UserError(f'{path}: no such file')
    if os.path.isdir(path):
        raise UserError(f'{path}: is a directory, expected an .npz checkpoint')
    try:
        with open(path, 'rb') as f:
            magic = f.read(len(_NPY_MAGIC))
            if magic == _NPY_MAGIC:
                raise UserError(f'{path}: is a single .npy array, not an .npz checkpoint')
            if not magic.startswith(b'PK'):
                raise UserError(f'{path}: not an .npz archive (a zip of .npy arrays, as np.savez writes)')
            f.seek(0)
            with zipfile.ZipFile(f) as z:
                out = {}
                for info in z.infolist():
                    if info.is_dir():
                        continue
                    if not info.filename.endswith('.npy'):
                        raise UserError(f'{path}: member {info.filename!r} is not a .npy array; '
                                        'an .npz checkpoint holds arrays only')
                    out[info.filename[:-len('.npy')]] = _read_member(path, f, z, info)
    except UserError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, NotImplementedError) as e:
        raise UserError(f'{path}: truncated or corrupted .npz ({type(e).__name__}: {e}); '
                        'download or copy it again') from None
    if not out:
        raise UserError(f'{path}: the .npz archive is empty')
    bad = [k for k, v in out.items() if v.dtype.kind not in 'fiub']
    if bad:
        raise UserError(f'{path}: arrays {", ".join(bad)} are not numeric (dtype {out[bad[0]].dtype})')
    return out


def _read_member(path: str, f, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member: memory-mapped when it is stored and large, else read (zipfile checks the CRC)."""
    key = info.filename[:-len('.npy')]
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < MMAP_MIN_BYTES:
        return _read_whole(path, z, info)
    f.seek(info.header_offset)
    local = f.read(_ZIP_LOCAL_HEADER)
    if len(local) != _ZIP_LOCAL_HEADER or local[:4] != b'PK\x03\x04':
        raise zipfile.BadZipFile(f'bad local header for {info.filename!r}')
    start = info.header_offset + _ZIP_LOCAL_HEADER + int.from_bytes(local[26:28], 'little') \
        + int.from_bytes(local[28:30], 'little')
    if start + info.file_size > os.fstat(f.fileno()).st_size:
        raise EOFError(f'member {info.filename!r} runs past the end of the file')
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:  # format 3.0 only adds utf-8 field names; no checkpoint needs mapping it
        return _read_whole(path, z, info)
    if dtype.hasobject:
        raise _pickled(path, key)
    offset = f.tell()
    if offset - start + math.prod(shape) * dtype.itemsize != info.file_size:
        raise ValueError(f'member {info.filename!r}: .npy header does not match its size')
    crc, left = 0, info.file_size
    f.seek(start)
    buffer = bytearray(min(_CRC_CHUNK, left))
    while left:
        n = f.readinto(memoryview(buffer)[:min(left, len(buffer))])
        if not n:
            raise EOFError(f'member {info.filename!r} ends early')
        crc, left = zlib.crc32(memoryview(buffer)[:n], crc), left - n
    if crc != info.CRC:
        raise zipfile.BadZipFile(f'bad CRC-32 for member {info.filename!r}')
    return np.asarray(np.memmap(f, dtype=dtype, mode='c', offset=offset, shape=shape,
                                order='F' if fortran_order else 'C'))


def _read_whole(path: str, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member read into memory, as np.load does it (zipfile checks the CRC on the way)."""
    with z.open(info) as member:
        try:
            return np.lib.format.read_array(member, allow_pickle=False)
        except ValueError as e:
            if 'allow_pickle' in str(e):
                raise _pickled(path, info.filename[:-len('.npy')]) from None
            raise


def _pickled(path: str, key: str) -> UserError:
    return UserError(f'{path}: array {key!r} holds pickled Python objects, '
                     'which are never loaded; re-save it with plain arrays')


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
    with atomic_path(path) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, **released)


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


def torch_views(params: dict, cfg: ViTConfig, consume: bool = False) -> Params:
    """The PyTorch state dict of canonical `params` as views of their arrays: nothing copied, nothing read.

    What a streaming writer (`write_safetensors`) consumes. `consume=True` moves the
    arrays out of `params`, so the views hold the only references to them.
    """
    check_params(params, cfg, 'params')
    return {torch_name(k): _LAYOUTS[_torch_rule(k)[1]][0](params.pop(k) if consume else params[k])
            for k in list(params)}


def to_torch(params: Mapping[str, np.ndarray], cfg: ViTConfig, consume: bool = False) -> Params:
    """Canonical params to a PyTorch state dict of fresh contiguous NumPy arrays (wrap with torch.from_numpy).

    The arrays never share memory with `params`. `consume=True` pops each entry from
    `params` (then a dict) as it is converted, so the memory-mapped arrays of `read_npz`
    are unmapped as it goes: converting holds one copy, not the file's pages and a copy.
    """
    views = torch_views(params if consume else dict(params), cfg, consume=True)
    return {k: _contiguous_copy(views.pop(k)) for k in list(views)}


_STRIP = 8  # source rows per step of a transposing copy


def _contiguous_copy(a: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
    """`a` copied into `out` (default: a new array), C-contiguous.

    A transposed matrix (every dense kernel on its way to PyTorch) is copied a strip of
    source rows at a time: a plain copy walks the source a whole row apart per element
    and runs several times slower on large kernels.
    """
    out = np.empty(a.shape, a.dtype) if out is None else out
    if a.ndim == 2 and a.T.flags.c_contiguous and not a.flags.c_contiguous:
        src = a.T  # (m, n), contiguous; a is its (n, m) transpose
        for i in range(0, src.shape[0], _STRIP):
            out[:, i:i + _STRIP] = src[i:i + _STRIP].T
    else:
        np.copyto(out, a)
    return out


# safetensors dtype names by NumPy kind and item size.
_SAFETENSORS_DTYPES = {'f2': 'F16', 'f4': 'F32', 'f8': 'F64', 'i1': 'I8', 'i2': 'I16', 'i4': 'I32', 'i8': 'I64',
                       'u1': 'U8', 'u2': 'U16', 'u4': 'U32', 'u8': 'U64', 'b1': 'BOOL'}


def write_safetensors(path: str, arrays: dict, metadata: Optional[Mapping[str, str]] = None,
                      consume: bool = False) -> None:
    """`arrays` (NumPy, any strides: views are fine) as a .safetensors file, one array at a time.

    The safetensors library needs every array in memory at once; this writes the same
    format (8-byte header length, JSON header, aligned little-endian data) through two
    reused buffers, so a state dict of views over a memory-mapped checkpoint is never
    copied whole. `consume=True` pops each array once written, releasing its mapping.
    """
    dtypes = {}
    for k, v in arrays.items():
        code = _SAFETENSORS_DTYPES.get(f'{v.dtype.kind}{v.dtype.itemsize}')
        if code is None:
            raise UserError(f'{path}: array {k!r} has dtype {v.dtype}, which safetensors cannot store')
        dtypes[k] = code
    # Widest items first, as the safetensors library orders them, so every array stays aligned.
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header, offset = {}, 0
    for k in order:
        header[k] = {'dtype': dtypes[k], 'shape': list(arrays[k].shape), 'data_offsets': [offset, offset + arrays[k].nbytes]}
        offset += arrays[k].nbytes
    if metadata:
        header['__metadata__'] = dict(metadata)
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    # Two buffers: one array is laid out in one while the other is being written (a thread).
    size = max((v.nbytes for v in arrays.values()), default=0)
    buffers, busy, writes = [np.empty(size, np.uint8), np.empty(size, np.uint8)], [None, None], []
    with open(path, 'wb') as f, concurrent.futures.ThreadPoolExecutor(1) as writer:
        if hasattr(os, 'posix_fallocate'):  # extents reserved up front: much faster large writes on ext4
            try:
                os.posix_fallocate(f.fileno(), 0, 8 + len(text) + offset)
            except OSError:  # a filesystem without it: plain writes work as well
                pass
        f.write(len(text).to_bytes(8, 'little'))
        f.write(text)
        for i, k in enumerate(order):
            v = arrays.pop(k) if consume else arrays[k]
            le = v.dtype.newbyteorder('<')
            if v.flags.c_contiguous and v.dtype == le:
                data = v
            else:
                if busy[i % 2] is not None:
                    busy[i % 2].result()
                data = _contiguous_copy(v, buffers[i % 2][:v.nbytes].view(le).reshape(v.shape))
            writes.append(writer.submit(f.write, data.reshape(-1).view(np.uint8)))
            busy[i % 2] = writes[-1]
            del v, data
        for w in writes:
            w.result()  # re-raises a failed write (a full disk, say)


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
        raise _misfit(where, cfg, [torch_name(k) for k in missing], extra, wrong, 'pass the config it was trained with')
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
