"""Every checkpoint through one door: `load(FILE[:SUBTREE])` finds the container and the layout from the contents;
`save(PATH, params, cfg, to)` writes any of them.

Containers (`containers.sniff`): an `.npz`, a `.safetensors` or `.pt`/`.pth`/`.bin` state
dict, or a folder (a Hugging Face or timm hub folder with its `config.json`). Layouts
(`FORMATS`, one module each in `formats/`): the released official npz, big_vision's npz,
this project's PyTorch state dict, timm's and Hugging Face's. Names decide the layout,
never the file's extension. `FILE.npz:SUBTREE` picks a nested tower (`siglip.npz:img`).

`load` returns a `Checkpoint`: canonical shapes to infer or resolve a config from
(`configure`), `params(cfg)`, the canonical params, strictly checked in the file's
own names, and the numerics the file's own library runs it with (`numerics`: timm's
erf GELU, a Hugging Face config.json's `hidden_act` and `layer_norm_eps`), which
`configure` applies unless asked for the official ones (`--numerics official`).
`save` refuses, by name, a model a format cannot express.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from typing import Callable, Mapping, Optional

import numpy as np

from parity.core import files, limits
from parity.core.config import NUMERICS_MODES, OFFICIAL_NUMERICS, Numerics, ViTConfig, heads_for_width
from parity.core.errors import UserError
from parity.core.weights import configs, containers
from parity.core.weights.formats import big_vision, hf, released, timm, vit_torch
from parity.core.weights.spec import Params, check_params

FORMATS = {
    'released': 'the official vit_jax npz (google-research/vision_transformer)',
    'big_vision': "big_vision's npz (howto-*, SigLIP image towers, anything big_vision trains)",
    'vit_torch': "this project's PyTorch state dict (.safetensors, .pt)",
    'timm': "timm's ViT state dict (.safetensors, .pth, .bin)",
    'hf': "a Hugging Face transformers ViT folder (config.json + model.safetensors)",
}
ROOT = 'embedding/kernel'  # every ViT image tower in an npz has its patch embedding here


@dataclasses.dataclass
class Checkpoint:
    """One checkpoint, read: its layout, what configs need, and how to get canonical params for a config."""

    where: str  # the path as given, for messages
    format: str  # a key of FORMATS
    shapes: Params  # canonical names -> arrays, or zero-memory stand-ins of the right shape
    convert: Callable[[ViTConfig], Params]  # canonical params for a config, strictly checked
    config: Optional[ViTConfig] = None  # what the file itself says (config.json, safetensors metadata)
    labels: Optional[list[str]] = None  # class names the file carries (Hugging Face's id2label, timm's label_names)
    labels_source: Optional[str] = None  # where `labels` came from, in words
    notes: list[str] = dataclasses.field(default_factory=list)
    num_heads: Optional[int] = None  # where the shapes cannot tell it
    heads_from_width: bool = False  # fall back on the official variant of the same width (vit_torch's .pt)
    pool_without_token: Optional[str] = 'gap'  # the pooling of a file with no class token nor MAP head; None: unknown
    spell: Optional[Callable[[str], str]] = None  # a canonical name as the file spells it, for messages
    # What the file's library runs it with; None: the file records none (the config's, official unless --config
    # says otherwise: the released and big_vision npz, training checkpoints, a .pt).
    numerics: Optional[Numerics] = None
    numerics_error: Optional[str] = None  # why the file's own numerics cannot run (raised only if they are asked for)
    hub_config: Optional[dict] = None  # a Hugging Face folder's config.json as read (the harness builds from it)

    def params(self, cfg: ViTConfig) -> Params:
        """Canonical params for `cfg`, as stored: position embeddings at the file's own grid, not yet resized."""
        own = configs.checkpoint_image_size(self.shapes, cfg)
        return self.convert(cfg if own is None else cfg.replace(image_size=own))


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """'FILE.npz:SUBTREE' -> (FILE.npz, SUBTREE); a path that exists as given has no subtree."""
    if os.path.exists(spec):
        return spec, None
    path, sep, sub = spec.rpartition(':')
    if sep and path and re.fullmatch(r'[\w./-]+', sub) and os.path.exists(path):
        return path, sub.strip('/')
    return spec, None


def load(spec: str) -> Checkpoint:
    """Reads FILE[:SUBTREE] whatever its layout; one-line errors for files of no known layout."""
    path, subtree = split_spec(spec)
    kind = containers.sniff(path)
    meta: dict = {}
    if kind == 'folder':
        return _load_folder(spec, path)
    if kind == 'npz':
        arrays = containers.read_npz(path)
    elif kind == 'safetensors':
        arrays, meta = containers.read_safetensors(path)
    else:
        arrays = containers.read_pt(path)
    ckpt = _from_arrays(spec, path, arrays, subtree, meta)
    run = _run_of(path) if kind == 'npz' and not subtree else None
    if run is not None:
        if ckpt.format == 'released':
            ckpt.numerics = _run_numerics(run)
        _run_labels(ckpt, run)
    return ckpt


RUN_LABELS = 'labels.txt'  # what `vit_jax train` writes beside its config.json: the class names in logit order


def _run_of(path: str) -> Optional[str]:
    """The workdir of the `train` run that wrote an npz (DIR/final.npz, DIR/checkpoints/ckpt-N.npz): the folder
    holding its DIR/run.json and DIR/config.json; None for any other npz."""
    run = os.path.dirname(os.path.abspath(path))
    if os.path.basename(run) == 'checkpoints':
        run = os.path.dirname(run)
    ok = all(os.path.isfile(os.path.join(run, name)) for name in ('config.json', 'run.json'))
    return run if ok else None


def _run_labels(ckpt: Checkpoint, run: str) -> None:
    """The class names the run recorded (DIR/labels.txt), when they fit the file's head: a list of another
    length is not this head's, and is said and left unused."""
    path = os.path.join(run, RUN_LABELS)
    if not os.path.isfile(path):
        return
    try:
        limits.check_text(path, path)
        with open(path, encoding='utf-8') as f:
            names = [line.rstrip('\n') for line in f]
    except (OSError, UnicodeDecodeError) as e:
        ckpt.notes.append(f'note: {path}: not read ({e}); the classes go by index')
        return
    head = ckpt.shapes.get('head/bias')
    classes = None if head is None else int(head.shape[0])
    if classes != len(names):
        ckpt.notes.append(f'note: {path} names {len(names)} classes and this file\'s head has '
                          f'{classes or "none"}; the classes go by index')
        return
    ckpt.labels, ckpt.labels_source = names, path


def _run_numerics(run: str) -> Optional[Numerics]:
    """The numerics of the `train` run in `run` that wrote a released npz: the layout has no room for them, so the
    run's DIR/config.json, beside its DIR/run.json, says them. None (the config's) for a run with the official
    numerics."""
    config = os.path.join(run, 'config.json')
    try:
        cfg = ViTConfig.from_official_dict(files.read_json_object(config, config, 'the run\'s config'), config)
    except UserError:
        return None  # not a config this run wrote: the npz alone decides, as for any other
    n = cfg.numerics
    if (n.gelu, n.layer_norm_eps) == (OFFICIAL_NUMERICS.gelu, OFFICIAL_NUMERICS.layer_norm_eps):
        return None
    return dataclasses.replace(n, source=f'{config}, of the run that wrote it')


def _from_arrays(spec: str, path: str, arrays: dict, subtree: Optional[str], meta: dict,
                 hub_config: Optional[object] = None) -> Checkpoint:
    """`hub_config`: the folder's config.json as `_load_folder` read it; None for a file given alone."""
    if any('/' in k for k in arrays):
        return _from_tree(spec, arrays, subtree)
    if subtree:
        raise UserError(f'{spec}: :{subtree} picks a subtree of an npz tree; this is a state dict with flat names')
    state = _strip_module(arrays)
    found = [name for name, detect in (('vit_torch', lambda k: 'embedding.weight' in k), ('timm', timm.detect),
                                       ('hf', hf.detect)) if detect(state)]
    if len(found) > 1:
        raise UserError(f'{spec}: holds the keys of two models ({" and ".join(FORMATS[f] for f in found)}); '
                        'save one model per file')
    if not found:
        raise _unknown(spec, sorted(state)[:4])
    if found == ['vit_torch']:
        return _vit_torch(spec, state, meta)
    if found == ['timm']:
        return _timm(spec, path, state, hub_config)
    return _hf(spec, path, state, hub_config)


def _unknown(spec: str, sample) -> UserError:
    return UserError(f'{spec}: no known checkpoint layout (keys like {", ".join(map(repr, sample)) or "none"}); '
                     'understood: ' + '; '.join(FORMATS.values()))


def _strip_module(state: dict) -> dict:
    """A state dict saved from `nn.DataParallel` (every key under `module.`) under its model's own names."""
    if state and all(k.startswith('module.') for k in state):
        return {k[len('module.'):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- npz trees

def _from_tree(spec: str, flat: dict, subtree: Optional[str]) -> Checkpoint:
    flat = released.params_subtree(flat)
    notes = []
    if subtree:
        sub = subtree.removeprefix('params/') + '/'
        chosen = {k[len(sub):]: v for k, v in flat.items() if k.startswith(sub)}
        if not chosen:
            raise UserError(f'{spec}: no subtree {subtree!r}; the file holds {_top_names(flat)}')
        flat = chosen
    roots = sorted({k[:-len(ROOT)] for k in flat if k == ROOT or k.endswith('/' + ROOT)})
    if not roots:
        what = f'the subtree {subtree!r}' if subtree else 'the file'
        raise UserError(f'{spec}: {what} holds no ViT image tower (no {ROOT}; found {_top_names(flat)}); '
                        'a text tower or another model is not read'
                        + ('' if subtree else '; understood: ' + '; '.join(FORMATS.values())))
    if len(roots) > 1:
        raise UserError(f'{spec}: holds {len(roots)} ViT towers (under {", ".join(r or "the top" for r in roots)}); '
                        f'pick one as FILE:SUBTREE, e.g. {spec}:{roots[-1].rstrip("/")}')
    if roots[0]:
        notes.append(f'note: reading the ViT image tower under {roots[0]} (as {spec}:{roots[0].rstrip("/")})')
        flat = {k[len(roots[0]):]: v for k, v in flat.items() if k.startswith(roots[0])}
    if big_vision.detect(flat):
        params = big_vision.to_canonical(flat, spec)
        return Checkpoint(spec, 'big_vision', params, lambda cfg: params, notes=notes, pool_without_token=None)
    params, spell = released.canonicalize(flat), released.spelling(flat)

    def checked(cfg: ViTConfig) -> Params:  # strictly, in the file's own names
        check_params(params, cfg, spec, spell)
        return params
    return Checkpoint(spec, 'released', params, checked, notes=notes, spell=spell)


def _top_names(flat: Mapping) -> str:
    names = sorted({k.split('/')[0] for k in flat})
    return ', '.join(names[:8]) + (f', ... ({len(names)} in all)' if len(names) > 8 else '')


# --------------------------------------------------------------------------- state dicts

def _vit_torch(spec: str, state: dict, meta: dict) -> Checkpoint:
    stored = None
    if vit_torch.CONFIG_METADATA_KEY in meta:
        try:
            stored = ViTConfig.from_official_dict(json.loads(meta[vit_torch.CONFIG_METADATA_KEY]), where=spec)
        except (ValueError, RecursionError) as e:
            raise UserError(f'{spec}: its config metadata is not JSON ({type(e).__name__}); '
                            'pass --config') from None
    return Checkpoint(spec, 'vit_torch', vit_torch.torch_shapes_as_canonical(state),
                      lambda cfg: vit_torch.from_torch(state, cfg, spec), config=stored, heads_from_width=True,
                      spell=vit_torch.torch_name,
                      numerics=None if stored is None else dataclasses.replace(stored.numerics,
                                                                               source="the file's config metadata"))


def _timm(spec: str, path: str, state: dict, d: Optional[object]) -> Checkpoint:
    timm.refuse_unsupported(state, spec)
    state = timm.zero_class_row(state)
    ours, unknown = timm.TIMM.ours_shapes({k: v.shape for k, v in state.items()})
    if unknown:
        raise UserError(f'{spec}: a timm ViT state dict with keys no plain ViT has ({", ".join(unknown[:6])}'
                        f'{", ..." if len(unknown) > 6 else ""}); only plain timm ViTs are read')
    if d is None:  # a file given alone: the config.json timm writes beside it may name the variant
        with contextlib.suppress(UserError):  # a file that is not one says nothing; --config still can
            d = _hub_config(os.path.dirname(os.path.abspath(path)))
    hint = timm.heads_from_config(d)
    ckpt = Checkpoint(spec, 'timm', vit_torch.torch_shapes_as_canonical(_stand_ins(ours)),
                      lambda cfg: vit_torch.from_torch(timm.TIMM.import_(state, cfg, spec, _TIMM_ADVICE), cfg, spec),
                      num_heads=hint[0] if hint else None, pool_without_token=None)
    _own_numerics(ckpt, lambda: timm.numerics_from(d, spec))
    ckpt.labels = timm.labels_from(d)
    if ckpt.labels:
        ckpt.labels_source = "its hub config.json's label_names"
    if hint and hint[1] in ('avg', ''):
        ckpt.pool_without_token = {'avg': 'gap', '': 'unpooled'}[hint[1]]
    return ckpt


_TIMM_ADVICE = 'pass --config with the structure timm built it with (heads, pooling)'


def _stand_ins(shapes: Mapping[str, tuple]) -> dict:
    return {k: np.broadcast_to(np.zeros((), np.uint8), s) for k, s in shapes.items()}


def _hf(spec: str, path: str, state: dict, d: Optional[object]) -> Checkpoint:
    beside = os.path.dirname(os.path.abspath(path))
    if d is None:
        d = _hub_config(beside)  # model.safetensors given alone: its folder's config.json, if there is one
    if d is not None:
        d = hf.check_config(d, beside, spec)
    state = hf.strip_prefix(state)
    table = hf.table_for(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    ours, unknown = table.ours_shapes(shapes)
    if unknown:
        raise UserError(f'{spec}: a Hugging Face ViT with keys no ViT of the official model has '
                        f'({", ".join(unknown[:6])}{", ..." if len(unknown) > 6 else ""})')
    ckpt = Checkpoint(spec, 'hf', vit_torch.torch_shapes_as_canonical(_stand_ins(ours)),
                      lambda cfg: vit_torch.from_torch(table.import_(state, cfg, spec, 'pass the matching --config'),
                                                       cfg, spec))
    if d is not None:
        ckpt.config = hf.config_from(d, shapes, spec)
        ckpt.num_heads = ckpt.config.num_heads
        ckpt.labels = hf.labels_from(d)
        if ckpt.labels:
            ckpt.labels_source = "its config.json's id2label"
        ckpt.hub_config = d
        _own_numerics(ckpt, lambda: hf.numerics_from(d, os.path.join(beside, 'config.json')))
    return ckpt


def _own_numerics(ckpt: Checkpoint, read: Callable[[], Numerics]) -> None:
    """Sets the file's own numerics; what cannot run is kept as the error `--numerics source` raises."""
    try:
        ckpt.numerics = read()
    except UserError as e:
        ckpt.numerics_error = str(e)


# --------------------------------------------------------------------------- folders

def _hub_config(folder: str) -> Optional[object]:
    """FOLDER/config.json as read (the one read of it in a load), or None when there is none."""
    path = os.path.join(folder, 'config.json')
    return files.read_json(path, path) if os.path.isfile(path) else None


def _load_folder(spec: str, folder: str) -> Checkpoint:
    """A Hugging Face folder (transformers' config.json) or a timm hub folder (timm's config.json)."""
    d = _hub_config(folder)
    if not (isinstance(d, dict) and 'architecture' in d and 'model_type' not in d):
        d = hf.check_config(d, folder, spec)  # a Hugging Face folder: its config.json must be there and a ViT's
    # Named as a file of the folder, so that the layouts find their config.json beside it.
    return _from_arrays(spec, os.path.join(folder, 'config.json'), _folder_weights(spec, folder), None, {},
                        hub_config=d)


def _folder_weights(spec: str, folder: str) -> dict:
    """The state dict in a hub folder: model.safetensors (sharded or not), else pytorch_model.bin."""
    index = os.path.join(folder, 'model.safetensors.index.json')
    if os.path.isfile(index):
        d = files.read_json_object(index, index, 'a safetensors index')
        try:
            shards = sorted(set(d['weight_map'].values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f'{index}: not a safetensors index ({type(e).__name__})') from None
        state = {}
        for shard in shards:
            if os.path.basename(shard) != shard:
                raise UserError(f'{index}: shard {shard!r} is not a file of the folder')
            state.update(containers.read_safetensors(os.path.join(folder, shard))[0])
        return state
    for name in hf.WEIGHTS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return containers.read_safetensors(path)[0] if name.endswith('.safetensors') else containers.read_pt(path)
    raise UserError(f'{spec}: the folder holds no {" nor ".join(hf.WEIGHTS)}')


# --------------------------------------------------------------------------- configs

def numerics_for(ckpt: Checkpoint, cfg: ViTConfig, mode: str = 'source', spec: Optional[str] = None) -> Numerics:
    """The numerics to run `ckpt` with (`mode`: `--numerics`), and where they came from.

    `source`: what the file's library runs it with; a file that records none keeps `cfg`'s
    (the official ones unless `--config` `spec` says otherwise). `official`: Google's.
    """
    if mode not in NUMERICS_MODES:
        raise UserError(f'--numerics {mode!r}: expected one of {", ".join(NUMERICS_MODES)}')
    if mode == 'official':
        return dataclasses.replace(OFFICIAL_NUMERICS, source='--numerics official')
    if ckpt.numerics_error:
        raise UserError(ckpt.numerics_error)
    if ckpt.numerics is not None:
        return ckpt.numerics
    n = cfg.numerics
    return dataclasses.replace(n, source=f'--config {spec}') if spec and n.source == 'the config' else n


def configure(ckpt: Checkpoint, spec: Optional[str], image_size: Optional[int] = None,
              fallback_size: int = 224, numerics: str = 'source') -> ViTConfig:
    """The config to build for `ckpt`: `--config`, else the file's own, else inferred (`configs.resolve_config`),
    computing with the numerics `numerics_for` gives (the file's library's, unless `numerics` is `official`).

    Where the layout keeps attention weights flat (PyTorch), the head count comes from the
    file's own config or hint; only this project's state dicts fall back on the official
    variant of the same width. Otherwise the error names the --config to give.
    """
    heads = ckpt.num_heads
    query = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'
    q = ckpt.shapes.get(query)
    if ckpt.format in ('released', 'big_vision') and q is not None and q.ndim != 3:
        spelled = ckpt.spell(query) if ckpt.spell else query
        raise UserError(f'{ckpt.where}: {spelled} has shape {tuple(q.shape)}, expected (width, heads, head width) '
                        'as every Flax checkpoint keeps it; is it a ViT checkpoint?')
    if spec is None and ckpt.config is None and q is not None and q.ndim == 2 and heads is None:
        heads = heads_for_width(q.shape[-1]) if ckpt.heads_from_width else None
        if heads is None:
            why = f'no official variant is width-{q.shape[-1]}' if ckpt.heads_from_width else 'its layout keeps ' \
                'the attention weights flat'
            raise UserError(f'{ckpt.where}: a {ckpt.format} file does not record its number of heads ({why}); '
                            'pass --config: an official name such as ViT-B_16, or a JSON file (the official layout, '
                            'or big_vision\'s {"variant": "B/16", "pool_type": "tok"})')
    cfg = configs.resolve_config(spec, ckpt.shapes, image_size, fallback_size, stored=ckpt.config,
                                 num_heads=heads, pool_without_token=ckpt.pool_without_token, where=ckpt.where,
                                 spell=ckpt.spell)
    return cfg.with_numerics(numerics_for(ckpt, cfg, numerics, spec))


# --------------------------------------------------------------------------- writing

WRITERS = {
    'npz': 'the released vit_jax npz (the official code reads it)',
    'big_vision': "big_vision's npz (params/ prefix, top-level pos_embedding)",
    'torch': "this project's PyTorch state dict (.safetensors with the config, or .pt)",
    'timm': "timm's VisionTransformer state dict (.safetensors or .pth)",
    'hf': 'a Hugging Face folder (ViTForImageClassification.from_pretrained takes it)',
}


def format_for(path: str) -> str:
    """The default output format of a path, by its extension, as `convert` always chose it."""
    if path.endswith('.npz'):
        return 'npz'
    if path.endswith(vit_torch.SUFFIXES):
        return 'torch'
    raise UserError(f'{path}: cannot tell the format from the name; pass --to ({", ".join(WRITERS)})')


def save(path: str, params: dict, cfg: ViTConfig, to: str, labels: Optional[list[str]] = None) -> list[str]:
    """Canonical `params` (checked to fit `cfg`) written as format `to`, atomically; may empty `params`.

    A model the format cannot express is one error naming a format that can. Returns notes
    for the user (a timm file whose numerics timm's defaults do not build), one line each.
    """
    if to == 'npz':
        if not cfg.fits_released_npz:
            raise UserError(f'{path}: the released npz layout is the official model\'s, which has no '
                            f'{cfg.classifier!r} pooling with {cfg.posemb} position embeddings; '
                            'write --to big_vision or --to torch')
        released.save_npz(path, params)
    elif to == 'big_vision':
        containers.write_npz(path, big_vision.from_canonical(params, cfg))
    elif to == 'torch':
        if not path.endswith(vit_torch.SUFFIXES):
            raise UserError(f'{path}: a PyTorch state dict is written as {" or ".join(vit_torch.SUFFIXES)}')
        vit_torch.write(path, params, cfg)
    elif to == 'timm':
        why = timm.expressible(cfg)
        if why:
            raise UserError(f'{path}: timm\'s VisionTransformer cannot express {why}; write --to npz, '
                            '--to big_vision or --to torch')
        if is_folder_output(path):  # a hub folder: the weights and the config.json that says how to build them
            _save_folder(path, lambda tmp: _write_timm_folder(tmp, params, cfg, labels))
            return timm.build_notes(cfg) if cfg.layer_norm_eps != 1e-6 else []
        state = timm.TIMM.export(vit_torch.torch_views(params, cfg, consume=True), cfg, consume=True)
        notes = [f'note: {path}: a timm state dict has no room for the {len(labels)} class names; write a hub '
                 'folder (OUT without an extension) to keep them in its config.json'] if labels else []
        if path.endswith('.safetensors'):
            containers.write_safetensors(path, state, {'format': 'pt'}, consume=True)
        elif path.endswith(('.pth', '.pt', '.bin')):
            containers.write_pt(path, {k: _whole(v) for k, v in state.items()})
        else:
            raise UserError(f'{path}: a timm state dict is written as .safetensors or .pth, or a hub folder '
                            'as a path without an extension')
        return notes + timm.build_notes(cfg)
    elif to == 'hf':
        why = hf.expressible(cfg)
        if why:
            raise UserError(f'{path}: transformers\' ViT cannot express {why}; write --to npz, --to big_vision '
                            'or --to torch')
        _save_folder(path, lambda tmp: _write_hf_folder(tmp, params, cfg, labels))
    else:
        raise UserError(f'--to {to!r}: expected one of {", ".join(WRITERS)}')
    return []


def _whole(v):
    """A view or `Lazy` as a contiguous array, for writers that need every array whole (torch.save)."""
    return v if isinstance(v, containers.Lazy) else containers.contiguous_copy(v)


def is_folder_output(path: str) -> bool:
    """Whether `convert --to timm` writes `path` as a hub folder: an existing folder, or a name without an
    extension."""
    return os.path.isdir(path) or path.endswith(os.sep) or not os.path.splitext(os.path.basename(path))[1]


def _save_folder(folder: str, write: Callable[[str], None]) -> None:
    """A new folder written by `write(tmp)` into a temporary one beside it, then renamed: all or nothing."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UserError(f'{folder}: exists and is not an empty folder; a folder export is a new folder')
    parent = os.path.dirname(os.path.abspath(folder))
    files.check_directory(folder)
    tmp = os.path.join(parent, f'.tmp-{os.getpid()}-{os.path.basename(os.path.abspath(folder))}')
    try:
        os.makedirs(tmp)
    except OSError as e:
        raise files.write_error(folder, e) from None
    try:
        write(tmp)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.replace(tmp, folder)
    except UserError as e:  # name the folder asked for, not the temporary one
        raise UserError(str(e).replace(tmp, folder)) from None
    except OSError as e:
        raise files.write_error(folder, e) from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def _write_hf_folder(tmp: str, params: dict, cfg: ViTConfig, labels: Optional[list[str]]) -> None:
    """A transformers ViT folder: config.json, preprocessor_config.json, model.safetensors."""
    state = hf.HUB.export(vit_torch.torch_views(params, cfg, consume=True), cfg, consume=True)
    if cfg.num_classes:  # ViTForImageClassification: the trunk under vit., the head outside it
        state = {k if k.startswith('classifier.') else hf.PREFIX + k: v for k, v in state.items()}
    containers.write_safetensors(os.path.join(tmp, 'model.safetensors'), state, {'format': 'pt'}, consume=True)
    files.write_json(os.path.join(tmp, 'config.json'), hf.config_json(cfg, labels))
    files.write_json(os.path.join(tmp, 'preprocessor_config.json'), hf.preprocessor_json(cfg))


def _write_timm_folder(tmp: str, params: dict, cfg: ViTConfig, labels: Optional[list[str]]) -> None:
    """A timm hub folder (as `timm.models.push_to_hf_hub` uploads): model.safetensors and config.json."""
    state = timm.TIMM.export(vit_torch.torch_views(params, cfg, consume=True), cfg, consume=True)
    containers.write_safetensors(os.path.join(tmp, 'model.safetensors'), state, {'format': 'pt'}, consume=True)
    files.write_json(os.path.join(tmp, 'config.json'), timm.hub_config(cfg, labels))
