"""`verify ... --grad`: a user's training step against vit_jax.train's objective on the same batch.

Two ways in, both run in verify's child process:

- `FILE.py:BUILD --module --grad`: the user's model, mapped and loaded by `automap`, computes
  softmax cross-entropy (with `--label-smoothing`, spread as eps / C like optax and torch) on
  its own logits and backpropagates; its gradients are read back through the mapping into
  canonical names and layouts (`automap.ParamMapping.gradients`). Dropout stays off (eval mode).
- `FILE.py:STEP --grad`: STEP(params, images, labels) -> (loss, gradients): `params` the
  canonical dict (as FUNCTION receives it), `images` NHWC float32 in [-1, 1], `labels` int64
  class indices; `gradients` a dict by canonical name (NumPy, torch or JAX arrays).

The parent compares the loss (within 1e-5 x max(1, |loss|)) and every gradient (within
1e-4 x max(1, max |reference gradient|), `parity grad`'s policy) with vit_jax's, computed
as `grad.jax_steps` computes them for `parity grad`. When they part, the known habits of
`parity grad` that touch a loss (`grad.DEVIATIONS`: label smoothing spread over C - 1) are rerun on the JAX side and
named when one reproduces the candidate; otherwise the divergent gradient nearest the loss
is where the backward pass parts.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable, Mapping, Optional

import numpy as np

from parity.core import weights
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.harness import diagnosis, tolerance

GRAD = 'grad/'  # the prefix of gradients among what the child returns


# --------------------------------------------------------------------------- in the child

def module_step(mapped, labels: np.ndarray, label_smoothing: float, x: np.ndarray
                ) -> tuple[float, dict[str, np.ndarray]]:
    """The user's model (mapped and loaded): cross-entropy on its logits, backpropagated; (loss, canonical grads)."""
    import torch
    import torch.nn.functional as F

    from parity.harness.automap import _first_tensor

    model = mapped.model
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        try:
            logits = _first_tensor(model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))))
            loss = F.cross_entropy(logits, torch.from_numpy(labels), label_smoothing=label_smoothing)
            loss.backward()
        except Exception as e:  # the user's forward or backward pass
            raise UserError(f'--grad: your model\'s forward or backward pass raised {type(e).__name__}: '
                            f'{str(e).splitlines()[0] if str(e) else ""}') from None
    return float(loss.item()), mapped.mapping.gradients(model)


def user_step(fn: Callable, spec: str, params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray,
              updated: bool = False) -> tuple[float, dict[str, np.ndarray], Optional[dict], list[str]]:
    """STEP(params, images, labels) on copies: (loss, gradients by canonical name, the updated parameters when
    `updated` (--optimizer: STEP returns them third), notes)."""
    from parity.harness.counterparts import _beside, _where, to_numpy

    path = getattr(fn, '_parity_path', spec)
    with _beside(path):
        try:
            result = fn({k: np.array(v, np.float32) for k, v in params.items()}, np.array(x, np.float32),
                        np.array(labels, np.int64))
        except Exception as e:  # the step under test failed; say where, in one line
            if isinstance(e, TypeError) and e.__traceback__.tb_next is None:  # the call itself: another signature
                raise UserError(f'{spec} cannot be called as STEP(params, images, labels) ({e}): with --grad and no '
                                '--module, FILE.py:STEP is your training step; a model builder takes --module'
                                ) from None
            raise UserError(f'{spec} raised {_where(e, path)}') from None
    n = 3 if updated else 2
    if not (isinstance(result, (tuple, list)) and len(result) == n and all(isinstance(r, Mapping)
                                                                          for r in result[1:])):
        raise UserError(f'{spec} returned {type(result).__name__}'
                        + (f' of {len(result)}' if isinstance(result, (tuple, list)) else '')
                        + '; STEP(params, images, labels) returns (loss, gradients'
                        + (', updated parameters' if updated else '') + '), each a dict by canonical parameter name'
                        + (' (--optimizer: the parameters after one update, third)' if updated else ''))
    try:
        loss = float(np.asarray(to_numpy(result[0])).reshape(()))
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f'{spec}: the loss it returned is not one number') from None
    notes: list[str] = []

    def arrays(tree: Mapping, what: str) -> dict[str, np.ndarray]:
        out = {}
        for k, v in tree.items():
            if k not in params:
                notes.append(f'{what} {k!r}: not a parameter of this model; ignored')
                continue
            try:
                out[k] = to_numpy(v).astype(np.float64)
            except (TypeError, ValueError, RuntimeError) as e:
                notes.append(f'{what} {k!r}: not an array ({type(e).__name__}), ignored')
        return out

    return loss, arrays(result[1], 'gradient'), arrays(result[2], 'updated') if updated else None, notes


UPDATED = 'updated/'  # the prefix of updated parameters among what the child returns


def as_outputs(loss: float, grads: Mapping[str, np.ndarray], after: Optional[Mapping[str, np.ndarray]] = None
               ) -> tuple[dict[str, np.ndarray], dict]:
    """What the child writes: gradients (and updated parameters) under prefixed keys, the loss in the report."""
    out = {GRAD + k: v for k, v in grads.items()}
    out.update({UPDATED + k: v for k, v in (after or {}).items()})
    return out, {'loss': loss}


# --------------------------------------------------------------------------- in the parent

def settings_for(label_smoothing: float, optimizer: Optional[str] = None, lr: Optional[float] = None,
                 weight_decay: Optional[float] = None):
    """vit_jax.train's settings for one step of `parity grad` with this label smoothing (and optimizer), nothing
    else changed."""
    from parity.harness import grad

    ns = argparse.Namespace(**{name: None for name in grad.SHARED_FLAGS}, steps=1)
    ns.label_smoothing, ns.optimizer, ns.lr, ns.weight_decay = label_smoothing, optimizer, lr, weight_decay
    return grad.step_settings(ns, 0)


def reference_step(cfg: ViTConfig, params, x, labels, s, deviation: Optional[str] = None) -> tuple[float, dict]:
    """vit_jax's loss and gradients at `params`: `vit_jax.objective`'s loss as `grad.jax_steps` computes it, with
    `deviation` one of `grad.DEVIATIONS`' loss habits (label smoothing over C - 1)."""
    import jax.numpy as jnp

    from vit_jax import objective, runtime
    from vit_jax.params import params_from_variables, variables_from_params

    obj = objective.Objective.from_settings(s)
    y = jnp.asarray(labels)
    target = objective.targets(obj, y, cfg.num_classes) if obj.soft_targets else None
    if obj.soft_targets and deviation == 'smoothing_others':
        onehot = jnp.eye(cfg.num_classes)[y]
        eps, C = s.label_smoothing, cfg.num_classes
        target = onehot * (1 - eps) + (1 - onehot) * eps / (C - 1)
    with runtime.matmul_precision('fp32'):
        loss, grads = _value_and_grad(cfg, obj)(variables_from_params(params)['params'], x, y, target)
    return float(loss), params_from_variables({'params': grads})


@functools.lru_cache(maxsize=4)
def _value_and_grad(cfg: ViTConfig, obj) -> Callable:
    """The jitted loss and gradient of one config and objective, compiled once per process."""
    import jax

    from vit_jax import objective
    from vit_jax.model import VisionTransformer

    model = VisionTransformer(cfg)

    def loss_fn(tree, x, y, target):
        logits = model.apply({'params': tree}, x, train=True)  # dropout rates are 0: nothing random
        return objective.objective_loss(obj, logits, y, target)[0]

    return jax.jit(jax.value_and_grad(loss_fn))


def _rows(cfg: ViTConfig, ref: tuple[float, dict], loss: float, grads: Mapping[str, np.ndarray]
          ) -> tuple[dict, list[dict]]:
    pol = tolerance.policy('fp32')
    loss_row = tolerance.measure('loss', np.float64(ref[0]), np.float64(loss), pol.rtol)
    rows = []
    for k in weights.param_shapes(cfg):
        if k in grads and np.shape(grads[k]) == np.shape(ref[1][k]):
            rows.append(tolerance.measure(k, ref[1][k], grads[k], pol.grad_rtol))
        else:
            got = 'not returned' if k not in grads else f'shape {np.shape(grads[k])}'
            rows.append({'name': k, 'shape': list(np.shape(ref[1][k])), 'max_abs_diff': None, 'rel_diff': None,
                         'cosine': None, 'bound': 0.0, 'ok': False, 'note': got})
    return loss_row, rows


def compare(cfg: ViTConfig, params, x, labels, label_smoothing: float, loss: float,
            grads: Mapping[str, np.ndarray], after: Optional[Mapping[str, np.ndarray]] = None,
            optimizer: Optional[Mapping] = None) -> dict:
    """The candidate's loss and gradients (and, given `after` and `optimizer` {'optimizer', 'lr', 'weight_decay'},
    its updated parameters) against vit_jax's: rows, verdict, first divergence and findings."""
    from parity.harness import grad

    s = settings_for(label_smoothing, **(optimizer or {}))
    ref = reference_step(cfg, params, x, labels, s)
    loss_row, rows = _rows(cfg, ref, loss, grads)
    updated = _update_rows(cfg, reference_update(cfg, params, grads, s), after) if after is not None else []
    origin = next((f'grad/{r["name"]}' for r in reversed(rows) if not r['ok']), None)
    first = 'loss' if not loss_row['ok'] else origin or next(
        (f'updated/{r["name"]}' for r in updated if not r['ok']), None)
    findings = []
    if first:
        for name in grad.applicable(s, 0):
            if name in ('decay_all', 'eps_inside'):
                if after is not None and loss_row['ok'] and not origin and all(
                        r['ok'] for r in _update_rows(cfg, reference_update(cfg, params, grads, s, name), after)):
                    findings.append(diagnosis.finding('cause', 'optimizer', grad.DEVIATIONS[name], cause=name))
                continue
            alt_loss, alt_rows = _rows(cfg, reference_step(cfg, params, x, labels, s, name), loss, grads)
            if alt_loss['ok'] and all(r['ok'] for r in alt_rows):
                findings.append(diagnosis.finding('cause', 'loss', grad.DEVIATIONS[name], cause=name))
        if not findings:
            missing = [r['name'] for r in rows + updated if r.get('note') == 'not returned']
            if missing:
                findings.append(diagnosis.finding('localisation', first, f'not returned: {", ".join(missing)}'))
            elif origin and loss_row['ok']:
                findings.append(diagnosis.finding('localisation', origin, 'the loss agrees; the backward pass parts '
                                                  f'first (nearest the loss) at {origin[len(GRAD):]}'))
            elif first.startswith('updated/'):
                findings.append(diagnosis.finding('unexplained', first, 'the loss and gradients agree and the update '
                                                  'parts; no known optimizer habit reproduces it'))
            else:
                findings.append(diagnosis.finding('unexplained', 'loss', 'the loss differs and no known habit '
                                                  '(label smoothing over C - 1) reproduces it'))
    return {'reference_loss': ref[0], 'candidate_loss': loss, 'loss_row': loss_row, 'rows': rows,
            'updated': updated, 'first': first, 'ok': first is None, 'findings': findings,
            'label_smoothing': label_smoothing, 'optimizer': dict(optimizer) if optimizer else None}


def reference_update(cfg: ViTConfig, params, grads, s, deviation: Optional[str] = None) -> dict[str, np.ndarray]:
    """vit_jax's optimizer (`vit_jax.objective.make_optimizer`, as `grad.jax_steps` builds it) applied once to the
    candidate's own gradients, from a fresh state: the parameters after one update."""
    from vit_jax.params import params_from_variables, variables_from_params

    tree = variables_from_params({k: np.asarray(v, np.float32) for k, v in params.items()})['params']
    g = variables_from_params({k: np.asarray(grads.get(k, np.zeros_like(v)), np.float32)
                               for k, v in params.items()})['params']
    return params_from_variables({'params': _update(s, deviation)(tree, g)})


@functools.lru_cache(maxsize=8)
def _update(s, deviation: Optional[str]) -> Callable:
    """One jitted optimizer update of settings `s` (or a `grad.DEVIATIONS` habit), compiled once per process."""
    import dataclasses

    import jax
    import optax

    from vit_jax import objective

    tx, _ = objective.make_optimizer(dataclasses.replace(s, weight_decay_on='all') if deviation == 'decay_all' else s,
                                     eps_root=1e-8 if deviation == 'eps_inside' else 0.0)

    @jax.jit
    def update(tree, g):
        updates, _ = tx.update(g, tx.init(tree), tree)
        return optax.apply_updates(tree, updates)

    return update


def _update_rows(cfg: ViTConfig, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> list[dict]:
    pol = tolerance.policy('fp32')
    out = []
    for k in weights.param_shapes(cfg):
        if k in got and np.shape(got[k]) == np.shape(ref[k]):
            out.append(tolerance.measure(k, ref[k], got[k], pol.rtol))
        else:
            out.append({'name': k, 'shape': list(np.shape(ref[k])), 'max_abs_diff': None, 'rel_diff': None,
                        'cosine': None, 'bound': 0.0, 'ok': False,
                        'note': 'not returned' if k not in got else f'shape {np.shape(got[k])}'})
    return out


def lines(result: dict) -> list[str]:
    """The loss line and the gradient table, as printed."""
    row = result['loss_row']
    out = [f'loss: reference {result["reference_loss"]:.7f}  candidate {result["candidate_loss"]:.7f}  '
           f'difference {row["max_abs_diff"]:.2e}  '
           f'{"ok" if row["ok"] else "FAIL"}', '']
    width = max(len(r['name']) for r in result['rows'])
    out.append(f'{"gradient":<{width}}  {"max-abs":>9}  {"relative":>9}  {"cosine":>10}  {"bound":>9}')

    def num(v, fmt='.2e'):
        return '-' if v is None else format(v, fmt)

    updated = {r['name']: r for r in result.get('updated') or []}
    if updated:
        out[-1] += f'  {"update max-abs":>14}'
    for r in result['rows']:
        u = updated.get(r['name'])
        mark = 'ok' if r['ok'] and (u is None or u['ok']) else 'FAIL'
        if result['first'] in (f'grad/{r["name"]}', f'updated/{r["name"]}'):
            mark += '   <- first divergence' + (' (nearest the loss)' if result['first'].startswith('grad/') else '')
        mark += f'  ({r["note"]})' if 'note' in r else f'  (update: {u["note"]})' if u and 'note' in u else ''
        update = f'  {num(u["max_abs_diff"]):>14}' if u else ''
        out.append(f'{r["name"]:<{width}}  {num(r["max_abs_diff"]):>9}  {num(r["rel_diff"]):>9}  '
                   f'{num(r["cosine"], ".7f"):>10}  {r["bound"]:>9.1e}{update}  {mark}')
    return out


def split(candidate: dict[str, Any]) -> tuple[dict, dict, dict]:
    """(forward intermediates, gradients, updated parameters by canonical name) of what the child returned."""
    return ({k: v for k, v in candidate.items() if not k.startswith((GRAD, UPDATED))},
            {k[len(GRAD):]: v for k, v in candidate.items() if k.startswith(GRAD)},
            {k[len(UPDATED):]: v for k, v in candidate.items() if k.startswith(UPDATED)})


def json_fields(result: dict) -> dict:
    """The training step in verify's JSON: `loss` and `gradients`, as `parity grad` writes them."""
    row = result['loss_row']
    return {'loss': {'reference': result['reference_loss'], 'candidate': result['candidate_loss'],
                     'abs_diff': row['max_abs_diff'], 'ok': row['ok']},
            'gradients': result['rows'], 'label_smoothing': result['label_smoothing'],
            **({'updated_params': result['updated'], 'optimizer': result['optimizer']}
               if result.get('updated') else {})}
