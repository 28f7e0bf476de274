"""`python -m parity compare | verify | grad`: where two implementations part ways, layer by layer.

The reference is always vit_jax in float32 at JAX's highest matmul precision. The
candidate is vit_torch at `--precision` (or the `--against` counterpart) for `compare`,
your function for `verify`, and vit_torch's training step for `grad`. Every
intermediate is compared in forward order under `parity.tolerance`; the first one out
of tolerance is the first divergence, and `parity.diagnosis` says where inside it the
difference starts and which known cause reproduces it. Exit 0 when everything is within
tolerance, 1 when not, 2 for a user error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from parity import cli, counterparts, diagnosis, files, images, tolerance, weights
from parity.config import ViTConfig
from parity.errors import UserError

MOMENTUM = 0.9
REFERENCE = 'vit_jax, float32 at highest matmul precision'


# --------------------------------------------------------------------------- arguments and inputs

def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f'python -m parity {command}', description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_common(parser: argparse.ArgumentParser, images: bool = True) -> None:
    cli.add_config_argument(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--input', metavar='X.npy', help='float32 images, NHWC, in [-1, 1]')
    if images:
        source.add_argument('--images', metavar='DIR', help='a folder of .jpg/.jpeg/.png images, resized (bilinear) '
                            'to the model resolution and scaled to [-1, 1]')
    source.add_argument('--random', type=int, metavar='N', help='N seeded uniform [-1, 1] images (the default: 2)')
    parser.add_argument('--seed', type=int, default=0, help='seed for --random (default 0)')
    parser.add_argument('--image-size', type=int, metavar='N',
                        help="build the model at NxN, resizing the position embeddings from the checkpoint's grid "
                             "(default: the checkpoint's own resolution)")
    parser.add_argument('--json', metavar='OUT.json', help='also write the comparison as JSON')


def _add_precision(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument('--precision', choices=tolerance.PRECISIONS, default='fp32', help=what)


def load_batch(args: argparse.Namespace, cfg: ViTConfig) -> tuple[np.ndarray, str]:
    """The batch the command runs on, and how to describe it."""
    if args.input is not None:
        x = cli.load_input(args.input, cfg)
        return x, f'{len(x)} images from {args.input}'
    if getattr(args, 'images', None) is not None:
        x = images.load_images(images.images_in(args.images), cfg.image_size)
        return x, f'{len(x)} images from {args.images}'
    n = 2 if args.random is None else args.random
    if n < 1:
        raise UserError(f'--random {n}: need at least one image')
    x = np.random.default_rng(args.seed).uniform(-1, 1, (n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return x, f'{n} random images (seed {args.seed})'


def _strict_jax() -> None:
    import jax

    jax.config.update('jax_default_matmul_precision', 'highest')


def run_reference(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, attention: bool = False
                  ) -> dict[str, np.ndarray]:
    """vit_jax's named intermediates, float32 at highest precision."""
    import jax

    from vit_jax.inspect import forward_with_intermediates
    from vit_jax.model import VisionTransformer

    with jax.default_matmul_precision('highest'):
        return forward_with_intermediates(VisionTransformer(cfg), params, x, attention=attention)


def jax_at(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, precision: str) -> np.ndarray:
    """vit_jax's logits at a reduced precision: bf16 compute dtype, or JAX's default matmul precision."""
    import jax
    import jax.numpy as jnp

    from vit_jax.checkpoint import variables_from_params
    from vit_jax.model import VisionTransformer

    dtype = jnp.bfloat16 if precision == 'bf16' else jnp.float32
    with jax.default_matmul_precision('highest' if precision == 'fp32' else 'default'):
        return np.asarray(VisionTransformer(cfg, dtype=dtype).apply(variables_from_params(params), x), np.float32)


# --------------------------------------------------------------------------- comparing

def compare_intermediates(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
                          precision: str) -> tuple[list[dict], list[dict], dict, list[str]]:
    """Rows for every reference intermediate the candidate has, in forward order.

    Returns (rows, not_compared, the candidate aligned to the reference's layouts, notes).
    Convention-only layout differences (an NCHW stem, an unflattened patch grid) are read
    as such and noted (`counterparts.align`); other shapes are not compared, except the
    logits, which must compare.
    """
    rtol = tolerance.policy(precision).rtol
    rows, skipped, aligned, notes = [], [], {}, []
    for name, ref in reference.items():
        if name not in candidate:
            skipped.append({'name': name, 'reason': 'not returned'})
            continue
        got, note = counterparts.align(name, ref.shape, candidate[name])
        if note:
            notes.append(note)
        if got is None and name != 'logits':
            skipped.append({'name': name, 'reason': note})
            continue
        row = tolerance.measure(name, ref, candidate[name] if got is None else got, rtol)
        rows.append(row)
        if got is not None:
            aligned[name] = got
    return rows, skipped, aligned, notes


def layer_of(name: str) -> str:
    """Attention weights belong to their block: first_divergence names layers."""
    m = re.match(r'^attention_(\d+)$', name)
    return f'encoderblock_{m.group(1)}' if m else name


def summarise(rows: list[dict], reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
              precision: str) -> dict:
    """The verdict and the JSON fields around it."""
    pol = tolerance.policy(precision)
    bad = [r for r in rows if not r['ok']]
    ref_logits, got_logits = reference['logits'], candidate.get('logits')
    logits_row = next((r for r in rows if r['name'] == 'logits'), None)
    top1 = tolerance.topk_agreement(ref_logits, got_logits, 1) if got_logits is not None else None
    top5 = tolerance.topk_agreement(ref_logits, got_logits, 5) if got_logits is not None else None
    flips = tolerance.top1_disagreements(ref_logits, got_logits, precision) if got_logits is not None else None
    ok = not bad and logits_row is not None and (not pol.top1_verdict or flips == 0)
    return {
        'first_divergence': layer_of(bad[0]['name']) if bad else None,
        'first_divergent_tensor': bad[0]['name'] if bad else None,
        'max_abs_logit_diff': logits_row['max_abs_diff'] if logits_row else None,
        'top1_agreement': top1,
        'top5_agreement': top5,
        'top1_disagreements': flips,
        'ok': ok,
    }


# --------------------------------------------------------------------------- reporting

def _shape(row: dict) -> str:
    return '(' + ', '.join(map(str, row['shape'])) + ')'


def _num(v, fmt: str = '.2e') -> str:
    return '-' if v is None else format(v, fmt)


def print_table(rows: list[dict], first: Optional[str]) -> None:
    width = max([len(r['name']) for r in rows] + [4])
    shape_w = max([len(_shape(r)) for r in rows] + [5])
    print(f'{"name":<{width}}  {"shape":<{shape_w}}  {"max-abs":>9}  {"relative":>9}  {"cosine":>10}  {"bound":>9}')
    for r in rows:
        mark = 'ok' if r['ok'] else 'FAIL'
        if r['name'] == first:
            mark += '   <- first divergence'
        extra = f'  (candidate shape {tuple(r["candidate_shape"])})' if 'candidate_shape' in r else ''
        extra += f'  ({r["note"]})' if 'note' in r else ''
        print(f'{r["name"]:<{width}}  {_shape(r):<{shape_w}}  {_num(r["max_abs_diff"]):>9}  '
              f'{_num(r["rel_diff"]):>9}  {_num(r["cosine"], ".7f"):>10}  {r["bound"]:>9.1e}  {mark}{extra}')


def _fraction(v: Optional[float], n: int) -> str:
    return 'n/a' if v is None else f'{round(v * n)}/{n} ({v:.0%})'


def print_verdict(summary: dict, precision: str, n: int) -> None:
    pol = tolerance.policy(precision)
    if summary['ok']:
        print(f'verdict: PASS ({pol.what})')
    elif summary['first_divergence']:
        tensor = summary['first_divergent_tensor']
        detail = f' ({tensor})' if tensor != summary['first_divergence'] else ''
        print(f'verdict: FAIL: first divergence at {summary["first_divergence"]}{detail} under {pol.what}')
    else:
        print(f'verdict: FAIL: top-1 classes disagree on {summary["top1_disagreements"]} of {n} images '
              f'(ties within the logit bound excused; {pol.what})')
    print(f'top-1 agreement {_fraction(summary["top1_agreement"], n)}, top-5 agreement '
          f'{_fraction(summary["top5_agreement"], n)}, max-abs logit difference {_num(summary["max_abs_logit_diff"])}')


def print_diagnosis(findings: list[dict]) -> None:
    if findings:
        print('diagnosis:')
        for f in findings:
            print(f'  [{f["kind"]}{": " + f["cause"] if f["cause"] else ""}] {f["message"]}')


def write_json(path: Optional[str], payload: dict) -> None:
    """Atomically, with NaN/inf written as null (JSON has neither)."""
    if path is None:
        return

    def clean(v):
        if isinstance(v, float):
            return v if np.isfinite(v) else None
        if isinstance(v, (np.floating, np.integer)):
            return clean(v.item())
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    files.write_text(path, json.dumps(clean(payload), indent=1), '--json')


def _print_header(candidate: str, cfg: ViTConfig, batch: str, notes: Sequence[str]) -> None:
    print(f'reference  {REFERENCE}')
    print(f'candidate  {candidate}')
    print(f'model      {cli.describe(cfg)}; {batch}')
    for note in notes:
        print(f'note       {note}')
    print()


def conclude(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, reference: dict, candidate: dict,
             precision: str, label: str, batch: str, notes: list[str], json_path: Optional[str],
             raw_posemb: Optional[Callable[[], np.ndarray]] = None, extra: Optional[dict] = None) -> int:
    """Compare, judge, diagnose, print and write JSON; the exit code."""
    rows, skipped, aligned, align_notes = compare_intermediates(reference, candidate, precision)
    notes = notes + align_notes
    summary = summarise(rows, reference, aligned, precision)
    findings = []
    if summary['first_divergent_tensor']:
        first = summary['first_divergent_tensor']
        subs = {k: v for k, v in candidate.items() if k not in reference and k.startswith('Transformer/')}
        findings = diagnosis.diagnose(cfg, params, x, reference, {**aligned, **subs}, first, precision,
                                      raw_posemb() if raw_posemb and first == 'with_posemb' else None)
    _print_header(label, cfg, batch, notes)
    print_table(rows, summary['first_divergent_tensor'])
    for s in skipped:
        print(f'{s["name"]}: not compared ({s["reason"]})')
    for line in (extra or {}).get('lines', []):
        print(line)
    print_verdict(summary, precision, len(x))
    print_diagnosis(findings)
    payload = {
        'first_divergence': summary['first_divergence'],
        'activations': [{k: r[k] for k in ('name', 'shape', 'max_abs_diff', 'rel_diff', 'cosine', 'bound', 'ok',
                                            'candidate_shape', 'note') if k in r} for r in rows],
        'max_abs_logit_diff': summary['max_abs_logit_diff'],
        'top1_agreement': summary['top1_agreement'],
        'diagnosis': findings,
        'first_divergent_tensor': summary['first_divergent_tensor'],
        'top5_agreement': summary['top5_agreement'],
        'ok': summary['ok'],
        'precision': precision,
        'tolerance': tolerance.policy(precision).what,
        'reference': REFERENCE,
        'candidate': label,
        'config': cli.describe(cfg),
        'batch': batch,
        'not_compared': skipped,
        'notes': notes,
        **{k: v for k, v in (extra or {}).items() if k != 'lines'},
    }
    write_json(json_path, payload)
    return 0 if summary['ok'] else 1


# --------------------------------------------------------------------------- compare

COMPARE_HELP = f"""\
Runs one checkpoint through the reference ({REFERENCE})
and a candidate, and compares every named intermediate in forward order: stem, embedding,
with_posemb, encoderblock_i (attention_i with --attention), encoder_norm, pre_logits, logits.

The candidate is vit_torch at --precision (fp32: TF32 off; tf32: TF32 matmuls and
convolutions; bf16: torch.autocast to bfloat16), or with --against, timm's model loaded
by timm's own npz loader (timm:MODEL_NAME) or transformers' ViT after conversion (hf),
each with its library's default numerics. The reference stays float32 at highest
precision, so a tf32/bf16 run measures what the reduced precision costs; vit_jax at
the same reduced precision is shown as a yardstick.

Tolerance (parity.tolerance): fp32 within 1e-5 x max(1, max |reference|) per tensor;
tf32 1e-2 and bf16 1e-1 of the same, where the verdict rests on top-1 agreement.
Exit 0 when all is within tolerance, 1 when not, 2 for a user error."""


def _against(spec: Optional[str]) -> Optional[tuple[str, Optional[str]]]:
    if spec is None:
        return None
    if spec == 'hf':
        return 'hf', None
    if spec.startswith('timm:') and len(spec) > 5:
        return 'timm', spec[5:]
    raise UserError(f'--against {spec}: expected timm:MODEL_NAME (e.g. timm:vit_base_patch16_224) or hf')


def compare_main(argv: Optional[Sequence[str]] = None) -> int:
    """One checkpoint through vit_jax and vit_torch (or timm, transformers), layer by layer."""
    parser = _parser('compare', COMPARE_HELP)
    parser.add_argument('checkpoint', metavar='CKPT.npz', help='checkpoint in the released (or linen) npz layout')
    _add_common(parser)
    _add_precision(parser, 'the candidate\'s precision (the reference is always fp32): fp32, tf32 or bf16')
    parser.add_argument('--against', metavar='timm:MODEL|hf',
                        help='compare against timm (its own npz loader) or transformers instead of vit_torch')
    parser.add_argument('--attention', action='store_true', help='also compare the softmax weights of every block')
    args = parser.parse_args(argv)
    against = _against(args.against)
    _strict_jax()

    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    x, batch = load_batch(args, cfg)
    notes = []
    device = counterparts.torch_device()
    if args.precision == 'tf32' and device == 'cpu':
        notes.append('no TF32 on CPU: --precision tf32 computes exactly as fp32 here')
    if against is None:
        label = f'vit_torch, {args.precision} ({device})'
        candidate = counterparts.run_vit_torch(cfg, params, x, args.precision, args.attention)
    elif against[0] == 'timm':
        label = f'timm {against[1]}, {args.precision} ({device})'
        notes += counterparts.timm_notes(against[1])
        candidate = counterparts.run_timm(against[1], cfg, weights.load_npz(args.checkpoint), x, args.precision,
                                          args.attention)
    else:
        label = f'transformers ViTForImageClassification, {args.precision} ({device})'
        counterparts.check_hf_expressible(cfg)
        notes += counterparts.hf_notes(cfg)
        candidate = counterparts.run_hf(cfg, params, x, args.precision, args.attention)
    reference = run_reference(cfg, params, x, args.attention)

    extra = {}
    if args.precision != 'fp32':
        yard = jax_at(cfg, params, x, args.precision)
        diff = float(np.abs(yard - reference['logits']).max())
        top1 = tolerance.topk_agreement(reference['logits'], yard, 1)
        extra = {'yardstick': {'what': f'vit_jax at {args.precision} vs the reference', 'max_abs_logit_diff': diff,
                               'top1_agreement': top1},
                 'lines': [f'yardstick: vit_jax itself at {args.precision}: max-abs logit difference {diff:.2e}, '
                           f'top-1 agreement {_fraction(top1, len(x))}']}
    raw_posemb = lambda: weights.load_npz(args.checkpoint)[weights.POSEMB]  # noqa: E731
    return conclude(cfg, params, x, reference, candidate, args.precision, label, batch, notes, args.json,
                    raw_posemb=raw_posemb, extra=extra)


# --------------------------------------------------------------------------- verify

VERIFY_HELP = f"""\
Verifies your own ViT implementation, in any framework, against the reference
({REFERENCE}).

FILE.py is loaded from its path; FUNCTION(params, x) receives `params`, a dict from the
canonical '/'-joined linen names (Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel,
...) to float32 NumPy arrays, position embeddings already at the model resolution, and
`x`, float32 NHWC images in [-1, 1]. It returns a dict holding any of: stem (NHWC),
embedding (B, N, D), with_posemb, encoderblock_i, attention_i (B, H, N, N), encoder_norm,
pre_logits, logits -- logits at least. Values may be NumPy, torch or JAX arrays of any
float dtype. Optional sub-step outputs let the diagnosis pin a fault inside a block:
Transformer/encoderblock_i/LayerNorm_0, .../MultiHeadDotProductAttention_0 (the attention
branch before its residual), .../LayerNorm_1, .../MlpBlock_0 (the MLP branch).

Example: python -m parity verify examples/numpy_vit.py:vit --checkpoint ckpt.npz --input x.npy
Exit 0 when everything returned is within tolerance, 1 when not, 2 for a user error."""


def verify_main(argv: Optional[Sequence[str]] = None) -> int:
    """Your own implementation against vit_jax, layer by layer."""
    parser = _parser('verify', VERIFY_HELP)
    parser.add_argument('function', metavar='FILE.py:FUNCTION', help='your forward pass: FUNCTION(params, x) -> dict')
    parser.add_argument('--checkpoint', required=True, metavar='CKPT.npz', help='checkpoint in the released npz layout')
    _add_common(parser)
    _add_precision(parser, 'the precision your implementation computes in, which picks the tolerance (default fp32)')
    args = parser.parse_args(argv)
    _strict_jax()

    fn = counterparts.load_function(args.function)
    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    x, batch = load_batch(args, cfg)
    candidate, notes = counterparts.run_function(fn, args.function, params, x)
    known = set(counterparts.known_names(cfg))
    for name in [k for k in candidate if k not in known]:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        notes.append(f'{name!r} is not an intermediate of this model; ignored'
                     + (f' (did you mean {close[0]!r}?)' if close else ''))
        del candidate[name]
    reference = run_reference(cfg, params, x, attention=any(k.startswith('attention_') for k in candidate))
    raw_posemb = lambda: weights.load_npz(args.checkpoint)[weights.POSEMB]  # noqa: E731
    return conclude(cfg, params, x, reference, candidate, args.precision, args.function, batch, notes, args.json,
                    raw_posemb=raw_posemb)


# --------------------------------------------------------------------------- grad

GRAD_HELP = f"""\
One training step in both frameworks on the same batch and labels, dropout off:
softmax cross-entropy, SGD with momentum {MOMENTUM} (optax.sgd in JAX, torch.optim.SGD in
PyTorch). Compares the forward intermediates, the loss, the gradient of every parameter
by canonical name, and every parameter after the update.

Tolerance (parity.tolerance): activations, loss and updated parameters within
1e-5 x max(1, max |reference|); gradients within 1e-4 x max(1, max |reference gradient|).
Exit 0 when all is within tolerance, 1 when not, 2 for a user error."""


def load_labels(path: Optional[str], n: int, num_classes: int, seed: int) -> np.ndarray:
    """Integer class per image from --labels, or seeded random ones."""
    if path is None:
        return np.random.default_rng(seed + 1).integers(0, num_classes, n)
    y = cli.read_npy(path, '--labels')
    if y.dtype.kind not in 'iu' or y.shape != (n,):
        raise UserError(f'--labels {path}: expected {n} integer class indices, shape ({n},), found {y.dtype} {y.shape}')
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f'--labels {path}: class indices must lie in [0, {num_classes}), found {y.min()}..{y.max()}')
    return y.astype(np.int64)


def jax_step(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray, lr: float):
    """(loss, gradients, updated params) of one optax SGD-momentum step, canonical names."""
    import jax
    import optax

    from vit_jax.checkpoint import params_from_variables, variables_from_params
    from vit_jax.model import VisionTransformer

    model = VisionTransformer(cfg)

    def loss_fn(tree):
        logits = model.apply({'params': tree}, x, train=True)  # dropout rates are 0: nothing random
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tree = variables_from_params(params)['params']
    with jax.default_matmul_precision('highest'):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(tree)
        opt = optax.sgd(lr, momentum=MOMENTUM)
        updates, _ = opt.update(grads, opt.init(tree), tree)
        new = optax.apply_updates(tree, updates)
    return float(loss), params_from_variables({'params': grads}), params_from_variables({'params': new})


def torch_step(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray, lr: float):
    """The same step in PyTorch: torch.optim.SGD with momentum, F.cross_entropy."""
    import torch
    import torch.nn.functional as F

    from vit_torch.checkpoint import build_model, params_from_state_dict

    model = build_model(cfg, params).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    with counterparts.torch_precision('fp32', 'cpu'), torch.enable_grad():
        loss = F.cross_entropy(model(torch.from_numpy(x).permute(0, 3, 1, 2)), torch.from_numpy(labels))
        loss.backward()
    grads = params_from_state_dict({n: p.grad if p.grad is not None else torch.zeros_like(p)
                                    for n, p in model.named_parameters()}, cfg, 'torch gradients')
    opt.step()
    return loss.item(), grads, params_from_state_dict(dict(model.named_parameters()), cfg, 'torch parameters')


def grad_main(argv: Optional[Sequence[str]] = None) -> int:
    """One training step in both frameworks: loss, every gradient, every updated parameter."""
    parser = _parser('grad', GRAD_HELP)
    parser.add_argument('checkpoint', metavar='CKPT.npz', help='checkpoint in the released (or linen) npz layout')
    _add_common(parser, images=False)
    parser.add_argument('--labels', metavar='L.npy', help='integer class per image (default: seeded random)')
    parser.add_argument('--lr', type=float, default=0.03, help='SGD learning rate (default 0.03)')
    args = parser.parse_args(argv)
    _strict_jax()

    cfg, params = cli.load_checkpoint(args.checkpoint, args.config, args.image_size)
    if not cfg.num_classes or cfg.classifier not in ('token', 'gap'):
        raise UserError(f'{args.checkpoint}: grad trains a classifier; this config has {cfg.num_classes} classes '
                        f'and the {cfg.classifier!r} classifier (need token or gap, classes > 0)')
    cfg = cfg.replace(dropout_rate=0.0, attention_dropout_rate=0.0)
    x, batch = load_batch(args, cfg)
    labels = load_labels(args.labels, len(x), cfg.num_classes, args.seed)

    loss_ref, grads_ref, new_ref = jax_step(cfg, params, x, labels, args.lr)
    loss_got, grads_got, new_got = torch_step(cfg, params, x, labels, args.lr)
    pol = tolerance.policy('fp32')
    order = list(weights.param_shapes(cfg))  # forward order
    grads = [tolerance.measure(k, grads_ref[k], grads_got[k], pol.grad_rtol) for k in order]
    updated = [tolerance.measure(k, new_ref[k], new_got[k], pol.rtol) for k in order]
    loss_row = tolerance.measure('loss', np.float64(loss_ref), np.float64(loss_got), pol.rtol)

    reference = run_reference(cfg, params, x)
    candidate = counterparts.run_vit_torch(cfg, params, x)
    rows, _, _, _ = compare_intermediates(reference, candidate, 'fp32')
    forward_bad = next((r['name'] for r in rows if not r['ok']), None)
    # Errors flow back from the loss: the divergent gradient nearest the loss is where the backward pass parts.
    origin = next((f'grad/{r["name"]}' for r in reversed(grads) if not r['ok']), None)
    first = (layer_of(forward_bad) if forward_bad else 'loss' if not loss_row['ok'] else origin
             or next((f'updated/{r["name"]}' for r in updated if not r['ok']), None))
    findings = []
    if forward_bad:
        findings = diagnosis.diagnose(cfg, params, x, reference, candidate, forward_bad)
    elif origin:
        findings = [diagnosis.finding('localisation', origin, f'the forward pass and loss agree; the backward pass '
                                      f'parts first (nearest the loss) at {origin[5:]}')]

    _print_header('vit_torch training step, float32, TF32 off', cfg, batch + f', lr {args.lr}, momentum {MOMENTUM}', [])
    print_table(rows, forward_bad)
    print(f'\nloss: reference {loss_ref:.7f}  candidate {loss_got:.7f}  difference {loss_row["max_abs_diff"]:.2e}  '
          f'{"ok" if loss_row["ok"] else "FAIL"}\n')
    _print_grad_table(grads, updated, origin)
    ok = first is None
    print(f'verdict: {"PASS" if ok else "FAIL: first divergence at " + first} '
          f'(activations, loss and updates within 1e-5, gradients within 1e-4, x max(1, max |reference|))')
    print_diagnosis(findings)
    summary = summarise(rows, reference, candidate, 'fp32')
    write_json(args.json, {
        'first_divergence': first,
        'activations': rows,
        'max_abs_logit_diff': summary['max_abs_logit_diff'],
        'top1_agreement': summary['top1_agreement'],
        'diagnosis': findings,
        'loss': {'reference': loss_ref, 'candidate': loss_got, 'abs_diff': loss_row['max_abs_diff'],
                 'ok': loss_row['ok']},
        'gradients': grads,
        'updated_params': updated,
        'ok': ok,
        'lr': args.lr,
        'momentum': MOMENTUM,
        'labels': labels.tolist(),
        'config': cli.describe(cfg),
        'batch': batch,
    })
    return 0 if ok else 1


def _print_grad_table(grads: list[dict], updated: list[dict], origin: Optional[str]) -> None:
    width = max(len(r['name']) for r in grads)
    print(f'{"parameter":<{width}}  {"grad max-abs":>12}  {"relative":>9}  {"cosine":>10}  {"update max-abs":>14}')
    for g, u in zip(grads, updated):
        mark = 'ok' if g['ok'] and u['ok'] else 'FAIL'
        if origin == f'grad/{g["name"]}':
            mark += '   <- first divergence (nearest the loss)'
        print(f'{g["name"]:<{width}}  {_num(g["max_abs_diff"]):>12}  {_num(g["rel_diff"]):>9}  '
              f'{_num(g["cosine"], ".7f"):>10}  {_num(u["max_abs_diff"]):>14}  {mark}')
