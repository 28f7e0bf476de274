"""`python -m parity grad CKPT`: one training step in both frameworks, every gradient compared.

The same batch, labels and optimizer in vit_jax (optax) and vit_torch (torch.optim);
the forward intermediates, the loss, every gradient by canonical name and every
updated parameter are compared under `parity.harness.tolerance`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from parity import cli
from parity.core import limits, weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.harness import comparison, counterparts, diagnosis, tolerance
from parity.harness.comparison import (fmt_number, layer_of, print_diagnosis, print_header, print_table, summarise,
                                       write_json)

MOMENTUM = 0.9

HELP = f"""\
One training step in both frameworks on the same batch and labels, dropout off:
softmax cross-entropy, SGD with momentum {MOMENTUM} (optax.sgd in JAX, torch.optim.SGD in
PyTorch). Compares the forward intermediates, the loss, the gradient of every parameter
by canonical name, and every parameter after the update.

Tolerance (parity.harness.tolerance): activations, loss and updated parameters within
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

    from vit_jax import runtime
    from vit_jax.checkpoint import params_from_variables, variables_from_params
    from vit_jax.model import VisionTransformer

    model = VisionTransformer(cfg)

    def loss_fn(tree):
        logits = model.apply({'params': tree}, x, train=True)  # dropout rates are 0: nothing random
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    tree = variables_from_params(params)['params']
    with runtime.matmul_precision('fp32'):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(tree)
        opt = optax.sgd(lr, momentum=MOMENTUM)
        updates, _ = opt.update(grads, opt.init(tree), tree)
        new = optax.apply_updates(tree, updates)
    return float(loss), params_from_variables({'params': grads}), params_from_variables({'params': new})


def torch_step(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray, lr: float):
    """The same step in PyTorch: torch.optim.SGD with momentum, F.cross_entropy."""
    import torch
    import torch.nn.functional as F

    from vit_torch import runtime
    from vit_torch.checkpoint import build_model, params_from_state_dict

    model = build_model(cfg, params).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    with runtime.precision('fp32', 'cpu'), torch.enable_grad():
        loss = F.cross_entropy(model(runtime.to_nchw(x, 'cpu')), torch.from_numpy(labels))
        loss.backward()
    grads = params_from_state_dict({n: p.grad if p.grad is not None else torch.zeros_like(p)
                                    for n, p in model.named_parameters()}, cfg, 'torch gradients')
    opt.step()
    return loss.item(), grads, params_from_state_dict(dict(model.named_parameters()), cfg, 'torch parameters')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """One training step in both frameworks: loss, every gradient, every updated parameter."""
    from vit_jax import runtime

    parser = comparison.parser('grad', HELP)
    cli.add_checkpoint_argument(parser)
    comparison.add_common(parser, images=False)
    parser.add_argument('--labels', metavar='L.npy', help='integer class per image (default: seeded random)')
    parser.add_argument('--lr', type=cli.positive_float, default=0.03, help='SGD learning rate (default 0.03)')
    args = parser.parse_args(argv)
    runtime.strict_float32()

    model = comparison.load_model(args, args.checkpoint)
    cfg, params = model.cfg, model.params
    if not cfg.num_classes or cfg.classifier in ('unpooled', 'token_unpooled'):
        raise UserError(f'{args.checkpoint}: grad trains a classifier; this config has {cfg.num_classes} classes '
                        f'and the {cfg.classifier!r} classifier (need a pooled one: token, gap, map or first; '
                        'classes > 0)')
    cfg = cfg.replace(dropout_rate=0.0, attention_dropout_rate=0.0)
    # Both frameworks' training steps, then a forward comparison.
    x, batch = comparison.load_batch(args, cfg, lambda n: 2 * limits.training_bytes(cfg, n)
                                     + limits.comparison_bytes(cfg, n))
    labels = load_labels(args.labels, len(x), cfg.num_classes, args.seed)

    loss_ref, grads_ref, new_ref = jax_step(cfg, params, x, labels, args.lr)
    loss_got, grads_got, new_got = torch_step(cfg, params, x, labels, args.lr)
    pol = tolerance.policy('fp32')
    order = list(weights.param_shapes(cfg))  # forward order
    grads = [tolerance.measure(k, grads_ref[k], grads_got[k], pol.grad_rtol) for k in order]
    updated = [tolerance.measure(k, new_ref[k], new_got[k], pol.rtol) for k in order]
    loss_row = tolerance.measure('loss', np.float64(loss_ref), np.float64(loss_got), pol.rtol)

    reference = comparison.run_reference(cfg, params, x)
    candidate = counterparts.run_vit_torch(cfg, params, x)
    rows, _, _, _ = comparison.compare_intermediates(reference, candidate, 'fp32')
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

    print_header('vit_torch training step, float32, TF32 off', cfg, batch + f', lr {args.lr}, momentum {MOMENTUM}',
                 [])
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
        print(f'{g["name"]:<{width}}  {fmt_number(g["max_abs_diff"]):>12}  {fmt_number(g["rel_diff"]):>9}  '
              f'{fmt_number(g["cosine"], ".7f"):>10}  {fmt_number(u["max_abs_diff"]):>14}  {mark}')
