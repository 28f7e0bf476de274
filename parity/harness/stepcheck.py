"""`verify ... --grad`: a user's training step against vit_jax.train's objective on the same batch.

Two ways in, both run in verify's child process:

- `FILE.py:BUILD --module --grad`: the user's model, mapped and loaded by `automap`, computes
  softmax cross-entropy (with `--label-smoothing`, spread as eps / C like optax and torch) on
  its own logits and backpropagates; its gradients are read back through the mapping into
  canonical names and layouts (`automap.Mapping_.gradients`). Dropout stays off (eval mode).
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


def user_step(fn: Callable, spec: str, params: Mapping[str, np.ndarray], x: np.ndarray, labels: np.ndarray
              ) -> tuple[float, dict[str, np.ndarray], list[str]]:
    """STEP(params, images, labels) on copies: (loss, gradients by canonical name, notes)."""
    from parity.harness.counterparts import _beside, _where, to_numpy

    path = getattr(fn, '_parity_path', spec)
    with _beside(path):
        try:
            result = fn({k: np.array(v, np.float32) for k, v in params.items()}, np.array(x, np.float32),
                        np.array(labels, np.int64))
        except Exception as e:  # the step under test failed; say where, in one line
            raise UserError(f'{spec} raised {_where(e, path)}') from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], Mapping)):
        raise UserError(f'{spec} returned {type(result).__name__}; STEP(params, images, labels) returns '
                        '(loss, gradients), gradients a dict by canonical parameter name')
    try:
        loss = float(np.asarray(to_numpy(result[0])).reshape(()))
    except (TypeError, ValueError, RuntimeError):
        raise UserError(f'{spec}: the loss it returned is not one number') from None
    known, grads, notes = set(params), {}, []
    for k, v in result[1].items():
        if k not in known:
            notes.append(f'{k!r} is not a parameter of this model; ignored')
            continue
        try:
            grads[k] = to_numpy(v).astype(np.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            notes.append(f'gradient {k!r}: not an array ({type(e).__name__}), ignored')
    return loss, grads, notes


def as_outputs(loss: float, grads: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """What the child writes: the gradients under GRAD-prefixed keys, the loss in the report."""
    return {GRAD + k: v for k, v in grads.items()}, {'loss': loss}


# --------------------------------------------------------------------------- in the parent

def settings_for(label_smoothing: float):
    """vit_jax.train's settings for one step of `parity grad` with this label smoothing, nothing else changed."""
    from parity.harness import grad

    ns = argparse.Namespace(**{name: None for name in grad.SHARED_FLAGS}, steps=1)
    ns.label_smoothing = label_smoothing
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
            grads: Mapping[str, np.ndarray]) -> dict:
    """The candidate's loss and gradients against vit_jax's: rows, verdict, first divergence and findings."""
    from parity.harness import grad

    s = settings_for(label_smoothing)
    ref = reference_step(cfg, params, x, labels, s)
    loss_row, rows = _rows(cfg, ref, loss, grads)
    origin = next((f'grad/{r["name"]}' for r in reversed(rows) if not r['ok']), None)
    first = 'loss' if not loss_row['ok'] else origin
    findings = []
    if first:
        for name in grad.applicable(s, 0):
            alt_loss, alt_rows = _rows(cfg, reference_step(cfg, params, x, labels, s, name), loss, grads)
            if alt_loss['ok'] and all(r['ok'] for r in alt_rows):
                findings.append(diagnosis.finding('cause', 'loss', grad.DEVIATIONS[name], cause=name))
        if not findings:
            missing = [r['name'] for r in rows if r.get('note') == 'not returned']
            if missing:
                findings.append(diagnosis.finding('localisation', first, f'no gradient for {", ".join(missing)}'))
            elif origin and loss_row['ok']:
                findings.append(diagnosis.finding('localisation', origin, 'the loss agrees; the backward pass parts '
                                                  f'first (nearest the loss) at {origin[len(GRAD):]}'))
            else:
                findings.append(diagnosis.finding('unexplained', 'loss', 'the loss differs and no known habit '
                                                  '(label smoothing over C - 1) reproduces it'))
    return {'reference_loss': ref[0], 'candidate_loss': loss, 'loss_row': loss_row, 'rows': rows, 'first': first,
            'ok': first is None, 'findings': findings, 'label_smoothing': label_smoothing}


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

    for r in result['rows']:
        mark = 'ok' if r['ok'] else 'FAIL'
        if result['first'] == f'grad/{r["name"]}':
            mark += '   <- first divergence (nearest the loss)'
        mark += f'  ({r["note"]})' if 'note' in r else ''
        out.append(f'{r["name"]:<{width}}  {num(r["max_abs_diff"]):>9}  {num(r["rel_diff"]):>9}  '
                   f'{num(r["cosine"], ".7f"):>10}  {r["bound"]:>9.1e}  {mark}')
    return out


def split(candidate: dict[str, Any]) -> tuple[dict, dict]:
    """(forward intermediates, gradients by canonical name) of what the child returned."""
    return ({k: v for k, v in candidate.items() if not k.startswith(GRAD)},
            {k[len(GRAD):]: v for k, v in candidate.items() if k.startswith(GRAD)})


def json_fields(result: dict) -> dict:
    """The training step in verify's JSON: `loss` and `gradients`, as `parity grad` writes them."""
    row = result['loss_row']
    return {'loss': {'reference': result['reference_loss'], 'candidate': result['candidate_loss'],
                     'abs_diff': row['max_abs_diff'], 'ok': row['ok']},
            'gradients': result['rows'], 'label_smoothing': result['label_smoothing']}
