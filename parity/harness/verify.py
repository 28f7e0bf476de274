"""`python -m parity verify FILE.py:FUNCTION --checkpoint CKPT`: your own implementation against vit_jax.

`--module` hands over FILE.py:BUILD, a builder of the user's own torch model, which
`parity.harness.automap` maps, loads and hooks in the child process; `--grad` adds a
training step (`parity.harness.stepcheck`).

`--preprocess FILE.py:PREPROCESS --images DIR` adds (or, without FILE.py:FUNCTION, is) a
`pixels` row: your PREPROCESS(path, size) on the files against the reference pipeline
(`parity.harness.pixels`), run before the model. PREPROCESS is called in this process,
once per file: it reads images, it does not run a model.

Your function runs in a child process (`child.run_isolated`, which loads and calls it
with `counterparts.load_function` / `run_function`), so an exit, a crash or a hang of it
is reported as such, never taken for a verdict; what it returns is compared with the
reference like any other candidate.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional, Sequence

import numpy as np

from parity import cli
from parity.cli import remote
from parity.core.errors import UserError
from parity.data import images, preprocess
from parity.harness import automap, child, counterparts, grad, pixels, stepcheck, verdict
from parity.harness.verdict import REFERENCE

STEP_FLAGS = ('label_smoothing', 'optimizer', 'lr', 'weight_decay')  # vit_jax.train's declarations, via --grad

HELP = f"""\
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

FILE.py is imported and FUNCTION called in a child process: if it exits (sys.exit,
os._exit), crashes, raises or runs past --timeout, verify says so and exits 2.

--preprocess FILE.py:PREPROCESS with --images DIR: PREPROCESS(path, size) returns one image
file as float HWC pixels at size x size; it is compared on every file with the reference
pipeline (--reference-preprocess official|hf|timm; default: the checkpoint's source's, official
without a checkpoint), within 1e-6, as a first row named pixels, and a difference is named:
antialiasing, the resize filter, a centre crop, mean/std, the range, BGR channel order. The
model (when FILE.py:FUNCTION is given too) runs on the reference's pixels. Without
FILE.py:FUNCTION only the pixels are compared, at --checkpoint's resolution or --image-size
(default 224). --preprocess official|hf|timm instead picks the pipeline --images go through.

--module: FILE.py:BUILD instead, BUILD(config) -> your torch.nn.Module (or flax.linen.Module),
config a dict of sizes (image_size, patch_size, hidden_size, num_layers, num_heads, mlp_dim,
num_classes, classifier, representation_size). The mapping from the canonical parameters to yours is found
by structure and shape (the layouts shapes leave open are chosen by which reproduces the
reference), printed, written to the JSON (mapping, unmapped) and the checkpoint is loaded
through it; hooks on the blocks give the intermediates and sub-steps.
--grad: a training step too: with --module your model's cross-entropy gradients read back
into canonical names; without it FILE.py:STEP(params, images, labels) -> (loss, gradients by
canonical name). Compared with vit_jax.train's objective under parity grad's tolerance.
--optimizer sgd|adamw|adam (--lr, --weight-decay), with FILE.py:STEP --grad: STEP returns the
parameters after one update third; compared with vit_jax's optimizer fed STEP's gradients.

Example: python -m parity verify examples/numpy_vit.py:vit --checkpoint ckpt.npz --input x.npy
         python -m parity verify examples/scratch_vit.py:build --module --checkpoint ckpt.npz
Exit 0 when everything returned is within tolerance, 1 when not, 2 for a user error."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Your own implementation against vit_jax, layer by layer."""
    from vit_jax import runtime, settings

    parser = verdict.parser('verify', HELP)
    parser.add_argument('function', metavar='FILE.py:FUNCTION', nargs='?',
                        help='your forward pass: FUNCTION(params, x) -> dict (omitted: only --preprocess is checked)')
    parser.add_argument('--checkpoint', metavar='CKPT', help=cli.CHECKPOINT_HELP + ' (required with FILE.py:FUNCTION)')
    cli.add_numerics_argument(parser)
    remote.add_offline_argument(parser)
    parser.add_argument('--preprocess', metavar='FILE.py:PREPROCESS|MODE',
                        help='your preprocessing, PREPROCESS(path, size) -> HWC float pixels, compared with the '
                             'reference pipeline on --images; or a mode (official, hf, timm): the pipeline --images '
                             'go through')
    parser.add_argument('--reference-preprocess', choices=preprocess.MODES, metavar='MODE',
                        help='the pipeline your PREPROCESS is compared with and the model runs on: official, hf or '
                             "timm (default: the checkpoint's source's; official without a checkpoint)")
    verdict.add_common(parser)
    verdict.add_precision(parser, 'the precision your implementation computes in, which picks the tolerance '
                             '(default fp32)')
    parser.add_argument('--module', action='store_true',
                        help='FILE.py:BUILD: BUILD(config) returns your own torch.nn.Module or flax.linen.Module; '
                             'the harness finds the mapping from the checkpoint to its parameters, loads it and hooks '
                             'its blocks')
    parser.add_argument('--grad', action='store_true',
                        help="a training step too: with --module, your model's cross-entropy gradients; without, "
                             'FILE.py:STEP(params, images, labels) -> (loss, gradients by canonical name); compared '
                             "with vit_jax.train's objective on the same batch, parity grad's tolerance")
    parser.add_argument('--labels', metavar='L.npy', help='with --grad: integer class per image (default: seeded '
                        'random)')
    settings.add_flags(parser, STEP_FLAGS)
    parser.add_argument('--timeout', type=cli.positive_float, default=child.DEFAULT_TIMEOUT, metavar='SECONDS',
                        help=f'how long your function may take, import included (default {child.DEFAULT_TIMEOUT:g})')
    args = parser.parse_args(argv)
    settings.check_ranges(args, STEP_FLAGS)
    runtime.strict_float32()
    step_flags = [f for f in STEP_FLAGS if getattr(args, f) is not None]
    if (args.labels or step_flags) and not args.grad:
        raise UserError('verify: --labels, --label-smoothing, --optimizer, --lr and --weight-decay belong to --grad '
                        '(a training step); add --grad')
    optimizer = {f: getattr(args, f) for f in ('optimizer', 'lr', 'weight_decay')}
    if any(v is not None for v in optimizer.values()) and args.module:
        raise UserError('verify --module: --optimizer, --lr and --weight-decay check your own update, which a model '
                        'does not carry; write FILE.py:STEP(params, images, labels) -> (loss, gradients, updated '
                        'parameters) and pass it with --grad --optimizer')

    user = _user_preprocess(args)
    if args.function is None:
        if user is None:
            raise UserError('verify: give FILE.py:FUNCTION (your forward pass) or --preprocess FILE.py:PREPROCESS '
                            '--images DIR (your preprocessing), or both')
        return pixels_only(args, user)
    if args.checkpoint is None:
        raise UserError(f'verify {args.function}: --checkpoint CKPT is required to run your forward pass')
    child.check_spec(args.function)  # fail fast, before the checkpoint is read; nothing of it runs here
    model = verdict.load_model(args, args.checkpoint)
    cfg, params = model.cfg, model.params
    mode = args.reference_preprocess if user else args.preprocess
    pipeline = verdict.pipeline_for(args, model, mode) if args.images is not None else None
    pixel_row = _pixels(user, args.images, pipeline, cfg.image_size) if user else None
    x, batch = verdict.load_batch(args, cfg, pipeline=pipeline)
    labels = grad.load_labels(args.labels, len(x), cfg.num_classes, args.seed) if args.grad else None
    smoothing = args.label_smoothing or 0.0
    if args.grad and not cfg.num_classes:
        raise UserError(f'{args.checkpoint}: --grad trains a classifier; this checkpoint has no head')
    if args.grad and not args.module:
        return step_only(args, cfg, params, x, batch, labels, smoothing,
                         optimizer if any(v is not None for v in optimizer.values()) else None)
    extra, preamble, structural = {}, [], None
    if args.module:
        automap.check_config(cfg)
        job = {'config': {**cfg.to_official_dict(), 'image_size': cfg.image_size}}
        if args.grad:
            job['grad'] = {'labels': labels.tolist(), 'label_smoothing': smoothing}
        candidate, notes, extra = child.run_module_isolated(args.function, params, x, job, args.timeout)
        candidate, grads, _ = stepcheck.split(candidate)
        if args.grad:
            extra['training'] = stepcheck.compare(cfg, params, x, labels, smoothing, extra.pop('loss'), grads)
        preamble = ['mapping (canonical <- yours):'] + automap.table_lines(extra['mapping']) + ['']
        structural = lambda first, have: automap.structural_findings(  # noqa: E731
            cfg, params, extra['unmapped'], first, have)
    else:
        candidate, notes = child.run_isolated(args.function, params, x, args.timeout)
    known = set(counterparts.known_names(cfg))
    for name in [k for k in candidate if k not in known]:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        notes.append(f'{name!r} is not an intermediate of this model; ignored'
                     + (f' (did you mean {close[0]!r}?)' if close else ''))
        del candidate[name]
    reference = verdict.run_reference(cfg, params, x, attention=any(k.startswith('attention_') for k in candidate))
    run = verdict.Comparison(cfg, params, x, batch, args.function, args.precision, notes,
                             raw_posemb=verdict.raw_posemb(model), pixels=pixel_row, preamble=preamble,
                             structural=structural, extra=extra)
    if user:
        run.notes.append(f'pixels: {user[0]} against the reference {pipeline.describe()}')
    return verdict.conclude(run, reference, candidate, args.json)


def _user_preprocess(args) -> Optional[tuple[str, Callable]]:
    """(spec, function) when --preprocess names FILE.py:PREPROCESS, loaded now; None for a mode or nothing.

    A mode given to --preprocess means what it means on compare: the pipeline --images go through.
    """
    spec = args.preprocess
    if spec is None or spec in preprocess.MODES:
        return None
    if ':' not in spec:
        raise UserError(f'--preprocess {spec}: expected FILE.py:PREPROCESS (your function) or a mode: '
                        f'{", ".join(preprocess.MODES)}')
    if args.images is None:
        raise UserError(f'--preprocess {spec}: your preprocessing is compared on image files; give --images DIR')
    child.check_spec(spec)
    return spec, counterparts.load_function(spec)


def _pixels(user: tuple[str, Callable], folder: str, pipeline: preprocess.Pipeline, size: int
            ) -> tuple[dict, list[dict]]:
    """The pixels row: the reference pipeline's pixels against the user's, with the cause named."""
    paths = images.images_in(folder)
    ours = preprocess.load_images(paths, pipeline)
    theirs = pixels.user_pixels(user[1], user[0], paths, size)
    return pixels.compare(paths, pipeline, ours, theirs, pixels.VERIFY)


def pixels_only(args, user: tuple[str, Callable]) -> int:
    """`verify --preprocess FILE.py:PREPROCESS --images DIR` without a forward pass: the pixels row alone."""
    if args.checkpoint is not None:
        model = verdict.load_model(args, args.checkpoint)
        pipeline = verdict.pipeline_for(args, model, args.reference_preprocess)
    else:
        cli.check_outputs({'--json': args.json}, [], [args.config, user[0].rpartition(':')[0]])
        pipeline = preprocess.pipeline_for(args.reference_preprocess, 'released', '.', args.image_size or 224)
        cli.say(pipeline.describe())
    if args.images is None:
        raise UserError(f'--preprocess {user[0]}: your preprocessing is compared on image files; give --images DIR')
    row, findings = _pixels(user, args.images, pipeline, pipeline.hw[0])
    summary = {'ok': row['ok'], 'first_divergence': None if row['ok'] else 'pixels'}
    print(f'reference  {pipeline.describe()}')
    print(f'candidate  {user[0]}')
    print(f'images     {row["shape"][0]} from {args.images}, {pipeline.hw[0]}x{pipeline.hw[1]}')
    print()
    verdict.print_table([row], summary['first_divergence'])
    print(f'verdict: {"PASS" if row["ok"] else "FAIL"}: pixels {"within" if row["ok"] else "beyond"} '
          f'{row["bound"]:.1e} of the reference')
    verdict.print_diagnosis(findings)
    verdict.write_json_report(args.json, {
        **summary, 'activations': [row], 'diagnosis': findings, 'first_divergent_tensor': summary['first_divergence'],
        'reference': pipeline.describe(), 'preprocess': pipeline.as_dict(), 'candidate': user[0],
        'batch': f'{row["shape"][0]} images from {args.images}', 'notes': []})
    return 0 if row['ok'] else 1


def step_only(args, cfg, params, x, batch: str, labels: np.ndarray, smoothing: float,
              optimizer: Optional[dict]) -> int:
    """`verify FILE.py:STEP --grad`: the user's training step alone (`stepcheck`), its loss and every gradient, and
    with --optimizer the parameters after its update."""
    job = {'step': {'labels': labels.tolist(), 'updated': optimizer is not None}}
    got, notes, extra = child.run_module_isolated(args.function, params, x, job, args.timeout)
    _, grads, after = stepcheck.split(got)
    result = stepcheck.compare(cfg, params, x, labels, smoothing, extra['loss'], grads,
                               after if optimizer is not None else None, optimizer)
    verdict.print_header(f'{args.function} (a training step)', cfg,
                         f'{batch}, label smoothing {smoothing:g}', notes)
    for line in stepcheck.lines(result):
        print(line)
    print(f'verdict: {"PASS" if result["ok"] else "FAIL: first divergence at " + result["first"]} (loss'
          f'{" and updates" if optimizer else ""} within 1e-5, gradients within 1e-4, x max(1, max |reference|))')
    verdict.print_diagnosis(result['findings'])
    verdict.write_json_report(args.json, {
        'first_divergence': result['first'], 'ok': result['ok'], 'diagnosis': result['findings'],
        **stepcheck.json_fields(result), 'labels': labels.tolist(), 'candidate': args.function,
        'reference': verdict.REFERENCE, 'config': cli.describe_config(cfg), 'batch': batch, 'notes': notes})
    return 0 if result['ok'] else 1
