"""`python -m parity explain IMAGE --checkpoint CKPT --out DIR`: attention maps and the paper's figures.

Runs the image through each chosen framework, takes the attention weights from that
framework's own forward pass and the position embeddings and patch-embedding filters
from that framework's own loaded model (in its own layout), computes every figure's
array with `parity.tools.figures`, and checks the two frameworks' arrays agree within the
project's float32 bound. Figures and arrays are written from the first framework.

Shapes: N tokens, D width, H heads, h x w the patch grid, ph x pw x C a patch-embedding filter.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from parity import cli
from parity.cli import predict
from parity.core import files, posemb
from parity.core.config import ViTConfig
from parity.core.errors import UserError
from parity.data import preprocess
from parity.harness import tolerance
from parity.tools import figures

FRAMEWORKS = {'jax': ('jax',), 'torch': ('torch',), 'both': ('jax', 'torch')}


@dataclasses.dataclass
class Outputs:
    """What one framework hands over: its forward pass on the image and two of its parameters."""

    logits: np.ndarray  # (C,)
    attentions: list  # one (1, H, N, N) array per layer
    posemb: np.ndarray  # (1, N, D)
    filters: Optional[np.ndarray]  # (D, ph, pw, C), None for a hybrid (its embedding reads ResNet features)


def computed_posemb(cfg: ViTConfig) -> np.ndarray:
    """The position embeddings of a sincos2d model: computed, the same table in both frameworks."""
    return posemb.sincos_2d(cfg.grid_size, cfg.hidden_size, cfg.num_prefix_tokens)


def run_jax(cfg: ViTConfig, params: dict, image: np.ndarray) -> Outputs:
    """The Flax model on one (h, w, 3) image; parameters read from its variables tree (HWIO kernel)."""
    from vit_jax import runtime
    from vit_jax.inspect import forward_with_intermediates
    from vit_jax.model import VisionTransformer
    from vit_jax.params import variables_from_params

    runtime.strict_float32()
    variables = variables_from_params(params)
    got = forward_with_intermediates(VisionTransformer(cfg), variables, image[None], attention=True)
    tree = variables['params']
    kernel = np.asarray(tree['embedding']['kernel'])  # (ph, pw, C, D), flax HWIO
    return Outputs(logits=got['logits'][0], attentions=[got[f'attention_{i}'] for i in range(cfg.num_layers)],
                   posemb=computed_posemb(cfg) if cfg.posemb != 'learn'
                   else np.asarray(tree['Transformer']['posembed_input']['pos_embedding']),
                   filters=None if cfg.is_hybrid else kernel.transpose(3, 0, 1, 2))


def run_torch(cfg: ViTConfig, params: dict, image: np.ndarray) -> Outputs:
    """The PyTorch model on one (h, w, 3) image; parameters read from its modules (OIHW conv weight)."""
    from vit_torch import runtime
    from vit_torch.inspect import forward_with_intermediates
    from vit_torch.params import build_model

    runtime.strict_float32()
    model = build_model(cfg, params)
    got = forward_with_intermediates(model, runtime.to_nchw(image[None], 'cpu'), attention=True)
    weight = model.embedding.weight.detach().numpy()  # (D, C, ph, pw), torch OIHW
    return Outputs(logits=got['logits'][0], attentions=[got[f'attention_{i}'] for i in range(cfg.num_layers)],
                   posemb=computed_posemb(cfg) if cfg.posemb != 'learn'
                   else model.Transformer.posembed_input.pos_embedding.detach().numpy(),
                   filters=None if cfg.is_hybrid else weight.transpose(0, 2, 3, 1))


RUN = {'jax': run_jax, 'torch': run_torch}


@dataclasses.dataclass
class Selection:
    """What the raw attention figure shows, and how many principal components to draw."""

    layers: list[int]
    heads: list[int]
    query: Optional[tuple[int, int]]  # a patch (row, column), or None for the class token / mean
    query_text: str
    components: int


def arrays(cfg: ViTConfig, out: Outputs, sel: Selection) -> dict[str, np.ndarray]:
    """Every figure's array from one framework's outputs (float64), by output file name."""
    grid = cfg.grid_size
    patch_px = tuple(cfg.stem_stride * p for p in cfg.patch_size)
    prefix = cfg.num_prefix_tokens
    result = {
        'probabilities': predict.softmax(out.logits),
        'rollout': figures.attention_rollout(out.attentions, grid, prefix)[0],
        'attention': figures.query_attention(out.attentions, sel.layers, sel.heads, grid, prefix, sel.query)[0],
        'position_similarity': figures.position_similarity(out.posemb, grid, prefix),
        'attention_distance': figures.mean_attention_distance(out.attentions, grid, patch_px, prefix),
    }
    if out.filters is not None:
        result['filter_pca'], result['filter_pca_variance'] = figures.filter_pca(out.filters, sel.components)
    return result


def compare(first: dict[str, np.ndarray], second: dict[str, np.ndarray], names: tuple[str, str]) -> bool:
    """Prints one line per array (max difference against the fp32 bound) and says whether all hold."""
    head = f'max |{names[0]} - {names[1]}|'
    print(f'{"array":<22}{"shape":<20}{head:>22}{"bound":>11}')
    rows = [tolerance.measure(key, a, second[key], tolerance.policy('fp32').rtol) for key, a in first.items()]
    for row in rows:
        diff = 'shape differs' if row['max_abs_diff'] is None else f'{row["max_abs_diff"]:.2e}'
        print(f'{row["name"]:<22}{str(tuple(row["shape"])):<20}{diff:>22}{row["bound"]:>11.1e}  '
              f'{"ok" if row["ok"] else "MISMATCH"}')
    return all(row['ok'] for row in rows)


def _indices(spec: Optional[str], count: int, default: list[int], what: str) -> list[int]:
    """'all', or comma-separated indices (negative ones count from the end)."""
    if spec is None:
        return default
    if spec == 'all':
        return list(range(count))
    try:
        picked = [int(s) for s in spec.split(',')]
    except ValueError:
        raise UserError(f'--{what} {spec}: expected comma-separated indices or "all"') from None
    bad = [i for i in picked if not -count <= i < count]
    if bad:
        raise UserError(f'--{what} {spec}: the model has {count} {what} (0 to {count - 1})')
    return list(dict.fromkeys(i % count for i in picked))


def select(args: argparse.Namespace, cfg: ViTConfig) -> Selection:
    """The command line's --layers, --heads, --query and --components, checked against the model."""
    L, H = cfg.num_layers, cfg.num_heads
    layers = _indices(args.layers, L, sorted({0, L // 2, L - 1}), 'layers')
    heads = _indices(args.heads, H, list(range(H)), 'heads')
    if args.components < 1:
        raise UserError(f'--components {args.components}: must be at least 1')
    q = args.query or ('cls' if cfg.has_cls_token else 'mean')
    if q == 'cls':
        if not cfg.has_cls_token:
            raise UserError(f'--query cls: this {cfg.classifier} model has no class token; use --query mean or ROW,COL')
        return Selection(layers, heads, None, 'the class token', args.components)
    if q == 'mean':
        if cfg.has_cls_token:
            raise UserError('--query mean is for models without a class token; use --query cls or ROW,COL')
        return Selection(layers, heads, None, 'every patch (mean over queries; gap model, no class token)',
                         args.components)
    h, w = cfg.grid_size
    try:
        r, c = (int(v) for v in q.split(','))
    except ValueError:
        raise UserError(f'--query {q}: expected cls, mean, or a patch as ROW,COL') from None
    if not (0 <= r < h and 0 <= c < w):
        raise UserError(f'--query {q}: the patch grid is {h}x{w} (rows 0 to {h - 1}, columns 0 to {w - 1})')
    return Selection(layers, heads, (r, c), f'patch ({r}, {c})', args.components)


def write(directory: str, cfg: ViTConfig, image: np.ndarray, result: dict[str, np.ndarray], sel: Selection,
          title: str, inputs: Sequence[str] = ()) -> list[str]:
    """Every figure as PNG and every array as float32 .npy, all or none (`files.AtomicFiles`); the files written."""
    with files.AtomicFiles(directory, '--out', inputs) as out:
        for key, a in result.items():
            np.save(out.path(f'{key}.npy'), a.astype(np.float32))

        def png(name):
            return out.path(f'{name}.png')

        figures.render_rollout(png('rollout'), image, result['rollout'], title, cfg.has_cls_token)
        figures.render_attention(png('attention'), image, result['attention'], sel.layers, sel.heads, sel.query_text,
                                 sel.query)
        figures.render_position_similarity(png('position_similarity'), result['position_similarity'], title)
        figures.render_attention_distance(png('attention_distance'), result['attention_distance'],
                                          cfg.image_size, f'{title} (1 image)')
        if 'filter_pca' in result:
            figures.render_filter_pca(png('filter_pca'), result['filter_pca'], result['filter_pca_variance'], title)
    return out.written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Attention rollout, raw attention, and the paper's Figure 7, from each framework, checked equal."""
    parser = argparse.ArgumentParser(
        prog='python -m parity explain', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Attention rollout, raw attention and the ViT paper\'s Figure 7 for one image,\n'
                    'computed from vit_jax and from vit_torch and checked equal.',
        epilog='writes to DIR: rollout.png, attention.png, position_similarity.png, filter_pca.png (not for '
               'hybrids),\nattention_distance.png, each with its array as .npy, and probabilities.npy.\n'
               'Exit 0 when the frameworks agree within the tolerance policy, 1 when not, 2 for a user error.')
    parser.add_argument('image', metavar='IMAGE', help='a JPEG/PNG file (grayscale and RGBA are converted to RGB)')
    predict.add_checkpoint_arguments(parser)
    parser.add_argument('--out', required=True, metavar='DIR', help='folder for the PNGs and .npy arrays (created)')
    parser.add_argument('--framework', choices=tuple(FRAMEWORKS), default='both',
                        help='which implementation(s) to run; both checks them against each other (default)')
    parser.add_argument('--layers', metavar='I,J,...',
                        help='encoder blocks (0-based, negative from the end) for the raw attention figure, or '
                             '"all" (default: first, middle, last)')
    parser.add_argument('--heads', metavar='I,J,...', help='heads for the raw attention figure (default: all)')
    parser.add_argument('--query', metavar='cls|mean|ROW,COL',
                        help='whose attention the raw figure shows: the class token (default), the mean over '
                             'queries (default without a class token), or the patch at ROW,COL')
    parser.add_argument('--components', type=int, default=28, metavar='K',
                        help='principal components of the embedding filters to draw (default 28, as in the paper)')
    args = parser.parse_args(argv)

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f'--out {args.out}: exists and is not a folder')
    cfg, params, labels, _, pipeline = predict.load(args, [args.image])
    bad = [k for k, v in params.items() if not np.isfinite(v).all()]
    if bad:
        raise UserError(f'{args.checkpoint}: {", ".join(bad[:3])}{" and more" if len(bad) > 3 else ""} hold NaN or '
                        'Inf; attention maps and filter components of numbers that are not numbers mean nothing')
    sel = select(args, cfg)
    image = preprocess.load_image(args.image, pipeline)
    created = files.make_dirs(args.out, '--out')
    try:
        return _explain(args, cfg, params, labels, sel, image, pipeline)
    except BaseException:
        if created and not os.listdir(args.out):  # a folder this run made stays only with its files in it
            os.rmdir(args.out)
        raise


def _explain(args: argparse.Namespace, cfg: ViTConfig, params: dict, labels: Sequence[str], sel: Selection,
             image: np.ndarray, pipeline: preprocess.Pipeline) -> int:
    """Runs the chosen frameworks, compares them, and writes the figures and arrays into `args.out`."""
    names = FRAMEWORKS[args.framework]
    results = {fw: arrays(cfg, RUN[fw](cfg, params, image), sel) for fw in names}
    first = results[names[0]]
    probs = first['probabilities']
    best = int(probs.argmax())
    title = f'{cfg.name or "ViT"} on {os.path.basename(args.image)}: top-1 {labels[best]} ({probs[best]:.1%})'
    print(f'explain: {cli.describe_config(cfg)} on {args.image}, with {" and ".join("vit_" + n for n in names)}')
    cli.say(pipeline.describe())
    print(f'top-1: {best} {labels[best]} ({probs[best]:.6f})')
    if cfg.is_hybrid:
        print('filter_pca: skipped, the patch embedding of a hybrid reads ResNet features, not RGB pixels')
    ok = True
    if len(names) == 2:
        ok = compare(first, results[names[1]], tuple(f'vit_{n}' for n in names))
        print('parity: ' + ('OK, ' + tolerance.policy('fp32').what if ok else 'FAILED'))
    nonfinite = [k for k, a in first.items() if not np.isfinite(a).all()]
    if nonfinite:
        raise UserError(f'{args.image}: the model\'s {", ".join(nonfinite)} came out NaN or Inf (an overflow in '
                        'float32); nothing was written')
    shown = pipeline.to_unit(image) * 2 - 1  # the figures draw [-1, 1] pixels; hf and timm normalise otherwise
    written = write(args.out, cfg, shown, first, sel, title, [args.image, args.checkpoint, args.labels])
    print(f'wrote {len(written)} files to {args.out} (from vit_{names[0]}): '
          + ' '.join(os.path.basename(p) for p in written if p.endswith('.png')))
    return 0 if ok else 1
