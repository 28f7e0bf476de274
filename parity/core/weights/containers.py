"""Checkpoint containers: the bytes on disk to flat dicts of named NumPy arrays, and back.

What a file holds, not what its names mean (that is `formats/`):

- `.npz` (a zip of `.npy` arrays, as `np.savez` and the released checkpoints write it):
  read with large stored members memory-mapped and every CRC checked; written atomically.
- `.safetensors`: read with the safetensors library; written here, streamed array by
  array, so a state dict of views over a memory-mapped checkpoint is never copied whole.
- `.pt` / `.pth`: PyTorch pickles, read with `torch.load(weights_only=True)` only (never
  an arbitrary unpickle) and written with `torch.save`; torch is imported for these alone.

`sniff` tells them apart by their first bytes, not their names. Every writer is atomic
(`parity.core.files.atomic_path`): a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pickle
import re
import struct
import tokenize
import warnings
import zipfile
import zlib
from typing import Callable, Mapping, Optional

import numpy as np

from parity.core.errors import UserError, cause
from parity.core.files import atomic_path, stopped_write
from parity.core.limits import check_compute, check_read, human

Arrays = dict[str, np.ndarray]

# What zipfile and numpy raise on a damaged zip or .npy header (zipfile indexes and unpacks raw bytes;
# numpy parses the header with the tokenizer); each is turned into one UserError naming the file.
DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, IndexError, struct.error,
           NotImplementedError, RuntimeError, OverflowError, SyntaxError, tokenize.TokenError, RecursionError)


@dataclasses.dataclass(frozen=True)
class Lazy:
    """An array not made yet: its shape and dtype now, its values when `make()` is called.

    What `write_safetensors` takes for a tensor a format keeps fused (timm's qkv), so the
    whole checkpoint is never concatenated in memory at once.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

CONTAINERS = ('folder', 'npz', 'safetensors', 'pt')


def sniff(path: str) -> str:
    """Which container `path` is, from its contents: 'folder', 'npz', 'safetensors' or 'pt'."""
    if os.path.isdir(path):
        return 'folder'
    if not os.path.exists(path):
        raise UserError(f'{path}: no such file')
    try:
        with open(path, 'rb') as f:
            head = f.read(16)
            if head.startswith(b'PK'):  # a zip: np.savez writes .npy members, torch.save a pickle and storages
                f.seek(0)
                try:
                    with zipfile.ZipFile(f) as z:
                        names = z.namelist()
                except DAMAGED:
                    return 'npz'  # read_npz says what is wrong with it
                return 'pt' if any(n.endswith('/data.pkl') or n == 'data.pkl' for n in names) else 'npz'
    except OSError as e:
        raise UserError(f'{path}: cannot read it ({e.strerror})') from None
    if head.startswith(_NPY_MAGIC):
        return 'npz'  # read_npz says it is a single array
    if len(head) > 8 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < (1 << 30):
        return 'safetensors'
    if head[:2] == b'\x80\x02':  # the pickle protocol torch.save used before its zip format
        return 'pt'
    raise UserError(f'{path}: not a checkpoint file of a known kind: expected an .npz (the released and '
                    'big_vision checkpoints), a .safetensors or .pt/.pth/.bin state dict, or a Hugging Face folder')


# --------------------------------------------------------------------------- .npz

# Stored (uncompressed) members at least this large are memory-mapped instead of read:
# a large checkpoint then costs page cache rather than a private copy, and a converter
# that drops each array when done holds one array at a time. np.load cannot map an
# npz; a stored member's bytes are a plain .npy file at a known offset, so they can be.
MMAP_MIN_BYTES = 1 << 20
_NPY_MAGIC = b'\x93NUMPY'
_ZIP_LOCAL_HEADER = 30  # fixed part of a zip local file header; name and extra field follow
_CRC_CHUNK = 1 << 22


def read_npz(path: str) -> Arrays:
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
                members = [info for info in z.infolist() if not info.is_dir()]
                for info in members:
                    if not info.filename.endswith('.npy'):
                        raise UserError(f'{path}: member {info.filename!r} is not a .npy array; '
                                        'an .npz checkpoint holds arrays only')
                    if info.flag_bits & 0x1:
                        raise UserError(f'{path}: member {info.filename!r} is encrypted; an .npz checkpoint is not')
                # What cannot be mapped is read into memory: the declared sizes must fit before any is read.
                check_read(sum(i.file_size for i in members if not _mappable(i)), f'{path}: its compressed arrays')
                out = {info.filename[:-len('.npy')]: _read_member(path, f, z, info) for info in members}
    except UserError:
        raise
    except DAMAGED as e:
        raise UserError(f'{path}: truncated or corrupted .npz ({cause(e)}); '
                        'download or copy it again') from None
    if not out:
        raise UserError(f'{path}: the .npz archive is empty')
    # Numbers only; 2-byte void is how np.savez stores bfloat16 (big_vision's checkpoints), which formats upcast.
    bad = [k for k, v in out.items() if v.dtype.kind not in 'fiub' and not _bfloat16_void(v.dtype)]
    if bad:
        raise UserError(f'{path}: arrays {", ".join(bad)} are not numeric (dtype {out[bad[0]].dtype})')
    return out


def _bfloat16_void(dtype: np.dtype) -> bool:
    return dtype.kind == 'V' and dtype.itemsize == 2 and dtype.fields is None


def _mappable(info: zipfile.ZipInfo) -> bool:
    """A member read in place (memory-mapped): stored, not compressed, and large."""
    return info.compress_type == zipfile.ZIP_STORED and info.file_size >= MMAP_MIN_BYTES


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, which is left at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0
    elif version == (2, 0):
        header = np.lib.format.read_array_header_2_0
    else:
        raise ValueError(f'.npy format {version[0]}.{version[1]} (only 1.0 and 2.0 hold plain arrays)')
    try:
        shape, fortran_order, dtype = header(f)
    except (SyntaxError, tokenize.TokenError, RecursionError, TypeError) as e:
        raise ValueError(f'unreadable .npy header ({type(e).__name__})') from None
    if any(n < 0 for n in shape):
        raise ValueError(f'.npy header declares a negative dimension {shape}')
    return shape, fortran_order, dtype


def _read_member(path: str, f, z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One member: memory-mapped when it is stored and large, else read (zipfile checks the CRC)."""
    key = info.filename[:-len('.npy')]
    if not _mappable(info):
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
    shape, fortran_order, dtype = npy_header(f)
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
    """One member read into memory, its header checked against its declared size first (zipfile checks the CRC)."""
    key = info.filename[:-len('.npy')]
    with z.open(info) as member:
        shape, fortran_order, dtype = npy_header(member)
        if dtype.hasobject:
            raise _pickled(path, key)
        if dtype.fields is not None:
            raise UserError(f'{path}: array {key!r} is a structured array (dtype {dtype}), not numbers')
        header = member.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if header + nbytes != info.file_size:
            raise ValueError(f'member {info.filename!r}: its .npy header declares {nbytes} bytes of data, '
                             f'the member holds {info.file_size - header}')
        out = np.empty(shape, dtype, order='F' if fortran_order else 'C')
        view, done = memoryview(out.reshape(-1, order='A')).cast('B'), 0
        while done < nbytes:
            n = member.readinto(view[done:done + _CRC_CHUNK])
            if not n:
                raise EOFError(f'member {info.filename!r} ends early')
            done += n
        member.read()  # to the end, so zipfile checks the CRC
        return out


def _pickled(path: str, key: str) -> UserError:
    return UserError(f'{path}: array {key!r} holds pickled Python objects, '
                     'which are never loaded; re-save it with plain arrays')


def read_npy(path: str, what: str) -> np.ndarray:
    """One array from a .npy file, its header checked against the file and the read budget first; never unpickled.

    `what` names the file in errors (`--input X.npy`).
    """
    if not os.path.isfile(path):
        raise UserError(f'{what}: no such file')
    try:
        with open(path, 'rb') as f:
            shape, fortran_order, dtype = npy_header(f)
            start = f.tell()
    except DAMAGED as e:
        raise UserError(f'{what}: not a readable .npy array ({cause(e)})') from None
    if dtype.hasobject:
        raise UserError(f'{what}: holds pickled Python objects, which are never loaded; save plain arrays')
    nbytes = math.prod(shape) * dtype.itemsize
    size = os.path.getsize(path)
    if start + nbytes != size:
        raise UserError(f'{what}: its header declares {shape} {dtype} ({human(nbytes)}) but the file holds '
                        f'{human(size - start)} of data; truncated or not what it says')
    check_compute(nbytes, f'{what}: reading it')
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f'{what}: not a readable .npy array ({cause(e)})') from None


def write_npz(path: str, arrays: Mapping[str, np.ndarray], durable: bool = False) -> None:
    """`arrays` as an uncompressed .npz (what `np.savez` writes), atomically; `durable` fsyncs first."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)


# --------------------------------------------------------------------------- .safetensors

# safetensors dtype names by NumPy kind and item size.
_SAFETENSORS_DTYPES = {'f2': 'F16', 'f4': 'F32', 'f8': 'F64', 'i1': 'I8', 'i2': 'I16', 'i4': 'I32', 'i8': 'I64',
                       'u1': 'U8', 'u2': 'U16', 'u4': 'U32', 'u8': 'U64', 'b1': 'BOOL'}


# The other way, for reading; BF16 has no NumPy dtype: it is read as its 16 bits and upcast.
_SAFETENSORS_NUMPY = {code: np.dtype(f'<{kind}') for kind, code in _SAFETENSORS_DTYPES.items() if code != 'BOOL'}
_SAFETENSORS_NUMPY.update({'BOOL': np.dtype('bool'), 'BF16': np.dtype('<u2')})
SAFETENSORS_HEADER_MAX = 100 << 20  # the safetensors library's own limit on the JSON header


def read_safetensors(path: str) -> tuple[Arrays, dict[str, str]]:
    """Every tensor of a .safetensors file as NumPy, and the file's string metadata; checked before reading.

    The header's every entry is checked against the file (dtype known, shape whole, offsets
    inside the data and of exactly the size the shape says) before anything is read; the
    tensors come back memory-mapped copy-on-write, as `read_npz`'s do. BF16 tensors are
    upcast to float32, which holds every bfloat16 value exactly.
    """
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file')
    bad = lambda why: UserError(f'{path}: not a readable .safetensors file ({why})')  # noqa: E731
    try:
        size = os.path.getsize(path)
        with open(path, 'rb') as f:
            head = f.read(8)
            n = int.from_bytes(head, 'little')
            if len(head) < 8 or n > min(size - 8, SAFETENSORS_HEADER_MAX):
                raise bad(f'a header of {n} bytes in a file of {size}')
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(cause(e)) from None
    if not isinstance(header, dict):
        raise bad('the header is not a JSON object')
    meta = header.pop('__metadata__', None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad('__metadata__ is not a map of strings')
    data_size, entries = size - 8 - n, {}
    for name, e in header.items():
        ok = (isinstance(e, dict) and e.get('dtype') in _SAFETENSORS_NUMPY and isinstance(e.get('shape'), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e['shape'])
              and isinstance(e.get('data_offsets'), list) and len(e['data_offsets']) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in e['data_offsets']))
        if not ok:
            raise bad(f'entry {name!r} is not a tensor (dtype, shape, data_offsets)')
        start, stop = e['data_offsets']
        dtype = _SAFETENSORS_NUMPY[e['dtype']]
        if not 0 <= start <= stop <= data_size or stop - start != math.prod(e['shape']) * dtype.itemsize:
            raise bad(f'tensor {name!r}: offsets {start}..{stop} do not hold a {e["dtype"]} {e["shape"]} '
                      f'inside the {data_size} data bytes')
        entries[name] = (dtype, tuple(e['shape']), start, e['dtype'])
    check_compute(sum(4 * math.prod(shape) for _, shape, _, code in entries.values() if code == 'BF16'),
                  f'{path}: upcasting its BF16 tensors to float32')
    out = {}
    data = np.memmap(path, np.uint8, mode='c', offset=8 + n, shape=(data_size,)) if data_size else np.zeros(0, np.uint8)
    for name, (dtype, shape, start, code) in entries.items():
        a = data[start:start + math.prod(shape) * dtype.itemsize].view(dtype).reshape(shape)
        out[name] = (a.astype(np.uint32) << 16).view(np.float32) if code == 'BF16' else np.asarray(a)
    return out, meta


def write_safetensors(path: str, arrays: dict, metadata: Optional[Mapping[str, str]] = None,
                      consume: bool = False) -> None:
    """`arrays` (NumPy, any strides: views are fine; or `Lazy`) as a .safetensors file, one array at a time, atomically.

    The safetensors library needs every array in memory at once; this writes the same
    format (8-byte header length, JSON header, aligned little-endian data) through two
    reused buffers, so a state dict of views over a memory-mapped checkpoint is never
    copied whole. `consume=True` pops each array once written, releasing its mapping.
    """
    dtypes = {}
    for k, v in arrays.items():
        dtype = np.dtype(v.dtype)
        code = _SAFETENSORS_DTYPES.get(f'{dtype.kind}{dtype.itemsize}')
        if code is None:
            raise UserError(f'{path}: array {k!r} has dtype {v.dtype}, which safetensors cannot store')
        dtypes[k] = code
    # Widest items first, as the safetensors library orders them, so every array stays aligned.
    order = sorted(arrays, key=lambda k: (-np.dtype(arrays[k].dtype).itemsize, k))
    header, offset = {}, 0
    for k in order:
        header[k] = {'dtype': dtypes[k], 'shape': list(arrays[k].shape),
                     'data_offsets': [offset, offset + arrays[k].nbytes]}
        offset += arrays[k].nbytes
    if metadata:
        header['__metadata__'] = dict(metadata)
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    # Two buffers: one array is laid out in one while the other is being written (a thread).
    size = max((v.nbytes for v in arrays.values()), default=0)
    buffers, busy, writes = [np.empty(size, np.uint8), np.empty(size, np.uint8)], [None, None], []
    with atomic_path(path) as tmp, open(tmp, 'wb') as f, concurrent.futures.ThreadPoolExecutor(1) as writer:
        if hasattr(os, 'posix_fallocate'):  # extents reserved up front: much faster large writes on ext4
            try:
                os.posix_fallocate(f.fileno(), 0, 8 + len(text) + offset)
            except OSError:  # a filesystem without it: plain writes work as well
                pass
        f.write(len(text).to_bytes(8, 'little'))
        f.write(text)
        for i, k in enumerate(order):
            v = arrays.pop(k) if consume else arrays[k]
            v = v.make() if isinstance(v, Lazy) else v
            le = v.dtype.newbyteorder('<')
            if v.flags.c_contiguous and v.dtype == le:
                data = v
            else:
                if busy[i % 2] is not None:
                    busy[i % 2].result()
                data = contiguous_copy(v, buffers[i % 2][:v.nbytes].view(le).reshape(v.shape))
            writes.append(writer.submit(f.write, data.reshape(-1).view(np.uint8)))
            busy[i % 2] = writes[-1]
            del v, data
        for w in writes:
            w.result()  # re-raises a failed write (a full disk, say)


# --------------------------------------------------------------------------- .pt / .pth

def read_pt(path: str) -> Arrays:
    """A tensors-only PyTorch state dict file as NumPy arrays; `torch.load(weights_only=True)` only.

    Files in torch's zip format are memory-mapped (`mmap=True`), so their tensors cost page
    cache, not memory; the legacy format is read whole, within the memory budget. Only a flat
    dict of dense CPU tensors with string keys is accepted; bfloat16 is upcast to float32.
    """
    import torch

    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file')
    zipped = zipfile.is_zipfile(path)
    if not zipped:
        check_compute(os.path.getsize(path), f'{path}: a legacy (not zip) PyTorch file, read whole,')
    try:
        with warnings.catch_warnings():  # its notes on sparse tensors: refused below, in one line
            warnings.filterwarnings('ignore', category=UserWarning, module='torch')
            state = torch.load(path, map_location='cpu', weights_only=True, mmap=zipped)
    except DAMAGED + (pickle.UnpicklingError, TypeError, AttributeError) as e:  # weights_only refuses objects so
        # torch's message spans many lines with terminal escapes; keep the line that names the refused object.
        lines = [re.sub(r'\x1b\[[0-9;]*m', '', line).strip() for line in str(e).splitlines()] or ['']
        why = next((line.split('. ')[0] for line in lines if line.startswith('WeightsUnpickler error:')), lines[0])
        raise UserError(f'{path}: not a tensors-only PyTorch state dict ({type(e).__name__}: {why})') from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path}: expected a dict of tensors (a state_dict), found {type(state).__name__}'
                        + ('' if not isinstance(state, dict) else ' of other values'))
    bad_keys = [k for k in state if not isinstance(k, str)]
    if bad_keys:
        raise UserError(f'{path}: state dict keys must be names; found {type(bad_keys[0]).__name__} {bad_keys[0]!r}')
    for k, v in state.items():
        if v.layout != torch.strided or v.is_meta or v.is_quantized or v.is_complex() or v.device.type != 'cpu':
            why = ('meta (no data)' if v.is_meta else 'quantized' if v.is_quantized else 'complex'
                   if v.is_complex() else f'{v.layout}' if v.layout != torch.strided else f'on {v.device}')
            raise UserError(f'{path}: tensor {k!r} is {why}; a checkpoint holds dense real tensors')
    # bfloat16 has no NumPy dtype: upcast to float32, which holds every bfloat16 value exactly.
    check_compute(sum(4 * v.numel() for v in state.values() if v.dtype == torch.bfloat16),
                  f'{path}: upcasting its bfloat16 tensors to float32')
    try:
        return {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy() for k, v in state.items()}
    except (TypeError, RuntimeError) as e:  # a dtype NumPy has no counterpart for
        raise UserError(f'{path}: a tensor of a dtype NumPy cannot hold ({str(e).splitlines()[0][:100]})') from None


def write_pt(path: str, arrays: dict) -> None:
    """NumPy `arrays` (or `Lazy`) as a PyTorch state dict file (`torch.save` of tensors), atomically; empties `arrays`.

    torch.save pickles the whole dict, so this holds every tensor at once (.safetensors does not).
    """
    import torch

    tensors = {}
    for k in list(arrays):
        v = arrays.pop(k)
        tensors[k] = torch.from_numpy(np.ascontiguousarray(v.make() if isinstance(v, Lazy) else v))
    with atomic_path(path) as tmp:
        try:
            torch.save(tensors, tmp)
        except RuntimeError:  # torch's zip writer reports a failed write (a full disk, ulimit -f) this way
            raise stopped_write(path, tmp) from None


# --------------------------------------------------------------------------- arrays

_STRIP = 8  # source rows per step of a transposing copy


def contiguous_copy(a: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
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
