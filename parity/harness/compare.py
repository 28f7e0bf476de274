"""`python -m parity compare CKPT`: one checkpoint through vit_jax and a candidate, layer by layer.

The candidate is vit_torch at `--precision`, or with `--against` timm's model loaded by
timm's own npz loader or transformers' ViT after conversion (`counterparts`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from parity import cli
from parity.core.errors import UserError
from parity.data import images, preprocess
from parity.harness import counterparts, pixels, tolerance, verdict
from parity.harness.verdict import REFERENCE

HELP = f"""\
Runs one checkpoint through the reference ({REFERENCE})
and a candidate, and compares every named intermediate in forward order: stem, embedding,
with_posemb, encoderblock_i (attention_i with --attention), encoder_norm, pre_logits, logits.

The candidate is vit_torch at --precision (fp32: TF32 off; tf32: TF32 matmuls and
convolutions; bf16: torch.autocast to bfloat16), or with --against, timm's model loaded
by timm's own npz loader (timm:MODEL_NAME) or transformers' ViT after conversion (hf),
each with its library's default numerics. The reference stays float32 at highest
precision, so a tf32/bf16 run measures what the reduced precision costs; vit_jax at
the same reduced precision is shown as a yardstick.

With --images DIR, the files go through --preprocess (default: the checkpoint's source's
pipeline, named on stderr); with --against, a first row, pixels, compares that with the
counterpart library's own processor on the same files (transformers' ViTImageProcessor, timm's
create_transform), within 1e-6, and names the setting that differs (antialiasing, the resize
filter, a centre crop, mean/std, the range, the channel order).

Tolerance (parity.harness.tolerance): fp32 within 1e-5 x max(1, max |reference|) per tensor;
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


def yardstick(run: verdict.Comparison, reference: dict) -> dict:
    """vit_jax itself at the candidate's reduced precision, against the reference."""
    got = verdict.jax_at(run.cfg, run.params, run.x, run.precision)
    return {'what': f'vit_jax at {run.precision} vs the reference',
            'max_abs_logit_diff': float(np.abs(got - reference['logits']).max()),
            'top1_agreement': tolerance.topk_agreement(reference['logits'], got, 1)}


def hf_pixels(run: verdict.Comparison, folder: str, pipeline: preprocess.Pipeline, x: np.ndarray, checkpoint: str,
              fmt: str) -> tuple[dict, list[dict]]:
    """The pixels row against transformers' own ViTImageProcessor (the checkpoint folder's, when it is one)."""
    paths = images.images_in(folder)
    theirs, what = pixels.hf_processor_pixels(paths, checkpoint if fmt == 'hf' else None, run.cfg.image_size)
    run.notes.append(f'pixels: ours {pipeline.describe()}; theirs {what}')
    return pixels.compare(paths, pipeline, x, theirs)


def timm_pixels(run: verdict.Comparison, folder: str, pipeline: preprocess.Pipeline, x: np.ndarray, model
                ) -> tuple[dict, list[dict]]:
    """The pixels row against timm's own eval transform for the model it built."""
    paths = images.images_in(folder)
    theirs, what, notes = pixels.timm_transform_pixels(paths, model, run.cfg.image_size)
    run.notes += [f'pixels: ours {pipeline.describe()}; theirs {what}'] + notes
    return pixels.compare(paths, pipeline, x, theirs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """One checkpoint through vit_jax and vit_torch (or timm, transformers), layer by layer."""
    from vit_jax import runtime as jax_runtime
    from vit_torch import runtime as torch_runtime

    parser = verdict.parser('compare', HELP)
    cli.add_checkpoint_argument(parser)
    verdict.add_common(parser)
    verdict.add_precision(parser, 'the candidate\'s precision (the reference is always fp32): fp32, tf32 or bf16')
    parser.add_argument('--against', metavar='timm:MODEL|hf',
                        help='compare against timm (its own npz loader) or transformers instead of vit_torch')
    parser.add_argument('--attention', action='store_true', help='also compare the softmax weights of every block')
    preprocess.add_preprocess_argument(parser)
    args = parser.parse_args(argv)
    against = _against(args.against)
    jax_runtime.strict_float32()

    model = verdict.load_model(args, args.checkpoint)
    cfg, params = model.cfg, model.params
    pipeline = verdict.pipeline_for(args, model, args.preprocess) if args.images is not None else None
    x, batch = verdict.load_batch(args, cfg, pipeline=pipeline)
    run = verdict.Comparison(cfg, params, x, batch, '', args.precision, raw_posemb=verdict.raw_posemb(model))
    device = torch_runtime.device()
    if args.precision == 'tf32' and device == 'cpu':
        run.notes.append('no TF32 on CPU: --precision tf32 computes exactly as fp32 here')
    if against is None:
        run.candidate = f'vit_torch, {args.precision} ({device})'
        candidate = counterparts.run_vit_torch(cfg, params, x, args.precision, args.attention)
    elif against[0] == 'timm':
        run.candidate = f'timm {against[1]}, {args.precision} ({device})'
        run.notes += counterparts.timm_notes(against[1])
        timm_model = counterparts.build_timm(against[1], cfg, model.checkpoint.params(cfg))
        if pipeline is not None:
            run.pixels = timm_pixels(run, args.images, pipeline, x, timm_model)
        candidate = counterparts.run_timm(against[1], cfg, None, x, args.precision, args.attention, timm_model)
    else:
        run.candidate = f'transformers ViTForImageClassification, {args.precision} ({device})'
        counterparts.check_hf_expressible(cfg)
        own = model.checkpoint.hub_config  # a Hugging Face folder: transformers as it runs that folder
        run.notes += counterparts.hf_notes(cfg, own)
        if pipeline is not None:
            run.pixels = hf_pixels(run, args.images, pipeline, x, model.checkpoint.where, model.checkpoint.format)
        candidate = counterparts.run_hf(cfg, params, x, args.precision, args.attention, own)
    reference = verdict.run_reference(cfg, params, x, args.attention)
    if args.precision != 'fp32':
        run.yardstick = yardstick(run, reference)
    return verdict.conclude(run, reference, candidate, args.json)
