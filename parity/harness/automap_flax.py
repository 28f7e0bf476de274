"""`verify FILE.py:BUILD --module` for a Flax (linen) model: `automap`'s mapping, for parameter trees.

BUILD(config) returns a `flax.linen.Module`; it is initialised with `init` on the batch
(`train=False` or `deterministic=True` passed when its `__call__` takes one). One `apply`
under `nn.intercept_methods` records every submodule's call in order with its input and
output: the same evidence `automap.trace`'s forward hooks give for torch. The blocks are
the alike submodules named `<name>_<i>` under one parent; inside a block the LayerNorms,
the attention projections (a fused `Dense(3D)`, separate `Dense(D)`s or `DenseGeneral`s as
flax's own `MultiHeadDotProductAttention` has them) and the MLP's Dense layers are told
apart by call order and shape, as for torch. Flax kernels are already (in, out): the
transformations are reshapes, column slices of a fused kernel, and the patch flattening
order of a Dense patch embedding. The checkpoint is written into a copy of the parameter
tree, and the intermediates are read by the same interceptor on the loaded model.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M MLP width, p patch size, C channels.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np

from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.harness import automap
from parity.harness.automap import ATTN, PATCH_ORDERS, POSEMB, QKV_ORDERS, Piece


def is_flax(model) -> bool:
    import sys

    linen = sys.modules.get('flax.linen')
    return linen is not None and isinstance(model, linen.Module)


# --------------------------------------------------------------------------- observing the model

@dataclasses.dataclass
class FCall:
    name: str  # '/'-joined module path
    kind: str  # 'ln', 'dense', 'dense_general', 'conv', 'other'
    type_name: str
    order: int
    inputs: tuple
    output: Any
    params: dict  # this module's own parameter leaves (NumPy), by short name


def _kind(module) -> str:
    import flax.linen as nn

    for kind, cls in (('ln', nn.LayerNorm), ('dense', nn.Dense), ('dense_general', nn.DenseGeneral),
                      ('conv', nn.Conv)):
        if type(module) is cls:
            return kind
    return 'other'


def _subtree(tree: Mapping, path: tuple) -> Optional[Mapping]:
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _apply_kwargs(model) -> dict:
    """`train=False` or `deterministic=True` when the model's __call__ takes one (dropout off)."""
    try:
        names = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    if 'train' in names:
        return {'train': False}
    if 'deterministic' in names:
        return {'deterministic': True}
    if 'training' in names:
        return {'training': False}
    return {}


def intercepted(model, variables, x, kwargs, record: Callable) -> Any:
    """model.apply(variables, x) with `record(module, args, output)` told of every submodule's __call__."""
    import flax.linen as nn

    def interceptor(next_fun, args, kw, context):
        out = next_fun(*args, **kw)
        if context.method_name == '__call__' and context.module.scope is not None:
            record(context.module, args, out)
        return out

    with nn.intercept_methods(interceptor):
        return model.apply(variables, x, **kwargs)


def trace(model, variables, x, kwargs) -> tuple[dict[str, FCall], Any]:
    calls: dict[str, FCall] = {}
    params = variables.get('params', {})

    def record(module, args, out):
        path = tuple(module.scope.path)
        name = '/'.join(path)
        if not name or name in calls:
            return
        own = _subtree(params, path) or {}
        calls[name] = FCall(name, _kind(module), type(module).__name__, len(calls), args, out,
                            {k: np.asarray(v) for k, v in own.items() if not isinstance(v, Mapping)})

    out = intercepted(model, variables, x, kwargs, record)
    return calls, out


# --------------------------------------------------------------------------- roles

def _io(c: FCall) -> tuple[int, int]:
    """(fan in, fan out) of a Dense or DenseGeneral, flattening a DenseGeneral's head axes."""
    k = c.params.get('kernel')
    if k is None:
        return -1, -1
    if c.kind == 'dense':
        return k.shape[0], k.shape[-1]
    if k.ndim == 3 and np.asarray(c.inputs[0]).shape[-1] == k.shape[0]:  # (D, H, Dh): into heads
        return k.shape[0], k.shape[1] * k.shape[2]
    if k.ndim == 3:  # (H, Dh, D): out of heads
        return k.shape[0] * k.shape[1], k.shape[2]
    return k.shape[0], int(np.prod(k.shape[1:]))


def find_blocks(calls: Mapping[str, FCall], cfg: ViTConfig, what: str) -> list[str]:
    """The repeated blocks: alike submodules `<name>_<i>` under one parent, each holding LayerNorms and Denses."""
    groups: dict[tuple, list[str]] = {}
    for name, c in calls.items():
        parent, _, last = name.rpartition('/')
        m = re.match(r'^(.*?)_?(\d+)$', last)
        if m:
            groups.setdefault((parent, m.group(1), c.type_name), []).append(name)
    best = None
    for names in groups.values():
        inside = lambda n: [c for k, c in calls.items() if k.startswith(n + '/')]  # noqa: E731
        if not all(any(c.kind == 'ln' for c in inside(n)) and any(c.kind in ('dense', 'dense_general')
                                                                 for c in inside(n)) for n in names):
            continue
        size = sum(len(inside(n)) for n in names)
        if best is None or size > best[1]:
            best = (names, size)
    if best is None:
        kinds = sorted({c.type_name for c in calls.values()})
        raise UserError(f'{what}: not a ViT the harness can map: no repeated blocks (alike submodules name_0, '
                        f'name_1, ... each with LayerNorms and Dense layers) in your model (it calls '
                        f'{", ".join(kinds[:8]) or "nothing"})')
    names = sorted(best[0], key=lambda n: calls[n].order)
    if len(names) != cfg.num_layers:
        raise UserError(f'{what}: your model has {len(names)} encoder blocks ({names[0].rpartition("/")[2]}, ...) '
                        f'where the checkpoint has {cfg.num_layers} (num_layers); build num_layers blocks from the '
                        'config')
    return names


def map_block(i: int, block: str, calls: Mapping[str, FCall], cfg: ViTConfig, what: str) -> automap.BlockParts:
    D, M = cfg.hidden_size, cfg.mlp_dim
    seq = sorted((c for n, c in calls.items() if n.startswith(block + '/') and c.kind in
                  ('ln', 'dense', 'dense_general')), key=lambda c: c.order)
    where = f'{what}: block {i} ({block})'
    short = lambda c: c.name[len(block) + 1:]  # noqa: E731

    def fail(why: str):
        ran = ', '.join(f'{short(c)} ({c.type_name}' + (' {}->{}'.format(*_io(c)) if c.kind != 'ln' else '') + ')'
                        for c in seq)
        raise UserError(f'{where}: {why}; it ran {ran or "nothing"}')

    def first(pred, start: int) -> int:
        return next((j for j in range(start, len(seq)) if pred(seq[j])), -1)

    is_ln = lambda c: c.kind == 'ln' and np.asarray(c.inputs[0]).shape[-1] == D  # noqa: E731
    lin = lambda c, io: c.kind in ('dense', 'dense_general') and _io(c) == io  # noqa: E731
    j = first(lambda c: lin(c, (D, 3 * D)) or lin(c, (D, D)), 0)
    if j < 0:
        fail(f'no attention projection (a Dense {D}->{3 * D} or {D}->{D}) found')
    lns = [k for k in range(j) if is_ln(seq[k])]
    if not lns:
        fail(f'no LayerNorm over {D} features runs before the attention (the official block is pre-norm)')
    if lin(seq[j], (D, 3 * D)):
        k = first(lambda c: lin(c, (D, D)), j + 1)
        if k < 0:
            fail('a fused qkv but no out-projection after it')
        attention, out, after = {'kind': 'fused', 'qkv': seq[j].name, 'out': seq[k].name}, seq[k].name, k + 1
    else:
        square = [k for k in range(j, len(seq)) if lin(seq[k], (D, D))]
        if len(square) < 4:
            fail(f'separate q, k, v and out projections ({D}->{D}) expected, {len(square)} found')
        q, k_, v = automap._qkv_by_name([seq[k].name.replace('/', '.') for k in square[:3]], '')
        attention = {'kind': 'separate', 'q': q.replace('.', '/'), 'k': k_.replace('.', '/'),
                     'v': v.replace('.', '/'), 'out': seq[square[3]].name}
        out, after = seq[square[3]].name, square[3] + 1
    f1 = first(lambda c: lin(c, (D, M)), after)
    if f1 < 0:
        fail(f'no MLP Dense {D}->{M} after the attention')
    ln1 = [k for k in range(after, f1) if is_ln(seq[k])]
    if not ln1:
        fail(f'no LayerNorm over {D} features between the attention and the MLP (the official block is pre-norm)')
    f2 = first(lambda c: lin(c, (M, D)), f1 + 1)
    if f2 < 0:
        fail(f'no MLP Dense {M}->{D} after {short(seq[f1])}')
    return automap.BlockParts(seq[lns[-1]].name, seq[ln1[-1]].name, attention, seq[f1].name, seq[f2].name, out)


def map_outer(calls: Mapping[str, FCall], blocks: list[str], params: Mapping, cfg: ViTConfig, what: str
              ) -> automap.Outer:
    D, p, C, R = cfg.hidden_size, cfg.patch_size[0], cfg.num_classes, cfg.representation_size
    inside = lambda n: any(n == b or n.startswith(b + '/') for b in blocks)  # noqa: E731
    lo = min(calls[b].order for b in blocks)
    hi = max(c.order for n, c in calls.items() if inside(n))
    before = [c for c in calls.values() if c.order < lo and not inside(c.name)]
    after = sorted((c for c in calls.values() if c.order > hi and not inside(c.name)), key=lambda c: c.order)
    patch = [c for c in before if (c.kind == 'conv' and c.params.get('kernel') is not None
                                   and c.params['kernel'].shape == (p, p, 3, D))
             or (c.kind == 'dense' and _io(c) == (p * p * 3, D))]
    if not patch:
        raise UserError(f'{what}: no patch embedding found before the blocks: expected a Conv with a ({p}, {p}, 3, '
                        f'{D}) kernel or a Dense({D}) over flattened {p}x{p} patches ({p * p * 3} features)')
    lns = [c for c in after if c.kind == 'ln' and np.asarray(c.inputs[0]).shape[-1] == D]
    if not lns:
        raise UserError(f'{what}: no final LayerNorm over {D} features runs after the blocks')
    denses = [c for c in after if c.kind == 'dense' and c.order > lns[0].order]
    head = [c for c in denses if _io(c) == (R or D, C)]
    if not head:
        raise UserError(f'{what}: no head Dense({C}) over {R or D} features after the final LayerNorm')
    pre = None
    if R is not None:
        pre_c = [c for c in denses if _io(c) == (D, R) and c.order < head[-1].order]
        if not pre_c:
            raise UserError(f'{what}: the checkpoint has a representation layer ({D}->{R}, tanh); your model has '
                            f'no Dense({R}) over {D} features before the head')
        pre = pre_c[-1].name
    owned = {n for n, c in calls.items() if c.kind != 'other'}
    loose = [(path, tuple(np.shape(v))) for path, v in _leaves(params) if path.rpartition('/')[0] not in owned]
    said = lambda words: (lambda n: not any(w in n.lower() for w in words))  # noqa: E731
    cls = sorted((n for n, s in loose if int(np.prod(s)) == D and s[-1] == D), key=said(('cls', 'class', 'token')))
    pos = sorted((n for n, s in loose if int(np.prod(s)) == cfg.num_tokens * D and s[-1] == D), key=said(('pos',)))
    if not pos:
        raise UserError(f'{what}: no learned position embedding found: a parameter of {cfg.num_tokens} x {D} values '
                        'under any name')
    if cfg.has_cls_token and not cls:
        raise UserError(f'{what}: the checkpoint has a class token and your model has no parameter of {D} values '
                        'for it')
    c = patch[-1]
    return automap.Outer(c.name, 'conv' if c.kind == 'conv' else 'linear', lns[0].name, pre, head[-1].name,
                         cls[0] if cfg.has_cls_token else None, pos[0])


def _leaves(tree: Mapping, prefix: str = ''):
    for k, v in tree.items():
        name = f'{prefix}/{k}' if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _leaves(v, name)
        else:
            yield name, v


# --------------------------------------------------------------------------- pieces

def _same(canonical: str, user: str, src, dst) -> Piece:
    src, dst = tuple(src), tuple(dst)
    return Piece(canonical, user, 'as is' if src == dst else f'reshape {src} -> {dst}',
                 lambda a: np.asarray(a).reshape(dst), lambda g: np.asarray(g).reshape(src))


def _kernel(canonical: str, c: FCall, src) -> Piece:
    """A canonical kernel into a Dense (in, out) or a DenseGeneral kernel of its own shape."""
    return _same(canonical, f'{c.name}/kernel', src, c.params['kernel'].shape)


def _bias(canonical: str, c: FCall, src) -> list[Piece]:
    return [_same(canonical, f'{c.name}/bias', src, c.params['bias'].shape)] if 'bias' in c.params else []


def block_pieces(i: int, parts: automap.BlockParts, calls: Mapping[str, FCall], cfg: ViTConfig, qkv_order: str
                 ) -> list[Piece]:
    D, H, Dh, M = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    base, att = f'Transformer/encoderblock_{i}/', f'Transformer/encoderblock_{i}/{ATTN}/'
    out: list[Piece] = []

    def ln(which: str, name: str):
        c = calls[name]
        for short, ours in (('scale', 'scale'), ('bias', 'bias')):
            if short in c.params:
                out.append(_same(f'{base}{which}/{ours}', f'{name}/{short}', (D,), c.params[short].shape))

    ln('LayerNorm_0', parts.ln0)
    a = parts.attention
    if a['kind'] == 'separate':
        for role, key in (('query', 'q'), ('key', 'k'), ('value', 'v')):
            c = calls[a[key]]
            out += [_kernel(f'{att}{role}/kernel', c, (D, H, Dh))] + _bias(f'{att}{role}/bias', c, (H, Dh))
    else:
        c = calls[a['qkv']]
        for s, role in enumerate(('query', 'key', 'value')):
            cols = (slice(s * D, (s + 1) * D) if qkv_order == '(3, H, Dh)'
                    else automap._interleaved(s, H, Dh))
            words = (f'columns {s * D}:{(s + 1) * D} of the fused (D, 3D) kernel' if qkv_order == '(3, H, Dh)'
                     else f'slot {s} of 3 per head of the fused (D, 3D) kernel, (H, 3, Dh) order')
            out.append(Piece(f'{att}{role}/kernel', f'{c.name}/kernel', f'kernel (D, H, Dh) -> {words}',
                             lambda k: np.asarray(k).reshape(D, D), lambda g: np.asarray(g).reshape(D, H, Dh),
                             (slice(None), cols)))
            if 'bias' in c.params:
                bias_words = words.replace('columns', 'entries').replace('kernel', 'bias').replace('(D, 3D)', '(3D,)')
                out.append(Piece(f'{att}{role}/bias', f'{c.name}/bias', f'bias (H, Dh) -> {bias_words}',
                                 lambda b: np.asarray(b).reshape(D), lambda g: np.asarray(g).reshape(H, Dh), cols))
    c = calls[a['out']]
    out += [_kernel(f'{att}out/kernel', c, (H, Dh, D))] + _bias(f'{att}out/bias', c, (D,))
    ln('LayerNorm_1', parts.ln1)
    for name, dense, io in ((parts.fc1, 'Dense_0', (D, M)), (parts.fc2, 'Dense_1', (M, D))):
        c = calls[name]
        out += [_kernel(f'{base}MlpBlock_0/{dense}/kernel', c, io)] + _bias(f'{base}MlpBlock_0/{dense}/bias', c,
                                                                            (io[1],))
    return out


def outer_pieces(outer: automap.Outer, calls: Mapping[str, FCall], shapes: Mapping[str, tuple], cfg: ViTConfig,
                 patch_order: str) -> list[Piece]:
    D, C, p, R = cfg.hidden_size, cfg.num_classes, cfg.patch_size[0], cfg.representation_size
    c = calls[outer.patch]
    if outer.patch_kind == 'conv':
        out = [_same('embedding/kernel', f'{c.name}/kernel', (p, p, 3, D), (p, p, 3, D))]
    else:
        perm = [{'p1': 0, 'p2': 1, 'c': 2}[a] for a in patch_order.split()]
        inv = list(np.argsort(perm))
        out = [Piece('embedding/kernel', f'{c.name}/kernel', f'kernel (p, p, C, D) -> Dense kernel (p*p*C, D) over '
                     f'patches flattened ({patch_order})',
                     lambda a: np.asarray(a).transpose(*perm, 3).reshape(p * p * 3, D),
                     lambda g: np.asarray(g).reshape(*[(p, p, 3)[k] for k in perm], D).transpose(*inv, 3))]
    out += _bias('embedding/bias', c, (D,))
    if outer.cls:
        out.append(_same('cls', outer.cls, (1, 1, D), shapes[outer.cls]))
    out.append(_same(POSEMB, outer.posemb, (1, cfg.num_tokens, D), shapes[outer.posemb]))
    norm = calls[outer.final_ln]
    for short in ('scale', 'bias'):
        if short in norm.params:
            out.append(_same(f'Transformer/encoder_norm/{short}', f'{norm.name}/{short}', (D,),
                             norm.params[short].shape))
    if outer.pre_logits:
        c = calls[outer.pre_logits]
        out += [_kernel('pre_logits/kernel', c, (D, R))] + _bias('pre_logits/bias', c, (R,))
    c = calls[outer.head]
    return out + [_kernel('head/kernel', c, (R or D, C))] + _bias('head/bias', c, (C,))


@dataclasses.dataclass
class FlaxMapping(automap.ParamMapping):
    def load_tree(self, variables: Mapping, params: Mapping[str, np.ndarray]) -> dict:
        """A copy of `variables` with the checkpoint written in through the pieces."""
        import copy

        out = copy.deepcopy(_to_dict(variables))
        for p in self.pieces:
            *path, leaf = p.user.split('/')
            node = _subtree(out['params'], tuple(path))
            value = np.asarray(p.put(params[p.canonical]), np.float32)
            if p.index is None:
                node[leaf] = value.reshape(np.shape(node[leaf]))
            else:
                target = np.array(node[leaf], np.float32)
                target[p.index] = value
                node[leaf] = target
        return out


    def gradients_tree(self, grads: Mapping) -> dict[str, np.ndarray]:
        """A gradient tree of the user's parameters read back into canonical names and layouts."""
        out = {}
        for p in self.pieces:
            *path, leaf = p.user.split('/')
            g = np.asarray(_subtree(grads, tuple(path))[leaf])
            if p.index is not None:
                g = g[p.index]
            out[p.canonical] = np.asarray(p.take(g), np.float64).reshape(self.canonical[p.canonical])
        return out


def step(model, variables: Mapping, kwargs: dict, mapping: FlaxMapping, x: np.ndarray, labels: np.ndarray,
         label_smoothing: float) -> tuple[float, dict[str, np.ndarray]]:
    """`--grad` on a Flax model: softmax cross-entropy (labels smoothed as eps / C, like optax and torch) on its
    logits, differentiated with jax.value_and_grad; (loss, canonical gradients)."""
    import jax
    import optax

    def loss_fn(p):
        logits = model.apply({**variables, 'params': p}, x, **kwargs)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        target = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, target).mean()

    try:
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
    except Exception as e:  # the user's forward or backward pass
        raise UserError(f'--grad: your model\'s forward or backward pass raised {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}') from None
    return float(loss), mapping.gradients_tree(_to_dict(grads))


def _to_dict(tree) -> dict:
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return np.asarray(tree)


# --------------------------------------------------------------------------- running

def run_hooked(model, variables, kwargs, s: automap.Structure, cfg: ViTConfig, x) -> dict[str, np.ndarray]:
    """The loaded model on `x` with verify's intermediates read by the interceptor (float64 NumPy)."""
    wanted: dict[str, list[tuple[str, str]]] = {}
    for key, name, what in automap.taps(s, cfg):
        wanted.setdefault(name, []).append((key, what))
    got: dict[str, Any] = {}

    def record(module, args, out):
        name = '/'.join(module.scope.path)
        for key, what in wanted.get(name, ()):
            if key not in got:
                got[key] = args[0] if what == 'input' else out

    try:
        logits = intercepted(model, variables, x, kwargs, record)
    except Exception as e:  # the user's forward pass, with the checkpoint loaded
        raise UserError(f'--module: your model\'s forward pass raised {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}') from None
    out = {}
    B = len(x)
    for k, v in got.items():
        v = v[0] if isinstance(v, (tuple, list)) else v
        a = np.asarray(v, np.float64)
        if k == 'embedding' and a.ndim == 4:  # a Conv's (B, gh, gw, D)
            a = a.reshape(B, -1, a.shape[-1])
        out[k] = a
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    out['logits'] = np.asarray(logits, np.float64)
    return out


def map_and_run(model, cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, what: str
                ) -> tuple[dict[str, np.ndarray], FlaxMapping, tuple]:
    """The Flax counterpart of `automap.map_model` and `run_hooked` together: (intermediates, mapping, (model,
    its loaded variables, its apply keywords) for `step`)."""
    import jax

    kwargs = _apply_kwargs(model)
    try:
        variables = _to_dict(model.init(jax.random.PRNGKey(0), x, **kwargs))
        calls, _ = trace(model, variables, x, kwargs)
    except UserError:
        raise
    except Exception as e:  # the user's init or forward pass failed before any weight was loaded
        raise UserError(f'{what}: your model\'s init or forward pass on a ({", ".join(map(str, x.shape))}) NHWC '
                        f'batch raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    blocks = find_blocks(calls, cfg, what)
    parts = [map_block(i, b, calls, cfg, what) for i, b in enumerate(blocks)]
    outer = map_outer(calls, blocks, variables.get('params', {}), cfg, what)
    s = automap.Structure('', blocks, parts, outer)
    shapes = {n: tuple(np.shape(v)) for n, v in _leaves(variables.get('params', {}))}
    canonical = {k: tuple(v) for k, v in weights.param_shapes(cfg).items()}
    notes: list[str] = []

    def mapping_for(patch_order: str, qkv: str) -> FlaxMapping:
        pieces = outer_pieces(outer, calls, shapes, cfg, patch_order)
        for i, bp in enumerate(parts):
            pieces += block_pieces(i, bp, calls, cfg, qkv)
        return FlaxMapping(pieces, shapes, canonical, notes)

    def run(patch_order: str, qkv: str) -> dict[str, np.ndarray]:
        return run_hooked(model, mapping_for(patch_order, qkv).load_tree(variables, params), kwargs, s, cfg, x)

    qkv = QKV_ORDERS[0]
    orders = list(PATCH_ORDERS) if outer.patch_kind == 'linear' else ['conv']
    patch_order = automap.choose('embedding (the patch embedding)', orders,
                                 lambda o: automap._embedding_gap(cfg, params, x, run(o, qkv).get('embedding')), notes)
    if parts[0].attention['kind'] == 'fused':
        absent = set(mapping_for(patch_order, qkv).unmapped()['canonical'])
        held = {k: (np.zeros_like(v) if k in absent else v) for k, v in params.items()}
        qkv = automap.choose(f'encoderblock_0/{ATTN} (the fused qkv {parts[0].attention["qkv"]})', list(QKV_ORDERS),
                             lambda o: automap._attention_gap(held, run(patch_order, o)), notes)
    mapping = mapping_for(patch_order, qkv)
    loaded = mapping.load_tree(variables, params)
    return run_hooked(model, loaded, kwargs, s, cfg, x), mapping, (model, loaded, kwargs)
