"""Diagnosis: where inside a layer a divergence starts, and which known cause reproduces it.

Nothing here guesses from magnitudes. The reference's sub-steps are written once more,
in NumPy float64, with one switch per known difference (`Numerics`), and re-run on the
candidate's *own* inputs:

- Localisation. A sub-step fed the candidate's input either reproduces the candidate's
  output (within the tolerance policy: it only inherited a difference) or does not (the
  divergence starts there). With the candidate's sub-step outputs (counterparts give
  them through hooks, `verify` users may return them) each sub-step is tested alone;
  without them, the whole block is.
- Causes. The same sub-step is re-run with one alternative numeric -- exact-erf GELU,
  another LayerNorm eps (fitted), TF32-rounded matmul operands, another position-
  embedding resize, symmetric instead of TF `SAME` padding, and a few common bugs
  (unscaled queries, a transposed out-projection). A cause is named when the
  alternative reproduces the candidate within tolerance and the official numerics do not.

Shapes: B batch, N tokens, D width, H heads, Dh = D // H, M MLP size, h x w a grid, C channels,
G GroupNorm groups; images NHWC.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Callable, Mapping, Optional

import numpy as np

from parity.core import weights
from parity.core.config import ViTConfig
from parity.harness import tolerance

OFFICIAL_EPS = 1e-6
# Optional sub-step outputs of block i, under the block's parameter path: LayerNorm
# outputs, and the attention and MLP branches before their residual additions.
SUBSTEPS = ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')
BLOCK = re.compile(r'^(?:encoderblock|attention)_(\d+)$')


def substep_key(i: int, sub: str) -> str:
    return f'Transformer/encoderblock_{i}/{sub}'


def finding(kind: str, where: str, message: str, cause: Optional[str] = None, **extra) -> dict:
    """One diagnosis entry: kind is 'localisation', 'cause', 'inherited' or 'unexplained'."""
    return {'kind': kind, 'where': where, 'cause': cause, 'message': message, **extra}


# --------------------------------------------------------------------------- the reference, with switches

@dataclasses.dataclass(frozen=True)
class Numerics:
    """One way of computing a block; the defaults are the official numerics."""

    gelu: str = 'tanh'  # 'erf': timm and transformers
    ln_eps: float = OFFICIAL_EPS  # transformers 1e-12, PyTorch's default 1e-5
    query_scale: str = 'sqrt(Dh)'  # 'none', 'sqrt(D)'
    out_proj: str = 'official'  # 'transposed': the (H*Dh, D) out kernel used as (D, H*Dh)
    matmul: str = 'fp32'  # 'tf32': operands rounded to 10 mantissa bits, float32 accumulation
    qk: str = 'official'  # 'swapped': the key projection used as the queries and the query projection as the keys

    def change(self) -> str:
        """What differs from the official numerics, in words."""
        official = Numerics()
        parts = [f'{f.name}={getattr(self, f.name)!r}' for f in dataclasses.fields(self)
                 if getattr(self, f.name) != getattr(official, f.name)]
        return ', '.join(parts) or 'official numerics'


OFFICIAL = Numerics()
# Each alternative, the sub-step it lives in, its cause id, and what to tell people.
ALTERNATIVES = (
    (Numerics(gelu='erf'), 'MlpBlock_0', 'erf_gelu',
     'exact-erf GELU where the official code uses the tanh approximation (timm and transformers default to erf)'),
    (Numerics(query_scale='none'), 'MultiHeadDotProductAttention_0', 'unscaled_queries',
     'queries not scaled by 1/sqrt(head_dim) before the dot product'),
    (Numerics(query_scale='sqrt(D)'), 'MultiHeadDotProductAttention_0', 'query_scale_width',
     'queries scaled by 1/sqrt(width) instead of 1/sqrt(head_dim)'),
    (Numerics(out_proj='transposed'), 'MultiHeadDotProductAttention_0', 'out_projection_transposed',
     'the attention out-projection applied transposed ((H*Dh, D) kernel read as (D, H*Dh))'),
    (Numerics(qk='swapped'), 'MultiHeadDotProductAttention_0', 'swapped_qk',
     'queries and keys swapped (the key projection used as the queries and the query projection as the keys: '
     'the attention matrix comes out transposed)'),
)
TF32_MESSAGE = ('TF32 matmuls (10-bit mantissa operands: JAX\'s default precision on NVIDIA GPUs, '
                'torch.backends.*.allow_tf32)')


def round_operand(a, matmul: str) -> np.ndarray:
    """Float64 copy of float32 `a`, first rounded (to nearest even) to TF32's 10 mantissa bits if asked."""
    a = np.asarray(a, np.float32)
    if matmul == 'fp32':
        return a.astype(np.float64)
    drop = 13  # float32 keeps 23 mantissa bits, TF32 10
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)) >> drop << drop
    return (bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32).astype(np.float64)


def _mm(spec: str, a, b, nx: Numerics) -> np.ndarray:
    return np.einsum(spec, round_operand(a, nx.matmul), round_operand(b, nx.matmul), optimize=True)


def layer_norm(x, scale, bias, eps: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu(x, form: str) -> np.ndarray:
    if form == 'erf':
        from scipy.special import erf

        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(x, p: Mapping[str, np.ndarray], nx: Numerics, kv=None) -> tuple[np.ndarray, np.ndarray]:
    """The attention branch (before the residual) and its softmax weights (B, H, Q, N); keys from `kv` if given."""
    kv = x if kv is None else kv
    B, N, D = kv.shape
    q = _mm('bnd,dhk->bnhk', x, p['query/kernel'], nx) + p['query/bias']  # (B, Q, H, Dh)
    k = _mm('bnd,dhk->bnhk', kv, p['key/kernel'], nx) + p['key/bias']  # (B, N, H, Dh)
    v = _mm('bnd,dhk->bnhk', kv, p['value/kernel'], nx) + p['value/bias']  # (B, N, H, Dh)
    if nx.qk == 'swapped':
        q, k = k, q
    Dh = q.shape[-1]
    q = q / {'sqrt(Dh)': math.sqrt(Dh), 'sqrt(D)': math.sqrt(D), 'none': 1.0}[nx.query_scale]
    logits = _mm('bqhd,bkhd->bhqk', q, k, nx)  # (B, H, Q, N)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    y = _mm('bhqk,bkhd->bqhd', w, v, nx)  # (B, Q, H, Dh)
    out = p['out/kernel']  # (H, Dh, D)
    if nx.out_proj == 'transposed':
        H = out.shape[0]
        out = out.reshape(H * Dh, D).T.reshape(H, Dh, D)  # (H, Dh, D)
    return _mm('bnhk,hkd->bnd', y, out, nx) + p['out/bias'], w


def mlp(x, p: Mapping[str, np.ndarray], nx: Numerics) -> np.ndarray:
    """The MLP branch (before the residual)."""
    h = gelu(_mm('bnd,dm->bnm', x, p['Dense_0/kernel'], nx) + p['Dense_0/bias'], nx.gelu)  # (B, N, M)
    return _mm('bnm,md->bnd', h, p['Dense_1/kernel'], nx) + p['Dense_1/bias']  # (B, N, D)


def block_params(params: Mapping[str, np.ndarray], i, prefix: Optional[str] = None) -> dict[str, np.ndarray]:
    """Block i's parameters (or those under `prefix`) by short names ('LayerNorm_0/scale', 'query/kernel', ...)."""
    prefix = prefix or f'Transformer/encoderblock_{i}/'
    out = {}
    for k, v in params.items():
        if k.startswith(prefix):
            short = k[len(prefix):]
            for module in ('MultiHeadDotProductAttention_0/', 'MlpBlock_0/'):
                short = short.removeprefix(module)
            out[short] = np.asarray(v, np.float64)
    return out


def ln(p: Mapping[str, np.ndarray], which: str, x, eps: float) -> np.ndarray:
    return layer_norm(x, p[f'{which}/scale'], p[f'{which}/bias'], eps)


def block(x, p: Mapping[str, np.ndarray], nx: Numerics = OFFICIAL) -> dict[str, np.ndarray]:
    """Every sub-step of one encoder block: LayerNorm outputs, both branches, weights, output."""
    x = np.asarray(x, np.float64)
    ln0 = ln(p, 'LayerNorm_0', x, nx.ln_eps)
    att, w = attention(ln0, p, nx)
    r = x + att
    ln1 = ln(p, 'LayerNorm_1', r, nx.ln_eps)
    m = mlp(ln1, p, nx)
    return {'LayerNorm_0': ln0, 'MultiHeadDotProductAttention_0': att, 'weights': w,
            'LayerNorm_1': ln1, 'MlpBlock_0': m, 'output': r + m}


# --------------------------------------------------------------------------- the hybrid stem, with padding switches

def _pads(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
    if padding == 'symmetric':  # PyTorch's padding=k//2
        return k // 2, k // 2
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)  # TF SAME: any odd pixel at the end
    return total // 2, total - total // 2


def _conv(x, kernel, stride: int, padding: str, ws: str = 'official') -> np.ndarray:
    """Weight-standardised convolution (StdConv) of NHWC `x` with an HWIO kernel.

    ws 'official': (w - mean) / (std + 1e-5); 'timm': (w - mean) / sqrt(var + 1e-8).
    """
    kernel = np.asarray(kernel, np.float64)
    kh, kw, _, _ = kernel.shape
    centred = kernel - kernel.mean((0, 1, 2))
    if ws == 'timm':
        kernel = centred / np.sqrt(kernel.var((0, 1, 2)) + 1e-8)
    else:
        kernel = centred / (kernel.std((0, 1, 2)) + 1e-5)
    x = np.pad(x, ((0, 0), _pads(x.shape[1], kh, stride, padding), _pads(x.shape[2], kw, stride, padding), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return np.tensordot(win, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2]))


def _group_norm(x, scale, bias, groups: int = 32, eps: float = 1e-6) -> np.ndarray:
    B, h, w, C = x.shape
    g = x.reshape(B, h, w, groups, C // groups)  # (B, h, w, G, C/G)
    mean = g.mean((1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean((1, 2, 4), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(B, h, w, C) * scale + bias  # (B, h, w, C)


def _max_pool(x, padding: str) -> np.ndarray:
    pads = _pads(x.shape[1], 3, 2, padding), _pads(x.shape[2], 3, 2, padding)
    x = np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2].max((-2, -1))


@dataclasses.dataclass(frozen=True)
class StemNumerics:
    """One way of computing the hybrid ResNet; the defaults are the official numerics."""

    conv_padding: str = 'same'  # 'symmetric': PyTorch's padding=k//2
    pool_padding: str = 'same'
    ws: str = 'official'  # 'timm': StdConv2dSame's sqrt(var + 1e-8)
    gn_eps: float = 1e-6  # timm's GroupNormAct: 1e-5


STEM_ALTERNATIVES = (
    (StemNumerics(conv_padding='symmetric', pool_padding='symmetric'), 'same_padding',
     'symmetric padding (PyTorch padding=k//2) in the convolutions and max-pool where the official code pads TF '
     '`SAME` (asymmetric for stride 2: the odd pixel goes at the end)'),
    (StemNumerics(conv_padding='symmetric'), 'same_padding',
     'symmetric padding (PyTorch padding=k//2) in the convolutions where the official code pads TF `SAME`'),
    (StemNumerics(pool_padding='symmetric'), 'same_padding',
     'symmetric padding in the max-pool where the official code pads TF `SAME`'),
    (StemNumerics(ws='timm'), 'weight_standardisation',
     'weight standardisation as (w - mean) / sqrt(var + 1e-8) (timm) where the official code divides by std + 1e-5'),
    (StemNumerics(gn_eps=1e-5), 'groupnorm_eps',
     'GroupNorm eps 1e-5 (timm, PyTorch) where the official code uses 1e-6'),
)


def stem(cfg: ViTConfig, params: Mapping[str, np.ndarray], x, nx: StemNumerics = StemNumerics()) -> np.ndarray:
    """The hybrid ResNet (root and stages), NHWC."""
    conv_padding = nx.conv_padding
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    gn = lambda a, n: _group_norm(a, params[f'{n}/scale'], params[f'{n}/bias'], eps=nx.gn_eps)  # noqa: E731
    conv = lambda a, n, s: _conv(a, params[n], s, conv_padding, nx.ws)  # noqa: E731
    x = conv(np.asarray(x, np.float64), 'conv_root/kernel', 2)
    x = _max_pool(relu(gn(x, 'gn_root')), nx.pool_padding)
    for i, units in enumerate(cfg.resnet_num_layers):
        for j in range(units):
            u = f'block{i + 1}/unit{j + 1}/'
            stride = 2 if i > 0 and j == 0 else 1
            residual = x
            if f'{u}conv_proj/kernel' in params:
                residual = gn(conv(x, f'{u}conv_proj/kernel', stride), f'{u}gn_proj')
            y = relu(gn(conv(x, f'{u}conv1/kernel', 1), f'{u}gn1'))
            y = relu(gn(conv(y, f'{u}conv2/kernel', stride), f'{u}gn2'))
            y = gn(conv(y, f'{u}conv3/kernel', 1), f'{u}gn3')
            x = relu(residual + y)
    return x


# --------------------------------------------------------------------------- tests of one hypothesis

def _gap(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.isfinite(b).all():
        return math.inf
    return float(np.abs(a - b).max(initial=0.0))


def _reproduces(model_out, candidate, precision: str) -> bool:
    return _gap(model_out, candidate) <= tolerance.bound(model_out, precision)


def fit_eps(run: Callable[[float], np.ndarray], candidate, precision: str) -> Optional[tuple[float, float]]:
    """The LayerNorm eps that best reproduces `candidate`, if one reproduces it: (eps, gap).

    Common values first (transformers 1e-12, PyTorch 1e-5, 1e-3), then a search over
    log10(eps) in [-14, -1]: a grid, then golden-section refinement around the best.
    """
    for eps in (1e-12, 1e-5, 1e-3):
        out = run(eps)
        if _reproduces(out, candidate, precision):
            return eps, _gap(out, candidate)
    cost = lambda e: _gap(run(10.0 ** e), candidate)  # noqa: E731
    grid = np.arange(-14.0, -0.99, 0.5)
    best = float(grid[int(np.argmin([cost(e) for e in grid]))])
    lo, hi = best - 0.5, best + 0.5
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    ca, cb = cost(a), cost(b)
    for _ in range(20):
        if ca < cb:
            hi, b, cb = b, a, ca
            a = hi - ratio * (hi - lo)
            ca = cost(a)
        else:
            lo, a, ca = a, b, cb
            b = lo + ratio * (hi - lo)
            cb = cost(b)
    eps = 10.0 ** ((lo + hi) / 2)
    out = run(eps)
    if abs(math.log10(eps / OFFICIAL_EPS)) > 0.5 and _reproduces(out, candidate, precision):
        return eps, _gap(out, candidate)
    return None


def _eps_words(eps: float) -> str:
    known = {1e-12: ' (transformers\' default)', 1e-5: ' (PyTorch\'s default)'}
    return f'{eps:.0e}{known.get(eps, "")}' if eps in known or eps in (1e-3,) else f'~{eps:.1e}'


def _tf32_fit(official, tf32, candidate) -> bool:
    """The candidate's deviation has the size TF32 rounding gives (within a factor 2)."""
    mine, theirs = _gap(official, tf32), _gap(official, candidate)
    return mine > 0 and 0.5 <= theirs / mine <= 2.0


# --------------------------------------------------------------------------- one block

def diagnose_block(i: int, params: Mapping[str, np.ndarray], u, have: Mapping[str, np.ndarray],
                   precision: str, where_input: str) -> list[dict]:
    """Block i, fed the candidate's input `u`; `have` holds whatever the candidate returned."""
    p = block_params(params, i)
    name = f'encoderblock_{i}'
    out = []
    faithful = block(u, p)
    y = have.get(name)
    if y is not None and _reproduces(faithful['output'], y, precision):
        return [finding('inherited', name,
                        f'{name} computes as the reference does: fed the candidate\'s own input ({where_input}), '
                        'the reference block reproduces the candidate\'s output '
                        f'(gap {_gap(faithful["output"], y):.1e}); '
                        'a difference inside tolerance upstream grew here')]

    subs = {s: have[substep_key(i, s)] for s in SUBSTEPS if substep_key(i, s) in have}
    if subs:
        out += _diagnose_substeps(i, p, u, have, subs, precision)
    else:
        out += _diagnose_whole_block(i, p, u, have, faithful, precision, where_input)
    return out


def _diagnose_substeps(i, p, u, have, subs, precision) -> list[dict]:
    """Each sub-step fed the candidate's own input to it, alone."""
    out = []
    u = np.asarray(u, np.float64)
    ln0 = subs.get('LayerNorm_0', ln(p, 'LayerNorm_0', u, OFFICIAL_EPS))
    att = subs.get('MultiHeadDotProductAttention_0')
    if att is None:
        att = attention(ln0, p, OFFICIAL)[0]
    r = u + att
    ln1 = subs.get('LayerNorm_1', ln(p, 'LayerNorm_1', r, OFFICIAL_EPS))
    checks = {
        'LayerNorm_0': (lambda nx: ln(p, 'LayerNorm_0', u, nx.ln_eps), 'the block input'),
        'MultiHeadDotProductAttention_0': (lambda nx: attention(ln0, p, nx)[0], 'its LayerNorm_0 output'),
        'LayerNorm_1': (lambda nx: ln(p, 'LayerNorm_1', r, nx.ln_eps), 'the block input plus its attention branch'),
        'MlpBlock_0': (lambda nx: mlp(ln1, p, nx), 'its LayerNorm_1 output'),
    }
    weights_key = f'attention_{i}'
    for sub, (run, fed) in checks.items():
        if sub not in subs:
            continue
        got, ref = subs[sub], run(OFFICIAL)
        where = f'encoderblock_{i}/{sub}'
        if _reproduces(ref, got, precision):
            continue
        detail = ''
        if sub.startswith('MultiHead') and weights_key in have:
            same = _reproduces(attention(ln0, p, OFFICIAL)[1], have[weights_key], precision)
            detail = (' Its softmax weights reproduce, so queries and keys are right; look at the values and the '
                      'out-projection.' if same else ' Its softmax weights already differ (queries, keys, scaling).')
        starts = 'the divergence starts in' if not out else 'it also parts in'
        out.append(finding('localisation', where,
                           f'{starts} {where}: fed {fed} from the candidate, the reference '
                           f'{sub} differs from the candidate\'s by {_gap(ref, got):.1e} '
                           f'(bound {tolerance.bound(ref, precision):.1e}).{detail}'))
        out += _causes_for(sub, run, ref, got, precision, where)
    if not out:
        recomposed = r + subs.get('MlpBlock_0', mlp(ln1, p, OFFICIAL))
        y = have.get(f'encoderblock_{i}')
        if y is not None and not _reproduces(recomposed, y, precision):
            out.append(finding('localisation', f'encoderblock_{i}',
                               'every sub-step reproduces the candidate\'s, but the block output is not the input plus '
                               'both branches: look at the residual connections (pre-norm: x + f(LN(x)))'))
    return out


def _causes_for(sub, run, ref, got, precision, where) -> list[dict]:
    """Alternative numerics for one sub-step; the ones that reproduce the candidate are named."""
    out = []
    if sub.startswith('LayerNorm'):
        fit = fit_eps(lambda eps: run(Numerics(ln_eps=eps)), got, precision)
        if fit:
            out.append(_eps_finding(where, fit))
        return out
    for nx, home, cause, words in ALTERNATIVES:
        if home == sub:
            alt = run(nx)
            if _reproduces(alt, got, precision):
                out.append(finding('cause', where, f'{words}: re-running {sub} that way on the same input reproduces '
                                   f'the candidate to {_gap(alt, got):.1e} (official numerics: {_gap(ref, got):.1e})',
                                   cause))
    if not out:
        out += _tf32_finding(where, run, ref, got, precision)
    return out


def _eps_finding(where: str, fit: tuple[float, float]) -> dict:
    eps, gap = fit
    return finding('cause', where, f'LayerNorm eps {_eps_words(eps)} where the official code uses 1e-6: '
                   f'the reference LayerNorm with that eps reproduces the candidate to {gap:.1e}',
                   'layernorm_eps', eps=eps)


def _tf32_finding(where, run, ref, got, precision) -> list[dict]:
    tf32 = run(Numerics(matmul='tf32'))
    if _reproduces(tf32, got, precision):
        return [finding('cause', where, f'{TF32_MESSAGE}: re-running with TF32-rounded operands reproduces the '
                        f'candidate to {_gap(tf32, got):.1e}', 'tf32_matmul')]
    if _tf32_fit(ref, tf32, got):
        return [finding('cause', where, f'{TF32_MESSAGE} fit in size: the candidate deviates by {_gap(ref, got):.1e}, '
                        f'TF32 rounding by {_gap(ref, tf32):.1e} (not reproduced bit for bit: rounding modes and '
                        'summation order differ)', 'tf32_matmul', reproduced=False)]
    return []


def _diagnose_whole_block(i, p, u, have, faithful, precision, where_input) -> list[dict]:
    """No sub-step outputs: alternatives for the whole block, one switch at a time, then pairs."""
    name = f'encoderblock_{i}'
    y = have.get(name)
    out = []
    weights_key = f'attention_{i}'
    if weights_key in have and not _reproduces(faithful['weights'], have[weights_key], precision):
        out.append(finding('localisation', f'{name}/MultiHeadDotProductAttention_0',
                           f'the softmax weights of block {i} already differ '
                           f'({_gap(faithful["weights"], have[weights_key]):.1e}) on the candidate\'s own input: the '
                           'fault is at or before the attention logits (LayerNorm_0, queries, keys, their scaling)'))
    if y is None:
        return out or [finding('unexplained', name, f'{name} was not returned; return it to localise further')]
    gap = _gap(faithful['output'], y)
    out.insert(0, finding('localisation', name,
                          f'the divergence starts in {name}: fed the candidate\'s own input ({where_input}), the '
                          f'reference block differs from the candidate\'s output by {gap:.1e} '
                          f'(bound {tolerance.bound(faithful["output"], precision):.1e}); return the sub-step outputs '
                          f'({", ".join(substep_key(i, s) for s in SUBSTEPS[:1])}, ...) to pin the sub-step'))
    run = lambda nx: block(u, p, nx)['output']  # noqa: E731
    causes = []
    for nx, home, cause, words in ALTERNATIVES:
        alt = run(nx)
        if _reproduces(alt, y, precision):
            causes.append(finding('cause', f'{name}/{home}', f'{words}: the reference block computed that way on '
                                  f'the same input reproduces the candidate to {_gap(alt, y):.1e} '
                                  f'(official: {gap:.1e})', cause))
    if not causes:
        fit = fit_eps(lambda eps: run(Numerics(ln_eps=eps)), y, precision)
        if fit:
            causes.append(_eps_finding(f'{name}/LayerNorm_0, LayerNorm_1', fit))
    if not causes:
        causes = _pairs(name, run, y, precision)
    if not causes:
        causes = _tf32_finding(name, run, faithful['output'], y, precision)
    if not causes:
        causes.append(finding('unexplained', name, 'none of the known causes (erf GELU, LayerNorm eps, query scaling, '
                              'out-projection layout, TF32), alone or in pairs, reproduces this block'))
    return out + causes


def _pairs(name, run, y, precision) -> list[dict]:
    """Two switches at once (transformers differs in GELU and eps together)."""
    singles = [(nx, cause, words) for nx, _, cause, words in ALTERNATIVES]
    singles += [(Numerics(ln_eps=e), 'layernorm_eps', f'LayerNorm eps {_eps_words(e)}') for e in (1e-12, 1e-5)]
    pair = _pair_search(singles, OFFICIAL, run, y, precision)
    if pair is None:
        return []
    causes, gap = pair
    return [finding('cause', name, f'{w}: together with the other switch, the reference block reproduces the '
                    f'candidate to {gap:.1e}', c) for c, w in causes]


def _pair_search(singles, official, run, got, precision):
    """The first two alternatives of different causes that reproduce `got` together.

    `singles` holds (numerics, cause, words); `run(numerics)` recomputes the step that
    way. Returns ([(cause, words), (cause, words)], gap), or None when no pair does.
    """
    for (a, ca, wa), (b, cb, wb) in itertools.combinations(singles, 2):
        merged = dataclasses.replace(a, **{f.name: getattr(b, f.name) for f in dataclasses.fields(b)
                                           if getattr(b, f.name) != getattr(official, f.name)})
        if ca == cb or merged == a:
            continue
        alt = run(merged)
        if _reproduces(alt, got, precision):
            return [(ca, wa), (cb, wb)], _gap(alt, got)
    return None


# --------------------------------------------------------------------------- the layers around the blocks

def _diagnose_stem(cfg, params, x, got, precision) -> list[dict]:
    ref = stem(cfg, params, x)
    if _reproduces(ref, got, precision):
        return [finding('inherited', 'stem',
                        'the reference ResNet reproduces the candidate\'s stem from the same images')]
    out = [finding('localisation', 'stem', f'the divergence starts in the hybrid ResNet stem '
                   f'({_gap(ref, got):.1e} on the same images)')]
    for nx, cause, words in STEM_ALTERNATIVES:
        alt = stem(cfg, params, x, nx)
        if _reproduces(alt, got, precision):
            return out + [finding('cause', 'stem', f'{words}: the reference stem computed that way reproduces the '
                                  f'candidate to {_gap(alt, got):.1e}', cause)]
    pair = _pair_search(STEM_ALTERNATIVES, StemNumerics(), lambda nx: stem(cfg, params, x, nx), got, precision)
    if pair is not None:
        causes, gap = pair
        return out + [finding('cause', 'stem', f'{w}: together with the other difference, the reference stem '
                              f'reproduces the candidate to {gap:.1e}', c) for c, w in causes]
    return out + [finding('unexplained', 'stem', 'no known stem difference (padding, weight standardisation, '
                          'GroupNorm eps), alone or in pairs, reproduces it')]


def patch_embed(cfg: ViTConfig, params, features, order: str = 'rows') -> np.ndarray:
    """The patch embedding of NHWC `features` as tokens (B, N, D), in row-major or column-major grid order."""
    kernel = np.asarray(params['embedding/kernel'], np.float64)
    ph, pw, C, D = kernel.shape
    B, h, w, _ = features.shape
    gh, gw = h // ph, w // pw
    patches = np.asarray(features, np.float64)[:, :gh * ph, :gw * pw]
    patches = patches.reshape(B, gh, ph, gw, pw, C)  # (B, gh, ph, gw, pw, C)
    tokens = np.einsum('bipjqc,pqcd->bijd', patches, kernel) + params['embedding/bias']  # (B, gh, gw, D)
    if order == 'columns':
        tokens = tokens.transpose(0, 2, 1, 3)
    return tokens.reshape(B, gh * gw, D)  # (B, N, D)


def _diagnose_embedding(cfg, params, features, got, precision, fed) -> list[dict]:
    ref = patch_embed(cfg, params, features)
    if _reproduces(ref, got, precision):
        return [finding('inherited', 'embedding', f'the patch embedding reproduces the candidate from {fed}')]
    out = [finding('localisation', 'embedding', f'the divergence starts in the patch embedding: from {fed} the '
                   f'reference differs by {_gap(ref, got):.1e}')]
    alt = patch_embed(cfg, params, features, 'columns')
    if _reproduces(alt, got, precision):
        out.append(finding('cause', 'embedding', 'patch tokens in column-major grid order (flattened as (w, h)); the '
                           'official order is row-major', 'token_order'))
    return out


def resize_alternatives(raw: np.ndarray, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """The checkpoint's position embeddings resized to `cfg`'s grid by each common method."""
    import torch
    import torch.nn.functional as F

    official = weights.resize_posemb(raw, cfg.grid_size, cfg.num_prefix_tokens)
    n_tok = cfg.num_prefix_tokens
    tok, grid = raw[:, :n_tok], raw[0, n_tok:]
    gs = math.isqrt(grid.shape[0])
    t = grid.reshape(gs, gs, -1).transpose(2, 0, 1)[None]  # (1, D, gs, gs)
    t = torch.from_numpy(np.ascontiguousarray(t, np.float32))
    out = {'scipy.ndimage.zoom order=1 (the official load_pretrained)': official}
    for mode, aa in (('bilinear', False), ('bicubic', False), ('bicubic', True)):
        r = F.interpolate(t, size=cfg.grid_size, mode=mode, align_corners=False, antialias=aa)[0]
        grid_r = r.permute(1, 2, 0).reshape(1, -1, raw.shape[-1]).numpy()  # (1, N, D)
        out[f'torch {mode} (align_corners=False{", antialias" if aa else ""})'] = np.concatenate([tok, grid_r], 1)
    import scipy.ndimage

    zoom = scipy.ndimage.zoom(grid.reshape(gs, gs, -1), (cfg.grid_size[0] / gs, cfg.grid_size[1] / gs, 1), order=3)
    zoom = zoom.reshape(1, -1, raw.shape[-1])  # (1, N, D)
    out['scipy.ndimage.zoom order=3 (cubic spline)'] = np.concatenate([tok, zoom], 1)
    return out


def _diagnose_posemb(cfg, params, have, reference, precision, raw_posemb) -> list[dict]:
    emb = have.get('embedding', reference['embedding'])
    tokens = np.asarray(emb, np.float64)
    for name in ('dist_token', 'cls')[2 - cfg.num_prefix_tokens:]:  # the distillation token after the class token
        token = np.broadcast_to(params[name], (tokens.shape[0], 1, tokens.shape[-1]))
        tokens = np.concatenate([token, tokens], axis=1)
    got = np.asarray(have['with_posemb'], np.float64) - tokens  # (B, N, D): the position embeddings it added
    mine = np.broadcast_to(params[weights.POSEMB], got.shape)
    if _reproduces(mine, got, precision):
        return [finding('inherited', 'with_posemb', 'the candidate adds the same position embeddings')]
    out = [finding('localisation', 'with_posemb', 'the position embeddings the candidate adds (with_posemb minus the '
                   f'class token and patch tokens) differ from the reference\'s by {_gap(mine, got):.1e}')]
    if raw_posemb is None or raw_posemb.shape == params[weights.POSEMB].shape:
        return out
    for method, alt in resize_alternatives(raw_posemb, cfg).items():
        official = method.startswith('scipy.ndimage.zoom order=1')
        if not official and _reproduces(np.broadcast_to(alt, got.shape), got, precision):
            out.append(finding('cause', 'with_posemb', f'position embeddings resized with {method}; the official code '
                               'resizes with scipy.ndimage.zoom order=1 (bilinear, corner-aligned, on the patch grid '
                               'only): that resize reproduces the candidate\'s', 'posemb_resize', method=method))
            break
    return out


def _diagnose_encoder_norm(cfg, params, u, got, precision, fed) -> list[dict]:
    run = lambda eps: layer_norm(u, params['Transformer/encoder_norm/scale'],  # noqa: E731
                                 params['Transformer/encoder_norm/bias'], eps)
    ref = run(OFFICIAL_EPS)
    if _reproduces(ref, got, precision):
        return [finding('inherited', 'encoder_norm', f'the final LayerNorm reproduces the candidate from {fed}')]
    out = [finding('localisation', 'encoder_norm', f'the divergence starts in the final LayerNorm: from {fed} the '
                   f'reference differs by {_gap(ref, got):.1e}')]
    fit = fit_eps(run, got, precision)
    return out + ([_eps_finding('encoder_norm', fit)] if fit else [])


def _pool(cfg, params, z, classifier) -> np.ndarray:
    z = np.asarray(z, np.float64)
    if classifier == 'map':  # big_vision's MAP head: the probe attends over the tokens, then an MLP with a residual
        p = block_params(params, None, 'MAPHead_0/')
        probe = np.broadcast_to(p['probe'], (len(z), 1, z.shape[-1]))
        a = attention(probe, p, OFFICIAL, kv=z)[0]  # (B, 1, D)
        z = (a + mlp(ln(p, 'LayerNorm_0', a, OFFICIAL_EPS), p, OFFICIAL))[:, 0]
    else:
        z = z[:, 0] if classifier in ('token', 'first') else z.mean(1) if classifier == 'gap' else z
    if cfg.representation_size is not None:
        z = np.tanh(z @ params['pre_logits/kernel'] + params['pre_logits/bias'])
    return z


def _diagnose_head(cfg, params, have, reference, first, precision) -> list[dict]:
    if first == 'pre_logits':
        z = have.get('encoder_norm', reference['encoder_norm'])
        ref, got = _pool(cfg, params, z, cfg.classifier), have['pre_logits']
        if _reproduces(ref, got, precision):
            return [finding('inherited', 'pre_logits', 'pooling reproduces the candidate from its encoder_norm')]
        out = [finding('localisation', 'pre_logits', f'the divergence starts in the pooling/representation layer '
                       f'({_gap(ref, got):.1e} from the candidate\'s encoder_norm)')]
        other = {'token': 'gap', 'gap': 'token'}.get(cfg.classifier)
        if other and _reproduces(_pool(cfg, params, z, other), got, precision):
            out.append(finding('cause', 'pre_logits', f'pooled as {other!r} where the config says {cfg.classifier!r}',
                               'pooling'))
        return out
    z = np.asarray(have.get('pre_logits', reference['pre_logits']), np.float64)
    ref = z @ params['head/kernel'] + params['head/bias'] if 'head/kernel' in params else z
    if _reproduces(ref, have['logits'], precision):
        return [finding('inherited', 'logits', 'the head reproduces the candidate\'s logits from its pre_logits')]
    return [finding('localisation', 'logits', f'the divergence starts in the head ({_gap(ref, have["logits"]):.1e} '
                    'from the candidate\'s pre_logits)')]


# --------------------------------------------------------------------------- entry point

IMAGES = 2


def _worst_rows(ref, got, n: int) -> np.ndarray:
    """Indices of the (at most IMAGES) images whose tensor differs most, in batch order."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape or n <= IMAGES:
        return np.arange(min(n, IMAGES))
    per_image = np.nan_to_num(np.abs(ref - got).reshape(n, -1).max(axis=1), nan=np.inf)
    return np.sort(np.argsort(-per_image, kind='stable')[:IMAGES])


def diagnose(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, reference: Mapping[str, np.ndarray],
             candidate: Mapping[str, np.ndarray], first: str, precision: str = 'fp32',
             raw_posemb: Optional[np.ndarray] = None) -> list[dict]:
    """Findings for the first divergent tensor `first` (a forward-order name).

    `reference` holds the reference's intermediates, `candidate` the candidate's (aligned
    to the reference's layouts, any subset, plus optional sub-step outputs under
    `substep_key` names). `raw_posemb` is the checkpoint's own position embedding, for
    the resizing hypotheses. The hypotheses run on the `IMAGES` images where `first`
    differs most: enough to reproduce a cause, cheap on large models.
    """
    if first not in candidate:
        return [finding('localisation', first, f'the candidate\'s {first} has another shape than the reference\'s')]
    rows = _worst_rows(reference[first], candidate[first], len(x))
    have = {k: np.asarray(v, np.float64)[rows] for k, v in candidate.items()}
    reference = {k: np.asarray(v)[rows] for k, v in reference.items()}
    x = np.asarray(x)[rows]

    def input_of(name: str) -> tuple[np.ndarray, str]:
        if name in have:
            return have[name], f"the candidate's {name}"
        return np.asarray(reference[name], np.float64), f"the reference's {name} (the candidate did not return it)"

    if first == 'stem':
        return _diagnose_stem(cfg, params, x, have['stem'], precision)
    if first == 'embedding':
        if cfg.is_hybrid:
            features, fed = input_of('stem')
        else:
            features, fed = np.asarray(x, np.float64), 'the images'
        return _diagnose_embedding(cfg, params, features, have['embedding'], precision, fed)
    if first == 'with_posemb':
        return _diagnose_posemb(cfg, params, have, reference, precision, raw_posemb)
    m = BLOCK.match(first)
    if m:
        i = int(m.group(1))
        u, fed = input_of(f'encoderblock_{i - 1}' if i else 'with_posemb')
        return diagnose_block(i, params, u, have, precision, fed)
    if first == 'encoder_norm':
        u, fed = input_of(f'encoderblock_{cfg.num_layers - 1}')
        return _diagnose_encoder_norm(cfg, params, u, have['encoder_norm'], precision, fed)
    if first in ('pre_logits', 'logits'):
        return _diagnose_head(cfg, params, have, reference, first, precision)
    return []
