"""`verify FILE.py:BUILD --module`: a user's own torch ViT, mapped, loaded and hooked with no adapter.

`BUILD(config)` returns the user's `torch.nn.Module`, built for `build_config(cfg)` (a plain
dict of sizes). Here, in verify's child process:

1. One forward pass with hooks on every module gives the order the modules run in and the
   shapes they see. The blocks are the children of the `ModuleList`/`Sequential` whose
   children are alike and hold LayerNorms and Linears, or alike children numbered name_0,
   name_1, ... (`find_blocks`); inside a block the
   LayerNorms, the attention projections (fused qkv, separate q/k/v, or
   `nn.MultiheadAttention`) and the MLP are told apart by the order they run in and their
   shapes (`map_block`); around the blocks the patch embedding (a Conv2d, or a Linear over
   flattened patches), the final LayerNorm, the head, and the class token and position
   embedding (raw parameters, by shape, under any name). Hand-written layers are read by
   their own parameters' shapes (`norm_params`, `raw_attention`, `raw_mlp`, `raw_linear`:
   TransformerLens-style W_Q of (H, D, Dh), W_in of (D, M), a LayerNorm's w and b).
2. Where shapes leave the layout open (the order a Linear patch embedding flattens a patch
   in, the order of a fused qkv's output), every alternative is loaded and the one whose
   output reproduces the reference's, computed on the user's own input to that step, is
   kept (`choose`); when none does, a note says which layer and which layouts were tried.
3. The checkpoint's weights are written into the user's parameters through the mapping
   (`ParamMapping.load`), and hooks on the blocks, their LayerNorms, the attention's
   out-projection and the MLP's last Linear collect `verify`'s intermediates and sub-steps.

A user parameter nothing maps to, and a canonical parameter with no place, are listed by
name (`ParamMapping.unmapped`); a model that is not a ViT of the checkpoint's shape is one
`UserError` naming what does not fit. A Flax (linen) model goes through `automap_flax`, which
observes its calls with `nn.intercept_methods` and reuses the roles, choices and reports here.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M MLP width, C channels, p patch size.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
from typing import Any, Callable, Mapping, Optional

import numpy as np

from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.harness import diagnosis, tolerance

ATTN = 'MultiHeadDotProductAttention_0'
POSEMB = 'Transformer/posembed_input/pos_embedding'
# The orders a Linear patch embedding may flatten one patch in (einops' '(p1 p2 c)' and the others).
PATCH_ORDERS = ('p1 p2 c', 'c p1 p2', 'p2 p1 c', 'c p2 p1', 'p1 c p2', 'p2 c p1')
QKV_ORDERS = ('(3, H, Dh)', '(H, 3, Dh)')


def build_config(cfg: ViTConfig) -> dict:
    """What BUILD(config) receives: a plain dict of sizes (the `--module` contract)."""
    if cfg.patch_size[0] != cfg.patch_size[1]:
        raise UserError(f'--module: the checkpoint has non-square {cfg.patch_size} patches; BUILD(config) receives '
                        'one patch_size, so only square patches can be handed over')
    return {'image_size': cfg.image_size, 'patch_size': cfg.patch_size[0], 'hidden_size': cfg.hidden_size,
            'num_layers': cfg.num_layers, 'num_heads': cfg.num_heads, 'mlp_dim': cfg.mlp_dim,
            'num_classes': cfg.num_classes, 'classifier': cfg.classifier,
            'representation_size': cfg.representation_size}


def check_config(cfg: ViTConfig) -> None:
    """What --module can map: a plain (non-hybrid) ViT with a class token or average pooling and a head."""
    why = ('a hybrid (ResNet stem)' if cfg.is_hybrid else
           f'the {cfg.classifier!r} classifier' if cfg.classifier not in ('token', 'gap') else
           'a model without a head' if not cfg.num_classes else
           f'{cfg.posemb} position embeddings' if cfg.posemb != 'learn' else None)
    if why:
        raise UserError(f'--module maps plain ViTs with the token or gap classifier, learned position embeddings and '
                        f'a head; this checkpoint has {why}: write FUNCTION(params, x) instead (docs/harness.md)')


# --------------------------------------------------------------------------- the mapping

@dataclasses.dataclass
class Piece:
    """One canonical parameter's place in the user's model: `put` gives the values for `user[index]`, `take`
    reads a tensor of the user's layout (a gradient) back into the canonical one."""

    canonical: str
    user: str  # the user's parameter name
    transform: str  # in words, for the table
    put: Callable[[np.ndarray], np.ndarray]
    take: Callable[[np.ndarray], np.ndarray]
    index: Any = None  # a slice of the user's tensor, or None for all of it

    def where(self) -> str:
        if self.index is None:
            return self.user
        s = self.index
        lead = ''
        if isinstance(s, tuple):  # a Flax kernel's columns
            lead, s = ':, ', s[-1]
        return (f'{self.user}[{lead}{s.start}:{s.stop}]' if isinstance(s, slice)
                else f'{self.user}[{lead}{s[0]}, {s[1]}, ...]')


def _reshaped(canonical: str, user: str, src: tuple[int, ...], dst: tuple[int, ...]) -> Piece:
    words = 'as is' if src == dst else f'reshape {src} -> {dst}'
    return Piece(canonical, user, words, lambda a: np.asarray(a).reshape(dst), lambda g: np.asarray(g).reshape(src))


def _dense(canonical: str, user: str, kernel_shape: tuple[int, ...], fan_in: int, index=None,
           words: str = '') -> Piece:
    """A kernel (fan_in..., fan_out...) as a torch Linear weight (out, in): flattened and transposed."""
    n_in = int(np.prod(kernel_shape[:fan_in]))
    n_out = int(np.prod(kernel_shape[fan_in:]))
    put = lambda a: np.asarray(a).reshape(n_in, n_out).T  # noqa: E731
    take = lambda g: np.asarray(g).T.reshape(kernel_shape)  # noqa: E731
    words = words or (f'kernel {kernel_shape} -> ({n_out}, {n_in}), transposed' if len(kernel_shape) > 2 else
                      'kernel (in, out) -> weight (out, in), transposed')
    return Piece(canonical, user, words, put, take, index)


@dataclasses.dataclass
class ParamMapping:
    """The canonical parameters placed in the user's model: the table, what is left over, loading, gradients."""

    pieces: list[Piece]
    user_params: dict[str, tuple[int, ...]]  # every parameter of the user's model, by name
    canonical: dict[str, tuple[int, ...]]  # every canonical parameter
    notes: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> list[dict]:
        """One row per canonical parameter placed, in the checkpoint's order."""
        rank = {k: i for i, k in enumerate(self.canonical)}
        return [{'canonical': p.canonical, 'user': p.where(), 'transform': p.transform}
                for p in sorted(self.pieces, key=lambda p: rank.get(p.canonical, len(rank)))]

    def unmapped(self) -> dict:
        used_user = {p.user for p in self.pieces}
        used_canonical = {p.canonical for p in self.pieces}
        return {'user': [k for k in self.user_params if k not in used_user],
                'canonical': [k for k in self.canonical if k not in used_canonical]}

    def load(self, model, params: Mapping[str, np.ndarray]) -> None:
        """Writes the checkpoint into the user's parameters through the pieces."""
        import torch

        named = dict(model.named_parameters())
        with torch.no_grad():
            for p in self.pieces:
                t = named[p.user]
                value = torch.from_numpy(np.ascontiguousarray(p.put(params[p.canonical]), np.float32))
                if p.index is None:
                    t.copy_(value.reshape(t.shape))
                else:
                    t[p.index] = value

    def gradients(self, model) -> dict[str, np.ndarray]:
        """The user's gradients read back into canonical names and layouts (zeros where a parameter got none)."""
        named = dict(model.named_parameters())
        out = {}
        for p in self.pieces:
            g = named[p.user].grad
            g = np.zeros(tuple(named[p.user].shape), np.float32) if g is None else g.detach().cpu().numpy()
            if p.index is not None:
                g = g[p.index]
            out[p.canonical] = np.asarray(p.take(g), np.float64).reshape(self.canonical[p.canonical])
        return out


def table_lines(table: list[dict]) -> list[str]:
    """The mapping as printed: canonical name, the user's name, the transformation."""
    if not table:
        return []
    w0 = max(len(r['canonical']) for r in table + [{'canonical': 'canonical'}])
    w1 = max(len(r['user']) for r in table + [{'user': 'yours'}])
    return [f'{"canonical":<{w0}}  {"yours":<{w1}}  transform'] + [
        f'{r["canonical"]:<{w0}}  {r["user"]:<{w1}}  {r["transform"]}' for r in table]


# --------------------------------------------------------------------------- the user's model, observed

@dataclasses.dataclass
class Call:
    """One module's first call in the traced forward pass."""

    name: str
    module: Any
    order: int
    inputs: tuple
    output: Any


def _first_tensor(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (tuple, list)):
        for a in v:
            t = _first_tensor(a)
            if t is not None:
                return t
    if isinstance(v, dict):
        for key in ('logits', 'last_hidden_state'):
            if key in v:
                return _first_tensor(v[key])
        for a in v.values():
            t = _first_tensor(a)
            if t is not None:
                return t
    if hasattr(v, 'logits'):  # a transformers-style output object
        return _first_tensor(v.logits)
    return None


def trace(model, x_nchw) -> tuple[dict[str, Call], Any]:
    """Runs the model once with hooks on every module: each module's first call (order, inputs, output)."""
    import torch

    calls: dict[str, Call] = {}
    counter = itertools.count()
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def pre(mod, args, name=name):
            if name not in calls:
                calls[name] = Call(name, mod, next(counter), args, None)

        def post(mod, args, out, name=name):
            if calls[name].output is None:
                calls[name].output = out

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(x_nchw)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _is(module, *kinds: str) -> bool:
    import torch.nn as nn

    return isinstance(module, tuple(getattr(nn, k) for k in kinds))


# Hand-written layers (TransformerLens-style W_Q, W_in, LayerNorm w and b): a module's own parameters, by shape.
_SCALE = ('weight', 'w', 'gamma', 'scale', 'g')
_SHIFT = ('bias', 'b', 'beta', 'shift')


def _own(m) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)]


def norm_params(m, D: int) -> Optional[tuple[Optional[str], Optional[str]]]:
    """(scale, bias) parameter names when `m` is a LayerNorm over D features: torch's, or a hand-written leaf with a
    (D,) scale and a (D,) bias under the usual names; None otherwise."""
    if _is(m, 'LayerNorm'):
        if tuple(m.normalized_shape) != (D,):
            return None
        return ('weight' if m.weight is not None else None), ('bias' if m.bias is not None else None)
    own = _own(m)
    if len(own) != 2 or any(shape != (D,) for _, shape in own) or _holds_params(m) or _is(m, 'Linear', 'Conv2d'):
        return None
    scale = next((n for n, _ in own if n.lower() in _SCALE), None)
    bias = next((n for n, _ in own if n.lower() in _SHIFT), None)
    return (scale, bias) if scale and bias else None


def _holds_params(m) -> bool:
    """Whether a submodule of `m` has parameters (hook points and activations do not)."""
    return any(True for c in m.children() for _ in c.parameters())


def _role(name: str) -> Optional[str]:
    """'q', 'k' or 'v' from a parameter's name (W_Q, b_K, w_value, ...)."""
    n = name.lower().replace('w_', '').replace('b_', '').strip('_')
    for role, words in (('q', ('q', 'query')), ('k', ('k', 'key')), ('v', ('v', 'value'))):
        if n in words:
            return role
    return None


def raw_attention(m, cfg: ViTConfig) -> Optional[dict]:
    """The parameter names of hand-written attention (three (H, D, Dh) projections, an (H, Dh, D) one, biases)."""
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    own = _own(m)
    proj = [n for n, shape in own if shape == (H, D, Dh)]
    out = [n for n, shape in own if shape == (H, Dh, D)]
    if len(proj) != 3 or len(out) != 1:
        return None
    biases = [n for n, shape in own if shape == (H, Dh)]
    roles = {_role(n): n for n in proj}
    q, k, v = (roles['q'], roles['k'], roles['v']) if set(roles) == {'q', 'k', 'v'} else proj
    found = {'q': q, 'k': k, 'v': v, 'out': out[0]}
    broles = {_role(n): n for n in biases}
    if set(broles) == {'q', 'k', 'v'}:
        found.update(bq=broles['q'], bk=broles['k'], bv=broles['v'])
    elif len(biases) == 3:
        found.update(bq=biases[0], bk=biases[1], bv=biases[2])
    out_bias = [n for n, shape in own if shape == (D,)]
    if len(out_bias) == 1:
        found['bout'] = out_bias[0]
    return found


def raw_linear(m, fan_in: int, fan_out: int, leaf: bool = True) -> Optional[dict]:
    """A hand-written dense layer: one (fan_in, fan_out) or (fan_out, fan_in) matrix and perhaps a (fan_out,) bias
    (`leaf=False`: among the model's own parameters, its submodules aside)."""
    own = _own(m)
    mats = [(n, shape) for n, shape in own if len(shape) == 2 and set(shape) == {fan_in, fan_out}]
    if len(mats) != 1 or (leaf and (_holds_params(m) or len([s for _, s in own if len(s) == 2]) != 1)):
        return None
    bias = [n for n, shape in own if shape == (fan_out,)]
    return {'w': mats[0][0], 'kernel_layout': mats[0][1] == (fan_in, fan_out), 'b': bias[0] if bias else None}


def raw_mlp(m, cfg: ViTConfig) -> Optional[dict]:
    """A hand-written MLP: (D, M) then (M, D) matrices (either layout, registration order), perhaps biases."""
    D, M = cfg.hidden_size, cfg.mlp_dim
    own = _own(m)
    mats = [(n, shape) for n, shape in own if len(shape) == 2]
    if len(mats) != 2 or {mats[0][1], mats[1][1]} not in ({(D, M), (M, D)}, {(D, M)}, {(M, D)}) or D == M:
        return None
    b_in = [n for n, shape in own if shape == (M,)]
    b_out = [n for n, shape in own if shape == (D,)]
    return {'w_in': mats[0][0], 'in_kernel': mats[0][1] == (D, M), 'w_out': mats[1][0],
            'out_kernel': mats[1][1] == (M, D), 'b_in': b_in[0] if b_in else None,
            'b_out': b_out[0] if b_out else None}


def _describe_model(model) -> str:
    counts: dict[str, int] = {}
    for _, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return ', '.join(f'{k} x{v}' for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:6]) or 'no layers'


def find_blocks(model, cfg: ViTConfig, what: str) -> tuple[str, list]:
    """(where they are, for messages; the blocks): the repeated encoder blocks, the alike children of a
    ModuleList/Sequential, or alike children numbered name_0, name_1, ... (`add_module`, attributes block0, ...)."""
    import torch.nn as nn

    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)):
            candidates.append((name or 'the model', list(m.children())))
        numbered: dict[tuple, list] = {}
        for child, c in m.named_children():
            found = re.match(r'^(.*?)_?(\d+)$', child)
            if found and not isinstance(m, (nn.ModuleList, nn.Sequential)):
                numbered.setdefault((found.group(1), type(c)), []).append((int(found.group(2)), c))
        for (stem, _), members in numbered.items():
            candidates.append((f'{name + "." if name else ""}{stem}_0, ...', [c for _, c in sorted(members)]))
    best = None
    for label, kids in candidates:
        if not kids or len({type(k) for k in kids}) != 1:
            continue
        holds = all(any(norm_params(s, cfg.hidden_size) for s in k.modules()) and
                    any(_is(s, 'Linear', 'MultiheadAttention') or raw_attention(s, cfg) for s in k.modules())
                    for k in kids)
        if not holds:
            continue
        size = sum(p.numel() for k in kids for p in k.parameters())
        if best is None or size > best[2]:
            best = (label, kids, size)
    if best is None:
        raise UserError(f'{what}: not a ViT the harness can map: no repeated blocks (a ModuleList or Sequential of '
                        'alike children, or alike children numbered name_0, name_1, ..., each with LayerNorms and '
                        f'Linear layers) in your model ({_describe_model(model)})')
    label, kids, _ = best
    if len(kids) != cfg.num_layers:
        raise UserError(f'{what}: your model has {len(kids)} encoder blocks ({label}) where the '
                        f'checkpoint has {cfg.num_layers} (num_layers); build num_layers blocks from the config')
    return label, kids


# --------------------------------------------------------------------------- one block

@dataclasses.dataclass
class BlockParts:
    """The modules of one block, by role (dotted names in the user's model)."""

    ln0: str
    ln1: str
    attention: dict  # kind 'fused' {'qkv', 'out'} | 'separate' {'q','k','v','out'} | 'torch_mha' {'mha'}
    fc1: str
    fc2: str
    out_module: Optional[str]  # whose output is the attention branch (before the residual), if one module's is


def _linear_shape(m) -> tuple[int, int]:
    return m.in_features, m.out_features


def map_block(i: int, prefix: str, calls: Mapping[str, Call], cfg: ViTConfig, what: str) -> BlockParts:
    """Roles inside block i from the order its LayerNorms and Linears ran in and their shapes."""
    D, M = cfg.hidden_size, cfg.mlp_dim
    raw = _map_raw_block(i, prefix, calls, cfg, what)
    if raw is not None:
        return raw
    seq = sorted((c for n, c in calls.items() if n.startswith(prefix) and (
        _is(c.module, 'Linear', 'MultiheadAttention') or norm_params(c.module, D))), key=lambda c: c.order)
    # nn.MultiheadAttention's out_proj never runs as a module: its weights are read by the functional call.
    seq = [c for c in seq if not any(_is(o.module, 'MultiheadAttention') and c.name.startswith(o.name + '.')
                                     for o in seq)]
    where = f'{what}: block {i} ({prefix.rstrip(".")})'

    def fail(why: str):
        found = ', '.join(f'{c.name[len(prefix):]} ({type(c.module).__name__}'
                          + (f' {_linear_shape(c.module)[0]}->{_linear_shape(c.module)[1]}'
                             if _is(c.module, 'Linear') else '') + ')' for c in seq)
        raise UserError(f'{where}: {why}; it ran {found or "nothing"}')

    def first(pred, start: int) -> int:
        for j in range(start, len(seq)):
            if pred(seq[j].module):
                return j
        return -1

    is_ln = lambda m: norm_params(m, D) is not None  # noqa: E731  torch's LayerNorm or a hand-written one
    takes_d = lambda m: (_is(m, 'MultiheadAttention') and m.embed_dim == D) or (  # noqa: E731
        _is(m, 'Linear') and m.in_features == D and m.out_features in (D, 3 * D))
    j = first(takes_d, 0)
    if j < 0:
        fail(f'no attention projection (a Linear {D}->{3 * D} or {D}->{D}, or nn.MultiheadAttention) found')
    lns = [k for k in range(j) if is_ln(seq[k].module)]
    if not lns:
        fail(f'no LayerNorm({D}) runs before the attention (the official block is pre-norm)')
    ln0 = seq[lns[-1]].name
    m = seq[j].module
    if _is(m, 'MultiheadAttention'):
        if m.num_heads != cfg.num_heads:
            fail(f'nn.MultiheadAttention has {m.num_heads} heads where the checkpoint has {cfg.num_heads}')
        attention = {'kind': 'torch_mha', 'mha': seq[j].name}
        out_module, after = seq[j].name, j + 1
    elif m.out_features == 3 * D:
        k = first(lambda m: _is(m, 'Linear') and _linear_shape(m) == (D, D), j + 1)
        attention = {'kind': 'fused', 'qkv': seq[j].name}
        if k >= 0:
            attention['out'], out_module, after = seq[k].name, seq[k].name, k + 1
        else:
            attention['out'], out_module = _unrun_out(i, prefix, calls, seq, attention, D, fail), None
            after = j + 1
    else:
        square = [k for k in range(j, len(seq)) if _is(seq[k].module, 'Linear')
                  and _linear_shape(seq[k].module) == (D, D)]
        if len(square) < 3:
            fail(f'separate q, k, v projections ({D}->{D}) expected, {len(square)} found')
        q, k_, v = _qkv_by_name([seq[k].name for k in square[:3]], prefix)
        attention = {'kind': 'separate', 'q': q, 'k': k_, 'v': v}
        if len(square) > 3 and (len(square) > 4 or _is_mlp_free(seq, square[3], D, M)):
            attention['out'], out_module, after = seq[square[3]].name, seq[square[3]].name, square[3] + 1
        else:
            attention['out'], out_module = _unrun_out(i, prefix, calls, seq, attention, D, fail), None
            after = square[2] + 1
    if out_module is None:  # the out-projection's weight is read directly: the attention module's output instead
        out_module = _attention_module(prefix, calls, attention)
    f1 = first(lambda m: _is(m, 'Linear') and _linear_shape(m) == (D, M), after)
    if f1 < 0:
        fail(f'no MLP Linear {D}->{M} after the attention')
    lns = [k for k in range(after, f1) if is_ln(seq[k].module)]
    if not lns:
        fail(f'no LayerNorm({D}) runs between the attention and the MLP (the official block is pre-norm)')
    f2 = first(lambda m: _is(m, 'Linear') and _linear_shape(m) == (M, D), f1 + 1)
    if f2 < 0:
        fail(f'no MLP Linear {M}->{D} after {seq[f1].name[len(prefix):]}')
    return BlockParts(ln0, seq[lns[-1]].name, attention, seq[f1].name, seq[f2].name, out_module)


def _map_raw_block(i: int, prefix: str, calls: Mapping[str, Call], cfg: ViTConfig, what: str
                   ) -> Optional[BlockParts]:
    """A block of hand-written layers (raw parameters, as TransformerLens-style code has them), or None."""
    D = cfg.hidden_size
    mine = sorted((c for n, c in calls.items() if n.startswith(prefix)), key=lambda c: c.order)
    att = next((c for c in mine if raw_attention(c.module, cfg)), None)
    if att is None:
        return None
    mlp = next((c for c in mine if c.order > att.order and raw_mlp(c.module, cfg)), None)
    where = f'{what}: block {i} ({prefix.rstrip(".")})'
    if mlp is None:
        raise UserError(f'{where}: hand-written attention ({att.name[len(prefix):]}) but no MLP with ({D}, '
                        f'{cfg.mlp_dim}) and ({cfg.mlp_dim}, {D}) weights after it')
    ln0 = [c for c in mine if c.order < att.order and norm_params(c.module, D)]
    ln1 = [c for c in mine if att.order < c.order < mlp.order and norm_params(c.module, D)]
    if not ln0 or not ln1:
        raise UserError(f'{where}: no LayerNorm over {D} features runs before the '
                        f'{"attention" if not ln0 else "MLP"} (the official block is pre-norm)')
    return BlockParts(ln0[-1].name, ln1[-1].name, {'kind': 'raw', 'module': att.name}, mlp.name, mlp.name, att.name)


def _is_mlp_free(seq: list, k: int, D: int, M: int) -> bool:
    """The 4th D->D Linear ran before the MLP's first Linear: an out-projection, not an MLP of width D."""
    return not any(_is(c.module, 'Linear') and _linear_shape(c.module) == (D, M) for c in seq[:k])


def _unrun_out(i: int, prefix: str, calls: Mapping[str, Call], seq: list, attention: dict, D: int, fail) -> str:
    """The out-projection when it never ran as a module (its weight used directly, x @ W): the block's one
    Linear(D, D) that did not run."""
    ran = {c.name for c in seq}
    block = calls[prefix.rstrip('.')].module
    idle = [f'{prefix}{n}' for n, m in block.named_modules() if n and f'{prefix}{n}' not in ran
            and _is(m, 'Linear') and _linear_shape(m) == (D, D)]
    if len(idle) != 1:
        fail(f'no {D}->{D} out-projection after the attention projections')
    return idle[0]


def _attention_module(prefix: str, calls: Mapping[str, Call], attention: dict) -> Optional[str]:
    """The smallest module holding every attention projection, below the block: its output is the attention
    branch."""
    names = [v for k, v in attention.items() if k != 'kind']
    parts = [n.split('.') for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    name = '.'.join(common)
    return name if name.startswith(prefix) and name in calls else None


def _qkv_by_name(names: list[str], prefix: str) -> tuple[str, str, str]:
    """q, k, v: by their names when they say so (q/query, k/key, v/value), else in the order they ran."""
    tags = {'q': ('q', 'query', 'q_proj', 'to_q', 'wq'), 'k': ('k', 'key', 'k_proj', 'to_k', 'wk'),
            'v': ('v', 'value', 'v_proj', 'to_v', 'wv')}
    found = {}
    for n in names:
        last = n.rsplit('.', 1)[-1].lower()
        for role, words in tags.items():
            if last in words:
                found[role] = n
    if len(found) == 3:
        return found['q'], found['k'], found['v']
    return names[0], names[1], names[2]


def block_pieces(i: int, parts: BlockParts, model, cfg: ViTConfig, qkv_order: str) -> list[Piece]:
    """Block i's canonical parameters placed in the user's modules."""
    D, H, Dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    mods = dict(model.named_modules())
    base = f'Transformer/encoderblock_{i}/'
    out: list[Piece] = []

    def ln(which: str, name: str):
        out.extend(_norm_pieces(f'{base}{which}', name, mods[name], D))

    def linear(canonical: str, name: str, kshape, fan_in: int, bshape):
        m = mods[name]
        out.append(_dense(f'{canonical}/kernel', f'{name}.weight', kshape, fan_in))
        if m.bias is not None:
            out.append(_reshaped(f'{canonical}/bias', f'{name}.bias', bshape, (int(np.prod(bshape)),)))

    ln('LayerNorm_0', parts.ln0)
    a = parts.attention
    att = f'{base}{ATTN}/'
    if a['kind'] == 'raw':
        return out + _raw_block_pieces(base, parts, mods, cfg) + [
            p for p in _norm_pieces(f'{base}LayerNorm_1', parts.ln1, mods[parts.ln1], D)]
    if a['kind'] == 'separate':
        for role, key in (('query', 'q'), ('key', 'k'), ('value', 'v')):
            linear(att + role, a[key], (D, H, Dh), 1, (H, Dh))
    else:
        weight, bias = ((f'{a["qkv"]}.weight', f'{a["qkv"]}.bias') if a['kind'] == 'fused'
                        else (f'{a["mha"]}.in_proj_weight', f'{a["mha"]}.in_proj_bias'))
        has_bias = dict(model.named_parameters()).get(bias) is not None
        order = '(3, H, Dh)' if a['kind'] == 'torch_mha' else qkv_order
        for s, role in enumerate(('query', 'key', 'value')):
            if order == '(3, H, Dh)':
                index = slice(s * D, (s + 1) * D)
                out.append(_dense(f'{att}{role}/kernel', weight, (D, H, Dh), 1, index,
                                  f'kernel (D, H, Dh) -> rows {s * D}:{(s + 1) * D} of the fused (3D, D) weight, '
                                  'qkv in (3, H, Dh) order, transposed'))
                if has_bias:
                    out.append(Piece(f'{att}{role}/bias', bias, 'bias (H, Dh) -> its third of the fused bias',
                                     lambda b: np.asarray(b).reshape(D), lambda g: np.asarray(g).reshape(H, Dh),
                                     index))
            else:  # rows h * 3 * Dh + s * Dh + d
                index = _interleaved(s, H, Dh)
                out.append(_dense(f'{att}{role}/kernel', weight, (D, H, Dh), 1, index,
                                  f'kernel (D, H, Dh) -> rows of the fused (3D, D) weight in (H, 3, Dh) order '
                                  f'(slot {s} of 3 per head), transposed'))
                if has_bias:
                    out.append(Piece(f'{att}{role}/bias', bias, f'bias (H, Dh) -> slot {s} of 3 per head of the fused '
                                     'bias', lambda b: np.asarray(b).reshape(D), lambda g: np.asarray(g).reshape(H, Dh),
                                     index))
    out_name = a['out'] if a['kind'] != 'torch_mha' else f'{a["mha"]}.out_proj'
    m = mods[out_name]
    out.append(_dense(f'{att}out/kernel', f'{out_name}.weight', (H, Dh, D), 2))
    if m.bias is not None:
        out.append(_reshaped(f'{att}out/bias', f'{out_name}.bias', (D,), (D,)))
    ln('LayerNorm_1', parts.ln1)
    linear(f'{base}MlpBlock_0/Dense_0', parts.fc1, (D, cfg.mlp_dim), 1, (cfg.mlp_dim,))
    linear(f'{base}MlpBlock_0/Dense_1', parts.fc2, (cfg.mlp_dim, D), 1, (D,))
    return out


def _norm_pieces(canonical: str, name: str, m, D: int) -> list[Piece]:
    scale, bias = norm_params(m, D)
    return ([_reshaped(f'{canonical}/scale', f'{name}.{scale}', (D,), (D,))] if scale else []) + (
        [_reshaped(f'{canonical}/bias', f'{name}.{bias}', (D,), (D,))] if bias else [])


def _raw_dense(canonical: str, user: str, shape: tuple[int, int], kernel_layout: bool) -> Piece:
    """A canonical (in, out) kernel into a hand-written matrix: as is, or transposed when it is stored (out, in)."""
    if kernel_layout:
        return _reshaped(canonical, user, shape, shape)
    return Piece(canonical, user, 'kernel (in, out) -> (out, in), transposed', lambda a: np.asarray(a).T,
                 lambda g: np.asarray(g).T)


def _raw_block_pieces(base: str, parts: BlockParts, mods: Mapping, cfg: ViTConfig) -> list[Piece]:
    """The attention and MLP of a block of hand-written layers (`_map_raw_block`)."""
    D, H, Dh, M = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    name = parts.attention['module']
    a = raw_attention(mods[name], cfg)
    att = f'{base}{ATTN}/'
    out = []
    for role, key in (('query', 'q'), ('key', 'k'), ('value', 'v')):
        out.append(Piece(f'{att}{role}/kernel', f'{name}.{a[key]}', 'kernel (D, H, Dh) -> (H, D, Dh)',
                         lambda k: np.asarray(k).transpose(1, 0, 2), lambda g: np.asarray(g).transpose(1, 0, 2)))
        if f'b{key}' in a:
            out.append(_reshaped(f'{att}{role}/bias', f'{name}.{a["b" + key]}', (H, Dh), (H, Dh)))
    out.append(_reshaped(f'{att}out/kernel', f'{name}.{a["out"]}', (H, Dh, D), (H, Dh, D)))
    if 'bout' in a:
        out.append(_reshaped(f'{att}out/bias', f'{name}.{a["bout"]}', (D,), (D,)))
    m = raw_mlp(mods[parts.fc1], cfg)
    mlp = f'{base}MlpBlock_0/'
    out.append(_raw_dense(f'{mlp}Dense_0/kernel', f'{parts.fc1}.{m["w_in"]}', (D, M), m['in_kernel']))
    if m['b_in']:
        out.append(_reshaped(f'{mlp}Dense_0/bias', f'{parts.fc1}.{m["b_in"]}', (M,), (M,)))
    out.append(_raw_dense(f'{mlp}Dense_1/kernel', f'{parts.fc1}.{m["w_out"]}', (M, D), m['out_kernel']))
    if m['b_out']:
        out.append(_reshaped(f'{mlp}Dense_1/bias', f'{parts.fc1}.{m["b_out"]}', (D,), (D,)))
    return out


def _interleaved(s: int, H: int, Dh: int) -> np.ndarray:
    """Row indices of slot s (q 0, k 1, v 2) of a fused weight laid out (H, 3, Dh)."""
    return (np.arange(H)[:, None] * 3 * Dh + s * Dh + np.arange(Dh)[None, :]).reshape(-1)


# --------------------------------------------------------------------------- around the blocks

@dataclasses.dataclass
class Outer:
    patch: str  # the Conv2d or Linear making the patch tokens
    patch_kind: str  # 'conv' | 'linear'
    final_ln: str
    pre_logits: Optional[str]
    head: str
    cls: Optional[str]  # parameter names
    posemb: Optional[str]


def map_outer(model, calls: Mapping[str, Call], blocks: list[str], cfg: ViTConfig, what: str, output=None) -> Outer:
    D, p = cfg.hidden_size, cfg.patch_size[0]
    inside = lambda n: any(n == b or n.startswith(b + '.') for b in blocks)  # noqa: E731
    first_block = min(c.order for n, c in calls.items() if inside(n))
    last_block = max(c.order for n, c in calls.items() if inside(n))
    before = sorted((c for n, c in calls.items() if c.order < first_block and not inside(n)), key=lambda c: c.order)
    after = sorted((c for n, c in calls.items() if c.order > last_block and not inside(n)), key=lambda c: c.order)
    patch = [c for c in before if (_is(c.module, 'Conv2d') and c.module.out_channels == D
                                   and tuple(c.module.kernel_size) == (p, p) and tuple(c.module.stride) == (p, p)
                                   and c.module.in_channels == 3)
             or (_is(c.module, 'Linear') and _linear_shape(c.module) == (p * p * 3, D))]
    if not patch:
        raise UserError(f'{what}: no patch embedding found before the blocks: expected a Conv2d(3, {D}, '
                        f'kernel_size={p}, stride={p}) or a Linear({p * p * 3}, {D}) over flattened {p}x{p} patches '
                        f'(your model: {_describe_model(model)})')
    lns = [c for c in after if norm_params(c.module, D)]
    if not lns:
        raise UserError(f'{what}: no final LayerNorm({D}) runs after the blocks (the official encoder ends with one)')
    C, R = cfg.num_classes, cfg.representation_size
    linears = [c for c in after if _is(c.module, 'Linear') and c.order > lns[0].order]
    head = [c for c in linears if _linear_shape(c.module) == (R or D, C)] or [
        c for c in after if c.order > lns[0].order and raw_linear(c.module, R or D, C)]
    if not head and R is None and raw_linear(model, D, C, leaf=False):  # the head's weights on the model itself
        head = [Call('', model, 1 << 30, (), None)]
    if not head:
        raise UserError(f'{what}: no head Linear({R or D}, {C}) runs after the final LayerNorm (the checkpoint has '
                        f'{C} classes); BUILD\'s model must return the logits'
                        + (f' (it returned shape {tuple(output.shape)})' if output is not None else ''))
    pre = None
    if R is not None:
        pre_c = [c for c in linears if _linear_shape(c.module) == (D, R) and c.order < head[-1].order]
        if not pre_c:
            raise UserError(f'{what}: the checkpoint has a representation layer ({D}->{R}, tanh) before the head; '
                            f'your model has no Linear({D}, {R})')
        pre = pre_c[-1].name
    cls, posemb = _tokens(model, cfg, what)
    patch_c = patch[-1]
    return Outer(patch_c.name, 'conv' if _is(patch_c.module, 'Conv2d') else 'linear', lns[0].name, pre,
                 head[-1].name, cls, posemb)


def _tokens(model, cfg: ViTConfig, what: str) -> tuple[Optional[str], Optional[str]]:
    """The class token and the position embedding: parameters of no Linear, LayerNorm or Conv2d, by size."""
    D = cfg.hidden_size
    n_pos = cfg.num_tokens
    loose = []
    for mname, m in model.named_modules():
        layer = _is(m, 'Linear', 'LayerNorm', 'Conv2d', 'MultiheadAttention') or norm_params(m, D)
        if layer or raw_attention(m, cfg) or raw_mlp(m, cfg) or raw_linear(m, D, cfg.num_classes):
            continue
        for pname, t in m.named_parameters(recurse=False):
            loose.append((f'{mname}.{pname}' if mname else pname, tuple(t.shape)))
    # By size; among several, a name that says what it is first (a LayerScale's gamma has D values too).
    said = lambda words: (lambda n: not any(w in n.lower() for w in words))  # noqa: E731
    cls = sorted((n for n, s in loose if int(np.prod(s)) == D and s[-1] == D), key=said(('cls', 'class', 'token')))
    pos = sorted((n for n, s in loose if int(np.prod(s)) == n_pos * D and s[-1] == D), key=said(('pos',)))
    if not pos:
        raise UserError(f'{what}: no learned position embedding found: a parameter of {n_pos} x {D} values '
                        f'({n_pos} tokens of width {D}) under any name')
    if cfg.has_cls_token and not cls:
        raise UserError(f'{what}: the checkpoint has a class token (classifier token) and your model has no '
                        f'parameter of {D} values for it')
    return (cls[0] if cfg.has_cls_token else None), pos[0]


def patch_piece(outer: Outer, cfg: ViTConfig, order: str) -> Piece:
    p, D = cfg.patch_size[0], cfg.hidden_size
    w = f'{outer.patch}.weight'
    if outer.patch_kind == 'conv':
        return Piece('embedding/kernel', w, 'kernel (p, p, C, D) -> Conv2d weight (D, C, p, p)',
                     lambda a: np.asarray(a).transpose(3, 2, 0, 1), lambda g: np.asarray(g).transpose(2, 3, 1, 0))
    axes = {'p1': 0, 'p2': 1, 'c': 2}
    perm = [axes[a] for a in order.split()]
    inv = list(np.argsort(perm))
    put = lambda a: np.asarray(a).transpose(*perm, 3).reshape(p * p * 3, D).T  # noqa: E731
    take = lambda g: (np.asarray(g).T.reshape(*[(p, p, 3)[k] for k in perm], D)  # noqa: E731
                      .transpose(*inv, 3))
    return Piece('embedding/kernel', w, f'kernel (p, p, C, D) -> Linear weight (D, p*p*C) over patches flattened '
                 f'({order})', put, take)


def outer_pieces(model, outer: Outer, cfg: ViTConfig, patch_order: str) -> list[Piece]:
    D, C = cfg.hidden_size, cfg.num_classes
    mods = dict(model.named_modules())
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    out = [patch_piece(outer, cfg, patch_order)]
    if mods[outer.patch].bias is not None:
        out.append(_reshaped('embedding/bias', f'{outer.patch}.bias', (D,), (D,)))
    if outer.cls:
        out.append(_reshaped('cls', outer.cls, (1, 1, D), shapes[outer.cls]))
    out.append(_reshaped(POSEMB, outer.posemb, (1, cfg.num_tokens, D), shapes[outer.posemb]))
    out += _norm_pieces('Transformer/encoder_norm', outer.final_ln, mods[outer.final_ln], D)
    R = cfg.representation_size
    if outer.pre_logits:
        out.append(_dense('pre_logits/kernel', f'{outer.pre_logits}.weight', (D, R), 1))
        if mods[outer.pre_logits].bias is not None:
            out.append(_reshaped('pre_logits/bias', f'{outer.pre_logits}.bias', (R,), (R,)))
    head = raw_linear(mods[outer.head], R or D, C, leaf=bool(outer.head)) if not _is(mods[outer.head], 'Linear') \
        else None
    if head is not None:
        where = f'{outer.head}.' if outer.head else ''
        out.append(_raw_dense('head/kernel', f'{where}{head["w"]}', (R or D, C), head['kernel_layout']))
        if head['b']:
            out.append(_reshaped('head/bias', f'{where}{head["b"]}', (C,), (C,)))
        return out
    out.append(_dense('head/kernel', f'{outer.head}.weight', (R or D, C), 1))
    if mods[outer.head].bias is not None:
        out.append(_reshaped('head/bias', f'{outer.head}.bias', (C,), (C,)))
    return out


# --------------------------------------------------------------------------- hooks: verify's intermediates

def _tokens_layout(t, B: int, N: int):
    """(B, N, ...) from a sequence-first (N, B, ...) tensor (nn.MultiheadAttention's default)."""
    if t.ndim >= 3 and t.shape[0] == N and t.shape[1] == B and N != B:
        return t.transpose(0, 1)
    return t


@dataclasses.dataclass
class Structure:
    blocks_name: str
    blocks: list[str]
    parts: list[BlockParts]
    outer: Outer
    # Where block i's input is read: the block itself, or, for a block that is a container never called as a
    # module (lucidrains' ModuleList([attention, feedforward])), the first module that runs inside it.
    entries: list[str] = dataclasses.field(default_factory=list)

    def block_io(self, i: int) -> tuple[tuple[str, str], tuple[str, str]]:
        """((module, 'input'), (module, 'input' | 'output')): where block i's input and output are read."""
        entry = self.entries[i] if self.entries else self.blocks[i]
        if entry == self.blocks[i]:
            return (entry, 'input'), (entry, 'output')
        after = self.entries[i + 1] if i + 1 < len(self.blocks) else self.outer.final_ln
        return (entry, 'input'), (after, 'input')  # residual stream: the next step's input is this block's output


def taps(s: Structure, cfg: ViTConfig) -> list[tuple[str, str, str]]:
    """(intermediate, module name, 'input' | 'output') for every intermediate verify compares."""
    out = [('embedding', s.outer.patch, 'output'), ('with_posemb', *s.block_io(0)[0])]
    for i, parts in enumerate(s.parts):
        key = lambda sub: diagnosis.substep_key(i, sub)  # noqa: E731
        out += [(key('LayerNorm_0'), parts.ln0, 'output')]
        out += [(key(ATTN), parts.out_module, 'output')] if parts.out_module else []
        out += [(key('LayerNorm_1'), parts.ln1, 'output'), (key('MlpBlock_0'), parts.fc2, 'output'),
                (f'encoderblock_{i}', *s.block_io(i)[1])]
    out += [('encoder_norm', s.outer.final_ln, 'output')]
    out += [('pre_logits', s.outer.head, 'input')] if s.outer.head else []  # a head on the model itself: no hook
    return out


def run_hooked(model, s: Structure, cfg: ViTConfig, x: np.ndarray) -> dict[str, np.ndarray]:
    """The user's model on NHWC `x` with verify's intermediates collected by forward hooks (float64 NumPy)."""
    import torch

    B, N = len(x), cfg.num_tokens
    mods = dict(model.named_modules())
    got: dict[str, Any] = {}
    handles = []
    for key, name, what in taps(s, cfg):
        def hook(mod, args, out, key=key, what=what):
            if key not in got:
                got[key] = _first_tensor(args if what == 'input' else out)

        handles.append(mods[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = _first_tensor(model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))))
    except Exception as e:  # the user's forward pass, with the checkpoint loaded
        raise UserError(f'--module: your model\'s forward pass raised {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}') from None
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, t in got.items():
        if t is None:
            continue
        t = t.detach().float()
        if k == 'embedding':
            if t.ndim == 4:  # a Conv2d's (B, D, gh, gw)
                t = t.flatten(2).transpose(1, 2)
            elif t.ndim > 3:
                t = t.reshape(B, -1, t.shape[-1])
        else:
            t = _tokens_layout(t, B, N)
        out[k] = t.cpu().numpy().astype(np.float64)
    if logits is None:
        raise UserError('--module: your model returned no tensor; return the logits (B, num_classes)')
    out['logits'] = logits.detach().float().cpu().numpy().astype(np.float64)
    return out


# --------------------------------------------------------------------------- choosing between layouts

def _embedding_gap(cfg, params, x, got) -> float:
    """How far the user's patch tokens are from the reference's, in either grid order (the order is diagnosed
    later; here only the layout of one patch is chosen)."""
    if got is None or got.ndim != 3:
        return np.inf
    gaps = []
    for order in ('rows', 'columns'):
        ref = diagnosis.patch_embed(cfg, params, np.asarray(x, np.float64), order)
        gaps.append(diagnosis._gap(ref, got) / tolerance.bound(ref, 'fp32'))
    return min(gaps)


def _attention_gap(params, got: Mapping[str, np.ndarray]) -> float:
    """Block 0's attention branch against the reference's, fed the user's own LayerNorm_0 output (`params` with
    what the model has no place for zeroed: a bias-free qkv is still laid out right)."""
    ln0 = got.get(diagnosis.substep_key(0, 'LayerNorm_0'))
    att = got.get(diagnosis.substep_key(0, ATTN))
    if ln0 is None or att is None:
        return np.inf
    ref = diagnosis.attention(ln0, diagnosis.block_params(params, 0), diagnosis.OFFICIAL)[0]
    return diagnosis._gap(ref, att) / tolerance.bound(ref, 'fp32')


def choose(label: str, options: list[str], score: Callable[[str], float], notes: list[str]) -> str:
    """The option whose output reproduces the reference (score <= 1: within tolerance); the closest when none does,
    with a note naming the layer and every option tried."""
    if len(options) == 1:
        return options[0]
    scores = {o: score(o) for o in options}
    best = min(options, key=lambda o: scores[o])
    if not scores[best] <= 1.0:
        tried = ', '.join(f'{o} ({"no output" if not np.isfinite(scores[o]) else f"{scores[o]:.1e} x bound"})'
                          for o in options)
        notes.append(f'no mapping reproduces {label}: tried {tried}; kept {best}, the closest (the divergence is '
                     'diagnosed below)')
    return best


# --------------------------------------------------------------------------- entry point

@dataclasses.dataclass
class Mapped:
    model: Any
    structure: Structure
    mapping: ParamMapping


def map_model(model, cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, what: str) -> Mapped:
    """Finds the mapping, chooses between layouts where shapes leave it open, and loads the checkpoint."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UserError(f'{what} returned {type(model).__name__}, not a torch.nn.Module or a flax.linen.Module; '
                        '--module takes those (for anything else write FUNCTION(params, x), docs/harness.md)')
    from vit_torch import runtime

    runtime.strict_float32()  # BUILD may have imported torch only now: no TF32 in the user's model either
    model = model.float().cpu().eval()  # verify's child runs on the CPU, in float32
    if hasattr(torch.backends, 'mha'):  # the fused eval path of nn.TransformerEncoderLayer skips its submodules' hooks
        torch.backends.mha.set_fastpath_enabled(False)
    x_nchw = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    try:
        calls, traced = trace(model, x_nchw)
    except Exception as e:  # the user's forward pass failed before any weight was loaded
        raise UserError(f'{what}: your model\'s forward pass on a ({", ".join(map(str, x_nchw.shape))}) NCHW batch '
                        f'raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    blocks_name, kids = find_blocks(model, cfg, what)
    names = {id(m): n for n, m in model.named_modules()}
    blocks = [names[id(k)] for k in kids]
    parts = [map_block(i, f'{b}.', calls, cfg, what) for i, b in enumerate(blocks)]
    outer = map_outer(model, calls, blocks, cfg, what, _first_tensor(traced))
    entries = [b if b in calls else min((c for n, c in calls.items() if n.startswith(f'{b}.')),
                                        key=lambda c: c.order).name for b in blocks]
    s = Structure(blocks_name, blocks, parts, outer, entries)
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    from parity.core import weights

    canonical = {k: tuple(v) for k, v in weights.param_shapes(cfg).items()}
    notes: list[str] = []
    fused = parts[0].attention['kind'] == 'fused'

    def mapping_for(patch_order: str, qkv_order: str) -> ParamMapping:
        pieces = outer_pieces(model, outer, cfg, patch_order)
        for i, bp in enumerate(parts):
            pieces += block_pieces(i, bp, model, cfg, qkv_order)
        return ParamMapping(pieces, shapes, canonical, notes)

    def run(patch_order: str, qkv_order: str) -> dict[str, np.ndarray]:
        mapping_for(patch_order, qkv_order).load(model, params)
        return run_hooked(model, s, cfg, x)

    patch_orders = list(PATCH_ORDERS) if outer.patch_kind == 'linear' else ['conv']
    qkv = QKV_ORDERS[0]
    patch_order = choose('embedding (the patch embedding)', patch_orders,
                         lambda o: _embedding_gap(cfg, params, x, run(o, qkv).get('embedding')), notes)
    if fused:
        absent = set(mapping_for(patch_order, qkv).unmapped()['canonical'])
        held = {k: (np.zeros_like(v) if k in absent else v) for k, v in params.items()}
        qkv = choose(f'encoderblock_0/{ATTN} (the fused qkv {parts[0].attention["qkv"]})', list(QKV_ORDERS),
                     lambda o: _attention_gap(held, run(patch_order, o)), notes)
    mapping = mapping_for(patch_order, qkv)
    mapping.load(model, params)
    return Mapped(model, s, mapping)


def run_module(build: Callable, spec: str, cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray,
               grad: Optional[Mapping] = None) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """BUILD(config) -> the user's model, mapped, loaded and run: (intermediates, notes, {'mapping', 'unmapped'}).

    `grad` ({'labels': [...], 'label_smoothing': eps}) adds one backward pass (`stepcheck.module_step`): the
    gradients under 'grad/'-prefixed canonical names, the loss in the report.
    """
    from parity.harness.counterparts import _where

    path = getattr(build, '_parity_path', spec)
    try:
        model = build(build_config(cfg))
    except UserError:
        raise
    except Exception as e:  # the user's BUILD failed
        if isinstance(e, TypeError) and e.__traceback__.tb_next is None:  # the call itself: another signature
            raise UserError(f'{spec} cannot be called as BUILD(config) ({e}): --module takes a function of one '
                            'dict of sizes that returns your model') from None
        raise UserError(f'{spec}: BUILD(config) raised {_where(e, path)}') from None
    from parity.harness import automap_flax

    if automap_flax.is_flax(model):
        out, mapping, loaded = automap_flax.map_and_run(model, cfg, params, x, spec)
        owners = {}
        mapped = None
    elif 'torch' not in sys.modules:
        raise UserError(f'{spec}: BUILD returned {type(model).__name__}, not a torch.nn.Module or a flax.linen.Module; '
                        '--module takes those (for anything else write FUNCTION(params, x), docs/harness.md)')
    else:
        mapped = map_model(model, cfg, params, x, spec)
        mapping = mapped.mapping
        out = run_hooked(mapped.model, mapped.structure, cfg, x)
        owners = {f'{m}.{p}' if m else p: type(mod).__name__ for m, mod in mapped.model.named_modules()
                  for p, _ in mod.named_parameters(recurse=False)}
    unmapped = mapping.unmapped()
    notes = list(mapping.notes)
    for name in unmapped['user']:
        notes.append(f'structural difference: your parameter {name} {mapping.user_params[name]}'
                     + (f' (of a {owners[name]})' if name in owners else '')
                     + ' has no counterpart in the checkpoint; left as BUILD made it')
    for name in unmapped['canonical']:
        notes.append(f'structural difference: the checkpoint\'s {name} {mapping.canonical[name]} has no place '
                     'in your model')
    extra = {'mapping': mapping.table(), 'unmapped': unmapped}
    if grad is not None:
        from parity.harness import stepcheck

        labels, smoothing = np.asarray(grad['labels'], np.int64), float(grad['label_smoothing'])
        if mapped is None:
            loss, grads = automap_flax.step(*loaded, mapping, x, labels, smoothing)
        else:
            loss, grads = stepcheck.module_step(mapped, labels, smoothing, x)
        more, fields = stepcheck.as_outputs(loss, grads)
        out.update(more)
        extra.update(fields)
        notes.append('--grad: cross-entropy on your logits, backpropagated through your model in eval mode '
                     '(dropout off, as on the reference side)' if mapped is not None else
                     '--grad: cross-entropy on your logits, differentiated by jax.value_and_grad with dropout off')
    return out, notes, extra


def run_job(build: Callable, spec: str, job: Mapping, params: Mapping[str, np.ndarray], x: np.ndarray
            ) -> tuple[dict[str, np.ndarray], list[str], dict]:
    """What verify's child process runs for `--module` (`child.run_module_isolated`'s `job`)."""
    if 'step' in job:  # FILE.py:STEP --grad: the user's own training step
        from parity.harness import stepcheck

        loss, grads, after, notes = stepcheck.user_step(build, spec, params, x,
                                                        np.asarray(job['step']['labels'], np.int64),
                                                        bool(job['step'].get('updated')))
        out, fields = stepcheck.as_outputs(loss, grads, after)
        return out, notes, fields
    cfg = ViTConfig.from_official_dict(dict(job['config']), 'job.json')
    return run_module(build, spec, cfg, params, x, job.get('grad'))


def structural_findings(cfg: ViTConfig, params: Mapping[str, np.ndarray], unmapped: Mapping[str, list],
                        first: str, have: Mapping[str, np.ndarray]) -> list[dict]:
    """Findings naming the structural differences (`ParamMapping.unmapped`) that can explain the first divergence.

    A canonical parameter with no place in block i (a bias-free projection) is tested: the
    reference block with those parameters zeroed, fed the candidate's own input, either
    reproduces the candidate's block output (the cause, named 'missing_parameter') or not.
    """
    from parity.harness.verdict import layer_of

    layer = layer_of(first)
    out = []
    if layer.startswith('encoderblock_'):
        i = int(layer.rsplit('_', 1)[1])
        prefix = f'Transformer/encoderblock_{i}/'
        missing = [k for k in unmapped['canonical'] if k.startswith(prefix)]
        u = have.get(f'encoderblock_{i - 1}' if i else 'with_posemb')
        y = have.get(layer)
        if missing and u is not None and y is not None:
            zeroed = {k: (np.zeros_like(v) if k in missing else v) for k, v in params.items()}
            alt = diagnosis.block(u, diagnosis.block_params(zeroed, i))['output']
            short = ', '.join(k[len(prefix):] for k in missing)
            if diagnosis._reproduces(alt, y, 'fp32'):
                out.append(diagnosis.finding(
                    'cause', layer, f'your model has no place for {short}: the reference block with '
                    f'{"it" if len(missing) == 1 else "them"} zeroed, fed the same input, reproduces yours to '
                    f'{diagnosis._gap(alt, y):.1e} (a missing bias: add bias=True, or train without it and '
                    'verify against such a checkpoint)', 'missing_parameter', parameters=missing))
            else:
                out.append(diagnosis.finding('structure', layer, f'the checkpoint\'s {short} '
                                             f'{"has" if len(missing) == 1 else "have"} no place in your model'))
    extra = [k for k in unmapped['user']]
    if extra:
        out.append(diagnosis.finding('structure', layer, 'your model has parameters the checkpoint has no '
                                     f'counterpart for, left as BUILD made them: {", ".join(extra)}'))
    elif unmapped['canonical'] and not out:
        out.append(diagnosis.finding('structure', layer, 'the checkpoint has parameters with no place in your '
                                     f'model: {", ".join(unmapped["canonical"])}'))
    return out
