"""What `compare`, `verify` and `grad` share: their arguments, the reference run, the rows, the report.

The reference is always vit_jax in float32 at JAX's highest matmul precision. Every
intermediate the candidate hands back is compared with it in forward order under
`parity.harness.tolerance` (`compare_intermediates`); the first one out of tolerance is
the first divergence (`summarise`), `parity.harness.diagnosis` says where inside it the
difference starts and which known cause reproduces it, and `conclude` prints the table,
the verdict and the diagnosis and writes the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from parity import cli
from parity.core import files, limits
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.core.weights import POSEMB
from parity.data import images, preprocess
from parity.harness import counterparts, diagnosis, tolerance

REFERENCE = 'vit_jax, float32 at highest matmul precision'


# --------------------------------------------------------------------------- arguments and inputs

def parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f'python -m parity {command}', description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common(parser: argparse.ArgumentParser, images: bool = True) -> None:
    cli.add_config_argument(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--input', metavar='X.npy', help='float32 images, NHWC, in [-1, 1]')
    if images:
        source.add_argument('--images', metavar='DIR', help='a folder of .jpg/.jpeg/.png images, prepared by the '
                            "checkpoint's source's pipeline (--preprocess)")
    source.add_argument('--random', type=int, metavar='N', help='N seeded uniform [-1, 1] images (the default: 2)')
    parser.add_argument('--seed', type=cli.seed_int, default=0, help='seed for --random (default 0)')
    parser.add_argument('--image-size', type=cli.positive_int, metavar='N',
                        help="build the model at NxN, resizing the position embeddings from the checkpoint's grid "
                             "(default: the checkpoint's own resolution)")
    parser.add_argument('--json', metavar='OUT.json', help='also write the comparison as JSON')


def add_precision(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument('--precision', choices=tolerance.PRECISIONS, default='fp32', help=what)


def load_model(args: argparse.Namespace, path: str) -> cli.LoadedCheckpoint:
    """The checkpoint a command compares, at `--image-size`; a model with no stored grid at `--input`'s size (or 224).

    Checks first that `--json` can be written and is none of the inputs.
    """
    function = getattr(args, 'function', None)  # verify's FILE.py:FUNCTION
    inputs = [args.input, args.config, getattr(args, 'labels', None), function and function.rpartition(':')[0]]
    cli.check_outputs({'--json': args.json}, [path], inputs)
    return cli.load_model(path, args.config, args.image_size,
                          cli.npy_image_size(args.input) if args.input is not None else 224, args.numerics)


def raw_posemb(model: cli.LoadedCheckpoint) -> Callable[[], Optional[np.ndarray]]:
    """The checkpoint's own position embeddings, before resizing (for the diagnosis), read when asked for."""
    return lambda: model.checkpoint.params(model.cfg).get(POSEMB)


def pipeline_for(args: argparse.Namespace, model: cli.LoadedCheckpoint, mode: Optional[str]
                 ) -> preprocess.Pipeline:
    """The preprocessing of `--images`: `mode`, else the one of the checkpoint's source; named on stderr."""
    p = preprocess.pipeline_for(mode, model.checkpoint.format, model.checkpoint.where, model.cfg.image_size)
    cli.say(p.describe())
    return p


def load_batch(args: argparse.Namespace, cfg: ViTConfig, need: Optional[Callable[[int], int]] = None,
               pipeline: Optional[preprocess.Pipeline] = None) -> tuple[np.ndarray, str]:
    """The batch the command runs on, and how to describe it.

    `need(n)` is the memory the command takes for n images (default: a forward comparison,
    `limits.comparison_bytes`); a batch past the machine's budget is refused before it is made.
    `--images` go through `pipeline` (default: the official one at the model's resolution).
    """
    attention = getattr(args, 'attention', False)
    need = need or (lambda n: limits.comparison_bytes(cfg, n, attention))

    def check(n: int) -> None:
        limits.check_compute(need(n), f'{cli.describe_config(cfg)} on {n} image{"s" if n != 1 else ""}')

    if args.input is not None:
        x = cli.load_input(args.input, cfg)
        check(len(x))
        return x, f'{len(x)} images from {args.input}'
    if getattr(args, 'images', None) is not None:
        found = images.images_in(args.images)
        check(len(found))
        x = preprocess.load_images(found, pipeline or preprocess.Pipeline('official', cfg.image_size))
        if x.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise UserError(f'--images {args.images}: the pipeline gives {x.shape[1]}x{x.shape[2]} pixels but the '
                            f'model is built at {cfg.image_size}x{cfg.image_size}; pass --image-size {x.shape[1]} '
                            'or another --preprocess')
        return x, f'{len(x)} images from {args.images}'
    n = 2 if args.random is None else args.random
    if n < 1:
        raise UserError(f'--random {n}: need at least one image')
    check(n)
    x = np.random.default_rng(args.seed).uniform(-1, 1, (n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    return x, f'{n} random images (seed {args.seed})'


def run_reference(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, attention: bool = False
                  ) -> dict[str, np.ndarray]:
    """vit_jax's named intermediates, float32 at highest precision."""
    from vit_jax import runtime
    from vit_jax.inspect import forward_with_intermediates
    from vit_jax.model import VisionTransformer

    with runtime.matmul_precision('fp32'):
        return forward_with_intermediates(VisionTransformer(cfg), params, x, attention=attention)


def jax_at(cfg: ViTConfig, params: Mapping[str, np.ndarray], x: np.ndarray, precision: str) -> np.ndarray:
    """vit_jax's logits at a reduced precision: bf16 compute dtype, or JAX's default matmul precision."""
    import jax.numpy as jnp

    from vit_jax import runtime
    from vit_jax.model import VisionTransformer
    from vit_jax.params import variables_from_params

    dtype = jnp.bfloat16 if precision == 'bf16' else jnp.float32
    with runtime.matmul_precision(precision):
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


def fmt_number(v, fmt: str = '.2e') -> str:
    return '-' if v is None else format(v, fmt)


def print_table(rows: list[dict], first: Optional[str]) -> None:
    width = max([len(r['name']) for r in rows] + [4])
    if not rows:
        return
    shape_w = max([len(_shape(r)) for r in rows] + [5])
    print(f'{"name":<{width}}  {"shape":<{shape_w}}  {"max-abs":>9}  {"relative":>9}  {"cosine":>10}  {"bound":>9}')
    for r in rows:
        mark = 'ok' if r['ok'] else 'FAIL'
        if r['name'] == first:
            mark += '   <- first divergence'
        extra = f'  (candidate shape {tuple(r["candidate_shape"])})' if 'candidate_shape' in r else ''
        extra += f'  ({r["note"]})' if 'note' in r else ''
        print(f'{r["name"]:<{width}}  {_shape(r):<{shape_w}}  {fmt_number(r["max_abs_diff"]):>9}  '
              f'{fmt_number(r["rel_diff"]):>9}  {fmt_number(r["cosine"], ".7f"):>10}  {r["bound"]:>9.1e}  '
              f'{mark}{extra}')


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
          f'{_fraction(summary["top5_agreement"], n)}, '
          f'max-abs logit difference {fmt_number(summary["max_abs_logit_diff"])}')


def print_diagnosis(findings: list[dict]) -> None:
    if findings:
        print('diagnosis:')
        for f in findings:
            print(f'  [{f["kind"]}{": " + f["cause"] if f["cause"] else ""}] {f["message"]}')


def write_json_report(path: Optional[str], payload: dict) -> None:
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

    files.write_json(path, clean(payload), '--json')


def print_header(candidate: str, cfg: ViTConfig, batch: str, notes: Sequence[str]) -> None:
    print(f'reference  {REFERENCE}')
    print(f'candidate  {candidate}')
    print(f'model      {cli.describe_config(cfg)}; {batch}')
    for note in notes:
        print(f'note       {note}')
    print()


@dataclasses.dataclass
class Comparison:
    """One forward-pass comparison: what ran, on what, at which precision, and what to say about it.

    `raw_posemb` gives the checkpoint's own position embeddings (before resizing), for
    the diagnosis' resize hypotheses; `yardstick` is vit_jax itself at the candidate's
    reduced precision (`compare --precision tf32|bf16`), printed and written beside it.
    """

    cfg: ViTConfig
    params: Mapping[str, np.ndarray]
    x: np.ndarray
    batch: str  # how the batch came about, for people
    candidate: str  # what the candidate is, for people
    precision: str = 'fp32'
    notes: list[str] = dataclasses.field(default_factory=list)
    raw_posemb: Optional[Callable[[], np.ndarray]] = None
    yardstick: Optional[dict] = None
    pixels: Optional[tuple[dict, list[dict]]] = None  # the `pixels` row and its findings (`parity.harness.pixels`)
    # `verify --module`: lines printed after the header (the mapping table), findings about the structure for the
    # first divergent tensor, and more JSON fields (`mapping`, `unmapped`, ...).
    preamble: list[str] = dataclasses.field(default_factory=list)
    structural: Optional[Callable[[str, dict], list[dict]]] = None
    extra: dict = dataclasses.field(default_factory=dict)


def conclude(run: Comparison, reference: dict, candidate: dict, json_path: Optional[str]) -> int:
    """Compare, judge, diagnose, print and write JSON; the exit code."""
    cfg, x, precision = run.cfg, run.x, run.precision
    rows, skipped, aligned, align_notes = compare_intermediates(reference, candidate, precision)
    notes = run.notes + align_notes
    summary = summarise(rows, reference, aligned, precision)
    findings = []
    if summary['first_divergent_tensor']:
        first = summary['first_divergent_tensor']
        subs = {k: v for k, v in candidate.items() if k not in reference and k.startswith('Transformer/')}
        raw = run.raw_posemb() if run.raw_posemb and first == 'with_posemb' else None
        findings = diagnosis.diagnose(cfg, run.params, x, reference, {**aligned, **subs}, first, precision, raw)
        if run.structural:
            findings += run.structural(first, {**aligned, **subs})
    if run.pixels:
        rows, findings = [run.pixels[0]] + rows, run.pixels[1] + findings
        if not run.pixels[0]['ok']:  # the files were prepared differently: that comes before any layer
            summary.update(ok=False, first_divergence='pixels', first_divergent_tensor='pixels')
    print_header(run.candidate, cfg, run.batch, notes)
    for line in run.preamble:
        print(line)
    print_table(rows, summary['first_divergent_tensor'])
    for s in skipped:
        print(f'{s["name"]}: not compared ({s["reason"]})')
    if run.yardstick:
        print(f'yardstick: vit_jax itself at {precision}: max-abs logit difference '
              f'{run.yardstick["max_abs_logit_diff"]:.2e}, top-1 agreement '
              f'{_fraction(run.yardstick["top1_agreement"], len(x))}')
    for side, got in (('reference', reference), ('candidate', candidate)):
        if 'logits' in got and not np.isfinite(got['logits']).all():
            notes.append(f'the {side}\'s logits hold NaN or Inf: a NaN is never within tolerance'
                         + (' (the checkpoint\'s own weights are not all numbers)'
                            if not all(np.isfinite(v).all() for v in run.params.values()) else ''))
            print(f'note       {notes[-1]}')
    training = run.extra.pop('training', None)  # verify --module --grad (parity.harness.stepcheck)
    if training:
        from parity.harness import stepcheck

        print()
        for line in stepcheck.lines(training):
            print(line)
        if summary['ok'] and not training['ok']:  # the forward pass agrees: the step is the first divergence
            summary.update(ok=False, first_divergence=training['first'], first_divergent_tensor=training['first'])
            findings = training['findings']
            print(f'verdict: FAIL: first divergence at {training["first"]} (the forward pass agrees; loss within '
                  '1e-5, gradients within 1e-4, x max(1, max |reference|))')
        else:
            print_verdict(summary, precision, len(x))
            if training['ok']:
                print('training step: PASS (loss within 1e-5, every gradient within 1e-4, x max(1, max |reference|))')
        run.extra.update(stepcheck.json_fields(training))
    else:
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
        'candidate': run.candidate,
        'config': cli.describe_config(cfg),
        'batch': run.batch,
        'not_compared': skipped,
        'notes': notes,
    }
    if run.yardstick:
        payload['yardstick'] = run.yardstick
    payload.update(run.extra)
    write_json_report(json_path, payload)
    return 0 if summary['ok'] else 1
