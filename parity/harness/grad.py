"""`python -m parity grad CKPT`: one training step in both frameworks, every gradient compared.

The same batch, labels and optimizer in vit_jax (optax) and vit_torch (torch.optim);
the forward intermediates, the loss, every gradient by canonical name and every
updated parameter are compared under `parity.harness.tolerance`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from parity import cli
from parity.core import limits, weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.harness import counterparts, diagnosis, tolerance, verdict
from parity.harness.verdict import (
    fmt_number,
    layer_of,
    print_diagnosis,
    print_header,
    print_table,
    summarise,
    write_json_report,
)

MOMENTUM = 0.9

HELP = f"""\
N training steps (default 1) in both frameworks on the same batch and labels, dropout off,
at a constant learning rate: softmax cross-entropy (with --label-smoothing), optionally
distilled from --teacher, and SGD with momentum {MOMENTUM}, AdamW or Adam (--optimizer; decoupled
--weight-decay on kernels only). The flags grad shares with vit_jax train are train's own
declarations: they take the same values, with the same defaults. JAX runs vit_jax.objective's optimizer and
objective (optax), PyTorch vit_torch.objective's (torch.optim). After every step it compares
the loss, the gradient of every parameter by canonical name and every updated parameter;
the forward intermediates are compared once. Each step starts both sides from the same
parameters (PyTorch's), and the reference optimizer is fed PyTorch's gradients: rounding
does not compound, and Adam, which divides by the gradient's size, cannot blow rounding up
where the exact gradient is zero (the attention's key bias).

When the steps part, the diagnosis reruns the JAX side with each known PyTorch habit and
names the one that reproduces the candidate: torch's AdamW decaying every parameter (no
parameter groups), Adam's epsilon inside the square root, label smoothing spread over the
C - 1 other classes, a KL divergence averaged per element instead of per example.

Tolerance (parity.harness.tolerance): activations, loss and updated parameters within
1e-5 x max(1, max |reference|); gradients within 1e-4 x max(1, max |reference gradient|).
Exit 0 when all is within tolerance, 1 when not, 2 for a user error."""


# The flags grad shares with `vit_jax train`: the same declarations (`vit_jax.settings.FLAGS`), so the two
# accept the same values. Its own `--steps` is the number of steps it compares.
SHARED_FLAGS = ('lr', 'optimizer', 'weight_decay', 'label_smoothing', 'teacher', 'teacher_config', 'distill',
                'distill_alpha', 'distill_temperature')


def step_settings(args, teachers: int):
    """The settings both sides run (a `vit_jax.settings.TrainSettings`): the shared flags given, the
    declared defaults for the others, a constant learning rate and no clipping."""
    from vit_jax import settings

    given = {name: getattr(args, name) for name in SHARED_FLAGS if name not in ('teacher', 'teacher_config')
             and getattr(args, name) is not None}
    given['distill_alpha'] = settings.given(args, 'distill_alpha') if teachers else 0.0
    return settings.TrainSettings(**given, steps=args.steps, warmup_steps=0, schedule='constant', grad_clip=0.0,
                                  teacher_weights=settings.teacher_weights(None, teachers))


# The known differences between a PyTorch habit and the JAX step, each a way to rerun the JAX side.
DEVIATIONS = {
    'decay_all': "torch's AdamW decays every parameter unless given parameter groups: biases, LayerNorms, the "
                 'class token and the position embeddings shrink too (give it the kernels alone, as '
                 'vit_torch.objective.param_groups does)',
    'eps_inside': "Adam's epsilon sits inside the square root, sqrt(v + eps), where optax and torch put it outside, "
                  'sqrt(v) + eps',
    'smoothing_others': 'label smoothing spreads eps over the C - 1 other classes, (1 - eps) onehot + eps / (C - 1) '
                        'elsewhere, where torch and optax give every class eps / C',
    'kl_mean': "the KL divergence is averaged over every element (reduction='mean', sum / numel), which divides it "
               "by the class count; DeiT's is per example (reduction='batchmean')",
}


def applicable(s, teachers: int) -> list[str]:
    """The deviations that could change the steps of settings `s`."""
    out = []
    if s.optimizer in ('adamw', 'adam'):
        out += ['decay_all'] * bool(s.weight_decay) + ['eps_inside']
    if s.label_smoothing:
        out.append('smoothing_others')
    if teachers and s.distill == 'soft' and s.distill_alpha:
        out.append('kl_mean')
    return out


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


Step = tuple[float, dict, dict]  # (loss, gradients, updated params), canonical names


def jax_steps(cfg: ViTConfig, x: np.ndarray, labels: np.ndarray, s, teachers: Sequence,
              candidate: Sequence['TorchStep'], deviation: Optional[str] = None) -> list[Step]:
    """The reference for each of the candidate's steps: `vit_jax.objective`'s objective and optimizer (optax), or
    one `DEVIATIONS` variant.

    Step k starts from the candidate's parameters before its step k, so rounding never
    compounds across steps; the loss and gradients are JAX's own there, and the optimizer
    is fed the candidate's gradients (its state carried from step to step), so its update
    is checked on the same input: Adam divides by the gradient's own size and would
    otherwise blow rounding up where the exact gradient is zero (the attention's key bias).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from vit_jax import objective, runtime, train
    from vit_jax.model import VisionTransformer
    from vit_jax.params import params_from_variables, variables_from_params

    model = VisionTransformer(cfg)
    obj = objective.Objective.from_settings(s)
    C = cfg.num_classes
    tx, _ = objective.make_optimizer(dataclasses.replace(s, weight_decay_on='all') if deviation == 'decay_all' else s,
                                     eps_root=1e-8 if deviation == 'eps_inside' else 0.0)
    y = jnp.asarray(labels)
    target = objective.targets(obj, y, C) if obj.soft_targets else None
    if obj.soft_targets and deviation == 'smoothing_others':
        onehot = jax.nn.one_hot(y, C)
        eps = s.label_smoothing
        target = onehot * (1 - eps) + (1 - onehot) * eps / (C - 1)

    with runtime.matmul_precision('fp32'):
        said = train.teachers_forward(teachers)([variables_from_params(t.params)['params'] for t in teachers], x)

        def loss_fn(tree):
            logits = model.apply({'params': tree}, x, train=True)  # dropout rates are 0: nothing random
            loss, distill = objective.objective_loss(obj, logits, y, target, said)
            if deviation == 'kl_mean':
                base, _ = objective.objective_loss(obj, logits, y, target)
                loss = (1 - obj.distill_alpha) * base + obj.distill_alpha * distill / C
            return loss

        grad_fn = jax.jit(jax.value_and_grad(loss_fn))

        @jax.jit
        def update(tree, grads, state):
            updates, state = tx.update(grads, state, tree)
            return optax.apply_updates(tree, updates), state

        tree = lambda p: variables_from_params(p)['params']  # noqa: E731
        state = tx.init(tree(candidate[0].before))
        out = []
        for step in candidate:
            loss, grads = grad_fn(tree(step.before))
            after, state = update(tree(step.before), tree(step.grads), state)
            out.append((float(loss), params_from_variables({'params': grads}),
                        params_from_variables({'params': after})))
    return out


@dataclasses.dataclass
class TorchStep:
    """One candidate step: the parameters it started from, its loss, its gradients, the parameters after."""

    before: dict
    loss: float
    grads: dict
    after: dict

    def as_step(self) -> Step:
        return self.loss, self.grads, self.after


def torch_steps(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray,
                s, teachers: Sequence = (), groups: Optional[Callable] = None) -> list[TorchStep]:
    """`s.steps` steps in PyTorch through `vit_torch.objective` (`groups(model)`: other parameter groups)."""
    import torch

    from vit_torch import objective, runtime
    from vit_torch.params import build_model, params_from_state_dict

    model = build_model(cfg, params).train()
    opt = objective.Optimizer(model, cfg, s, groups=groups(model) if groups else None)
    obj = objective.Objective.from_settings(s)
    images, y = runtime.to_nchw(x, 'cpu'), torch.from_numpy(labels)
    # Copies: the optimizer updates parameters and gradients in place.
    snapshot = lambda tensors, what: params_from_state_dict(  # noqa: E731
        {n: t.detach().clone() for n, t in tensors.items()}, cfg, what)
    out = []
    with runtime.precision('fp32', 'cpu'):
        with torch.no_grad():
            said = [build_model(t.cfg, t.params)(runtime.to_nchw(x, 'cpu')) for t in teachers]
        for _ in range(s.steps):
            before = snapshot(dict(model.named_parameters()), 'torch parameters')
            opt.zero_grad()
            with torch.enable_grad():
                loss, _ = objective.objective_loss(obj, model(images), y, None, said)
                loss.backward()
            grads = snapshot({n: p.grad for n, p in model.named_parameters()}, 'torch gradients')
            opt.step()
            out.append(TorchStep(before, loss.item(), grads,
                                 snapshot(dict(model.named_parameters()), 'torch parameters')))
    return out


def compare_step(cfg: ViTConfig, ref: Step, got: Step) -> tuple[dict, list[dict], list[dict]]:
    """(loss row, gradient rows, updated-parameter rows) of one step, in forward order."""
    pol = tolerance.policy('fp32')
    order = list(weights.param_shapes(cfg))
    return (tolerance.measure('loss', np.float64(ref[0]), np.float64(got[0]), pol.rtol),
            [tolerance.measure(k, ref[1][k], got[1][k], pol.grad_rtol) for k in order],
            [tolerance.measure(k, ref[2][k], got[2][k], pol.rtol) for k in order])


def steps_agree(cfg: ViTConfig, ref: Sequence[Step], got: Sequence['TorchStep']) -> bool:
    return all(loss['ok'] and all(r['ok'] for r in g + u) for loss, g, u in
               (compare_step(cfg, a, b.as_step()) for a, b in zip(ref, got)))


def explain_divergence(cfg, x, labels, s, teachers, candidate: Sequence['TorchStep']) -> list[dict]:
    """The known deviation whose JAX rerun reproduces the candidate's steps, as diagnosis findings."""
    found = []
    for name in applicable(s, len(teachers)):
        if steps_agree(cfg, jax_steps(cfg, x, labels, s, teachers, candidate, deviation=name), candidate):
            found.append(diagnosis.finding('cause', 'optimizer' if name in ('decay_all', 'eps_inside') else 'loss',
                                           DEVIATIONS[name], cause=name))
    return found


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """grad's command line, parsed, the values of the flags it shares with `train` checked as `train` checks them."""
    from vit_jax import settings

    parser = verdict.parser('grad', HELP)
    cli.add_checkpoint_argument(parser)
    verdict.add_common(parser, images=False)
    parser.add_argument('--labels', metavar='L.npy', help='integer class per image (default: seeded random)')
    settings.add_flags(parser, SHARED_FLAGS)
    parser.add_argument('--steps', type=cli.positive_int, default=1, metavar='N', help='training steps (default 1)')
    args = parser.parse_args(argv)
    settings.check_ranges(args, SHARED_FLAGS)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """N training steps in both frameworks: loss, every gradient, every updated parameter after each."""
    from vit_jax import runtime, settings, train

    args = parse_args(argv)
    runtime.strict_float32()
    if args.steps > 100:
        raise UserError(f'--steps {args.steps}: grad compares every parameter after every step; at most 100')

    model = verdict.load_model(args, args.checkpoint)
    cfg, params = model.cfg, model.params
    if not cfg.num_classes or cfg.classifier in ('unpooled', 'token_unpooled', 'token_distilled'):
        raise UserError(f'{args.checkpoint}: grad trains a classifier with one head; this config has '
                        f'{cfg.num_classes} classes and the {cfg.classifier!r} classifier (need token, gap, map or '
                        'first; classes > 0)')
    cfg = cfg.replace(dropout_rate=0.0, attention_dropout_rate=0.0, stochastic_depth_rate=0.0)
    # Read at the student's resolution: the PyTorch side runs them on the student's batch.
    teachers = train.load_teachers(settings.teacher_specs(args.teacher or [], args.teacher_config or []),
                                   cfg.num_classes, 'the student', cfg.image_size, args.numerics)
    s = step_settings(args, len(teachers))
    # Both frameworks' training steps, then a forward comparison.
    x, batch = verdict.load_batch(args, cfg, lambda n: 2 * limits.training_bytes(cfg, n)
                                  + limits.comparison_bytes(cfg, n))
    labels = load_labels(args.labels, len(x), cfg.num_classes, args.seed)

    got_steps = torch_steps(cfg, params, x, labels, s, teachers)
    ref_steps = jax_steps(cfg, x, labels, s, teachers, got_steps)
    per_step = [compare_step(cfg, a, b.as_step()) for a, b in zip(ref_steps, got_steps)]
    bad_step = next((i for i, (loss, g, u) in enumerate(per_step)
                     if not (loss['ok'] and all(r['ok'] for r in g + u))), None)
    shown = bad_step if bad_step is not None else len(per_step) - 1
    loss_row, grads, updated = per_step[shown]
    loss_ref, loss_got = ref_steps[shown][0], got_steps[shown].loss

    reference = verdict.run_reference(cfg, params, x)
    candidate = counterparts.run_vit_torch(cfg, params, x)
    rows, _, _, _ = verdict.compare_intermediates(reference, candidate, 'fp32')
    forward_bad = next((r['name'] for r in rows if not r['ok']), None)
    # Errors flow back from the loss: the divergent gradient nearest the loss is where the backward pass parts.
    origin = next((f'grad/{r["name"]}' for r in reversed(grads) if not r['ok']), None)
    first = (layer_of(forward_bad) if forward_bad else 'loss' if not loss_row['ok'] else origin
             or next((f'updated/{r["name"]}' for r in updated if not r['ok']), None))
    if first and s.steps > 1 and not forward_bad:
        first = f'step {shown + 1}: {first}'
    findings = []
    if forward_bad:
        findings = diagnosis.diagnose(cfg, params, x, reference, candidate, forward_bad)
    elif bad_step is not None:
        findings = explain_divergence(cfg, x, labels, s, teachers, got_steps)
        if not findings and origin:
            findings = [diagnosis.finding('localisation', origin, f'the forward pass and loss agree; the backward '
                                          f'pass parts first (nearest the loss) at {origin[5:]}')]
        elif not findings:
            findings = [diagnosis.finding('unexplained', first, 'the gradients agree and the updates part; no known '
                                          'optimizer difference reproduces the candidate')]

    what = f'{s.optimizer}' + (f', weight decay {s.weight_decay:g}' if s.weight_decay else '') + \
        (f', label smoothing {s.label_smoothing:g}' if s.label_smoothing else '') + \
        (f', {len(teachers)} teacher(s), {s.distill} alpha {s.distill_alpha:g}' if teachers else '')
    print_header('vit_torch training steps, float32, TF32 off', cfg,
                 batch + f', lr {s.lr}, {what}, {s.steps} step(s)', [])
    print_table(rows, forward_bad)
    for i, (row, _, u) in enumerate(per_step):
        if s.steps > 1:
            print(f'step {i + 1}: loss {ref_steps[i][0]:.7f} vs {got_steps[i].loss:.7f}  '
                  f'{"ok" if row["ok"] and all(r["ok"] for r in per_step[i][1] + u) else "FAIL"}')
    print(f'\nloss{f" (step {shown + 1})" if s.steps > 1 else ""}: reference {loss_ref:.7f}  candidate '
          f'{loss_got:.7f}  difference {loss_row["max_abs_diff"]:.2e}  {"ok" if loss_row["ok"] else "FAIL"}\n')
    _print_grad_table(grads, updated, origin)
    ok = first is None
    print(f'verdict: {"PASS" if ok else "FAIL: first divergence at " + first} '
          f'(activations, loss and updates within 1e-5, gradients within 1e-4, x max(1, max |reference|))')
    print_diagnosis(findings)
    summary = summarise(rows, reference, candidate, 'fp32')
    write_json_report(args.json, {
        'first_divergence': first,
        'activations': rows,
        'max_abs_logit_diff': summary['max_abs_logit_diff'],
        'top1_agreement': summary['top1_agreement'],
        'diagnosis': findings,
        'loss': {'reference': loss_ref, 'candidate': loss_got, 'abs_diff': loss_row['max_abs_diff'],
                 'ok': loss_row['ok']},
        'gradients': grads,
        'updated_params': updated,
        'steps': [{'step': i + 1, 'loss': {'reference': ref_steps[i][0], 'candidate': got_steps[i].loss,
                                           'ok': row['ok']},
                   'gradients_ok': all(r['ok'] for r in g), 'updated_params_ok': all(r['ok'] for r in u)}
                  for i, (row, g, u) in enumerate(per_step)],
        'ok': ok,
        'lr': s.lr,
        'momentum': MOMENTUM if s.optimizer == 'sgd' else None,
        'optimizer': s.optimizer,
        'weight_decay': s.weight_decay,
        'label_smoothing': s.label_smoothing,
        'teachers': list(args.teacher or []),
        'labels': labels.tolist(),
        'config': cli.describe_config(cfg),
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
