"""`python -m parity verify FILE.py:FUNCTION --checkpoint CKPT`: your own implementation against vit_jax.

Your function runs in a child process (`child.run_isolated`, which loads and calls it
with `counterparts.load_function` / `run_function`), so an exit, a crash or a hang of it
is reported as such, never taken for a verdict; what it returns is compared with the
reference like any other candidate.
"""

from __future__ import annotations

import difflib
from typing import Optional, Sequence

from parity import cli
from parity.harness import child, counterparts, verdict
from parity.harness.verdict import REFERENCE

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

Example: python -m parity verify examples/numpy_vit.py:vit --checkpoint ckpt.npz --input x.npy
Exit 0 when everything returned is within tolerance, 1 when not, 2 for a user error."""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Your own implementation against vit_jax, layer by layer."""
    from vit_jax import runtime

    parser = verdict.parser('verify', HELP)
    parser.add_argument('function', metavar='FILE.py:FUNCTION', help='your forward pass: FUNCTION(params, x) -> dict')
    cli.add_checkpoint_argument(parser, '--checkpoint')
    verdict.add_common(parser)
    verdict.add_precision(parser, 'the precision your implementation computes in, which picks the tolerance '
                             '(default fp32)')
    parser.add_argument('--timeout', type=cli.positive_float, default=child.DEFAULT_TIMEOUT, metavar='SECONDS',
                        help=f'how long your function may take, import included (default {child.DEFAULT_TIMEOUT:g})')
    args = parser.parse_args(argv)
    runtime.strict_float32()

    child.check_spec(args.function)  # fail fast, before the checkpoint is read; nothing of it runs here
    model = verdict.load_model(args, args.checkpoint)
    cfg, params = model.cfg, model.params
    x, batch = verdict.load_batch(args, cfg)
    candidate, notes = child.run_isolated(args.function, params, x, args.timeout)
    known = set(counterparts.known_names(cfg))
    for name in [k for k in candidate if k not in known]:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        notes.append(f'{name!r} is not an intermediate of this model; ignored'
                     + (f' (did you mean {close[0]!r}?)' if close else ''))
        del candidate[name]
    reference = verdict.run_reference(cfg, params, x, attention=any(k.startswith('attention_') for k in candidate))
    run = verdict.Comparison(cfg, params, x, batch, args.function, args.precision, notes,
                             raw_posemb=verdict.raw_posemb(model))
    return verdict.conclude(run, reference, candidate, args.json)
